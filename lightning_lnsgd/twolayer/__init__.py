"""The paper's model: the two-layer linear network, its sparse-teacher data, fused engine and kernels."""

from .data import SparseTeacherDataModule
from .grid import expand_grid
from .model import TwoLayerLinear
from .oscillation import OscillationOnly
from .progress import StepProgressBar
from .recorder import DivergenceError
from .replica_table import read_replica_table

__all__ = [
    "DivergenceError",
    "OscillationOnly",
    "SparseTeacherDataModule",
    "StepProgressBar",
    "TwoLayerLinear",
    "expand_grid",
    "read_replica_table",
]
