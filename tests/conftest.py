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

@pytest.fixture(scope='session')
def scenes_path(tmp_path_factory):
    "A small synth_scenes folder (two signs per image, 4 classes, 32 px): multi-label, segmentation and points data"
    from fastai_saliency.data import synth_scenes
    return synth_scenes(tmp_path_factory.mktemp('scenes')/'s', n=64, size=32, n_classes=4, seed=0)

@pytest.fixture(scope='session')
def task_learners(scenes_path):
    "One small learner per task beyond single-label, trained for a few seconds: 'multi' and 'points' resnet18s, a 'segment' U-Net"
    import torch
    from fastai.vision.all import vision_learner, unet_learner, resnet18, set_seed
    from fastai_saliency.data import synth_scenes_dls
    n = torch.get_num_threads(); torch.set_num_threads(1)
    res = {}
    try:
        for task,epochs in (('multi', 3), ('segment', 3), ('points', 3)):
            set_seed(0, reproducible=True)
            dls = synth_scenes_dls(scenes_path, task, bs=16, num_workers=0)
            make = unet_learner if task == 'segment' else vision_learner
            learn = make(dls, resnet18, pretrained=False)
            with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3)
            res[task] = learn
    finally: torch.set_num_threads(n)
    return res

@pytest.fixture(scope='session')
def s3_server():
    "An S3 server for the whole session (moto's, as s3fs's own tests run it) on a free port; the AWS_* variables point at it"
    for mod in ('moto.server', 's3fs'):
        pytest.importorskip(mod, reason=f"{mod} is not installed: pip install 'moto[server]' s3fs (requirements-dev.txt) runs the S3 tests")
    import logging, socket, s3fs
    from moto.server import ThreadedMotoServer
    logging.getLogger('werkzeug').setLevel(logging.ERROR)        # no line per request
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=port, verbose=False)
    server.start()
    env = dict(AWS_ENDPOINT_URL=f'http://127.0.0.1:{port}', AWS_ACCESS_KEY_ID='testing', AWS_SECRET_ACCESS_KEY='testing',
               AWS_DEFAULT_REGION='us-east-1')
    old = {k: os.environ.get(k) for k in [*env, 'AWS_PROFILE', 'AWS_SESSION_TOKEN', 'AWS_ENDPOINT_URL_S3']}
    for k in old: os.environ.pop(k, None)
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try: yield env
    finally:
        server.stop()
        for k,v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
