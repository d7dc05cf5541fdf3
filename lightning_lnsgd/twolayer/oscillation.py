"""Lemma 4 of the paper: the second layer's oscillation alone shrinks the first layer.

W is trained by full-batch gradient descent on the clean training loss while the second layer
does not learn: each aᵢ follows a 3-state Markov chain on {−η^{1/4}, 0, +η^{1/4}} (from ±η^{1/4}
it goes to 0; from 0 it jumps to ±η^{1/4} with probability ½ each; it starts at ±η^{1/4} with
probability ¼ each and at 0 with probability ½). With m = 1/√η neurons the paper shows that the
mean ‖wᵢ‖² falls to at most √η within 1/η² steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..callbacks._common import log_metrics
from ..compat import add_optimizer_steps, pl
from ..rng import CounterRNG
from . import functional as F
from .dynamics import two_layer_dynamics

__all__ = ["OscillationOnly", "markov_step"]


def markov_step(a: torch.Tensor, level: float, u: torch.Tensor) -> torch.Tensor:
    """One transition of the chain for every neuron, given uniforms ``u`` in [0, 1).

    Non-zero states go to 0; zero states go to +level if u < ½, else to −level.
    """
    jump = torch.where(u < 0.5, level, -level).to(a.dtype)
    return torch.where(a != 0, torch.zeros_like(a), jump)


class OscillationOnly(pl.LightningModule):
    """Full-batch GD on W with a Markov-chain second layer (Lemma 4).

    Args:
        dim: input dimension d (the CLI fills it from the datamodule's ``dim``).
        lr: step size η of the GD on W; the chain's level is η^{1/4}.
        width: number of neurons m (default ⌈1/√η⌉, the lemma's choice).
        init_scale: multiplier on the NTK initialisation of W (W_ij ~ N(0, 1/d)).
        seed: seed of the initialisation and of the chain.
        steps_per_batch: GD steps per Lightning step (``global_step`` counts GD steps).

    Trains on the datamodule's whole training set (``x_train``, ``y_train``, clean labels); the
    sampled batches are ignored. Logs ``dynamics/norm_sq_mean``, ``dynamics/a_abs_mean``,
    ``dynamics/cosine_mean``, ``train/loss`` every ``log_every_n_steps`` GD steps, and the
    lemma's target ``oscillation/sqrt_eta`` = √η once.
    """

    def __init__(
        self,
        dim: int | None = None,
        lr: float = 1e-2,
        width: int | None = None,
        init_scale: float = 1.0,
        seed: int = 0,
        steps_per_batch: int = 100,
    ) -> None:
        super().__init__()
        if dim is None or int(dim) != dim or dim < 1:
            raise ValueError(f"OscillationOnly: `dim` must be a positive integer (from `data.dim`), got {dim!r}.")
        if not (math.isfinite(lr) and 0 < lr < 1):
            raise ValueError(f"OscillationOnly: `lr` must be in (0, 1), got {lr!r}.")
        if width is not None and (int(width) != width or width < 1):
            raise ValueError(f"OscillationOnly: `width` must be a positive integer or null, got {width!r}.")
        if int(steps_per_batch) != steps_per_batch or steps_per_batch < 1:
            raise ValueError(f"OscillationOnly: `steps_per_batch` must be an integer ≥ 1, got {steps_per_batch!r}.")
        self.save_hyperparameters()
        self.automatic_optimization = False
        m = int(width) if width is not None else math.ceil(1 / math.sqrt(lr))
        self.level = lr**0.25
        W, _ = F.ntk_init(m, dim, init_scale, seed)
        self._chain = CounterRNG(seed, stream="oscillation")
        u0 = self._chain.uniform((m,), dtype=torch.float64)
        a = torch.where(u0 < 0.25, self.level, torch.where(u0 < 0.5, -self.level, 0.0)).float()
        self.W = nn.Parameter(W, requires_grad=False)
        self.a = nn.Parameter(a, requires_grad=False)
        self.register_buffer("W0", W.clone())

    def training_step(self, batch: Any, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        x, y = dm.x_train.to(self.W.dtype), dm.y_train.to(self.W.dtype)
        k = self.hparams.steps_per_batch
        if self.trainer.max_steps > 0:
            k = max(1, min(k, self.trainer.max_steps - self.global_step))
        every = self.trainer.log_every_n_steps
        u = self._chain.uniform(self.a.shape, n=k, device=self.W.device, dtype=torch.float64)
        with torch.no_grad():
            W, a = self.W.detach(), self.a.detach()
            for t in range(k):
                gW, _, _ = F.grads(W, a, x, y)
                W.sub_(self.hparams.lr * gW)
                a.copy_(markov_step(a, self.level, u[t]))
                step = self.global_step + t + 1
                if every > 0 and step % every == 0:
                    self._log(step)
        add_optimizer_steps(self.trainer, k)

    def on_train_start(self) -> None:
        if self.global_step == 0:
            self._log(0)
            for logger in self.loggers:
                log_metrics(logger, {"oscillation/sqrt_eta": math.sqrt(self.hparams.lr)}, 0)

    def _log(self, step: int) -> None:
        dm = self.trainer.datamodule
        teacher = dm.teacher.to(self.W.device, self.W.dtype)
        values = two_layer_dynamics(self.W, self.a, self.W0, teacher)
        values["train/loss"] = F.half_mse(self.W, self.a, dm.x_train.to(self.W.dtype), dm.y_train.to(self.W.dtype))
        keep = ("norm_sq_mean", "a_abs_mean", "cosine_mean", "frobenius", "lazy_distance")
        out = {f"dynamics/{k}": float(values[k]) for k in keep}
        out["train/loss"] = float(values["train/loss"])
        for logger in self.loggers:
            log_metrics(logger, out, step)

    def configure_optimizers(self) -> None:
        return None

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        state["chain_counter"] = torch.tensor(self._chain.counter)
        return state

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        state_dict = dict(state_dict)
        counter = state_dict.pop("chain_counter", None)
        if counter is not None:
            self._chain.counter = int(counter)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
