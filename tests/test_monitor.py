"PredictionMonitor and ClassImbalance: the origin's numbers, the rules' edges, callbacks on a real Learner, capture under faults, bad input."
import json, math, os, pickle, signal, subprocess, sys, textwrap, threading, time, warnings
from datetime import datetime
import numpy as np
import pytest, torch
from torch import nn
import torch.nn.functional as F
from fastai.basics import Learner, DataLoaders, set_seed, CrossEntropyLossFlat
import fastai.callback.progress   # Learner.no_bar
from fastai_saliency.monitor import PredictionMonitor, ClassImbalance, MonitorWarning, MonitorReport, Violation
from fastai_saliency.capture import read_capture, capture_files
from fastai_saliency.snapshot import SnapshotCallback
from fastai_saliency.store import Trial

GTSRB = [f'sign {i}' for i in range(43)]; GTSRB[14] = 'Stop'

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "The test machines are small and shared: one torch thread avoids oversubscription"
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def origin_probs(seed=0):
    "400 confident predictions over 43 classes, 322 of them class 14"
    g = torch.Generator().manual_seed(seed)
    preds = torch.cat([torch.full((322,), 14), torch.randint(0, 14, (78,), generator=g)])
    return torch.full((400, 43), 0.1/42).scatter_(1, preds[:, None], 0.9)

def monitor_warnings(caught): return [w for w in caught if issubclass(w.category, MonitorWarning)]

# ---------------------------------------------------------------- PredictionMonitor rules

@pytest.mark.parametrize('vocab,cls', [(GTSRB, "Class 14 ('Stop')"), (None, 'Class 14')])
@pytest.mark.parametrize('as_numpy', [False, True])
def test_origin_numbers(vocab, cls, as_numpy):
    mon = PredictionMonitor(vocab=vocab)
    for chunk in origin_probs().split(50): mon.update(chunk.numpy() if as_numpy else chunk)
    rep = mon.report()
    assert isinstance(rep, MonitorReport) and rep.total == 400 and rep.counts[14] == 322
    assert sum(rep.counts.values()) == 400 and len(rep.counts) == 43
    assert len(rep.violations) == 1
    v = rep.violations[0]
    assert isinstance(v, Violation) and (v.kind, v.cls) == ('overpredicted', 14)
    assert v.value == pytest.approx(0.805)
    assert v.message == f"{cls} predicted 80.5% of the time, above the 50% threshold"
    assert v.message in repr(rep) and str(v) == v.message
    d = json.loads(json.dumps(rep.to_dict()))
    assert d['counts']['14'] == 322 and d['violations'][0]['kind'] == 'overpredicted'

def test_threshold_is_strict_and_several_classes_can_be_flagged():
    mon = PredictionMonitor()
    mon.update(torch.eye(2)[[0, 0, 1, 1]])                       # exactly 50%: not above
    assert mon.report().ok
    mon = PredictionMonitor(threshold=0.25)
    mon.update(torch.eye(4)[[0]*3 + [1]*4 + [2]*2 + [3]])
    assert [(v.cls, v.value) for v in mon.report().violations] == [(1, .4), (0, .3)]

def test_low_confidence_rule():
    conf,flat = torch.eye(5)[torch.arange(90) % 5]*0.9 + 0.02, torch.full((1, 5), .2)
    mon = PredictionMonitor()
    mon.update(conf); mon.update(flat.expand(10, 5))              # 10 of 100: exactly the limit, not above
    assert mon.report().ok
    mon.update(flat)                                               # 11 of 101
    rep = mon.report()
    assert rep.kinds() == ['low_confidence']
    v = rep.violations[0]
    assert v.cls is None and v.value == pytest.approx(11/101) and rep.low_confidence == pytest.approx(11/101)
    assert v.message == "10.9% of predictions have their top 3 probabilities all under 50%, above the 10% limit"
    # a prediction at exactly min_confidence is confident; min_confidence and max_low_confidence are honoured
    mon = PredictionMonitor(min_confidence=0.6, max_low_confidence=0.5)
    mon.update(torch.tensor([[.6, .4], [.55, .45], [.59, .41]]))
    assert mon.report().low_confidence == pytest.approx(2/3) and mon.report().kinds() == ['overpredicted', 'low_confidence']

def test_from_logits_and_reset():
    logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(1))
    mon = PredictionMonitor(from_logits=True)
    mon.update(logits)
    assert mon.report().counts == {i: int(n) for i,n in enumerate(torch.bincount(logits.argmax(1), minlength=7))}
    with pytest.raises(ValueError, match='from_logits=True'): PredictionMonitor().update(logits)
    mon.reset()
    assert mon.report().total == 0 and mon.report().ok

def test_report_plot():
    import matplotlib.pyplot as plt
    mon = PredictionMonitor(vocab=GTSRB); mon.update(origin_probs())
    ax = mon.report().plot()
    bars = ax.patches
    assert len(bars) == 43 and bars[14].get_height() == 322
    assert bars[14].get_facecolor() != bars[0].get_facecolor()    # the flagged class stands out
    plt.close('all')

def test_updates_from_threads_are_all_counted():
    mon = PredictionMonitor()
    p = torch.eye(3)[[0, 1, 2, 2]]
    ts = [threading.Thread(target=lambda: [mon.update(p) for _ in range(50)]) for _ in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert mon.report().total == 800 and mon.report().counts == {0: 200, 1: 200, 2: 400}

# ---------------------------------------------------------------- bad input

BAD_PROBS = [
    (torch.tensor([.7, .2, .1]), ValueError, r'must be 2-D \(N items, C classes\), got shape \(3,\)'),
    (torch.full((2, 3, 4), .25), ValueError, r'must be 2-D .* got shape \(2, 3, 4\)'),
    (torch.tensor([[.5, float('nan')]]), ValueError, r'NaN or infinite values in 1 rows, e.g. rows \[0\]'),
    (torch.tensor([[.5, .5], [float('inf'), 0.]]), ValueError, r'NaN or infinite values .* rows \[1\]'),
    (torch.tensor([[1.5, -.5]]), ValueError, r'negative values \(row 0: min -0.5\)'),
    (torch.tensor([[.5, .5], [.3, .3]]), ValueError, r'must sum to 1 \(within 0.001\): 1 rows do not, e.g. row 1 sums to 0.6'),
    (np.array([[.5, .5001], [.2, .79]]), ValueError, r'must sum to 1 .* row 1 sums to 0.99'),
    (torch.ones(4, 1), ValueError, 'at least 2 columns'),
    ('0.5 0.5', TypeError, 'must be a torch tensor, a numpy array or nested lists of numbers, not str'),
    (np.array([['a', 'b']]), TypeError, 'must hold numbers'),
    ([[.5, .5], [1.]], TypeError, 'ragged'),
    (torch.ones(2, 2, dtype=torch.bool), TypeError, 'real numbers'),
    (torch.ones(2, 2, dtype=torch.complex64)/2, TypeError, 'real numbers'),
]

@pytest.mark.parametrize('probs,exc,msg', BAD_PROBS)
def test_bad_probs(probs, exc, msg):
    mon = PredictionMonitor()
    with pytest.raises(exc, match=msg): mon.update(probs)
    assert mon.report().total == 0                                # nothing counted

def test_columns_that_change_between_updates():
    mon = PredictionMonitor()
    mon.update(torch.full((2, 3), 1/3))
    with pytest.raises(ValueError, match=r'probs have 4 columns \(classes\) but earlier updates had 3'): mon.update(torch.full((2, 4), .25))
    assert mon.report().total == 2
    with pytest.raises(ValueError, match='vocab has 2 names but probs have 3 columns'):
        PredictionMonitor(vocab=['a', 'b']).update(torch.full((1, 3), 1/3))
    with pytest.raises(ValueError, match='3 ids for 2 predictions'): mon.update(torch.full((2, 3), 1/3), ids=[1, 2, 3])

def test_tolerance_and_low_precision():
    PredictionMonitor().update(torch.tensor([[.5, .5004]]))       # within 1e-3
    with pytest.raises(ValueError, match='sum to 1'): PredictionMonitor(tol=1e-5).update(torch.tensor([[.5, .5004]]))
    p = torch.randn(32, 43).softmax(1).half()                      # float16 rounding over 43 classes
    PredictionMonitor().update(p)

@pytest.mark.parametrize('kwargs,msg', [(dict(threshold=1.5), 'threshold must be a number in'), (dict(threshold='0.5'), 'threshold'),
    (dict(min_confidence=-.1), 'min_confidence'), (dict(max_low_confidence=2), 'max_low_confidence'), (dict(sample=-1), 'sample'),
    (dict(topk=0), 'topk must be an int >= 1'), (dict(topk=2.5), 'topk'), (dict(max_bytes=0), 'max_bytes'), (dict(max_files=0), 'max_files')])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg): PredictionMonitor(**kwargs)

@pytest.mark.parametrize('preds,targs,exc,msg', [
    (torch.eye(3), torch.eye(3), TypeError, r'targs must be class ids \(integers\)'),
    (torch.tensor([0, 1]), torch.tensor([0, 1]), ValueError, r'preds must be class scores \(N, C\) with argmax=True'),
    (torch.eye(3), torch.tensor([0, 1]), ValueError, '3 predictions but 2 labels'),
    (torch.eye(3), torch.tensor([0, 1, 3]), ValueError, 'label 3 out of range: the predictions have 3 classes'),
    (torch.eye(3), torch.tensor([0, -1, 2]), ValueError, 'class ids must be >= 0'),
    ('x', torch.tensor([0]), TypeError, 'preds must be a torch tensor'),
])
def test_class_imbalance_bad_input(preds, targs, exc, msg):
    ci = ClassImbalance()
    with pytest.raises(exc, match=msg): ci.update(preds, targs)
    assert ci.report().total == 0

def test_class_imbalance_bad_arguments_and_changing_classes():
    for kw in (dict(threshold_imbalance=0.9), dict(threshold_misprediction=1.1), dict(min_labels=-1), dict(min_labels=1.5)):
        with pytest.raises(ValueError): ClassImbalance(**kw)
    ci = ClassImbalance(); ci.update(torch.eye(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match='preds have 4 classes but earlier updates had 3'): ci.update(torch.eye(4), torch.arange(4))

# ---------------------------------------------------------------- ClassImbalance rules

def imbalanced(n0=300, n1=100, n2=20, wrong2=15):
    "Labels 0/1/2 with counts n0/n1/n2; `wrong2` of class 2 predicted as 0, everything else right"
    y = torch.tensor([0]*n0 + [1]*n1 + [2]*n2)
    p = y.clone(); p[n0+n1:n0+n1+wrong2] = 0
    return F.one_hot(p, 3).float(), y

def test_class_imbalance_waits_for_min_labels():
    ci = ClassImbalance(min_labels=500)
    s,y = imbalanced()
    ci.update(s, y)                                                # 420 labels
    ci.update(s[:79], y[:79])                                      # 499
    rep = ci.report()
    assert rep.total == 499 and not rep.evaluated and rep.ok and 'min_labels=500' in repr(rep)
    ci.update(s[:1], y[:1])                                        # 500
    rep = ci.report()
    assert rep.evaluated and rep.kinds() == ['imbalance', 'misprediction']
    imb,mis = rep.violations
    assert (imb.cls, imb.value) == (2, 380/20)
    assert imb.message == "labels imbalanced 19.0:1, above the 10:1 threshold: Class 0 has 380 labels, Class 2 20"
    assert (mis.cls, mis.value) == (2, 0.75)
    assert mis.message == "Class 2 mispredicted 75.0% of the time (15 of 20 labels), above the 70% threshold"
    assert rep.mispredicted == {0: 0.0, 1: 0.0, 2: 0.75} and rep.pred_counts == {0: 395, 1: 100, 2: 5}

def test_class_imbalance_thresholds_are_strict():
    ci = ClassImbalance(min_labels=0)
    s,y = imbalanced(n0=100, n1=50, n2=10, wrong2=7)               # ratio exactly 10, misprediction exactly 70%
    ci.update(s, y)
    assert ci.report().ok
    ci = ClassImbalance(min_labels=0, threshold_imbalance=9.9, threshold_misprediction=0.69); ci.update(s, y)
    assert ci.report().kinds() == ['imbalance', 'misprediction']

def test_absent_classes():
    s,y = torch.eye(4)[[0]*5 + [1]*5], torch.tensor([0]*5 + [1]*5)
    ci = ClassImbalance(min_labels=0); ci.update(s, y)
    v, = ci.report().violations
    assert (v.kind, v.cls, v.value) == ('imbalance', 2, math.inf)
    assert v.message == "Class 2 has no labels among 10 (and 1 more class: [3]), while Class 0 has 5"
    json.dumps(ci.report().to_dict())                              # inf is kept (Python's JSON writes Infinity)
    ci = ClassImbalance(min_labels=0, count_absent=False); ci.update(s, y)
    assert ci.report().ok

# ---------------------------------------------------------------- as callbacks on a real Learner

def tiny_dls(n=96, n_valid=48, c=4, size=8, bs=16, valid_labels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x,y = torch.randn(n, 3, size, size, generator=g),torch.randint(0, c, (n,), generator=g)
    yv = torch.randint(0, c, (n_valid,), generator=g) if valid_labels is None else torch.as_tensor(valid_labels)
    xv = torch.randn(len(yv), 3, size, size, generator=g)
    return DataLoaders.from_dsets(list(zip(x, y)), list(zip(xv, yv)), bs=bs, device='cpu')

def tiny_model(c=4):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, c))

def tiny_learn(dls=None, loss_func=None, cbs=(), seed=0):
    set_seed(seed)
    dls = dls or tiny_dls()
    return Learner(dls, tiny_model(), loss_func=loss_func or CrossEntropyLossFlat(), cbs=list(cbs))

def quiet(learn): return learn.no_bar(), learn.no_logging()

def test_prediction_monitor_in_get_preds():
    learn = tiny_learn()
    mon = PredictionMonitor(threshold=1.0, max_low_confidence=1.0)   # never violated: count only
    with learn.no_bar(): probs,_ = learn.get_preds(cbs=mon)
    rep = mon.last_report
    assert rep.total == 48 and rep.counts == {i: int(n) for i,n in enumerate(torch.bincount(probs.argmax(1), minlength=4))}
    assert rep.low_confidence == pytest.approx(float((probs.max(1).values < .5).float().mean()))
    assert not any(isinstance(cb, PredictionMonitor) for cb in learn.cbs)   # a temporary callback
    # the model outputs logits; the loss function's activation (softmax) makes them probabilities whatever from_logits says
    mon2 = PredictionMonitor(from_logits=True, threshold=1.0, max_low_confidence=1.0)
    with learn.no_bar(): learn.get_preds(cbs=mon2)
    assert mon2.last_report.counts == rep.counts

def test_prediction_monitor_warns_once_per_pass():
    dls = tiny_dls()
    learn = tiny_learn(dls)
    with torch.no_grad(): learn.model[-1].bias.copy_(torch.tensor([50., 0, 0, 0]))   # everything predicted class 0
    mon = PredictionMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with learn.no_bar(): learn.get_preds(cbs=mon)
        assert len(monitor_warnings(caught)) == 1                   # 3 batches, one warning
        with learn.no_bar(): learn.get_preds(cbs=mon)
        assert len(monitor_warnings(caught)) == 2                   # a new pass, a new warning
    assert 'Class 0 predicted 100.0% of the time' in str(monitor_warnings(caught)[0].message)
    assert mon.last_report.total == 48                              # each pass counted afresh

def test_prediction_monitor_without_activation_uses_from_logits():
    learn = tiny_learn(loss_func=nn.CrossEntropyLoss())             # no `activation`
    mon = PredictionMonitor(from_logits=True, threshold=1.0, max_low_confidence=1.0)
    with learn.no_bar(): probs,_ = learn.get_preds(cbs=mon)        # get_preds returns raw logits here
    assert mon.last_report.counts == {i: int(n) for i,n in enumerate(torch.bincount(probs.argmax(1), minlength=4))}
    with pytest.raises(ValueError, match='from_logits=True'):
        with learn.no_bar(): learn.get_preds(cbs=PredictionMonitor())

def test_prediction_monitor_in_fit_counts_validation_only(tmp_path):
    learn = tiny_learn()
    mon = PredictionMonitor(threshold=1.0, max_low_confidence=1.0, capture=tmp_path/'cap')
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=mon)
    assert mon.last_report.total == 48                              # the last validation pass only
    recs = read_capture(tmp_path/'cap')
    assert [r['id'] for r in recs] == 2*list(range(48))           # ids: dataset indices, in each pass

def test_class_imbalance_warns_once_per_fit():
    dls = tiny_dls(valid_labels=[0]*40 + [1]*20 + [2]*20 + [3]*2)    # 40:2 -> 20:1
    learn = tiny_learn(dls)
    ci = ClassImbalance(min_labels=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-3, cbs=ci)
        ws = monitor_warnings(caught)
        assert len(ws) == 1                                         # evaluated after epochs 2 and 3 (82, 164, 246 labels), warned once
        assert 'labels imbalanced 20.0:1' in str(ws[0].message) and 'once per fit' in str(ws[0].message)
        assert ci.last_report.total == 3*82 and ci.last_report.violations[0].cls == 3
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=ci)
        assert len(monitor_warnings(caught)) == 1                   # new fit: counts restart, 82 < min_labels
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=ci)
        assert len(monitor_warnings(caught)) == 2                   # a fit that reaches min_labels warns again
    assert ci.last_report.total == 164

def test_class_imbalance_min_labels_gates_warning_in_fit():
    dls = tiny_dls(valid_labels=[0]*40 + [3]*2)
    learn = tiny_learn(dls)
    ci = ClassImbalance(min_labels=1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=ci)
    assert monitor_warnings(caught) == [] and not ci.last_report.evaluated and ci.last_report.total == 84

def test_class_imbalance_writes_into_the_snapshot_store(tmp_path):
    dls = tiny_dls(valid_labels=[0]*30 + [1]*2, bs=8)               # 4 validation batches per epoch
    snap = SnapshotCallback(tmp_path, every=0, valid_every=1, include='logits', fsync=False)
    learn = tiny_learn(dls, cbs=[snap])
    ci = ClassImbalance(min_labels=0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', MonitorWarning)
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=ci)
    t = Trial(snap.run_path)
    assert t.loaded_all_steps
    lc = t.tensor('class_imbalance.label_counts')
    assert lc.steps('valid') == [3, 7]
    assert lc.value(3, 'valid').tolist() == [30, 2, 0, 0] and lc.value(7, 'valid').tolist() == [60, 4, 0, 0]
    assert t.tensor('class_imbalance.pred_counts').value(7, 'valid').sum() == 64
    mis = t.tensor('class_imbalance.mispredicted').value(7, 'valid')
    assert mis.dtype == torch.float32 and torch.isnan(mis[2:]).all()
    assert set(t.tensor_names(step=7, mode='valid')) >= {'logits', 'class_imbalance.label_counts'}   # parts of one step
    meta = t.meta(7, 'valid')['class_imbalance']
    assert meta['total'] == 64 and meta['violations'][0]['kind'] == 'imbalance'

def test_class_imbalance_outside_a_fit_and_without_labels():
    dls = tiny_dls(valid_labels=[0]*30 + [1]*2)
    learn = tiny_learn(dls)
    ci = ClassImbalance(min_labels=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        learn.validate(cbs=ci); learn.validate(cbs=ci)
    assert ci.last_report.total == 32 and len(monitor_warnings(caught)) == 2   # a window and a warning per pass
    # predictions without labels (a test set) count nothing
    from fastai.data.load import DataLoader
    dl = DataLoader(list(zip(torch.randn(8, 3, 8, 8))), bs=4)
    with learn.no_bar(): learn.get_preds(dl=dl, cbs=ci)
    assert ci.last_report.total == 0

def test_class_imbalance_over_a_trial(tmp_path):
    "The rules over the labels and predictions a SnapshotCallback stored equal the callback's, for training and validation steps"
    dls = tiny_dls(valid_labels=[0]*30 + [1]*2, bs=8)
    snap = SnapshotCallback(tmp_path, every=1, valid_every=1, include=['logits', 'target'], fsync=False)
    learn = tiny_learn(dls, cbs=[snap])
    ci = ClassImbalance(min_labels=0, store=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', MonitorWarning)
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=ci)
    t = Trial(snap.run_path)
    rep = ClassImbalance(min_labels=0).check_trial(t, mode='valid')
    assert rep.total == 64 and rep.counts == ci.last_report.counts and rep.pred_counts == ci.last_report.pred_counts
    assert [(v.kind, v.cls, v.value) for v in rep.violations] == [(v.kind, v.cls, v.value) for v in ci.last_report.violations]
    # training steps: every batch of both epochs (96 items, 12 batches of 8 per epoch), labels as the data gave them
    ys = torch.stack([y for _,y in dls.train_ds])
    rep,by_step = ClassImbalance(min_labels=0, threshold_imbalance=100).check_trial(str(tmp_path), mode='train', per_step=True)
    assert rep.total == 2*96 and sum(rep.counts.values()) == 192 and sorted(by_step) == t.steps('train') and len(by_step) == 24
    assert [rep.counts[c] for c in range(4)] == (2*torch.bincount(ys, minlength=4)).tolist()
    assert [r.total for r in by_step.values()] == list(range(8, 193, 8))   # cumulated step by step
    part = ClassImbalance(min_labels=0).check_trial(t, mode='train', steps=[0, 1])
    assert part.total == 16
    with pytest.raises(ValueError, match=r"train steps \[999\] .* do not hold both"):
        ClassImbalance().check_trial(t, mode='train', steps=[999])
    with pytest.raises(ValueError, match="no tensor 'label'"): ClassImbalance().check_trial(t, targs='label')

def test_callbacks_pickle_with_a_learner(tmp_path):
    mon = PredictionMonitor(capture=tmp_path/'cap'); mon.update(origin_probs()[:3])
    mon2 = pickle.loads(pickle.dumps(mon)); mon2.update(origin_probs()[3:5])
    assert mon2.report().total == 5 and [r['id'] for r in read_capture(tmp_path/'cap')] == [0, 1, 2, 3, 4]
    ci = pickle.loads(pickle.dumps(ClassImbalance())); ci.update(torch.eye(2), torch.arange(2))
    assert ci.report().total == 2

# ---------------------------------------------------------------- capture

def test_capture_records(tmp_path):
    mon = PredictionMonitor(vocab=GTSRB, capture=tmp_path, topk=3)
    mon.update(origin_probs()[318:324], ids=[f'img-{i}.png' for i in range(6)])
    recs = read_capture(tmp_path)
    assert [r['id'] for r in recs] == [f'img-{i}.png' for i in range(6)]
    r = recs[0]
    assert set(r) == {'id', 'time', 'topk', 'probs', 'names'} and r['topk'][0] == 14 and r['names'][0] == 'Stop'
    assert r['probs'][0] == pytest.approx(0.9) and r['probs'] == sorted(r['probs'], reverse=True)
    assert datetime.fromisoformat(r['time']).tzinfo is not None
    mon.update(origin_probs()[:2], ids=np.array([7, 8]))           # numpy ids become JSON ints
    assert [r['id'] for r in read_capture(tmp_path)][-2:] == [7, 8]

def test_capture_sampling_is_seeded(tmp_path):
    p = torch.eye(4)[torch.arange(4000) % 4]
    ids = {}
    for name,seed in (('a', 0), ('b', 0), ('c', 1)):
        mon = PredictionMonitor(capture=tmp_path/name, sample=0.25, seed=seed, max_low_confidence=1.)
        for chunk in p.split(500): mon.update(chunk)
        ids[name] = [r['id'] for r in read_capture(tmp_path/name)]
        assert mon.report().total == 4000                           # all traffic is counted, a sample is captured
    assert 850 < len(ids['a']) < 1150
    assert ids['a'] == ids['b'] and ids['a'] != ids['c']
    assert ids['a'] == sorted(ids['a']) and len(set(ids['a'])) == len(ids['a'])
    mon = PredictionMonitor(capture=tmp_path/'none', sample=0.0); mon.update(p)
    assert read_capture(tmp_path/'none') == []

def test_capture_rotates_by_size(tmp_path):
    mon = PredictionMonitor(capture=tmp_path, max_bytes=1000, vocab=GTSRB)
    for chunk in origin_probs().split(7): mon.update(chunk)
    files = capture_files(tmp_path)
    assert len(files) > 10
    assert all(f.stat().st_size <= 1000 for f in files)
    assert all(f.read_bytes().endswith(b'\n') for f in files)
    assert [r['id'] for r in read_capture(tmp_path)] == list(range(400))
    # a new monitor on the same folder goes on after the last file, in order
    PredictionMonitor(capture=tmp_path, max_bytes=1000).update(origin_probs()[:3], ids=['x', 'y', 'z'])
    assert [r['id'] for r in read_capture(tmp_path)][-4:] == [399, 'x', 'y', 'z']

def test_capture_max_files(tmp_path):
    mon = PredictionMonitor(capture=tmp_path, max_bytes=500, max_files=3)
    for chunk in origin_probs().split(4): mon.update(chunk)
    files = capture_files(tmp_path)
    assert len(files) == 3
    ids = [r['id'] for r in read_capture(tmp_path)]
    assert ids[-1] == 399 and ids == list(range(ids[0], 400))       # the newest records, whole and in order

def test_capture_partial_line_left_by_a_crash(tmp_path):
    mon = PredictionMonitor(capture=tmp_path)
    mon.update(origin_probs()[:5])
    f = capture_files(tmp_path)[-1]
    with open(f, 'ab') as fh: fh.write(b'{"id":5,"time":"2024-01-01T00:0')   # a writer killed mid-line
    assert [r['id'] for r in read_capture(tmp_path)] == [0, 1, 2, 3, 4]
    assert [r['id'] for r in read_capture(f)] == [0, 1, 2, 3, 4]
    mon2 = PredictionMonitor(capture=tmp_path)                      # a restarted service
    mon2.update(origin_probs()[:2], ids=['a', 'b'])
    assert len(capture_files(tmp_path)) == 2                       # a new file: the partial line is never glued to a record
    assert [r['id'] for r in read_capture(tmp_path)] == [0, 1, 2, 3, 4, 'a', 'b']

def test_capture_short_write_starts_a_new_file(tmp_path, monkeypatch):
    mon = PredictionMonitor(capture=tmp_path)
    mon.update(origin_probs()[:2])
    real_write = os.write
    monkeypatch.setattr(os, 'write', lambda fd, b: real_write(fd, b[:len(b)//2]))   # disk full half-way through a line
    with pytest.raises(OSError, match='bytes of a capture line were written'): mon.update(origin_probs()[:1])
    monkeypatch.setattr(os, 'write', real_write)
    mon.update(origin_probs()[:1], ids=['after'])
    assert [r['id'] for r in read_capture(tmp_path)] == [0, 1, 'after']
    assert len(capture_files(tmp_path)) == 2

WRITER = textwrap.dedent('''
    import sys, torch
    from fastai_saliency.monitor import PredictionMonitor
    mon = PredictionMonitor(capture=sys.argv[1], max_bytes=20_000, vocab=[f"class number {i}" for i in range(43)], topk=10)
    p = torch.randn(16, 43, generator=torch.Generator().manual_seed(0)).softmax(1)
    print("ready", flush=True)
    while True: mon.update(p)
''')

def test_capture_survives_a_killed_writer(tmp_path):
    cap = tmp_path/'cap'
    proc = subprocess.Popen([sys.executable, '-c', WRITER, str(cap)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().strip() == b'ready'
        t0 = time.monotonic()
        while len(capture_files(cap)) < 4 and time.monotonic() - t0 < 60: time.sleep(0.01)
        for _ in range(20): read_capture(cap)                       # reading while the writer appends
    finally:
        proc.send_signal(signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    recs = read_capture(cap)
    assert len(recs) > 100
    assert [r['id'] for r in recs] == list(range(len(recs)))        # whole records, none lost before the last
    assert all(len(r['topk']) == 10 and len(r['names']) == 10 for r in recs)
    assert all(f.stat().st_size <= 20_000 for f in capture_files(cap))
    mon = PredictionMonitor(capture=cap)                            # a restarted writer appends readable lines
    mon.update(origin_probs()[:3], ids=['r0', 'r1', 'r2'])
    assert [r['id'] for r in read_capture(cap)][-3:] == ['r0', 'r1', 'r2']
