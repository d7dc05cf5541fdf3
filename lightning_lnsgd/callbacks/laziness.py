"""Laziness: logs the function-space laziness of any LightningModule during training (its ``forward``, or however
``forward=`` says the model is called on a batch).

The math (linearisation gap, empirical NTK, kernel distance) lives in :mod:`lightning_lnsgd.metrics.functional.laziness`
and is re-exported here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from ..compat import Callback, LightningModule, Trainer, rank_zero_warn
from ..metrics.functional.laziness import (
    Forward,
    VmapFailed,
    concat_examples,
    empirical_ntk,
    first_examples,
    kernel_distance,
    linearization_gap,
    map_tensors,
    num_examples,
    parameters_and_buffers,
)
from ._common import log_scalars, logging_interval, validation_loaders

__all__ = ["Laziness", "empirical_ntk", "kernel_distance", "linearization_gap"]

Params = dict[str, torch.Tensor]


def _call_method(name: str, module: nn.Module, batch: Any) -> torch.Tensor:
    """``module.<name>(batch)``: ``Laziness(forward="<name>")`` (a module-level function, so the callback pickles)."""
    return getattr(module, name)(batch)


class Laziness(Callback):
    """Logs ``laziness/linearization_gap`` and ``laziness/kernel_distance`` of the LightningModule's output.

    The network measured is f(x) = ``module(x)`` (default) or f(batch) = ``forward(module, batch)``. The probe is
    fixed at the start of training: ``probe`` if given, else the first ``probe_size`` examples of the validation set
    (of the first validation loader, ``trainer.val_dataloaders`` or the datamodule's / module's ``val_dataloader()``,
    each batch moved by ``trainer.strategy.batch_to_device``): ``batch[input_index]`` by default, the whole batch
    when ``forward`` is given. θ₀ and
    the probe are taken at the start of training and saved in checkpoints. Every ``every_n_steps`` SGD
    steps (and at step 0) the callback evaluates, on global rank 0 only, in eval mode, at TensorBoard step =
    ``trainer.global_step``:

    * ``laziness/linearization_gap`` on the whole probe (≈ 3 forward passes),
    * ``laziness/kernel_distance`` on the first ``kernel_probe_size`` probe examples (k·c single-example backward
      passes and k·c·P floats of memory; ``kernel_probe_size=0`` turns it off).

    Args:
        probe: fixed probe: inputs (a tensor) for ``module(x)``, a batch for ``forward``; ``None``: from the
            validation set. A batch is any nesting of tuples, lists and dicts whose tensors of rank ≥ 1 hold the
            examples along dim 0.
        probe_size: examples in the probe (when taken from the validation set).
        kernel_probe_size: examples used for the kernel (≤ probe size; 0: no kernel distance).
        every_n_steps: period in SGD steps (``None``: ``trainer.log_every_n_steps``).
        buffers: ``"current"``: θ₀ and θ_t are both evaluated with the current buffers (batch-norm running
            statistics), so only parameter changes count; ``"initial"``: θ₀ with the buffers saved at the start
            (then f(x; θ₀) is the initial network exactly, but changes in the running statistics, which start at
            mean 0 / variance 1, count as non-laziness too).
        input_index: where the inputs are in a validation batch (index of a tuple/list or key of a dict).
        chunk_size: ``vmap`` chunk for the Jacobian (None: all kernel-probe examples at once; 1: one example at a
            time without ``vmap``). Models ``vmap`` cannot batch (data-dependent control flow in the forward, such
            as Hugging Face BERT's attention-mask code or ``.item()``; an ``nn.LSTM`` whose state is built per call)
            fall back to one example at a time by themselves, with one warning; ``chunk_size=1`` skips the failed
            attempt and the warning. The values are the same either way.
        forward: how the model is called on a probe batch, returning the output tensor whose linearisation and NTK
            are measured: a callable ``(module, batch) -> tensor`` (``lambda m, b: m(b[0], b[1])`` for
            ``forward(inputs, target)``) or the name of a method of the module, called as ``module.<name>(batch)``.
            ``None``: ``module(x)`` with ``x = batch[input_index]``. It runs inside ``torch.func`` (the parameters
            are swapped in through ``functional_call``), in eval mode, once on the whole probe and once per
            kernel-probe example (a batch of one example); it must not change the module's state.
    """

    def __init__(
        self,
        probe: Optional[torch.Tensor] = None,
        probe_size: int = 64,
        kernel_probe_size: int = 8,
        every_n_steps: Optional[int] = None,
        buffers: Literal["current", "initial"] = "current",
        input_index: int | str = 0,
        chunk_size: Optional[int] = None,
        forward: Union[Callable[[nn.Module, Any], torch.Tensor], str, None] = None,
    ) -> None:
        if probe_size < 1:
            raise ValueError(f"Laziness: probe_size={probe_size!r} must be an integer >= 1.")
        if kernel_probe_size < 0:
            raise ValueError(f"Laziness: kernel_probe_size={kernel_probe_size!r} must be an integer >= 0.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"Laziness: every_n_steps={every_n_steps!r} must be an integer >= 1 or None.")
        if buffers not in ("current", "initial"):
            raise ValueError(f"Laziness: buffers={buffers!r} must be 'current' or 'initial'.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"Laziness: chunk_size={chunk_size!r} must be an integer >= 1 or None.")
        if not (forward is None or callable(forward) or (isinstance(forward, str) and forward)):
            raise ValueError(
                f"Laziness: forward={forward!r} must be a callable (module, batch) -> tensor, the name of a method of "
                "the module, or None (module(x))."
            )
        self.probe = probe
        self.probe_size = probe_size
        self.kernel_probe_size = kernel_probe_size
        self.every_n_steps = every_n_steps
        self.buffers = buffers
        self.input_index = input_index
        self.chunk_size = chunk_size
        self.forward = forward
        self._call: Optional[Forward] = (
            functools.partial(_call_method, forward) if isinstance(forward, str) else forward
        )
        self._params0: Params = {}
        self._buffers0: Params = {}
        self._K0: Optional[torch.Tensor] = None
        self._chunk = chunk_size  # what the kernel uses: chunk_size, or 1 once vmap failed on this fit's model
        self._last_step = -1
        self.last: dict[str, float] = {}

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "params0": {k: v.cpu() for k, v in self._params0.items()},
            "buffers0": {k: v.cpu() for k, v in self._buffers0.items()},
            "probe": None if self.probe is None else map_tensors(torch.Tensor.cpu, self.probe),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._params0 = dict(state_dict.get("params0", {}))
        self._buffers0 = dict(state_dict.get("buffers0", {}))
        if state_dict.get("probe") is not None:
            self.probe = state_dict["probe"]
        self._K0 = None

    # -- setup ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._chunk = self.chunk_size
        if isinstance(self.forward, str) and not callable(getattr(pl_module, self.forward, None)):
            raise ValueError(
                f"Laziness: forward={self.forward!r} is not a method of {type(pl_module).__name__}; give the name of "
                "one of its methods or a callable (module, batch) -> tensor."
            )

    def _probe_from_validation(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        loader = validation_loaders(trainer, pl_module)[0]
        parts, n = [], 0
        for batch in loader:
            batch = trainer.strategy.batch_to_device(batch)
            if self._call is None and isinstance(batch, (tuple, list, Mapping)):
                batch = batch[self.input_index]
            parts.append(first_examples(batch, self.probe_size - n))
            n += num_examples(parts[-1])
            if n >= self.probe_size:
                break
        if not parts:
            raise ValueError("Laziness: the validation set is empty; pass `probe` explicitly.")
        return concat_examples(parts)

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # At the start of training: the checkpoint is restored and, when validation runs in the first epoch,
        # Lightning has loaded the validation loaders (trainer.val_dataloaders).
        if self.probe is None:
            self.probe = self._probe_from_validation(trainer, pl_module)
        device = pl_module.device
        self.probe = map_tensors(lambda t: t.to(device), self.probe)
        params, buffers = parameters_and_buffers(pl_module)
        if not self._params0:  # not restored from a checkpoint
            self._params0 = {k: v.clone() for k, v in params.items()}
            self._buffers0 = {k: v.clone() for k, v in buffers.items()}
        self._params0 = {k: v.to(pl_module.device) for k, v in self._params0.items()}
        self._buffers0 = {k: v.to(pl_module.device) for k, v in self._buffers0.items()}
        self._K0 = None

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _every(self, trainer: Trainer) -> int:
        return logging_interval(trainer, self.every_n_steps)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._start(trainer, pl_module)
        if trainer.global_step == 0:
            self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self._every(trainer)
        if every > 0 and trainer.global_step % every == 0:
            self._record(trainer, pl_module)

    # -- work ----------------------------------------------------------------------------------------------------
    def compute(self, pl_module: nn.Module) -> dict[str, torch.Tensor]:
        """``{"linearization_gap": ..., "kernel_distance": ...}`` (0-dim tensors) for the current weights."""
        if self.probe is None or not self._params0:
            raise RuntimeError("Laziness: no probe / θ₀ yet (compute is available from the start of training).")
        buffers = dict(pl_module.named_buffers())
        buffers0 = buffers if self.buffers == "current" else self._buffers0
        gap = linearization_gap(pl_module, self._params0, self.probe, buffers=buffers, buffers0=buffers0, forward=self._call)
        out = {"linearization_gap": gap}
        k = min(self.kernel_probe_size, num_examples(self.probe))
        if k > 0:
            xk = first_examples(self.probe, k)
            # K₀ depends on the buffers too: cache it only when they are fixed
            has_float_buffers = any(b.is_floating_point() for b in buffers.values())
            if self._K0 is None or (self.buffers == "current" and has_float_buffers):
                self._K0 = self._kernel(pl_module, xk, self._params0, buffers0)
            K = self._kernel(pl_module, xk, None, buffers)
            out["kernel_distance"] = kernel_distance(self._K0, K)
        return out

    def _kernel(self, pl_module: nn.Module, x: Any, params: Optional[Params], buffers: Params) -> torch.Tensor:
        """The empirical NTK on ``x``, one example at a time from the first time ``vmap`` cannot batch the model."""
        try:
            return empirical_ntk(pl_module, x, params, buffers, self._chunk, forward=self._call)
        except VmapFailed as error:
            reason = str(error.__cause__ or error).splitlines()[0]
            rank_zero_warn(
                f"Laziness: vmap cannot batch the kernel probe through {type(pl_module).__name__}"
                f" ({reason[:100]}{'...' if len(reason) > 100 else ''}); the kernel is computed one example at a time"
                " instead (same values). Set Laziness(chunk_size=1) to skip this attempt and warning."
            )
            self._chunk = 1
            return empirical_ntk(pl_module, x, params, buffers, 1, forward=self._call)

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        values = self.compute(pl_module)
        self.last = log_scalars(trainer, {f"laziness/{k}": v for k, v in values.items()}, step)
