"""What scoring the frames costs: `SaliencyCallback(metrics=...)`, one frame with and without each metric.

resnet18 (pretrained=False, trained one epoch) on SynthSigns at 64 px (the demo's data), `n` probes. The time of one
frame is the callback's own `_frame` (median of repeats), for Grad-CAM at '0.5' without metrics, with the pointing game,
deletion, insertion, and all three, at `metric_steps` 16 and 32; and the share of a one-epoch fit without callbacks it
projects to (a frame per epoch). Deletion and insertion cost (metric_steps + 1) forward passes of the probes each."""
import time, tempfile, argparse, statistics
from pathlib import Path
from fastai.vision.all import *
from fastai_saliency.data import synth_signs, synth_signs_dls
from fastai_saliency.saliency import GradCAMCallback

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--n_per_class', type=int, default=200)
p.add_argument('--size', type=int, default=64)
p.add_argument('--n', type=int, default=8, help='probe images')
p.add_argument('--reps', type=int, default=5, help='timed frames per configuration')
a = p.parse_args()

tmp = Path(tempfile.mkdtemp())
dls = synth_signs_dls(synth_signs(tmp/'signs', n_per_class=a.n_per_class, size=a.size, seed=0), bs=64, num_workers=0)
learn = vision_learner(dls, resnet18, pretrained=False)
t0 = time.perf_counter()
with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
epoch = time.perf_counter() - t0
configs = {'no metrics': dict()}
for steps in (16, 32):
    configs.update({'pointing': dict(metrics='pointing'),
                    f'deletion, {steps} steps': dict(metrics='deletion', metric_steps=steps),
                    f'insertion, {steps} steps': dict(metrics='insertion', metric_steps=steps),
                    f'all three, {steps} steps': dict(metrics=('pointing', 'deletion', 'insertion'), metric_steps=steps)})
rows = []
for k,kw in configs.items():
    cb = GradCAMCallback('0.5', n=a.n, **kw)
    learn.add_cb(cb)
    cb._setup_probes(); cb.n_batches = len(dls.train)                         # what before_fit does
    ts = []
    for _ in range(a.reps):
        t0 = time.perf_counter(); cb._frame(); ts.append(time.perf_counter() - t0)
    learn.remove_cb(cb)
    rows.append((k, statistics.median(ts)))
print(f"resnet18, {a.size} px, {a.n} probes, Grad-CAM at '0.5'; one epoch of {len(dls.train)} batches of 64 (with "
      f"validation): {epoch:.1f} s; torch threads {torch.get_num_threads()}")
print("| frame | time (s) | added by the metrics (s) | share of an epoch |")
print("|---|---|---|---|")
for k,t in rows: print(f"| {k} | {t:.3f} | {t - rows[0][1]:.3f} | {t/epoch:.1%} |")
