"""Command line: ``python -m lightning_lnsgd {fit,validate,test,predict} --config FILE``.

A :class:`~pytorch_lightning.cli.LightningCLI` in subclass mode: a YAML names any
LightningModule and LightningDataModule by ``class_path``. Arguments that describe the data
(``dim``, ``num_classes``) are written once, under ``data``; a model that takes an argument of
the same name and leaves it unset receives the datamodule's value.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .compat import LightningCLI, pl

__all__ = ["LNSGDCLI", "main", "LINKED_DATA_ARGS"]

#: Data arguments that a model receives when it declares an argument of the same name.
LINKED_DATA_ARGS = ("dim", "num_classes")


class LNSGDCLI(LightningCLI):
    """The project's LightningCLI: any model and datamodule, shared data arguments linked."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
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


def main(args: Sequence[str] | None = None, run: bool = True) -> LNSGDCLI | Any:
    """Runs the CLI on ``args`` (default: ``sys.argv[1:]``) and returns the :class:`LNSGDCLI`.

    Tests call it as ``main(["fit", "--config", path, "--trainer.fast_dev_run", "2"])``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "report":
        from .report import main as report_main

        return report_main(argv[1:])
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
    )
