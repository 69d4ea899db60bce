"""Saliency on the architectures users train (issue 11): for resnet50, convnext_tiny, efficientnet_b0, regnety_008,
densenet121 and vit_small (random init with randomised norm statistics and affine parameters, batch 8, 224 px by
default), measured side by side in one run:

- FullGrad time / floor, where the floor is one forward plus one backward to the input (what any input-gradient
  method costs); target <= 1.15;
- Grad-CAM time against pytorch-grad-cam's and torchcam's Grad-CAM at the same layer (ratio < 1: ours is faster);
- FullGrad's completeness error, |target logit - sum of terms| / |logit| (worst image), and the relative gap that
  fullgrad warns about: ~1e-7 for piecewise-linear nets (exact), large where SiLU/GELU/LayerNorm are inside.

Timings are medians over `--repeats` calls, the methods taking turns, so that load on a shared machine hits all alike.
pytorch-grad-cam and torchcam are development dependencies only; a missing one leaves its column empty.
    python bench/archs.py [--archs resnet50,vit_small_patch16_224] [--bs 8] [--size 224] [--repeats 5] [--threads 1]
"""
import argparse, statistics, time, warnings
import torch, timm
from torch import nn
from fastai_saliency.methods import (gradcam, fullgrad, fullgrad_terms, default_layer, feature_layout,
                                     FullGradGapWarning)
from fastai_saliency.hooks import find_layer

ARCHS = 'resnet50,convnext_tiny,efficientnet_b0,regnety_008,densenet121,vit_small_patch16_224'
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--archs', default=ARCHS)
p.add_argument('--bs', type=int, default=8)
p.add_argument('--size', type=int, default=224)
p.add_argument('--repeats', type=int, default=5)
p.add_argument('--threads', type=int, default=None, help="torch CPU threads (1 gives steadier timings on a busy machine)")
a = p.parse_args()
if a.threads: torch.set_num_threads(a.threads)
dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
def sync():
    if dev.type == 'cuda': torch.cuda.synchronize()

def timed(fs:dict, repeats:int) -> dict:
    "Median ms per call of each function, after one warm-up each, calling them in turn"
    for f in fs.values(): f()
    ts = {k:[] for k in fs}
    for _ in range(repeats):
        for k,f in fs.items():
            sync(); t = time.perf_counter(); f(); sync(); ts[k].append((time.perf_counter() - t)*1000)
    return {k:statistics.median(v) for k,v in ts.items()}

def floor(model, x, t):
    "One forward and one backward of the target logits to the input: the least an input-gradient method costs"
    xx = x.clone().requires_grad_()
    torch.autograd.grad(model(xx).gather(1, t[:, None]).sum(), xx)

def pgc_gradcam(model, layer, x, t, transform):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with GradCAM(model=model, target_layers=[layer], reshape_transform=transform) as g:
        return g(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])

def torchcam_gradcam(model, name, x, t):
    from torchcam.methods import GradCAM as TCGradCAM
    with TCGradCAM(model, target_layer=name) as ex:
        out = model(x)
        return ex(t.tolist(), out)

def randomise_norms(model, x, seed=0):
    """Calibrate batch-norm statistics on `x`, then perturb every norm's statistics and affine parameters: random init
    leaves implicit biases at 0 and timm zeroes the last norm of each residual branch (branches, SE gates included, dead),
    which would make completeness look better than it is on a trained model"""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g).to(t)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns: m.reset_running_stats(); m.momentum = None
    model.train()
    with torch.no_grad(): model(x)
    model.eval()
    for m in bns: m.momentum = 0.1
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)): continue
            if getattr(m, 'running_mean', None) is not None:
                sd = m.running_var.sqrt()
                m.running_mean.add_(0.3*sd*rnd(sd)); m.running_var.mul_(torch.exp(0.3*rnd(sd)))
            if getattr(m, 'weight', None) is not None: m.weight.copy_(torch.exp(0.25*rnd(m.weight)))
            if getattr(m, 'bias', None) is not None: m.bias.copy_(0.5*rnd(m.bias))
    return model

def row(arch):
    torch.manual_seed(0)
    kw = dict(img_size=a.size) if 'vit' in arch or 'deit' in arch else {}
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kw).to(dev).eval()
    x = torch.randn(a.bs, 3, a.size, a.size, device=dev)
    model = randomise_norms(model, x)
    with torch.no_grad(): t = model(x).argmax(1)
    name = default_layer(model)
    layer = find_layer(model, name)[1]
    with torch.no_grad(): o = {}; h = layer.register_forward_hook(lambda m,i,out: o.setdefault('o', out)); model(x); h.remove()
    lay = feature_layout(model, name, o['o'].shape, x.shape[-2:], batch_size=len(x))
    transform = None if lay.fmt == 'NCHW' else lambda out: lay(out)
    fs = dict(floor=lambda: floor(model, x, t), gradcam=lambda: gradcam(model, x, name, target=t))
    res = dict(arch=arch, layer=name, layout=lay.fmt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FullGradGapWarning)
            fullgrad(model, x[:1], target=t[:1])
        fs['fullgrad'] = lambda: fullgrad(model, x, target=t, gap_tol=float('inf'))
        terms = fullgrad_terms(model, x, target=t)
        res['complete'] = ((terms.residual.abs()/terms.target_logit.abs()).max().item())
        res['gap'] = terms.gap.max().item()
    except ValueError as e: res['fullgrad'] = f"n/a ({str(e)[:40]}...)"
    try:
        import pytorch_grad_cam
        fs['pgc'] = lambda: pgc_gradcam(model, layer, x, t, transform)
    except ImportError: pass
    if lay.fmt == 'NCHW':
        try:
            import torchcam
            fs['torchcam'] = lambda: torchcam_gradcam(model, name, x, t)
        except ImportError: pass
    ms = timed(fs, a.repeats)
    res.update({f'{k}_ms': v for k,v in ms.items()})
    return res

print(f"device {dev}, batch {a.bs}, {a.size} px, {torch.get_num_threads()} threads, medians of {a.repeats} calls; "
      "ratios < 1: ours faster")
hdr = (f"{'arch':24} {'layer (layout)':28} {'floor ms':>9} {'FullGrad/floor':>15} {'Grad-CAM ms':>12} "
       f"{'vs pgc':>7} {'vs torchcam':>12} {'completeness':>13} {'gap':>8}")
print(hdr); print('-'*len(hdr))
for arch in a.archs.split(','):
    r = row(arch)
    fg = f"{r['fullgrad_ms']/r['floor_ms']:.2f}" if 'fullgrad_ms' in r else 'n/a'
    pgc = f"{r['gradcam_ms']/r['pgc_ms']:.2f}" if 'pgc_ms' in r else '-'
    tc = f"{r['gradcam_ms']/r['torchcam_ms']:.2f}" if 'torchcam_ms' in r else '-'
    comp = f"{r['complete']:.1e}" if 'complete' in r else 'n/a'
    gap = f"{r['gap']:.1e}" if 'gap' in r else 'n/a'
    print(f"{arch:24} {r['layer'] + ' (' + r['layout'] + ')':28} {r['floor_ms']:9.0f} {fg:>15} {r['gradcam_ms']:12.0f} "
          f"{pgc:>7} {tc:>12} {comp:>13} {gap:>8}", flush=True)
print("n/a FullGrad: a transformer (refused: completeness does not hold through attention). '-': that library cannot "
      "run there (torchcam takes NCHW maps only).")
