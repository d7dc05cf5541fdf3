"""PredictionWriter: saves what ``trainer.predict`` returns to a file, so that ``predict`` from the command line
leaves its result somewhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..compat import LightningModule, Trainer, pl, rank_zero_info

__all__ = ["PredictionWriter"]


class PredictionWriter(pl.callbacks.BasePredictionWriter):
    """Writes, at the end of ``trainer.predict``, the predictions Lightning collected with :func:`torch.save`, in the
    structure ``trainer.predict`` returns: the list of per-batch outputs for one predict loader, a list of such lists
    for several.

    For :class:`~lightning_lnsgd.TwoLayerLinear` with :class:`~lightning_lnsgd.SparseTeacherDataModule` that is one
    tensor ŷ of shape ``(n_test,)`` (``(K, n_test)`` with K replicas): the predictions on the test inputs, in label
    units. Read it back with ``torch.load(path)``. A subclass of Lightning's ``BasePredictionWriter`` of the served
    package (:mod:`lightning_lnsgd.compat`).

    Args:
        path: the file to write; default ``<trainer.default_root_dir>/predictions.pt``. With several processes each
            rank writes its own shard, ``<path>.rank<k>``.
    """

    def __init__(self, path: Optional[str | os.PathLike] = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = None if path is None else Path(path)

    def output_path(self, trainer: Trainer) -> Path:
        """The file this rank writes."""
        path = self.path if self.path is not None else Path(trainer.default_root_dir) / "predictions.pt"
        return path if trainer.world_size == 1 else path.with_name(f"{path.name}.rank{trainer.global_rank}")

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        path = self.output_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_to_cpu(predictions), path)
        rank_zero_info(f"PredictionWriter: wrote the predictions to {path}")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
