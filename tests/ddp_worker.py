"""One rank of the 2-process CPU test (tests/test_distributed.py): `torchrun --nproc_per_node 2 ddp_worker.py DATA OUT`.

Two fits of the same small model from the same seed inside `learn.distrib_ctx()`: without callbacks, then with
GradCAMCallback, FullGradCallback (every batch) and SnapshotCallback. Each rank writes OUT/rank{r}.json with what it saw;
the test compares. Collectives are counted while the saliency callbacks compute their maps."""
import os, sys, json, warnings
from collections import Counter
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated')
import torch, torch.distributed as dist
from fastai.vision.all import *
from fastai.distributed import DistributedDL
from fastai.callback.progress import ProgressCallback
from fastai_saliency.all import synth_signs_dls, GradCAMCallback, FullGradCallback, SnapshotCallback, SaliencyCallback, Trial

# Test-only: fastai's `DistributedDL._broadcast` sends the shuffled indices through `LongTensor(t).cuda()`, since nccl
# takes CUDA tensors only. This machine has no GPU and gloo takes CPU tensors, so the test broadcasts on the CPU. The
# library never relies on this: on GPUs fastai's own `_broadcast` runs.
def _cpu_broadcast(self, t, rank):
    t = LongTensor(t); dist.broadcast(t, rank); return t.tolist()
DistributedDL._broadcast = _cpu_broadcast

CALLS,PHASE = Counter(),['fit']
def _counted(name, f):
    def g(*args, **kwargs): CALLS[f'{PHASE[0]}:{name}'] += 1; return f(*args, **kwargs)
    return g
for n in ('broadcast', 'all_reduce', 'all_gather', 'barrier', 'reduce', 'gather', 'scatter', '_broadcast_coalesced'):
    if hasattr(dist, n): setattr(dist, n, _counted(n, getattr(dist, n)))   # DDP calls dist._broadcast_coalesced by attribute
_frame = SaliencyCallback._frame
def _counted_frame(self):
    old,PHASE[0] = PHASE[0],'saliency'
    try: return _frame(self)
    finally: PHASE[0] = old
SaliencyCallback._frame = _counted_frame

DATA,OUT = Path(sys.argv[1]),Path(sys.argv[2])
RANK = int(os.environ['RANK'])

class Spy(Callback):
    "What the model is during the fit (fastai unwraps it again in after_fit)"
    def before_epoch(self): self.learn.model_type = type(self.learn.model).__name__

def fit(cbs):
    set_seed(0, reproducible=True)
    dls = synth_signs_dls(DATA, bs=8, device='cpu', num_workers=0)
    model = nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 16, stride=2), ConvLayer(16, 16),
                          nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(16, dls.c))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[*cbs, Spy()])
    learn.remove_cb(ProgressCallback)
    with learn.no_logging(), learn.distrib_ctx(sync_bn=False, cpu=True):   # CPU: accelerate's MULTI_CPU, gloo
        learn.fit(2, 1e-2)
        inside = learn.model_type
        maps = learn.gradcam(n=2) if RANK == 0 else None               # a Learner method inside the context, after fit
    return learn, inside, maps

base,_,_ = fit([])
cbs = [GradCAMCallback(n=4, store=OUT/'saliency'), FullGradCallback(n=3, every=1), SnapshotCallback(OUT/'snaps', every=2)]
learn,inside,maps = fit(cbs)
snaps = sorted((OUT/'snaps').glob('run-*'))
res = dict(rank=RANK, model_in_fit=inside, world_size=dist.get_world_size() if dist.is_initialized() else None, calls=dict(CALLS),
           same_weights=all(torch.equal(a, b) for a,b in zip(base.model.state_dict().values(), learn.model.state_dict().values())),
           frames=[len(cbs[0].frames), len(cbs[1].frames)], probes=None if cbs[0].probe_xb is None else list(cbs[0].probe_xb.shape),
           gradcam_layer=cbs[0].layer, maps=None if maps is None else list(maps.shape),
           snapshot_names=Trial(snaps[-1]).tensor_names() if RANK == 0 and snaps else [], n_snapshot_runs=len(snaps))
(OUT/f'rank{RANK}.json').write_text(json.dumps(res))
