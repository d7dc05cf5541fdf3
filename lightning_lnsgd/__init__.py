"""lightning_lnsgd: label-noise SGD and SAM as PyTorch Lightning plug-ins (arXiv 2603.10397)."""

from .callbacks import DynamicsMonitor, HParamsSummary, PruningCurve
from .cifar import CIFAR10DataModule
from .classification import GaussianMixtureDataModule, MLPClassifier
from .data import SparseTeacherDataModule
from .laziness import Laziness
from .model import DivergenceError, TwoLayerLinear
from .noise import LabelNoise
from .oscillation import OscillationOnly
from .progress import StepProgressBar
from .resnet import ResNet18
from .sam import SAMDDPStrategy, SAMStrategy, is_perturbed_pass, sam_perturbation
from .rng import CounterRNG
from .vision import DigitsDataModule, ImageClassifier

__all__ = [
    "CIFAR10DataModule",
    "CounterRNG",
    "DigitsDataModule",
    "DivergenceError",
    "DynamicsMonitor",
    "GaussianMixtureDataModule",
    "HParamsSummary",
    "ImageClassifier",
    "LabelNoise",
    "Laziness",
    "MLPClassifier",
    "OscillationOnly",
    "PruningCurve",
    "ResNet18",
    "SAMDDPStrategy",
    "SAMStrategy",
    "StepProgressBar",
    "SparseTeacherDataModule",
    "TwoLayerLinear",
    "is_perturbed_pass",
    "sam_perturbation",
]

__version__ = "0.1.0"
