"""HParamsSummary: the run's hyper-parameters with the final value of chosen metrics in TensorBoard's HPARAMS tab."""

from __future__ import annotations

from typing import Any

from ..compat import pl
import torch
from ..compat import Callback

from ._common import _tensorboards

__all__ = ["HParamsSummary"]


def _hparam_value(v: Any) -> Any:
    if isinstance(v, bool) or isinstance(v, (int, float, str)):
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)


class HParamsSummary(Callback):
    """The run's hyper-parameters and the final value of chosen metrics, in TensorBoard's HPARAMS tab.

    At the start of fit it writes TensorBoard's hparams experiment and session-start records (hyper-parameters of the
    LightningModule and the datamodule, plus ``extra``; nested keys joined with ``/``) naming ``metrics`` as the
    columns; at the end of fit, the session-end record. The HPARAMS tab shows, for each metric, the *last* value of
    the scalar tag of that name in the run, i.e. the final value of a logged curve (``test/loss``,
    ``dynamics/lazy_distance``, ``pruning/val/acc@0.1``...). A metric never logged stays empty.

    It writes before Lightning's own hyper-parameter record (``on_fit_start`` runs first), and TensorBoard uses the
    first record of a run, so the columns are these metrics rather than Lightning's placeholder ``hp_metric``.

    Args:
        metrics: scalar tags to show as columns.
        extra: more hyper-parameters (e.g. the label-noise level σ of a callback).
    """

    def __init__(self, metrics: list[str] | None = None, extra: dict[str, Any] | None = None) -> None:
        self.metrics = list(metrics) if metrics is not None else [
            "train/loss", "test/loss", "dynamics/norm_sq_mean", "dynamics/cosine_mean", "dynamics/lazy_distance",
            "phase/escape_step",
        ]
        if not self.metrics:
            raise ValueError("HParamsSummary: `metrics` must name at least one logged scalar tag.")
        self.extra = dict(extra or {})

    def hyperparameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Flat ``{name: value}`` of the module's and the datamodule's hyper-parameters and ``extra``."""
        params: dict[str, Any] = {}

        def put(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    put(f"{prefix}/{k}" if prefix else str(k), v)
            else:
                params[prefix] = _hparam_value(obj)

        put("model", dict(pl_module.hparams))
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "hparams"):
            put("data", dict(dm.hparams))
        put("", self.extra)
        return params

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writers = _tensorboards(trainer) if trainer.is_global_zero else []
        if not writers:
            return
        from torch.utils.tensorboard.summary import hparams

        exp, ssi, _ = hparams(self.hyperparameters(trainer, pl_module), {m: 0.0 for m in self.metrics})
        for w in writers:
            fw = w._get_file_writer()  # what Lightning's TensorBoardLogger.log_hyperparams uses too
            fw.add_summary(exp)
            fw.add_summary(ssi)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writers = _tensorboards(trainer) if trainer.is_global_zero else []
        if not writers:
            return
        from torch.utils.tensorboard.summary import hparams

        _, _, sei = hparams(self.hyperparameters(trainer, pl_module), {m: 0.0 for m in self.metrics})
        for w in writers:
            fw = w._get_file_writer()
            fw.add_summary(sei, trainer.global_step)
            fw.flush()

