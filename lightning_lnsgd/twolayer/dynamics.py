"""The ``dynamics/*`` values of the two-layer network, from the plug-ins' weight-space functions.

They are computed in two stages, so that the fused numba kernel can do the first inside its step loop without
copying the weights out: :func:`weight_stats` reduces the per-neuron quantities over the neurons into
:data:`STATS` and θ, and :func:`dynamics_from_stats` turns those sums into the logged values.
:func:`two_layer_dynamics` is the two together.
"""

from __future__ import annotations

import math

import torch

from ..metrics import alignment, cosine, neuron_norms_sq
from .functional import end_to_end

__all__ = ["STATS", "dynamics_from_stats", "lazy_from_stats", "two_layer_dynamics", "weight_stats"]

#: The sums over the neurons that :func:`weight_stats` returns (last axis, in this order), followed by θ (d values):
#: Σᵢ‖wᵢ‖², Σᵢ|⟨wᵢ, θ⋆⟩|, Σᵢ|cos(wᵢ, θ⋆)|, minᵢ‖wᵢ − wᵢ(0)‖², Σᵢ|aᵢ|. The numba kernel computes the same
#: (:func:`lightning_lnsgd.twolayer.kernels.run_steps` with ``stats_against``).
STATS = ("norm_sq_sum", "alignment_sum", "cosine_sum", "lazy_min_sq", "a_abs_sum")


def weight_stats(W: torch.Tensor, a: torch.Tensor, W0: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The :data:`STATS` of ``W`` ``(..., m, d)``, ``a`` ``(..., m)`` and then θ = Wᵀa: shape ``(..., 5 + d)``,
    float64 (weight², weight × units of θ⋆, pure number, weight², units of a; θ in units of θ⋆)."""
    norms_sq, align = neuron_norms_sq(W), alignment(W, teacher)
    sums = [
        norms_sq.sum(-1),
        align.sum(-1),
        cosine(W, teacher, norms_sq=norms_sq, align=align).sum(-1),
        (W - W0).square().sum(-1).amin(-1),
        a.abs().sum(-1),
    ]
    return torch.cat([torch.stack(sums, -1).double(), end_to_end(W, a).double()], -1)


def lazy_from_stats(stats: torch.Tensor, width: int) -> torch.Tensor:
    """``lazy_distance`` (√m · minᵢ‖wᵢ − wᵢ(0)‖, units of the lazy radius) from :func:`weight_stats`."""
    return math.sqrt(width) * stats[..., STATS.index("lazy_min_sq")].sqrt()


def dynamics_from_stats(stats: torch.Tensor, width: int, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """The foundation's ``dynamics/*`` values (tags without prefix) from :func:`weight_stats` of a layer of ``width``
    neurons; each of shape ``stats.shape[:-1]``."""
    sums = dict(zip(STATS, stats[..., : len(STATS)].unbind(-1)))
    theta = stats[..., len(STATS) :]
    return {
        "norm_sq_mean": sums["norm_sq_sum"] / width,
        "frobenius": sums["norm_sq_sum"].sqrt(),
        "alignment_mean": sums["alignment_sum"] / width,
        "cosine_mean": sums["cosine_sum"] / width,
        "lazy_distance": lazy_from_stats(stats, width),
        "a_abs_mean": sums["a_abs_sum"] / width,
        "theta_error": (theta - teacher.to(theta.dtype)).norm(dim=-1),
    }


def two_layer_dynamics(
    W: torch.Tensor, a: torch.Tensor, W0: torch.Tensor, teacher: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The foundation's ``dynamics/*`` values for ŷ = aᵀWx with teacher θ⋆ (tags without prefix)."""
    return dynamics_from_stats(weight_stats(W, a, W0, teacher), W.shape[-2], teacher)
