"Models users train: timm CNNs and ViTs (tokens, prefix tokens, channels-last), fastai's TimmBody, several outputs, mixed precision and memory format."
import re, warnings, pytest, numpy as np, torch
from torch import nn
from fastai.vision.all import vision_learner, Learner, ConvLayer, Flatten, TensorImage, set_seed
from fastai_saliency.data import synth_signs, synth_signs_dls
from fastai_saliency.hooks import Capture, n_hooks
from fastai_saliency.methods import (feature_layout, to_feature_map, gradcam, gradcam_layers, layer_maps, default_layer,
                                     depth_layers, cam, cam_terms, fullgrad, fullgrad_terms, scale_maps, select_output,
                                     describe_output, ApproximateCAMWarning)
from fastai_saliency.saliency import GradCAMCallback, FullGradCallback
import fastai_saliency.learner   # the Learner methods
timm = pytest.importorskip('timm')

VIT = dict(img_size=32, patch_size=8)                 # 4x4 patch grid on 32 px images

def _timm(arch, seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=4, **kw).eval()

def _out(model, layer, x):
    with Capture(model, [layer], grads=False) as c, torch.no_grad(): model.eval()(x)
    return c.acts[layer]

def _r(a, b):
    "Pearson correlation of two batches of maps"
    a,b = a.flatten().double(),b.flatten().double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

@pytest.fixture(scope='module')
def dls(tmp_path_factory):
    path = synth_signs(tmp_path_factory.mktemp('signs')/'s', n_per_class=4, size=32, seed=0, n_classes=4, valid_pct=0.5)
    return synth_signs_dls(path, bs=4, num_workers=0)

@pytest.fixture(scope='module')
def swin(): return _timm('swin_tiny_patch4_window7_224', img_size=64, depths=(1, 1, 2, 1))

# ---- tokens and channels-last maps
@pytest.mark.parametrize('arch,kw,prefix', [('vit_tiny_patch16_224', dict(depth=2), 1),            # class token
                                            ('deit_tiny_distilled_patch16_224', dict(depth=2), 2), # + distillation token
                                            ('vit_small_patch14_reg4_dinov2', dict(depth=2), 5)])  # + 4 register tokens
def test_tokens_prefix(arch, kw, prefix):
    m = _timm(arch, **VIT, **kw)
    x = torch.randn(2, 3, 32, 32)
    o = _out(m, 'blocks.1', x)
    lay = feature_layout(m, 'blocks.1', o.shape, (32, 32), batch_size=2)
    assert (lay.fmt, lay.prefix, lay.grid) == ('NLC', prefix, (4, 4))
    fm = to_feature_map(o, m, 'blocks.1', (32, 32))
    torch.testing.assert_close(fm[:, :, 1, 2], o[:, prefix + 1*4 + 2])      # token prefix + row*w + col is pixel (row, col)
    pe = _out(m, 'patch_embed', x)                                           # before the prefix tokens are added
    assert feature_layout(m, 'patch_embed', pe.shape, (32, 32)).prefix == 0

def test_tokens_grid_from_input_when_the_model_grid_does_not_match():
    "A ViT with dynamic_img_size on a 48x32 input: 6x4 tokens, not the 4x4 of patch_embed.grid_size"
    m = _timm('vit_tiny_patch16_224', depth=2, dynamic_img_size=True, **VIT)
    x = torch.randn(2, 3, 48, 32)
    lay = feature_layout(m, 'blocks.1.norm1', _out(m, 'blocks.1.norm1', x).shape, x.shape[-2:])
    assert (lay.prefix, lay.grid) == (1, (6, 4)) and 'fits the 48x32 input' in lay.why
    assert gradcam(m, x).shape == (2, 48, 32)

def test_torchvision_vit():
    "Not timm: torchvision's class_token says 1 prefix token; the default layer is the last block's ln_1"
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3)
    assert default_layer(m) == 'encoder.layers.encoder_layer_1.ln_1'
    assert depth_layers(m) == ['encoder.layers.encoder_layer_0.ln_1', 'encoder.layers.encoder_layer_1.ln_1']
    assert gradcam(m, torch.randn(2, 3, 32, 32)).shape == (2, 32, 32)

def test_nhwc_swin_and_knowledge_beats_shape(swin):
    "timm swin is channels-last: stages, blocks, norms NHWC, the patch embedding's conv NCHW; a (1,16,16,16) output is read as the model says"
    x = torch.randn(2, 3, 64, 64)
    for n in ('layers.3', 'layers.0.blocks.0', 'layers.0.blocks.0.norm1', 'patch_embed', 'norm', 'patch_embed.proj'):
        o = _out(swin, n, x)
        assert feature_layout(swin, n, o.shape, (64, 64)).fmt == ('NCHW' if n == 'patch_embed.proj' else 'NHWC'), n
    sw = _timm('swin_tiny_patch4_window7_224', img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    o = _out(sw, 'layers.0', torch.randn(1, 3, 64, 64))
    assert o.shape == (1, 16, 16, 16) and feature_layout(sw, 'layers.0', o.shape, (64, 64)).fmt == 'NHWC'
    cn = _timm('convnext_atto', dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), conv_mlp=False)
    o = _out(cn, 'stages.0', torch.randn(1, 3, 64, 64))
    assert o.shape == (1, 16, 16, 16) and feature_layout(cn, 'stages.0', o.shape, (64, 64)).fmt == 'NCHW'
    maps,sizes = layer_maps(swin, x, ['layers.2', 'layers.3'], 'activation')
    assert sizes == {'layers.2': (4, 4), 'layers.3': (2, 2)}
    torch.testing.assert_close(maps['layers.3'], scale_maps(_out(swin, 'layers.3', x).mean(-1), (64, 64)))

def test_errors_say_what_was_seen(dls, swin):
    learn = vision_learner(dls, 'vit_tiny_patch16_224', pretrained=False, depth=2, **VIT)
    xb = dls.one_batch()[0]
    with pytest.raises(ValueError, match=r"'0' \(TimmBody\) gives \(4, 192\): pooled features \(B, C\) with no spatial grid; "
                                         r"use a layer before the pooling, e.g. '0.model.blocks.1.norm1'"):
        gradcam(learn.model, xb, '0')
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\(WindowAttention\) gives \(18, 49, 96\): its first dimension is not the batch"):
        gradcam(swin, x, 'layers.0.blocks.0.attn')
    with pytest.raises(ValueError, match=r"reshape=\(4, 4\): a grid \(h, w\) is for tokens"): gradcam(swin, x, 'layers.3', reshape=(4, 4))
    with pytest.raises(ValueError, match=r"must return a \(B,C,h,w\) tensor for a \(2, 2, 2, 768\) output, got Tensor \(2, 768\)"):
        gradcam(swin, x, 'layers.3', reshape=lambda o: o.mean((1, 2)))
    vit = _timm('vit_tiny_patch16_224', depth=2, **VIT)
    with pytest.raises(ValueError, match=r"only through its 1 prefix token\(s\).*e.g. 'blocks.1.norm1'"):
        gradcam(vit, torch.randn(2, 3, 32, 32), 'blocks.1')                # class-token pooling: a blank map otherwise

# ---- Grad-CAM on tokens and channels-last maps equals pytorch-grad-cam's
def _pgc(model, layer, x, targets, transform, native=None):
    "pytorch-grad-cam's GradCAM; `native` (h,w): its resize target is the layer's own grid (cv2.resize then copies)"
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    class G(GradCAM):
        def get_target_width_height(self, t): return (native[1], native[0]) if native else super().get_target_width_height(t)
    with G(model=model, target_layers=[layer], reshape_transform=transform) as gc:
        return gc(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in targets])

@pytest.mark.parametrize('arch,kw,prefix', [('vit_tiny_patch16_224', dict(depth=3, img_size=32), 1),
                                            ('vit_small_patch14_reg4_dinov2', dict(depth=2, img_size=48), 5)])
def test_gradcam_tokens_equals_pytorch_grad_cam(arch, kw, prefix):
    pytest.importorskip('pytorch_grad_cam')
    m = _timm(arch, patch_size=8, **kw)
    H = kw['img_size']; g = H//8
    x = torch.randn(3, 3, H, H)
    t = m(x).argmax(1)
    tf = lambda o: o[:, prefix:].reshape(o.shape[0], g, g, o.shape[-1]).permute(0, 3, 1, 2)   # their documented ViT recipe
    layer = m.blocks[-1].norm1
    assert default_layer(m) == f'blocks.{len(m.blocks)-1}.norm1'
    # at input size: theirs scales, then cv2.resize (INTER_LINEAR), then scales; ours F.interpolate (bilinear,
    # align_corners=False) then scales: both half-pixel bilinear, and min-max scaling is affine per image, so they agree
    np.testing.assert_allclose(gradcam(m, x, target=t).numpy(), _pgc(m, layer, x, t, tf), atol=2e-6)
    maps,sizes = layer_maps(m, x, [layer], target=t)
    assert list(sizes.values()) == [(g, g)]

def test_gradcam_nhwc_equals_pytorch_grad_cam(swin):
    pytest.importorskip('pytorch_grad_cam')
    x = torch.randn(2, 3, 64, 64)
    t = swin(x).argmax(1)
    tf = lambda o: o.permute(0, 3, 1, 2)
    np.testing.assert_allclose(gradcam(swin, x, swin.layers[-1], target=t).numpy(), _pgc(swin, swin.layers[-1], x, t, tf), atol=2e-6)

# ---- default layers in fastai's TimmBody, and the Learner one-liners on a ViT
DEFAULTS = dict(resnet18d=({}, 'layer4'), convnext_atto=({}, 'stages.3'), efficientnet_b0=({}, 'bn2'), regnetx_002=({}, 's4'),
                mobilenetv3_small_050=({}, 'blocks.5'), densenet121=({}, 'features.norm5'),
                deit_tiny_distilled_patch16_224=(dict(VIT, depth=2), 'blocks.1.norm1'))

@pytest.mark.parametrize('arch', list(DEFAULTS))
def test_default_layer_bare_and_in_fastai(arch, dls):
    kw,name = DEFAULTS[arch]
    learn = vision_learner(dls, arch, pretrained=False, **kw)
    assert default_layer(_timm(arch, **kw)) == name and default_layer(learn.model) == '0.model.' + name
    assert depth_layers(learn.model) == ['0.model.' + n for n in depth_layers(_timm(arch, **kw))]
    assert learn.gradcam(n=2).shape == (2, 32, 32) and n_hooks(learn.model) == 0

def test_vit_learner_one_liners_and_callback(dls):
    learn = vision_learner(dls, 'vit_tiny_patch16_224', pretrained=False, depth=2, **VIT)
    fig = learn.show_gradcam(n=2)
    assert fig.get_suptitle() == "Grad-CAM at '0.model.blocks.1.norm1'"
    assert list(learn.layer_heatmaps(0)) == ['0.model.blocks.0.norm1', '0.model.blocks.1.norm1']
    with pytest.raises(ValueError, match='no CAM. Use gradcam'): learn.show_cam(n=2)
    with pytest.raises(ValueError, match='FullGrad is not defined for a Sequential with 2 attention blocks'): learn.show_fullgrad(n=2)
    cb = GradCAMCallback(n=2)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
    assert cb.layer == '0.model.blocks.1.norm1' and cb.maps.shape == (2, 2, 32, 32)
    torch.testing.assert_close(cb.maps[-1], gradcam(learn.model, cb.probe_xb, target=cb.labels), atol=2e-3, rtol=0)

# ---- several outputs
class TwoHeads(nn.Module):
    def __init__(self, ret='tuple'):
        super().__init__()
        self.ret = ret
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool,self.head,self.aux = nn.AdaptiveAvgPool2d(1),nn.Linear(8, 4),nn.Linear(8, 4)
    def forward(self, x):
        f = self.pool(self.body(x)).flatten(1)
        y,a = self.head(f),self.aux(f)
        return dict(logits=y, aux=a) if self.ret == 'dict' else (y, a) if self.ret == 'tuple' else y

def test_output_selector_everywhere():
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0); one = TwoHeads('one')
    warnings.simplefilter('ignore', ApproximateCAMWarning)            # the aux head runs after the logits' head
    ref = dict(gc=gradcam(one, x, 'body.3'), fg=fullgrad(one, x), cam=cam(one, x))
    for ret,sel in (('tuple', 0), ('tuple', lambda o: o[0]), ('dict', 'logits')):
        m = TwoHeads(ret); m.load_state_dict(one.state_dict())
        torch.testing.assert_close(gradcam(m, x, 'body.3', output=sel), ref['gc'])
        torch.testing.assert_close(gradcam_layers(m, x, ['body.1', 'body.3'], output=sel)['body.3'], ref['gc'])
        torch.testing.assert_close(fullgrad(m, x, output=sel), ref['fg'])
        torch.testing.assert_close(cam(m, x, output=sel), ref['cam'])
    with pytest.raises(ValueError, match=re.escape("it returned a tuple of 2: Tensor (2, 4), Tensor (2, 4). Pass `output=`")):
        fullgrad(TwoHeads('tuple'), x)
    with pytest.raises(ValueError, match=re.escape("it returned a dict with 2 keys: 'logits': Tensor (2, 4), 'aux': Tensor (2, 4)")):
        gradcam(TwoHeads('dict'), x, 'body.3')
    assert describe_output([torch.ones(1), dict(a=(torch.ones(2), 3))]) == "a list of 2: Tensor (1,), a dict with 1 key: 'a': a tuple"

def test_output_selector_through_the_learner(dls):
    learn = Learner(dls, TwoHeads('dict'), loss_func=lambda o, y: nn.functional.cross_entropy(o['logits'], y))
    ref = gradcam(learn.model, dls.valid.one_batch()[0][:2], 'body.3', output='logits')
    torch.testing.assert_close(learn.gradcam('body.3', items=[0, 1], output='logits'), ref)
    assert learn.show_fullgrad(n=2, output='logits').get_suptitle() == 'FullGrad'

# ---- mixed precision and memory format: float32 maps equal to the float32 model's
def _small_cnn(c=4):
    torch.manual_seed(0)
    return nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 16), ConvLayer(16, 16, stride=2),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(16, c)).eval()

@pytest.mark.parametrize('how', ['bf16 model', 'fp16 model', 'bf16 autocast', 'channels_last'])
def test_precision_and_memory_format(how):
    x = torch.randn(4, 3, 32, 32)
    ref_model = _small_cnn()
    with torch.no_grad(): ref_model(torch.randn(8, 3, 32, 32))       # eval: nothing changes
    ref = dict(gc=gradcam(ref_model, x, '2'), fg=fullgrad(ref_model, x), cam=cam(ref_model, x))
    m = _small_cnn()
    if how.endswith('model'): m = m.to(torch.bfloat16 if how.startswith('bf16') else torch.float16)
    if how == 'channels_last': m,xx = m.to(memory_format=torch.channels_last),x.to(memory_format=torch.channels_last)
    else: xx = x
    ctx = torch.autocast('cpu', dtype=torch.bfloat16) if how == 'bf16 autocast' else torch.autocast('cpu', enabled=False)
    with ctx: out = dict(gc=gradcam(m, xx, '2'), fg=fullgrad(m, xx), cam=cam(m, xx))
    for k in ref:
        assert out[k].dtype == torch.float32, (how, k)
        assert _r(out[k], ref[k]) > 0.99, (how, k, _r(out[k], ref[k]))

@pytest.mark.parametrize('setup', ['to_fp16', 'to_bf16', 'to_channelslast'])
def test_learner_and_callback_under_mixed_precision_and_channels_last(dls, setup):
    "Learner methods and a saliency callback on a learner set up for mixed precision / channels last: float32 maps equal to plain float32 ones"
    def make():
        torch.manual_seed(0)                                   # no BatchNorm: with lr=0 the fit leaves the model as it was
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(inplace=True),
                             nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(16, dls.c))
    ref = Learner(dls, make())
    xb = dls.valid.one_batch()[0][:3]
    want = dict(gc=ref.gradcam('2', items=xb), fg=ref.fullgrad(items=xb))
    learn = Learner(dls, make())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                        # fastai's autocast('cuda') is disabled on a CPU-only machine
        getattr(learn, setup)()
        cb = GradCAMCallback('2', items=xb)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 0., cbs=cb)
    got = dict(gc=learn.gradcam('2', items=xb), fg=learn.fullgrad(items=xb))
    for k in want:
        assert got[k].dtype == torch.float32 and _r(got[k], want[k]) > 0.99, (setup, k)
    assert cb.maps.dtype == torch.float32 and _r(cb.maps[-1], want['gc']) > 0.99
    assert learn.show_gradcam('2', items=xb).get_suptitle() == "Grad-CAM at '2'"
