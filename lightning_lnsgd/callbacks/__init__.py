"""Callbacks for any LightningModule: label noise, weight-space dynamics, pruning curve, laziness, hparams table."""

from ._common import resolve_weights
from .dynamics import DynamicsMonitor
from .hparams import HParamsSummary
from .label_noise import LabelNoise
from .laziness import Laziness
from .predictions import PredictionWriter
from .pruning import PruningCurve

__all__ = ["DynamicsMonitor", "HParamsSummary", "LabelNoise", "Laziness", "PredictionWriter", "PruningCurve", "resolve_weights"]
