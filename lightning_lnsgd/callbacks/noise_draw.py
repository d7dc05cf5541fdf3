"""The label-noise draws of :class:`~lightning_lnsgd.LabelNoise`, from a :class:`~lightning_lnsgd.rng.CounterRNG`.

Each function makes one draw per SGD step: ``n=None`` for a label of one step (shape ``shape``), ``n=k`` for the
labels of ``k`` steps stacked along axis 0 (equal to ``k`` single draws). ``level`` is a float, or a float64 tensor
that broadcasts against the draw (one level per step row and/or per stacked replica).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import is_real
from ..rng import CounterRNG, replica_stream

__all__ = [
    "ROW_SUM_TOLERANCE",
    "TRANSITIONS",
    "NoiseStreams",
    "TransitionTable",
    "additive",
    "flip",
    "label_levels",
    "transition_table",
]

#: The CounterRNG stream name of label noise.
STREAM = "label_noise"

Level = float | torch.Tensor


def additive(
    labels: torch.Tensor, rng: CounterRNG, kind: str, level: Level, n: int | None, shape: tuple
) -> torch.Tensor:
    """``labels + level · ε`` (a new tensor, dtype of ``labels``): ε = ±1 (``kind="rademacher"``) or ε ~ N(0, 1)
    (``"gaussian"``), drawn with ``shape`` per step."""
    if kind == "rademacher":
        eps = rng.rademacher(shape, n, labels.device, dtype=labels.dtype)
    else:
        eps = rng.normal(shape, n, labels.device, dtype=labels.dtype)
    # In place: ε·level is computed in the wider dtype and rounded to ε's, as ``(eps * level).to(...)`` would be,
    # without a temporary of the batch's size in float64.
    return labels + eps.mul_(level)


class TransitionTable:
    """A C × C row-stochastic matrix T as a sampler: label c becomes class j with probability T[c, j].

    Row c's cumulative sums are rounded to multiples of 2⁻³² (so each probability is exact up to 2⁻³², like the
    flip decision) and stored as int64 keys ``c · 2³³ + round(2³² · Σ_{i≤j} T[c, i])`` in one sorted vector;
    sampling is one integer ``searchsorted`` per label (no C-wide temporary per label), bit-identical on every
    device.
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix.to(torch.float64)
        c = self.matrix.shape[0]
        cdf = torch.round(torch.cumsum(self.matrix, dim=1) * 2.0**32).to(torch.int64).clamp_(0, 1 << 32)
        cdf[:, -1] = 1 << 32  # the last class closes every row, whatever the float rounding of the row sum
        cdf = torch.cummax(cdf, dim=1).values  # nondecreasing even if rounding made a step go down
        self.keys = ((torch.arange(c, dtype=torch.int64)[:, None] << 33) + cdf).reshape(-1)
        self._cache: dict[torch.device, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return int(self.matrix.shape[0])

    def mean_flip_rate(self) -> float:
        """The fraction of labels changed when classes are equally frequent: (1/C) Σ_c (1 − T[c, c])."""
        return float((1.0 - torch.diagonal(self.matrix)).mean())

    def sample(self, classes: torch.Tensor, u32: torch.Tensor) -> torch.Tensor:
        """The new class of each label in ``classes`` (int64 in [0, C)), from uniform 32-bit integers ``u32``:
        the smallest j with ``u32 < 2³² · Σ_{i≤j} T[c, i]`` (inverse CDF)."""
        keys = self._cache.get(classes.device)
        if keys is None:
            keys = self._cache[classes.device] = self.keys.to(classes.device)
        idx = torch.searchsorted(keys, ((classes << 33) + u32).reshape(-1), right=True).view(classes.shape)
        return idx - classes * self.num_classes


#: The named class-conditional flip models of ``flip``; a :class:`TransitionTable` is the third kind.
TRANSITIONS = ("symmetric", "pair")


def flip(
    labels: torch.Tensor,
    rng: CounterRNG,
    num_classes: int,
    prob: Level,
    n: int | None,
    shape: tuple,
    transition: str | TransitionTable = "symmetric",
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy, flipped)`` for integer class labels in [0, num_classes); ``flipped`` is the boolean mask of the
    labels that changed. Labels where ``keep`` is False (ignored or invalid entries) are left as they are.

    One 64-bit draw per label: the high 32 bits ``h`` decide whether the label is redrawn (``h · 2⁻³² < prob``,
    probability ``prob`` up to 2⁻³²), the low 32 bits ``l`` pick the new class:

    * ``"symmetric"``: offset ``1 + ⌊l · (c − 1) / 2³²⌋`` in {1, …, c − 1}, new class ``(y + offset) mod c``: uniform
      over the other classes, never the original;
    * ``"pair"``: ``(y + 1) mod c`` (``l`` unused);
    * a :class:`TransitionTable`: class j with probability T[y, j] (inverse CDF on ``l``); with ``prob`` the
      schedule's factor f this draws from (1 − f)·I + f·T.
    """
    z = rng.bits(shape, n, labels.device)
    u = ((z >> 32) & 0xFFFFFFFF).to(torch.float64) * (2.0**-32)
    low = z & 0xFFFFFFFF
    y = labels.to(torch.int64)
    if keep is not None:
        y = torch.where(keep, y, torch.zeros_like(y))  # ignored / invalid entries index nothing out of range
    if isinstance(transition, TransitionTable):
        new = transition.sample(y, low)
    elif transition == "pair":
        new = torch.remainder(y + 1, num_classes)
    else:
        new = torch.remainder(y + 1 + ((low * (num_classes - 1)) >> 32), num_classes)
    mask = (u < prob) & (new != y)
    if keep is not None:
        mask &= keep
    return torch.where(mask, new.to(labels.dtype), labels), mask


def label_levels(
    factors: list[float], level: float, replica_levels: list[float] | None, device: torch.device, dims: int
) -> Level:
    """The noise level of each label of ``len(factors)`` SGD steps: one float when it is the same everywhere, else a
    float64 tensor over the (replica, step) axes that broadcasts over the ``dims`` axes of one step's label.

    ``factors`` are the schedule's factors of the steps; ``level`` the full level (σ or τ); ``replica_levels`` one
    full σ per stacked replica, or ``None``.
    """
    k = len(factors)
    if replica_levels is not None:  # (R, k, 1, …) = σ_r × the factor of step row i
        factor = torch.tensor(factors, dtype=torch.float64, device=device)
        sigma = torch.tensor(replica_levels, dtype=torch.float64, device=device)
        return (sigma[:, None] * factor[None, :]).view(len(replica_levels), k, *([1] * dims))
    levels = [level * f for f in factors]
    if len(set(levels)) == 1:
        return levels[0]
    return torch.tensor(levels, dtype=torch.float64, device=device).view(k, *([1] * dims))


class NoiseStreams:
    """The random streams of one :class:`~lightning_lnsgd.LabelNoise`: one :class:`CounterRNG` per (replica seeds,
    rank), seeded by ``seed`` (a stacked replica's stream by ``replica_stream(seed, replica seed)``).

    A draw is a pure function of the seed, the rank, the replica seed and the counter of SGD steps drawn before it.
    ``rank`` is the one the caller mixes in: the DDP rank, or 0 for replicas sharded over ranks (their own streams).
    """

    def __init__(self, kind: str, seed: int) -> None:
        self.kind, self.seed = kind, seed
        self._rngs: dict[tuple[tuple[int, ...] | None, int], CounterRNG] = {}

    def draw(
        self,
        labels: torch.Tensor,
        counter: int,
        rank: int,
        replica_seeds: tuple[int, ...] | None,
        steps: int | None,
        lead: int,
        level: Level,
        num_classes: int | None = None,
        transition: str | TransitionTable = "symmetric",
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """``(noisy labels, flipped mask or None, counter after the draw)`` for labels whose first ``lead`` axes are
        (replica, step) axes; ``steps`` is the step axis's length, or ``None`` for one step's label.

        ``labels`` are class indices for ``kind="flip"`` (``transition`` as in :func:`flip`); entries where ``keep``
        is False are returned unchanged (for every kind), and their draws are made and discarded, so the other
        entries get the same noise either way."""
        rng = self._stream(replica_seeds, rank)
        rng.counter = counter
        shape = tuple(labels.shape[lead:])
        if self.kind == "flip":
            noisy, mask = flip(labels, rng, int(num_classes), level, steps, shape, transition, keep)  # type: ignore[arg-type]
        else:
            noisy, mask = additive(labels, rng, self.kind, level, steps, shape), None
            if keep is not None:
                noisy = torch.where(keep, noisy, labels)
        return noisy, mask, rng.counter

    def _stream(self, replica_seeds: tuple[int, ...] | None, rank: int) -> CounterRNG:
        key = (replica_seeds, rank)
        if key not in self._rngs:
            seeds: int | list[int] = (
                self.seed if replica_seeds is None else [replica_stream(self.seed, r) for r in replica_seeds]
            )
            self._rngs[key] = CounterRNG(seeds, stream=STREAM, rank=rank)
        return self._rngs[key]


#: How far a row of a ``transition`` matrix may sum from 1.
ROW_SUM_TOLERANCE = 1e-6


def transition_table(transition: Any) -> TransitionTable | None:
    """The sampler of a transition matrix (nested list or tensor); ``None`` for a name. Raises ``ValueError``
    naming the first row that is not a probability distribution over C classes."""
    if isinstance(transition, str):
        return None
    if isinstance(transition, torch.Tensor):
        if transition.dim() != 2 or transition.is_complex():
            raise ValueError(
                f"LabelNoise: a `transition` tensor must be a real C x C matrix, got shape {tuple(transition.shape)}."
            )
        rows = transition.detach().to("cpu", torch.float64).tolist()
    elif isinstance(transition, (list, tuple)):
        rows = list(transition)
    else:
        return None
    c = len(rows)
    if c < 2:
        raise ValueError(f"LabelNoise: a `transition` matrix needs C >= 2 rows (C x C), got {c}.")
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != c:
            raise ValueError(
                f"LabelNoise: row {i} of `transition` is {row!r}; a C x C matrix with C = {c} rows needs {c} entries"
                " per row."
            )
        if not all(is_real(v, 0.0) for v in row):
            raise ValueError(f"LabelNoise: row {i} of `transition` has an entry that is not a finite number >= 0: {row!r}.")
        total = sum(float(v) for v in row)
        if abs(total - 1.0) > ROW_SUM_TOLERANCE:
            raise ValueError(
                f"LabelNoise: row {i} of `transition` sums to {total:g}, not 1 (row c is the distribution of the noisy"
                f" label of class c; tolerance {ROW_SUM_TOLERANCE:g}): {row!r}."
            )
    return TransitionTable(torch.tensor(rows, dtype=torch.float64))
