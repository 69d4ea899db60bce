"Shared test set-up: caches out of the home directory, a headless matplotlib, the one torch.jit warning filtered."
import os, tempfile, warnings
_cache = os.path.join(tempfile.gettempdir(), 'fastai_saliency_test_cache')
for var,sub in dict(FASTAI_HOME='fastai', TORCH_HOME='torch', MPLCONFIGDIR='matplotlib', IPYTHONDIR='ipython').items():
    os.environ.setdefault(var, os.path.join(_cache, sub))
os.environ.setdefault('MPLBACKEND', 'Agg')
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
