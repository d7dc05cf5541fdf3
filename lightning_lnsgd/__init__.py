"""lightning_lnsgd: label-noise SGD and SAM as PyTorch Lightning plug-ins (arXiv 2603.10397)."""

from .callbacks import DynamicsMonitor, HParamsSummary, PruningCurve
from .classification import GaussianMixtureDataModule, MLPClassifier
from .data import SparseTeacherDataModule
from .model import DivergenceError, TwoLayerLinear
from .noise import LabelNoise
from .oscillation import OscillationOnly
from .progress import StepProgressBar
from .sam import SAMDDPStrategy, SAMStrategy, is_perturbed_pass, sam_perturbation
from .rng import CounterRNG

__all__ = [
    "CounterRNG",
    "DivergenceError",
    "DynamicsMonitor",
    "GaussianMixtureDataModule",
    "HParamsSummary",
    "LabelNoise",
    "MLPClassifier",
    "OscillationOnly",
    "PruningCurve",
    "SAMDDPStrategy",
    "SAMStrategy",
    "StepProgressBar",
    "SparseTeacherDataModule",
    "TwoLayerLinear",
    "is_perturbed_pass",
    "sam_perturbation",
]

__version__ = "0.1.0"
