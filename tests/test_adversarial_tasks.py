"""The attack on every task fastai trains (issue 17): the session's small multi-label, U-Net and points learners
(`task_learners` in conftest.py), attacked through `Learner.adversarial`/`fgsm` with targets as `targets.Target` reads them."""
import pytest, torch
from torch import Tensor
from fastai_saliency.learn_io import items_batch, dls_norm
from fastai_saliency.targets import model_logits, Region, Target, target_probability
from fastai_saliency.adversarial import fgsm, pixel_stats, label_score, attack_target
from fastai_saliency.hooks import n_hooks

ITEMS = list(range(8))

@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def out(learn, x): return model_logits(learn.model, x)

def pixel_change(learn, r):
    mean,std = pixel_stats(dls_norm(learn.dls))
    pix,adv = r.x*std + mean,r.x_adv*std + mean
    return (adv - pix).abs().max().item(),adv.min().item(),adv.max().item()

@pytest.mark.parametrize('task', ['multi', 'segment', 'points'])
def test_eps_is_in_pixel_units_on_every_task(task_learners, task):
    learn = task_learners[task]
    model = learn.model
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    hooks = n_hooks(model)                                               # the U-Net's own skip hooks
    model.train()
    t = dict(multi='yield', segment=Region('yield', box=(0, 0, 16, 16)), points=1)[task]
    for eps,kw in ((2/255, dict()), (8/255, dict(target=t, steps=3)), (8/255, dict(target=t, targeted=False, steps=2, step_size=4/255))):
        r = learn.adversarial(ITEMS[:4] if task == 'segment' else ITEMS, eps=eps, **kw)
        d,lo,hi = pixel_change(learn, r)
        assert eps - 1e-5 <= d <= eps + 1e-5, (kw, eps, d)                # within the budget, and using it
        assert lo >= -1e-5 and hi <= 1 + 1e-5
    assert model.training and n_hooks(model) == hooks
    model.eval()
    assert all((g is None and p.grad is None) or torch.equal(p.grad, g) for p,g in zip(model.parameters(), grads))

def test_multi_label_targeted_raises_the_label_and_untargeted_lowers_it(task_learners):
    learn = task_learners['multi']
    c = learn.dls.vocab.o2i['yield']
    r = learn.adversarial(ITEMS, eps=4/255, target='yield', steps=5)
    p0,p1 = out(learn, r.x).sigmoid()[:, c],out(learn, r.x_adv).sigmoid()[:, c]
    assert (p1 > p0).all(), (p0, p1)
    assert r.task == 'multi' and r.target == c and r.targeted
    p2 = out(learn, learn.adversarial(ITEMS, eps=4/255, target='yield', targeted=False, steps=5).x_adv).sigmoid()[:, c]
    assert (p2 < p0).all(), (p0, p2)
    # no target: away from the labels, by the task's loss (BCE of every label)
    ra = learn.adversarial(ITEMS, eps=4/255)
    assert (label_score(out(learn, ra.x_adv), ra.y, 'multi') < label_score(out(learn, ra.x), ra.y, 'multi')).all()

def test_segmentation_targeted_region_turns_towards_the_class(task_learners):
    learn = task_learners['segment']
    reg = Region('no_entry', box=(0, 0, 16, 16))                         # the top-left quarter, towards no_entry (class 4)
    r = learn.adversarial(ITEMS, eps=8/255, target=reg, steps=6)
    o0,o1 = out(learn, r.x),out(learn, r.x_adv)
    m = reg.masks(o0).bool()
    share = lambda o: ((o.argmax(1) == 4) & m).flatten(1).sum(1) / m.flatten(1).sum(1)
    assert (share(o1) >= share(o0)).all() and share(o1).mean() > share(o0).mean() + 0.01, (share(o0), share(o1))
    t = Target(Region(4, box=reg.box), 'segment')
    assert (target_probability(o1, t) > target_probability(o0, t)).all()
    # untargeted, no target and no labels (files would have none): the most present class, away from it over its region
    xb,_ = items_batch(learn, ITEMS)
    task,ft,_ = attack_target(out(learn, xb), None, 'segment')
    xa = fgsm(learn.model, xb, None, 8/255, steps=3, norm=dls_norm(learn.dls), task='segment')
    assert (target_probability(out(learn, xa), ft) < target_probability(out(learn, xb), ft)).all()
    # with labels: the per-pixel cross-entropy against the masks rises
    ra = learn.adversarial(ITEMS, eps=4/255)
    assert (label_score(out(learn, ra.x_adv), ra.y, 'segment') < label_score(out(learn, ra.x), ra.y, 'segment')).all()

def test_segmentation_errors_name_what_is_wrong(task_learners):
    learn = task_learners['segment']
    xb,_ = items_batch(learn, ITEMS)
    o = out(learn, xb)
    absent = next(k for k in range(o.shape[1]) if not (o.argmax(1) == k).flatten(1).any(1).all())
    with pytest.raises(ValueError, match=r"predicted on no pixel of image\(s\) .*pass target=Region\(c, mask=\.\.\.\)"):
        learn.adversarial(ITEMS, target=absent)
    with pytest.raises(ValueError, match=r"the Region's mask or box covers no pixel"):
        learn.adversarial(ITEMS, target=Region(1, box=(40, 40, 50, 50)))
    with pytest.raises(ValueError, match="a Region explains a segmentation output"):
        task_learners['multi'].adversarial(ITEMS, target=Region(1, box=(0, 0, 8, 8)))

def test_regression_moves_the_output_up_when_targeted_and_down_otherwise(task_learners):
    learn = task_learners['points']
    r_up = learn.adversarial(ITEMS, eps=4/255, target=3, steps=5)
    r_down = learn.adversarial(ITEMS, eps=4/255, target=3, targeted=False, steps=5)
    o0,up,down = out(learn, r_up.x)[:, 3],out(learn, r_up.x_adv)[:, 3],out(learn, r_down.x_adv)[:, 3]
    assert (up > o0).all() and (down < o0).all(), (o0, up, down)
    ra = learn.adversarial(ITEMS, eps=4/255)                             # away from the labels: the squared error rises
    assert (label_score(out(learn, ra.x_adv), ra.y, 'regress') < label_score(out(learn, ra.x), ra.y, 'regress')).all()
    with pytest.raises(ValueError, match=r"target \[4\] out of range: the model has 4 outputs, 0\.\.3"):
        learn.adversarial(ITEMS, target=4)

@pytest.mark.parametrize('task,target,title', [('multi', 'yield', 'map for: yield'), ('segment', Region(1, box=(0, 0, 16, 16)), 'map for: '),
                                               ('points', 2, 'map for: output 2')])
def test_panel_titles_follow_the_task(task_learners, task, target, title):
    import matplotlib.pyplot as plt
    learn = task_learners[task]
    hooks = n_hooks(learn.model)
    fig = learn.show_adversarial([0, 1], eps=4/255, target=target, steps=2)
    assert len(fig.axes) == 2*5 and n_hooks(learn.model) == hooks
    titles = [ax.get_title() for ax in fig.axes]
    assert sum(title in t for t in titles) >= 4, titles                 # clean and attacked, per image
    if task == 'points': assert 'output 2 up' in fig._suptitle.get_text()
    plt.close('all')
