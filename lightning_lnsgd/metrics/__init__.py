"""Dynamics metrics as torchmetrics: neuron norms, alignment, sparsity, distances from the initialisation."""

from .weights import *  # noqa: F401,F403
