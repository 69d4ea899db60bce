"""Multi-label Grad-CAM on SynthSigns scenes (two signs per image): how often the map of each present label weighs its own
sign more than the other one (mean map value inside each sign's mask), for fastai_saliency and pytorch-grad-cam at the
same layer and target, on a resnet18 trained from scratch. Prints a table. Run: PYTHONPATH=. python bench/tasks_own_object.py"""
import sys, time, tempfile, numpy as np, pandas as pd, torch
from pathlib import Path
from PIL import Image
from fastai.vision.all import vision_learner, resnet18, set_seed, accuracy_multi
from fastai_saliency.data import synth_scenes, synth_scenes_dls
from fastai_saliency.methods import gradcam
from fastai_saliency.targets import Target

def main(n=480, size=32, epochs=8, lr=3e-3, layers=('0.5', '0.6')):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    torch.set_num_threads(1)
    p = synth_scenes(Path(tempfile.gettempdir())/f'bench_scenes_{n}_{size}', n=n, size=size, n_classes=4, seed=0)
    set_seed(0, reproducible=True)
    learn = vision_learner(synth_scenes_dls(p, 'multi', bs=32, num_workers=0), resnet18, pretrained=False, metrics=accuracy_multi)
    t0 = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    acc = learn.validate()[1]
    df = pd.read_csv(p/'scenes.csv').query('is_valid == 1')
    x = torch.cat([b[0].as_subclass(torch.Tensor) for b in learn.dls.test_dl([p/f for f in df.fname], num_workers=0)])
    masks = torch.stack([torch.as_tensor(np.asarray(Image.open(p/m))) for m in df['mask']]).long()
    vocab,model = list(learn.dls.vocab),learn.model.eval()
    rows = []
    for layer in layers:
        mod = model.get_submodule(layer)
        wins = dict(ours=[], theirs=[]); rs = []
        for i,labels in enumerate(df['labels']):
            a,b = [vocab.index(l) for l in labels.split()]
            for own,other in ((a, b), (b, a)):
                mo,mt = masks[i] == own + 1,masks[i] == other + 1
                m1 = gradcam(model, x[i:i+1], layer, target=Target(own, 'multi'))[0]
                with GradCAM(model=model, target_layers=[mod]) as gc: m2 = torch.as_tensor(gc(input_tensor=x[i:i+1], targets=[ClassifierOutputTarget(own)])[0])
                for k,m in (('ours', m1), ('theirs', m2)): wins[k].append(bool(m[mo].mean() > m[mt].mean()))
                if m2.std() > 0: rs.append(float(np.corrcoef(m1.flatten().numpy(), m2.flatten().numpy())[0, 1]))
        rows.append(dict(layer=layer, maps=len(wins['ours']), own_weighs_more_ours=np.mean(wins['ours']),
                         own_weighs_more_pytorch_grad_cam=np.mean(wins['theirs']), same_verdict=np.mean(np.array(wins['ours']) == np.array(wins['theirs'])),
                         min_r=min(rs) if rs else float('nan')))
    print(f"resnet18 from scratch, {n} scenes of {size} px, {epochs} epochs ({time.time()-t0:.0f} s), valid accuracy_multi {acc:.3f}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))

if __name__ == '__main__': main(*[int(a) for a in sys.argv[1:4]])
