"""lightning_lnsgd: label-noise SGD and SAM as PyTorch Lightning plug-ins (arXiv 2603.10397)."""

from .data import SparseTeacherDataModule
from .model import DivergenceError, TwoLayerLinear
from .noise import LabelNoise
from .rng import CounterRNG

__all__ = [
    "CounterRNG",
    "DivergenceError",
    "LabelNoise",
    "SparseTeacherDataModule",
    "TwoLayerLinear",
]

__version__ = "0.1.0"
