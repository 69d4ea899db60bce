"""What SnapshotCallback costs: fit time with and without it for every = 1, 10, 100, and bytes written per step.

resnet18 (pretrained=False) on SynthSigns at 64 px. Fits of the configurations are interleaved (one fit of each per
repeat, in a rotating order), so a slow spell of the machine hits all of them; the table gives the fastest fit of each
configuration (interference from other work only ever adds time) and its ratio to the fastest fit without the callback.
Target: every=100 costs <= 2% of fit time.

On a shared machine wall-time ratios of a few percent are within the noise, so the table also gives the CPU time of
the whole process (all threads: what the callback adds in work, whatever else the machine runs), the CPU time the
training thread spent inside the callback and the writer's busy (wall) time, per saved step, and from those a
projection of the overhead at `every` = N: (callback CPU + writer time per saved step) / (N x time per batch without
the callback). The projection counts the writer's time in full, though it runs beside training (`background=True`)."""
import time, tempfile, argparse, shutil, json, statistics
from pathlib import Path
from fastai.vision.all import *
from fastai_saliency.data import synth_signs, synth_signs_dls
from fastai_saliency.snapshot import SnapshotCallback
from fastai_saliency.store import SnapshotWriter

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--reps', type=int, default=2, help='timed fits per configuration')
p.add_argument('--batches', type=int, default=100, help='training batches per fit (one epoch)')
p.add_argument('--bs', type=int, default=8)
p.add_argument('--size', type=int, default=64)
p.add_argument('--everys', type=str, default='1,10,100')
p.add_argument('--dtype', choices=['float32', 'float16'], default='float32')
p.add_argument('--out', type=str, default=None, help='folder for the snapshots (default: a temporary folder, removed after)')
a = p.parse_args()

tmp = Path(tempfile.mkdtemp())
out = Path(a.out) if a.out else tmp/'snaps'
n_classes = 10
n_per_class = -(-a.batches*a.bs // n_classes) + 2                 # + 2 per class for a small validation set
path = synth_signs(tmp/'signs', n_per_class=n_per_class, size=a.size, seed=0, n_classes=n_classes, valid_pct=2/n_per_class)
dls = synth_signs_dls(path, bs=a.bs, num_workers=0)
dev = dls.device
dtype = None if a.dtype == 'float32' else torch.float16
everys = [int(e) for e in a.everys.split(',')]
configs = [None] + everys

class TimedSnapshot(SnapshotCallback):
    "SnapshotCallback that adds up the time the training thread spends in it"
    spent = 0.
    @property
    def name(self): return 'snapshot'
    def __call__(self, event_name):
        t0 = time.thread_time()
        try: return super().__call__(event_name)
        finally: self.spent += time.thread_time() - t0
    def _keep(self, name, t):                        # the hooks' copies run inside forward/backward, not in events
        t0 = time.thread_time()
        try: return super()._keep(name, t)
        finally: self.spent += time.thread_time() - t0

writer_busy = [0.]
_write = SnapshotWriter._write
def timed_write(self, *args):
    t0 = time.perf_counter()
    try: return _write(self, *args)
    finally: writer_busy[0] += time.perf_counter() - t0
SnapshotWriter._write = timed_write

def fit_once(every):
    "Seconds for one epoch of fit, snapshot bytes and steps written, seconds in the callback and in the writer"
    set_seed(0)
    cbs = [] if every is None else [TimedSnapshot(out/f'every{every}', every=every, valid_every=0, dtype=dtype)]
    writer_busy[0] = 0.
    learn = vision_learner(dls, resnet18, pretrained=False, cbs=cbs)
    if dev.type == 'cuda': torch.cuda.synchronize()
    t0,c0 = time.perf_counter(),time.process_time()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    if dev.type == 'cuda': torch.cuda.synchronize()
    secs,cpu = time.perf_counter() - t0,time.process_time() - c0
    nbytes,nsteps = 0,0
    if every is not None:
        run = learn.snapshot.run_path
        for line in (run/'index.jsonl').read_text().splitlines():
            r = json.loads(line); nbytes += r.get('bytes', 0); nsteps += 1
        shutil.rmtree(run)                                       # keep the disk use of the benchmark small
    return secs, cpu, nbytes, nsteps, (cbs[0].spent if cbs else 0.), writer_busy[0]

fit_once(None); fit_once(everys[-1])                             # warm-up: allocator, page cache, imports
times,cpus,inside,busy,bytes_ = [{c: [] for c in configs} for _ in range(4)] + [{}]
for rep in range(a.reps):
    k = rep % len(configs)
    for c in configs[k:] + configs[:k]:                          # rotate the order from repeat to repeat
        secs,cpu,nb,ns,spent,wb = fit_once(c)
        times[c].append(secs); cpus[c].append(cpu); inside[c].append(spent); busy[c].append(wb)
        if c is not None: bytes_[c] = (nb, ns)
        print(f"rep {rep} every={c}: {secs:.2f} s, CPU {cpu:.2f} s (in callback {spent:.3f} s CPU, writer {wb:.3f} s)", flush=True)

base,base_cpu = min(times[None]),min(cpus[None])
per_batch = base/len(dls.train)
print(f"\nresnet18 (pretrained=False), SynthSigns {a.size} px, bs {a.bs}, {len(dls.train)} training batches per fit, "
      f"{len(dls.valid)} validation batches (valid_every=0), {a.reps} interleaved repeats, dtype {a.dtype}, device {dev}, "
      f"torch threads {torch.get_num_threads()}\n")
print("| every | saved steps | fit wall (fastest, s) | wall ratio | process CPU ratio | callback CPU per step (ms) "
      "| writer per step (ms) | MB per step | projected overhead at every=N |")
print("|---|---|---|---|---|---|---|---|---|")
print(f"| no callback | 0 | {base:.2f} | 1.000 | 1.000 | - | - | - | - |")
for c in everys:
    t,cpu = min(times[c]),min(cpus[c]); sp,wb = (statistics.median(d[c]) for d in (inside, busy)); nb,ns = bytes_[c]
    step_cost = (sp + wb)/max(ns, 1)
    print(f"| {c} | {ns} | {t:.2f} | {t/base:.3f} | {cpu/base_cpu:.3f} | {1e3*sp/max(ns,1):.0f} | {1e3*wb/max(ns,1):.0f} "
          f"| {nb/max(ns,1)/1e6:.1f} | {100*step_cost/(c*per_batch):.1f}% |")
print(f"\nwithout the callback: {1e3*per_batch:.0f} ms per training batch (wall, validation included)")
print(f"\nall fit times (s): " + '; '.join(f"{'none' if c is None else c}: {', '.join(f'{t:.2f}' for t in times[c])}" for c in configs))
shutil.rmtree(tmp)
