"Saliency methods on real fastai batches: TensorImage, inside validation (no_grad), frozen layers, state kept, autocast, device."
import warnings, pytest, torch
from torch import nn
from fastai.vision.all import vision_learner, resnet18, Callback, TensorImage, CancelValidException
from fastai_saliency.data import synth_signs, synth_signs_dls
from fastai_saliency.hooks import n_hooks
from fastai_saliency.methods import (gradcam, cam, cam_terms, fullgrad, fullgrad_terms, ApproximateCAMWarning,
                                     last_conv_block)

@pytest.fixture(scope='module')
def learn(tmp_path_factory):
    torch.manual_seed(0)
    path = synth_signs(tmp_path_factory.mktemp('signs')/'s', n_per_class=4, size=32, seed=0, n_classes=8, valid_pct=0.5)
    return vision_learner(synth_signs_dls(path, bs=8, num_workers=0), resnet18, pretrained=False)

def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()], n_hooks(model))

def _same_state(a, b):
    assert a[0] == b[0] and a[1] == b[1] and b[3] == 0
    for g0,g1 in zip(a[2], b[2]): assert (g0 is None and g1 is None) or torch.equal(g0, g1)

def _all_methods(model, xb):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ApproximateCAMWarning)   # fastai's default head: CAM is a linearisation
        return dict(gradcam=gradcam(model, xb, '0.7'), cam=cam(model, xb), fullgrad=fullgrad(model, xb))

def test_tensorimage_batch_frozen_body_state_kept(learn):
    xb,yb = learn.dls.one_batch()
    assert isinstance(xb, TensorImage)
    learn.freeze()
    learn.model.train()
    learn.model(xb).sum().backward()                      # the head has gradients, the frozen body none
    before = _state(learn.model)
    with torch.no_grad(): maps = _all_methods(learn.model, xb)
    _same_state(before, _state(learn.model))
    for k,m in maps.items():
        assert type(m) is torch.Tensor and m.shape == (len(xb), 32, 32), k
        assert m.min() >= 0 and m.max() <= 1 and not m.isnan().any(), k
    # a TensorImage and the plain tensor give the same maps
    plain = _all_methods(learn.model, xb.as_subclass(torch.Tensor))
    for k in maps: torch.testing.assert_close(maps[k], plain[k])
    learn.unfreeze(); learn.model.zero_grad(set_to_none=True)

def test_inside_fastai_validation(learn):
    "Validation runs under no_grad: a callback computing every map there works and leaves the model alone"
    class Probe(Callback):
        def after_batch(self):
            assert not torch.is_grad_enabled()
            self.before = _state(self.learn.model)
            self.maps = _all_methods(self.learn.model, self.learn.xb[0])
            self.terms = fullgrad_terms(self.learn.model, self.learn.xb[0], target=self.learn.yb[0])
            self.after = _state(self.learn.model)
            raise CancelValidException()
    probe = Probe()
    learn.validate(cbs=probe)
    _same_state(probe.before, probe.after)
    t = probe.terms
    total = t.input_term.sum((1, 2, 3)) + sum(b.flatten(1).sum(1) for b in t.bias_terms)
    torch.testing.assert_close(total, t.target_logit, rtol=1e-3, atol=1e-3)   # float32: completeness to rounding
    assert probe.maps['fullgrad'].shape[0] == len(learn.dls.valid.one_batch()[0])

def test_cam_default_head_is_marked_approximate(learn):
    xb,_ = learn.dls.one_batch()
    r = cam_terms(learn.model, xb)
    assert (r.layer, r.pool, r.exact) == ('0', '1.0', False)
    torch.testing.assert_close(r.map.sum((1, 2)) + r.bias, r.target_logit)
    with pytest.warns(ApproximateCAMWarning, match='linearises'): cam(learn.model, xb)

def test_bf16_autocast(learn):
    xb,_ = learn.dls.one_batch()
    ref = _all_methods(learn.model, xb)
    with torch.autocast('cpu', dtype=torch.bfloat16): maps = _all_methods(learn.model, xb)
    for k,m in maps.items():
        assert m.dtype == torch.float32 and not m.isnan().any() and m.max() <= 1, k
        assert (m - ref[k]).abs().mean() < 0.1, k

def test_last_conv_block(learn):
    assert last_conv_block(learn.model) == '0.7'
    from torchvision.models import resnet18 as tv_resnet18
    assert last_conv_block(tv_resnet18()) == 'layer4'
    assert last_conv_block(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())) == '2'
    with pytest.raises(ValueError, match='no convolution'): last_conv_block(nn.Sequential(nn.Linear(3, 3)))

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_model_cpu_batch(learn):
    model = learn.model.cuda()
    try:
        xb,_ = learn.dls.one_batch()
        maps = _all_methods(model, xb.cpu())
        for k,m in maps.items(): assert m.device.type == 'cuda', k
        with torch.autocast('cuda', dtype=torch.float16): half = _all_methods(model, xb.cpu())
        for k,m in half.items(): assert m.dtype == torch.float32 and not m.isnan().any(), k
    finally: learn.model.cpu()
