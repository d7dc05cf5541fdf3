"""The fused path of :class:`~lightning_lnsgd.model.TwoLayerLinear`: k SGD steps per Lightning step.

Per Lightning step the datamodule has drawn the samples of all k steps (and all replicas) and the
:class:`~lightning_lnsgd.noise.LabelNoise` callback has noised their targets, following the
module's ``label_noise_layout()``. The engine cuts the k steps into chunks that end on the
escape-check and logging grids, runs each chunk with :func:`lightning_lnsgd.kernels.run_steps`
(torch, numba or triton), and records, on the device and without a host sync, the escape step
and a snapshot of the dynamics at each logging step. Snapshots are written to the loggers once
the Lightning step is over, so the only host syncs are one per Lightning step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import kernels

if TYPE_CHECKING:  # pragma: no cover
    from .model import TwoLayerLinear

__all__ = ["FusedEngine", "sam_settings"]


def sam_settings(strategy: object) -> tuple[float, bool, bool] | None:
    """``(rho, normalize, adaptive)`` when ``strategy`` is one of the SAM strategies, else ``None``."""
    from .sam import SAMDDPStrategy, SAMStrategy

    if isinstance(strategy, (SAMStrategy, SAMDDPStrategy)):
        return strategy.rho, strategy.normalize, strategy.adaptive
    return None


class FusedEngine:
    """Runs the fused closed-form steps of one :class:`TwoLayerLinear` inside a Lightning fit."""

    def __init__(self, model: TwoLayerLinear) -> None:
        trainer = model.trainer  # world_size > 1 is refused in TwoLayerLinear.setup
        self.model = model
        self.backend = kernels.resolve_backend(model.hparams.backend, model.W.device)
        sam = sam_settings(trainer.strategy)
        if sam is not None and sam[2]:
            raise ValueError(
                "TwoLayerLinear: adaptive SAM (ASAM) is not available on the fused path; use backend='autograd' "
                "with the SAM strategy, or adaptive=False."
            )
        self.sam_rho, self.sam_normalize = (None, True) if sam is None else (sam[0], sam[1])
        if isinstance(self.sam_rho, list):
            R = None if model.replica_seeds is None else len(model.replica_seeds)
            if R != len(self.sam_rho):
                raise ValueError(
                    f"TwoLayerLinear: the SAM strategy has {len(self.sam_rho)} values of rho (one per replica) "
                    f"but the model has replicas={R}."
                )
            self.sam_rho = torch.tensor(self.sam_rho, dtype=model.W.dtype, device=model.W.device)
        lr = model.lr_per_replica
        self.lr: float | torch.Tensor = float(lr) if lr.ndim == 0 else lr
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._checked_at: int | None = None

    @torch.no_grad()
    def run(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Runs the ``k = x.shape[-3]`` SGD steps of one batch and advances ``global_step`` by k."""
        model, trainer = self.model, self.model.trainer
        k = x.shape[-3]
        start = trainer.global_step
        every = trainer.log_every_n_steps
        check = model.escape_every()
        W, a = model.W.detach(), model.a.detach()
        pos = 0
        while pos < k:
            step = start + pos
            stop = min(start + k, (step // check + 1) * check)
            if every > 0:
                stop = min(stop, (step // every + 1) * every)
            n = stop - step
            kernels.run_steps(
                W, a, x[..., pos : pos + n, :, :], y[..., pos : pos + n, :], self.lr,
                sam_rho=self.sam_rho, sam_normalize=self.sam_normalize, backend=self.backend,
            )
            pos += n
            if stop % check == 0:
                model.update_escape(stop)
                self._checked_at = stop
            if every > 0 and stop % every == 0:
                self._pending.append((stop, model.dynamics()))
        # Lightning counts optimizer steps; the fused steps are the run's SGD steps.
        trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_by(k)

    def flush(self) -> None:
        """Writes the snapshots and escapes of the last Lightning step (host syncs happen here)."""
        model = self.model
        if self._checked_at is not None:
            model.check_finite(self._checked_at)
            model.log_new_escapes()
            self._checked_at = None
        for step, values in self._pending:
            model._log_dynamics(step, values)
        if self._pending and "train/loss" in self._pending[-1][1]:
            # For StepProgressBar (Lightning's self.log costs ~1 ms a call, more than 1000 fused steps).
            model.progress_metrics = {"loss": float(self._pending[-1][1]["train/loss"].mean())}
        self._pending.clear()
