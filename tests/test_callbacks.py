"SaliencyCallback / FullGradCallback / GradCAMCallback in real fits: with other callbacks, fine_tune, export, files, errors."
import warnings
import pytest, torch
from torch import nn
from fastai.vision.all import (Learner, vision_learner, resnet18, ConvLayer, Flatten, set_seed, accuracy, load_learner,
                               CancelFitException, Callback)
from fastai_saliency.data import synth_signs, synth_signs_dls, read_boxes
from fastai_saliency.hooks import n_hooks
from fastai_saliency.methods import fullgrad, gradcam
from fastai_saliency.saliency import SaliencyCallback, FullGradCallback, GradCAMCallback
from fastai_saliency.snapshot import SnapshotCallback
from fastai_saliency.store import Trial

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope='module')
def signs(tmp_path_factory):
    return synth_signs(tmp_path_factory.mktemp('signs')/'s', n_per_class=10, size=32, n_classes=6, seed=1)

def tiny(c):
    return nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 16, stride=2), nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(16, c))

def dls_of(path, bs=8): return synth_signs_dls(path, bs=bs, num_workers=0)

def test_with_snapshot_callback_both_runs_readable(signs, tmp_path):
    "Snapshots and saliency frames in one fit, each in its own store; Trial reads both; no hooks left"
    dls = dls_of(signs)
    cbs = [SnapshotCallback(tmp_path/'snaps', every=2, valid_every=0), FullGradCallback(n=3, store=tmp_path/'sal')]
    learn = Learner(dls, tiny(dls.c), cbs=cbs)
    learn.fit(2, 1e-2)
    assert n_hooks(learn.model) == 0
    n = len(dls.train)
    assert Trial(tmp_path/'snaps').steps(mode='train') == list(range(0, 2*n, 2))
    tr = Trial(tmp_path/'sal')
    assert tr.steps(mode='predict') == [0, n, 2*n] and tr.loaded_all_steps
    assert tr.step_info(n, mode='predict')['epoch'] == pytest.approx(1.0)

def test_fine_tune_keeps_frames_of_both_fits(signs):
    dls = dls_of(signs)
    learn = vision_learner(dls, resnet18, pretrained=False, cbs=GradCAMCallback('0.5', n=2))
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-3, freeze_epochs=1)
    cb = learn.grad_cam
    n = len(dls.train)
    assert [f['iteration'] for f in cb.frames] == [0, n, 2*n]
    assert cb.epochs == [0, 1, 2]
    torch.testing.assert_close(cb.maps[-1], gradcam(learn.model, cb.probe_xb, '0.5', target=cb.labels), atol=2e-3, rtol=0)

def test_export_and_load_learner(signs, tmp_path):
    "learn.export() works with the callback attached (the probe batch and writer are not pickled)"
    dls = dls_of(signs)
    learn = Learner(dls, tiny(dls.c), cbs=FullGradCallback(n=2, store=tmp_path/'sal'), path=tmp_path)
    learn.fit(1, 1e-2)
    learn.export('m.pkl')
    new = load_learner(tmp_path/'m.pkl')
    assert isinstance(new.full_grad, FullGradCallback) and new.full_grad.probe_xb is None and new.full_grad.writer is None

def test_probes_from_files_use_predicted_class(signs):
    "Probe files have no label: the maps explain the predicted class"
    dls = dls_of(signs)
    df = read_boxes(signs)
    files = [signs/f for f in df.fname[:3]]
    learn = Learner(dls, tiny(dls.c), cbs=FullGradCallback(items=files))
    learn.fit(1, 1e-2)
    cb = learn.full_grad
    assert cb.labels is None and cb.item_idxs is None and cb.maps.shape == (2, 3, 32, 32)
    assert torch.equal(cb.targets, cb.preds)

def test_bad_layer_fails_before_training_with_no_hooks(signs):
    dls = dls_of(signs)
    learn = Learner(dls, tiny(dls.c), cbs=GradCAMCallback('layer9'))
    with pytest.raises(ValueError, match="no layer 'layer9'"): learn.fit(1, 1e-2)
    assert n_hooks(learn.model) == 0 and learn.grad_cam.frames == []

def test_cancelled_fit_keeps_frames_and_store_without_end_marker(signs, tmp_path):
    dls = dls_of(signs)
    class Stop(Callback):
        def before_epoch(self):
            if self.epoch == 1: raise CancelFitException()
    learn = Learner(dls, tiny(dls.c), cbs=[FullGradCallback(n=2, store=tmp_path/'sal'), Stop()])
    learn.fit(3, 1e-2)
    assert len(learn.full_grad.frames) == 2
    tr = Trial(tmp_path/'sal')
    assert tr.steps(mode='predict') == [0, len(dls.train)] and not tr.loaded_all_steps   # the run did not end

def test_target_per_probe_and_custom_method(signs):
    dls = dls_of(signs)
    calls = []
    def energy(model, xb, target):
        calls.append(target.tolist())
        return xb.float().pow(2).sum(1)
    learn = Learner(dls, tiny(dls.c), cbs=SaliencyCallback(energy, items=[0, 1], target=[2, 3]))
    learn.fit(1, 1e-2)
    assert calls == [[2, 3], [2, 3]] and learn.saliency.method_name == 'energy'
    m = learn.saliency.maps[0]
    assert torch.allclose(m, learn.saliency.probe_xb.float().pow(2).sum(1).half().float())

def test_target_by_class_name(signs):
    "A class name as target explains that class in every probe; a name the data lacks is refused before any batch"
    dls = dls_of(signs)
    calls = []
    def energy(model, xb, target):
        calls.append(target.tolist())
        return xb.float().pow(2).sum(1)
    learn = Learner(dls, tiny(dls.c), cbs=SaliencyCallback(energy, items=[0, 1], target=str(dls.vocab[3])))
    learn.fit(1, 1e-2)
    assert calls == [[3, 3], [3, 3]]
    learn = Learner(dls, tiny(dls.c))
    w = [p.detach().clone() for p in learn.model.parameters()]
    for bad in ('true', 'Stop'):
        with pytest.raises(ValueError, match=rf"target='{bad}' is neither 'label', 'pred' nor a class name of the data: \['"):
            learn.fit(1, 1e-2, cbs=FullGradCallback(n=2, target=bad))
    assert n_hooks(learn.model) == 0 and all(torch.equal(a, b) for a,b in zip(w, learn.model.parameters()))   # no batch ran

def test_frames_do_not_depend_on_the_other_callbacks(signs):
    "The same seed gives the same frames alone and beside another saliency callback"
    def run(cbs):
        set_seed(3)
        dls = dls_of(signs)
        learn = Learner(dls, tiny(dls.c), cbs=cbs)
        with learn.no_logging(): learn.fit(2, 1e-2)
        return learn
    a = run([FullGradCallback(n=3)])
    b = run([FullGradCallback(n=3), GradCAMCallback('1', every=1, n=4)])
    assert torch.equal(a.full_grad.maps, b.full_grad.maps)

def test_metrics_over_fine_tune_and_export(signs, tmp_path):
    "Scores of every frame of both fits of fine_tune; the callback with its metrics pickles with learn.export()"
    dls = dls_of(signs)
    cb = GradCAMCallback('0.5', n=2, metrics=('pointing', 'deletion'), metric_steps=4)
    learn = vision_learner(dls, resnet18, pretrained=False, cbs=cb, path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-3, freeze_epochs=1)
    assert cb.metrics.epoch.tolist() == [0, 1, 2] and cb.scores['deletion'].shape == (3, 2)
    assert cb.metrics.deletion.between(0, 1).all() and set(cb.scores['pointing'].unique().tolist()) <= {0., 1.}
    learn.export('m.pkl')
    new = load_learner(tmp_path/'m.pkl')
    assert new.grad_cam.metrics.equals(cb.metrics)

def test_tensorboard_frames_and_no_frames_in_exports(signs, tmp_path):
    "Each frame's overlay grid and scores reach TensorBoard (read back); frames stay bounded in memory and out of learn.export()"
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    dls = dls_of(signs)
    cb = GradCAMCallback('1', n=3, every=1, log_dir=tmp_path/'tb', metrics='pointing', max_frames=5, store=tmp_path/'all')
    learn = Learner(dls, tiny(dls.c), cbs=cb, path=tmp_path)
    learn.fit(2, 1e-2)
    n = 1 + 2*len(dls.train)
    ea = EventAccumulator(str(tmp_path/'tb'), size_guidance={'images': 0, 'scalars': 0}).Reload()
    assert len(ea.Images('saliency/Grad-CAM')) == n and len(ea.Scalars('saliency/Grad-CAM/pointing')) == n
    assert len(cb.frames) <= 5 and cb.frames[0]['iteration'] == 0 and cb.frames[-1]['iteration'] == n - 1
    assert len(Trial(tmp_path/'all').steps(mode='predict')) == n
    learn.export('m.pkl')
    new = load_learner(tmp_path/'m.pkl')
    assert new.grad_cam.frames == cb.frames and len(new.grad_cam.maps) == 0     # the numbers, not the maps
