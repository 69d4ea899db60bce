"Shared test set-up: caches out of the home directory, a headless matplotlib, the one torch.jit warning filtered."
import os, tempfile, warnings
_cache = os.path.join(tempfile.gettempdir(), 'fastai_saliency_test_cache')
for var,sub in dict(FASTAI_HOME='fastai', TORCH_HOME='torch', MPLCONFIGDIR='matplotlib', IPYTHONDIR='ipython').items():
    os.environ.setdefault(var, os.path.join(_cache, sub))
os.environ.setdefault('MPLBACKEND', 'Agg')
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)

import pytest

@pytest.fixture(scope='session')
def signs_learner(tmp_path_factory):
    "A resnet18 trained for a few seconds on a small SynthSigns (8 classes, 32 px): shared by the tests that need one"
    import torch
    from fastai.vision.all import vision_learner, resnet18, set_seed, accuracy
    from fastai_saliency.data import synth_signs, synth_signs_dls
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        path = synth_signs(tmp_path_factory.mktemp('signs')/'s', n_per_class=15, size=32, n_classes=8, seed=2)
        set_seed(0, reproducible=True)
        dls = synth_signs_dls(path, bs=16, num_workers=0)
        learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-3)
    finally: torch.set_num_threads(n)
    return learn
