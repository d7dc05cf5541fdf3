r"""Function-space laziness of any network (the paper's Figs. 3 and 5, for models of any architecture).

On a fixed probe batch ``x`` (k examples, c outputs each), with θ₀ the parameters at the start of training:

* **linearisation gap** (how far the network is from its linearisation around θ₀)::

      gap(t) = ‖f(x; θ_t) − [f(x; θ₀) + J_θ₀ (θ_t − θ₀)]‖ / ‖f(x; θ_t) − f(x; θ₀)‖

  One Jacobian-vector product (``torch.func.jvp`` of ``torch.func.functional_call`` at θ₀ in the direction
  θ_t − θ₀) plus one forward pass at θ_t: ≈ 3 forward passes on the probe. 0 when nothing moved (0/0 := 0).
* **kernel distance** (how far the empirical NTK moved)::

      K = J Jᵀ  (J: the (k·c) × P Jacobian of all outputs on the probe w.r.t. all P parameters)
      dist(t) = 1 − ⟨K₀, K_t⟩_F / (‖K₀‖_F ‖K_t‖_F)

  J is built per example with ``vmap(jacrev)``: k·c backward passes of a single example and k·c·P floats of memory
  (8 examples × 10 classes × 11.2 M parameters of ResNet-18 = 3.6 GB in float32), plus ``(k·c)²·P`` FLOPs for J Jᵀ.

Both are exactly zero for a model that is linear in its parameters (the lazy / NTK limit) and grow as the network
learns features. The network is evaluated in eval mode (batch norm uses running statistics, dropout is off); the
buffers (running statistics) go through ``functional_call`` as well: by default the *current* buffers are used at
both θ₀ and θ_t, so that the quantities measure the dependence on the parameters only (see :class:`Laziness`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from ..compat import pl
import torch
from ..compat import Callback
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

__all__ = ["Laziness", "empirical_ntk", "kernel_distance", "linearization_gap"]

Params = dict[str, torch.Tensor]


def _params_and_buffers(model: nn.Module) -> tuple[Params, Params]:
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    return params, buffers


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _forward(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, (params, buffers), (x,), strict=False)


def linearization_gap(
    model: nn.Module,
    params0: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    buffers0: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """‖f(x; θ) − f(x; θ₀) − J_θ₀(θ − θ₀)‖ / ‖f(x; θ) − f(x; θ₀)‖ (0 when f(x; θ) = f(x; θ₀)), a 0-dim tensor.

    Args:
        model: the network; evaluated in eval mode through ``functional_call``.
        params0: θ₀ by parameter name (every trainable parameter of ``model``).
        x: the probe inputs.
        params: θ; default: the model's current parameters.
        buffers: buffers used at θ; default: the model's current buffers.
        buffers0: buffers used at θ₀; default: ``buffers``.
    """
    cur_params, cur_buffers = _params_and_buffers(model)
    params = dict(cur_params if params is None else params)
    buffers = dict(cur_buffers if buffers is None else buffers)
    buffers0 = dict(buffers if buffers0 is None else buffers0)
    names = list(params0)
    if set(names) != set(params):
        raise ValueError(f"linearization_gap: params0 has {sorted(params0)} but the model has {sorted(params)}.")
    p0 = tuple(params0[n].detach() for n in names)
    delta = tuple(params[n].detach() - params0[n].detach() for n in names)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return _forward(model, dict(zip(names, ps)), buffers0, x)

    with _eval_mode(model), torch.no_grad():
        f_t = _forward(model, params, buffers, x)
        f_0, jv = jvp(f, p0, delta)
    moved = (f_t - f_0).double()
    residual = moved - jv.double()
    num, den = residual.norm(), moved.norm()
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def empirical_ntk(
    model: nn.Module,
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The empirical NTK K = J Jᵀ on ``x``, shape ``(k·c, k·c)`` (rows: example-major, then output), float64.

    J is computed per example (``vmap`` over examples of ``jacrev`` over parameters; the network runs in eval mode on
    one example at a time, so batch norm must use running statistics). ``chunk_size`` limits how many examples
    ``vmap`` processes at once (memory). Cost: k·c single-example backward passes, k·c·P floats for J.
    """
    cur_params, cur_buffers = _params_and_buffers(model)
    params = dict(cur_params if params is None else params)
    buffers = dict(cur_buffers if buffers is None else buffers)
    names = list(params)

    def f_single(ps: Params, xi: torch.Tensor) -> torch.Tensor:
        return _forward(model, ps, buffers, xi.unsqueeze(0)).reshape(-1)

    with _eval_mode(model), torch.no_grad():
        jac = vmap(jacrev(f_single), in_dims=(None, 0), chunk_size=chunk_size)(
            {n: params[n].detach() for n in names}, x
        )  # {name: (k, c, *shape)}
        k = x.shape[0]
        rows = torch.cat([jac[n].reshape(k * jac[n].shape[1], -1) for n in names], dim=1)  # (k·c, P)
        del jac
        K = rows @ rows.T
    return K.double()


def kernel_distance(K0: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """1 − ⟨K₀, K⟩_F / (‖K₀‖_F ‖K‖_F), clamped to [0, 2] against rounding; a 0-dim float64 tensor."""
    K0, K = K0.double(), K.double()
    cos = (K0 * K).sum() / (K0.norm() * K.norm()).clamp_min(torch.finfo(torch.float64).tiny)
    return (1.0 - cos).clamp(0.0, 2.0)


class Laziness(Callback):
    """Logs ``laziness/linearization_gap`` and ``laziness/kernel_distance`` of the LightningModule's ``forward``.

    The probe batch is fixed at the start of training: ``probe`` if given, else the first ``probe_size`` examples of
    the validation set (``batch[input_index]`` of the validation batches, moved through the module's batch-transfer
    hooks). θ₀ (and the probe) are taken at the start of fit and saved in checkpoints. Every ``every_n_steps`` SGD
    steps (and at step 0) the callback evaluates, on global rank 0 only, in eval mode, at TensorBoard step =
    ``trainer.global_step``:

    * ``laziness/linearization_gap`` on the whole probe (≈ 3 forward passes),
    * ``laziness/kernel_distance`` on the first ``kernel_probe_size`` probe examples (k·c single-example backward
      passes and k·c·P floats of memory; ``kernel_probe_size=0`` turns it off).

    Args:
        probe: fixed probe inputs (a tensor); ``None``: from the validation set.
        probe_size: examples in the probe (when taken from the validation set).
        kernel_probe_size: examples used for the kernel (≤ probe size; 0: no kernel distance).
        every_n_steps: period in SGD steps (``None``: ``trainer.log_every_n_steps``).
        buffers: ``"current"``: θ₀ and θ_t are both evaluated with the current buffers (batch-norm running
            statistics), so only parameter changes count; ``"initial"``: θ₀ with the buffers saved at the start
            (then f(x; θ₀) is the initial network exactly, but changes in the running statistics, which start at
            mean 0 / variance 1, count as non-laziness too).
        input_index: where the inputs are in a validation batch (index of a tuple/list or key of a dict).
        chunk_size: ``vmap`` chunk for the Jacobian (None: all kernel-probe examples at once).
    """

    def __init__(
        self,
        probe: torch.Tensor | None = None,
        probe_size: int = 64,
        kernel_probe_size: int = 8,
        every_n_steps: int | None = None,
        buffers: Literal["current", "initial"] = "current",
        input_index: int | str = 0,
        chunk_size: int | None = None,
    ) -> None:
        if probe_size < 1 or kernel_probe_size < 0:
            raise ValueError(f"Laziness: need probe_size >= 1 and kernel_probe_size >= 0, got {probe_size}, {kernel_probe_size}.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"Laziness: `every_n_steps` must be >= 1 or None, got {every_n_steps}.")
        if buffers not in ("current", "initial"):
            raise ValueError(f"Laziness: `buffers` must be 'current' or 'initial', got {buffers!r}.")
        self.probe = probe
        self.probe_size = probe_size
        self.kernel_probe_size = kernel_probe_size
        self.every_n_steps = every_n_steps
        self.buffers = buffers
        self.input_index = input_index
        self.chunk_size = chunk_size
        self._params0: Params = {}
        self._buffers0: Params = {}
        self._K0: torch.Tensor | None = None
        self._last_step = -1
        self.last: dict[str, float] = {}

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "params0": {k: v.cpu() for k, v in self._params0.items()},
            "buffers0": {k: v.cpu() for k, v in self._buffers0.items()},
            "probe": None if self.probe is None else self.probe.cpu(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._params0 = dict(state_dict.get("params0", {}))
        self._buffers0 = dict(state_dict.get("buffers0", {}))
        if state_dict.get("probe") is not None:
            self.probe = state_dict["probe"]
        self._K0 = None

    # -- setup ---------------------------------------------------------------------------------------------------
    def _probe_from_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        loader: Any = trainer.val_dataloaders
        if loader is None:  # not loaded yet at fit start: ask the source the validation loop will use
            source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
            if source is not None and source.is_defined():
                loader = source.dataloader()
            else:
                dm = getattr(trainer, "datamodule", None)
                loader = (dm if dm is not None else pl_module).val_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        parts, n = [], 0
        for batch in loader:
            # the module's own transfer hooks, not strategy.batch_to_device (LabelNoise wraps that during training)
            batch = pl_module._apply_batch_transfer_handler(batch, pl_module.device)
            x = batch[self.input_index] if isinstance(batch, (tuple, list, Mapping)) else batch
            parts.append(x[: self.probe_size - n])
            n += parts[-1].shape[0]
            if n >= self.probe_size:
                break
        if not parts:
            raise ValueError("Laziness: the validation set is empty; pass `probe` explicitly.")
        return torch.cat(parts)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.probe is None:
            self.probe = self._probe_from_validation(trainer, pl_module)
        self.probe = self.probe.to(pl_module.device)
        params, buffers = _params_and_buffers(pl_module)
        if not self._params0:  # not restored from a checkpoint
            self._params0 = {k: v.clone() for k, v in params.items()}
            self._buffers0 = {k: v.clone() for k, v in buffers.items()}
        self._params0 = {k: v.to(pl_module.device) for k, v in self._params0.items()}
        self._buffers0 = {k: v.to(pl_module.device) for k, v in self._buffers0.items()}
        self._K0 = None

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _every(self, trainer: pl.Trainer) -> int:
        return trainer.log_every_n_steps if self.every_n_steps is None else self.every_n_steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self._every(trainer)
        if every > 0 and trainer.global_step % every == 0:
            self._record(trainer, pl_module)

    # -- work ----------------------------------------------------------------------------------------------------
    def compute(self, pl_module: nn.Module) -> dict[str, torch.Tensor]:
        """``{"linearization_gap": ..., "kernel_distance": ...}`` (0-dim tensors) for the current weights."""
        if self.probe is None or not self._params0:
            raise RuntimeError("Laziness: no probe / θ₀ yet (compute is available after on_fit_start).")
        buffers = dict(pl_module.named_buffers())
        buffers0 = buffers if self.buffers == "current" else self._buffers0
        out = {"linearization_gap": linearization_gap(pl_module, self._params0, self.probe, buffers=buffers, buffers0=buffers0)}
        k = min(self.kernel_probe_size, self.probe.shape[0])
        if k > 0:
            xk = self.probe[:k]
            # K₀ depends on the buffers too: cache it only when they are fixed
            has_float_buffers = any(b.is_floating_point() for b in buffers.values())
            if self._K0 is None or (self.buffers == "current" and has_float_buffers):
                self._K0 = empirical_ntk(pl_module, xk, self._params0, buffers0, self.chunk_size)
            K = empirical_ntk(pl_module, xk, None, buffers, self.chunk_size)
            out["kernel_distance"] = kernel_distance(self._K0, K)
        return out

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        values = self.compute(pl_module)
        floats = torch.stack([v.double().reshape(()) for v in values.values()]).cpu().tolist()
        self.last = {f"laziness/{k}": f for k, f in zip(values, floats)}
        for lg in trainer.loggers:
            lg.log_metrics(self.last, step=step)
