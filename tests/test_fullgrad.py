"FullGrad where the biases are added (timm's fused norm+activation, frozen batch norms), clamps (ReLU6, Hardtanh, Hardsigmoid), the residual and its warning"
import warnings, pytest, torch
import torch.nn.functional as F
from torch import nn
timm = pytest.importorskip('timm')
from fastai_saliency import methods as fg
from fastai_saliency.hooks import n_hooks
from timm.layers import BatchNormAct2d, GroupNormAct, LayerNormAct2d
import torch, torchvision

from torch import nn
from fastai.vision.all import vision_learner, DataLoaders, resnet18 as fastai_resnet18

_BN = nn.modules.batchnorm._BatchNorm
_NORMS = (_BN, nn.GroupNorm, nn.LayerNorm)

def randomise_norms(model:nn.Module, x:torch.Tensor, seed:int=0) -> nn.Module:
    "Calibrate batchnorm statistics on `x` (one train-mode pass), then perturb them and every norm's affine at random"
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    for m in bns: m.reset_running_stats(); m.momentum = None   # cumulative average: one pass sets the batch's statistics
    model.train()
    with torch.no_grad(): model(x)
    model.eval()
    for m in bns: m.momentum = 0.1
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _NORMS): continue
            if getattr(m, 'running_mean', None) is not None:
                sd = m.running_var.sqrt()
                m.running_mean.add_(0.3 * sd * rnd(sd))
                m.running_var.mul_(torch.exp(0.3 * rnd(sd)))
            if getattr(m, 'weight', None) is not None: m.weight.copy_(torch.exp(0.25 * rnd(m.weight)))
            if getattr(m, 'bias', None) is not None: m.bias.copy_(0.5 * rnd(m.bias))
    return model

class HandNet(nn.Module):
    "LeakyReLU, MaxPool2d, an in-place ReLU on a batchnorm output and one on a residual sum, a functional ReLU"
    def __init__(self, n_out=5):
        super().__init__()
        self.conv1,self.bn1 = nn.Conv2d(3, 8, 3, padding=1),nn.BatchNorm2d(8)
        self.act1,self.pool = nn.LeakyReLU(0.1),nn.MaxPool2d(2)
        self.conv2,self.bn2,self.relu = nn.Conv2d(8, 8, 3, padding=1, bias=False),nn.BatchNorm2d(8),nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(inplace=True), nn.Linear(12, n_out))
    def forward(self, x):
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        y = self.relu(self.bn2(self.conv2(x)))
        x = y + x
        x = nn.functional.relu(x, inplace=True)
        return self.head(torch.relu(self.conv3(x)))

TIMM = ['resnet18', 'regnetx_002', 'efficientnet_lite0', 'mobilenetv2_035', 'efficientnet_b0', 'convnext_atto']

def make(arch:str, size:int=64, bs:int=2, dtype=torch.float64, seed:int=0, n_out:int=10):
    "`(model, x)`: random-init `arch` in eval mode with randomised norms, and an input batch"
    torch.manual_seed(seed)
    if arch in TIMM: m = timm.create_model(arch, pretrained=False, num_classes=n_out)
    elif arch == 'tv_densenet121': m = torchvision.models.densenet121(num_classes=n_out)
    elif arch == 'tv_resnet18': m = torchvision.models.resnet18(num_classes=n_out)
    elif arch == 'fastai_resnet18': m = fastai_learner(n_out).model
    elif arch.startswith('frozen_'): m = timm.create_model(arch[7:], pretrained=False, num_classes=n_out)
    elif arch == 'hand': m = HandNet(n_out)
    else: raise ValueError(arch)
    m = m.to(dtype)
    x = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    xcal = torch.randn(max(bs, 8), 3, size, size, generator=torch.Generator().manual_seed(seed + 2), dtype=dtype)
    m = randomise_norms(m, xcal, seed).eval()
    if arch.startswith('frozen_'):
        from timm.layers import freeze_batch_norm_2d
        m = freeze_batch_norm_2d(m).eval()   # torchvision/timm FrozenBatchNorm2d, FrozenBatchNormAct2d
    return m,x

def fastai_learner(n_out:int=10):
    "A fastai `vision_learner(dls, resnet18, pretrained=False)` on a few random images"
    ds = [(torch.randn(3, 32, 32), i % n_out) for i in range(4)]
    return vision_learner(DataLoaders.from_dsets(ds, ds, bs=2), fastai_resnet18, pretrained=False, n_out=n_out,
                          loss_func=nn.CrossEntropyLoss())


def _total(t): return t.input_term.flatten(1).sum(1) + sum(b.flatten(1).sum(1) for b in t.bias_terms)

def _rel_err(t):
    "Completeness error |logit - sum of terms| / |logit|, worst image"
    return ((t.target_logit - _total(t)).abs() / t.target_logit.abs()).max().item()

PL = ['resnet18', 'regnetx_002', 'efficientnet_lite0', 'mobilenetv2_035', 'tv_densenet121', 'hand', 'fastai_resnet18',
      'frozen_resnet18', 'frozen_regnetx_002']

@pytest.mark.parametrize('arch', PL)
def test_complete_float64(arch):
    m,x = make(arch)
    t = fg.fullgrad_terms(m, x)
    err = _rel_err(t)
    assert err < 1e-6 and t.gap.max() < 1e-6
    torch.testing.assert_close(t.residual, t.target_logit - _total(t), rtol=0, atol=1e-9 * t.target_logit.abs().max().item())
    if arch in ('efficientnet_lite0', 'mobilenetv2_035'):   # ReLU6 saturates somewhere: the clamp terms matter
        clamp = [b for b,k in zip(t.bias_terms, t.kinds) if k == 'clamp']
        assert len(clamp) > 20 and sum((b != 0).sum() for b in clamp) > 100

def _hand_relu6():
    "1x1 conv (2 channels) -> ReLU6 -> flatten -> linear (1 output); float64"
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU6(), nn.Flatten(), nn.Linear(8, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([2., -1.]).view(2, 1, 1, 1)); net[0].bias.copy_(torch.tensor([0.5, 1.25]))
        net[3].weight.copy_(torch.tensor([[1., 2., -1., .5, -2., 1., 3., 2.]])); net[3].bias.fill_(-0.5)
    return net,torch.tensor([[1., -2.], [4., .5]], dtype=torch.float64)[None, None]

def test_hand_conv_relu6_linear():
    # z0 = 2x+.5 = [[2.5,-3.5],[8.5,1.5]] (8.5 saturates: relu6 gives the constant 6); z1 = -x+1.25 = [[.25,3.25],[-2.75,.75]]
    # logit = v . relu6(z) + d = 1; grad at relu6 output = v; at z: v where 0<z<6
    net,x = _hand_relu6()
    t = fg.fullgrad_terms(net, x)
    assert t.names == ['0', '1', '3'] and t.kinds == ['out', 'clamp', 'out']
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)
    torch.testing.assert_close(t.target_logit, f64([1.]))
    torch.testing.assert_close(t.input_term, f64([[[[4., 2.], [0., -.5]]]]))                        # (2*gz0 - gz1) * x
    torch.testing.assert_close(t.bias_terms[0], f64([[[[.5, 0.], [0., .25]], [[-2.5, 1.25], [0., 2.5]]]]))   # gz * c
    torch.testing.assert_close(t.bias_terms[1], f64([[[[0., 0.], [-6., 0.]], [[0., 0.], [0., 0.]]]]))       # v * 6 where z >= 6
    torch.testing.assert_close(t.bias_terms[2], f64([[-.5]]))
    torch.testing.assert_close(t.residual, f64([0.]))

@pytest.mark.parametrize('act,x,logit,pre,clamp', [
    (nn.ReLU, [[1., -1.], [3., .25]], 6., [[-1., 0.], [-1., 0.]], None),
    (nn.ReLU6, [[1., -1.], [4., .25]], 7., [[-1., 0.], [0., 0.]], [[0., 0.], [6., 0.]])])
def test_hand_fused_bn_act(act, x, logit, pre, clamp):
    # BatchNormAct2d: scale 2/sqrt(var+eps) = 2, implicit bias 1 - 1*2 = -1, so z = 2x - 1, then the activation, then a sum
    bn = BatchNormAct2d(1, act_layer=act)
    with torch.no_grad():
        bn.running_mean.fill_(1.); bn.running_var.fill_(1. - bn.eps); bn.weight.fill_(2.); bn.bias.fill_(1.)
    lin = nn.Linear(4, 1, bias=False)
    nn.init.ones_(lin.weight)
    net = nn.Sequential(bn, nn.Flatten(), lin).double().eval()
    x = torch.tensor(x, dtype=torch.float64)[None, None]
    t = fg.fullgrad_terms(net, x)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)[None, None]
    torch.testing.assert_close(t.target_logit, torch.tensor([logit], dtype=torch.float64))
    torch.testing.assert_close(t.bias_terms[0], f64(pre))      # gradient before the activation (inside the module) * -1
    if clamp is not None: torch.testing.assert_close(t.bias_terms[t.kinds.index('clamp')], f64(clamp))
    torch.testing.assert_close(t.residual, t.residual.new_zeros(1), atol=1e-12, rtol=0)

@pytest.mark.parametrize('fused,plain', [
    (lambda: BatchNormAct2d(6, act_layer=nn.ReLU6), lambda: [nn.BatchNorm2d(6), nn.ReLU6(inplace=True)]),
    (lambda: GroupNormAct(6, 2, act_layer=nn.Hardtanh), lambda: [nn.GroupNorm(2, 6), nn.Hardtanh()]),
    (lambda: LayerNormAct2d(6, act_layer=nn.ReLU), lambda: [_LN2d(6), nn.ReLU()])])
def test_fused_equals_unfused(fused, plain):
    "A fused norm+activation gives the terms of the same norm and activation as separate modules (GroupNorm, LayerNorm: not PL)"
    torch.manual_seed(0)
    a,b = fused(),plain()
    with torch.no_grad():
        for k,p in a.state_dict().items():
            if p.is_floating_point(): p.copy_(torch.rand_like(p) + .5 if 'var' in k else torch.randn_like(p))
        b[0].load_state_dict({k:v for k,v in a.state_dict().items() if not k.startswith(('act', 'drop'))})
    head = lambda: [nn.Conv2d(6, 3, 1), nn.Flatten(), nn.Linear(48, 4)]
    torch.manual_seed(1); na = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), a, *head()).double()
    torch.manual_seed(1); nb = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), *b, *head()).double()
    nb[0].load_state_dict(na[0].state_dict())
    for i in (2, 4): nb[i + 1].load_state_dict(na[i].state_dict())
    x = 3 * torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ta,tb = fg.fullgrad_terms(na, x),fg.fullgrad_terms(nb, x)
    assert [k.replace('pre', 'out') for k in ta.kinds] == tb.kinds and ta.kinds.count('pre') == 1
    for u,v in zip(ta.bias_terms, tb.bias_terms): torch.testing.assert_close(u, v)
    torch.testing.assert_close(ta.residual, tb.residual)

class _LN2d(nn.LayerNorm):
    "A channels-first layer norm (as timm's LayerNorm2d) built on `nn.LayerNorm`"
    def forward(self, x): return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

class ChannelsLastNet(nn.Module):
    "Linear on a channels-last (B,H,W,C) tensor: PL, and its 4-d bias term is drawn after moving channels to dim 1"
    def __init__(self):
        super().__init__()
        self.conv,self.lin,self.bn = nn.Conv2d(3, 8, 3, padding=1),nn.Linear(8, 6),nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    def forward(self, x):
        x = F.relu(self.lin(F.relu(self.conv(x)).permute(0, 2, 3, 1).contiguous()), inplace=True)   # in-place on a view
        x = x.permute(0, 3, 1, 2)
        return self.head(self.bn(x))

def slow_fullgrad(model, xb, target=None, input_term=True, align_corners=True, max_stride=None):
    "FullGrad maps the straightforward way: each 4-d term on its own, min-max scaled, channel-summed, resized, added"
    t = fg.fullgrad_terms(model, xb, target)
    size,mods = xb.shape[-2:],dict(model.named_modules())
    mm = lambda a: (a - a.amin((1, 2, 3), keepdim=True)) / (a.amax((1, 2, 3), keepdim=True) - a.amin((1, 2, 3), keepdim=True))
    out = mm(t.input_term.abs()).sum(1) if input_term else torch.zeros(xb.shape[0], *size, dtype=xb.dtype)
    for b,n in zip(t.bias_terms, t.names):
        if b.dim() != 4: continue
        if isinstance(mods[n], (nn.Linear, nn.LayerNorm)) and not isinstance(mods[n], _LN2d): b = b.permute(0, 3, 1, 2)
        if max_stride is not None and max(size[0] / b.shape[-2], size[1] / b.shape[-1]) > max_stride: continue
        s = mm(b.abs()).sum(1)
        out = out + F.interpolate(s[:, None], size=size, mode='bilinear', align_corners=align_corners)[:, 0]
    lo,hi = out.amin((1, 2), keepdim=True),out.amax((1, 2), keepdim=True)
    return (out - lo) / (hi - lo)

@pytest.mark.parametrize('arch', ['efficientnet_lite0', 'channels_last'])
@pytest.mark.parametrize('kw', [{}, dict(input_term=False, max_stride=8, align_corners=False)])
def test_maps_match_slow_reference(arch, kw):
    if arch == 'channels_last':
        torch.manual_seed(0)
        m,x = randomise_norms(ChannelsLastNet().double(), torch.randn(8, 3, 16, 16).double()),torch.randn(2, 3, 16, 16).double()
        assert fg.fullgrad_terms(m, x).gap.max() < 1e-12
    else: m,x = make(arch)
    torch.testing.assert_close(fg.fullgrad(m, x, **kw), slow_fullgrad(m, x, **kw), rtol=0, atol=1e-6)

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_torchvision_resnet18_maps_match_slow_reference(dtype):
    m,x = make('tv_resnet18', size=64, bs=3, dtype=dtype)
    for kw in ({}, dict(input_term=False, max_stride=4)):
        torch.testing.assert_close(fg.fullgrad(m, x, **kw), slow_fullgrad(m, x, **kw).to(torch.float32 if dtype == torch.float32 else dtype),
                                   rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-9)
    assert set(fg.fullgrad_terms(m, x).kinds) == {'out'}

@pytest.mark.parametrize('arch', ['efficientnet_b0', 'convnext_atto'])
def test_not_piecewise_linear_warns_once(arch):
    m,x = make(arch, dtype=torch.float32)
    t = fg.fullgrad_terms(m, x)
    assert t.gap.min() > 1e-2 and (t.residual.abs() > 1e-3 * t.target_logit.abs()).all()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        maps = [fg.fullgrad(m, x) for _ in range(3)]
    gw = [w for w in ws if issubclass(w.category, fg.FullGradGapWarning)]
    assert len(gw) == 1 and 'approximate' in str(gw[0].message) and gw[0].filename == __file__
    assert all(mp.shape == (2, 64, 64) for mp in maps)
    m2,_ = make(arch, dtype=torch.float32)   # another model warns again
    with pytest.warns(fg.FullGradGapWarning): fg.fullgrad(m2, x)

@pytest.mark.parametrize('arch', ['resnet18', 'efficientnet_lite0', 'fastai_resnet18'])
def test_piecewise_linear_float32_and_bf16_no_warning(arch):
    m,x = make(arch, dtype=torch.float32, size=96, bs=4)
    with warnings.catch_warnings():
        warnings.simplefilter('error', fg.FullGradGapWarning)
        fg.fullgrad(m, x)
        with torch.autocast('cpu', dtype=torch.bfloat16): mp = fg.fullgrad(m, x)
    assert mp.dtype == torch.float32 and mp.shape == (4, 96, 96)

def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()], n_hooks(model),
            [b.clone() for b in model.buffers()], [p.detach().clone() for p in model.parameters()])

def _same(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3] == 0
    for i in (2, 4, 5):
        for u,v in zip(a[i], b[i]): assert (u is None and v is None) or torch.equal(u, v)

def test_state_kept():
    m,x = make('efficientnet_lite0', dtype=torch.float32)
    m.train(); m.blocks[2].eval()
    for p in m.conv_stem.parameters(): p.requires_grad_(False)
    m(x).sum().backward()
    before = _state(m)
    with torch.no_grad():
        fg.fullgrad(m, x); fg.fullgrad_terms(m, x)
    _same(before, _state(m))

class _Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(HandNet(), nn.Unflatten(1, (5, 1, 1)), BatchNormAct2d(5, act_layer=nn.ReLU6)).double()
    def forward(self, x):
        self.body(x)
        raise RuntimeError('boom')

def test_state_kept_when_forward_raises():
    m = _Boom(); m.train()
    before = _state(m)
    for f in (fg.fullgrad, fg.fullgrad_terms):
        with pytest.raises(RuntimeError, match='boom'): f(m, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    _same(before, _state(m))

def test_target_and_unused_branch():
    "A target given per image; a biased layer the target does not reach gets a zero term"
    class Two(nn.Module):
        def __init__(self):
            super().__init__(); self.a,self.b,self.c = nn.Linear(4, 3),nn.Linear(4, 3),nn.Linear(4, 3)
        def forward(self, x):
            x = x.flatten(1)
            self.c(x)   # called, not used
            return torch.cat([self.a(x)[:, :2], self.b(x)[:, 2:]], 1)
    m,x = Two().double(),torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = fg.fullgrad_terms(m, x, target=[0, 2])
    assert t.names == ['c', 'a', 'b'] and torch.equal(t.target, torch.tensor([0, 2]))
    assert (t.residual.abs() < 1e-12).all()
    assert (t.bias_terms[0] == 0).all() and t.bias_terms[0].shape == (2, 3)
    assert (t.bias_terms[1][1] == 0).all() and (t.bias_terms[2][0] == 0).all() and (t.bias_terms[1][0] != 0).any()

def test_hardtanh_hardsigmoid_complete():
    "Hardtanh with odd levels, Hardsigmoid (z/6 + 1/2 between the levels: a constant 1/2 too), both saturating somewhere"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Hardtanh(-.3, .7), nn.Conv2d(6, 6, 3),
                        nn.Hardsigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double()
    x = 4 * torch.randn(2, 3, 8, 8, dtype=torch.float64)
    net = randomise_norms(net, x).eval()
    t = fg.fullgrad_terms(net, x)
    assert t.kinds == ['out', 'out', 'clamp', 'out', 'clamp', 'out']
    for i in (2, 4): assert (t.bias_terms[i] != 0).float().mean() > 0.1   # saturation (and Hardsigmoid's 1/2) matter
    # 1e-7, not 1e-12: torch's Hardsigmoid backward uses 1/6 in float32 even for float64 (a gradient off by 3e-8)
    assert t.gap.max() < 1e-7 and _rel_err(t) < 1e-6
