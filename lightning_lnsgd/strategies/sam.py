"""Sharpness-aware minimisation (SAM) as PyTorch Lightning strategies.

One SAM step (Foret et al. 2021; adaptive variant: Kwon et al. 2021, "ASAM")::

    g   = ∇L(w)                       first call of Lightning's closure
    ε   = sam_perturbation(w, g)       e.g. ρ g / ‖g‖
    g'  = ∇L(w + ε)                    second call of the closure ("perturbed pass")
    w  <- exact copy saved before the ascent
    user's optimizer steps with g'     (SGD, Adam, ...; LR schedulers untouched)

This module provides

* :func:`sam_perturbation`: the ascent formula as one pure function (also for stacked replicas,
  see ``batch_dims``); the fused engine calls the same function.
* :class:`SAMStrategy` (registered as ``"sam"``): one device, CPU or GPU.
* :class:`SAMDDPStrategy` (registered as ``"sam_ddp"`` and ``"sam_ddp_spawn"``): DDP, where by default every
  rank perturbs with its own gradient (m-sharpness) and only the second gradient is all-reduced.
* :func:`is_perturbed_pass`: tells ``training_step`` (and metrics) whether the current pass is the perturbed one.

Importing this module registers the strategy names in Lightning's ``StrategyRegistry``, so that
``Trainer(strategy="sam")`` and ``--trainer.strategy sam`` work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from ..compat import MisconfigurationException, fabric, pl

CheckpointIO, ClusterEnvironment = fabric().plugins.CheckpointIO, fabric().plugins.ClusterEnvironment
_DEVICE = Union[torch.device, str, int]
AbstractClosure = __import__(pl.__name__ + ".loops.optimization.closure", fromlist=["AbstractClosure"]).AbstractClosure
DoublePrecision, HalfPrecision = pl.plugins.precision.DoublePrecision, pl.plugins.precision.HalfPrecision
MixedPrecision, Precision = pl.plugins.precision.MixedPrecision, pl.plugins.precision.Precision
DDPStrategy, SingleDeviceStrategy = pl.strategies.DDPStrategy, pl.strategies.SingleDeviceStrategy
Strategy, StrategyRegistry = pl.strategies.Strategy, pl.strategies.StrategyRegistry
TrainerFn = __import__(pl.__name__ + ".trainer.states", fromlist=["TrainerFn"]).TrainerFn

try:  # the default timeout of torch.distributed process groups (what DDPStrategy uses)
    from torch.distributed.constants import default_pg_timeout as _DEFAULT_PG_TIMEOUT
except Exception:  # pragma: no cover - torch built without distributed
    _DEFAULT_PG_TIMEOUT = timedelta(minutes=30)

__all__ = [
    "SAMDDPStrategy",
    "SAMStrategy",
    "is_perturbed_pass",
    "sam_perturbation",
]

BNUpdate = Literal["first", "both"]

# Number of SAM perturbed passes currently running in this process (normally 0 or 1). Lets code without a
# trainer reference (e.g. a torchmetrics Metric) ask ``is_perturbed_pass()``.
_PERTURBED_DEPTH = 0


# --------------------------------------------------------------------------------------------------------------------
# The perturbation formula
# --------------------------------------------------------------------------------------------------------------------
def sam_perturbation(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    rho: float,
    normalize: bool = True,
    adaptive: bool = False,
    eps: float = 1e-12,
    batch_dims: int = 0,
) -> list[Optional[Tensor]]:
    r"""The SAM ascent step ε for parameters ``params`` with gradients ``grads``.

    With :math:`T = |w|` (elementwise) if ``adaptive`` else :math:`T = 1`:

    * ``normalize=True``:  :math:`ε = ρ\, T^2 g / (\|T g\| + \text{eps})` (Foret's SAM; ASAM when adaptive),
    * ``normalize=False``: :math:`ε = ρ\, T^2 g` (unnormalised SAM).

    The norm :math:`\|T g\|` is the *global* Euclidean norm over all given parameters together.

    Args:
        params: the weights ``w`` (only read; used for ``adaptive``).
        grads: the gradients ``g``, same length and shapes as ``params``; an entry ``None`` marks a parameter
            without gradient: it is skipped (not perturbed, not in the norm) and its result is ``None``.
        rho: the radius ρ (> 0).
        normalize: divide by the global gradient norm.
        adaptive: scale by :math:`|w|` (ASAM).
        eps: added to the norm to avoid division by zero (a zero gradient gives ε = 0).
        batch_dims: the first ``batch_dims`` axes of every tensor index independent replicas (all tensors must
            share these leading axes, e.g. ``W`` of shape ``(K, m, d)`` and ``a`` of shape ``(K, m)`` with
            ``batch_dims=1``); the norm is then taken per replica over all remaining axes of all parameters, and
            ``rho`` may be a float or a tensor broadcastable to the replica shape ``(K,)``.

    Returns:
        A list with ε for every parameter (same shape and dtype as the parameter), ``None`` where the gradient is
        ``None``. The function is pure: it does not modify its inputs. Call it under ``torch.no_grad()`` unless you
        want to differentiate through it.
    """
    if len(params) != len(grads):
        raise ValueError(f"sam_perturbation: got {len(params)} params but {len(grads)} grads; they must match.")
    if batch_dims < 0:
        raise ValueError(f"sam_perturbation: batch_dims={batch_dims} must be >= 0.")
    pairs = [(i, p, g) for i, (p, g) in enumerate(zip(params, grads)) if g is not None]
    out: list[Optional[Tensor]] = [None] * len(params)
    if not pairs:
        return out

    batch_shape = pairs[0][2].shape[:batch_dims]
    for _, p, g in pairs:
        if g.shape != p.shape:
            raise ValueError(f"sam_perturbation: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}.")
        if g.dim() < batch_dims or g.shape[:batch_dims] != batch_shape:
            raise ValueError(
                f"sam_perturbation: batch_dims={batch_dims} needs every tensor to start with the replica shape "
                f"{tuple(batch_shape)}, got {tuple(g.shape)}."
            )

    def _expand(x: Tensor, ndim: int) -> Tensor:
        # (replica shape) -> (replica shape, 1, ..., 1) so that it broadcasts against a tensor with ndim axes
        return x.reshape(x.shape + (1,) * (ndim - batch_dims))

    # the norm is accumulated in at least float32 so that bf16/fp16 gradients do not overflow or lose precision
    tg = [(p.abs() * g) if adaptive else g for _, p, g in pairs]
    scale: Union[float, Tensor] = rho
    if normalize:
        sq: Optional[Tensor] = None
        for t in tg:
            acc = t.to(torch.promote_types(t.dtype, torch.float32))
            s = acc.pow(2).sum(dim=tuple(range(batch_dims, t.dim())))  # per replica; a scalar when batch_dims=0
            sq = s if sq is None else sq + s
        assert sq is not None
        scale = rho / (sq.sqrt() + eps)
    if isinstance(scale, Tensor):
        scale = scale.expand(batch_shape) if scale.dim() < batch_dims else scale

    def scale_of(t: Tensor) -> Union[float, Tensor]:
        return _expand(scale, t.dim()) if isinstance(scale, Tensor) else scale

    for (i, p, _), t in zip(pairs, tg):
        # T^2 g = T (T g)
        e = (p.abs() * t) if adaptive else t
        out[i] = (e * scale_of(e)).to(p.dtype)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Perturbed-pass API
# --------------------------------------------------------------------------------------------------------------------
def is_perturbed_pass(obj: Union[pl.Trainer, pl.LightningModule, Strategy, None] = None) -> bool:
    """Whether the SAM strategy is currently running the perturbed (second) pass at ``w + ε``.

    Args:
        obj: a ``Trainer``, a ``LightningModule`` (attached to a trainer) or a ``Strategy``. With ``None``, answers
            whether any SAM strategy in this process is in its perturbed pass (for code without a trainer
            reference, e.g. a metric object).

    Returns:
        ``True`` only inside the second ``training_step``/backward of a SAM step; ``False`` otherwise, including for
        non-SAM strategies and modules without a trainer.
    """
    if obj is None:
        return _PERTURBED_DEPTH > 0
    strategy: Any = obj
    if isinstance(obj, pl.LightningModule):
        trainer = obj._trainer  # the public property raises when detached
        if trainer is None:
            return False
        strategy = trainer.strategy
    elif isinstance(obj, pl.Trainer):
        strategy = obj.strategy
    return bool(getattr(strategy, "perturbed_pass", False))


def _noop_log(*args: Any, **kwargs: Any) -> None:
    """Replaces ``_ResultCollection.log`` during the perturbed pass."""


@contextlib.contextmanager
def _suppress_logging(trainer: Optional[pl.Trainer]) -> Generator[None, None, None]:
    """Drop every ``self.log``/``self.log_dict`` (from the module or from callbacks) while active.

    All of them end in the trainer's result collection (``trainer._results.log``), so shadowing that one method is
    the single place that catches module and callback logging alike; the rest of ``LightningModule.log`` (argument
    checks) still runs, so mistakes are still reported.
    """
    results = getattr(trainer, "_results", None) if trainer is not None else None
    if results is None:
        yield
        return
    results.log = _noop_log  # instance attribute shadows the bound method
    try:
        yield
    finally:
        del results.log


# --------------------------------------------------------------------------------------------------------------------
# The strategies
# --------------------------------------------------------------------------------------------------------------------
_SUPPORTED_PRECISION = "32-true, 64-true, bf16-mixed, 16-true, bf16-true"


class _SAMMixin:
    """The SAM step shared by the single-device and the DDP strategies.

    Must come before the Lightning strategy class in the bases, so that its ``optimizer_step`` wraps the parent's.
    """

    rho: float
    normalize: bool
    adaptive: bool
    bn_update: BNUpdate

    def _init_sam(self, rho: float | list[float], normalize: bool, adaptive: bool, bn_update: str) -> None:
        if isinstance(rho, (list, tuple)):
            # One ρ per stacked replica: only the fused TwoLayerLinear path can use it (checked at setup).
            if not rho or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < float("inf") for r in rho):
                raise ValueError(
                    f"{type(self).__name__}: rho={rho!r} is not allowed; a list of ρ needs one finite float > 0 per replica."
                )
            self.rho = [float(r) for r in rho]  # type: ignore[assignment]
            rho = 1.0
        elif not isinstance(rho, (int, float)) or isinstance(rho, bool) or not 0 < rho < float("inf"):
            raise ValueError(f"{type(self).__name__}: rho={rho!r} is not allowed; rho must be a finite float > 0.")
        if bn_update not in ("first", "both"):
            raise ValueError(
                f"{type(self).__name__}: bn_update={bn_update!r} is not allowed; choose 'first' (batch-norm running "
                "statistics updated only in the first pass) or 'both'."
            )
        if not isinstance(getattr(self, "rho", None), list):
            self.rho = float(rho)
        self.normalize = bool(normalize)
        self.adaptive = bool(adaptive)
        self.bn_update = bn_update  # type: ignore[assignment]
        self._perturbed_pass = False

    @property
    def perturbed_pass(self) -> bool:
        """``True`` while the second ``training_step`` (at ``w + ε``) and its backward run."""
        return self._perturbed_pass

    # ---------------------------------------------------------------- validation
    def _validate_sam(self, trainer: pl.Trainer) -> None:
        """Refuse settings under which the SAM step is not well defined (clear message: setting, value, allowed)."""
        name = type(self).__name__
        module = trainer.lightning_module
        if getattr(module, "performs_sam_step", False):
            return  # the module runs the SAM step itself (the fused engine) with this strategy's settings
        if isinstance(self.rho, list):
            raise MisconfigurationException(
                f"{name}: rho={self.rho!r} (one ρ per replica) needs a module that runs SAM on stacked replicas "
                "itself (TwoLayerLinear on its fused path); give one float rho for any other module."
            )
        if not module.automatic_optimization:
            raise MisconfigurationException(
                f"{name}: automatic_optimization=False (manual optimisation) is not supported; SAM drives the two "
                "forward/backward passes itself and needs automatic_optimization=True."
            )
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                f"{name}: Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) is not supported; "
                "SAM needs the gradient of one batch for its ascent step, use accumulate_grad_batches=1."
            )
        optimizers = self.optimizers  # type: ignore[attr-defined]
        if len(optimizers) > 1:
            raise MisconfigurationException(
                f"{name}: {len(optimizers)} optimizers were configured; SAM supports exactly one optimizer."
            )
        for opt in optimizers:
            if isinstance(opt, torch.optim.LBFGS):
                raise MisconfigurationException(
                    f"{name}: optimizer {type(opt).__name__} is not supported; SAM needs an optimizer whose step "
                    "calls the closure exactly once (SGD, Adam, AdamW, ...), LBFGS re-evaluates it."
                )
        plugin = self.precision_plugin  # type: ignore[attr-defined]
        precision = getattr(plugin, "precision", type(plugin).__name__)
        if isinstance(plugin, MixedPrecision):
            ok = plugin.scaler is None  # bf16-mixed has no gradient scaler
        else:
            ok = type(plugin) in (Precision, DoublePrecision, HalfPrecision)
        if not ok:
            raise MisconfigurationException(
                f"{name}: precision={precision!r} ({type(plugin).__name__}) is not supported; allowed: "
                f"{_SUPPORTED_PRECISION} (16-mixed is refused: its gradient scaler would also have to see the "
                "ascent gradient)."
            )

    # ---------------------------------------------------------------- the step
    def _ascent_context(self) -> contextlib.AbstractContextManager:
        """Context of the first (ascent) pass; DDP overrides it to skip the gradient all-reduce."""
        return contextlib.nullcontext()

    def _bn_modules(self, model: torch.nn.Module) -> list[_BatchNorm]:
        return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]

    @contextlib.contextmanager
    def _perturbed_context(self, model: pl.LightningModule) -> Generator[None, None, None]:
        """Flag the perturbed pass, drop its logging, and (bn_update='first') keep BN running statistics."""
        global _PERTURBED_DEPTH
        bn_state: list[tuple[_BatchNorm, dict[str, Tensor]]] = []
        if self.bn_update == "first":
            # saving and restoring the buffers (rather than momentum=0) also covers momentum=None (cumulative
            # average) and num_batches_tracked
            for m in self._bn_modules(model):
                bn_state.append(
                    (m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None})
                )
        self._perturbed_pass = True
        _PERTURBED_DEPTH += 1
        try:
            with _suppress_logging(model._trainer):
                yield
        finally:
            self._perturbed_pass = False
            _PERTURBED_DEPTH -= 1
            with torch.no_grad():
                for m, bufs in bn_state:
                    for k, b in bufs.items():
                        getattr(m, k).copy_(b)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union[pl.LightningModule, torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        """One SAM step: ascent pass, perturbation, perturbed pass, exact restore, then the user's optimizer step.

        The first closure call runs here directly, so ``on_before_optimizer_step`` and gradient clipping (run by the
        precision plugin after *its* closure call) see only the second gradient, once per step.
        """
        lm = model if isinstance(model, pl.LightningModule) else self.lightning_module  # type: ignore[attr-defined]
        assert lm is not None
        name = type(self).__name__

        # ---- pass 1: gradient at w (no hooks other than those of training_step/zero_grad/backward)
        with self._ascent_context():
            first_loss = closure()
        # Lightning's Closure keeps the result of its last call and hands it to the loop (progress bar, outputs of
        # on_train_batch_end); we want the one at w, so remember it and put it back after the second call.
        first_result = getattr(closure, "_result", None) if isinstance(closure, AbstractClosure) else None

        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        saved: list[Tensor] = []
        with torch.no_grad():
            perturbation = sam_perturbation(
                params, [p.grad for p in params], self.rho, normalize=self.normalize, adaptive=self.adaptive
            )
            for p, e in zip(params, perturbation):
                saved.append(p.detach().clone())  # restore from a copy: w + ε - ε is not exactly w in floating point
                p.add_(e)

        calls = 0
        restored = False

        def restore() -> None:
            nonlocal restored
            if not restored:
                with torch.no_grad():
                    for p, w in zip(params, saved):
                        p.copy_(w)
                restored = True

        def perturbed_closure() -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise RuntimeError(
                    f"{name}: the optimizer {type(optimizer).__name__} called the closure {calls} times in one step; "
                    "SAM supports optimizers that call it exactly once (SGD, Adam, ...), not LBFGS-like ones."
                )
            try:
                if first_loss is None:
                    return None  # training_step returned None: Lightning skips this step, so do we
                with self._perturbed_context(lm):
                    closure()
            finally:
                restore()
            if first_result is not None:
                closure._result = first_result  # type: ignore[attr-defined]
            return first_loss

        try:
            output = super().optimizer_step(optimizer, perturbed_closure, model, **kwargs)  # type: ignore[misc]
        finally:
            restore()  # never leave the weights perturbed, whatever happened
        if calls == 0:
            raise RuntimeError(
                f"{name}: the optimizer {type(optimizer).__name__} did not call the closure; SAM needs optimizers "
                "whose step(closure) calls it exactly once."
            )
        return output


class SAMStrategy(_SAMMixin, SingleDeviceStrategy):
    """SAM on one device (registered as ``"sam"``).

    Args:
        rho: perturbation radius ρ > 0; a list gives one ρ per stacked replica of the fused
            :class:`~lightning_lnsgd.model.TwoLayerLinear` path (refused for other modules).
        normalize: ``True``: ε = ρ g/‖g‖ (Foret); ``False``: ε = ρ g.
        adaptive: ASAM, ε ∝ |w|² g (see :func:`sam_perturbation`).
        bn_update: ``"first"``: batch-norm running statistics are updated only by the first pass (default);
            ``"both"``: by both passes.
        device: the device; ``None`` (default) takes the one chosen by the Trainer's ``accelerator``/``devices``.
        accelerator, checkpoint_io, precision_plugin: as for Lightning's ``SingleDeviceStrategy``.
    """

    strategy_name = "sam"

    def __init__(
        self,
        rho: float | list[float] = 0.05,
        normalize: bool = True,
        adaptive: bool = False,
        bn_update: BNUpdate = "first",
        device: Optional[_DEVICE] = None,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        super().__init__(
            device="cpu" if device is None else device,
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        # Lightning's accelerator connector fills ``parallel_devices`` of a strategy that has the attribute and
        # leaves it empty, but never tells a SingleDeviceStrategy built from a registry name its device (it would
        # stay on "cpu" with accelerator="gpu"). Exposing ``parallel_devices`` lets the connector hand it over.
        self._device_given = device is not None
        self._init_sam(rho, normalize, adaptive, bn_update)

    @property
    def parallel_devices(self) -> Optional[list[torch.device]]:
        """``[device]`` if a device was given, else ``None`` until the Trainer sets it."""
        return [self.root_device] if self._device_given else None

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[Sequence[Union[torch.device, int, str]]]) -> None:
        if not devices:
            return
        if len(devices) > 1:
            raise MisconfigurationException(
                f"SAMStrategy runs on one device but the Trainer selected {len(devices)} devices "
                f"({[str(d) for d in devices]}); set Trainer(devices=1) or use strategy='sam_ddp'."
            )
        device = devices[0]
        self._root_device = device if isinstance(device, torch.device) else torch.device(device)
        self._device_given = True

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._validate_sam(trainer)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``"sam"`` (overrides the parent's, which would register ``"single_device"`` to this class)."""
        strategy_registry.register("sam", cls, description="SAM on a single device", override=True)


class SAMDDPStrategy(_SAMMixin, DDPStrategy):
    """SAM with DistributedDataParallel (registered as ``"sam_ddp"``; ``"sam_ddp_spawn"`` uses ``start_method="spawn"``).

    By default the first (ascent) pass runs forward and backward inside ``model.no_sync()``: every rank perturbs the
    weights with the gradient of its own batch (m-sharpness with m = per-rank batch size). The second pass is
    synchronised as usual, so all ranks step with the same averaged gradient from the same restored weights and stay
    identical.

    Args:
        rho, normalize, adaptive, bn_update: as for :class:`SAMStrategy`.
        sync_ascent: ``True``: all-reduce the ascent gradient too (every rank uses the global gradient for ε).
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin, process_group_backend,
            timeout, start_method: as for Lightning's ``DDPStrategy``.
        **kwargs: passed to ``DDPStrategy`` (e.g. ``ddp_comm_hook``, and ``DistributedDataParallel`` options such as
            ``find_unused_parameters``).
    """

    strategy_name = "sam_ddp"

    def __init__(
        self,
        rho: float | list[float] = 0.05,
        normalize: bool = True,
        adaptive: bool = False,
        bn_update: BNUpdate = "first",
        sync_ascent: bool = False,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = _DEFAULT_PG_TIMEOUT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        self.sync_ascent = bool(sync_ascent)
        self._init_sam(rho, normalize, adaptive, bn_update)

    def _ascent_context(self) -> contextlib.AbstractContextManager:
        model = self.model
        if not self.sync_ascent and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # forward AND backward run inside: DDP decides in forward whether the backward will all-reduce
            return model.no_sync()
        return contextlib.nullcontext()

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._validate_sam(trainer)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``"sam_ddp"`` and ``"sam_ddp_spawn"`` (not the parent's ``"ddp*"`` names)."""
        strategy_registry.register(
            "sam_ddp", cls, description="SAM with DDP, start_method='popen'", override=True, start_method="popen"
        )
        strategy_registry.register(
            "sam_ddp_spawn", cls, description="SAM with DDP, start_method='spawn'", override=True, start_method="spawn"
        )


# override=True: re-importing (e.g. importlib.reload) re-registers the new class objects instead of failing
SAMStrategy.register_strategies(StrategyRegistry)
SAMDDPStrategy.register_strategies(StrategyRegistry)
