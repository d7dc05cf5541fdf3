"""The import-order trap: ``lightning_lnsgd.SAMStrategy`` is the flavour of the Lightning package served when
``lightning_lnsgd`` was imported; handed to the other package's Trainer it stops in one line that says what happened
and the fixes. Each order runs in a fresh interpreter, since the served package is chosen once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_lnsgd import compat

pytestmark = pytest.mark.skipif(len(compat.INSTALLED) < 2, reason="needs both pytorch_lightning and lightning")

REPO = Path(__file__).resolve().parents[2]

#: Builds each package's Trainer with the exported SAM strategies (and with strategy="sam") and prints, as JSON,
#: what each attempt gave: the strategy class's name, or the error's type and message.
TRY = """
import json
from lightning_lnsgd import SAMDDPStrategy, SAMStrategy, compat
import lightning as L, pytorch_lightning as pl
from lightning.pytorch.demos.boring_classes import BoringModel as LBoring
from pytorch_lightning.demos.boring_classes import BoringModel as PLBoring

def attempt(pkg, strategy, boring=None):
    try:
        trainer = pkg.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=2, logger=False,
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        if boring is not None:
            trainer.fit(boring())
        return [type(trainer.strategy).__name__, trainer.global_step]
    except Exception as error:
        return [type(error).__name__, str(error)]

out = {"served": compat.PACKAGE}
for name, pkg, boring in (("lightning", L, LBoring), ("pytorch_lightning", pl, PLBoring)):
    out[name] = attempt(pkg, SAMStrategy(rho=0.05), boring)
    out[name + " ddp"] = attempt(pkg, SAMDDPStrategy(rho=0.05))  # built, not fitted
    out[name + " by name"] = attempt(pkg, "sam", boring)
print(json.dumps(out))
"""


def _run(first: str) -> dict:
    run_env = {k: v for k, v in os.environ.items() if k != compat.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", first + "\n" + TRY], capture_output=True, text=True, env=run_env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _refused(result: list, own: str, other: str, name: str, fix_env: str, why: str) -> None:
    kind, message = result
    assert kind == "ValueError" and "\n" not in message
    assert message.startswith(f"{'SAMDDPStrategy' if name == 'sam_ddp' else 'SAMStrategy'} is a {own} strategy but"
                              f" the Trainer is {other}'s ({why})")
    assert f'strategy="{name}"' in message and f"{compat.ENV_VAR}={fix_env}" in message
    assert f"import {fix_env} before lightning_lnsgd" in message
    assert "invalid strategy" not in message


def test_lightning_lnsgd_imported_before_lightning():
    out = _run("import lightning_lnsgd")
    assert out["served"] == "pytorch_lightning"
    why = "lightning_lnsgd was imported before lightning, so it serves pytorch_lightning"
    _refused(out["lightning"], "pytorch_lightning", "lightning.pytorch", "sam", "lightning", why)
    _refused(out["lightning ddp"], "pytorch_lightning", "lightning.pytorch", "sam_ddp", "lightning", why)
    assert out["pytorch_lightning"] == ["SAMStrategy", 2]
    assert out["pytorch_lightning ddp"] == ["SAMDDPStrategy", 0]
    assert out["lightning by name"] == ["LightningSAMStrategy", 2]  # the registered name works in either Trainer
    assert out["pytorch_lightning by name"] == ["SAMStrategy", 2]


def test_lightning_imported_first():
    out = _run("import lightning")
    assert out["served"] == "lightning.pytorch"
    assert out["lightning"] == ["SAMStrategy", 2]
    why = "lightning_lnsgd was imported before pytorch_lightning, so it serves lightning.pytorch"
    _refused(out["pytorch_lightning"], "lightning.pytorch", "pytorch_lightning", "sam", "pytorch_lightning", why)
    _refused(out["pytorch_lightning ddp"], "lightning.pytorch", "pytorch_lightning", "sam_ddp", "pytorch_lightning", why)
    assert out["lightning by name"] == ["SAMStrategy", 2] and out["pytorch_lightning by name"][1] == 2


def test_the_message_names_the_environment_variable_when_it_chose(monkeypatch):
    """(test_compat checks that the variable wins over the import order.)"""
    from lightning_lnsgd.strategies.sam import SAMStrategy, _foreign_trainer_message

    other = next(name for name in compat.INSTALLED if name != compat.PACKAGE)
    monkeypatch.setenv(compat.ENV_VAR, compat.PACKAGE.split(".")[0])
    message = _foreign_trainer_message(SAMStrategy, compat.PACKAGE, other)
    _refused(["ValueError", message], compat.PACKAGE, other, "sam", other.split(".")[0],
             f"{compat.ENV_VAR}={compat.PACKAGE.split('.')[0]} makes lightning_lnsgd serve {compat.PACKAGE}")
