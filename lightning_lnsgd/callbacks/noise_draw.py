"""The label-noise draws of :class:`~lightning_lnsgd.LabelNoise`, from a :class:`~lightning_lnsgd.rng.CounterRNG`.

Each function makes one draw per SGD step: ``n=None`` for a label of one step (shape ``shape``), ``n=k`` for the
labels of ``k`` steps stacked along axis 0 (equal to ``k`` single draws). ``level`` is a float, or a float64 tensor
that broadcasts against the draw (one level per step row and/or per stacked replica).
"""

from __future__ import annotations

import torch

from ..rng import CounterRNG, replica_stream

__all__ = ["NoiseStreams", "additive", "flip", "label_levels"]

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
    if isinstance(level, torch.Tensor):
        return labels + (eps * level).to(labels.dtype)
    return labels + eps * level


def flip(
    labels: torch.Tensor, rng: CounterRNG, num_classes: int, prob: Level, n: int | None, shape: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy, flipped)``: each integer class label in [0, num_classes) is, with probability ``prob``, replaced by
    a class drawn uniformly from the other ``num_classes − 1``; ``flipped`` is the boolean mask of replaced labels.

    One 64-bit draw per label: the high 32 bits decide the flip (probability ``prob`` up to 2⁻³²), the low 32 bits
    pick an offset in {1, …, c − 1}, so the new class ``(y + offset) mod c`` is never the original.
    """
    z = rng.bits(shape, n, labels.device)
    u = ((z >> 32) & 0xFFFFFFFF).to(torch.float64) * (2.0**-32)
    offset = 1 + (((z & 0xFFFFFFFF) * (num_classes - 1)) >> 32)
    mask = u < prob
    flipped = torch.remainder(labels.to(torch.int64) + offset, num_classes).to(labels.dtype)
    return torch.where(mask, flipped, labels), mask


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
    DDP rank), seeded by ``seed`` (a stacked replica's stream by ``replica_stream(seed, replica seed)``).

    A draw is a pure function of the seed, the rank, the replica seed and the counter of SGD steps drawn before it.
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
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """``(noisy labels, flipped mask or None, counter after the draw)`` for labels whose first ``lead`` axes are
        (replica, step) axes; ``steps`` is the step axis's length, or ``None`` for one step's label."""
        rng = self._stream(replica_seeds, rank)
        rng.counter = counter
        shape = tuple(labels.shape[lead:])
        if self.kind == "flip":
            noisy, mask = flip(labels, rng, int(num_classes), level, steps, shape)  # type: ignore[arg-type]
        else:
            noisy, mask = additive(labels, rng, self.kind, level, steps, shape), None
        return noisy, mask, rng.counter

    def _stream(self, replica_seeds: tuple[int, ...] | None, rank: int) -> CounterRNG:
        key = (replica_seeds, rank)
        if key not in self._rngs:
            seeds: int | list[int] = (
                self.seed if replica_seeds is None else [replica_stream(self.seed, r) for r in replica_seeds]
            )
            self._rngs[key] = CounterRNG(seeds, stream=STREAM, rank=rank)
        return self._rngs[key]
