"Several processes: learn.distrib_ctx() with 2 CPU processes (torchrun, gloo); the callbacks work on rank 0 alone."
import json, os, subprocess, sys
from pathlib import Path
import pytest
from fastai_saliency.data import synth_signs

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run']   # torchrun; also where torch is borrowed from another venv
pytest.importorskip('accelerate', reason="fastai's distrib_ctx needs accelerate")

def _kill_tree(pid):
    "torchrun and every rank under it (torchrun starts each rank in a session of its own, so killpg is not enough)"
    import psutil
    try: procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess: return
    for q in procs:
        try: q.kill()
        except psutil.NoSuchProcess: pass

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    data = synth_signs(tmp_path_factory.mktemp('signs')/'s', n_per_class=16, size=32, n_classes=4, seed=0)
    out = tmp_path_factory.mktemp('ddp')
    env = {k:v for k,v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', MPLBACKEND='Agg', PYTHONUNBUFFERED='1')
    cmd = [*TORCHRUN, '--standalone', '--nproc_per_node=2', '--max-restarts=0', str(HERE/'ddp_worker.py'), str(data), str(out)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try: output = p.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        _kill_tree(p.pid); output = p.communicate()[0]
        pytest.fail(f"the 2-process run hung (killed after 240 s):\n{output[-3000:]}")
    assert p.returncode == 0, output[-4000:]
    return {r: json.loads((out/f'rank{r}.json').read_text()) for r in (0, 1)}

def test_no_rank_raises_and_training_is_unchanged(run):
    "Both ranks finish; the fit with the saliency and snapshot callbacks ends with the same weights as the one without"
    for r in (0, 1):
        assert run[r]['model_in_fit'] == 'DistributedDataParallel'
        assert run[r]['same_weights'], f"rank {r}: the callbacks changed the training"

def test_maps_on_rank_0_only_without_collectives(run):
    r0,r1 = run[0],run[1]
    assert r0['frames'][0] == 3 and r0['frames'][1] > 3                      # before training + 2 epochs; every batch
    assert r0['probes'] == [4, 3, 32, 32] and r0['gradcam_layer'] == '2'     # probes from the plain DataLoader
    assert r1['frames'] == [0, 0] and r1['probes'] is None                    # other ranks do nothing extra
    assert not any(k.startswith('saliency:') for k in r0['calls']), r0['calls']   # no collective while computing maps
    assert r0['maps'] == [2, 32, 32]                                          # learn.gradcam() inside the context

def test_snapshot_names_of_the_plain_model(run):
    names = run[0]['snapshot_names']
    assert names and not any(n.startswith('module.') for n in names), names[:5]
    assert '0.0.output' in names and run[1]['n_snapshot_runs'] == 1           # one run, written by rank 0
