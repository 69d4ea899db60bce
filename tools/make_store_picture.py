"""Hand-written: nbs/images/store.png, the README's picture of the snapshot store: a resnet18 trained from scratch on
SynthSigns with `SnapshotCallback` at its defaults (plus the Grad-CAM layer '0.5'), then, from the store alone, FullGrad
(localising variant) and Grad-CAM at '0.5' of four validation signs at every epoch. `python tools/make_store_picture.py`
(about two minutes on 2 CPU cores); everything but the PNG is written to a temporary folder."""
import io, tempfile
from pathlib import Path
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from PIL import Image
from fastai.vision.all import *
from fastai_saliency.all import *

ROOT = Path(__file__).resolve().parents[1]
tmp = Path(tempfile.mkdtemp())
set_seed(0, reproducible=True)
dls = synth_signs_dls(synth_signs(tmp/'signs', n_per_class=150, size=64), bs=64, num_workers=0)
snap = SnapshotCallback(tmp/'runs', every=0, include=['input', 'logits', 'target', '0.5'])
learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy, cbs=snap)
with learn.no_bar(): learn.fit_one_cycle(5, 3e-3)

trial = Trial(tmp/'runs')                                  # from here on: the store alone
steps = trial.explained_steps()
y = trial.tensor('target').value(steps[0], 'valid')
items = [int((y == c).nonzero()[k]) for k in range(2) for c in y.unique()][:4]   # one of each class first
x = trial.tensor('input').value(steps[0], 'valid')[items]
vocab = trial.info['meta']['vocab']

def panel(method, **kw):
    frames = torch.stack([trial.maps(method, step=s, items=items, **kw) for s in steps])
    titles = []
    for s in steps:
        p = trial.tensor('logits').value(s, 'valid')[items].softmax(1)
        e = trial.step_info(s, 'valid')['epoch']
        titles.append([f"epoch {e}: {vocab[int(c)]} {float(v):.0%}\n" + ('right' if int(c) == int(t) else f'true: {vocab[int(t)]}')
                       for v,c,t in zip(*p.max(1), y[items])])
    name = 'FullGrad' if method == 'fullgrad' else "Grad-CAM at '0.5'"
    fig = show_frames(x, frames, titles, stats=(trial.info['meta']['norm']['mean'], trial.info['meta']['norm']['std']),
                      size=1.5, suptitle=f"{name}, from the store")
    buf = io.BytesIO(); fig.savefig(buf, format='png', dpi=72); plt.close(fig)
    return Image.open(buf).convert('RGB')

a,b = panel('fullgrad', input_term=False, max_stride=4),panel('gradcam', layer='0.5')
img = Image.new('RGB', (a.width + b.width + 20, max(a.height, b.height)), 'white')
img.paste(a, (0, 0)); img.paste(b, (a.width + 20, 0))
out = ROOT/'nbs'/'images'/'store.png'
img.quantize(256).save(out, optimize=True)
print(f"wrote {out} ({out.stat().st_size/1e3:.0f} kB); accuracy {float(learn.validate()[1]):.2f}")
