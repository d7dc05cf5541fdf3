"""The paper's metrics, in torchmetrics' layout.

* :mod:`lightning_lnsgd.metrics.functional`: the math as plain tensor functions (weight-space quantities and
  function-space laziness); re-exported here.
* the :class:`torchmetrics.Metric` classes below: state and DDP reduction only, calling those functions.

Means over samples (losses, errors) are torchmetrics' own ``MeanMetric`` and ``MeanSquaredError``.
"""

from .functional import (
    alignment,
    cosine,
    effective_rank,
    effective_rank_from_singular_values,
    empirical_ntk,
    frobenius,
    gram,
    kernel_distance,
    lazy_distance,
    linearization_gap,
    neuron_norms_sq,
    norm_fraction,
    outgoing_norms,
    relative_distance,
    singular_values_from_gram,
    stable_rank,
    stable_rank_from_singular_values,
)
from .weights import (
    LazyDistance,
    NeuronAlignment,
    NeuronNorms,
    RelativeDistance,
    Sparsity,
    replicated,
)

__all__ = [
    # functions (lightning_lnsgd.metrics.functional)
    "alignment",
    "cosine",
    "effective_rank",
    "effective_rank_from_singular_values",
    "empirical_ntk",
    "frobenius",
    "gram",
    "kernel_distance",
    "lazy_distance",
    "linearization_gap",
    "neuron_norms_sq",
    "norm_fraction",
    "outgoing_norms",
    "relative_distance",
    "singular_values_from_gram",
    "stable_rank",
    "stable_rank_from_singular_values",
    # torchmetrics classes
    "LazyDistance",
    "NeuronAlignment",
    "NeuronNorms",
    "RelativeDistance",
    "Sparsity",
    "replicated",
]
