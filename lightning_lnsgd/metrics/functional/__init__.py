"""The metrics' math as plain tensor functions (torchmetrics' ``functional`` layout): weight-space quantities
(:mod:`.weights`) and function-space laziness (:mod:`.laziness`). The classes of :mod:`lightning_lnsgd.metrics` hold
state and call these."""

from .laziness import (
    VmapFailed,
    empirical_ntk,
    eval_mode,
    kernel_distance,
    linearization_gap,
    parameters_and_buffers,
)
from .weights import (
    alignment,
    cosine,
    effective_rank,
    effective_rank_from_singular_values,
    frobenius,
    gram,
    lazy_distance,
    neuron_norms_sq,
    norm_fraction,
    outgoing_norms,
    relative_distance,
    singular_values_from_gram,
    stable_rank,
    stable_rank_from_singular_values,
)

__all__ = [
    "VmapFailed",
    "alignment",
    "cosine",
    "effective_rank",
    "effective_rank_from_singular_values",
    "empirical_ntk",
    "eval_mode",
    "frobenius",
    "gram",
    "kernel_distance",
    "lazy_distance",
    "linearization_gap",
    "neuron_norms_sq",
    "norm_fraction",
    "outgoing_norms",
    "parameters_and_buffers",
    "relative_distance",
    "singular_values_from_gram",
    "stable_rank",
    "stable_rank_from_singular_values",
]
