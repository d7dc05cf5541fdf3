"""A progress bar that counts SGD steps, for long runs and for the fused path."""

from __future__ import annotations

from typing import Any

from ..compat import TQDMProgressBar, pl

__all__ = ["StepProgressBar"]


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole fit: ``global_step`` (SGD steps) out of ``trainer.max_steps``.

    Lightning's default bar restarts every epoch and counts batches; with k SGD steps per
    Lightning step (the fused path) a batch is not a step. This bar shows SGD steps, the
    steps/s, and the latest progress-bar metrics (e.g. the loss).

    Args:
        refresh_rate: redraw after at least this many SGD steps.
    """

    def __init__(self, refresh_rate: int = 1000, process_position: int = 0, leave: bool = False) -> None:
        if int(refresh_rate) != refresh_rate or refresh_rate < 1:
            raise ValueError(f"StepProgressBar: `refresh_rate` must be an integer ≥ 1, got {refresh_rate!r}.")
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._last_drawn = 0

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        self.train_progress_bar.unit = "step"
        self.train_progress_bar.set_description("SGD steps")
        self.train_progress_bar.n = self._last_drawn = trainer.global_step
        self.train_progress_bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if self.is_enabled and (step - self._last_drawn >= self.refresh_rate or step == trainer.max_steps):
            self._last_drawn = step
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self.train_progress_bar.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Lightning's progress-bar metrics plus the module's ``progress_metrics`` dict, if it has one."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.update(getattr(pl_module, "progress_metrics", None) or {})
        return metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.val_progress_bar is not None:
            self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
