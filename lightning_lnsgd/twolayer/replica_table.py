"""The per-replica results of a stacked :class:`~lightning_lnsgd.TwoLayerLinear` as one CSV table beside the run,
so that a sweep of a thousand replicas is read back from one file rather than a thousand event files."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compat import Callback

if TYPE_CHECKING:  # pragma: no cover
    from .model import TwoLayerLinear

__all__ = ["REPLICA_TABLE", "ReplicaTable", "read_replica_table"]

#: The table's file name, in the log directory of the fit's first logger (a fit without a logger writes none).
REPLICA_TABLE = "replicas.csv"


def read_replica_table(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a ``replicas.csv`` (or of the one inside the directory ``path``), every value as a float."""
    path = Path(path)
    if path.is_dir():
        path = path / REPLICA_TABLE
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


class ReplicaTable(Callback):
    """Writes ``replicas.csv`` beside the run (:meth:`path`): one row per replica, in replica order, on global rank 0 at
    the end of training and when the fit stops with an exception (with the values reached so far).

    Columns: ``replica`` (its index k), its settings (:meth:`~lightning_lnsgd.TwoLayerLinear.replica_settings`:
    ``seed``, ``lr`` η, ``init_scale`` α, ``sigma`` σ or ``flip_prob``, ``rho`` ρ), ``escape_step`` (the first checked
    SGD step at which it left the lazy ball; −1: not within the run), ``step`` (the SGD steps done) and the final
    value of every logged tag (``train/loss``, ``test/loss``, ``dynamics/*``) of its weights.
    """

    def __init__(self, model: TwoLayerLinear) -> None:
        super().__init__()
        self.model = model

    def path(self, trainer: Any) -> Path | None:
        """Where the table goes: the first logger's ``log_dir`` (else its ``save_dir``); ``None`` without a logger."""
        for logger in trainer.loggers:
            where = getattr(logger, "log_dir", None) or logger.save_dir
            if where:
                return Path(where) / REPLICA_TABLE
        return None

    def write(self, trainer: Any) -> Path | None:
        """Writes the table (rank 0 only) and returns its path; ``None`` without replicas or a logger, or off rank 0."""
        model = self.model
        settings = model.replica_settings()
        path = self.path(trainer)
        if settings is None or path is None or not trainer.is_global_zero:
            return None
        values = {tag: v.detach().double().cpu().tolist() for tag, v in model.dynamics().items()}
        escape = model.escape_step.detach().cpu().tolist()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["replica", *settings[0], "escape_step", "step", *values])
            for k, row in enumerate(settings):
                writer.writerow([k, *row.values(), escape[k], trainer.global_step, *(repr(v[k]) for v in values.values())])
        return path

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.write(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.model.trainer is not None:
            self.write(trainer)
