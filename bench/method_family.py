"""Every method of the package against pytorch-grad-cam, torchcam and captum, side by side in one run: ms per call
(median over `--repeats` calls, the libraries taking turns) and peak memory (MiB above what was resident before the call:
the process's VmHWM on CPU, reset before each call; the allocator's peak on CUDA), for resnet50 and efficientnet_b0 at
224 px, batch 8, at the last conv stage (`layer4`, `conv_head`: the default layers), each method's target the predicted
class. `bench/methods.py --family` runs this.

Timing: every call is warmed up once (a new input shape costs oneDNN a first slow call, which would otherwise fall on
whichever library runs first), then timed `--repeats` times, the libraries taking turns; calls that took longer than
`--long` seconds to warm up are timed once. Peak memory is measured in a child process whose malloc hands large blocks
back to the system at once (MALLOC_MMAP_THRESHOLD_), so that resident memory follows live tensors (in this process
the allocator keeps what the previous call freed, and a call reusing it shows no growth), each call after a warm-up.

ScoreCAM and AblationCAM make a forward pass per channel and image (2048 and 1280 channels): on a CPU they are timed at
`--slow-batch` images of `--slow-size` px (default 1 image of 64 px), said so in the table. Integrated Gradients with
`--ig-steps` points (captum's default rule, Gauss-Legendre), SmoothGrad with `--sg-samples` samples, occlusion with
`--occ-window` windows and strides: the same settings for every library. Columns without a number: the library does not
have the method.
"""
import argparse, os, sys, time, statistics, warnings, json, subprocess
import torch, timm
from torchvision.models import resnet50
from fastai_saliency.methods import saliency_maps

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--archs', default='resnet50,efficientnet_b0')
p.add_argument('--bs', type=int, default=8)
p.add_argument('--size', type=int, default=224)
p.add_argument('--slow-batch', type=int, default=1)
p.add_argument('--slow-size', type=int, default=64)
p.add_argument('--repeats', type=int, default=3)
p.add_argument('--long', type=float, default=5., help='calls slower than this (s) are timed once')
p.add_argument('--ig-steps', type=int, default=16)
p.add_argument('--sg-samples', type=int, default=8)
p.add_argument('--occ-window', type=int, default=56)
p.add_argument('--methods', default=None, help='a comma-separated subset')
p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
p.add_argument('--threads', type=int, default=None)
p.add_argument('--memory-only', action='store_true', help=argparse.SUPPRESS)   # the child process that measures memory
a = p.parse_args()
if a.threads: torch.set_num_threads(a.threads)
warnings.simplefilter('ignore')
dev = torch.device(a.device)
import pytorch_grad_cam as pgc
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
import torchcam.methods as tc
import captum.attr as ca

def sync():
    if dev.type == 'cuda': torch.cuda.synchronize()

def _kb(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field): return int(line.split()[1])

def peak_mb(f):
    if dev.type == 'cuda':
        sync(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated(); f(); sync()
        return (torch.cuda.max_memory_allocated() - base)/2**20
    try:
        with open('/proc/self/clear_refs', 'w') as fh: fh.write('5')
    except OSError: return float('nan')
    base = _kb('VmRSS:'); f()
    return (_kb('VmHWM:') - base)/1024

def model_for(arch):
    torch.manual_seed(0)
    if arch == 'resnet50': m,layer = resnet50(weights=None),'layer4'
    else: m,layer = timm.create_model(arch, pretrained=False),'conv_head'
    return m.to(dev).eval(),layer

def pgc_call(C, model, mod, x, t, **kw):
    def f():
        with C(model=model, target_layers=[mod], **kw) as c: return c(input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in t])
    return f

def tc_call(C, model, layer, x, t, **kw):
    def f():
        with C(model, target_layer=layer, **kw) as e:
            out = model(x)
            return e(t.tolist(), out)
    return f

def cap(f): return f

def calls(arch, model, layer, x, t):
    "method -> {library: function}"
    mod = model.get_submodule(layer)
    ours = lambda n, **kw: (lambda: saliency_maps(model, x, n, layer if n not in ATTR else None, t, **kw))
    igs,sgs,w = a.ig_steps,a.sg_samples,a.occ_window
    res = {
        'gradcam': dict(ours=ours('gradcam'), pgc=pgc_call(pgc.GradCAM, model, mod, x, t), torchcam=tc_call(tc.GradCAM, model, layer, x, t)),
        'hirescam': dict(ours=ours('hirescam'), pgc=pgc_call(pgc.HiResCAM, model, mod, x, t)),
        'gradcam++': dict(ours=ours('gradcam++'), pgc=pgc_call(pgc.GradCAMPlusPlus, model, mod, x, t), torchcam=tc_call(tc.GradCAMpp, model, layer, x, t)),
        'xgradcam': dict(ours=ours('xgradcam'), pgc=pgc_call(pgc.XGradCAM, model, mod, x, t), torchcam=tc_call(tc.XGradCAM, model, layer, x, t)),
        'layercam': dict(ours=ours('layercam'), pgc=pgc_call(pgc.LayerCAM, model, mod, x, t), torchcam=tc_call(tc.LayerCAM, model, layer, x, t)),
        'eigencam': dict(ours=ours('eigencam'), pgc=pgc_call(pgc.EigenCAM, model, mod, x, t)),
        'eigengradcam': dict(ours=ours('eigengradcam'), pgc=pgc_call(pgc.EigenGradCAM, model, mod, x, t)),
        'fullgrad': dict(ours=ours('fullgrad')),
        'gradient': dict(ours=ours('gradient'), captum=lambda: ca.Saliency(model).attribute(x, target=t)),
        'inputxgrad': dict(ours=ours('inputxgrad'), captum=lambda: ca.InputXGradient(model).attribute(x, target=t)),
        'integrated_gradients': dict(ours=ours('integrated_gradients', steps=igs, batch_size=64),
                                     captum=lambda: ca.IntegratedGradients(model).attribute(x, target=t, n_steps=igs, internal_batch_size=64)),
        'smoothgrad': dict(ours=ours('smoothgrad', samples=sgs, sigma=0.15), captum=lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
            x, nt_type='smoothgrad', nt_samples=sgs, nt_samples_batch_size=sgs, stdevs=0.15, target=t, abs=False)),
        'guided_backprop': dict(ours=ours('guided_backprop'), captum=lambda: ca.GuidedBackprop(model).attribute(x, target=t)),
        'occlusion': dict(ours=ours('occlusion', window=w, stride=w, batch_size=64), captum=lambda: ca.Occlusion(model).attribute(
            x, sliding_window_shapes=(3, w, w), strides=(3, w, w), target=t, perturbations_per_eval=64)),
    }
    return res

def slow_calls(model, layer, x, t):
    mod = model.get_submodule(layer)
    return {'scorecam': dict(ours=lambda: saliency_maps(model, x, 'scorecam', layer, t, batch_size=64, progress=False),
                             pgc=pgc_call(pgc.ScoreCAM, model, mod, x, t), torchcam=tc_call(tc.ScoreCAM, model, layer, x, t, batch_size=64)),
            'ablationcam': dict(ours=lambda: saliency_maps(model, x, 'ablationcam', layer, t, batch_size=64, progress=False),
                                pgc=pgc_call(pgc.AblationCAM, model, mod, x, t, batch_size=64))}

ATTR = ('fullgrad', 'gradient', 'inputxgrad', 'integrated_gradients', 'smoothgrad', 'guided_backprop', 'occlusion')
LIBS = ('ours', 'pgc', 'torchcam', 'captum')

def bench(fs:dict, repeats:int):
    "Median ms of `repeats` calls of each function, the functions taking turns, after one warm-up call each"
    ts,n = {k:[] for k in fs},{}
    for k,f in fs.items():
        sync(); t0 = time.perf_counter(); f(); sync()
        n[k] = repeats if time.perf_counter() - t0 < a.long else 1
    for r in range(repeats):
        for k,f in fs.items():
            if r >= n[k]: continue
            sync(); t0 = time.perf_counter(); f(); sync(); ts[k].append((time.perf_counter() - t0)*1000)
    return {k:statistics.median(v) for k,v in ts.items()}

def memory(fs:dict):
    "Peak MiB of one call of each function, after a warm-up call"
    res = {}
    for k,f in fs.items(): f(); res[k] = peak_mb(f)
    return res

def child_memory() -> dict:
    "arch -> method -> library -> peak MiB, from this script run as a child process with malloc returning large blocks at once"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    r = subprocess.run([sys.executable, __file__, '--memory-only'] + sys.argv[1:], env=env, capture_output=True, text=True)
    if r.returncode: print(f"memory child failed:\n{r.stderr[-2000:]}"); return {}
    return json.loads(r.stdout.strip().splitlines()[-1])

import contextlib, io
def tables():
    "(arch, method name, {library: function}) for every method asked for"
    want = None if a.methods is None else a.methods.split(',')
    for arch in a.archs.split(','):
        model,layer = model_for(arch)
        torch.manual_seed(0)
        x = torch.randn(a.bs, 3, a.size, a.size, device=dev)
        with torch.no_grad(): t = model(x).argmax(1)
        xs = torch.randn(a.slow_batch, 3, a.slow_size, a.slow_size, device=dev)
        with torch.no_grad(): ts = model(xs).argmax(1)
        for name,fs in {**calls(arch, model, layer, x, t), **slow_calls(model, layer, xs, ts)}.items():
            if not want or name in want: yield arch,name,fs

if a.memory_only:
    res = {}
    for arch,name,fs in tables():
        with contextlib.redirect_stderr(io.StringIO()): res.setdefault(arch, {})[name] = memory(fs)
    print(json.dumps(res)); sys.exit()

print(f"device {dev}, torch threads {torch.get_num_threads()}, {a.bs} images of {a.size} px (ScoreCAM, AblationCAM: {a.slow_batch} of {a.slow_size} px), "
      f"median of {a.repeats} calls after a warm-up (calls over {a.long:g} s: one); IG {a.ig_steps} steps, SmoothGrad {a.sg_samples} samples, "
      f"occlusion {a.occ_window} px windows")
rows = []
for arch,name,fs in tables():
    with contextlib.redirect_stderr(io.StringIO()):
        rows.append((arch, name, bench(fs, a.repeats), memory(fs) if dev.type == 'cuda' else None))
    print(f"timed {arch} {name}", file=sys.stderr, flush=True)
mem = None if dev.type == 'cuda' else child_memory()
hdr = f"{'arch':16s} {'method':21s} " + ' '.join(f"{l+' ms':>11s}" for l in LIBS) + f" {'best other/ours':>15s} " + ' '.join(f"{l+' MiB':>10s}" for l in LIBS)
print(hdr); print('-'*len(hdr))
for arch,name,ms,cuda_mb in rows:
    mb = cuda_mb or (mem or {}).get(arch, {}).get(name, {})
    others = [ms[l] for l in LIBS[1:] if l in ms]
    ratio = f"{min(others)/ms['ours']:.2f}x" if others else '-'
    lab = name + (f" ({a.slow_batch}x{a.slow_size}px)" if name in ('scorecam', 'ablationcam') else '')
    print(f"{arch:16s} {lab:21s} " + ' '.join(f"{ms[l]:11.0f}" if l in ms else f"{'-':>11s}" for l in LIBS) + f" {ratio:>15s} "
          + ' '.join(f"{mb[l]:10.0f}" if l in mb else f"{'-':>10s}" for l in LIBS), flush=True)
