"""lightning_lnsgd.compat: which Lightning package is served, and the internals that remain (fail loudly if a
Lightning release changes them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_lnsgd import compat
from tests.conftest import LIGHTNING_PACKAGES, make_trainer

REPO = Path(__file__).resolve().parents[1]
BOTH = pytest.mark.skipif(len(LIGHTNING_PACKAGES) < 2, reason="needs both pytorch_lightning and lightning installed")


def _served(code: str, **env: str) -> str:
    """The package ``lightning_lnsgd`` serves in a fresh interpreter that first runs ``code``."""
    run_env = {k: v for k, v in os.environ.items() if k != compat.ENV_VAR}
    run_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport lightning_lnsgd.compat as c; print(c.PACKAGE)"],
        capture_output=True, text=True, env=run_env, cwd=REPO, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@BOTH
def test_the_served_package_follows_the_program():
    assert _served("") == "pytorch_lightning"  # neither imported yet: the declared dependency
    assert _served("import lightning") == "lightning.pytorch"
    assert _served("import lightning.pytorch as pl") == "lightning.pytorch"
    assert _served("import pytorch_lightning") == "pytorch_lightning"
    assert _served("", LIGHTNING_LNSGD_PACKAGE="lightning") == "lightning.pytorch"
    assert _served("import lightning", LIGHTNING_LNSGD_PACKAGE="pytorch_lightning") == "pytorch_lightning"


def test_an_unknown_package_name_is_refused_with_the_allowed_values():
    out = subprocess.run(
        [sys.executable, "-c", "import lightning_lnsgd"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, compat.ENV_VAR: "lightening"},
    )
    assert out.returncode != 0
    assert "LIGHTNING_LNSGD_PACKAGE='lightening'" in out.stderr and "'pytorch_lightning' or 'lightning'" in out.stderr


@BOTH
def test_one_callback_class_suits_both_packages():
    import lightning.pytorch as L
    import pytorch_lightning as pl

    from lightning_lnsgd import (
        DynamicsMonitor,
        HParamsSummary,
        LabelNoise,
        Laziness,
        PruningCurve,
    )

    for cls in (DynamicsMonitor, HParamsSummary, LabelNoise, Laziness, PruningCurve):
        assert issubclass(cls, pl.Callback) and issubclass(cls, L.Callback), cls


@BOTH
@pytest.mark.parametrize("flavour_of", LIGHTNING_PACKAGES)
def test_a_strategy_of_the_other_package_reaches_its_own_accelerator_check(flavour_of):
    """admit_strategy_to_other_packages: the other package's Trainer takes a registered strategy as far as handing
    it its accelerator (a Lightning internal), where the strategy's own check runs; package_of names the packages."""
    from lightning_lnsgd.strategies import sam_strategy_class

    other = next(name for name in LIGHTNING_PACKAGES if name != flavour_of)
    strategy = sam_strategy_class(flavour_of)()
    assert compat.package_of(strategy) is None  # defined in lightning_lnsgd, a subclass of flavour_of's Strategy
    assert compat.package_of(compat.package(other).accelerators.CPUAccelerator()) == other
    with pytest.raises(ValueError, match=rf"^\w*SAMStrategy is a {flavour_of} strategy but the Trainer is {other}'s"):
        make_trainer(compat.package(other), strategy=strategy)
    assert type(make_trainer(compat.package(flavour_of), strategy=strategy).strategy) is type(strategy)


def test_trainer_of_a_detached_module_is_none(lightning):
    model = lightning.demos.boring_classes.BoringModel()
    assert compat.trainer_of(model) is None
    trainer = make_trainer(package=lightning, max_steps=1)
    trainer.fit(model)
    assert compat.trainer_of(model) is trainer


class _MultiStep:
    """A manually optimised module that runs ``k`` SGD steps per Lightning step and counts them."""

    def __new__(cls, lightning, k: int):
        class Module(lightning.demos.boring_classes.BoringModel):
            def __init__(self) -> None:
                super().__init__()
                self.automatic_optimization = False
                self.seen: list[int] = []

            def training_step(self, batch, batch_idx):
                self.seen.append(self.trainer.global_step)
                compat.add_optimizer_steps(self.trainer, k)

            def configure_optimizers(self):
                return None

        return Module()


@pytest.mark.parametrize("k", [1, 7])
def test_add_optimizer_steps_advances_global_step_and_stops_at_max_steps(lightning, k, tmp_path):
    # The only Lightning internal left: the manual loop's optimizer-step progress. If a release renames or
    # restructures it, this test fails (AttributeError) or the counts below disagree.
    model = _MultiStep(lightning, k)
    trainer = make_trainer(package=lightning, max_steps=5 * k, limit_val_batches=0, default_root_dir=tmp_path,
                           enable_checkpointing=True)
    trainer.fit(model)
    assert model.seen == [i * k for i in range(5)]
    assert trainer.global_step == 5 * k
    # ... and the count is what a checkpoint saves and a resumed fit continues from.
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["global_step"] == 5 * k
    resumed = _MultiStep(lightning, k)
    trainer = make_trainer(package=lightning, max_steps=7 * k, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(resumed, ckpt_path=ckpt)
    assert resumed.seen == [5 * k, 6 * k] and trainer.global_step == 7 * k


def test_add_optimizer_steps_refuses_a_negative_count():
    with pytest.raises(ValueError, match="n=-1"):
        compat.add_optimizer_steps(object(), -1)


def test_no_module_outside_compat_imports_lightning_directly():
    # One module knows which Lightning package it serves: the rest import Lightning through it.
    offenders = []
    for path in (REPO / "lightning_lnsgd").rglob("*.py"):
        if path.name == "compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if len(words) > 1 and words[0] in ("import", "from"):
                name = words[1]
                if name == "lightning" or name.startswith(("lightning.", "pytorch_lightning", "lightning_fabric")):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_redirect_log_catches_log_and_log_dict_and_restores_the_method(lightning):
    # SAM's perturbed pass and PruningCurve rely on every logging call of a module going through `module.log`.
    model = lightning.demos.boring_classes.BoringModel()
    seen = []
    with compat.redirect_log(model, lambda name, value, *args, **kwargs: seen.append((name, float(value)))):
        model.log("a", 1.0)
        model.log_dict({"b": 2.0, "c": 3.0})
    assert seen == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert "log" not in model.__dict__ and model.log.__func__ is lightning.LightningModule.log


def test_plain_summary_writer_writes_what_log_metrics_writes(lightning, tmp_path):
    """The one-event-per-step write reads back exactly as Lightning's ``log_metrics``; a prefixed logger is left to
    ``log_metrics`` (the internal ``_prefix`` must still exist, or every logger would take the slow path)."""
    from lightning_lnsgd.callbacks._common import log_metrics
    from tests.conftest import read_scalars

    values = {"dynamics/a": 0.125, "train/loss": 3.5e-7, "x": -2.0}
    plain = lightning.loggers.TensorBoardLogger(tmp_path / "plain", name="", version="")
    reference = lightning.loggers.TensorBoardLogger(tmp_path / "reference", name="", version="")
    prefixed = lightning.loggers.TensorBoardLogger(tmp_path / "prefixed", name="", version="", prefix="p")
    assert compat.plain_summary_writer(plain) is plain.experiment
    assert compat.plain_summary_writer(prefixed) is None and compat.plain_summary_writer(object()) is None
    for step in (0, 7):
        log_metrics(plain, values, step)
        reference.log_metrics(values, step=step)
        log_metrics(prefixed, values, step)
    for lg in (plain, reference, prefixed):
        lg.finalize("success")
    assert read_scalars(tmp_path / "plain") == read_scalars(tmp_path / "reference")
    assert set(read_scalars(tmp_path / "prefixed")) == {f"p-{tag}" for tag in values}
