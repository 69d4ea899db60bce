"""`ClassificationInterpretation.plot_top_losses(heatmap=True)` and `plot_confused_heatmaps` on a small trained learner;
fastai's own plot where `heatmap` is False."""
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np, pytest, torch
from fastai.interpret import Interpretation, ClassificationInterpretation
from fastai_saliency import methods
from fastai_saliency.hooks import n_hooks
from fastai_saliency.learn_io import items_batch, dls_norm
from fastai_saliency.plot import blend
import fastai_saliency.learner   # the patches

@pytest.fixture(scope='module')
def interp(signs_learner):
    with signs_learner.no_bar(): return ClassificationInterpretation.from_learner(signs_learner)

def titles(fig): return [a.get_title() for a in fig.axes]

def test_without_heatmap_it_is_fastais_plot(interp):
    assert ClassificationInterpretation.plot_top_losses.fastai_original is Interpretation.plot_top_losses
    plt.close('all')
    interp.plot_top_losses(4)
    ours = titles(plt.gcf()); plt.close('all')
    Interpretation.plot_top_losses(interp, 4)
    assert titles(plt.gcf()) == ours and len([t for t in ours if t]) == 4
    plt.close('all')
    interp.plot_top_losses(4, ncols=4, cmap='gray')                # fastai's own keyword arguments reach it
    assert len({round(a.get_position().y0, 3) for a in plt.gcf().axes if a.images}) == 1     # one row of four
    plt.close('all')

@pytest.mark.parametrize('method,layer', [('gradcam', '0.6'), ('fullgrad', None)])
def test_heatmaps_of_predicted_and_true_class(interp, signs_learner, method, layer):
    learn = signs_learner
    losses,idx = interp.top_losses(3)
    fig = interp.plot_top_losses(3, heatmap=True, method=method, layer=layer, ncols=3)
    xt,yt = items_batch(learn, idx.tolist())
    with torch.no_grad(): pred = learn.model.eval()(xt).argmax(1)
    fn = (lambda t: methods.gradcam(learn.model, xt, layer, target=t)) if method == 'gradcam' else \
         (lambda t: methods.fullgrad(learn.model, xt, target=t))
    mp,mt = fn(pred),fn(yt)
    axs = fig.axes
    assert len(axs) == 9
    for j in range(3):
        assert axs[3*j].get_title().startswith(f"{learn.dls.vocab[pred[j]]}/{learn.dls.vocab[yt[j]]} / {losses[j].item():.2f}")
        np.testing.assert_allclose(axs[3*j + 1].images[0].get_array(), blend(xt[j], mp[j], 'jet', .5, dls_norm(learn.dls)), atol=1e-5)
        if pred[j] != yt[j]:
            np.testing.assert_allclose(axs[3*j + 2].images[0].get_array(), blend(xt[j], mt[j], 'jet', .5, dls_norm(learn.dls)), atol=1e-5)
        else: assert not axs[3*j + 2].images
    assert n_hooks(learn.model) == 0
    plt.close('all')

def test_smallest_losses_show_no_true_class_map(interp):
    "Right predictions (the smallest losses) have one map; k as a list picks ranks"
    fig = interp.plot_top_losses(2, largest=False, heatmap=True)
    assert [len(a.images) for a in fig.axes] == [1, 1, 0, 1, 1, 0]
    fig = interp.plot_top_losses([0, 2], heatmap=True, ncols=1, method=lambda model, xb, t: xb.mean(1).sigmoid())
    assert len(fig.axes) == 6 and 'Probability, <lambda>' in fig.get_suptitle()
    plt.close('all')

def test_confused_pairs(interp):
    pairs = interp.most_confused()[:2]
    fig = interp.plot_confused_heatmaps(n_pairs=2, n_images=2, layer='0.6')
    assert len(fig.axes) == 12
    for row,(a,p,_) in enumerate(pairs): assert fig.axes[6*row].get_title().startswith(f"{a} -> {p}\n")
    with pytest.raises(ValueError, match='no two classes are confused 1000 times'): interp.plot_confused_heatmaps(min_val=1000)
    with pytest.raises(ValueError, match="method must be one of 'gradcam', 'cam', 'hirescam'"): interp.plot_top_losses(2, heatmap=True, method='grad')
    plt.close('all')
