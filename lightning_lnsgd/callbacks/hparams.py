"""HParamsSummary: the run's hyper-parameters with the final value of chosen metrics in TensorBoard's HPARAMS tab."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..compat import Callback, LightningModule, Trainer
from ._common import tensorboards

__all__ = ["HParamsSummary"]


def _hparam_value(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)


class HParamsSummary(Callback):
    """The run's hyper-parameters and the final value of chosen metrics, in TensorBoard's HPARAMS tab.

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

    def _records(self, trainer: Trainer, pl_module: LightningModule) -> tuple[Any, Any, Any]:
        from torch.utils.tensorboard.summary import hparams

        # The metric values given here are not written anywhere: only the names become the columns.
        return hparams(self.hyperparameters(trainer, pl_module), {m: 0.0 for m in self.metrics})

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writers = tensorboards(trainer)
        if not writers:
            return
        experiment, session_start, _ = self._records(trainer, pl_module)
        for writer in writers:
            writer.file_writer.add_summary(experiment)
            writer.file_writer.add_summary(session_start)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writers = tensorboards(trainer)
        if not writers:
            return
        _, _, session_end = self._records(trainer, pl_module)
        for writer in writers:
            writer.file_writer.add_summary(session_end, trainer.global_step)
            writer.flush()
