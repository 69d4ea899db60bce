"""Which FullGrad terms localise? resnet18 from scratch on SynthSigns (2,000 images, 64 px), 5 epochs, 80 probes.

Prints the pointing game (tol 0.15; chance about 0.35) of the input term and of each layer's bias term alone (resized
with align_corners True and False, and the share of its mass on the map's border), then of the sum of the terms whose
map is finer than 2, 4, 8, 16 px, and of the reference `fullgrad` and its variants. The findings are written up in
nbs/11_evaluate.ipynb ("Why the reference FullGrad does not show it"). Takes about 3 minutes on 2 CPU cores."""
import sys, torch, torch.nn.functional as F
from pathlib import Path
from fastai.vision.all import *
from fastai_saliency.data import synth_signs, synth_signs_dls, read_boxes
from fastai_saliency.methods import fullgrad, fullgrad_terms, scale_maps
from fastai_saliency.evaluate import pointing_game
torch.set_num_threads(2)
path = synth_signs(Path('/tmp/fastai_saliency_bench/signs'), n_per_class=200, size=64, seed=0)
set_seed(0, reproducible=True)
dls = synth_signs_dls(path, bs=64, num_workers=0)
df = read_boxes(path); vdf = df[df.is_valid.astype(bool)].reset_index(drop=True)
idx = list(range(0, len(vdf), len(vdf)//80))[:80]
dl = dls.valid
xb,yb = dl.after_batch(to_device(dl.do_batch([dl.do_item(i) for i in idx]), dl.device))
boxes = vdf.loc[idx, ['x1','y1','x2','y2']].values
learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
mp = Path('/tmp/fastai_saliency_bench/model5.pth'); mp.parent.mkdir(parents=True, exist_ok=True)
if mp.exists(): learn.model.load_state_dict(torch.load(mp))
else:
    with learn.no_bar(): learn.fit_one_cycle(5, 3e-3)
    torch.save(learn.model.state_dict(), mp)
t = fullgrad_terms(learn.model, xb, yb)
def post(a):
    a = a.abs(); a = a - a.flatten(1).min(1).values[:, None, None, None]
    mx = a.flatten(1).max(1).values[:, None, None, None]
    return torch.where(mx > 0, a / mx, torch.zeros_like(a))
up = lambda m, ac: F.interpolate(m[:, None], size=(64, 64), mode='bilinear', align_corners=ac)[:, 0]
print('input', pointing_game(post(t.input_term).sum(1), boxes))
per = []
for n,b in zip(t.names, t.bias_terms):
    if b.dim() != 4: continue
    m = post(b).sum(1)
    per.append((n, tuple(b.shape[-2:]), m))
    print(f"{n:14s} {b.shape[-2]}x{b.shape[-1]} pg(ac1)={pointing_game(up(m, True), boxes):.2f} pg(ac0)={pointing_game(up(m, False), boxes):.2f} border={(m[:, [0,-1]].sum()+m[:, 1:-1][:, :, [0,-1]].sum()).item()/m.sum().item():.2f}")
for maxres in (2, 4, 8, 16):
    for ac in (True, False):
        m = sum(up(mm, ac) for n,s,mm in per if s[0] > maxres)
        print(f"res>{maxres} ac={ac}: {pointing_game(m, boxes):.2f}")
# weights: each resolution group averaged rather than summed
for ac in (True, False):
    groups = {}
    for n,s,mm in per: groups.setdefault(s, []).append(mm)
    m = sum(up(torch.stack(g).mean(0), ac) for g in groups.values())
    print(f"per-resolution mean ac={ac}: {pointing_game(m, boxes):.2f}")
print('fullgrad ref', pointing_game(fullgrad(learn.model, xb, yb), boxes), 'noin ac0', pointing_game(fullgrad(learn.model, xb, yb, input_term=False, align_corners=False), boxes))
print('variant input_term=False, max_stride=4:', pointing_game(fullgrad(learn.model, xb, yb, input_term=False, max_stride=4), boxes))
