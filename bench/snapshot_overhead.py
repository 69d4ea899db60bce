"""What SnapshotCallback costs: fit time with and without it for every = 1, 10, 100, and bytes written per step, on the
local disk and into an S3 server; the store's write rate against the disk's own sequential write rate.

resnet18 (pretrained=False) on SynthSigns at 64 px. Fits of the configurations are interleaved (one fit of each per
repeat, in a rotating order), so a slow spell of the machine hits all of them; the table gives the fastest fit of each
configuration (interference from other work only ever adds time) and its ratio to the fastest fit without the callback.
Target: every=100 costs <= 2% of fit time, on disk and on S3. The S3 server runs on this machine: on one of few cores,
give training one core fewer (`--threads`), or the server's work shows up as training time (OpenMP's threads spin at
every barrier while the server holds a core), which a remote bucket would not cost.

On a shared machine wall-time ratios of a few percent are within the noise, so the table also gives the CPU time of
the whole process (all threads: what the callback adds in work, whatever else the machine runs), the CPU time the
training thread spent inside the callback and the writer's busy (wall) time, per saved step, and from those a
projection of the overhead at `every` = N, a saved step's cost over N x the time of a batch without the callback,
twice: the callback's CPU alone (the writer runs beside training, `background=True`, on a core of its own where there
is one), and with the writer's time added (an upper bound: a training that waited for every write).

Write rates: the store's is the bytes of a step over the time `write_step` takes for it (serialising, writing, fsync,
index), written alone (no training beside it), in blocks alternating with files of the same size written with plain
`open().write` and `fsync` in the same folder (the disk's sequential rate) or objects of that size put with s3fs (the
S3 server's). Each plain file is a new one, as each step is. How fast a write goes depends on what the one before left
in the page cache: the store drops a step file's pages once it is fsynced (`posix_fadvise(DONTNEED)`), so the next
write reuses them, where a plain file that stays cached makes the next one look for fresh pages (on this VM: 5 times
slower at times); so the disk's rate is also given for plain files dropped from the cache in the same way. The
table's column is the same rate during the fits, where the writer's thread shares the CPU with training. The S3 server
is moto's (`moto[server]`, the one the tests use), started here as a process of its own on a free port: it keeps its
objects in memory and temporary files, so its rate is that of the server and the HTTP path, not of a network."""
import time, tempfile, argparse, shutil, json, statistics, os, sys, socket, subprocess
from pathlib import Path
from fastai.vision.all import *
from fastai_saliency.data import synth_signs, synth_signs_dls
from fastai_saliency.snapshot import SnapshotCallback
from fastai_saliency.store import SnapshotWriter, Trial, Location

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--reps', type=int, default=2, help='timed fits per configuration')
p.add_argument('--batches', type=int, default=100, help='training batches per fit (one epoch)')
p.add_argument('--bs', type=int, default=16)
p.add_argument('--size', type=int, default=64)
p.add_argument('--everys', type=str, default='1,10,100')
p.add_argument('--dtype', choices=['float32', 'float16'], default='float32')
p.add_argument('--threads', type=int, default=None, help="torch's threads (default: torch's own choice); with the S3 server on "
               "a machine of few cores, leave it one: OpenMP's threads spin while another process holds a core")
p.add_argument('--no-s3', action='store_true', help="leave out the S3 server (it needs moto[server] and s3fs)")
p.add_argument('--rates-only', action='store_true', help='only the write rates: one fit at every=1 for a step to write, no table')
p.add_argument('--out', type=str, default=None, help='folder for the snapshots (default: a temporary folder, removed after)')
a = p.parse_args()
if a.threads: torch.set_num_threads(a.threads)

tmp = Path(tempfile.mkdtemp())
out = Path(a.out) if a.out else tmp/'snaps'
out.mkdir(parents=True, exist_ok=True)
n_classes = 10
n_per_class = -(-a.batches*a.bs // n_classes) + 2                 # + 2 per class for a small validation set
path = synth_signs(tmp/'signs', n_per_class=n_per_class, size=a.size, seed=0, n_classes=n_classes, valid_pct=2/n_per_class)
dls = synth_signs_dls(path, bs=a.bs, num_workers=0)
dev = dls.device
dtype = None if a.dtype == 'float32' else torch.float16
everys = [int(e) for e in a.everys.split(',')]

server = None
if not a.no_s3:                                                   # moto's S3 server, a process of its own
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f'http://127.0.0.1:{port}', AWS_ACCESS_KEY_ID='bench', AWS_SECRET_ACCESS_KEY='bench',
                      AWS_DEFAULT_REGION='us-east-1')
    for _ in range(300):
        try: socket.create_connection(('127.0.0.1', port), timeout=1).close(); break
        except OSError: time.sleep(0.1)
    s3 = Location.of('s3://bench').fs
    s3.mkdir('bench')
targets = ['disk'] + ([] if server is None else ['s3'])
configs = [None] + [(t, e) for t in targets for e in everys]
if a.rates_only: configs,a.reps = [('disk', everys[0])],0

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

def dest(cfg):
    t,e = cfg
    return str(out/f'every{e}') if t == 'disk' else f's3://bench/every{e}'

def fit_once(cfg):
    "Seconds for one epoch of fit, snapshot bytes and steps written, seconds in the callback and in the writer"
    set_seed(0)
    cbs = [] if cfg is None else [TimedSnapshot(dest(cfg), every=cfg[1], valid_every=0, dtype=dtype, max_bytes=None)]
    writer_busy[0] = 0.
    learn = vision_learner(dls, resnet18, pretrained=False, cbs=cbs)
    if dev.type == 'cuda': torch.cuda.synchronize()
    t0,c0 = time.perf_counter(),time.process_time()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    if dev.type == 'cuda': torch.cuda.synchronize()
    secs,cpu = time.perf_counter() - t0,time.process_time() - c0
    nbytes,nsteps = 0,0
    if cfg is not None:
        run = learn.snapshot.run_path
        t = Trial(run)
        for s in t.steps('train'): nbytes += t.step_info(s, 'train')['bytes']; nsteps += 1
        if not sample and nsteps: sample.update(t.tensors(t.steps('train')[0]))
        if cfg[0] == 'disk': shutil.rmtree(run)                  # keep the disk use of the benchmark small
        else: s3.rm(run[len('s3://'):], recursive=True)
    return secs, cpu, nbytes, nsteps, (cbs[0].spent if cbs else 0.), writer_busy[0]

sample = {}                                                       # the tensors of one step, for `rates_alone`

def rates_alone(target:str, n:int=4, rounds:int=2) -> tuple:
    "MB/s (median) of the store's `write_step` (synchronous, fsync on) of one step, and of plain files of the same size, in alternating blocks of `n`"
    w = SnapshotWriter(str(out/'alone') if target == 'disk' else 's3://bench/alone', fsync=True)
    nb = sum(v.numel()*v.element_size() for v in sample.values())
    data,times,k = os.urandom(nb),([], [], []),0
    def plain(name, drop=False):
        t0 = time.perf_counter()
        if target == 'disk':
            with open(out/name, 'wb') as f:
                f.write(data); f.flush(); os.fsync(f.fileno())
                if drop: os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        else: s3.pipe_file(f'bench/{name}', data)
        return time.perf_counter() - t0
    for r in range(rounds):                              # blocks, not single files: what one write leaves in the page cache
        for i in range(n):                               # changes the rate of the next, whoever writes it
            t0 = time.perf_counter(); w.write_step('train', k, sample); times[0].append(time.perf_counter() - t0); k += 1
        for i in range(n): times[1].append(plain(f'raw{r}-{i}.bin'))
        if target == 'disk':
            for i in range(n): times[2].append(plain(f'rawd{r}-{i}.bin', drop=True))
    w.close()
    if target == 'disk':
        shutil.rmtree(out/'alone')
        for f in out.glob('raw*.bin'): f.unlink()
    else: s3.rm('bench/alone', recursive=True); s3.rm([f'bench/raw{r}-{i}.bin' for r in range(rounds) for i in range(n)])
    return (nb,) + tuple(nb/statistics.median(t)/1e6 if t else float('nan') for t in times)

try:
    if a.rates_only: fit_once(configs[0])                        # a step to write: the tensors of its first saved step
    else:
        fit_once(None); fit_once(('disk', everys[-1]))           # warm-up: allocator, page cache, imports
        if server is not None: fit_once(('s3', everys[-1]))
    times,cpus,inside,busy,bytes_ = [{c: [] for c in configs} for _ in range(4)] + [{}]
    for rep in range(a.reps):
        k = rep % len(configs)
        for c in configs[k:] + configs[:k]:                      # rotate the order from repeat to repeat
            secs,cpu,nb,ns,spent,wb = fit_once(c)
            times[c].append(secs); cpus[c].append(cpu); inside[c].append(spent); busy[c].append(wb)
            if c is not None: bytes_[c] = (nb, ns)
            print(f"rep {rep} {'none' if c is None else f'{c[0]} every={c[1]}'}: {secs:.2f} s, CPU {cpu:.2f} s "
                  f"(in callback {spent:.3f} s CPU, writer {wb:.3f} s)", flush=True)
    alone = {t: rates_alone(t) for t in targets}
finally:
    if server is not None: server.terminate(); server.wait()

def print_rates():
    print(f"Write rates, one step of {alone['disk'][0]/1e6:.1f} MB written alone (write_step(wait=True), fsync on), in blocks of "
          "four alternating with four plain files of the same size, new files each (open().write + fsync, or one put with s3fs); "
          "medians of eight:")
    for t,(nb,st,plain,dropped) in alone.items():
        print(f"- {t}: the store {st:.0f} MB/s; plain files {plain:.0f} MB/s ({st/plain:.2f} of it)"
              + (f"; plain files dropped from the page cache once written, as the store does, {dropped:.0f} MB/s "
                 f"({st/dropped:.2f} of it)" if t == 'disk' else ''))

if a.rates_only: print_rates(); shutil.rmtree(tmp); sys.exit()
base,base_cpu = min(times[None]),min(cpus[None])
per_batch = base/len(dls.train)
print(f"\nresnet18 (pretrained=False), SynthSigns {a.size} px, bs {a.bs}, {len(dls.train)} training batches per fit, "
      f"{len(dls.valid)} validation batches (valid_every=0), {a.reps} interleaved repeats, dtype {a.dtype}, device {dev}, "
      f"torch threads {torch.get_num_threads()}\n")
print("| store | every | saved steps | fit wall (fastest, s) | wall ratio | process CPU ratio | callback CPU per step (ms) "
      "| writer per step (ms) | MB per step | store write rate (MB/s) | projected overhead at every=N: callback; + writer in full |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
print(f"| - | no callback | 0 | {base:.2f} | 1.000 | 1.000 | - | - | - | - | - |")
for c in configs[1:]:
    t,cpu = min(times[c]),min(cpus[c]); sp,wb = (statistics.median(d[c]) for d in (inside, busy)); nb,ns = bytes_[c]
    step_cost = (sp + wb)/max(ns, 1)
    print(f"| {c[0]} | {c[1]} | {ns} | {t:.2f} | {t/base:.3f} | {cpu/base_cpu:.3f} | {1e3*sp/max(ns,1):.0f} | {1e3*wb/max(ns,1):.0f} "
          f"| {nb/max(ns,1)/1e6:.1f} | {nb/max(wb, 1e-9)/1e6:.0f} | {100*sp/max(ns,1)/(c[1]*per_batch):.2f}%; {100*step_cost/(c[1]*per_batch):.1f}% |")
print(f"\nwithout the callback: {1e3*per_batch:.0f} ms per training batch (wall, validation included)")
print(); print_rates()
for t in targets:
    c = (t, everys[0]); nb,_ = bytes_[c]; r = nb/max(statistics.median(busy[c]), 1e-9)/1e6
    print(f"- {t}, during the fits at every={everys[0]} (the writer's thread beside training): {r:.0f} MB/s")
print(f"\nall fit times (s): " + '; '.join(f"{'none' if c is None else f'{c[0]} {c[1]}'}: {', '.join(f'{t:.2f}' for t in times[c])}" for c in configs))
shutil.rmtree(tmp)
