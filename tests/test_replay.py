"Maps from the snapshot store equal the in-process maps (timm fused norms, ReLU6 clamps, channels-last norms, tokens); what a step lacks is said; the origin's reading code runs unchanged."
import json, warnings
import pytest, torch
from torch import nn
from fastai.basics import Learner, DataLoaders, set_seed
import fastai.callback.progress
from fastai_saliency.snapshot import SnapshotCallback
from fastai_saliency.store import Trial, TensorUnavailableForStep
from fastai_saliency.methods import fullgrad, gradcam, FullGradGapWarning
import fastai_saliency.replay   # Trial.fullgrad, Trial.gradcam
timm = pytest.importorskip('timm')

def rand_dls(size=32, n=32, c=4, bs=8, scale=3., seed=0):
    g = torch.Generator().manual_seed(seed)
    x,y = scale*torch.randn(n, 3, size, size, generator=g),torch.randint(0, c, (n,), generator=g)
    return DataLoaders.from_dsets(list(zip(x[8:], y[8:])), list(zip(x[:8], y[:8])), bs=bs, device='cpu')

def fit_snap(model, path, n_epoch=1, **kwargs):
    set_seed(0)
    learn = Learner(rand_dls(), model, loss_func=nn.CrossEntropyLoss(), cbs=SnapshotCallback(path, fsync=False, **kwargs))
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore', FullGradGapWarning)
        learn.fit(n_epoch, 1e-3)
    return learn, learn.snapshot.trial()

class NHWCNet(nn.Module):
    "A layer norm on channels-last maps (B,h,w,C): a channels-last FullGrad point, and a channels-last Grad-CAM layer"
    def __init__(self, c=4):
        super().__init__()
        self.conv,self.norm = nn.Conv2d(3, 8, 3, stride=2),nn.LayerNorm(8)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, c))
    def forward(self, x): return self.head(self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

def last_batch(t):
    s = t.explained_steps()[-1]
    return (s, *t.tensors(s, 'valid', ['input', 'target']).values())

@pytest.mark.parametrize('arch,layer,kinds', [
    ('efficientnet_lite0', 'blocks.2', {'pre', 'clamp', 'out'}),    # BatchNormAct2d with ReLU6 inside: 'pre' points and clamps
    ('regnetx_002', 's2', {'pre', 'out'}),                           # BatchNormAct2d with ReLU
    ('nhwc', 'norm', {'out'})])                                      # a layer norm on channels-last maps, as in ConvNeXt
def test_store_maps_equal_in_process_maps(arch, layer, kinds, tmp_path):
    torch.manual_seed(0)
    model = NHWCNet() if arch == 'nhwc' else timm.create_model(arch, pretrained=False, num_classes=4)
    learn,t = fit_snap(model, tmp_path, every=0, include=['input', 'logits', 'target', layer])
    s,x,y = last_batch(t)
    ex = t.meta(s, 'valid')['explained']
    assert {p['kind'] for p in ex['points']} == kinds
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FullGradGapWarning)
        for kw in (dict(), dict(input_term=False, max_stride=8)):
            assert (t.fullgrad(s, **kw) - fullgrad(learn.model, x, target=y, **kw)).abs().max() <= 1e-5, kw
    assert (t.gradcam(layer, s) - gradcam(learn.model, x, layer, target=y)).abs().max() <= 1e-5
    if 'clamp' in kinds:        # the ReLU6 saturates somewhere, so the clamp terms are in the maps
        codes = t.tensors(s, 'valid', [p['code'] for p in ex['points'] if p['kind'] == 'clamp'])
        assert any((c == 2).any() for c in codes.values())
    if arch == 'nhwc': assert [p['channels_last'] for p in ex['points']] == [False, True, False] and ex['layouts']['norm']['fmt'] == 'NHWC'

def test_tokens_layout_stored_and_fullgrad_refused(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=4, img_size=32, patch_size=8, depth=2)
    learn,t = fit_snap(vit, tmp_path, every=0, include=['input', 'logits', 'target', 'blocks.1.norm1'], target='pred')
    s,x,y = last_batch(t)
    ex = t.meta(s, 'valid')['explained']
    assert ex['layouts']['blocks.1.norm1'] == dict(fmt='NLC', prefix=1, grid=[4, 4])
    pred = t.tensor('logits').value(s, 'valid').argmax(1)
    assert torch.equal(t.tensor('explained_class').value(s, 'valid'), pred)
    assert (t.gradcam(step=s) - gradcam(learn.model, x, target=pred)).abs().max() <= 1e-5   # the default layer, stored
    assert (t.gradcam('blocks.1.norm1', s, reshape=(4, 4)) - gradcam(learn.model, x, 'blocks.1.norm1', target=pred, reshape=(4, 4))).abs().max() <= 1e-5
    with pytest.raises(ValueError, match='FullGrad is not defined for a VisionTransformer'): t.fullgrad(s)

def tiny_cnn(c=4):
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, c))

def test_missing_pieces_are_named_with_the_option_that_stores_them(tmp_path):
    _,t = fit_snap(tiny_cnn(), tmp_path/'a', every=2, include=['logits', 'target', '3'], grads=False)
    with pytest.raises(TensorUnavailableForStep, match=r"needs \['input'\].*include=None or \[\.\.\., 'input'\]"): t.fullgrad()
    with pytest.raises(TensorUnavailableForStep, match=r"needs \['3.output_grad'\].*SnapshotCallback\(grads=True\)"): t.gradcam('3')
    with pytest.raises(TensorUnavailableForStep, match=r"layer '4' was not saved.*include=\[\.\.\., '4'\]"): t.gradcam('4')
    with pytest.raises(TensorUnavailableForStep, match="training steps hold the gradients of the loss"): t.gradcam('3', 2, mode='train')
    assert 'grads' not in t.meta(2)                     # grads=False: no gradients claimed
    _,t = fit_snap(tiny_cnn(), tmp_path/'b', every=0, explain=False)
    with pytest.raises(TensorUnavailableForStep, match=r"explain=False\).*Explained valid steps here: \[\]"): t.fullgrad()
    with pytest.raises(TensorUnavailableForStep, match="explain=False"): t.animate()
    _,t = fit_snap(tiny_cnn(), tmp_path/'c', every=0)
    with pytest.raises(ValueError, match=r"explains classes .* not of \[0, 0"): t.fullgrad(target=0)

ORIGIN = '''
trial = create_trial(path)
print(trial.steps(mode=modes.EVAL))
names = trial.tensor_names(regex='.*bn|.*bias|.*downsample')
for step in trial.steps(mode=modes.EVAL):
    for name in names:
        try:
            value = trial.tensor(name).value(step_num=step, mode=modes.EVAL)
        except TensorUnavailableForStep:
            continue
        stats[name] = float(value.abs().mean())
if trial.loaded_all_steps: print("all steps read")
'''

def test_origin_style_reading_runs_unchanged(tmp_path):
    from torchvision.models import resnet18
    _,t = fit_snap(resnet18(num_classes=4), tmp_path, every=2, include='.*bn|.*bias|.*downsample')
    selected = t.info['meta']['layers']               # the origin's regex searches: every bn and downsample module
    assert 'bn1' in selected and 'layer1.0.bn2' in selected and 'layer2.0.downsample.1' in selected and len(selected) == 26
    ns = dict(path=tmp_path, stats={})
    exec('from fastai_saliency.store import create_trial, modes, TensorUnavailableForStep', ns)   # the ported imports
    exec(ORIGIN, ns)
    assert {'bn1.output', 'bn1.output_grad', 'layer2.0.downsample.1.output', 'bn1.running_mean', 'bn1.point_bias'} <= set(ns['stats'])

def test_new_defaults():
    cb = SnapshotCallback('x')
    assert (cb.valid_every, cb.explain, cb.target, cb.max_bytes) == (None, True, 'label', 4*2**30)

def test_inference_steps_are_explained_and_found_by_id(tmp_path):
    "SnapshotCallback(predict_every=1): get_preds batches become 'predict' steps whose store-made maps equal the in-process ones"
    torch.manual_seed(0)
    model = timm.create_model('efficientnet_lite0', pretrained=False, num_classes=4)
    learn,_ = fit_snap(model, tmp_path, every=0, valid_every=0, predict_every=1, include=['input', 'logits', 'blocks.2'])
    dl = learn.dls.valid.new(bs=3, shuffle=False)
    with learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter('ignore', FullGradGapWarning)
        preds,_ = learn.get_preds(dl=dl)
    t = learn.snapshot.predict_trial()
    assert t.steps(mode='predict') == [0, 1, 2] and t.meta(1, 'predict')['ids'] == [3, 4, 5]   # dataset indices
    x = t.tensor('input').value(1, mode='predict')
    assert torch.equal(t.tensor('explained_class').value(1, mode='predict'), preds[3:6].argmax(1))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FullGradGapWarning)
        assert (t.fullgrad(1, mode='predict') - fullgrad(learn.model, x, target=preds[3:6].argmax(1))).abs().max() <= 1e-5
    assert (t.gradcam('blocks.2', 1, mode='predict') - gradcam(learn.model, x, 'blocks.2', target=preds[3:6].argmax(1))).abs().max() <= 1e-5
    assert t.find_items([4, 7, 99]) == {4: (1, 1), 7: (2, 1)}
