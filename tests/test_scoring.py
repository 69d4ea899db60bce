"""Scoring maps against independent implementations: pytorch-grad-cam's perturbation metric and Quantus' PixelFlipping
and MPRT (test-only dependencies; each test is skipped with the reason where the library is missing)."""
import warnings
from functools import partial
import numpy as np, pytest, torch
from torch import nn
from fastai_saliency.methods import gradcam
from fastai_saliency.scoring import perturbation_curve, pixel_order, randomisation_check, deletion_auc, insertion_auc

def tiny_cnn(n_classes=4, seed=0):
    "A small conv net with batchnorms (random running statistics) and a linear head, in eval mode"
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(16, n_classes))
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-.5, .5); bn.running_var.uniform_(.5, 2.); bn.weight.data.uniform_(.5, 1.5)
    return m.eval()

@pytest.fixture
def xb():
    torch.manual_seed(1)
    return torch.randn(4, 3, 48, 48)

def rank_map(maps):
    "The maps with their ties broken as `pixel_order` breaks them: distinct values, the same order (other libraries sort ties otherwise)"
    B,H,W = maps.shape
    o = pixel_order(maps)
    return (torch.empty(B, H*W).scatter_(1, o, torch.arange(H*W, 0, -1).float().expand(B, -1))/(H*W)).view(B, H, W)

def gradcam_lib_point(m, xb, maps, targets, k, n, mode, imputer):
    "pytorch-grad-cam's target score with the pixels of step k of n removed (deletion) or kept (insertion)"
    from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric, RemoveMostRelevantFirst,
                                                                  RemoveLeastRelevantFirst)
    N = maps[0].numel()
    c = int(round(k*N/n))                                  # pixels deleted (inserted) at step k
    kept = N - c if mode == 'deletion' else c
    p = min(100., max(0., 100*(kept - .5)/(N - 1)))        # np.percentile's index halfway between two distinct values
    pert = (RemoveMostRelevantFirst if mode == 'deletion' else RemoveLeastRelevantFirst)(p, imputer)
    return PerturbationConfidenceMetric(pert)(xb, maps.numpy(), targets, m, return_diff=False)

def test_deletion_insertion_equal_pytorch_grad_cam(xb):
    "Every point of both curves equals pytorch-grad-cam's score (zero imputer for deletion, cv2 blur for insertion)"
    pytest.importorskip('pytorch_grad_cam', reason='pytorch-grad-cam (grad-cam in requirements-dev.txt) is not installed')
    cv2 = pytest.importorskip('cv2')
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    m = tiny_cnn()
    maps = rank_map(gradcam(m, xb, '2'))
    n = 8
    d = perturbation_curve(m, xb, maps, 'deletion', n_steps=n)
    i = perturbation_curve(m, xb, maps, 'insertion', n_steps=n, blur_sigma=5.)
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in d.target]
    def blur_imputer(x, mask):                             # x (C,H,W), mask 1 = keep: the same blur as gaussian_blur
        b = cv2.GaussianBlur(x.permute(1, 2, 0).numpy(), (31, 31), 5., borderType=cv2.BORDER_REFLECT_101)
        return x*mask + torch.from_numpy(b).permute(2, 0, 1)*(1 - mask)
    # the library cannot express "nothing removed" (percentile 100 still removes the top pixel): that end is ours alone
    for k in range(1, n + 1):
        s = gradcam_lib_point(m, xb, maps, targets, k, n, 'deletion', lambda x, mask: x*mask)
        assert np.abs(s - d.curve[:, k].numpy()).max() < 1e-6, k
    for k in range(0, n):
        s = gradcam_lib_point(m, xb, maps, targets, k, n, 'insertion', blur_imputer)
        assert np.abs(s - i.curve[:, k].numpy()).max() < 1e-5, k

def quantus_or_skip():
    return pytest.importorskip('quantus', reason='quantus (requirements-xcheck.txt, installed with --no-deps) is not installed')

def test_deletion_equals_quantus_pixel_flipping(xb):
    "Quantus' PixelFlipping with a 0 baseline is our deletion curve after its first point; the areas agree once put alike"
    quantus = quantus_or_skip()
    m = tiny_cnn()
    maps = rank_map(gradcam(m, xb, '5'))
    r = perturbation_curve(m, xb, maps, n_steps=48, baseline=0.)
    pf = quantus.PixelFlipping(features_in_step=3*48, perturb_baseline=0.0, disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        q = np.array(pf(model=m, x_batch=xb.numpy(), y_batch=r.target.numpy(), a_batch=maps.numpy()[:, None],
                        channel_first=True, device='cpu'))
    c = r.curve.double().numpy()
    assert q.shape == (4, 48) and np.abs(q - c[:, 1:]).max() < 1e-6
    # Quantus' area is np.trapz(curve, dx=1) over the points after the first (its own call needs np.trapz, gone in numpy 2)
    q_auc = np.trapezoid(q, dx=1, axis=1)
    assert np.allclose((q_auc + (c[:, 0] + c[:, 1])/2)/48, r.auc.numpy(), atol=1e-6)

def test_randomisation_equals_quantus_mprt(xb):
    "Quantus' MPRT (top down) and ours with its granularity and seeding: the same correlations; NaN where ours counts 0"
    quantus = quantus_or_skip()
    m = tiny_cnn()
    meth = partial(gradcam, layer='5')
    # Quantus re-seeds torch.manual_seed(seed + 1) before every module's reset_parameters
    ours = randomisation_check(m, xb, meth, layers='modules',
                               reinit=lambda n, mod, i, s: (torch.manual_seed(43), mod.reset_parameters()))
    def explain(model, inputs, targets, **kw):
        return meth(model, torch.as_tensor(inputs), target=torch.as_tensor(targets)).numpy()[:, None]
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        q = quantus.MPRT(seed=42, disable_warnings=True)(model=m, x_batch=xb.numpy(), y_batch=ours.target.numpy(),
                                                        a_batch=meth(m, xb).numpy()[:, None], explain_func=explain,
                                                        channel_first=True, device='cpu')
    torch.set_rng_state(rng)                               # Quantus leaves the global RNG re-seeded
    names = [k for k in q if k != 'original']
    assert names == ours.layers
    qc = np.array([q[k] for k in names])
    nan = np.isnan(qc)
    assert (nan == (ours.constant | ours.orig_constant).numpy()).all() and (ours.corr.numpy()[nan] == 0).all()
    assert np.abs(qc[~nan] - ours.corr.numpy()[~nan]).max() < 1e-6

def test_on_a_trained_fastai_model(signs_learner):
    """On vision_learner's resnet18 (BatchNorm1d head, TensorImage batches): areas in [0,1], a full cascade, the model
    left as it was"""
    learn = signs_learner
    xb,_ = learn.dls.valid.one_batch()
    xb = xb[:6]
    training = [mod.training for mod in learn.model.modules()]
    maps = gradcam(learn.model, xb, '0.5')
    d,i = deletion_auc(learn.model, xb, maps, n_steps=8),insertion_auc(learn.model, xb, maps, n_steps=8)
    assert d.shape == i.shape == (6,) and ((d >= 0) & (d <= 1) & (i >= 0) & (i <= 1)).all()
    r = randomisation_check(learn.model, xb, partial(gradcam, layer='0.5'))
    assert len(r.layers) == 11 and not torch.isnan(r.corr).any()
    assert [mod.training for mod in learn.model.modules()] == training
