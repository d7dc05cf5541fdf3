"""Weight-space dynamics quantities of the paper (science.md §6): plain tensor functions and torchmetrics classes.

Conventions: a weight matrix ``W`` has one row per neuron, shape ``(..., m, d)`` (row ``wᵢ``; a conv kernel
``(out, in, kh, kw)`` is read as ``out`` neurons of dimension ``in·kh·kw``). Weights are dimensionless, so every
quantity below is in "units of weight" (‖·‖ or ‖·‖², as stated) or a pure number.

* The **plain functions** take ``W`` with any leading axes (stacked replicas broadcast) and return tensors without
  leaving the device (no ``.item()``, no branching on values), so they run inside a training loop without a host sync.
* The **Metric classes** wrap the same functions (one formula, one place) for use with Lightning / torchmetrics and
  under DDP. Weight-space metrics describe the weights *at the last* ``update`` (a snapshot: ``update`` overwrites,
  it does not accumulate — weights are a state of the model, not a stream of samples). Data-dependent metrics
  (:class:`MeanLoss`, :class:`HalfMSE`) accumulate a sum and a count.

DDP semantics
-------------
Under DDP every rank holds bit-identical weights (DDP broadcasts them at the start and all-reduces the gradients), so
a weight-space metric computed on any one rank *is* the single-process value. Its states therefore reduce with
:func:`replicated` (keep the last of the gathered values), which returns that value bit for bit — a ``"mean"`` would
round for three or more ranks, and both ``"mean"`` and ``"max"`` would, in torchmetrics' ``forward`` (which merges the
batch state into the running state with the same reduction), turn the snapshot into a running average or maximum over
time. Data-dependent metrics reduce their sum and count with ``"sum"``, so the result is the mean over the union of the
ranks' samples (exact up to floating-point summation order). Every rank must call ``update`` before a synchronised
``compute`` (a collective); to read weight-space metrics on rank 0 only, pass ``sync_on_compute=False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric


__all__ = [
    # plain functions
    "alignment",
    "cosine",
    "effective_rank",
    "effective_rank_from_singular_values",
    "frobenius",
    "lazy_distance",
    "neuron_norms_sq",
    "norm_fraction",
    "outgoing_norms",
    "relative_distance",
    "replicated",
    "stable_rank",
    "stable_rank_from_singular_values",
    # torchmetrics classes
    "HalfMSE",
    "LazyDistance",
    "MeanLoss",
    "NeuronAlignment",
    "NeuronNorms",
    "RelativeDistance",
    "Sparsity",
]


# ------------------------------------------------------------------------------------------------------------------
# Plain functions
# ------------------------------------------------------------------------------------------------------------------
def neuron_norms_sq(W: torch.Tensor) -> torch.Tensor:
    """Squared neuron norms ‖wᵢ‖² (weight²), shape ``(..., m)``."""
    return W.square().sum(-1)


def frobenius(W: torch.Tensor) -> torch.Tensor:
    """Frobenius norm ‖W‖_F = (Σᵢ‖wᵢ‖²)^½ (weight), shape ``(...)``."""
    return W.square().sum((-2, -1)).sqrt()


def alignment(W: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-neuron alignment |⟨wᵢ, v⟩| with a reference vector ``v`` (e.g. θ⋆), shape ``(..., m)``.

    Units: weight × units of ``v``.
    """
    return (W @ reference.unsqueeze(-1)).squeeze(-1).abs()


def cosine(W: torch.Tensor, reference: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Per-neuron |cos| between wᵢ and ``v``: |⟨wᵢ, v⟩| / (‖wᵢ‖‖v‖), in [0, 1]; 0 for a zero neuron."""
    denom = W.norm(dim=-1) * reference.norm(dim=-1, keepdim=True)
    return alignment(W, reference) / denom.clamp_min(eps)


def lazy_distance(W: torch.Tensor, W0: torch.Tensor) -> torch.Tensor:
    """√m · minᵢ ‖wᵢ − wᵢ(0)‖: ≥ 1 once every neuron has left the lazy ball of radius 1/√m.

    Units: the lazy radius 1/√m (a pure number for the NTK initialisation, where ‖wᵢ(0)‖ ≈ 1).
    """
    m = W.shape[-2]
    return math.sqrt(m) * (W - W0).norm(dim=-1).amin(-1)


def relative_distance(W: torch.Tensor, W0: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Relative distance from initialisation ‖W − W(0)‖_F / ‖W(0)‖_F (pure number), shape ``(...)``."""
    return frobenius(W - W0) / frobenius(W0).clamp_min(eps)


def effective_rank_from_singular_values(s: torch.Tensor) -> torch.Tensor:
    """Effective rank exp(H(p)) of singular values ``s`` (last axis), Roy & Vetterli (2007).

    pᵢ = σᵢ / Σⱼσⱼ (the normalised singular values, not their squares), H(p) = −Σᵢ pᵢ ln pᵢ with 0·ln 0 = 0.
    A pure number in [1, rank W]: 1 for a rank-one matrix, k for k equal non-zero singular values; 0 for W = 0.
    """
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def stable_rank_from_singular_values(s: torch.Tensor) -> torch.Tensor:
    """Stable rank Σᵢσᵢ² / maxᵢσᵢ² = ‖W‖_F² / ‖W‖₂² (pure number in [1, rank W]; 0 for W = 0)."""
    top = s.amax(-1)
    value = s.square().sum(-1) / top.square().clamp_min(torch.finfo(s.dtype).tiny)
    return torch.where(top > 0, value, torch.zeros_like(value))


def effective_rank(W: torch.Tensor) -> torch.Tensor:
    """Effective rank of ``W`` (see :func:`effective_rank_from_singular_values`), shape ``(...)``.

    Uses an SVD, which synchronises a CUDA device with the host; the :class:`Sparsity` metric defers it to ``compute``.
    """
    return effective_rank_from_singular_values(torch.linalg.svdvals(W))


def stable_rank(W: torch.Tensor) -> torch.Tensor:
    """Stable rank ‖W‖_F² / ‖W‖₂² of ``W``, shape ``(...)`` (SVD: see :func:`effective_rank`)."""
    return stable_rank_from_singular_values(torch.linalg.svdvals(W))


def norm_fraction(W: torch.Tensor, mass: float = 0.9) -> torch.Tensor:
    """Fraction of neurons that carry ``mass`` (default 90 %) of Σᵢ‖wᵢ‖², shape ``(...)``, in (0, 1].

    k is the smallest number of neurons, taken by decreasing ‖wᵢ‖², whose ‖wᵢ‖² sum to at least ``mass``·Σᵢ‖wᵢ‖²;
    the value is k/m (1/m: one neuron carries it; ≈ ``mass``: the norm is spread evenly). 0 for W = 0.
    Computed in float64 so that the cumulative sum does not misplace the threshold.
    """
    n = neuron_norms_sq(W).to(_accumulation_dtype(W))
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
    """
    if A.ndim == 1:
        return A.abs()
    return A.square().sum(dim=[0, *range(2, A.ndim)]).sqrt()


def replicated(gathered: torch.Tensor) -> torch.Tensor:
    """State reduction of weight-space metrics: the last entry of a stack of equal values.

    torchmetrics calls it with the states of all ranks stacked along axis 0 (DDP sync: they are equal, since the
    weights are), and in ``forward`` with ``[running state, batch state]`` (the newer one is the snapshot).
    """
    return gathered[-1]


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    # MPS has no float64; everywhere else, accumulate in double.
    return torch.float32 if x.device.type == "mps" else torch.float64


def _as_matrix(W: torch.Tensor, who: str) -> torch.Tensor:
    """``W`` as an ``(m, d)`` matrix of neurons (rows), detached; conv kernels are flattened per output channel."""
    if W.ndim < 2:
        raise ValueError(
            f"{who}.update: `W` must have ≥ 2 axes (rows = neurons), got shape {tuple(W.shape)}; "
            "a vector of per-neuron values (a second layer) is not a weight matrix."
        )
    return W.detach().reshape(W.shape[0], -1)


def _reference_tensor(reference: torch.Tensor | Sequence[float] | None, who: str) -> torch.Tensor | None:
    if reference is None:
        return None
    ref = torch.as_tensor(reference, dtype=torch.float32).detach().clone()
    if ref.ndim != 1 or ref.numel() == 0:
        raise ValueError(f"{who}: `reference` must be a non-empty vector, got shape {tuple(ref.shape)}.")
    return ref


# ------------------------------------------------------------------------------------------------------------------
# Metric classes
# ------------------------------------------------------------------------------------------------------------------
class _WeightMetric(Metric):
    """Base of the weight-space metrics: snapshot states reduced with :func:`replicated` (see module docstring)."""

    is_differentiable = False
    higher_is_better = None
    # States whose shape depends on the weights (m neurons, Gram size) start empty; torchmetrics' cheap forward would
    # stack the empty default with the first batch state, so these metrics run update twice in forward instead.
    full_state_update = True

    def _snapshot(self, name: str, shape_dependent: bool) -> None:
        self.add_state(name, default=torch.zeros(0) if shape_dependent else torch.tensor(0.0), dist_reduce_fx=replicated)


class NeuronNorms(_WeightMetric):
    """Neuron norms of a weight matrix (rows = neurons).

    ``compute()`` returns a dict:

    * ``norm_sq_mean``: (1/m) Σᵢ ‖wᵢ‖² (weight²) — falls in the paper's Phase I;
    * ``frobenius``: ‖W‖_F = (Σᵢ‖wᵢ‖²)^½ (weight);
    * ``norm_sq``: the per-neuron ‖wᵢ‖², shape ``(m,)`` (for histograms).

    DDP: snapshot of replicated weights (module docstring).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._snapshot("norm_sq", shape_dependent=True)
        self._snapshot("frob", shape_dependent=False)

    def update(self, W: torch.Tensor) -> None:
        W = _as_matrix(W, type(self).__name__)
        self.norm_sq = neuron_norms_sq(W)
        self.frob = frobenius(W)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"norm_sq_mean": self.norm_sq.mean(), "frobenius": self.frob, "norm_sq": self.norm_sq}


class NeuronAlignment(_WeightMetric):
    """Alignment of the neurons with a reference vector v (the teacher θ⋆).

    Args:
        reference: v, shape ``(d,)`` (kept as a buffer, never a parameter: it moves with the metric and is saved in
            its state dict, but no optimizer sees it); ``None``: set it later with :meth:`set_reference`.

    ``compute()`` returns a dict:

    * ``alignment_mean``: (1/m) Σᵢ |⟨wᵢ, v⟩| (weight × units of v; the paper's figures);
    * ``cosine_mean``: (1/m) Σᵢ |⟨wᵢ, v⟩| / (‖wᵢ‖‖v‖) (pure number in [0, 1]; the paper's lemmas);
    * ``alignment``, ``cosine``: the per-neuron values, shape ``(m,)`` (histograms, the Fig. 2c scatter).
    """

    reference: torch.Tensor

    def __init__(self, reference: torch.Tensor | Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        ref = _reference_tensor(reference, type(self).__name__)
        self.register_buffer("reference", ref if ref is not None else torch.zeros(0))
        self._snapshot("alignment", shape_dependent=True)
        self._snapshot("cosine", shape_dependent=True)

    def set_reference(self, reference: torch.Tensor | Sequence[float]) -> None:
        """Replaces the reference vector v (shape ``(d,)``)."""
        ref = _reference_tensor(reference, type(self).__name__)
        self.reference = ref.to(self.reference.device)

    def update(self, W: torch.Tensor) -> None:
        name = type(self).__name__
        W = _as_matrix(W, name)
        if self.reference.numel() != W.shape[-1]:  # shapes only: no host sync
            raise ValueError(
                f"{name}.update: the reference vector has {self.reference.numel()} entries but the neurons have "
                f"dimension {W.shape[-1]}; pass `reference` of shape ({W.shape[-1]},)."
            )
        v = self.reference.to(W.dtype)
        self.alignment = alignment(W, v)
        self.cosine = cosine(W, v)

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "alignment_mean": self.alignment.mean(),
            "cosine_mean": self.cosine.mean(),
            "alignment": self.alignment,
            "cosine": self.cosine,
        }


class Sparsity(_WeightMetric):
    """How few directions and neurons carry a weight matrix.

    Args:
        mass: the share of Σᵢ‖wᵢ‖² for ``norm_fraction`` (default 0.9), in (0, 1].

    ``compute()`` returns a dict of pure numbers:

    * ``effective_rank``: exp(−Σᵢ pᵢ ln pᵢ), pᵢ = σᵢ/Σⱼσⱼ over the singular values σ of W (Roy & Vetterli 2007),
      in [1, min(m, d)]; → 1 as W collapses to rank one (the paper's Phase II);
    * ``stable_rank``: ‖W‖_F² / ‖W‖₂² = Σσᵢ² / σ₁², in [1, rank W];
    * ``norm_fraction``: the fraction of neurons that carry ``mass`` of Σᵢ‖wᵢ‖² (:func:`norm_fraction`).

    ``update`` only forms the Gram matrix (the smaller of WWᵀ and WᵀW, in float64) — no host sync; the
    eigen-decomposition, which synchronises a CUDA device, runs in ``compute``.
    """

    def __init__(self, mass: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < mass <= 1:
            raise ValueError(f"Sparsity: `mass` must be in (0, 1], got {mass!r}.")
        self.mass = float(mass)
        self._snapshot("gram", shape_dependent=True)
        self._snapshot("fraction", shape_dependent=False)

    def update(self, W: torch.Tensor) -> None:
        W = _as_matrix(W, type(self).__name__)
        Wd = W.to(_accumulation_dtype(W))
        self.gram = Wd @ Wd.T if W.shape[0] <= W.shape[1] else Wd.T @ Wd
        self.fraction = norm_fraction(W, self.mass)

    def compute(self) -> dict[str, torch.Tensor]:
        # Gram eigenvalues are σᵢ²; rounding can make the zero ones slightly negative.
        s = torch.linalg.eigvalsh(self.gram).clamp_min(0).sqrt()
        dtype = self.fraction.dtype
        return {
            "effective_rank": effective_rank_from_singular_values(s).to(dtype),
            "stable_rank": stable_rank_from_singular_values(s).to(dtype),
            "norm_fraction": self.fraction,
        }


class _DistanceMetric(_WeightMetric):
    """A scalar distance of W from its initial value W(0), kept as a buffer."""

    full_state_update = False  # scalar snapshot: ``replicated`` merges forward's batch state exactly
    initial: torch.Tensor

    def __init__(self, initial: torch.Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("initial", torch.zeros(0) if initial is None else initial.detach().clone())
        self._snapshot("value", shape_dependent=False)

    def set_initial(self, initial: torch.Tensor) -> None:
        """Sets W(0) (copied)."""
        self.initial = initial.detach().clone().to(self.initial.device)

    def _distance(self, W: torch.Tensor, W0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, W: torch.Tensor) -> None:
        name = type(self).__name__
        W = _as_matrix(W, name)
        if self.initial.numel() != W.numel():
            raise ValueError(
                f"{name}.update: the initial weights have {self.initial.numel()} entries (shape "
                f"{tuple(self.initial.shape)}) but W has shape {tuple(W.shape)}; set `initial` to W(0)."
            )
        self.value = self._distance(W, self.initial.reshape(W.shape).to(W.dtype))

    def compute(self) -> torch.Tensor:
        return self.value


class RelativeDistance(_DistanceMetric):
    """Relative distance from initialisation ‖W(t) − W(0)‖_F / ‖W(0)‖_F (pure number; 0 at t = 0).

    Args:
        initial: W(0) (copied into a buffer); ``None``: set it later with :meth:`set_initial`.
    """

    def _distance(self, W: torch.Tensor, W0: torch.Tensor) -> torch.Tensor:
        return relative_distance(W, W0)


class LazyDistance(_DistanceMetric):
    """The paper's laziness √m · minᵢ ‖wᵢ(t) − wᵢ(0)‖ (units of the lazy radius 1/√m; ≥ 1: every neuron escaped).

    Args:
        initial: W(0) (copied into a buffer); ``None``: set it later with :meth:`set_initial`.
    """

    def _distance(self, W: torch.Tensor, W0: torch.Tensor) -> torch.Tensor:
        return lazy_distance(W, W0)


class MeanLoss(Metric):
    """Mean of per-sample losses over every sample seen since ``reset`` (units of the loss).

    States: ``total`` (float64 sum of the losses) and ``count`` (number of samples), both reduced with ``"sum"``, so
    under DDP ``compute()`` is the mean over the union of the ranks' samples, not a mean of per-rank means.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor) -> None:
        """Adds per-sample losses (any shape; every element is one sample)."""
        losses = losses.detach()
        self.total = self.total + losses.to(self.total.dtype).sum()
        self.count = self.count + losses.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).to(torch.get_default_dtype())


class HalfMSE(MeanLoss):
    """Mean of ½(ŷ − y)² over every sample seen (the paper's loss; units of y²).

    ``update(preds, target)`` with equal shapes; for the two-layer model this is its ``test/loss``.
    """

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        if preds.shape != target.shape:
            raise ValueError(
                f"HalfMSE.update: `preds` has shape {tuple(preds.shape)} but `target` has {tuple(target.shape)}; "
                "they must be equal."
            )
        diff = preds.detach().to(torch.float64 if preds.device.type != "mps" else preds.dtype) - target.detach()
        super().update(0.5 * diff.square())
