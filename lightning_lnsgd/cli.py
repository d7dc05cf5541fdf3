"""Command line: ``python -m lightning_lnsgd {fit,validate,test,predict} --config FILE``.

A :class:`~pytorch_lightning.cli.LightningCLI` in subclass mode: a YAML names any
LightningModule and LightningDataModule by ``class_path``. Arguments that describe the data
(``dim``, ``num_classes``) are written once, under ``data``; a model that takes an argument of
the same name and leaves it unset receives the datamodule's value.

Long jobs (docs/cli.md, "Long jobs"): ``--ckpt_path`` is checked before anything is built (a file that is not a
readable Lightning checkpoint ends the run with one line naming it); the model is built from what the config and
the command line ask for, not from the checkpoint's hyper-parameters (the model decides what it may change on
resume); SIGTERM or SIGINT during ``fit`` writes ``interrupted.ckpt`` into the run's checkpoint directory at the end
of the current step and exits with status 143 (SIGTERM) or 130 (SIGINT).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import pickle
import re
import signal
import sys
import threading
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .compat import Callback, LightningCLI, pl, rank_zero_info

__all__ = ["LNSGDCLI", "main", "LINKED_DATA_ARGS", "CheckpointError", "ConfigError", "config_error_line", "InterruptCheckpoint", "check_checkpoint"]

#: Exit statuses of a fit interrupted by a signal: 128 + the signal number, as shells and schedulers expect.
EXIT_SIGTERM, EXIT_SIGINT = 128 + signal.SIGTERM, 128 + signal.SIGINT

#: ``ckpt_path`` values that Lightning resolves itself (not files).
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")


class ConfigError(ValueError):
    """A class of the config refused its arguments while the CLI built it (the class's message)."""


class CheckpointError(ValueError):
    """A ``ckpt_path`` that is not a readable Lightning checkpoint (missing, empty, truncated or foreign)."""


def check_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """Checks that ``path`` is a readable Lightning checkpoint and returns its ``hyper_parameters``.

    Raises :class:`CheckpointError`, one line naming the file and the cause, for a missing, empty, truncated or
    foreign file. Returns ``None`` when the file is a checkpoint whose entries are not all plain tensors and
    containers (torch's ``weights_only`` loader refuses it; Lightning still loads it, so it passes). Lightning's
    special values (``"last"``, ``"best"``, …) and URLs are left to Lightning.
    """
    text = str(path)
    if text in _SPECIAL_CKPT or text.startswith("registry:") or "://" in text:
        return None
    file = Path(text)

    def refuse(cause: str) -> CheckpointError:
        return CheckpointError(f"ckpt_path {text!r} is not a readable Lightning checkpoint: {cause}.")

    if not file.exists():
        raise refuse("no such file")
    if not file.is_file():
        raise refuse("not a regular file")
    if file.stat().st_size == 0:
        raise refuse("the file is empty")
    # torch.save writes a zip archive whose directory sits at the end: a truncated file has none.
    if not zipfile.is_zipfile(file):
        raise refuse("not a complete torch.save archive (truncated, or a file of another kind)")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            return None  # objects beyond tensors: readable by Lightning's own (full) loader
        raise refuse(f"damaged archive ({_first_line(error)})") from error
    except Exception as error:  # torch raises RuntimeError, EOFError, OSError, KeyError… for damaged archives
        raise refuse(f"damaged archive ({type(error).__name__}: {_first_line(error)})") from error
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise refuse(f"a torch file holding {type(ckpt).__name__}, without Lightning's 'state_dict' entry")
    hparams = ckpt.get("hyper_parameters")
    return dict(hparams) if isinstance(hparams, dict) else None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class InterruptCheckpoint(Callback):
    """Writes ``interrupted.ckpt`` into the run's checkpoint directory when a fit is interrupted.

    Lightning turns SIGTERM into a ``SIGTERMException`` at the end of the current training step, so the checkpoint
    holds a whole step and a resumed fit (``--ckpt_path …/interrupted.ckpt``) continues bit for bit.
    :func:`main` routes SIGINT (Ctrl-C) the same way; a second SIGINT interrupts at once. Other exceptions
    (a divergence, a bug) write nothing: their state is not worth resuming.

    The directory is the one of the trainer's first ``ModelCheckpoint`` (``…/version_N/checkpoints``), else
    ``checkpoints`` under the logger's run directory, else under ``trainer.default_root_dir``.
    Lightning's ``OnExceptionCheckpoint`` needs its directory before the run directory exists and is itself a
    ``Checkpoint`` (its presence would drop Lightning's default ``ModelCheckpoint``), hence this callback.
    """

    filename = "interrupted.ckpt"

    def __init__(self) -> None:
        super().__init__()
        #: Where the last interruption wrote its checkpoint, or ``None``.
        self.last_path: str | None = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, (pl.utilities.exceptions.SIGTERMException, KeyboardInterrupt)):
            return
        if trainer.state.fn != "fit":
            return
        path = os.path.join(self.directory(trainer), self.filename)
        trainer.save_checkpoint(path)
        self.last_path = path
        if trainer.is_global_zero:
            print(f"interrupted at step {trainer.global_step}: wrote {path}; resume with --ckpt_path {path}",
                  file=sys.stderr)

    @staticmethod
    def directory(trainer: Any) -> str:
        """The run's checkpoint directory."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, pl.callbacks.ModelCheckpoint) and callback.dirpath:
                return str(callback.dirpath)
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")

#: Data arguments that a model receives when it declares an argument of the same name.
LINKED_DATA_ARGS = ("dim", "num_classes")


class LNSGDCLI(LightningCLI):
    """The project's LightningCLI: any model and datamodule, shared data arguments linked.

    With ``--ckpt_path`` the file is checked first (:func:`check_checkpoint`) and the model is built from the
    config and the command line: LightningCLI ≥ 2.6 would parse the checkpoint's hyper-parameters over them, so
    that ``--model.lr 0.0005`` silently resumed at the checkpoint's rate. The model's ``on_load_checkpoint``
    decides what a resume may change (:class:`~lightning_lnsgd.TwoLayerLinear`: ``lr``, with a warning; its
    shape is an error).
    """

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        self._asked_model = None
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        ckpt_path = cfg.get("ckpt_path") if sub else None
        if ckpt_path:
            check_checkpoint(ckpt_path)
            self._asked_model = copy.deepcopy(cfg.get("model"))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            # A class refused its arguments. Recent jsonargparse wraps the class's own message in every alternative
            # of the argument's type; the class's message is the reason.
            cause = error.__cause__
            wrapped = isinstance(cause, ValueError) and str(error).startswith("Does not validate against any")
            raise ConfigError(str(cause if wrapped else error)) from error

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        _step_bar_steps_aside(cfg.get("trainer"))
        if getattr(self, "_asked_model", None) is not None:
            cfg["model"] = self._asked_model  # what the user asked, not the checkpoint's hyper-parameters
        model, data = cfg.get("model"), cfg.get("data")
        if model is None or data is None:
            return
        model_args, data_args = model.get("init_args"), data.get("init_args")
        if model_args is None or data_args is None:
            return
        for name in LINKED_DATA_ARGS:
            if name not in data_args or name not in model_args:
                continue
            given, value = model_args[name], data_args[name]
            if given is None:
                model_args[name] = value
            elif given != value:
                raise ValueError(
                    f"`model.init_args.{name}`={given!r} disagrees with `data.init_args.{name}`={value!r}; "
                    f"write `{name}` once, under `data`, and the model receives it."
                )


def _step_bar_steps_aside(trainer: Any) -> None:
    """Leaves the config's :class:`~lightning_lnsgd.StepProgressBar` out when ``enable_progress_bar`` is false.

    The shipped configs list the step bar among their callbacks, and Lightning refuses a progress-bar callback
    with ``enable_progress_bar=False``; switching the bar off (``--trainer.enable_progress_bar false``, what a batch
    job does first) means this bar too."""
    if trainer is None or trainer.get("enable_progress_bar") is not False:
        return
    callbacks = trainer.get("callbacks")
    if not isinstance(callbacks, list):
        return
    kept = [c for c in callbacks if not _is_step_bar(c)]
    if len(kept) < len(callbacks):
        trainer["callbacks"] = kept
        rank_zero_info("enable_progress_bar=False: the config's StepProgressBar is left out.")


def _is_step_bar(callback: Any) -> bool:
    from .twolayer.progress import StepProgressBar

    if isinstance(callback, StepProgressBar):
        return True
    class_path = callback.get("class_path") if hasattr(callback, "get") else None
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False  # LightningCLI reports a class it cannot import
    return isinstance(cls, type) and issubclass(cls, StepProgressBar)


def main(args: Sequence[str] | None = None, run: bool = True) -> LNSGDCLI | Any:
    """Runs the CLI on ``args`` (default: ``sys.argv[1:]``) and returns the :class:`LNSGDCLI`.

    Tests call it as ``main(["fit", "--config", path, "--trainer.fast_dev_run", "2"])``.

    Ends the process (``SystemExit``) with status 2 and one line ``lightning_lnsgd: error: …`` for an unreadable
    ``--ckpt_path``, and with status 143 (SIGTERM) or 130 (SIGINT) after an interrupted ``fit`` has written its
    checkpoint (:class:`InterruptCheckpoint`).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "report":
        from .report import main as report_main

        return report_main(argv[1:])
    received: list[int] = []
    try:
        with _sigint_as_sigterm(received) if run else contextlib.nullcontext():
            return LNSGDCLI(
                pl.LightningModule,
                pl.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                # From the shell, let LightningCLI read sys.argv itself (passing both makes it warn).
                args=None if args is None else argv,
                run=run,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                trainer_defaults={"callbacks": [InterruptCheckpoint()]},
                # Parse errors come back as exceptions, without the usage page, and end in one line (below).
                parser_kwargs={"exit_on_error": False, **{sub: {"exit_on_error": False} for sub in _SUBCOMMANDS}},
            )
    except CheckpointError as error:
        print(f"lightning_lnsgd: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except argparse.ArgumentError as error:
        print(f"lightning_lnsgd: error: {config_error_line(str(error))}", file=sys.stderr)
        raise SystemExit(2) from None
    except ConfigError as error:
        print(f"lightning_lnsgd: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except pl.utilities.exceptions.SIGTERMException:
        raise SystemExit(EXIT_SIGINT if signal.SIGINT in received else EXIT_SIGTERM) from None


_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_NOT_THE_REASON = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "Given value", "tip:",
                   "Problem with given class_path", "Expected a <class 'NoneType'>")


def config_error_line(message: str) -> str:
    """One line for a jsonargparse error: the field, the class it belongs to, and why the value is refused.

    jsonargparse explains a refused value of a ``class_path`` argument through every alternative of its type
    (``Expected a <class 'NoneType'>`` …); the line keeps the field and the reason given by the class that was
    named. A message it cannot read comes back whole.
    """
    lines = [line.strip().removeprefix("- ") for line in message.strip().splitlines()]
    keys = [m.group(1) for line in lines if (m := re.match(r'(?:error: )?Parser key "([^"]+)"', line))]
    classes = [m.group(1) for line in lines if (m := re.match(r"Problem with given class_path '([^']+)'", line))]
    reasons = [line for line in lines if line and not line.startswith(_NOT_THE_REASON)]
    if not keys or not reasons:
        return " ".join(lines)
    field = keys[0]
    nested = re.search(r"NestedArg\(key='([^']+)'", message)
    unknown = re.search(r'No action for key "([^"]+)"', reasons[0])  # older jsonargparse, for an unknown option
    if unknown:
        nested, reasons[0] = unknown, f"Option '{unknown.group(1)}' is not accepted"
    if len(keys) > 1 or (classes and nested):
        field += ".init_args." + (keys[-1] if len(keys) > 1 else nested.group(1))
    where = f" ({classes[0]})" if classes else ""
    return f"{field}{where}: {reasons[0]}"


@contextlib.contextmanager
def _sigint_as_sigterm(received: list[int]) -> Iterator[None]:
    """Makes the first SIGINT stop a fit as SIGTERM does: at the end of the current step, with a checkpoint.

    While a fit runs, Lightning handles SIGTERM (it stops at the end of the step); a SIGINT is passed on as SIGTERM
    then. Outside a fit, and on a second SIGINT, it interrupts at once (``KeyboardInterrupt``) as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if signal.SIGINT in received or signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt
        received.append(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
