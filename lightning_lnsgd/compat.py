"""The one module that knows which Lightning package this process serves.

Lightning ships the same trainer twice: as ``pytorch_lightning`` and as ``lightning.pytorch`` (the unified
``lightning`` package). A Trainer accepts only callbacks and strategies that subclass *its own* package's base
classes, so this module decides, once per process, which package the rest of ``lightning_lnsgd`` builds on:

1. the environment variable ``LIGHTNING_LNSGD_PACKAGE`` (``pytorch_lightning`` or ``lightning``), when set;
2. else the package the program has already imported, when it imported exactly one of them
   (``import lightning as L`` before ``import lightning_lnsgd`` selects ``lightning.pytorch``);
3. else ``pytorch_lightning`` when it is installed, else ``lightning.pytorch``.

Every other module of the package imports Lightning through this one. Two things are built for *every* installed
package, whatever is served: the callbacks' base class :class:`Callback` (it subclasses each package's
``Callback``, a hook interface without state, so one callback object suits either Trainer and either package's
LightningCLI) and the SAM strategies, which are registered under ``"sam"``, ``"sam_ddp"`` and ``"sam_ddp_spawn"``
in each package's ``StrategyRegistry`` (see :mod:`lightning_lnsgd.strategies.sam`).

The Lightning internals the package still needs live here, each behind one function with a test that fails when a
release changes it (``tests/test_compat.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import operator
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

__all__ = [
    "ENV_VAR",
    "PACKAGE",
    "INSTALLED",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "MisconfigurationException",
    "TQDMProgressBar",
    "TensorBoardLogger",
    "Trainer",
    "add_optimizer_steps",
    "admit_strategy_to_other_packages",
    "extract_batch_size",
    "fabric",
    "is_lightning_module",
    "is_tensorboard_logger",
    "is_trainer",
    "misconfiguration_errors",
    "package",
    "package_name",
    "package_of",
    "pl",
    "plain_summary_writer",
    "rank_zero_info",
    "redirect_log",
    "rank_zero_warn",
    "seed_everything",
    "trainer_of",
]

#: Environment variable that names the Lightning package to serve: ``pytorch_lightning`` or ``lightning``.
ENV_VAR = "LIGHTNING_LNSGD_PACKAGE"

#: The two importable names of Lightning's trainer package, and the Fabric package that comes with each.
_PACKAGES = {"pytorch_lightning": "lightning_fabric", "lightning.pytorch": "lightning.fabric"}
_ALIASES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch", "lightning.pytorch": "lightning.pytorch"}


def package_name(package: str | ModuleType) -> str:
    """The import name of a Lightning package given as ``"pytorch_lightning"``, ``"lightning"``,
    ``"lightning.pytorch"`` or the module itself; a ``ValueError`` names the allowed values otherwise."""
    name = package.__name__ if isinstance(package, ModuleType) else str(package)
    if name not in _ALIASES:
        raise ValueError(
            f"package={name!r} is not a Lightning package; allowed: 'pytorch_lightning', 'lightning' or 'lightning.pytorch'."
        )
    return _ALIASES[name]


def _installed(name: str) -> bool:
    # Only the top-level name is looked up: finding ``lightning.pytorch`` would import all of ``lightning``.
    return importlib.util.find_spec(name.split(".")[0]) is not None


def _choose() -> str:
    wanted = os.environ.get(ENV_VAR, "").strip()
    if wanted:
        if wanted not in _ALIASES:
            raise ImportError(
                f"{ENV_VAR}={wanted!r} is not a Lightning package; allowed: 'pytorch_lightning' or 'lightning'."
            )
        name = _ALIASES[wanted]
        if not _installed(name):
            raise ImportError(f"{ENV_VAR}={wanted!r}, but {name.split('.')[0]} is not installed.")
        return name
    imported = [name for name in _PACKAGES if name in sys.modules]
    if len(imported) == 1:
        return imported[0]
    for name in _PACKAGES:
        if _installed(name):
            return name
    raise ImportError("lightning_lnsgd needs Lightning: pip install pytorch-lightning (or lightning).")


#: The served package's import name: ``"pytorch_lightning"`` or ``"lightning.pytorch"``.
PACKAGE: str = _choose()
#: Every installed Lightning package, the served one first.
INSTALLED: tuple[str, ...] = (PACKAGE, *[n for n in _PACKAGES if n != PACKAGE and _installed(n)])


def package(name: str = PACKAGE) -> ModuleType:
    """The Lightning package ``name`` (``"pytorch_lightning"`` or ``"lightning.pytorch"``), imported with the
    submodules this project uses (strategies, precision plugins, callbacks, loggers)."""
    module = importlib.import_module(name)
    for sub in ("strategies", "plugins.precision", "callbacks", "loggers", "utilities", "utilities.data", "utilities.exceptions"):
        importlib.import_module(f"{name}.{sub}")
    return module


def fabric(name: str = PACKAGE) -> ModuleType:
    """The Fabric package that ships with the Lightning package ``name`` (for checkpoint IO and cluster types)."""
    module = importlib.import_module(_PACKAGES[name])
    importlib.import_module(f"{_PACKAGES[name]}.plugins")
    return module


#: The served Lightning package (``import pytorch_lightning as pl`` or ``import lightning.pytorch as pl``).
pl = package()

Trainer = pl.Trainer
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
TensorBoardLogger = pl.loggers.TensorBoardLogger
TQDMProgressBar = pl.callbacks.TQDMProgressBar
MisconfigurationException = pl.utilities.exceptions.MisconfigurationException
rank_zero_warn = pl.utilities.rank_zero_warn
rank_zero_info = pl.utilities.rank_zero_info
seed_everything = pl.seed_everything
extract_batch_size = pl.utilities.data.extract_batch_size


def __getattr__(name: str) -> Any:
    # The CLI module imports jsonargparse: load it only for the code that asks for it.
    if name == "LightningCLI":
        return importlib.import_module(f"{PACKAGE}.cli").LightningCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _callback_base() -> type:
    bases = tuple(package(name).Callback for name in INSTALLED)
    if len(bases) == 1:
        return bases[0]
    # Each package's Callback is the same stateless hook interface: subclassing both lets either Trainer (and either
    # package's LightningCLI, which checks the class path against its own Callback) accept our callbacks.
    return type("Callback", bases, {"__module__": __name__, "__doc__": "Lightning's Callback, of every installed package."})


#: Base class of this package's callbacks: a ``Callback`` of every installed Lightning package.
Callback: type = _callback_base()


def trainer_of(module: Any) -> Any:
    """The Trainer ``module`` (a LightningModule) is attached to, or ``None`` when it is not attached."""
    try:
        return module.trainer  # the public property raises RuntimeError while the module is detached
    except RuntimeError:
        return None


def _of_every_package(attribute: str) -> tuple[type, ...]:
    return tuple(operator.attrgetter(attribute)(package(name)) for name in INSTALLED)


def is_trainer(obj: Any) -> bool:
    """Whether ``obj`` is a Trainer of any installed Lightning package."""
    return isinstance(obj, _of_every_package("Trainer"))


def is_lightning_module(obj: Any) -> bool:
    """Whether ``obj`` is a LightningModule of any installed Lightning package."""
    return isinstance(obj, _of_every_package("LightningModule"))


def is_tensorboard_logger(obj: Any) -> bool:
    """Whether ``obj`` is a ``TensorBoardLogger`` of any installed Lightning package."""
    return isinstance(obj, _of_every_package("loggers.TensorBoardLogger"))


def package_of(obj: Any) -> str | None:
    """The Lightning package (``"pytorch_lightning"`` or ``"lightning.pytorch"``) that defines ``obj``'s class, or
    ``None`` for a class of neither."""
    module = type(obj).__module__
    return next((name for name in _PACKAGES if module == name or module.startswith(name + ".")), None)


def admit_strategy_to_other_packages(cls: type, own: str) -> None:
    """Lets the Trainers of the installed packages other than ``own`` take an instance of the strategy class ``cls``
    as far as the strategy's own checks.

    A Trainer refuses a strategy of the other package with a generic "invalid strategy" message before any of the
    strategy's code runs. Registered as a virtual subclass of the other package's ``Strategy`` (an ABC), the
    object gets past that check, and the Trainer's accelerator connector then hands it its accelerator (the
    ``accelerator`` setter, Lightning-internal; ``tests/strategies/test_sam.py`` checks it), where the strategy
    can say in its own words what happened."""
    for name in INSTALLED:
        if name != own:
            package(name).strategies.Strategy.register(cls)


def misconfiguration_errors() -> tuple[type, ...]:
    """``MisconfigurationException`` of every installed package (a user's module raises its own package's)."""
    return _of_every_package("utilities.exceptions.MisconfigurationException")


# ------------------------------------------------------------------------------------------------------------------
# Internals that remain (each checked by tests/test_compat.py)
# ------------------------------------------------------------------------------------------------------------------
def add_optimizer_steps(trainer: Any, n: int) -> None:
    """Counts ``n`` optimizer steps of a manually optimised module in ``trainer.global_step``.

    A module that runs several SGD steps per Lightning step (the fused two-layer engine) advances the step count by
    the steps it ran; Lightning has no public API for this. ``global_step`` of manual optimisation is the
    ``completed`` count of the manual loop's ``optim_step_progress``; ``ready`` moves with it, as Lightning's own
    ``increment_ready``/``increment_completed`` pair does.
    """
    if n < 0:
        raise ValueError(f"add_optimizer_steps: n={n} must be >= 0.")
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    for tracker in (progress.total, progress.current):
        tracker.ready += n
        tracker.completed += n


def plain_summary_writer(logger: Any) -> Any:
    """The ``SummaryWriter`` that ``logger.log_metrics`` writes through, when writing to it directly writes the same
    events: ``logger`` is a ``TensorBoardLogger`` of any installed package, without a tag prefix, on global rank 0.
    ``None`` otherwise (then use ``logger.log_metrics``).

    Internal: ``TensorBoardLogger`` keeps its ``prefix`` argument in ``_prefix``; a logger without that attribute is
    treated as prefixed, so a release that renames it only costs speed.
    """
    if not is_tensorboard_logger(logger) or getattr(logger, "_prefix", "-") != "":
        return None
    if pl.utilities.rank_zero_only.rank != 0:
        return None
    return logger.experiment


@contextlib.contextmanager
def redirect_log(module: Any, replacement: Callable[..., None]) -> Iterator[None]:
    """Routes every ``module.log`` call to ``replacement`` for the duration of the block.

    Used where a pass of the user's step must not reach Lightning's results: SAM's perturbed pass (dropped) and
    the pruned evaluations of ``PruningCurve`` (captured). Lightning has no public hook for either. An instance
    attribute shadows the bound method; ``log_dict`` and callbacks' ``pl_module.log`` calls go through ``log`` too
    (``tests/test_compat.py`` checks both packages), and the method is back after the block, whatever happened.
    """
    shadowed = module.__dict__.get("log")
    module.log = replacement
    try:
        yield
    finally:
        if shadowed is None:
            del module.log
        else:
            module.log = shadowed
