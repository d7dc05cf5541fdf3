"""Weight-space dynamics quantities of the paper (science.md §6), as plain tensor functions.

Every function takes a weight matrix whose rows are neurons (``W`` of shape ``(..., m, d)``,
leading axes broadcast, e.g. stacked replicas) and returns a tensor without leaving the
device (no ``.item()``), so it can run inside a training loop without a host sync.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "alignment",
    "cosine",
    "frobenius",
    "lazy_distance",
    "neuron_norms_sq",
    "two_layer_dynamics",
]


def neuron_norms_sq(W: torch.Tensor) -> torch.Tensor:
    """Squared neuron norms ‖wᵢ‖², shape ``(..., m)``."""
    return W.square().sum(-1)


def frobenius(W: torch.Tensor) -> torch.Tensor:
    """Frobenius norm ‖W‖_F, shape ``(...)``."""
    return W.square().sum((-2, -1)).sqrt()


def alignment(W: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-neuron alignment |⟨wᵢ, v⟩| with a reference vector ``v`` (e.g. θ⋆), shape ``(..., m)``."""
    return (W @ reference.unsqueeze(-1)).squeeze(-1).abs()


def cosine(W: torch.Tensor, reference: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Per-neuron |cos| between wᵢ and ``v``: |⟨wᵢ, v⟩| / (‖wᵢ‖‖v‖), in [0, 1]; 0 for a zero neuron."""
    denom = W.norm(dim=-1) * reference.norm(dim=-1, keepdim=True)
    return alignment(W, reference) / denom.clamp_min(eps)


def lazy_distance(W: torch.Tensor, W0: torch.Tensor) -> torch.Tensor:
    """√m · minᵢ ‖wᵢ − wᵢ(0)‖: ≥ 1 once every neuron has left the lazy ball of radius 1/√m."""
    m = W.shape[-2]
    return math.sqrt(m) * (W - W0).norm(dim=-1).amin(-1)


def two_layer_dynamics(
    W: torch.Tensor, a: torch.Tensor, W0: torch.Tensor, teacher: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The foundation's ``dynamics/*`` values for ŷ = aᵀWx with teacher θ⋆ (tags without prefix)."""
    theta = torch.einsum("...md,...m->...d", W, a)
    return {
        "norm_sq_mean": neuron_norms_sq(W).mean(-1),
        "frobenius": frobenius(W),
        "alignment_mean": alignment(W, teacher).mean(-1),
        "cosine_mean": cosine(W, teacher).mean(-1),
        "lazy_distance": lazy_distance(W, W0),
        "a_abs_mean": a.abs().mean(-1),
        "theta_error": (theta - teacher).norm(dim=-1),
    }
