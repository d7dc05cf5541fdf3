"""The ``dynamics/*`` values of the two-layer network, from the plug-ins' weight-space functions."""

from __future__ import annotations

import torch

from ..metrics import alignment, cosine, frobenius, lazy_distance, neuron_norms_sq
from .functional import end_to_end

__all__ = ["two_layer_dynamics"]


def two_layer_dynamics(
    W: torch.Tensor, a: torch.Tensor, W0: torch.Tensor, teacher: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The foundation's ``dynamics/*`` values for ŷ = aᵀWx with teacher θ⋆ (tags without prefix)."""
    theta = end_to_end(W, a)
    # The per-neuron quantities once each: W holds the snapshots of a whole sweep on the fused path.
    norms_sq, align = neuron_norms_sq(W), alignment(W, teacher)
    return {
        "norm_sq_mean": norms_sq.mean(-1),
        "frobenius": frobenius(W, norms_sq=norms_sq),
        "alignment_mean": align.mean(-1),
        "cosine_mean": cosine(W, teacher, norms_sq=norms_sq, align=align).mean(-1),
        "lazy_distance": lazy_distance(W, W0),
        "a_abs_mean": a.abs().mean(-1),
        "theta_error": (theta - teacher).norm(dim=-1),
    }
