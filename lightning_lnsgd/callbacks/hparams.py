"""HParamsSummary: the run's hyper-parameters with the final value of chosen metrics, in TensorBoard's HPARAMS tab
and in every other logger (through Lightning's ``log_hyperparams`` / ``log_metrics``)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..compat import Callback, LightningModule, Trainer
from ..protocol import replica_settings
from ._common import latest_metrics, other_loggers, tensorboards

__all__ = ["HParamsSummary"]


def _hparam_value(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)


class HParamsSummary(Callback):
    """The run's hyper-parameters and the final value of chosen metrics, in TensorBoard's HPARAMS tab and in every
    other logger.

    At the start of fit it writes TensorBoard's hparams experiment and session-start records (hyper-parameters of the
    LightningModule and the datamodule, plus ``extra``; nested keys joined with ``/``) naming ``metrics`` as the
    columns; at the end of fit, the session-end record (status: success). The HPARAMS tab shows, for each metric, the
    *last* value of the scalar tag of that name in the run, i.e. the final value of a logged curve (``test/loss``,
    ``dynamics/lazy_distance``, ``pruning/val/acc@0.1``...). A metric never logged stays empty.

    It writes before Lightning's own hyper-parameter record (``on_fit_start`` runs first), and TensorBoard uses the
    first record of a run, so the columns are these metrics rather than Lightning's placeholder ``hp_metric``.

    The records are built by ``torch.utils.tensorboard.summary.hparams`` and written with the public ``file_writer``
    of the logger's ``SummaryWriter`` (what ``SummaryWriter.add_hparams`` does). ``TensorBoardLogger.log_hyperparams
    (params, metrics)`` is not used: it also logs each metric's given value as a scalar of that tag, which would put
    a placeholder point into the very curves whose final values the tab shows; and ``SummaryWriter.add_hparams``
    writes into a separate run, which does not hold the curves.

    **Other loggers** (``CSVLogger``, ``MLFlowLogger``, ...) get the same through Lightning's public logger API: at the
    start of fit the hyper-parameters (the same flat names, ``model/lr``, ``data/n_train``, ...) with
    ``log_hyperparams`` (CSV: ``hparams.yaml``; MLflow: the run's params), and at the end of fit the last value of
    each metric known then, as ``final/<metric>`` with ``log_metrics`` at step = ``trainer.global_step`` (CSV: the
    last rows of ``metrics.csv``; MLflow: the run's metrics). A metric is known when ``LightningModule.log`` logged it
    (``trainer.callback_metrics``) or the package's callbacks or models wrote it to that logger; one logged only after
    fit (e.g. ``test/loss`` of a later ``trainer.test``) is not, and is left out.

    **Stacked replicas.** For a module that stacks replicas and lists their settings
    (:func:`lightning_lnsgd.protocol.replica_settings`), the columns also hold each setting as ``replica/<name>``
    (``replica/seed``, ``replica/lr``, ...), and the module may write one row per replica into that replica's own
    TensorBoard run with :meth:`write_session_start` and :meth:`write_session_end` (what
    :class:`~lightning_lnsgd.TwoLayerLinear` does). A replica's row holds the run's hyper-parameters, its settings, and
    the final values of the metric tags in its own run. Every row carries the same experiment record (the columns),
    so the tab is the same whichever run TensorBoard reads the columns from.

    Args:
        metrics: scalar tags to show as columns.
        extra: more hyper-parameters (e.g. the label-noise level σ of a callback).
    """

    def __init__(self, metrics: Optional[list[str]] = None, extra: Optional[dict[str, Any]] = None) -> None:
        self.metrics = list(metrics) if metrics is not None else [
            "train/loss", "test/loss", "dynamics/norm_sq_mean", "dynamics/cosine_mean", "dynamics/lazy_distance",
            "phase/escape_step",
        ]
        if not self.metrics or not all(isinstance(m, str) for m in self.metrics):
            raise ValueError(f"HParamsSummary: metrics={metrics!r} must be a non-empty list of scalar tags.")
        self.extra = dict(extra or {})

    def hyperparameters(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """Flat ``{name: value}`` of the module's and the datamodule's hyper-parameters and ``extra``."""
        params: dict[str, Any] = {}

        def put(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    put(f"{prefix}/{k}" if prefix else str(k), v)
            else:
                params[prefix] = _hparam_value(obj)

        put("model", dict(pl_module.hparams))
        dm = trainer.datamodule
        if dm is not None:
            put("data", dict(dm.hparams))
        put("", self.extra)
        return params

    def row(self, trainer: Trainer, pl_module: LightningModule, replica: Optional[int] = None) -> dict[str, Any]:
        """The hyper-parameters of one row: the run's (:meth:`hyperparameters`), and for ``replica`` k those plus the
        replica's settings as ``replica/<name>``."""
        params = self.hyperparameters(trainer, pl_module)
        if replica is not None:
            settings = replica_settings(pl_module)
            if settings is None or not 0 <= replica < len(settings):
                count = "none" if settings is None else len(settings)
                raise ValueError(f"HParamsSummary: replica={replica!r} is not a replica of "
                                 f"{type(pl_module).__name__} (replicas: {count}).")
            params.update({f"replica/{name}": value for name, value in settings[replica].items()})
        return params

    def _records(self, trainer: Trainer, pl_module: LightningModule, replica: Optional[int] = None) -> tuple[Any, Any]:
        from torch.utils.tensorboard.summary import hparams

        # The metric values given here are not written anywhere: only the names become the columns.
        metrics = {m: 0.0 for m in self.metrics}
        params = self.row(trainer, pl_module, replica)
        columns = dict(params)
        settings = replica_settings(pl_module)
        if settings is not None:  # the experiment record names the replica columns in every row, the run's own too
            columns.update({f"replica/{name}": value for name, value in settings[0].items()})
        experiment, _, _ = hparams(columns, metrics)
        _, session_start, _ = hparams(params, metrics)
        return experiment, session_start

    def write_session_start(self, writer: Any, trainer: Trainer, pl_module: LightningModule,
                            replica: Optional[int] = None) -> None:
        """Writes the experiment and session-start records of a row (the run's, or ``replica`` k's) with the
        ``SummaryWriter`` ``writer`` of the TensorBoard run that holds the row's curves."""
        experiment, session_start = self._records(trainer, pl_module, replica)
        writer.file_writer.add_summary(experiment)
        writer.file_writer.add_summary(session_start)

    def write_session_end(self, writer: Any, step: int) -> None:
        """Writes the session-end record (status: success) at ``step`` with ``writer`` and flushes it."""
        from torch.utils.tensorboard.summary import hparams

        _, _, session_end = hparams({}, {})
        writer.file_writer.add_summary(session_end, step)
        writer.flush()

    def final_metrics(self, trainer: Trainer, logger: Any) -> dict[str, float]:
        """``{metric: last value}`` of the metrics known to ``logger`` now (see the class docstring), in the order
        of :attr:`metrics`."""
        known = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, (int, float, torch.Tensor))
                 and torch.as_tensor(v).numel() == 1}
        known.update(latest_metrics(logger))
        return {m: known[m] for m in self.metrics if m in known}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for writer in tensorboards(trainer):
            self.write_session_start(writer, trainer, pl_module)
        params = self.hyperparameters(trainer, pl_module)
        for logger in other_loggers(trainer):
            logger.log_hyperparams(params)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for writer in tensorboards(trainer):
            self.write_session_end(writer, trainer.global_step)
        for logger in other_loggers(trainer):
            final = self.final_metrics(trainer, logger)
            if final:
                logger.log_metrics({f"final/{m}": v for m, v in final.items()}, step=trainer.global_step)
