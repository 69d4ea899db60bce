"""Maps from the snapshot store: their cost against the in-process methods, and the watcher's latency.

1. Cost. A resnet18 (torchvision, random weights) sees one batch of `--bs` images at each of `--sizes`; SnapshotCallback
   at its defaults (every conv and BatchNorm output, explained validation batch) stores the batch. Then, side by side
   (the methods take turns, `--repeats` times; medians), `fullgrad(model, x)` / `gradcam(model, x, layer)` on the model
   against `Trial.fullgrad(step)` / `Trial.gradcam(layer, step)` from the store (reading the tensors included; the
   files are in the page cache, as for a step just written). Target: store / in-process <= 0.5 for FullGrad. The
   store's maps are also checked equal to the in-process ones.
2. Latency. A training process (a subprocess, a small CNN, `--steps` epochs of one explained validation step each, a
   pause between epochs) writes a run while `replay.watch` follows it in this process; for each frame, the time from
   the step landing (its index line) to its frame being in the GIF. `--poll` is the watcher's polling interval.
"""
import argparse, os, statistics, subprocess, sys, tempfile, textwrap, time, warnings
from pathlib import Path
import torch
from torch import nn
from torchvision.models import resnet18
from fastai.basics import Learner, DataLoaders, set_seed
import fastai.callback.progress
from fastai_saliency.snapshot import SnapshotCallback
from fastai_saliency.methods import fullgrad, gradcam
from fastai_saliency.replay import watch
import fastai_saliency.replay

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--sizes', default='64,128,224')
p.add_argument('--bs', type=int, default=8)
p.add_argument('--repeats', type=int, default=5)
p.add_argument('--layer', default='layer4', help='Grad-CAM layer (saved by default: the model default Grad-CAM layer)')
p.add_argument('--threads', type=int, default=1, help='torch CPU threads (1: steady timings on a shared machine)')
p.add_argument('--steps', type=int, default=6, help='explained steps the writer of the latency run writes')
p.add_argument('--poll', type=float, default=0.2)
p.add_argument('--skip-latency', action='store_true')
a = p.parse_args()
torch.set_num_threads(a.threads)
warnings.simplefilter('ignore')
tmp = Path(tempfile.mkdtemp())

def med(ts): return statistics.median(ts)
def timed(f):
    t0 = time.perf_counter(); r = f(); return time.perf_counter() - t0, r

print(f"## Maps from the store against in-process maps (resnet18, batch {a.bs}, {a.threads} thread(s), median of {a.repeats})\n")
print("| size | in-process FullGrad | store FullGrad | ratio | in-process Grad-CAM | store Grad-CAM | ratio | step on disk | max abs diff |")
print("|---|---|---|---|---|---|---|---|---|")
for size in [int(s) for s in a.sizes.split(',')]:
    set_seed(0)
    x,y = torch.randn(2*a.bs, 3, size, size),torch.randint(0, 10, (2*a.bs,))
    dls = DataLoaders.from_dsets(list(zip(x[:a.bs], y[:a.bs])), list(zip(x[a.bs:], y[a.bs:])), bs=a.bs, device='cpu')
    learn = Learner(dls, resnet18(num_classes=10), loss_func=nn.CrossEntropyLoss(),
                    cbs=SnapshotCallback(tmp/f's{size}', every=0, include=None, fsync=False))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4)
    t = learn.snapshot.trial()
    step = t.explained_steps()[-1]
    xv,yv = t.tensors(step, 'valid', ['input', 'target']).values()
    model = learn.model.eval()
    fns = dict(fg=lambda: fullgrad(model, xv, target=yv), sfg=lambda: t.fullgrad(step),
               gc=lambda: gradcam(model, xv, a.layer, target=yv), sgc=lambda: t.gradcam(a.layer, step))
    times,res = {k: [] for k in fns},{}
    for r in range(a.repeats + 1):                     # the first round warms up, untimed
        for k,f in fns.items():
            dt,res[k] = timed(f)
            if r: times[k].append(dt)
    m = {k: med(v) for k,v in times.items()}
    diff = max((res['fg'] - res['sfg']).abs().max().item(), (res['gc'] - res['sgc']).abs().max().item())
    mb = sum((t.path/f).stat().st_size for f in t.step_info(step, 'valid')['files'])/1e6
    print(f"| {size} | {m['fg']*1e3:.0f} ms | {m['sfg']*1e3:.0f} ms | {m['sfg']/m['fg']:.2f} | {m['gc']*1e3:.0f} ms | "
          f"{m['sgc']*1e3:.0f} ms | {m['sgc']/m['gc']:.2f} | {mb:.0f} MB | {diff:.1e} |")

if not a.skip_latency:
    WRITER = textwrap.dedent('''
        import sys, time, torch
        from torch import nn
        from fastai.basics import Learner, DataLoaders, Callback, set_seed
        import fastai.callback.progress
        from fastai_saliency.snapshot import SnapshotCallback
        path,n_epoch = sys.argv[1],int(sys.argv[2])
        torch.set_num_threads(1); set_seed(0)
        x,y = torch.randn(48, 3, 64, 64),torch.randint(0, 4, (48,))
        dls = DataLoaders.from_dsets(list(zip(x[16:], y[16:])), list(zip(x[:16], y[:16])), bs=16, device='cpu')
        model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2),
                              nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
        class Pause(Callback):
            def after_epoch(self): time.sleep(1.0)
        learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=[SnapshotCallback(path, every=0, fsync=False), Pause()])
        with learn.no_logging(), learn.no_bar(): learn.fit(n_epoch)
    ''')
    (tmp/'writer.py').write_text(WRITER)
    print(f"\n## Watcher latency: from a step landing to its frame in the GIF (poll {a.poll} s, 64 px, 8 images per frame)\n")
    print("| method | frames | median | max |")
    print("|---|---|---|---|")
    for method,layer in (('fullgrad', None), ('gradcam', '3')):
        runs = tmp/f'live_{method}'
        proc = subprocess.Popen([sys.executable, '-W', 'ignore', str(tmp/'writer.py'), str(runs), str(a.steps)])
        res = watch(runs, tmp/f'{method}.gif', method=method, layer=layer, timeout=120, poll=a.poll, log=lambda s: None)
        proc.wait()
        lat = res['latencies']
        print(f"| {method} | {res['frames']} | {med(lat):.2f} s | {max(lat):.2f} s |")
