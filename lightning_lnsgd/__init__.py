"""lightning_lnsgd: label-noise SGD and SAM as PyTorch Lightning plug-ins (arXiv 2603.10397).

Layout: ``callbacks``, ``strategies`` and ``metrics`` are the plug-ins for any LightningModule; ``nn`` holds modules
for any network (:class:`Linearized`); ``twolayer`` is the paper's model with its data, fused engine and kernels;
``examples`` are the real-network examples and ``examples.studies`` the commands that run them over seeds.
"""

from .callbacks import (
    DynamicsMonitor,
    HParamsSummary,
    LabelNoise,
    Laziness,
    PruningCurve,
)
from .examples import (
    CIFAR10DataModule,
    DigitsDataModule,
    GaussianMixtureDataModule,
    ImageClassifier,
    MLPClassifier,
    ResNet18,
)
from .nn import Linearized
from .protocol import MultiStepModule, StepLayout
from .rng import CounterRNG
from .strategies import SAMDDPStrategy, SAMStrategy, is_perturbed_pass, sam_perturbation
from .twolayer import (
    DivergenceError,
    OscillationOnly,
    SparseTeacherDataModule,
    StepProgressBar,
    TwoLayerLinear,
    expand_grid,
    read_replica_table,
)

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
    "Linearized",
    "MLPClassifier",
    "MultiStepModule",
    "OscillationOnly",
    "PruningCurve",
    "ResNet18",
    "SAMDDPStrategy",
    "SAMStrategy",
    "StepLayout",
    "StepProgressBar",
    "SparseTeacherDataModule",
    "TwoLayerLinear",
    "expand_grid",
    "is_perturbed_pass",
    "read_replica_table",
    "sam_perturbation",
]

__version__ = "0.1.0"
