# Hand-written: re-exports the public names, so users write `from fastai_saliency.all import *`.
from .hooks import *
from .store import *
from .data import *
from .methods import *
from .plot import *
from .callbacks import *
from .learner import *
from .monitor import *
from .evaluate import *
