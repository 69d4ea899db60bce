"`fastai-saliency watch` follows a run another process writes: to its end marker, and to a clear stop when the writer is killed."
import os, signal, subprocess, sys, textwrap, threading, time
import pytest
from PIL import Image
from fastai_saliency.cli import main

WRITER = textwrap.dedent('''
    import sys, time, torch
    from torch import nn
    from fastai.basics import Learner, DataLoaders, Callback, set_seed
    import fastai.callback.progress
    from fastai_saliency.snapshot import SnapshotCallback
    path,n_epoch = sys.argv[1],int(sys.argv[2])
    set_seed(0)
    x,y = torch.randn(32, 3, 16, 16),torch.randint(0, 4, (32,))
    dls = DataLoaders.from_dsets(list(zip(x[8:], y[8:])), list(zip(x[:8], y[:8])), bs=8, device='cpu')
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    class Slow(Callback):
        def after_epoch(self): time.sleep(0.3)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=[SnapshotCallback(path, every=0, fsync=False), Slow()])
    with learn.no_logging(), learn.no_bar(): learn.fit(n_epoch)
''')

def start_writer(tmp_path, n_epoch):
    (tmp_path/'writer.py').write_text(WRITER)
    return subprocess.Popen([sys.executable, '-W', 'ignore', str(tmp_path/'writer.py'), str(tmp_path/'runs'), str(n_epoch)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

def n_frames(gif):
    try:
        with Image.open(gif) as g: return g.n_frames
    except (FileNotFoundError, OSError): return 0

def test_watch_follows_the_writer_to_its_end_marker(tmp_path, capsys):
    proc = start_writer(tmp_path, 4)
    try: rc = main(['watch', str(tmp_path/'runs'), '--out', str(tmp_path/'evo.gif'), '--n', '4', '--poll', '0.05', '--localising'])
    finally: proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and n_frames(tmp_path/'evo.gif') == 4
    frames = [l for l in out if 'frame' in l and 'written' in l]               # a line per frame, as each step lands
    assert [l.split(':')[0] for l in frames] == [f'valid step {s} (epoch {s})' for s in range(4)]
    assert out[-1].startswith('The run ended: 4 frames')

def test_watch_stops_with_a_message_when_the_writer_is_killed(tmp_path, capsys):
    proc = start_writer(tmp_path, 100_000)
    gif = tmp_path/'evo.gif'
    def killer():                           # the writer dies after the watcher drew two of its steps
        while proc.poll() is None and n_frames(gif) < 2: time.sleep(0.05)
        if proc.poll() is None: os.kill(proc.pid, signal.SIGKILL)
        proc.wait()                         # reaped, as its parent would (a zombie counts as ended too)
    k = threading.Thread(target=killer); k.start()
    deadline = time.monotonic() + 120
    while not (tmp_path/'runs').exists() and proc.poll() is None and time.monotonic() < deadline: time.sleep(0.05)
    try: rc = main(['watch', str(tmp_path/'runs'), '--out', str(gif), '--timeout', '600', '--poll', '0.05'])   # gone at once
    finally:
        k.join(timeout=60)
        if proc.poll() is None: proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    err = capsys.readouterr().err
    assert rc == 1 and 'stopped: its writer (pid' in err and 'no end marker' in err and f'pid {proc.pid}' in err
    assert n_frames(gif) >= 2                      # the frames drawn so far stay readable
