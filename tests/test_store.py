"The snapshot store under faults: a callback that raises, a cancelled fit, a killed writer, disk errors, lr_find, same losses."
import json, os, pickle, signal, subprocess, sys, time, errno, textwrap
import pytest, torch
from pathlib import Path
from torch import nn
from fastai.basics import Learner, DataLoaders, Callback, CancelFitException, set_seed
import fastai.callback.progress, fastai.callback.schedule   # Learner.no_bar, Learner.lr_find
from fastai_saliency.snapshot import SnapshotCallback
from fastai_saliency.hooks import n_hooks
from fastai_saliency.store import Trial, SnapshotWriter, list_runs
import fastai_saliency.store as store

def tiny_dls(n=48, bs=8, size=12, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x,y = torch.randn(n, 3, size, size, generator=g),torch.randint(0, c, (n,), generator=g)
    return DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:16], y[:16])), bs=bs, device='cpu')

def tiny_model(c=4):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, c))

def tiny_learn(path=None, cbs=(), seed=0, **kwargs):
    set_seed(seed)
    dls = tiny_dls()
    snap = [SnapshotCallback(path, **kwargs)] if path is not None else []
    learn = Learner(dls, tiny_model(), loss_func=nn.CrossEntropyLoss(), cbs=snap + list(cbs))
    return learn

def fit_quiet(learn, n_epoch=1, lr=1e-2):
    with learn.no_logging(), learn.no_bar(): learn.fit(n_epoch, lr)

def check_readable(trial):
    "Every listed step of every mode reads back whole: each tensor with the shape and dtype of its index line"
    n = 0
    for mode in trial.modes():
        for step in trial.steps(mode):
            info = trial.step_info(step, mode)
            for name,shape,dtype in zip(info['names'], info['shapes'], info['dtypes']):
                v = trial.tensor(name).value(step, mode)
                assert list(v.shape) == shape and str(v.dtype) == f'torch.{dtype}', (mode, step, name)
                n += 1
    return n

class Boom(Callback):
    "Raise `exc` at `event` of training batch `at`"
    order = 0
    def __init__(self, event, at, exc): self.event,self.at,self.exc = event,at,exc
    def __getattr__(self, k):
        if k == getattr(self, 'event', None):
            def f():
                if self.learn.training and self.learn.train_iter == self.at: raise self.exc
            return f
        return super().__getattr__(k)

@pytest.mark.parametrize('event,background', [(e, False) for e in ('before_batch', 'after_pred', 'after_loss', 'after_backward',
                                                  'after_step', 'after_batch')] + [('after_pred', True), ('after_backward', True)])
def test_fit_that_raises_in_a_callback(tmp_path, event, background):
    learn = tiny_learn(tmp_path, cbs=[Boom(event, 4, RuntimeError('boom'))], every=1, background=background, fsync=False)
    with pytest.raises(RuntimeError, match='boom'): fit_quiet(learn, 2)
    assert n_hooks(learn.model) == 0
    learn.snapshot.writer.flush()                   # a background write of the last step may still be going on
    trial = Trial(tmp_path)
    assert not trial.loaded_all_steps and trial.end is None
    # batch 4 raises before our after_batch (order 90) writes it; in after_batch, train_iter already counts the batch
    want = [0, 1, 2] if event == 'after_batch' else [0, 1, 2, 3]
    assert trial.steps('train') == want
    assert check_readable(trial) > 0
    if event != 'after_loss': return
    cb = pickle.loads(pickle.dumps(learn.snapshot))  # `learn.export()` pickles callbacks; the open writer is left out
    assert cb.writer is None and cb.every == 1
    # the next fit on the same learner is a fresh, complete run
    learn.cbs = learn.cbs.filter(lambda cb: not isinstance(cb, Boom))
    fit_quiet(learn, 1)
    assert [p.name for p in list_runs(tmp_path)] == ['run-001', 'run-002']
    assert Trial(tmp_path).loaded_all_steps and n_hooks(learn.model) == 0

class BombModel(nn.Module):
    "A model whose forward raises on call `at`"
    def __init__(self, at): super().__init__(); self.m,self.n,self.at = tiny_model(),0,at
    def forward(self, x):
        self.n += 1
        h = self.m[:4](x)
        if self.n == self.at: raise RuntimeError('forward failed')
        return self.m[4:](h)

def test_forward_that_raises_leaves_no_hooks(tmp_path):
    set_seed(0)
    model = BombModel(4)     # forward 2 is the callback's own, explaining one image to size a validation step
    learn = Learner(tiny_dls(), model, loss_func=nn.CrossEntropyLoss(), cbs=SnapshotCallback(tmp_path, every=1))
    with pytest.raises(RuntimeError, match='forward failed'): fit_quiet(learn)
    assert n_hooks(model) == 0                      # hooks were on when the forward raised
    learn.snapshot.writer.flush()
    assert Trial(tmp_path).steps('train') == [0, 1]

class CancelAt(Callback):
    "Cancel the fit after training batch `at`-1, once SnapshotCallback (order 90) has written it"
    order = 95
    def __init__(self, at): self.at = at
    def after_batch(self):
        if self.learn.train_iter == self.at: raise CancelFitException()

def test_cancelled_fit(tmp_path):
    learn = tiny_learn(tmp_path, cbs=[CancelAt(5)], every=2)
    fit_quiet(learn, 3)                             # fastai swallows CancelFitException and calls after_fit
    assert n_hooks(learn.model) == 0
    trial = Trial(tmp_path)
    assert not (trial.path/'end.json').exists() and not trial.loaded_all_steps
    assert trial.steps('train') == [0, 2, 4]
    assert check_readable(trial) > 0

def test_normal_run_and_same_losses(tmp_path):
    "The callback changes nothing: same losses and weights, for a fixed seed, with and without it (every batch saved)"
    res = []
    for path in (None, tmp_path):
        learn = tiny_learn(path, every=1, valid_every=1)
        fit_quiet(learn, 2)
        res.append((learn.recorder.losses, [v for v in learn.recorder.values], [p.detach().clone() for p in learn.model.parameters()],
                    [b.clone() for b in learn.model.buffers()]))
        assert n_hooks(learn.model) == 0
    (l0,v0,p0,b0),(l1,v1,p1,b1) = res
    assert [float(a) for a in l0] == [float(a) for a in l1] and v0 == v1
    assert all(torch.equal(a, b) for a,b in zip(p0, p1)) and all(torch.equal(a, b) for a,b in zip(b0, b1))
    trial = Trial(tmp_path)
    assert trial.loaded_all_steps
    assert trial.steps('train') == list(range(12)) and trial.steps('valid') == [0, 1, 2, 3]
    assert check_readable(trial) > 0
    # the saved training loss of each step is the loss the recorder saw (its raw value, before smoothing)
    assert trial.tensor('loss').value(0).item() == pytest.approx(float(l0[0]), rel=1e-6)

def test_lr_find_writes_nothing(tmp_path):
    learn = tiny_learn(tmp_path/'snaps', every=1)
    with learn.no_logging(): learn.lr_find(num_it=5, show_plot=False)
    assert not (tmp_path/'snaps').exists() and n_hooks(learn.model) == 0

class FailingFsync:
    "Stands for `os.fsync` and fails from call `at` on, as a dying disk would"
    def __init__(self, at): self.n,self.at,self.real = 0,at,os.fsync
    def __call__(self, fd):
        self.n += 1
        if self.n >= self.at: raise OSError(errno.EIO, 'Input/output error')
        return self.real(fd)

@pytest.mark.parametrize('background', [False, True])
def test_disk_errors_surface(tmp_path, monkeypatch, background):
    learn = tiny_learn(tmp_path, every=1, background=background)
    monkeypatch.setattr(os, 'fsync', FailingFsync(12))
    with pytest.raises(OSError, match='Input/output error'): fit_quiet(learn, 2)
    monkeypatch.undo()
    assert n_hooks(learn.model) == 0
    trial = Trial(tmp_path)
    assert not trial.loaded_all_steps and len(trial.steps('train')) < 12
    check_readable(trial)

def test_full_disk_becomes_oserror(tmp_path, monkeypatch):
    "A full disk while a step file is written (the store writes it with one os.writev) stops the fit with the OS's error"
    calls,real = [],os.writev
    def full(fd, bufs):                              # run.json goes in; the first step file finds the disk full
        calls.append(len(bufs))
        if len(calls) > 1: raise OSError(errno.ENOSPC, 'No space left on device')
        return real(fd, bufs)
    monkeypatch.setattr(os, 'writev', full)
    learn = tiny_learn(tmp_path, every=1, background=False)
    with pytest.raises(OSError, match='No space left on device'): fit_quiet(learn)
    monkeypatch.undo()
    assert n_hooks(learn.model) == 0 and Trial(tmp_path).steps() == []

def test_path_that_is_a_file(tmp_path):
    (tmp_path/'f').write_text('x')
    learn = tiny_learn(tmp_path/'f', every=1)
    with pytest.raises(NotADirectoryError, match='is a file'): fit_quiet(learn)
    assert n_hooks(learn.model) == 0

WRITER = textwrap.dedent('''
    import sys, time, torch
    from torch import nn
    from fastai.basics import Learner, DataLoaders, Callback, set_seed
    import fastai.callback.progress
    from fastai_saliency.snapshot import SnapshotCallback
    path,background = sys.argv[1],sys.argv[2] == '1'
    set_seed(0)
    x,y = torch.randn(64, 3, 12, 12),torch.randint(0, 4, (64,))
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:16], y[:16])), bs=8, device='cpu')
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    class Slow(Callback):
        def after_batch(self): time.sleep(0.01)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=[SnapshotCallback(path, every=1, valid_every=1, background=background), Slow()])
    with learn.no_logging(), learn.no_bar(): learn.fit(100_000)
''')

@pytest.mark.parametrize('background', [False, True])
def test_killed_writer(tmp_path, background):
    script = tmp_path/'writer.py'; script.write_text(WRITER)
    snaps = tmp_path/'snaps'
    proc = subprocess.Popen([sys.executable, '-W', 'ignore', str(script), str(snaps), str(int(background))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list_runs(snaps):                 # the run folder appears once the fit begins
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, 'the writer never started a run'
            time.sleep(0.05)
        trial = Trial(snaps)                        # one reader, polling while the writer runs
        seen = []
        for _ in range(3):                          # each wait asks for 6 steps more than the reader has seen
            target = (seen[-1] if seen else 0) + 6
            trial.wait_for_steps(list(range(target)), mode='train', timeout=120)
            seen.append(len(trial.steps('train')))
            assert seen[-1] >= target               # the same reader sees the steps grow, not a snapshot of the first poll
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None: proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    trial = Trial(snaps)
    assert not trial.loaded_all_steps and trial.end is None
    assert check_readable(trial) > 0                # every listed step reads back whole
    index = [json.loads(l) for l in (trial.path/'index.jsonl').read_bytes().split(b'\n') if l.endswith(b'}')]
    listed = {r['file'] for r in index if r['file']}
    for mode in trial.modes():                      # steps are written in order: no gap before the last listed step
        steps = trial.steps(mode)
        assert steps == list(range(len(steps))), (mode, steps)
    on_disk = {str(p.relative_to(trial.path)) for p in trial.path.rglob('*.safetensors*')}
    unlisted = on_disk - listed
    assert len(unlisted) <= 1, unlisted             # only the step in flight is lost

def test_fit_into_an_object_store(tmp_path):
    "The same fit to a local folder and to `memory://` (fsspec's object store in this process): the same steps and tensors"
    url = f'memory://test-fit-{os.getpid()}/runs'
    for path in (tmp_path, url):
        learn = tiny_learn(path, every=2, valid_every=1, fsync=False)
        fit_quiet(learn, 2)
        assert n_hooks(learn.model) == 0
    local,remote = Trial(tmp_path),learn.snapshot.trial()
    assert remote.path == f'{url}/run-001' and remote.loaded_all_steps and remote.info['index'] == 'objects'
    for mode in ('train', 'valid'): assert remote.steps(mode) == local.steps(mode) and remote.steps(mode)
    assert check_readable(remote) == check_readable(local) > 0
    for s in (0, 4):
        a,b = local.tensors(s),remote.tensors(s)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert list_runs(url) == [f'{url}/run-001']
    store.Location.of(url).fs.rm(f'/test-fit-{os.getpid()}', recursive=True)

class SlowStore(store.Location):
    "A local location whose step files take `delay` s to write: storage slower than the steps come"
    delay = 0.05
    def write(self, data, *args, **kwargs):
        if '.safetensors' in self.path: time.sleep(self.delay)
        return super().write(data, *args, **kwargs)
    def __truediv__(self, name): return SlowStore(os.path.join(self.url, name))

@pytest.mark.parametrize('when_full', ['block', 'drop'])
def test_queue_within_its_budget(tmp_path, monkeypatch, when_full):
    "Storage slower than the steps: the queue never holds more than queue_bytes; 'block' waits and writes every step, 'drop' leaves some out with a warning"
    monkeypatch.setattr(store.Location, 'of', classmethod(lambda cls, p, so=None: SlowStore(str(p))))
    seen,close = [],store.SnapshotWriter.close
    def closing(self, *args, **kwargs): seen.append(self.max_queued); return close(self, *args, **kwargs)
    monkeypatch.setattr(store.SnapshotWriter, 'close', closing)
    step = 2*8*8*10*10*4                               # a step: the outputs of two conv layers (and the loss); the budget: three
    learn = tiny_learn(tmp_path, every=1, valid_every=0, include=['0', '3'], grads=False, bn_stats=False, fsync=False,
                       queue_bytes=3*step + 100, when_full=when_full)
    if when_full == 'drop':
        with pytest.warns(UserWarning, match=r"is dropped \(when_full='drop'\)"): fit_quiet(learn, 2)
    else: fit_quiet(learn, 2)
    monkeypatch.undo()
    trial = Trial(tmp_path)
    assert trial.loaded_all_steps and check_readable(trial) > 0
    assert 2*step < seen[0] <= 3*step + 100            # the queue filled up to its budget, never past it
    dropped = [d['step'] for d in trial.end.get('dropped', [])]
    assert sorted(trial.steps('train') + dropped) == list(range(12))
    assert bool(dropped) == (when_full == 'drop')

EXITING = textwrap.dedent('''
    import sys, time, torch
    from fastai_saliency.store import SnapshotWriter
    class Slow:
        def synchronize(self): time.sleep(0.3)          # storage busy with the first step
    w = SnapshotWriter(sys.argv[1], fsync=False)
    for s in range(3): w.write_step('train', s, {'a': torch.full((4,), float(s))}, wait=False, ready=Slow() if s == 0 else None)
    raise SystemExit(3)                                 # a script that ends (or raises) without closing its writer
''')

def test_queued_steps_are_written_at_exit(tmp_path):
    "Steps handed to the background writer are written before the interpreter exits (no end marker: the run did not end)"
    (tmp_path/'exiting.py').write_text(EXITING)
    r = subprocess.run([sys.executable, str(tmp_path/'exiting.py'), str(tmp_path/'runs')], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    trial = Trial(tmp_path/'runs')
    assert trial.steps('train') == [0, 1, 2] and trial.end is None
    assert torch.equal(trial.tensor('a').value(2), torch.full((4,), 2.))

def test_credentials_stay_out_of_exported_learners():
    "storage_options (which may hold keys) are not pickled with the callbacks by `learn.export()`"
    from fastai_saliency.saliency import SaliencyCallback
    opts = dict(key='AKIA-not-a-key', secret='not-a-secret')
    for cb in (SnapshotCallback('s3://bucket/runs', storage_options=opts), SaliencyCallback(store='s3://bucket/runs', storage_options=opts)):
        data = pickle.dumps(cb)
        assert b'not-a-secret' not in data and pickle.loads(data).storage_options is None and cb.storage_options == opts
