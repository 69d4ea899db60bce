"""What FullGradCallback / GradCAMCallback cost: epoch time with and without them, and the time of one frame.

resnet18 (pretrained=False) on SynthSigns at 64 px (the demo's data: 1,600 training images, batches of 64), 8 probes, a
frame per epoch. Fits of the configurations are interleaved (one fit of each per repeat, in a rotating order), so a
slow spell of the machine hits all of them; the table gives the fastest fit of each configuration and its ratio to the
fastest fit without a callback. A few percent is within the wall-time noise of a shared machine, so the table also gives
the time of one frame measured on its own (median of repeats, the callback's own `_frame`) and the projected share of
an epoch: frame time / epoch time without the callback. Target: <= 5% with n=8 every epoch."""
import time, tempfile, argparse, statistics
from pathlib import Path
from fastai.vision.all import *
from fastai_saliency.data import synth_signs, synth_signs_dls
from fastai_saliency.saliency import FullGradCallback, GradCAMCallback

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--reps', type=int, default=2, help='timed one-epoch fits per configuration')
p.add_argument('--n_per_class', type=int, default=200)
p.add_argument('--size', type=int, default=64)
p.add_argument('--bs', type=int, default=64)
p.add_argument('--n', type=int, default=8, help='probe images')
a = p.parse_args()

tmp = Path(tempfile.mkdtemp())
path = synth_signs(tmp/'signs', n_per_class=a.n_per_class, size=a.size, seed=0)
dls = synth_signs_dls(path, bs=a.bs, num_workers=0)
configs = {'none': lambda: [], 'FullGradCallback': lambda: [FullGradCallback(n=a.n)],
           'GradCAMCallback': lambda: [GradCAMCallback('0.6', n=a.n)]}
learn = vision_learner(dls, resnet18, pretrained=False)
with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)            # warm-up
times = {k: [] for k in configs}
for r in range(a.reps):
    keys = list(configs)[r % len(configs):] + list(configs)[:r % len(configs)]
    for k in keys:
        cbs = configs[k]()
        t0 = time.perf_counter()
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cbs)   # 1 epoch: a frame before and one after
        times[k].append(time.perf_counter() - t0)
        if cbs: test_frames = len(cbs[0].frames); assert test_frames == 2, test_frames
frame_t = {}
for k in list(configs)[1:]:
    cb = configs[k]()[0]
    learn.add_cb(cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)            # sets the probes up
    ts = []
    for _ in range(7):
        t0 = time.perf_counter(); cb._frame(); ts.append(time.perf_counter() - t0)
    frame_t[k] = statistics.median(ts)
    learn.remove_cb(cb)
base = min(times['none'])
print(f"resnet18, {a.size} px, {len(dls.train)} training batches of {a.bs} per epoch, {a.n} probes, a frame per epoch; "
      f"torch threads {torch.get_num_threads()}, device {dls.device}")
print("| callback | fastest 1-epoch fit (s) | ratio to none (wall, 2 frames) | one frame (s) | frame / epoch (projected) | target |")
print("|---|---|---|---|---|---|")
print(f"| none | {base:.2f} | 1.000 | - | - | |")
for k in list(configs)[1:]:
    print(f"| {k} | {min(times[k]):.2f} | {min(times[k])/base:.3f} | {frame_t[k]:.3f} | {frame_t[k]/base:.2%} | <= 5% |")
