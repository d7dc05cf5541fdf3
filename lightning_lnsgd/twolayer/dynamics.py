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
    return {
        "norm_sq_mean": neuron_norms_sq(W).mean(-1),
        "frobenius": frobenius(W),
        "alignment_mean": alignment(W, teacher).mean(-1),
        "cosine_mean": cosine(W, teacher).mean(-1),
        "lazy_distance": lazy_distance(W, W0),
        "a_abs_mean": a.abs().mean(-1),
        "theta_error": (theta - teacher).norm(dim=-1),
    }
