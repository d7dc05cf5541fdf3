"""Sharpness-aware minimisation (SAM) as Lightning strategies, for ``pytorch_lightning`` and ``lightning.pytorch``.

One SAM step (Foret et al. 2021; adaptive variant: Kwon et al. 2021, "ASAM")::

    g   = ∇L(w)                       first call of Lightning's closure
    ε   = sam_perturbation(w, g)       e.g. ρ g / ‖g‖
    g'  = ∇L(w + ε)                    second call of the closure ("perturbed pass")
    w  <- exact copy saved before the ascent
    user's optimizer steps with g'     (SGD, Adam, ...; LR schedulers untouched)

With ``every_n_steps=n`` the SAM step runs on the optimizer steps whose index (``trainer.global_step``, counted from
0) is a multiple of ``n``; the others are plain steps of the user's optimizer with ``g`` (one pass instead of two).

The algorithm lives once, in :class:`SAMMixin`. A Trainer accepts only strategies that subclass its own package's
``Strategy``, so :func:`_make_flavours` builds, for every installed Lightning package, a single-device flavour
(``SingleDeviceStrategy`` + mixin, registered as ``"sam"``) and a DDP flavour (``DDPStrategy`` + mixin, registered
as ``"sam_ddp"`` and ``"sam_ddp_spawn"``) and registers them in that package's ``StrategyRegistry``: importing this
module makes ``Trainer(strategy="sam")`` work with ``import lightning as L`` and ``import pytorch_lightning as pl``.

Names of the flavours (each class's ``__module__`` + ``__qualname__`` is an importable path, which pickling for
``sam_ddp_spawn`` and LightningCLI's ``class_path`` need):

* :data:`SAMStrategy`, :data:`SAMDDPStrategy`: the flavours of the served package (:data:`lightning_lnsgd.compat.PACKAGE`);
* ``PyTorchLightningSAMStrategy``/``PyTorchLightningSAMDDPStrategy`` and ``LightningSAMStrategy``/
  ``LightningSAMDDPStrategy``: the flavours of ``pytorch_lightning`` and ``lightning.pytorch``, whichever is served
  (present when that package is installed); :func:`sam_strategy_class` returns them by package.

The strategies learn about modules that run the SAM step themselves only through :mod:`lightning_lnsgd.protocol`.
"""

# No ``from __future__ import annotations`` here: the strategy classes are made inside a function, and jsonargparse
# (LightningCLI) resolves their ``__init__`` annotations; evaluated annotations need no name lookup in this module.

import contextlib
import os
from collections.abc import Callable, Generator, Mapping, Sequence
from datetime import timedelta
from types import ModuleType
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import compat
from ..checks import is_int, is_real
from ..protocol import replica_column, runs_sam_step, step_layout
from .perturbation import sam_perturbation

try:  # the default timeout of torch.distributed process groups (what DDPStrategy uses)
    from torch.distributed.constants import default_pg_timeout as DEFAULT_PG_TIMEOUT
except Exception:  # pragma: no cover - torch built without distributed
    DEFAULT_PG_TIMEOUT = timedelta(minutes=30)

__all__ = [
    "SAMDDPStrategy",
    "SAMMixin",
    "SAMStrategy",
    "is_perturbed_pass",
    "is_sam_strategy",
    "sam_perturbation",
    "sam_settings",
    "sam_strategy_class",
]

BNUpdate = Literal["first", "both"]
Device = Union[torch.device, str, int]

#: Prefix of each package's flavour names (``<prefix>SAMStrategy``, ``<prefix>SAMDDPStrategy``).
FLAVOUR_PREFIX = {"pytorch_lightning": "PyTorchLightning", "lightning.pytorch": "Lightning"}

_SUPPORTED_PRECISION = "32-true, 64-true, bf16-mixed, 16-true, bf16-true"

# Number of SAM perturbed passes currently running in this process (normally 0 or 1). Lets code without a
# trainer reference (e.g. a torchmetrics Metric) ask ``is_perturbed_pass()``.
_PERTURBED_DEPTH = 0


# --------------------------------------------------------------------------------------------------------------------
# The algorithm, independent of the Lightning package
# --------------------------------------------------------------------------------------------------------------------
def _loss_of(output: Any) -> Any:
    """The loss of a ``training_step`` output: the tensor itself, or the ``"loss"`` entry of a dict."""
    return output.get("loss") if isinstance(output, Mapping) else output


def _first_pass_output(first: Any, second: Any, name: str) -> Any:
    """``first`` (the output at ``w``) with its loss replaced by ``l2 - l2.detach() + l1.detach()``.

    The value is exactly the first pass's loss ``l1`` (``l2 - l2`` is an exact 0), the gradient is that of the
    perturbed pass's loss ``l2``: Lightning's closure backpropagates ``g'`` and reports the loss and outputs at ``w``
    to the progress bar and ``on_train_batch_end``.
    """
    l1, l2 = _loss_of(first), _loss_of(second)
    if not isinstance(l2, Tensor):
        raise RuntimeError(
            f"{name}: training_step returned {type(second).__name__} in the perturbed pass but a loss in the first "
            "pass; SAM needs a loss tensor (or a dict with 'loss') from both passes."
        )
    loss = l2 - l2.detach() + l1.detach()
    return {**first, "loss": loss} if isinstance(first, Mapping) else loss


def _drop_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` during the perturbed pass: the value at ``w + ε`` is not logged.

    ``log_dict`` and callbacks' ``pl_module.log`` go through ``log`` too, so every logging call of the pass is
    dropped (:func:`lightning_lnsgd.compat.redirect_log`)."""


def _tracks_running_stats(module: nn.Module) -> bool:
    # batch norm (any dimension, SyncBatchNorm, lazy) and instance norm with track_running_stats=True
    return bool(getattr(module, "track_running_stats", False)) and getattr(module, "running_mean", None) is not None


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Generator[None, None, None]:
    """The running statistics of ``module``'s normalisation layers are the same after the block as before it.

    Saving and restoring the buffers (rather than setting momentum to 0) also covers ``momentum=None`` (cumulative
    average) and ``num_batches_tracked``."""
    saved = [
        (m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None})
        for m in module.modules()
        if _tracks_running_stats(m)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


def _refusal(strategy: Any, trainer: Any) -> Optional[str]:
    """Why ``strategy`` cannot run SAM for ``trainer``'s fit (one sentence naming the setting, its value and what
    is allowed), or ``None``."""
    module = trainer.lightning_module
    if runs_sam_step(module):
        # The module runs the SAM step itself with this strategy's settings (lightning_lnsgd.protocol).
        layout = step_layout(module)
        replicas = None if layout is None else layout.total_replicas  # all ranks' replicas, when sharded
        if strategy.every_n_steps != 1:
            return (
                f"every_n_steps={strategy.every_n_steps} is not supported for {type(module).__name__}, which runs the "
                "SAM step itself inside its fused steps (lightning_lnsgd.protocol.MultiStepModule); use "
                "every_n_steps=1, or the module's unfused path."
            )
        if isinstance(strategy.rho, list) and replicas != len(strategy.rho):
            return (
                f"rho has {len(strategy.rho)} values (one per replica) but {type(module).__name__} runs "
                f"replicas={replicas}; give one float rho or exactly one value per replica."
            )
        return None
    if isinstance(strategy.rho, list):
        return (
            f"rho={strategy.rho!r} (one ρ per replica) needs a module that runs the SAM step on stacked replicas "
            "itself (lightning_lnsgd.protocol.MultiStepModule); give one float rho for any other module."
        )
    if not module.automatic_optimization:
        return (
            "automatic_optimization=False (manual optimisation) is not supported; SAM drives the two "
            "forward/backward passes itself and needs automatic_optimization=True."
        )
    if trainer.accumulate_grad_batches != 1:
        return (
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) is not supported; SAM needs the "
            "gradient of one batch for its ascent step, use accumulate_grad_batches=1."
        )
    optimizers = strategy.optimizers
    if len(optimizers) > 1:
        return f"{len(optimizers)} optimizers were configured; SAM supports exactly one optimizer."
    for opt in optimizers:
        if isinstance(opt, torch.optim.LBFGS):
            return (
                f"optimizer {type(opt).__name__} is not supported; SAM needs an optimizer whose step calls the "
                "closure exactly once (SGD, Adam, AdamW, ...), LBFGS re-evaluates it."
            )
    precision = strategy._package.plugins.precision
    plugin = strategy.precision_plugin
    if isinstance(plugin, precision.MixedPrecision):
        ok = plugin.scaler is None  # bf16-mixed has no gradient scaler
    else:
        ok = type(plugin) in (precision.Precision, precision.DoublePrecision, precision.HalfPrecision)
    if not ok:
        return (
            f"precision={getattr(plugin, 'precision', type(plugin).__name__)!r} ({type(plugin).__name__}) is not "
            f"supported; allowed: {_SUPPORTED_PRECISION} (16-mixed is refused: its gradient scaler would also have "
            "to see the ascent gradient)."
        )
    return None


class SAMMixin:
    """The SAM step, shared by every flavour (single device / DDP, ``pytorch_lightning`` / ``lightning.pytorch``).

    Comes before the Lightning strategy class in the bases, so that its ``setup``, ``training_step`` and
    ``optimizer_step`` wrap the parent's. ``_package`` is the Lightning package module of the flavour.
    """

    _package: ModuleType
    rho: Union[float, list[float]]
    normalize: bool
    adaptive: bool
    bn_update: BNUpdate
    every_n_steps: int

    def _init_sam(
        self,
        rho: Union[float, Sequence[float], str],
        normalize: bool,
        adaptive: bool,
        bn_update: str,
        every_n_steps: int,
    ) -> None:
        name = type(self).__name__
        if not is_int(every_n_steps) or every_n_steps < 1:
            raise ValueError(
                f"{name}: every_n_steps={every_n_steps!r} is not allowed; it must be an integer >= 1 (1: SAM on every "
                "optimizer step)."
            )
        self.every_n_steps = every_n_steps
        #: Whether ``rho`` is taken from the module's grid (its ``rho`` axis) at each fit's setup.
        self.rho_from_grid = isinstance(rho, str) and rho == "grid"
        if self.rho_from_grid:
            self.rho = []
        elif isinstance(rho, (list, tuple)):
            if not rho or not all(_is_radius(r) for r in rho):
                raise ValueError(f"{name}: rho={rho!r} is not allowed; a list of ρ needs one finite float > 0 per replica.")
            self.rho = [float(r) for r in rho]
        elif _is_radius(rho):
            self.rho = float(rho)  # type: ignore[arg-type]
        else:
            raise ValueError(f"{name}: rho={rho!r} is not allowed; rho must be a finite float > 0, a list of them or 'grid'.")
        if bn_update not in ("first", "both"):
            raise ValueError(
                f"{name}: bn_update={bn_update!r} is not allowed; choose 'first' (batch-norm running statistics "
                "updated only in the first pass) or 'both'."
            )
        self.normalize = bool(normalize)
        self.adaptive = bool(adaptive)
        self.bn_update = bn_update  # type: ignore[assignment]
        self._perturbed_pass = False
        self._capturing = False
        self._first_output: Any = None

    def is_sam_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (``trainer.global_step`` before it, counted from 0) is a SAM step; the
        others are plain steps of the user's optimizer."""
        return step % self.every_n_steps == 0

    @property
    def accelerator(self) -> Any:
        """The accelerator the Trainer handed over (as for Lightning's strategies); one of another Lightning package
        is refused in one line naming both packages and the fixes."""
        return super().accelerator  # type: ignore[misc]

    @accelerator.setter
    def accelerator(self, accelerator: Any) -> None:
        # The first thing a Trainer hands its strategy: a Trainer of the other Lightning package is stopped here, in
        # one line, instead of with its generic "invalid strategy" message (compat.admit_strategy_to_other_packages).
        other = compat.package_of(accelerator)
        if other is not None and other != self._package.__name__:
            raise ValueError(_foreign_trainer_message(type(self), self._package.__name__, other))
        super(SAMMixin, type(self)).accelerator.fset(self, accelerator)  # type: ignore[attr-defined,misc]

    @property
    def perturbed_pass(self) -> bool:
        """``True`` while the second ``training_step`` (at ``w + ε``) and its backward run."""
        return self._perturbed_pass

    # ---------------------------------------------------------------- refusals
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)  # type: ignore[misc]
        if trainer.state.fn == "fit":
            if self.rho_from_grid:
                self.rho = replica_column(trainer.lightning_module, "rho", type(self).__name__)
            self._validate_sam(trainer)

    def _validate_sam(self, trainer: Any) -> None:
        """Refuse settings under which the SAM step is not well defined, in the flavour's package's exception."""
        refusal = _refusal(self, trainer)
        if refusal is not None:
            raise self._package.utilities.exceptions.MisconfigurationException(f"{type(self).__name__}: {refusal}")

    # ---------------------------------------------------------------- the step
    def _ascent_context(self) -> contextlib.AbstractContextManager:
        """Context of the first (ascent) pass; the DDP flavour overrides it to skip the gradient all-reduce."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _perturbed_context(self, module: nn.Module) -> Generator[None, None, None]:
        """Flag the perturbed pass, drop its logging, and (bn_update='first') keep the running statistics."""
        global _PERTURBED_DEPTH
        kept = _running_stats_kept(module) if self.bn_update == "first" else contextlib.nullcontext()
        self._perturbed_pass = True
        _PERTURBED_DEPTH += 1
        try:
            with kept, compat.redirect_log(module, _drop_log):
                yield
        finally:
            self._perturbed_pass = False
            _PERTURBED_DEPTH -= 1

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Lightning's training step; in the perturbed pass it returns the first pass's output with the loss
        ``l2 - l2.detach() + l1.detach()`` (value of the pass at ``w``, gradient of the pass at ``w + ε``)."""
        output = super().training_step(*args, **kwargs)  # type: ignore[misc]
        if self._perturbed_pass:
            return _first_pass_output(self._first_output, output, type(self).__name__)
        if self._capturing:
            self._first_output = output
        return output

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> Any:
        """One SAM step: ascent pass, perturbation, perturbed pass, exact restore, then the user's optimizer step.

        The first closure call runs here directly, so ``on_before_optimizer_step`` and gradient clipping (run by the
        precision plugin after *its* closure call) see only the second gradient, once per step.
        """
        module = model if compat.is_lightning_module(model) else self.lightning_module  # type: ignore[attr-defined]
        if runs_sam_step(module):  # the module's own (manual) steps already are SAM steps
            return super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        # The step index comes from the trainer, which restores it from checkpoints: a resumed run keeps the schedule.
        if self.every_n_steps > 1 and not self.is_sam_step(compat.trainer_of(module).global_step):
            return super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        name = type(self).__name__

        # ---- pass 1: gradient at w (no hooks other than those of training_step/zero_grad/backward)
        self._capturing, self._first_output = True, None
        try:
            with self._ascent_context():
                first_loss = closure()
        finally:
            self._capturing = False

        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        with torch.no_grad():
            perturbation = sam_perturbation(
                params, [p.grad for p in params], self.rho, normalize=self.normalize, adaptive=self.adaptive
            )
            saved = [p.detach().clone() for p in params]  # restore from a copy: w + ε - ε is not exactly w
            for p, e in zip(params, perturbation):
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
                with self._perturbed_context(module):
                    return closure()
            finally:
                restore()

        try:
            output = super().optimizer_step(optimizer, perturbed_closure, model, **kwargs)  # type: ignore[misc]
        finally:
            restore()  # never leave the weights perturbed, whatever happened
            self._first_output = None
        if calls == 0:
            raise RuntimeError(
                f"{name}: the optimizer {type(optimizer).__name__} did not call the closure; SAM needs optimizers "
                "whose step(closure) calls it exactly once."
            )
        return output


def _foreign_trainer_message(cls: type, own: str, other: str) -> str:
    """What happened when a SAM strategy of package ``own`` met a Trainer of package ``other``, and the fixes."""
    top = other.split(".")[0]
    if own != compat.PACKAGE:
        why = f"it is the {own} flavour"
    elif os.environ.get(compat.ENV_VAR, "").strip():
        why = f"{compat.ENV_VAR}={os.environ[compat.ENV_VAR].strip()} makes lightning_lnsgd serve {own}"
    else:
        why = f"lightning_lnsgd was imported before {top}, so it serves {own}"
    return (
        f"{cls.__name__} is a {own} strategy but the Trainer is {other}'s ({why}); pass"
        f' strategy="{cls.strategy_name}" (registered in both packages), or set {compat.ENV_VAR}={top}, or import'
        f" {top} before lightning_lnsgd."
    )


def _is_radius(r: Any) -> bool:
    return is_real(r) and r > 0


# --------------------------------------------------------------------------------------------------------------------
# One flavour per Lightning package
# --------------------------------------------------------------------------------------------------------------------
def _make_flavours(package_name: str, served: bool) -> tuple[type, type]:
    """``(SAMStrategy, SAMDDPStrategy)`` of the Lightning package ``package_name``, registered in its registry."""
    pkg, fab = compat.package(package_name), compat.fabric(package_name)
    Accelerator = pkg.accelerators.Accelerator
    Precision = pkg.plugins.precision.Precision
    CheckpointIO, ClusterEnvironment = fab.plugins.CheckpointIO, fab.plugins.ClusterEnvironment
    Misconfiguration = pkg.utilities.exceptions.MisconfigurationException

    class SAMStrategy(SAMMixin, pkg.strategies.SingleDeviceStrategy):
        """SAM on one device (registered as ``"sam"``).

        Args:
            rho: perturbation radius ρ > 0; a list gives one ρ per stacked replica of a module that runs the SAM
                step itself (:class:`lightning_lnsgd.protocol.MultiStepModule`; refused for other modules); ``"grid"``
                takes that list at setup from the module's grid axis ``rho`` (:func:`lightning_lnsgd.protocol.replica_column`).
            normalize: ``True``: ε = ρ g/‖g‖ (Foret); ``False``: ε = ρ g.
            adaptive: ASAM, ε ∝ |w|² g (see :func:`sam_perturbation`).
            bn_update: ``"first"``: running statistics of normalisation layers are updated only by the first pass
                (default); ``"both"``: by both passes.
            every_n_steps: the SAM step on the optimizer steps whose index (``trainer.global_step``, from 0) is a
                multiple of n, a plain step of the user's optimizer on the others (default 1: SAM on every step).
                Refused for a module that runs the SAM step itself unless 1.
            device: the device; ``None`` (default) takes the one chosen by the Trainer's ``accelerator``/``devices``.
            accelerator: as for Lightning's ``SingleDeviceStrategy``.
            checkpoint_io: as for Lightning's ``SingleDeviceStrategy``.
            precision_plugin: as for Lightning's ``SingleDeviceStrategy``.
        """

        strategy_name = "sam"

        def __init__(
            self,
            rho: Union[float, list[float], Literal["grid"]] = 0.05,
            normalize: bool = True,
            adaptive: bool = False,
            bn_update: BNUpdate = "first",
            every_n_steps: int = 1,
            device: Optional[Device] = None,
            accelerator: Optional[Accelerator] = None,
            checkpoint_io: Optional[CheckpointIO] = None,
            precision_plugin: Optional[Precision] = None,
        ) -> None:
            super().__init__(
                device="cpu" if device is None else device,
                accelerator=accelerator,
                checkpoint_io=checkpoint_io,
                precision_plugin=precision_plugin,
            )
            # Lightning's accelerator connector hands its devices to a strategy that has ``parallel_devices`` and
            # leaves it empty, but never tells a SingleDeviceStrategy built from a registry name its device (it would
            # stay on "cpu" with accelerator="gpu"): exposing ``parallel_devices`` lets the connector hand it over.
            self._sam_device = torch.device("cpu" if device is None else device)
            self._sam_device_given = device is not None
            self._init_sam(rho, normalize, adaptive, bn_update, every_n_steps)

        @property
        def root_device(self) -> torch.device:
            """The device this strategy trains on."""
            return self._sam_device

        @property
        def parallel_devices(self) -> Optional[list[torch.device]]:
            """``[device]`` if a device was given, else ``None`` until the Trainer sets it."""
            return [self._sam_device] if self._sam_device_given else None

        @parallel_devices.setter
        def parallel_devices(self, devices: Optional[Sequence[Device]]) -> None:
            if not devices:
                return
            if len(devices) > 1:
                raise Misconfiguration(
                    f"{type(self).__name__} runs on one device but the Trainer selected {len(devices)} devices "
                    f"({[str(d) for d in devices]}); set Trainer(devices=1) or use strategy='sam_ddp'."
                )
            device = devices[0]
            self._sam_device = device if isinstance(device, torch.device) else torch.device(device)
            self._sam_device_given = True

        @classmethod
        def register_strategies(cls, strategy_registry: Any) -> None:
            """Register ``"sam"`` (overrides the parent's, which would register ``"single_device"`` to this class)."""
            strategy_registry.register("sam", cls, description="SAM on a single device", override=True)

    class SAMDDPStrategy(SAMMixin, pkg.strategies.DDPStrategy):
        """SAM with DistributedDataParallel (registered as ``"sam_ddp"``; ``"sam_ddp_spawn"`` uses ``start_method="spawn"``).

        By default the first (ascent) pass runs forward and backward inside ``model.no_sync()``: every rank perturbs
        the weights with the gradient of its own batch (m-sharpness with m = per-rank batch size). The second pass is
        synchronised as usual, so all ranks step with the same averaged gradient from the same restored weights and
        stay identical.

        Args:
            rho: as for ``SAMStrategy``.
            normalize: as for ``SAMStrategy``.
            adaptive: as for ``SAMStrategy``.
            bn_update: as for ``SAMStrategy``.
            every_n_steps: as for ``SAMStrategy``.
            sync_ascent: ``True``: all-reduce the ascent gradient too (every rank uses the global gradient for ε).
            accelerator: as for Lightning's ``DDPStrategy``.
            parallel_devices: as for Lightning's ``DDPStrategy``.
            cluster_environment: as for Lightning's ``DDPStrategy``.
            checkpoint_io: as for Lightning's ``DDPStrategy``.
            precision_plugin: as for Lightning's ``DDPStrategy``.
            process_group_backend: as for Lightning's ``DDPStrategy``.
            timeout: as for Lightning's ``DDPStrategy``.
            start_method: as for Lightning's ``DDPStrategy``.
            **kwargs: passed to ``DDPStrategy`` (e.g. ``ddp_comm_hook``, and ``DistributedDataParallel`` options such
                as ``find_unused_parameters``).
        """

        strategy_name = "sam_ddp"

        def __init__(
            self,
            rho: Union[float, list[float], Literal["grid"]] = 0.05,
            normalize: bool = True,
            adaptive: bool = False,
            bn_update: BNUpdate = "first",
            every_n_steps: int = 1,
            sync_ascent: bool = False,
            accelerator: Optional[Accelerator] = None,
            parallel_devices: Optional[list[torch.device]] = None,
            cluster_environment: Optional[ClusterEnvironment] = None,
            checkpoint_io: Optional[CheckpointIO] = None,
            precision_plugin: Optional[Precision] = None,
            process_group_backend: Optional[str] = None,
            timeout: Optional[timedelta] = DEFAULT_PG_TIMEOUT,
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
            self._init_sam(rho, normalize, adaptive, bn_update, every_n_steps)

        def _ascent_context(self) -> contextlib.AbstractContextManager:
            model = self.model
            if not self.sync_ascent and isinstance(model, torch.nn.parallel.DistributedDataParallel):
                # forward AND backward run inside: DDP decides in forward whether the backward will all-reduce
                return model.no_sync()
            return contextlib.nullcontext()

        @classmethod
        def register_strategies(cls, strategy_registry: Any) -> None:
            """Register ``"sam_ddp"`` and ``"sam_ddp_spawn"`` (not the parent's ``"ddp*"`` names)."""
            strategy_registry.register(
                "sam_ddp", cls, description="SAM with DDP, start_method='popen'", override=True, start_method="popen"
            )
            strategy_registry.register(
                "sam_ddp_spawn", cls, description="SAM with DDP, start_method='spawn'", override=True, start_method="spawn"
            )

    prefix = "" if served else FLAVOUR_PREFIX[package_name]
    for cls in (SAMStrategy, SAMDDPStrategy):
        cls._package = pkg
        cls.__module__ = __name__
        cls.__name__ = cls.__qualname__ = prefix + cls.__name__
        # override=True: re-importing (e.g. importlib.reload) re-registers the new class objects instead of failing
        cls.register_strategies(pkg.strategies.StrategyRegistry)
        compat.admit_strategy_to_other_packages(cls, package_name)  # its accelerator setter explains the mix-up
    return SAMStrategy, SAMDDPStrategy


_FLAVOURS: dict[str, tuple[type, type]] = {}
for _name in compat.INSTALLED:
    _FLAVOURS[_name] = _make_flavours(_name, served=_name == compat.PACKAGE)
    for _cls, _kind in zip(_FLAVOURS[_name], ("SAMStrategy", "SAMDDPStrategy")):
        globals()[FLAVOUR_PREFIX[_name] + _kind] = _cls  # every flavour by its package's name, whichever is served

#: SAM on one device, for the served Lightning package (registered as ``"sam"``; see ``_make_flavours``).
SAMStrategy: type = _FLAVOURS[compat.PACKAGE][0]
#: SAM with DDP, for the served Lightning package (registered as ``"sam_ddp"`` and ``"sam_ddp_spawn"``).
SAMDDPStrategy: type = _FLAVOURS[compat.PACKAGE][1]


def sam_strategy_class(package: Union[str, ModuleType] = compat.PACKAGE, ddp: bool = False) -> type:
    """The SAM strategy class of a Lightning package.

    Args:
        package: ``"pytorch_lightning"``, ``"lightning"``/``"lightning.pytorch"`` or the package module itself
            (default: the served package).
        ddp: the DDP flavour instead of the single-device one.
    """
    name = compat.package_name(package)
    if name not in _FLAVOURS:
        raise ValueError(f"package={name!r} is not installed; installed: {', '.join(_FLAVOURS)}.")
    return _FLAVOURS[name][1 if ddp else 0]


def is_sam_strategy(obj: Any) -> bool:
    """Whether ``obj`` is a SAM strategy of any flavour (single device or DDP, either Lightning package)."""
    return isinstance(obj, SAMMixin)


def sam_settings(strategy: Any) -> Optional[tuple[Union[float, list[float]], bool, bool]]:
    """``(rho, normalize, adaptive)`` when ``strategy`` is a SAM strategy, else ``None`` (``rho`` may be a list,
    one per stacked replica, for a module that runs the SAM step itself)."""
    if not is_sam_strategy(strategy):
        return None
    return strategy.rho, strategy.normalize, strategy.adaptive


def is_perturbed_pass(obj: Any = None) -> bool:
    """Whether a SAM strategy is currently running the perturbed (second) pass at ``w + ε``.

    Args:
        obj: a ``Trainer``, a ``LightningModule`` (attached to a trainer) or a ``Strategy``, of either Lightning
            package. With ``None``, answers whether any SAM strategy in this process is in its perturbed pass (for
            code without a trainer reference, e.g. a metric object).

    Returns:
        ``True`` only inside the second ``training_step``/backward of a SAM step; ``False`` otherwise, including for
        non-SAM strategies and modules without a trainer.
    """
    if obj is None:
        return _PERTURBED_DEPTH > 0
    if compat.is_lightning_module(obj):
        obj = compat.trainer_of(obj)
    if compat.is_trainer(obj):
        obj = obj.strategy
    return is_sam_strategy(obj) and obj.perturbed_pass
