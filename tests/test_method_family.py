"Issue 18: every method by name through every entry point, on a trained fastai learner; the attributions against captum on a timm model."
import copy, contextlib, pytest, torch

@contextlib.contextmanager
def fit_leaves_no_trace(learn):
    "The shared learner's weights and BatchNorm statistics as they were, after a fit in the block"
    state = copy.deepcopy(learn.model.state_dict())
    try:
        with learn.no_bar(), learn.no_logging(): yield
    finally: learn.model.load_state_dict(state)

def pearson(a, b):
    a,b = a.flatten(1).double(),b.flatten(1).double()
    a,b = a - a.mean(1, keepdim=True),b - b.mean(1, keepdim=True)
    return (a*b).sum(1) / (a.norm(dim=1)*b.norm(dim=1)).clamp_min(1e-30)

def test_attributions_equal_captum_on_a_timm_model():
    timm = pytest.importorskip('timm'); captum = pytest.importorskip('captum.attr')
    from fastai_saliency.attributions import (gradient_attr, inputxgrad_attr, integrated_gradients_attr, smoothgrad_attr,
                                              guided_backprop_attr, occlusion_attr)
    from fastai_saliency.test_utils import randomize_bn
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    m = randomize_bn(timm.create_model('resnet10t', num_classes=4, pretrained=False), x)
    t = [1, 3]
    torch.manual_seed(5)
    sg = captum.NoiseTunnel(captum.Saliency(m)).attribute(x, nt_type='smoothgrad', nt_samples=4, stdevs=0.2, target=t, abs=False)
    pairs = dict(gradient=(gradient_attr(m, x, t), captum.Saliency(m).attribute(x, target=t)),
                 inputxgrad=(inputxgrad_attr(m, x, t), captum.InputXGradient(m).attribute(x, target=t)),
                 ig=(integrated_gradients_attr(m, x, t, steps=8), captum.IntegratedGradients(m).attribute(x, target=t, n_steps=8)),
                 smoothgrad=(smoothgrad_attr(m, x, t, samples=4, sigma=0.2, seed=5), sg),
                 guided=(guided_backprop_attr(m, x, t), captum.GuidedBackprop(m).attribute(x, target=t)),
                 occlusion=(occlusion_attr(m, x, t, window=8, stride=8),
                            captum.Occlusion(m).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), target=t)))
    for k,(ours,ref) in pairs.items(): assert pearson(ours, ref).min() >= 0.99, k

@pytest.mark.parametrize('method', ['layercam', 'integrated_gradients'])
def test_saliency_callback_takes_any_name(signs_learner, method):
    from fastai_saliency.saliency import SaliencyCallback
    from fastai_saliency.methods import saliency_maps
    learn = signs_learner
    kw = dict(steps=4) if method == 'integrated_gradients' else {}
    cb = SaliencyCallback(method, n=3, metrics=('insertion',), metric_steps=4, **kw)
    with fit_leaves_no_trace(learn):
        learn.fit(1, 0., cbs=cb)
        expect = saliency_maps(learn.model, cb.probe_xb, method, target=cb._targets[-1].to(cb.probe_xb.device), **kw)
    assert len(cb.frames) == 2 and cb.method_name == {'layercam': 'LayerCAM', 'integrated_gradients': 'Integrated Gradients'}[method]
    torch.testing.assert_close(cb.maps[-1], expect.cpu(), atol=1e-3, rtol=0)     # IG's path points batched differently: rounding

def test_compare_methods_and_its_callback(signs_learner):
    from fastai_saliency.evaluate import MethodComparisonCallback
    from fastai_saliency.scoring import pointing_game
    from fastai_saliency.methods import saliency_maps
    learn = signs_learner
    r = learn.compare_methods(['gradcam', 'eigencam', 'inputxgrad', 'occlusion'], n=4, n_steps=4,
                              method_kwargs=dict(occlusion=dict(window=8, stride=8)))
    assert list(r.table.method) == ['gradcam', 'eigencam', 'inputxgrad', 'occlusion']
    assert r.table[['pointing', 'deletion', 'insertion', 'randomisation']].notna().all().all()
    for n in ('gradcam', 'inputxgrad'):
        m = saliency_maps(learn.model, r.xb.to(learn.dls.device), n, target=r.target.to(learn.dls.device)).cpu()
        assert r.table.set_index('method').loc[n, 'pointing'] == pointing_game(m, r.boxes)
    fig = r.show(n=3)
    assert len([a for a in fig.axes if a.images]) == 4*3
    name = str(learn.dls.vocab[2])                          # a class name: every map explains that class
    r2 = learn.compare_methods(['gradcam'], items=r.xb, metrics=('deletion',), target=name, n_steps=4)
    assert r2.target.tolist() == [2]*len(r.xb)
    with pytest.raises(ValueError, match=r"target='true' is neither 'label', 'pred' nor a class name of the data"):
        learn.compare_methods(['gradcam'], items=r.xb, metrics=('deletion',), target='true')
    cc = MethodComparisonCallback(['gradcam', 'gradient'], n=3, metrics=('insertion',), n_steps=4)
    with fit_leaves_no_trace(learn): learn.fit(1, 0., cbs=cc)
    assert cc.table.epoch.tolist() == [0., 0., 1., 1.] and list(cc.table.method) == ['gradcam', 'gradient']*2
    assert cc.table.insertion.notna().all()
    cc.plot()

def test_plot_top_losses_and_show_saliency_take_any_name(signs_learner):
    from fastai.interpret import ClassificationInterpretation
    import fastai_saliency.learner            # patches plot_top_losses
    learn = signs_learner
    interp = ClassificationInterpretation.from_learner(learn)
    fig = interp.plot_top_losses(2, heatmap=True, method='smoothgrad')
    assert fig.get_suptitle().endswith('SmoothGrad')
    assert learn.show_saliency('eigencam', [0, 1]).get_suptitle().startswith('EigenCAM at ')
    assert learn.saliency('xgradcam', [0, 1, 2]).shape == (3, 32, 32)

def test_watch_draws_a_gradient_only_cam_and_refuses_one_needing_the_model(tmp_path, capsys):
    from test_watch import start_writer, n_frames
    from fastai_saliency.cli import main
    proc = start_writer(tmp_path, 2)
    try: rc = main(['watch', str(tmp_path/'runs'), '--out', str(tmp_path/'evo.gif'), '--n', '2', '--poll', '0.05', '--method', 'layercam'])
    finally: proc.wait(timeout=120)
    assert rc == 0 and n_frames(tmp_path/'evo.gif') == 2
    with pytest.raises(SystemExit): main(['watch', str(tmp_path/'runs'), '--method', 'scorecam'])
    assert "invalid choice: 'scorecam'" in capsys.readouterr().err
