"""The paper's two-layer linear network as a LightningModule."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn

from . import functional as F
from .metrics import lazy_distance, two_layer_dynamics

__all__ = ["TwoLayerLinear", "DivergenceError"]

_ESCAPE_RESOLUTION = 100  # steps between two checks of the lazy ball, whatever the logging interval


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or weights."""


class TwoLayerLinear(pl.LightningModule):
    """ŷ = aᵀWx with W ∈ ℝ^{m×d}, a ∈ ℝ^m, both layers trained by plain SGD on ½(ŷ − ỹ)².

    Args:
        dim: input dimension d (the CLI fills it from the datamodule's ``dim``).
        width: number of neurons m.
        init: ``"ntk"``: W_ij ~ N(0, 1/d), aᵢ ~ N(0, 1/m).
        init_scale: multiplier α on the initialisation (α ≪ 1: small init, rich from the start).
        lr: SGD step size η (no momentum, no weight decay).
        seed: seed of the initialisation.

    The training loss is ½·mean of (ŷ − ỹ)² over the batch targets as they arrive, so it is
    the noisy loss when a :class:`~lightning_lnsgd.noise.LabelNoise` callback is attached.
    Every ``trainer.log_every_n_steps`` SGD steps it logs, at TensorBoard step t = number of
    SGD steps done (step 0 is the initialisation): ``train/loss`` and ``test/loss`` (clean
    labels, whole sets) and the ``dynamics/*`` tags of :func:`~lightning_lnsgd.metrics.two_layer_dynamics`;
    ``phase/escape_step`` once, the first multiple of ``min(100, log_every_n_steps)`` steps at
    which ``dynamics/lazy_distance`` exceeds 1.
    """

    def __init__(
        self,
        dim: int | None = None,
        width: int = 1000,
        init: Literal["ntk"] = "ntk",
        init_scale: float = 1.0,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dim is None or int(dim) != dim or dim < 1:
            raise ValueError(
                f"TwoLayerLinear: `dim` must be a positive integer (the CLI takes it from `data.dim`), got {dim!r}."
            )
        if int(width) != width or width < 1:
            raise ValueError(f"TwoLayerLinear: `width` must be a positive integer, got {width!r}.")
        if init != "ntk":
            raise ValueError(f"TwoLayerLinear: `init` must be 'ntk', got {init!r}.")
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"TwoLayerLinear: `init_scale` must be a finite number > 0, got {init_scale!r}.")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"TwoLayerLinear: `lr` must be a finite number > 0, got {lr!r}.")
        self.save_hyperparameters()
        W, a = F.ntk_init(width, dim, init_scale, seed)
        self.W = nn.Parameter(W)
        self.a = nn.Parameter(a)
        # The initial weights define the lazy ball; buffers travel with the module and the checkpoint.
        self.register_buffer("W0", W.clone())
        self.register_buffer("escape_step", torch.tensor(-1, dtype=torch.int64))
        self.teacher: torch.Tensor | None = None

    # -- model ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.predict(self.W, self.a, x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.half_mse(self.W, self.a, x, y)
        if loss.device.type == "cpu" and not torch.isfinite(loss):  # free on CPU; on GPU checked periodically
            self._raise_divergence(self.global_step + 1)
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.half_mse(self.W, self.a, x, y))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", F.half_mse(self.W, self.a, x, y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.0, weight_decay=0.0)

    # -- dynamics ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        teacher = getattr(dm, "teacher", None)
        if teacher is not None:
            if teacher.shape[-1] != self.W.shape[-1]:
                raise ValueError(
                    f"TwoLayerLinear: the datamodule's teacher has dimension {teacher.shape[-1]} "
                    f"but the model was built with dim={self.W.shape[-1]}."
                )
            self.teacher = teacher.to(self.device, self.W.dtype)

    def on_train_start(self) -> None:
        if self.global_step == 0:
            self._log_dynamics(0)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        every = self.trainer.log_every_n_steps
        check = min(_ESCAPE_RESOLUTION, every) if every > 0 else _ESCAPE_RESOLUTION
        if step % check == 0:
            if not bool(torch.isfinite(self.W).all() and torch.isfinite(self.a).all()):
                self._raise_divergence(step)
            if int(self.escape_step) < 0 and float(lazy_distance(self.W.detach(), self.W0)) > 1.0:
                self.escape_step.fill_(step)
                self._log_scalars({"phase/escape_step": float(step)}, step)
        if every > 0 and step % every == 0:
            self._log_dynamics(step)

    def _teacher_or_zero(self) -> torch.Tensor:
        return self.teacher if self.teacher is not None else torch.zeros_like(self.W[0])

    @torch.no_grad()
    def dynamics(self) -> dict[str, torch.Tensor]:
        """Current values of every logged tag (``dynamics/*``, ``train/loss``, ``test/loss``), on device."""
        values = {f"dynamics/{k}": v for k, v in two_layer_dynamics(self.W, self.a, self.W0, self._teacher_or_zero()).items()}
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "x_train"):
            values["train/loss"] = F.half_mse(self.W, self.a, dm.x_train.to(self.W.dtype), dm.y_train.to(self.W.dtype))
            values["test/loss"] = F.half_mse(self.W, self.a, dm.x_test.to(self.W.dtype), dm.y_test.to(self.W.dtype))
        return values

    def _log_dynamics(self, step: int) -> None:
        values = {k: float(v) for k, v in self.dynamics().items()}
        if not all(math.isfinite(v) for v in values.values()):
            self._raise_divergence(step)
        self._log_scalars(values, step)

    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(values, step=step)

    def _raise_divergence(self, step: int) -> None:
        sigma = None
        for cb in self.trainer.callbacks if self._trainer is not None else []:
            if hasattr(cb, "level_at"):
                sigma = cb.level_at(step)
        eta = self.hparams.lr
        noise = f"σ={sigma:g}" if sigma is not None else "σ=0 (no LabelNoise callback)"
        product = f", η·σ={eta * sigma:g}" if sigma else ""
        raise DivergenceError(
            f"Training diverged: non-finite loss or weights at step {step} with η={eta:g}, {noise}{product}. "
            "A step size η too large for the noise level σ (η·σ too large) is the usual cause; lower `model.lr` "
            "or the noise level."
        )
