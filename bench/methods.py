"""Saliency methods: ms per call and ratios, side by side in one run, against pytorch-grad-cam and against the floor
(one forward plus one backward to the input), for resnet18 and resnet50 at batch 1 and 8, 224 px; and peak memory.

pytorch-grad-cam is never a dependency: install it for the benchmark only, e.g.
    .venv/bin/pip install --target /tmp/gradcam_pkg --no-deps grad-cam ttach opencv-python-headless
(the folder is put on sys.path when it exists; `--pgc PATH` to change it). Without it, its columns are skipped.
Timings are medians over `--repeats` calls, the methods taking turns, so that load on a shared machine hits all alike.
Peak memory: on CUDA the allocator's peak; on CPU the process's peak resident memory (VmHWM, reset before each call)
above what was resident before the call, measured in a child process whose malloc hands large blocks back to the
system at once (MALLOC_MMAP_THRESHOLD_), so that resident memory follows live tensors.
"""
import argparse, os, sys, time, statistics, warnings, json, subprocess
from pathlib import Path
import numpy as np
import torch
from torchvision.models import resnet18, resnet50
from fastai_saliency.methods import gradcam, fullgrad, cam

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--archs', default='resnet18,resnet50')
p.add_argument('--batches', default='1,8')
p.add_argument('--size', type=int, default=224)
p.add_argument('--repeats', type=int, default=5, help='timed calls per method for resnet18')
p.add_argument('--repeats50', type=int, default=2, help='timed calls per method for resnet50')
p.add_argument('--pgc-fullgrad-repeats', type=int, default=1, help="timed calls of pytorch-grad-cam's FullGrad "
               "(seconds to minutes per call, so one call is already a steady measurement)")
p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
p.add_argument('--threads', type=int, default=None, help="torch CPU threads (default: torch's choice); on a shared, "
               "oversubscribed machine 1 thread gives steadier timings")
p.add_argument('--pgc', default='/tmp/gradcam_pkg', help="folder holding pytorch-grad-cam (pip install --target)")
p.add_argument('--memory-only', action='store_true', help=argparse.SUPPRESS)   # the child process that measures memory
p.add_argument('--family', action='store_true', help='every method against pytorch-grad-cam, torchcam and captum '
               '(bench/method_family.py; the options after --family go to it)')
if '--family' in sys.argv:
    i = sys.argv.index('--family')
    sys.argv = [str(Path(__file__).with_name('method_family.py'))] + sys.argv[i+1:]
    import runpy; runpy.run_path(sys.argv[0], run_name='__main__'); sys.exit(0)
a = p.parse_args()

if a.threads: torch.set_num_threads(a.threads)
if Path(a.pgc).exists(): sys.path.append(a.pgc)     # appended: the venv's own packages (numpy, torch) win
try:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from pytorch_grad_cam import GradCAM, FullGrad
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    have_pgc,pgc_note = True,''
except ImportError as e:
    have_pgc,pgc_note = False,f"pytorch-grad-cam not importable ({e}): its columns are skipped"

dev = torch.device(a.device)
def sync():
    if dev.type == 'cuda': torch.cuda.synchronize()

def _status_kb(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field): return int(line.split()[1])

def peak_mb(f):
    "Peak memory of one call of `f` above what was in use before, in MiB"
    if dev.type == 'cuda':
        sync(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        f(); sync()
        return (torch.cuda.max_memory_allocated() - base)/2**20
    try:
        with open('/proc/self/clear_refs', 'w') as fh: fh.write('5')     # resets VmHWM to the current RSS
    except OSError: return float('nan')
    base = _status_kb('VmRSS:')
    f()
    return (_status_kb('VmHWM:') - base)/1024

def timed(fs:dict, repeats:int, warm=(), max_calls=None):
    "Median ms per call of each function in `fs`, calling them in turn `repeats` times (after one warm-up of `warm`)"
    for k in warm: fs[k]()
    ts = {k:[] for k in fs}
    for _ in range(repeats):
        for k,f in fs.items():
            if len(ts[k]) >= (max_calls or {}).get(k, repeats): continue
            sync(); t = time.perf_counter(); f(); sync(); ts[k].append((time.perf_counter() - t)*1000)
    return {k:statistics.median(v) for k,v in ts.items()}

def methods(arch, bs):
    "The functions to compare for `arch` at batch size `bs`, and the model and batch they share"
    torch.manual_seed(0)
    model = dict(resnet18=resnet18, resnet50=resnet50)[arch](weights=None).to(dev).eval()
    x = torch.randn(bs, 3, a.size, a.size, device=dev)
    with torch.no_grad(): preds = model(x).argmax(1)
    def floor():
        xx = x.detach().requires_grad_()
        out = model(xx)
        torch.autograd.grad(out.gather(1, preds[:, None]).sum(), xx)
    fs = dict(floor=floor,
              gradcam=lambda: gradcam(model, x, 'layer4', target=preds),
              fullgrad=lambda: fullgrad(model, x, target=preds),
              cam=lambda: cam(model, x, target=preds))
    if have_pgc:
        targets = [ClassifierOutputTarget(int(c)) for c in preds]
        def pgc_gradcam():
            with GradCAM(model=model, target_layers=[model.layer4[-1]]) as c: return c(input_tensor=x, targets=targets)
        def pgc_fullgrad():
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                c = FullGrad(model=model, target_layers=[])
            try: return c(input_tensor=x, targets=targets)
            finally: c.activations_and_grads.release()
        fs.update(pgc_gradcam=pgc_gradcam, pgc_fullgrad=pgc_fullgrad)
    return fs,model,x,preds

configs = [(arch, int(b)) for arch in a.archs.split(',') for b in a.batches.split(',')]

if a.memory_only:
    out = {}
    for arch,bs in configs:
        fs = methods(arch, bs)[0]
        out[f'{arch},{bs}'] = {k:peak_mb(f) for k,f in fs.items()}
    print(json.dumps(out)); sys.exit(0)

def memory():
    "Peak MiB per config and method: in this process on CUDA, else in a child with mmap-backed large blocks"
    if dev.type == 'cuda': return {f'{arch},{bs}':{k:peak_mb(f) for k,f in methods(arch, bs)[0].items()} for arch,bs in configs}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    r = subprocess.run([sys.executable, __file__, '--memory-only', '--archs', a.archs, '--batches', a.batches,
                        '--size', str(a.size), '--device', a.device, '--pgc', a.pgc]
                       + (['--threads', str(a.threads)] if a.threads else []), env=env, capture_output=True, text=True)
    if r.returncode != 0: print(f"memory measurement failed: {r.stderr[-500:]}", file=sys.stderr); return {}
    return json.loads(r.stdout.strip().splitlines()[-1])

rows,checks = [],[]
print(f"device: {dev} ({torch.get_num_threads()} threads), torch {torch.__version__}, {a.size} px; "
      f"'calls': timed calls per method (pytorch-grad-cam's FullGrad: {a.pgc_fullgrad_repeats})")
if pgc_note: print(pgc_note)
results = {}
for arch,bs in configs:
    t0 = time.perf_counter()
    fs,model,x,preds = methods(arch, bs)
    repeats = a.repeats50 if arch == 'resnet50' else a.repeats
    ms = timed(fs, repeats, warm=[k for k in fs if k != 'pgc_fullgrad'],   # pgc FullGrad: numpy/cv2 bound, no warm-up
               max_calls=dict(pgc_fullgrad=a.pgc_fullgrad_repeats))
    agree = '-'
    if have_pgc:   # the same Grad-CAM? mean absolute difference of the [0,1] maps
        agree = f"{np.abs(fs['gradcam']().cpu().numpy() - fs['pgc_gradcam']()).mean():.3f}"
    results[(arch, bs)] = ms,agree,repeats
    print(f"  {arch} batch {bs}: {time.perf_counter()-t0:.0f} s", file=sys.stderr)
    del fs,model,x
mem = memory()

for (arch,bs),(ms,agree,rep) in results.items():
    mm = mem.get(f'{arch},{bs}', {})
    f = lambda k: f"{ms[k]:.0f}" if k in ms else '-'
    m = lambda k: f"{mm[k]:.0f}" if k in mm else '-'
    ratio = lambda k: f"{ms['pgc_'+k]/ms[k]:.1f}x" if 'pgc_'+k in ms else '-'
    rows.append(f"| {arch} | {bs} | {rep} | {f('floor')} | {f('gradcam')} | {f('pgc_gradcam')} | {ratio('gradcam')} "
                f"| {f('fullgrad')} | {f('pgc_fullgrad')} | {ratio('fullgrad')} | {ms['fullgrad']/ms['floor']:.2f} | {f('cam')} "
                f"| {m('floor')} | {m('gradcam')} | {m('pgc_gradcam')} | {m('fullgrad')} | {m('pgc_fullgrad')} | {agree} |")
    if 'pgc_gradcam' in ms:
        checks.append(f"{arch} b{bs}: Grad-CAM {ms['pgc_gradcam']/ms['gradcam']:.1f}x faster than pytorch-grad-cam (target >= 2.5x)")
        checks.append(f"{arch} b{bs}: FullGrad {ms['pgc_fullgrad']/ms['fullgrad']:.1f}x faster than pytorch-grad-cam (target >= 20x)")
    if arch == 'resnet18' and bs == 8:
        checks.append(f"{arch} b{bs}: FullGrad / floor = {ms['fullgrad']/ms['floor']:.2f} (target <= 1.15)")

print("\n| model | batch | calls | floor ms | Grad-CAM ms | pgc Grad-CAM ms | speed-up | FullGrad ms | pgc FullGrad ms "
      "| speed-up | FullGrad / floor | CAM ms | floor MiB | Grad-CAM MiB | pgc Grad-CAM MiB | FullGrad MiB | pgc FullGrad MiB "
      "| Grad-CAM vs pgc (mean abs diff) |")
print('|' + '---|'*18)
print('\n'.join(rows))
print()
print('\n'.join(checks))
