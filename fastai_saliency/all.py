# Hand-written: re-exports the public names, so users write `from fastai_saliency.all import *`.
from .hooks import *
from .data import *
