"Is SynthSigns learnable from scratch on CPU? Trains resnet18 (pretrained=False) at 64 px and prints a table."
import time, tempfile, argparse
from pathlib import Path
from fastai.vision.all import *
from fastai_saliency.data import synth_signs, synth_signs_dls

p = argparse.ArgumentParser(description=__doc__)
p.add_argument('--epochs', type=int, default=6)
p.add_argument('--n_per_class', type=int, default=200)
p.add_argument('--size', type=int, default=64)
p.add_argument('--lr', type=float, default=3e-3)
a = p.parse_args()

set_seed(0)
tmp = Path(tempfile.mkdtemp())
t0 = time.perf_counter()
path = synth_signs(tmp/'signs', n_per_class=a.n_per_class, size=a.size, seed=0)
t_data = time.perf_counter() - t0
dls = synth_signs_dls(path, bs=64, num_workers=0)
learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
t0 = time.perf_counter()
with learn.no_bar(): learn.fit_one_cycle(a.epochs, a.lr)
t_fit = time.perf_counter() - t0
acc = learn.validate()[1]
print(f"| images | size | epochs | data (s) | fit (s) | valid accuracy | target |")
print(f"| {len(dls.train_ds)+len(dls.valid_ds)} | {a.size} | {a.epochs} | {t_data:.1f} | {t_fit:.1f} | {acc:.3f} | >= 0.90 within ~120 s |")
