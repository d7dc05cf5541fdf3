"""PruningCurve: a validation metric after global magnitude pruning to several kept fractions (the paper's Fig. 1c)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn
from torchmetrics import Metric

from .. import compat
from ..compat import Callback, LightningModule, Trainer, extract_batch_size
from ..metrics.functional import eval_mode
from ._common import log_figure, log_scalars, resolve_weights, validation_batches, warn_tensorboard_only
from ._figures import curve_figure

__all__ = ["PruningCurve", "global_magnitude_masks"]


def global_magnitude_masks(params: Sequence[torch.Tensor], kept: float) -> list[torch.Tensor]:
    """Boolean masks keeping the round(kept·N) entries of largest |w| over all ``params`` together (one global
    threshold; ties: ``topk``'s pick), one mask per tensor, of its shape.

    >>> global_magnitude_masks([torch.tensor([1.0, -4.0]), torch.tensor([[3.0, 2.0]])], 0.5)
    [tensor([False,  True]), tensor([[ True, False]])]
    """
    scores = torch.cat([p.detach().abs().flatten() for p in params])
    k = int(round(kept * scores.numel()))
    flat = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        flat[scores.topk(k, sorted=False).indices] = True
    return [mask.view_as(p) for mask, p in zip(flat.split([p.numel() for p in params]), params)]


class _LogCapture:
    """Receives ``LightningModule.log`` calls during a pruned evaluation: batch-size weighted sums of plain values
    (Lightning's default ``reduce_fx="mean"``, or plain sums for ``"sum"``) and the last logged torchmetrics object."""

    def __init__(self) -> None:
        self.sums: dict[str, list[Any]] = {}  # name -> [weighted sum, weight, reduce_fx] or [Metric]
        self.batch: Any = None

    def __call__(
        self, name: str, value: Any, *args: Any, batch_size: Optional[int] = None, reduce_fx: Any = "mean", **kwargs: Any
    ) -> None:
        if isinstance(value, Metric):
            self.sums[name] = [value]
            return
        value = torch.as_tensor(value).detach().double().reshape(())
        if reduce_fx in ("mean", torch.mean):
            w = float(batch_size if batch_size is not None else extract_batch_size(self.batch))
        elif reduce_fx in ("sum", torch.sum):
            w = 1.0
        else:
            raise ValueError(f"PruningCurve: {name!r} is logged with reduce_fx={reduce_fx!r}; allowed: 'mean' or 'sum'.")
        acc = self.sums.setdefault(name, [torch.zeros((), dtype=torch.float64, device=value.device), 0.0, reduce_fx])
        acc[0] = acc[0] + value * w
        acc[1] += w


@contextlib.contextmanager
def _fresh_metrics(pl_module: nn.Module) -> Iterator[None]:
    """Replaces every torchmetrics object of the module by a reset clone for the block, then puts the originals back,
    untouched (state, update count and cached result). Only ``nn.Module`` attribute assignment is used."""
    swapped: list[tuple[nn.Module, str, Metric]] = []
    top: list[str] = []
    for name, module in list(pl_module.named_modules()):
        if not isinstance(module, Metric) or not name or any(name.startswith(t + ".") for t in top):
            continue
        top.append(name)
        parent_name, _, child = name.rpartition(".")
        parent = pl_module.get_submodule(parent_name)
        fresh = module.clone()
        fresh.reset()
        setattr(parent, child, fresh)
        swapped.append((parent, child, module))
    try:
        yield
    finally:
        for parent, child, original in swapped:
            setattr(parent, child, original)


class PruningCurve(Callback):
    """Validation metric after global magnitude pruning to each kept fraction α (the paper's Fig. 1c).

    For every α in ``kept_fractions`` the round(α·N) entries of largest |w| among the chosen parameters (N entries in
    all, one global threshold) are kept and the rest set to zero; the validation set is run through
    ``validation_step`` in eval mode, without gradients, and the value logged there under ``monitor`` is read; then the
    trained weights are put back, bit for bit, and each module in its own mode.

    The pass does not go through Lightning's validation loop, so no callback (checkpointing, early stopping) and no
    logger sees the pruned model. It takes the validation loaders of the fit (``trainer.val_dataloaders``, else the
    datamodule's or the module's ``val_dataloader()``), within ``trainer.limit_val_batches``, and moves each batch
    with ``trainer.strategy.batch_to_device`` (the module's transfer hooks). ``self.log`` values are batch-size
    weighted means over the batches of all loaders (Lightning's default) and, under DDP, over the union of the
    ranks' shards; a logged torchmetrics object gives its ``compute()``. The module's torchmetrics objects are
    replaced by reset clones during the pass, so their own state is left as it was.

    Logs ``pruning/<monitor>@<α>`` (scalars, at step = SGD steps done, to every logger) and the figure
    ``pruning/<monitor>`` (to TensorBoard loggers only: each other logger gets one warning at setup saying so); the
    last curve is also kept as :attr:`curve` ``{α: value}``.

    Args:
        kept_fractions: kept fractions α in [0, 1].
        monitor: the key that ``validation_step`` logs (``"val/acc"``, ``"val/loss"``, ...).
        parameters: parameter paths or fnmatch globs (module paths select their ``weight``); default: every
            parameter with ≥ 2 axes (weight matrices, conv kernels; biases and norms are not pruned).
        every_n_validations: also evaluate after every n-th validation during fit (``None``: only at the end of fit).
    """

    def __init__(
        self,
        kept_fractions: Optional[list[float]] = None,
        monitor: str = "val/acc",
        parameters: Optional[list[str]] = None,
        every_n_validations: Optional[int] = None,
    ) -> None:
        fractions = [1.0, 0.5, 0.2, 0.1, 0.05] if kept_fractions is None else list(kept_fractions)
        if not fractions or any(not (0.0 <= float(a) <= 1.0) for a in fractions):
            raise ValueError(f"PruningCurve: kept_fractions={kept_fractions!r} must be a non-empty list of numbers in [0, 1].")
        if every_n_validations is not None and (int(every_n_validations) != every_n_validations or every_n_validations < 1):
            raise ValueError(f"PruningCurve: every_n_validations={every_n_validations!r} must be an integer ≥ 1 or None.")
        self.kept_fractions = sorted({float(a) for a in fractions}, reverse=True)
        self.monitor = monitor
        self.parameters = parameters
        self.every_n_validations = every_n_validations
        self.curve: dict[float, float] = {}
        self._validations = 0

    def _params(self, pl_module: LightningModule) -> list[nn.Parameter]:
        if self.parameters is None:
            chosen = [p for p in pl_module.parameters() if p.ndim >= 2]
        else:
            chosen = list(resolve_weights(pl_module, self.parameters, "PruningCurve.parameters").values())
        if not chosen:
            raise ValueError(f"PruningCurve: parameters={self.parameters!r} selects nothing to prune in {type(pl_module).__name__}.")
        return chosen

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            curve = f"pruning/{self.monitor}"
            rest = f"the curve goes to every logger as the scalars {curve}@<α>."
            warn_tensorboard_only(type(self).__name__, trainer, f"the figure {curve}", rest)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Refuse a selection that matches nothing before training starts; not in setup, which runs before the
        # module's own setup (where a model may build its layers).
        self._params(pl_module)

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """One pass of ``validation_step`` over the validation batches; the value logged under ``monitor``."""
        capture = _LogCapture()
        with _fresh_metrics(pl_module), compat.redirect_log(pl_module, capture):
            for dl_idx, batch_idx, batch in validation_batches(trainer, pl_module):
                capture.batch = batch
                if dl_idx > 0 or _takes_dataloader_idx(pl_module):
                    pl_module.validation_step(batch, batch_idx, dl_idx)
                else:
                    pl_module.validation_step(batch, batch_idx)
            if self.monitor not in capture.sums:
                raise ValueError(
                    f"PruningCurve: monitor={self.monitor!r} was not logged by validation_step; it logged "
                    f"{sorted(capture.sums)}."
                )
            acc = capture.sums[self.monitor]
            if len(acc) == 1:  # a torchmetrics Metric: compute() syncs across ranks itself
                return float(acc[0].compute())
        total, weight, reduce_fx = acc
        both = torch.stack([total, torch.tensor(weight, dtype=torch.float64, device=total.device)])
        both = trainer.strategy.reduce(both, reduce_op="sum")
        return float(both[0] / both[1]) if reduce_fx in ("mean", torch.mean) else float(both[0])

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[float, float]:
        """The curve ``{α: monitor value}``; the weights are unchanged afterwards (bit for bit)."""
        params = self._params(pl_module)
        saved = [p.detach().clone() for p in params]
        curve: dict[float, float] = {}
        stage = trainer.state.stage
        # validation_step sees what a validation loop would show it: the module in eval mode and the trainer
        # validating (not training), through Trainer's public stage setter; the stage is put back afterwards.
        trainer.validating = True
        try:
            with eval_mode(pl_module):
                for alpha in self.kept_fractions:
                    if alpha < 1.0:
                        for p, mask in zip(params, global_magnitude_masks(params, alpha)):
                            p.mul_(mask)
                    curve[alpha] = self._evaluate(trainer, pl_module)
                    for p, s in zip(params, saved):
                        p.copy_(s)
        finally:
            trainer.state.stage = stage
            for p, s in zip(params, saved):
                p.copy_(s)
        self.curve = curve
        return curve

    def _run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        curve = self.evaluate(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        log_scalars(trainer, {f"pruning/{self.monitor}@{a:g}": v for a, v in curve.items()}, step)
        fig = curve_figure(curve, self.monitor, f"magnitude pruning, step {step}")
        log_figure(trainer, f"pruning/{self.monitor}", fig, step)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_validations is None or trainer.state.fn != "fit":
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not on_fit_end: that runs after the strategy's teardown has moved the module to the CPU (and the batches
        # would still go to the training device).
        self._run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))


def _takes_dataloader_idx(pl_module: nn.Module) -> bool:
    return "dataloader_idx" in inspect.signature(pl_module.validation_step).parameters
