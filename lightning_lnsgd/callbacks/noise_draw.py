"""The label-noise draws of :class:`~lightning_lnsgd.LabelNoise`, from a :class:`~lightning_lnsgd.rng.CounterRNG`.

Each function makes one draw per SGD step: ``n=None`` for a label of one step (shape ``shape``), ``n=k`` for the
labels of ``k`` steps stacked along axis 0 (equal to ``k`` single draws). ``level`` is a float, or a float64 tensor
that broadcasts against the draw (one level per step row and/or per stacked replica).
"""

from __future__ import annotations

import torch

from ..rng import CounterRNG

__all__ = ["additive", "flip"]

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
