"Every task fastai trains (issue 17): multi-label, segmentation (U-Net) and point regression, checked against pytorch-grad-cam and FullGrad's completeness"
import pytest, torch, numpy as np
from torch import nn
from fastai.vision.all import DynamicUnet, create_body, resnet18, vision_learner, set_seed
from fastai_saliency.methods import gradcam, default_layer
from fastai_saliency.fullgrad import fullgrad_terms, fullgrad
import fastai_saliency.learner
from fastai_saliency.targets import Target, Region, learn_target, learn_task
from fastai_saliency.test_utils import randomize_bn

torch.set_num_threads(1)
LAYER = '0.6'   # resnet18's layer3: 2x2 at 32 px (layer4 is 1x1 there: a constant map)

def _valid(learn, n=8):
    xb,yb = learn.dls.valid.one_batch()
    return xb[:n].as_subclass(torch.Tensor).cpu(),yb[:n]

def _pgc(model, layer, x, targets):
    "pytorch-grad-cam's GradCAM at `layer` with one of its targets per image"
    from pytorch_grad_cam import GradCAM
    with GradCAM(model=model, target_layers=[layer]) as gc: return gc(input_tensor=x, targets=targets)

def _corr(a, b):
    "Pearson r per image of maps (B,H,W)"
    a,b = [torch.as_tensor(np.asarray(t), dtype=torch.float64).flatten(1) for t in (a, b)]
    a,b = a - a.mean(1, keepdim=True),b - b.mean(1, keepdim=True)
    return (a*b).sum(1) / (a.norm(dim=1)*b.norm(dim=1)).clamp_min(1e-30)

def _check_equal(ours, theirs, min_live=None):
    ours = ours.numpy()
    live = theirs.reshape(len(theirs), -1).max(1) > 0      # a map both libraries leave blank has no r
    assert live.sum() >= (min_live or (len(live) + 1)//2), "most maps must show something, else the comparison says nothing"
    assert (live == (ours.reshape(len(ours), -1).max(1) > 0)).all()
    r = _corr(ours[live], theirs[live])
    assert (r >= 0.99).all(), r
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    print(f"r: min {r.min().item():.6f} over {int(live.sum())} maps; max |diff| {np.abs(ours - theirs).max():.2e}")
    return r

def test_learn_task(task_learners, signs_learner):
    test = {k: learn_task(l) for k,l in task_learners.items()}
    assert test == dict(multi='multi', segment='segment', points='regress')
    assert learn_task(signs_learner) == 'single'
    assert learn_target(task_learners['segment'], 'stop').vocab[:2] == ['background', 'stop']

def test_multilabel_gradcam_equals_pytorch_grad_cam(task_learners):
    pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    learn = task_learners['multi']
    model,(x,y) = learn.model,_valid(learn)
    for k in range(y.shape[1]):      # each label, as a Target of the learner's task, by name and by index
        ours = gradcam(model, x, LAYER, target=learn_target(learn, learn.dls.vocab[k]))
        _check_equal(ours, _pgc(model, model[0][6], x, [ClassifierOutputTarget(k)]*len(x)))
    ours = learn.gradcam(LAYER, items=x, target=None)      # None: the most probable label
    top = model.eval()(x).argmax(1)
    _check_equal(ours, _pgc(model, model[0][6], x, [ClassifierOutputTarget(int(c)) for c in top]))

def test_multilabel_map_weighs_its_own_object(task_learners, scenes_path):
    "Each present label's map weighs its own sign more than the other one as often as pytorch-grad-cam's does"
    pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    import pandas as pd
    from PIL import Image
    learn = task_learners['multi']
    df = pd.read_csv(scenes_path/'scenes.csv').query('is_valid == 1')
    x = torch.cat([learn.dls.test_dl([scenes_path/f for f in df.fname], num_workers=0).one_batch()[0].as_subclass(torch.Tensor)])[:len(df)]
    masks = torch.stack([torch.as_tensor(np.asarray(Image.open(scenes_path/m))) for m in df['mask']]).long()
    vocab = list(learn.dls.vocab)
    wins = dict(ours=[], theirs=[])
    for i,labels in enumerate(df['labels']):
        a,b = [vocab.index(l) for l in labels.split()]
        for own,other in ((a, b), (b, a)):
            mo,mt = masks[i] == own + 1,masks[i] == other + 1
            m1 = gradcam(learn.model, x[i:i+1], LAYER, target=Target(own, 'multi'))[0]
            m2 = torch.as_tensor(_pgc(learn.model, learn.model[0][6], x[i:i+1], [ClassifierOutputTarget(own)])[0])
            for k,m in (('ours', m1), ('theirs', m2)): wins[k].append(bool(m[mo].mean() > m[mt].mean()))
    rate = {k: float(np.mean(v)) for k,v in wins.items()}
    print(f"own object weighs more: ours {rate['ours']:.3f}, pytorch-grad-cam {rate['theirs']:.3f}, {len(wins['ours'])} maps")
    assert wins['ours'] == wins['theirs']

def test_segmentation_gradcam_equals_pytorch_grad_cam(task_learners):
    pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    learn = task_learners['segment']
    model,(x,y) = learn.model,_valid(learn)
    layer = default_layer(model)
    assert layer == 'layers.7'
    with torch.no_grad(): pred = model.eval()(x).argmax(1)
    fg = [c for c in pred.unique().tolist() if c != 0]
    assert fg, 'the U-Net predicts some sign pixels'
    for c in [None] + fg[:2]:
        t = Target(c, 'segment')
        idx = t.indices(model(x).detach())
        ours = learn.gradcam(layer, items=x, target=c)
        theirs = _pgc(model, model.layers[7], x, [SemanticSegmentationTarget(int(k), (pred[i] == k).float().numpy())
                                                  for i,k in enumerate(idx)])
        _check_equal(ours, theirs, None if c is None else 1)     # a class's map is blank where no pixel is predicted as it
    # a region: each image's first sign class over its true mask, as pytorch-grad-cam's target with that mask
    y = y.as_subclass(torch.Tensor).long()
    c = torch.stack([yi[yi > 0].min() for yi in y])
    m = (y == c[:, None, None]).float()
    ours = gradcam(model, x, layer, target=Region(c, mask=m))
    _check_equal(ours, _pgc(model, model.layers[7], x, [SemanticSegmentationTarget(int(c[i]), m[i].numpy()) for i in range(len(x))]))

def test_regression_gradcam_equals_pytorch_grad_cam(task_learners):
    pytest.importorskip('pytorch_grad_cam')
    learn = task_learners['points']
    model,(x,y) = learn.model,_valid(learn)
    for i in range(4):                     # x0, y0, x1, y1
        ours = learn.gradcam(LAYER, items=x, target=i)
        _check_equal(ours, _pgc(model, model[0][6], x, [lambda o, i=i: o[i]]*len(x)))
    with pytest.raises(ValueError, match='this regression model has 4 outputs: pass target='):
        learn.gradcam(LAYER, items=x)

def _f64(model, x):
    randomize_bn(model.double(), x.double())
    return model.double().eval()

def test_fullgrad_complete_on_dynamic_unet():
    "FullGrad of segmentation region scores is complete on fastai's DynamicUnet (resnet18 encoder, PixelShuffle_ICNR, skips, ResizeToOrig) in float64"
    set_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    m = _f64(DynamicUnet(create_body(resnet18(), pretrained=False), 3, (32, 32)), x)
    for t in (None, 1, Region(2, box=(4, 4, 20, 28)), Region(0, mask=torch.ones(32, 32))):
        r = fullgrad_terms(m, x, target=t)
        assert r.gap.max() < 1e-6, (t, r.gap)
        assert r.target_logit.abs().min() > 0
    assert len({n.split('.')[1] for n in r.names if n.startswith('layers.')}) >= 8     # terms from encoder and decoder
    # the gap above is float32 rounding: DynamicUnet's last layer (ToTensorBase) returns float32 logits. Without it, exact
    assert type(m.layers[-1]).__name__ == 'ToTensorBase'
    m.layers[-1] = nn.Identity()
    for t in (None, Region(2, box=(4, 4, 20, 28))): assert fullgrad_terms(m, x, target=t).gap.max() < 1e-12

def test_fullgrad_complete_on_multilabel_and_regression_heads(task_learners):
    for task in ('multi', 'points'):
        learn = task_learners[task]
        import copy
        x = _valid(learn, 4)[0].double()
        m = _f64(copy.deepcopy(learn.model), x)
        r = fullgrad_terms(m, x, target=Target(1, 'multi' if task == 'multi' else 'regress'))
        assert r.gap.max() < 1e-6, (task, r.gap)

# ---- every entry point on every task
@pytest.fixture
def fresh():
    "A learner on the same data, model and loss as a shared one; the model's weights and statistics are restored afterwards"
    from fastai.learner import Learner
    saved = []
    def make(learn):
        saved.append((learn.model, {k: v.clone() for k,v in learn.model.state_dict().items()}))
        return Learner(learn.dls, learn.model, loss_func=learn.loss_func)
    yield make
    for m,sd in saved: m.load_state_dict(sd)

@pytest.mark.parametrize('task', ['multi', 'segment', 'points'])
def test_learner_methods_every_task(task_learners, task):
    import matplotlib.pyplot as plt
    learn = task_learners[task]
    t = 0 if task == 'points' else 1
    for f in (learn.show_gradcam, learn.show_fullgrad):
        fig = f(target=t, n=2); plt.close(fig)
    m = learn.fullgrad(target=None if task == 'segment' else t, n=2)     # a class no pixel is predicted as has a blank map
    assert m.shape == (2, 32, 32) and m.amax((1, 2)).min() == 1
    if task == 'points':
        with pytest.raises(ValueError, match='this regression model has 4 outputs'): learn.show_gradcam(n=2)
    else:
        fig = learn.show_gradcam(n=2)
        if task == 'segment': assert any(a.collections for a in fig.axes)     # the predicted region's outline
        plt.close(fig)
        fig = learn.show_fullgrad(target=learn_target(learn).vocab[2], n=2)
        titles = [a.get_title() for a in fig.axes if a.get_title()]
        assert all(f"map for: {learn_target(learn).vocab[2]}" in s for s in titles), titles
        plt.close(fig)
    if task == 'segment': assert '% of pixels' in titles[0]

@pytest.mark.parametrize('task', ['multi', 'segment', 'points'])
def test_callbacks_every_task(task_learners, task, tmp_path, fresh):
    from fastai_saliency.saliency import GradCAMCallback, FullGradCallback
    from fastai_saliency.snapshot import SnapshotCallback
    from fastai_saliency.store import Trial
    import fastai_saliency.replay, matplotlib.pyplot as plt
    learn = fresh(task_learners[task])
    gc,fg = GradCAMCallback(None if task == 'segment' else LAYER, n=2),FullGradCallback(n=2, input_term=False)
    lay = default_layer(learn.model) if task == 'segment' else LAYER
    snap = SnapshotCallback(tmp_path/'snap', every=0, include=[lay, 'input', 'logits', 'target'])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4, cbs=[gc, fg, snap])
    for cb in (gc, fg):
        assert len(cb.frames) == 2 and cb.maps.shape[1:] == (len(cb.probe_xb), 32, 32)
        assert (cb.maps[-1].amax((1, 2)) > 0).float().mean() >= .5     # maps explain something (Grad-CAM's ReLU may blank one)
        if task == 'multi':                                             # one map per true label of each probe
            assert len(cb.probe_xb) == 4 and cb.probe_of == [0, 0, 1, 1] and (cb.labels.sum(1) == 2).all()
            test_t = cb.targets[-1]
            assert (cb.labels[torch.arange(len(test_t)), test_t] == 1).all()
        if task == 'points': assert cb.targets[-1].tolist() == [0, 1, 2, 3]*2          # every output of each probe
        if task == 'segment':                                             # the most present true class over its true mask
            y = cb.labels
            assert all((y[i] == int(c)).sum() > 0 for i,c in enumerate(cb.targets[-1]))
        plt.close(cb.show_frames())
    tr = Trial(tmp_path/'snap')
    steps = tr.explained_steps('valid')
    assert steps
    info = tr.info['meta']
    assert info['task'] == dict(multi='multi', segment='segment', points='regress')[task]
    m = tr.gradcam(lay, step=steps[-1])
    assert m.amax((1, 2)).max() == 1
    plt.close(tr.animate('gradcam', lay, n=2)._fig)
    x = tr.tensor('input').value(steps[-1], 'valid')
    ex = tr.tensor('explained_class').value(steps[-1], 'valid')
    # the stored step's Grad-CAM equals the live one for the same target
    tgt = Region(ex, mask=tr.tensor('target').value(steps[-1], 'valid') == ex[:, None, None]) if task == 'segment' else ex
    live = gradcam(learn.model, x, lay, target=Target(tgt, learn_task(learn)))
    torch.testing.assert_close(m, live, atol=1e-4, rtol=0)
    torch.testing.assert_close(tr.fullgrad(step=steps[-1]), fullgrad(learn.model, x, target=Target(tgt, learn_task(learn))), atol=1e-4, rtol=0)

@pytest.mark.parametrize('task', ['multi', 'segment'])
def test_top_losses_heatmaps_every_task(task_learners, task):
    import matplotlib.pyplot as plt
    from fastai.interpret import ClassificationInterpretation, SegmentationInterpretation
    learn = task_learners[task]
    interp = (SegmentationInterpretation if task == 'segment' else ClassificationInterpretation).from_learner(learn)
    fig = interp.plot_top_losses(3, heatmap=True, layer=None if task == 'segment' else LAYER)
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    if task == 'segment': assert sum(t in ('true', 'predicted') for t in titles) == 6 and sum('IoU' in t for t in titles) == 3
    else: assert sum(t.startswith('pred: ') for t in titles) == 3 and any('missed' in t or 'not there' in t for t in titles)
    plt.close(fig)
    with pytest.raises(ValueError, match="this learner's task is 'regress'"):
        SegmentationInterpretation.from_learner(task_learners['points']).plot_top_losses(2, heatmap=True)

@pytest.mark.parametrize('task', ['multi', 'segment', 'points'])
def test_deletion_insertion_every_task(task_learners, task):
    "Deletion and insertion score the clean images' target (segmentation: its clean region) on every perturbed copy"
    from fastai_saliency.scoring import perturbation_curve
    from fastai_saliency.targets import fixed_target, target_probability
    learn = task_learners[task]
    model,x = learn.model.eval(),_valid(learn, 3)[0]
    tgt = learn_target(learn, 1 if task == 'points' else None)
    maps = gradcam(model, x, 'layers.7' if task == 'segment' else LAYER, target=tgt)
    with torch.no_grad(): out = model(x).as_subclass(torch.Tensor)
    ft = fixed_target(out, tgt)
    for mode in ('deletion', 'insertion'):
        r = perturbation_curve(model, x, maps, mode, tgt, n_steps=4)
        assert r.curve.shape == (3, 5) and r.curve.isfinite().all()
        end = 0 if mode == 'deletion' else -1                            # the unperturbed image
        torch.testing.assert_close(r.curve[:, end], target_probability(out, ft).float(), atol=1e-5, rtol=1e-5)
        if task != 'points': assert ((r.curve >= 0) & (r.curve <= 1)).all()


def test_forward_methods_score_the_clean_region_in_perturbed_copies():
    "ScoreCAM, AblationCAM and occlusion score copies of an image by the clean image's target: a segmentation's region stays the clean one"
    import torch
    from torch import nn
    from fastai_saliency.targets import fixed_target
    from fastai_saliency.methods import copies_score, gradcam, cam_maps
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(): out = seg(x); pert = seg(x + torch.randn(2, 3, 8, 8))
    fixed = fixed_target(out, 1)
    clean_mask = (out.argmax(1) == 1).float()                      # the pixels predicted as class 1 on the clean images
    assert clean_mask.sum() > 0 and not torch.equal(clean_mask, (pert.argmax(1) == 1).float())
    for i in range(2):
        copies = pert[i:i+1].expand(3, -1, -1, -1)
        want = (copies[:, 1] * clean_mask[i]).sum((1, 2))
        torch.testing.assert_close(copies_score(copies, fixed, i), want)
    # ScoreCAM on the segmentation net runs on the fixed region and gives one map per image
    m = cam_maps(seg, x, '0', 'scorecam', target=1)
    assert m.shape == (2, 8, 8) and torch.isfinite(m).all()
