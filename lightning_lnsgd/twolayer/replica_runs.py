"""One TensorBoard run per stacked replica of :class:`~lightning_lnsgd.TwoLayerLinear`, so that TensorBoard overlays
the replicas of a sweep in one chart per tag and lists one HPARAMS row per replica."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from ..callbacks._common import write_scalars
from ..callbacks.hparams import HParamsSummary
from ..compat import Callback, is_tensorboard_logger

if TYPE_CHECKING:  # pragma: no cover
    from .model import TwoLayerLinear

__all__ = ["ReplicaRuns", "run_names"]

#: Settings that name a replica's run when they differ between replicas, with the short form used in the name.
NAMED_SETTINGS = {"sigma": "sigma", "flip_prob": "flip", "lr": "lr", "init_scale": "init", "rho": "rho"}


def run_names(settings: list[dict[str, Any]]) -> list[str]:
    """The run folder of each replica: ``r{k}`` zero-padded to the width of K − 1, each setting of
    :data:`NAMED_SETTINGS` that differs between replicas, and the replica's seed, e.g. ``r03-sigma4-seed3``.

    Only letters, digits, ``.``, ``+`` and ``-`` appear; the names depend on the settings alone."""
    width = len(str(len(settings) - 1))
    varying = [n for n in NAMED_SETTINGS if n in settings[0] and len({row[n] for row in settings}) > 1]
    names = []
    for k, row in enumerate(settings):
        parts = [f"r{k:0{width}d}", *(f"{NAMED_SETTINGS[n]}{_short(row[n])}" for n in varying)]
        if "seed" in row:
            parts.append(f"seed{row['seed']}")
        names.append(re.sub(r"[^A-Za-z0-9.+-]", "_", "-".join(parts)))
    return names


def _hparams_summary(trainer: Any) -> HParamsSummary | None:
    """The fit's :class:`~lightning_lnsgd.HParamsSummary`, if one is attached (it writes the replicas' rows)."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, HParamsSummary)), None)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class ReplicaRuns(Callback):
    """The replicas' own TensorBoard runs: ``<log_dir>/<name>`` of every TensorBoard logger of the fit (names from
    :func:`run_names`), written with ``torch.utils.tensorboard.SummaryWriter`` on global rank 0.

    Only for a stacked model with at most ``log_replicas`` replicas: past that the per-replica results go to
    ``replicas.csv`` alone (:class:`~lightning_lnsgd.twolayer.replica_table.ReplicaTable`).

    The model returns it from ``configure_callbacks``: the runs open at the start of training (with one HPARAMS row
    each when an :class:`~lightning_lnsgd.HParamsSummary` is attached), and close at the end of fit (after the
    rows' session-end records) or when the fit ends with an exception (a divergence, an interruption), so that
    nothing written is lost.
    """

    def __init__(self, model: TwoLayerLinear) -> None:
        super().__init__()
        self.model = model
        self._writers: dict[int, list[Any]] = {}  # id(logger) -> one SummaryWriter per replica

    @property
    def names(self) -> list[str]:
        """The replicas' run folders (see :func:`run_names`)."""
        settings = self.model.replica_settings()
        return [] if settings is None else run_names(settings)

    def serves(self, logger: Any) -> bool:
        """Whether ``logger``'s per-replica values go to the replicas' own runs (else to ``…/r{k}`` tags)."""
        return id(logger) in self._writers

    def write(self, logger: Any, rows: dict[int, dict[str, float]], step: int) -> None:
        """Adds replica k's ``{tag: value}`` of ``rows`` to its run under ``logger`` at ``step``."""
        writers = self._writers[id(logger)]
        for k, row in rows.items():
            write_scalars(writers[k], row, step)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.close()
        if not trainer.is_global_zero or not self.model.recorder.logs_replicas:
            return
        from torch.utils.tensorboard import SummaryWriter

        names = self.names
        summary = _hparams_summary(trainer)
        for logger in trainer.loggers:
            if not is_tensorboard_logger(logger):
                continue
            writers = [SummaryWriter(log_dir=os.path.join(logger.log_dir, name)) for name in names]
            self._writers[id(logger)] = writers
            if summary is not None:
                for k, writer in enumerate(writers):
                    summary.write_session_start(writer, trainer, pl_module, replica=k)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        summary = _hparams_summary(trainer)
        if summary is not None:
            for writers in self._writers.values():
                for writer in writers:
                    summary.write_session_end(writer, trainer.global_step)
        self.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.close()

    def flush(self) -> None:
        """Waits until every replica run has written out its events."""
        for per_logger in self._writers.values():
            for writer in per_logger:
                writer.flush()

    def close(self) -> None:
        """Flushes and closes the replicas' runs (a no-op when none is open)."""
        writers, self._writers = self._writers, {}
        for per_logger in writers.values():
            for writer in per_logger:
                writer.close()
