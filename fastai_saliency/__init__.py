# Hand-written (nbdev only updates __version__ here).
__version__ = "0.1.0"
import warnings
# Importing fastai triggers torch's deprecation of torch.jit.script; filter that one warning only.
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
