# Hand-written: re-exports fastai's vision names and the package's public names, as fastxtend's `all` does, so that
# `from fastai_saliency.all import *` is the one import a user needs.
from fastai.vision.all import *
from .hooks import *
from .store import *
from .data import *
from .learn_io import *
from .layers import *
from .targets import *
from .methods import *
from .fullgrad import *
from .attributions import *
from .plot import *
from .snapshot import *
from .scoring import *
from .saliency import *
from .learner import *
from .replay import *
from .capture import *
from .monitor import *
from .evaluate import *
from .adversarial import *
