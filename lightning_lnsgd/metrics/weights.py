"""Weight-space metrics of the paper (science.md §6) as torchmetrics classes: they hold state and call the functions
of :mod:`lightning_lnsgd.metrics.functional` (one formula, one place), for use with Lightning and under DDP.

Conventions: a weight matrix ``W`` has one row per neuron (a conv kernel ``(out, in, kh, kw)`` is read as ``out``
neurons of dimension ``in·kh·kw``); units as in :mod:`lightning_lnsgd.metrics.functional.weights`. Every metric
describes the weights *at the last* ``update`` (a snapshot: ``update`` overwrites, it does not accumulate — weights
are a state of the model, not a stream of samples). For losses and other means over samples use torchmetrics'
``MeanMetric`` / ``MeanSquaredError``.

DDP semantics
-------------
Under DDP every rank holds bit-identical weights (DDP broadcasts them at the start and all-reduces the gradients), so
a weight-space metric computed on any one rank *is* the single-process value. Its states therefore reduce with
:func:`replicated` (keep the last of the gathered values), which returns that value bit for bit — a ``"mean"`` would
round for three or more ranks, and both ``"mean"`` and ``"max"`` would, in torchmetrics' ``forward`` (which merges the
batch state into the running state with the same reduction), turn the snapshot into a running average or maximum over
time. Every rank must call ``update`` before a synchronised ``compute`` (a collective); to read the metrics on rank 0
only, pass ``sync_on_compute=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from .functional.weights import (
    alignment,
    cosine,
    effective_rank_from_singular_values,
    frobenius,
    gram,
    lazy_distance,
    neuron_norms_sq,
    norm_fraction,
    relative_distance,
    singular_values_from_gram,
    stable_rank_from_singular_values,
)

__all__ = ["LazyDistance", "NeuronAlignment", "NeuronNorms", "RelativeDistance", "Sparsity", "replicated"]


def replicated(gathered: torch.Tensor) -> torch.Tensor:
    """State reduction of weight-space metrics: the last entry of a stack of equal values.

    torchmetrics calls it with the states of all ranks stacked along axis 0 (DDP sync: they are equal, since the
    weights are), and in ``forward`` with ``[running state, batch state]`` (the newer one is the snapshot).

    >>> replicated(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    tensor([3., 4.])
    """
    return gathered[-1]


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
            raise ValueError(f"Sparsity: mass={mass!r} must be in (0, 1].")
        self.mass = float(mass)
        self._snapshot("gram", shape_dependent=True)
        self._snapshot("fraction", shape_dependent=False)

    def update(self, W: torch.Tensor) -> None:
        W = _as_matrix(W, type(self).__name__)
        self.gram = gram(W)
        self.fraction = norm_fraction(W, self.mass)

    def compute(self) -> dict[str, torch.Tensor]:
        s = singular_values_from_gram(self.gram)
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
