"""Helpers shared by the callbacks: layer lookup by name, TensorBoard writers, scalar logging."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from ..compat import pl
import torch
from ..compat import TensorBoardLogger
from torch import nn

__all__ = ["resolve_weights"]


def resolve_weights(module: nn.Module, patterns: Sequence[str], field: str = "layers") -> dict[str, nn.Parameter]:
    """Maps layer specifications to weight parameters, keyed by the name used in tags.

    A pattern is matched, in this order, against: module paths (``"backbone.fc1"``: the module's ``weight``
    parameter; the tag name is the module path), then parameter paths (``"W"``, ``"backbone.fc1.weight"``: the tag
    name is the parameter path). ``fnmatch`` globs (``"blocks.*.fc"``) match every such name; a glob that matches a
    module without a ``weight`` parameter skips it. A pattern that matches nothing raises ``ValueError``.
    """
    modules = {name: m for name, m in module.named_modules() if name}
    weighted = {n: m.weight for n, m in modules.items() if isinstance(getattr(m, "weight", None), nn.Parameter)}
    params = dict(module.named_parameters())
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for pattern in patterns:
        matches = [(n, p) for n, p in weighted.items() if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            matches = [(n, p) for n, p in params.items() if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            available = sorted(set(weighted) | set(params))
            shown = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
            raise ValueError(
                f"`{field}`: {pattern!r} matches no layer (module with a `weight`) and no parameter of "
                f"{type(module).__name__}; available: {shown}."
            )
        for name, p in matches:
            if id(p) not in seen:
                seen.add(id(p))
                found[name] = p
    return found


def _tensorboards(trainer: pl.Trainer) -> list[Any]:
    """The SummaryWriters of the trainer's TensorBoard loggers (rank 0 only; elsewhere Lightning gives dummies)."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _log_scalars(trainer: pl.Trainer, values: dict[str, torch.Tensor], step: int) -> None:
    if not values:
        return
    # one host transfer for all scalars of this step
    floats = torch.stack([v.detach().double().cpu().reshape(()) for v in values.values()]).tolist()
    for lg in trainer.loggers:
        lg.log_metrics(dict(zip(values, floats)), step=step)


def _is_sam_perturbed_pass(trainer: pl.Trainer) -> bool:
    try:
        from ..strategies.sam import is_perturbed_pass
    except ImportError:  # SAM support not installed in this tree
        return False
    return bool(is_perturbed_pass(trainer))


