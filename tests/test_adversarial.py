"""The attack and the deployment story on one small trained SynthSigns model: FGSM in pixel units, a baseline from validation
that passes clean traffic and flags a targeted attack, the `fastai-saliency monitor` check over a capture folder."""
import json, subprocess, sys, warnings
from pathlib import Path
from types import SimpleNamespace
import pandas as pd
import pytest, torch
from torch import nn, Tensor
from fastai.vision.all import Learner, set_seed, ConvLayer, Flatten, Normalize, imagenet_stats
from fastai.data.load import DataLoader
from fastai_saliency.data import synth_signs, synth_signs_dls
from fastai_saliency.learn_io import dls_norm, items_batch
from fastai_saliency.methods import model_logits
from fastai_saliency.monitor import PredictionMonitor, Constraints, MonitorWarning, read_history
from fastai_saliency.adversarial import fgsm, pixel_stats, adversarial_story

EXE = Path(sys.executable).parent/'fastai-saliency'

@pytest.fixture(scope='module')
def signs(tmp_path_factory):
    "A small CNN trained on 8 classes of SynthSigns at 32 px, its validation batch, and 120 clean images of another seed"
    n = torch.get_num_threads(); torch.set_num_threads(1)     # small shared test machines
    tmp = tmp_path_factory.mktemp('adversarial')
    set_seed(0)
    path = synth_signs(tmp/'signs', n_per_class=60, size=32, seed=0, n_classes=8)
    dls = synth_signs_dls(path, bs=16, num_workers=0)
    model = nn.Sequential(ConvLayer(3, 16, stride=2), ConvLayer(16, 32, stride=2), ConvLayer(32, 64, stride=2),
                          ConvLayer(64, 64), nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(64, dls.c))
    learn = Learner(dls, model)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(8, 1e-2)
    xb,yb = items_batch(learn, list(range(len(dls.valid_ds))))
    traffic = synth_signs(tmp/'traffic', n_per_class=15, size=32, seed=1, n_classes=8)
    files = [traffic/f for f in pd.read_csv(traffic/'labels.csv').fname]
    yield SimpleNamespace(learn=learn, path=path, xb=xb.as_subclass(Tensor), yb=yb.as_subclass(Tensor), norm=dls_norm(dls),
                          stop=dls.vocab.o2i['stop'], files=files, traffic=traffic, tmp=tmp)
    torch.set_num_threads(n)

def predict(learn, x): return model_logits(learn.model, x).argmax(1)

def test_eps_is_respected_in_pixel_units(signs):
    s,model = signs,signs.learn.model
    mean,std = pixel_stats(s.norm)
    pix = s.xb[:16]*std + mean
    grads = [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    model.train()
    for eps in (1/255, 4/255, 8/255):
        for kw in (dict(), dict(steps=5), dict(targeted=True, steps=5), dict(steps=3, step_size=eps)):
            t = s.stop if kw.get('targeted') else s.yb[:16]
            x_adv = fgsm(model, s.xb[:16], t, eps, norm=s.norm, **kw)
            adv = x_adv*std + mean
            assert (adv - pix).abs().max() <= eps + 1e-5, (eps, kw)
            assert adv.min() >= -1e-5 and adv.max() <= 1 + 1e-5
            assert (adv - pix).abs().max() >= eps - 1e-5            # the attack uses its budget
    # the (mean, std) pair is the Normalize; the model is left as it was
    test = fgsm(model, s.xb[:4], s.yb[:4], 2/255, norm=(imagenet_stats[0], imagenet_stats[1]))
    assert torch.allclose(test, fgsm(model, s.xb[:4], s.yb[:4], 2/255, norm=Normalize.from_stats(*imagenet_stats)))
    assert model.training
    model.eval()
    for p,(rg,g) in zip(model.parameters(), grads):                  # no .grad written
        assert p.requires_grad == rg and (p.grad is None if g is None else torch.equal(p.grad, g))

def test_fgsm_lowers_accuracy_and_targeted_iterated_moves_predictions_to_the_target(signs):
    s,model = signs,signs.learn.model
    others = s.yb != s.stop
    acc = lambda x: (predict(s.learn, x) == s.yb).float().mean().item()
    to_stop = lambda x: (predict(s.learn, x)[others] == s.stop).float().mean().item()
    clean = acc(s.xb)
    assert clean > 0.7, clean
    assert acc(fgsm(model, s.xb, s.yb, 8/255, norm=s.norm)) < clean - 0.3           # one step, away from the labels
    one = fgsm(model, s.xb, s.stop, 8/255, targeted=True, norm=s.norm)
    many = fgsm(model, s.xb, s.stop, 8/255, targeted=True, steps=10, norm=s.norm)
    assert acc(many) < clean - 0.25
    assert to_stop(many) > 0.5 and to_stop(many) > to_stop(one) > to_stop(s.xb)
    assert to_stop(fgsm(model, s.xb, s.stop, 16/255, targeted=True, steps=10, norm=s.norm)) > 0.9

def attacked_dl(s, eps=8/255):
    "The clean traffic attacked towards stop, as a DataLoader of normalised images (what an endpoint would be sent)"
    xt,_ = items_batch(s.learn, s.files)
    return DataLoader(list(zip(fgsm(s.learn.model, xt, s.stop, eps, targeted=True, steps=10, norm=s.norm))), bs=32)

def test_baseline_from_validation_passes_clean_traffic_and_flags_a_targeted_attack(signs, tmp_path):
    s,learn = signs,signs.learn
    mon = PredictionMonitor.from_learner(learn, capture=tmp_path/'capture')
    assert mon.constraints.baseline['n'] == len(learn.dls.valid_ds) and mon.constraints.vocab == list(learn.dls.vocab)
    mon.constraints.save(tmp_path/'c.json')
    with warnings.catch_warnings():
        warnings.simplefilter('error', MonitorWarning)
        with learn.no_bar(): learn.get_preds(dl=learn.dls.test_dl(s.files), cbs=mon)
    assert mon.last_report.ok and mon.last_report.evaluated and mon.last_report.total == 120
    # the saved constraints, in a new monitor (an inference service), flag the attacked burst
    served = PredictionMonitor.from_constraints(tmp_path/'c.json')
    with pytest.warns(MonitorWarning, match=r"Class \d+ \('stop'\) predicted \d+ times in 120"):
        with learn.no_bar(): learn.get_preds(dl=attacked_dl(s), cbs=served)
    rep = served.last_report
    assert [v.cls for v in rep.violations if v.kind == 'class_share'] == [s.stop]
    assert rep.share(s.stop) > served.constraints.limits['max_class_share'][s.stop]
    assert json.loads((tmp_path/'c.json').read_text())['limits'] == served.constraints.limits

def monitor(*args, capsys=None):
    "`fastai-saliency monitor ARGS`: the console script in a subprocess, or its `main` in this process (with `capsys`)"
    args = ['monitor', *map(str, args)]
    if capsys is None: return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=300)
    from fastai_saliency.cli import main
    try: code = main(args)
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

def test_cli_check_over_a_capture_folder_writes_report_and_history(signs, tmp_path, capsys):
    s,learn = signs,signs.learn
    cap,out = tmp_path/'capture',tmp_path/'checks'
    mon = PredictionMonitor.from_learner(learn, capture=cap)
    mon.constraints.save(tmp_path/'c.json')
    with warnings.catch_warnings(), learn.no_bar():
        warnings.simplefilter('ignore', MonitorWarning)
        learn.get_preds(dl=learn.dls.test_dl(s.files), cbs=mon)
        r = monitor(cap, '--constraints', tmp_path/'c.json', '--out', out, capsys=capsys)
        assert r.returncode == 0, r.stdout + r.stderr
        learn.get_preds(dl=attacked_dl(s), cbs=mon)
    r = monitor(cap, '--constraints', tmp_path/'c.json', '--out', out)             # the console script, as cron runs it
    assert r.returncode == 1, r.stdout + r.stderr
    assert "('stop') predicted" in r.stdout and 'history.jsonl' in r.stdout
    hist = read_history(out)
    assert [(h['n'], h['ok']) for h in hist] == [(120, True), (120, False)]      # each check reads what is new
    assert {v['kind'] for v in hist[1]['violations']} >= {'class_share'} and hist[1]['counts'][s.stop] > 60
    for h in hist:
        rep = json.loads((out/h['report']).read_text())
        assert rep['source'] == 'check_capture' and rep['total'] == 120 and (out/h['plot']).stat().st_size > 1000
    assert s.stop in [v['cls'] for v in rep['violations']] and rep['window']['cursor']['file'].startswith('capture-')
    # nothing new: clean, not judged; the default --out is CAPTURE/monitoring; --since all
    r = monitor(cap, '--constraints', tmp_path/'c.json', '--out', out, capsys=capsys)
    assert r.returncode == 0 and read_history(out)[-1]['n'] == 0 and 'not evaluated' in r.stdout
    assert monitor(cap, '--constraints', tmp_path/'c.json', '--since', 'all', capsys=capsys).returncode == 1
    assert read_history(cap/'monitoring')[0]['n'] == 240
    # bad input: exit 2, one line that says what is wrong, nothing recorded
    (tmp_path/'bad.json').write_text('{"format": "fastai_saliency.constraints", "version": 1}')
    for args,msg in (((tmp_path/'none', '--constraints', tmp_path/'c.json'), 'no capture folder or file'),
                     ((cap, '--constraints', tmp_path/'none.json'), 'no constraints file'),
                     ((cap, '--constraints', tmp_path/'bad.json'), 'baseline: class_shares must be a list'),
                     ((cap, '--constraints', tmp_path/'c.json', '--since', 'noon'), 'since must be an ISO time'),
                     ((cap,), 'the following arguments are required: --constraints')):
        r = monitor(*args, capsys=capsys)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    assert len(read_history(out)) == 3

def test_adversarial_story(signs, tmp_path):
    res = adversarial_story(signs.learn, signs.path, eps=(4/255, 8/255), traffic=signs.traffic, out=tmp_path/'story', n_show=2)
    n = res['numbers']
    assert n['clean_ok'] and n['n_traffic'] == 120 and [round(r['eps']*255) for r in n['eps']] == [4, 8]
    assert n['eps'][1]['to_target'] > n['eps'][0]['to_target'] and n['eps'][1]['accuracy_fgsm'] < n['accuracy_clean']
    assert any(v['kind'] == 'class_share' and v['cls'] == signs.stop for v in n['burst_flagged'])
    assert set(n['maps']) == {'gradcam', 'fullgrad'} and n['maps']['fullgrad']['n'] == n['n_flipped'] > 0
    assert set(res['figures']) == {'attack', 'check', 'accuracy', 'flagged'} and len(res['figures']['attack'].axes) == 2*5
    assert n['n_flagged_requests'] > 0 and len(res['figures']['flagged'].axes) == 2*4      # clean and served, image and map
    assert [h['ok'] for h in read_history(tmp_path/'story'/'checks')] == [True, False]
    import matplotlib.pyplot as plt; plt.close('all')
