"""Weight-space quantities of the paper (science.md §6) as plain tensor functions.

Conventions: a weight matrix ``W`` has one row per neuron, shape ``(..., m, d)`` (row ``wᵢ``); every function takes
any leading axes (stacked replicas broadcast). Weights are dimensionless, so every quantity is in "units of weight"
(‖·‖ or ‖·‖², as stated) or a pure number. The functions return tensors without leaving the device (no ``.item()``,
no branching on values), so they run inside a training loop without a host sync, except the SVD-based ranks, which
say so. The metric classes of :mod:`lightning_lnsgd.metrics` hold state and call these functions.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "alignment",
    "cosine",
    "effective_rank",
    "effective_rank_from_singular_values",
    "frobenius",
    "gram",
    "lazy_distance",
    "neuron_norms_sq",
    "norm_fraction",
    "outgoing_norms",
    "relative_distance",
    "singular_values_from_gram",
    "stable_rank",
    "stable_rank_from_singular_values",
]


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for accumulations, except on MPS, which has no float64."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def neuron_norms_sq(W: torch.Tensor) -> torch.Tensor:
    """Squared neuron norms ‖wᵢ‖² (weight²), shape ``(..., m)``.

    >>> neuron_norms_sq(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    tensor([25.,  1.])
    """
    return W.square().sum(-1)


def frobenius(W: torch.Tensor, *, norms_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Frobenius norm ‖W‖_F = (Σᵢ‖wᵢ‖²)^½ (weight), shape ``(...)``.

    ``norms_sq``: the ‖wᵢ‖² of :func:`neuron_norms_sq`, when already at hand (one pass over ``W`` fewer). Summed per
    neuron, then over neurons, so that the value of one matrix does not depend on what is stacked with it.

    >>> frobenius(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    tensor(5.)
    """
    return (neuron_norms_sq(W) if norms_sq is None else norms_sq).sum(-1).sqrt()


def alignment(W: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-neuron alignment |⟨wᵢ, v⟩| with a reference vector ``v`` (e.g. θ⋆), shape ``(..., m)``.

    Units: weight × units of ``v``.

    >>> alignment(torch.tensor([[1.0, 2.0], [-3.0, 0.0]]), torch.tensor([1.0, 1.0]))
    tensor([3., 3.])
    """
    # Products reduced along d rather than a matrix product: a matrix product's rounding of one row depends on how many
    # rows it multiplies at once, so a stacked replica (or a DDP rank's block of replicas) would measure differently.
    return (W * reference.unsqueeze(-2)).sum(-1).abs()


def cosine(
    W: torch.Tensor,
    reference: torch.Tensor,
    eps: float = 1e-30,
    *,
    norms_sq: torch.Tensor | None = None,
    align: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-neuron |cos| between wᵢ and ``v``: |⟨wᵢ, v⟩| / (‖wᵢ‖‖v‖), in [0, 1]; 0 for a zero neuron.

    ``norms_sq`` (:func:`neuron_norms_sq`) and ``align`` (:func:`alignment`): the per-neuron values, when already at
    hand (fewer passes over ``W``).

    >>> cosine(torch.tensor([[2.0, 0.0], [0.0, -5.0], [0.0, 0.0]]), torch.tensor([1.0, 0.0]))
    tensor([1., 0., 0.])
    """
    norms = (neuron_norms_sq(W) if norms_sq is None else norms_sq).sqrt()
    denom = norms * reference.norm(dim=-1, keepdim=True)
    return (alignment(W, reference) if align is None else align) / denom.clamp_min(eps)


def lazy_distance(W: torch.Tensor, W0: torch.Tensor) -> torch.Tensor:
    """√m · minᵢ ‖wᵢ − wᵢ(0)‖: ≥ 1 once every neuron has left the lazy ball of radius 1/√m.

    Units: the lazy radius 1/√m (a pure number for the NTK initialisation, where ‖wᵢ(0)‖ ≈ 1). Here m = 4 neurons,
    the one that moved least moved by 0.5, so the value is √4 · 0.5 = 1:

    >>> lazy_distance(torch.tensor([[0.5], [1.0], [2.0], [3.0]]), torch.zeros(4, 1))
    tensor(1.)
    """
    m = W.shape[-2]
    return math.sqrt(m) * (W - W0).norm(dim=-1).amin(-1)


def relative_distance(W: torch.Tensor, W0: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Relative distance from initialisation ‖W − W(0)‖_F / ‖W(0)‖_F (pure number), shape ``(...)``.

    >>> relative_distance(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]]))
    tensor(1.3333)
    """
    return frobenius(W - W0) / frobenius(W0).clamp_min(eps)


def effective_rank_from_singular_values(s: torch.Tensor) -> torch.Tensor:
    """Effective rank exp(H(p)) of singular values ``s`` (last axis), Roy & Vetterli (2007).

    pᵢ = σᵢ / Σⱼσⱼ (the normalised singular values, not their squares), H(p) = −Σᵢ pᵢ ln pᵢ with 0·ln 0 = 0.
    A pure number in [1, rank W]: 1 for a rank-one matrix, k for k equal non-zero singular values; 0 for W = 0.

    >>> effective_rank_from_singular_values(torch.tensor([2.0, 2.0, 0.0]))
    tensor(2.)
    """
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def stable_rank_from_singular_values(s: torch.Tensor) -> torch.Tensor:
    """Stable rank Σᵢσᵢ² / maxᵢσᵢ² = ‖W‖_F² / ‖W‖₂² (pure number in [1, rank W]; 0 for W = 0).

    >>> stable_rank_from_singular_values(torch.tensor([2.0, 1.0]))  # (4 + 1) / 4
    tensor(1.2500)
    """
    top = s.amax(-1)
    value = s.square().sum(-1) / top.square().clamp_min(torch.finfo(s.dtype).tiny)
    return torch.where(top > 0, value, torch.zeros_like(value))


def effective_rank(W: torch.Tensor) -> torch.Tensor:
    """Effective rank of ``W`` (see :func:`effective_rank_from_singular_values`), shape ``(...)``.

    Uses an SVD, which synchronises a CUDA device with the host; the :class:`~lightning_lnsgd.metrics.Sparsity`
    metric defers its eigen-decomposition to ``compute``.

    >>> effective_rank(torch.eye(3))
    tensor(3.)
    """
    return effective_rank_from_singular_values(torch.linalg.svdvals(W))


def stable_rank(W: torch.Tensor) -> torch.Tensor:
    """Stable rank ‖W‖_F² / ‖W‖₂² of ``W``, shape ``(...)`` (SVD: see :func:`effective_rank`).

    >>> stable_rank(torch.diag(torch.tensor([2.0, 1.0])))
    tensor(1.2500)
    """
    return stable_rank_from_singular_values(torch.linalg.svdvals(W))


def gram(W: torch.Tensor) -> torch.Tensor:
    """The smaller of the Gram matrices W Wᵀ and Wᵀ W, in float64 (float32 on MPS), shape ``(..., n, n)``,
    n = min(m, d). Its eigenvalues are the squared singular values σᵢ² of W; forming it needs no host sync.

    >>> gram(torch.tensor([[1.0, 2.0, 2.0]]))  # one neuron: W Wᵀ = ‖w‖² = 9
    tensor([[9.]], dtype=torch.float64)
    """
    Wd = W.to(accumulation_dtype(W))
    return Wd @ Wd.mT if W.shape[-2] <= W.shape[-1] else Wd.mT @ Wd


def singular_values_from_gram(G: torch.Tensor) -> torch.Tensor:
    """Singular values σᵢ of W from its Gram matrix ``G`` (:func:`gram`), ascending (eigen-decomposition: a host sync
    on CUDA). Rounding can make the zero eigenvalues slightly negative; they are clamped to 0.

    >>> singular_values_from_gram(torch.tensor([[9.0, 0.0], [0.0, 4.0]]))
    tensor([2., 3.])
    """
    return torch.linalg.eigvalsh(G).clamp_min(0).sqrt()


def norm_fraction(W: torch.Tensor, mass: float = 0.9) -> torch.Tensor:
    """Fraction of neurons that carry ``mass`` (default 90 %) of Σᵢ‖wᵢ‖², shape ``(...)``, in (0, 1].

    k is the smallest number of neurons, taken by decreasing ‖wᵢ‖², whose ‖wᵢ‖² sum to at least ``mass``·Σᵢ‖wᵢ‖²;
    the value is k/m (1/m: one neuron carries it; ≈ ``mass``: the norm is spread evenly). 0 for W = 0.
    Computed in float64 so that the cumulative sum does not misplace the threshold. Here the first of four neurons
    carries 9/10 of the squared norm:

    >>> norm_fraction(torch.tensor([[3.0], [0.5], [0.5], [0.5]]))  # 9 of 9.75 ≥ 0.9 · 9.75: k = 1
    tensor(0.2500)
    """
    n = neuron_norms_sq(W).to(accumulation_dtype(W))
    m = n.shape[-1]
    sorted_n = n.sort(dim=-1, descending=True).values
    before = sorted_n.cumsum(-1) - sorted_n  # mass of the larger neurons, before neuron j
    # neuron j is needed iff the neurons before it do not yet reach the target mass
    k = (before < mass * n.sum(-1, keepdim=True)).sum(-1)
    return k.to(W.dtype) / m


def outgoing_norms(A: torch.Tensor) -> torch.Tensor:
    """Per-neuron norm of the weights *leaving* neuron i of the previous layer (weight), shape ``(m,)``.

    |aᵢ| for a second layer that is a vector ``a`` of shape ``(m,)``; the column norm ‖A[:, i]‖ for a matrix ``A`` of
    shape ``(out, m)`` (a linear head); input axes beyond the second of a conv kernel are summed over too.

    >>> outgoing_norms(torch.tensor([-2.0, 0.5]))
    tensor([2.0000, 0.5000])
    >>> outgoing_norms(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
    tensor([5., 1.])
    """
    if A.ndim == 1:
        return A.abs()
    return A.square().sum(dim=[0, *range(2, A.ndim)]).sqrt()
