"""The paper's model: the two-layer linear network, its sparse-teacher data, fused engine and kernels."""

from .data import SparseTeacherDataModule
from .model import TwoLayerLinear
from .oscillation import OscillationOnly
from .progress import StepProgressBar
from .recorder import DivergenceError

__all__ = ["DivergenceError", "OscillationOnly", "SparseTeacherDataModule", "StepProgressBar", "TwoLayerLinear"]
