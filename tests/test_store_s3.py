"""The snapshot store on a real S3 server (moto's, started by the tests): a fit writes to a bucket, another process follows it
live, `fastai-saliency watch` draws from it, a writer killed mid-upload leaves a readable run, a missing bucket is said at once."""
import os, runpy, signal, subprocess, sys, textwrap, time, uuid
import pytest, torch
from PIL import Image
from fastai_saliency.store import Trial, NoSuchBucket, Location, list_runs
from fastai_saliency.replay import follow, RunStalled
from fastai_saliency.cli import main
from test_store import tiny_learn, fit_quiet, check_readable

WRITER = textwrap.dedent('''
    import sys, time, torch
    from torch import nn
    from fastai.basics import Learner, DataLoaders, Callback, set_seed
    import fastai.callback.progress
    from fastai_saliency.snapshot import SnapshotCallback
    path,n_epoch,every,pause = sys.argv[1],int(sys.argv[2]),int(sys.argv[3]),float(sys.argv[4])
    torch.set_num_threads(1)
    set_seed(0)
    x,y = torch.randn(40, 3, 16, 16),torch.randint(0, 4, (40,))
    dls = DataLoaders.from_dsets(list(zip(x[8:], y[8:])), list(zip(x[:8], y[:8])), bs=8, device='cpu')
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    class Pause(Callback):
        def after_batch(self): time.sleep(pause)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=[SnapshotCallback(path, every=every, fsync=False), Pause()])
    with learn.no_logging(), learn.no_bar(): learn.fit(n_epoch)
''')

CLI = 'import sys; from fastai_saliency.cli import main; sys.exit(main(sys.argv[1:]))'

@pytest.fixture(scope='module')
def bucket(s3_server):
    "A fresh bucket on the session's S3 server"
    name = f'runs-{uuid.uuid4().hex[:8]}'
    Location.of(f's3://{name}').fs.mkdir(name)
    return name

def start(args, tmp_path, name):
    (tmp_path/'writer.py').write_text(WRITER)
    return subprocess.Popen([sys.executable, '-W', 'ignore', *args], stdout=open(tmp_path/f'{name}.out', 'w'),
                            stderr=subprocess.STDOUT, cwd=tmp_path)

def wait_for_trial(url, proc, timeout=120):
    "A Trial on the newest run under `url` once the writer made one"
    deadline = time.monotonic() + timeout
    while True:
        try: return Trial(url)
        except FileNotFoundError:
            assert proc.poll() is None, f'the writer ended (status {proc.returncode}) before its run appeared'
            assert time.monotonic() < deadline, 'the writer never started a run'
            time.sleep(0.1)

def fit_here(script, path):
    "The writer's fit in this process (one torch thread, as there): the same run, written to `path`"
    n = torch.get_num_threads()
    argv,sys.argv = sys.argv,[str(script), str(path), '3', '2', '0']
    try: runpy.run_path(str(script), run_name='__main__')
    finally: sys.argv = argv; torch.set_num_threads(n)

def test_a_fit_on_a_bucket_followed_live(tmp_path, bucket):
    """A fit in another process writes to S3; this one follows it and draws FullGrad as each step lands, equal to the maps of
    the same run written to a local folder; `fastai-saliency watch s3://...`, a third process, makes its GIF meanwhile"""
    url = f's3://{bucket}/live'
    s3 = start(['writer.py', url, '3', '2', '0.15'], tmp_path, 's3')
    watcher = start(['-c', CLI, 'watch', url, '--out', str(tmp_path/'live.gif'), '--n', '4', '--poll', '0.1', '--timeout', '120'],
                    tmp_path, 'watch')
    try:
        trial = wait_for_trial(url, s3)
        maps,live = {},[]
        for step in follow(trial, 'valid', timeout=120, poll=0.1):
            live.append(s3.poll() is None)                       # the writer still runs: the step was read while it wrote
            maps[step] = trial.fullgrad(step)
        assert s3.wait(timeout=120) == 0, (tmp_path/'s3.out').read_text()[-3000:]
        assert watcher.wait(timeout=120) == 0, (tmp_path/'watch.out').read_text()[-3000:]
    finally:
        for p in (s3, watcher):
            if p.poll() is None: p.kill(); p.wait()
    assert sorted(maps) == [0, 1, 2] and any(live), (sorted(maps), live)
    assert trial.loaded_all_steps and str(trial.path) == f'{url}/run-001'
    fit_here(tmp_path/'writer.py', tmp_path/'local')
    on_disk = Trial(tmp_path/'local')
    assert on_disk.steps('train') == trial.steps('train') and on_disk.steps('valid') == trial.steps('valid')
    for s,m in maps.items(): assert torch.equal(m, on_disk.fullgrad(s)), s
    assert torch.equal(trial.tensors(4)['1.output_grad'], on_disk.tensors(4)['1.output_grad'])
    with Image.open(tmp_path/'live.gif') as g: assert g.n_frames == 3
    out = (tmp_path/'watch.out').read_text()
    assert f"Following '{url}/run-001'" in out and out.rstrip().endswith(f"3 frames in '{tmp_path/'live.gif'}'"), out[-2000:]
    assert not (tmp_path/'s3:').exists()                                        # nothing went to a local folder named after the URL
    keys = Location.of(url).fs.find(f'{bucket}/live/run-001')                  # what the bucket holds: no index.jsonl
    assert not any(k.endswith('index.jsonl') for k in keys) and sum('/index/' in k for k in keys) == trial.end['records']

def test_writer_killed_mid_upload_leaves_a_readable_run(tmp_path, bucket):
    url = f's3://{bucket}/killed'
    proc = start(['writer.py', url, '100000', '1', '0.02'], tmp_path, 'killed')
    try:
        trial = wait_for_trial(url, proc)
        trial.wait_for_steps(list(range(6)), mode='train', timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    trial = Trial(url)
    assert trial.end is None and not trial.loaded_all_steps
    steps = trial.steps('train')
    assert steps[:6] == list(range(6)) and steps == list(range(len(steps)))      # listed in order, no gap
    assert check_readable(trial) > 0                                             # every listed step reads back whole
    with pytest.raises(RunStalled, match=r'its writer \(pid \d+ on this host\) no longer runs'): list(follow(trial, 'train', timeout=600))

def test_missing_bucket_is_said_before_the_first_epoch(tmp_path, s3_server, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from fastai.basics import Callback
    class Batches(Callback):
        n = 0
        def before_batch(self): self.n += 1
    count = Batches()
    learn = tiny_learn('s3://no-such-bucket/runs', cbs=[count], every=1)
    with pytest.raises(NoSuchBucket, match=r"the bucket 'no-such-bucket' of 's3://no-such-bucket/runs' does not exist \(endpoint http://127"):
        fit_quiet(learn)
    assert count.n == 0 and not (tmp_path/'s3:').exists()        # said in before_fit: no batch trained, no local folder made
    with pytest.raises(NoSuchBucket, match='does not exist'): Trial('s3://no-such-bucket/runs')
    assert main(['watch', 's3://no-such-bucket/runs', '--timeout', '600']) == 1    # at once: a bucket does not appear by waiting
    assert "the bucket 'no-such-bucket'" in capsys.readouterr().err

def test_capture_on_a_bucket_checked_by_the_cli(tmp_path, bucket, capsys):
    from fastai_saliency.monitor import PredictionMonitor, Constraints, read_history
    g = torch.Generator().manual_seed(0)
    clean = torch.eye(4)[torch.randint(0, 4, (200,), generator=g)]*0.9 + 0.025
    Constraints.from_probs(clean, vocab=list('abcd')).save(tmp_path/'c.json')
    url = f's3://{bucket}/capture'
    mon = PredictionMonitor(capture=url, vocab=list('abcd'))
    mon.update(clean[:150])
    args = ['monitor', url, '--constraints', str(tmp_path/'c.json'), '--out', str(tmp_path/'checks')]
    assert main(args) == 0
    mon.update(torch.eye(4)[[2]*120]*0.9 + 0.025)                 # a burst of one class: flagged, read from the bucket
    assert main(args) == 1
    assert [(h['ok'], h['n']) for h in read_history(tmp_path/'checks')] == [(True, 150), (False, 120)]
