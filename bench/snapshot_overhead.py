"""What SnapshotCallback costs: fit time with and without it for every = 1, 10, 100, and bytes written per step, on the
local disk and into an S3 server; the store's write rate against the disk's own sequential write rate.

resnet18 (pretrained=False) on SynthSigns at 64 px. Fits of the configurations are interleaved (one fit of each per
repeat, in a rotating order), so a slow spell of the machine hits all of them; the table gives the fastest fit of each
configuration (interference from other work only ever adds time) and its ratio to the fastest fit without the callback.
Target: every=100 costs <= 2% of fit time, on disk and on S3. The S3 server runs on this machine: on one of few cores,
give training one core fewer (`--threads`), or the server's work shows up as training time (OpenMP's threads spin at
every barrier while the server holds a core), which a remote bucket would not cost.

On a shared machine wall-time ratios of a few percent are within the noise (on these VMs fits of the same configuration
take from 15.6 to 25 s as the host's load comes and goes, CPU time with them), so the table also gives the CPU time of
the whole process (all threads: what the callback adds in work), the CPU time the training thread spent inside the
callback, and the writer's busy (wall) time and CPU time, per saved step; and from those a projection of the overhead
at `every` = N, a saved step's cost over N x the time of a batch without the callback, three times: the callback's
CPU alone (the writer runs beside training, `background=True`, on a core of its own where there is one); with the
writer's CPU added (what it costs where the writer takes its CPU from training, as on 2 busy cores); and with the
writer's wall time added (an upper bound: a training that waited for every write, network waits included).

`--paired` measures that cost in wall time where the machine's drift cannot hide it: one fit of `--batches` batches
per store with `every` = the last of `--everys`, timing every training batch; a saved step's cost is the time of the
`--window` batches from the one that saves it on, less that many times the median batch of the 20 before and the 20
after them; the same sum at positions halfway between saved steps (no save there) gives the noise floor.

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
p.add_argument('--window', type=int, default=6, help='--paired: batches after a saved step that its cost may fall on')
p.add_argument('--nice-server', action='store_true', help="run the S3 server at the lowest CPU priority: it stands in for a bucket "
               "on other machines, whose work is not this machine's; without it, on 2 cores, its CPU is taken from training")
p.add_argument('--no-s3', action='store_true', help="leave out the S3 server (it needs moto[server] and s3fs)")
p.add_argument('--rates-only', action='store_true', help='only the write rates: one fit at every=1 for a step to write, no table')
p.add_argument('--paired', action='store_true', help="only the cost of saved steps in wall time, measured inside one long fit "
               "per store (use with --batches 1000): see the note at the top")
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
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=(lambda: os.nice(19)) if a.nice_server else None)
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

writer_busy,writer_cpu = [0.],[0.]
_write = SnapshotWriter._write
def timed_write(self, *args):
    t0,c0 = time.perf_counter(),time.thread_time()
    try: return _write(self, *args)
    finally: writer_busy[0] += time.perf_counter() - t0; writer_cpu[0] += time.thread_time() - c0
SnapshotWriter._write = timed_write

def dest(cfg):
    t,e = cfg
    return str(out/f'every{e}') if t == 'disk' else f's3://bench/every{e}'

def remove_run(store:str, run:str):
    "Delete a fit's run from the disk or the bucket (keeps the benchmark's disk and server memory small)"
    if store == 'disk': shutil.rmtree(run)
    else: s3.rm(run[len('s3://'):], recursive=True)

def fit_once(cfg):
    "Seconds for one epoch of fit, snapshot bytes and steps written, seconds in the callback and in the writer"
    set_seed(0)
    cbs = [] if cfg is None else [TimedSnapshot(dest(cfg), every=cfg[1], valid_every=0, dtype=dtype, max_bytes=None)]
    writer_busy[0] = writer_cpu[0] = 0.
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
        remove_run(cfg[0], run)
    return secs, cpu, nbytes, nsteps, (cbs[0].spent if cbs else 0.), writer_busy[0], writer_cpu[0]

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

class BatchTimes(Callback):
    "The wall time between consecutive training batches' ends, and the `train_iter` of each"
    order = 100
    def before_fit(self): self.times,self.last = {},None
    def before_epoch(self): self.last = None
    def before_batch(self):
        if self.training and self.last is None: self.last = time.perf_counter()
    def after_batch(self):
        if not self.training: return
        t = time.perf_counter(); self.times[self.train_iter - 1] = t - self.last; self.last = t

def window_costs(d:dict, at:list, w:int) -> list:
    "For each batch index in `at`: the time of the `w` batches from it on, less `w` x the median of the 20 before and after"
    res = []
    for k in at:
        around = [d[j] for j in list(range(k - 20, k)) + list(range(k + w, k + w + 20)) if j in d]
        if all(j in d for j in range(k, k + w)) and len(around) >= 20:
            res.append(sum(d[j] for j in range(k, k + w)) - w*statistics.median(around))
    return res

def paired():
    every = everys[-1]
    print(f"Saved steps' cost in wall time inside one fit of {len(dls.train)} batches per store, every={every} (resnet18, "
          f"SynthSigns {a.size} px, bs {a.bs}, torch threads {torch.get_num_threads()}); window {a.window} batches"
          f"{'; the S3 server at nice 19' if a.nice_server else ''}:\n")
    print("| store | saved steps measured | cost per saved step (ms, mean; median) | noise floor at unsaved positions (ms, mean; median) "
          "| median batch (ms) | overhead at every=N (mean cost / N batches) |")
    print("|---|---|---|---|---|---|")
    for t in targets:
        set_seed(0)
        bt = BatchTimes()
        cb = SnapshotCallback(dest((t, every)), every=every, valid_every=0, dtype=dtype, max_bytes=None)
        learn = vision_learner(dls, resnet18, pretrained=False, cbs=[cb, bt])
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
        d = bt.times
        saves = [k for k in range(every, len(dls.train), every)]          # step 0 falls on the first, slow, batch
        costs,floor = window_costs(d, saves, a.window),window_costs(d, [k + every//2 for k in saves], a.window)
        med = statistics.median(d.values())
        print(f"| {t} | {len(costs)} | {1e3*statistics.mean(costs):.0f}; {1e3*statistics.median(costs):.0f} "
              f"| {1e3*statistics.mean(floor):.0f}; {1e3*statistics.median(floor):.0f} | {1e3*med:.0f} "
              f"| {100*statistics.mean(costs)/(every*med):.2f}% |", flush=True)
        remove_run(t, cb.run_path)

try:
    if a.paired: paired(); a.reps = 0
    elif a.rates_only: fit_once(configs[0])                        # a step to write: the tensors of its first saved step
    else:
        fit_once(None); fit_once(('disk', everys[-1]))           # warm-up: allocator, page cache, imports
        if server is not None: fit_once(('s3', everys[-1]))
    times,cpus,inside,busy,wcpu,bytes_ = [{c: [] for c in configs} for _ in range(5)] + [{}]
    for rep in range(a.reps):
        k = rep % len(configs)
        for c in configs[k:] + configs[:k]:                      # rotate the order from repeat to repeat
            secs,cpu,nb,ns,spent,wb,wc = fit_once(c)
            times[c].append(secs); cpus[c].append(cpu); inside[c].append(spent); busy[c].append(wb); wcpu[c].append(wc)
            if c is not None: bytes_[c] = (nb, ns)
            print(f"rep {rep} {'none' if c is None else f'{c[0]} every={c[1]}'}: {secs:.2f} s, CPU {cpu:.2f} s "
                  f"(in callback {spent:.3f} s CPU, writer {wb:.3f} s, of it CPU {wc:.3f} s)", flush=True)
    if not a.paired: alone = {t: rates_alone(t) for t in targets}
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

if a.paired: shutil.rmtree(tmp); sys.exit()
if a.rates_only: print_rates(); shutil.rmtree(tmp); sys.exit()
base,base_cpu = min(times[None]),min(cpus[None])
per_batch = base/len(dls.train)
print(f"\nresnet18 (pretrained=False), SynthSigns {a.size} px, bs {a.bs}, {len(dls.train)} training batches per fit, "
      f"{len(dls.valid)} validation batches (valid_every=0), {a.reps} interleaved repeats, dtype {a.dtype}, device {dev}, "
      f"torch threads {torch.get_num_threads()}\n")
print("| store | every | saved steps | fit wall (fastest, s) | wall ratio | process CPU ratio | callback CPU per step (ms) "
      "| writer per step (ms) | of it CPU (ms) | MB per step | store write rate (MB/s) "
      "| projected overhead at every=N: callback; + writer's CPU; + writer in full |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
print(f"| - | no callback | 0 | {base:.2f} | 1.000 | 1.000 | - | - | - | - | - | - |")
for c in configs[1:]:
    t,cpu = min(times[c]),min(cpus[c]); sp,wb,wc = (statistics.median(d[c]) for d in (inside, busy, wcpu)); nb,ns = bytes_[c]
    per = lambda secs: 100*secs/max(ns, 1)/(c[1]*per_batch)       # seconds per fit -> % of the N batches between saved steps
    print(f"| {c[0]} | {c[1]} | {ns} | {t:.2f} | {t/base:.3f} | {cpu/base_cpu:.3f} | {1e3*sp/max(ns,1):.0f} | {1e3*wb/max(ns,1):.0f} "
          f"| {1e3*wc/max(ns,1):.0f} | {nb/max(ns,1)/1e6:.1f} | {nb/max(wb, 1e-9)/1e6:.0f} | {per(sp):.2f}%; {per(sp + wc):.2f}%; {per(sp + wb):.1f}% |")
print(f"\nwithout the callback: {1e3*per_batch:.0f} ms per training batch (wall, validation included)")
print(); print_rates()
for t in targets:
    c = (t, everys[0]); nb,_ = bytes_[c]; r = nb/max(statistics.median(busy[c]), 1e-9)/1e6
    print(f"- {t}, during the fits at every={everys[0]} (the writer's thread beside training): {r:.0f} MB/s")
print(f"\nall fit times (s): " + '; '.join(f"{'none' if c is None else f'{c[0]} {c[1]}'}: {', '.join(f'{t:.2f}' for t in times[c])}" for c in configs))
shutil.rmtree(tmp)
