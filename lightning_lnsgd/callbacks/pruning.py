"""PruningCurve: a validation metric after global magnitude pruning to several kept fractions (the paper's Fig. 1c)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from ..compat import pl
import torch
from ..compat import Callback
from ..compat import extract_batch_size
from torch import nn
from torchmetrics import Metric

from ._common import _tensorboards, resolve_weights

__all__ = ["PruningCurve"]


def _global_magnitude_masks(params: Sequence[torch.Tensor], kept: float) -> list[torch.Tensor]:
    """Masks keeping the round(kept·N) entries of largest |w| over all ``params`` together (ties: ``topk``'s pick)."""
    scores = torch.cat([p.detach().abs().flatten() for p in params])
    k = int(round(kept * scores.numel()))
    flat = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        flat[scores.topk(k, sorted=False).indices] = True
    return list(flat.split([p.numel() for p in params]))


class _LogCapture:
    """Stands in for ``LightningModule.log`` during a pruned evaluation: accumulates batch-size weighted values."""

    def __init__(self) -> None:
        self.sums: dict[str, list[Any]] = {}  # name -> [weighted sum, weight, reduce_fx] or [Metric]
        self.batch: Any = None

    def __call__(self, name: str, value: Any, *args: Any, batch_size: int | None = None, reduce_fx: Any = "mean", **kwargs: Any) -> None:
        if isinstance(value, Metric):
            self.sums[name] = [value]
            return
        value = torch.as_tensor(value).detach().double().reshape(())
        if reduce_fx in ("mean", torch.mean):
            w = float(batch_size if batch_size is not None else extract_batch_size(self.batch))
        elif reduce_fx in ("sum", torch.sum):
            w = 1.0
        else:
            raise ValueError(
                f"PruningCurve: {name!r} is logged with reduce_fx={reduce_fx!r}; only 'mean' and 'sum' are supported."
            )
        acc = self.sums.setdefault(name, [torch.zeros((), dtype=torch.float64, device=value.device), 0.0, reduce_fx])
        acc[0] = acc[0] + value * w
        acc[1] += w


class PruningCurve(Callback):
    """Validation metric after global magnitude pruning to each kept fraction α (the paper's Fig. 1c).

    For every α in ``kept_fractions`` the round(α·N) entries of largest |w| among the chosen parameters (N entries in
    all, one global threshold) are kept and the rest set to zero; the validation set is run through
    ``validation_step`` and the value logged there under ``monitor`` is read; then the trained weights are put back,
    bit for bit. The pass does not go through Lightning's validation loop: no callback (checkpointing, early
    stopping) and no logger sees the pruned model; ``self.log`` calls are captured (batch-size weighted mean, as
    Lightning's default) and, under DDP, summed over ranks (mean over the union of the ranks' shards).

    Logs ``pruning/<monitor>@<α>`` (scalars, at step = SGD steps done) and the figure ``pruning/<monitor>``; the last
    curve is also kept as :attr:`curve` ``{α: value}``.

    Args:
        kept_fractions: kept fractions α in [0, 1].
        monitor: the key that ``validation_step`` logs (``"val/acc"``, ``"val/loss"``, ...).
        parameters: parameter paths or fnmatch globs (module paths select their ``weight``); default: every
            parameter with ≥ 2 axes (weight matrices, conv kernels; biases and norms are not pruned).
        every_n_validations: also evaluate after every n-th validation during fit (``None``: only at the end of fit).
    """

    def __init__(
        self,
        kept_fractions: list[float] | None = None,
        monitor: str = "val/acc",
        parameters: list[str] | None = None,
        every_n_validations: int | None = None,
    ) -> None:
        fractions = [1.0, 0.5, 0.2, 0.1, 0.05] if kept_fractions is None else list(kept_fractions)
        if not fractions or any(not (0.0 <= float(a) <= 1.0) for a in fractions):
            raise ValueError(f"PruningCurve: `kept_fractions` must be a non-empty list of numbers in [0, 1], got {kept_fractions!r}.")
        if every_n_validations is not None and (int(every_n_validations) != every_n_validations or every_n_validations < 1):
            raise ValueError(f"PruningCurve: `every_n_validations` must be an integer ≥ 1 or null, got {every_n_validations!r}.")
        self.kept_fractions = sorted({float(a) for a in fractions}, reverse=True)
        self.monitor = monitor
        self.parameters = parameters
        self.every_n_validations = every_n_validations
        self.curve: dict[float, float] = {}
        self._validations = 0

    def _params(self, pl_module: pl.LightningModule) -> list[nn.Parameter]:
        if self.parameters is None:
            chosen = [p for p in pl_module.parameters() if p.ndim >= 2]
        else:
            chosen = list(resolve_weights(pl_module, self.parameters, "PruningCurve.parameters").values())
        if not chosen:
            raise ValueError(f"PruningCurve: no parameter to prune in {type(pl_module).__name__} (`parameters`={self.parameters!r}).")
        return chosen

    def _loaders(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        loaders: Any = trainer.val_dataloaders
        if loaders is None:
            dm = getattr(trainer, "datamodule", None)
            source = dm if dm is not None else pl_module
            loaders = source.val_dataloader()
        return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]

    @torch.no_grad()
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """One pass of ``validation_step`` over the validation loaders; the value logged under ``monitor``."""
        loaders = self._loaders(trainer, pl_module)
        capture = _LogCapture()
        metric_states = {m: (copy.deepcopy(m.metric_state), m._update_count, m._computed) for m in pl_module.modules() if isinstance(m, Metric)}
        for m in metric_states:
            m.reset()
        pl_module.log = capture  # type: ignore[method-assign]  # instance attribute shadows the method
        try:
            for dl_idx, loader in enumerate(loaders):
                for batch_idx, batch in enumerate(loader):
                    # The module's own transfer hooks, not strategy.batch_to_device: LabelNoise wraps that one
                    # for the whole fit, and the pruned model must be scored on clean labels.
                    batch = pl_module._apply_batch_transfer_handler(batch, pl_module.device, dataloader_idx=dl_idx)
                    capture.batch = batch
                    if len(loaders) > 1:
                        pl_module.validation_step(batch, batch_idx, dl_idx)
                    else:
                        pl_module.validation_step(batch, batch_idx)
            if self.monitor not in capture.sums:
                raise ValueError(
                    f"PruningCurve: `monitor`={self.monitor!r} was not logged by validation_step; "
                    f"it logged {sorted(capture.sums)}."
                )
            acc = capture.sums[self.monitor]
            if len(acc) == 1:  # a torchmetrics Metric: compute() syncs across ranks itself
                value = float(acc[0].compute())
            else:
                total = trainer.strategy.reduce(torch.stack([acc[0], torch.tensor(acc[1], dtype=torch.float64, device=acc[0].device)]), reduce_op="sum")
                value = float(total[0] / total[1]) if acc[2] in ("mean", torch.mean) else float(total[0])
        finally:
            del pl_module.log
            for m, (state, count, computed) in metric_states.items():
                for k, v in state.items():
                    setattr(m, k, v)
                m._update_count, m._computed = count, computed
        return value

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[float, float]:
        """The curve ``{α: monitor value}``; the weights are unchanged afterwards (bit for bit)."""
        params = self._params(pl_module)
        saved = [p.detach().clone() for p in params]
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        curve: dict[float, float] = {}
        try:
            for alpha in self.kept_fractions:
                if alpha < 1.0:
                    with torch.no_grad():
                        for p, mask in zip(params, _global_magnitude_masks(params, alpha)):
                            p.mul_(mask.view_as(p))
                curve[alpha] = self._evaluate(trainer, pl_module)
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            for m, mode in modes.items():
                m.train(mode)
        self.curve = curve
        return curve

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        curve = self.evaluate(trainer, pl_module)
        step = trainer.global_step
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:
            lg.log_metrics({f"pruning/{self.monitor}@{a:g}": v for a, v in curve.items()}, step=step)
        writers = _tensorboards(trainer)
        if writers:
            fig = self.figure(curve, step)
            for w in writers:
                w.add_figure(f"pruning/{self.monitor}", fig, step, close=False)
            import matplotlib.pyplot as plt

            plt.close(fig)

    def figure(self, curve: dict[float, float], step: int) -> Any:
        """The curve as a matplotlib figure (kept fraction on a log axis)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
        alphas = sorted(a for a in curve if a > 0)
        ax.plot([100 * a for a in alphas], [curve[a] for a in alphas], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("weights kept (%)")
        ax.set_ylabel(self.monitor)
        ax.set_title(f"magnitude pruning, step {step}")
        fig.tight_layout()
        return fig

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_validations is None or trainer.state.fn != "fit":
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module)


