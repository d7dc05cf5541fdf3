"""Long jobs: interrupted fits (SIGTERM, SIGINT, SIGKILL) resume bit for bit; unreadable checkpoints; changed settings."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_lnsgd import LabelNoise, SparseTeacherDataModule, TwoLayerLinear
from lightning_lnsgd.cli import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    CheckpointError,
    check_checkpoint,
    main,
)
from lightning_lnsgd.compat import Callback
from tests.conftest import make_trainer

ROOT = Path(__file__).parent.parent
MAX_STEPS, EVERY = 400, 50  # SGD steps of a run; periodic checkpoints every EVERY steps


class SignalAt(Callback):
    """Sends ``signum`` to this process in hook ``hook`` once ``trainer.global_step`` reaches ``step``."""

    def __init__(self, step: int = 0, signum: int = 15, hook: str = "on_train_batch_end") -> None:
        self.step, self.signum, self.hook = step, signum, hook

    def _maybe(self, trainer, hook):
        if hook == self.hook and trainer.global_step >= self.step:
            self.step = sys.maxsize  # once
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, *args):
        self._maybe(trainer, "on_train_batch_start")

    def on_train_batch_end(self, trainer, *args):
        self._maybe(trainer, "on_train_batch_end")

    def on_validation_end(self, trainer, *args):
        self._maybe(trainer, "on_validation_end")

    def on_save_checkpoint(self, trainer, *args):
        self._maybe(trainer, "on_save_checkpoint")


def _config(tmp_path: Path, backend: str = "auto") -> Path:
    """configs/label_noise_sgd.yaml made small (width 20, 400 SGD steps) with periodic checkpoints into tmp_path/ckpt."""
    cfg = yaml.safe_load((ROOT / "configs" / "label_noise_sgd.yaml").read_text())
    fused = backend != "autograd"
    cfg["trainer"].update(max_steps=MAX_STEPS, log_every_n_steps=EVERY, num_sanity_val_steps=0,
                          enable_progress_bar=False, default_root_dir=str(tmp_path / "runs"))
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "StepProgressBar" not in c["class_path"]]
    cfg["trainer"]["callbacks"].append({"class_path": "ModelCheckpoint", "init_args": {
        "dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": EVERY, "save_last": True, "save_top_k": -1}})
    cfg["model"]["init_args"].update(width=20, steps_per_batch=10 if fused else 1, backend=backend)
    cfg["data"]["init_args"].update(steps_per_epoch=5 if fused else 50)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _state(cli) -> dict:
    """Everything a resumed run must reproduce: weights and buffers, LabelNoise's counter, the sampler's state."""
    noise = next(c for c in cli.trainer.callbacks if isinstance(c, LabelNoise))
    return {"model": {k: v.clone() for k, v in cli.model.state_dict().items()}, "noise": noise.state_dict(),
            "data": cli.datamodule.state_dict(), "step": cli.trainer.global_step}


def _assert_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == MAX_STEPS
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["noise"] == b["noise"] and a["data"] == b["data"]


def _fit(config: Path, *extra: str):
    return main(["fit", "--config", str(config), *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs' final states, per backend."""
    states = {}

    def get(backend: str) -> dict:
        if backend not in states:
            tmp = tmp_path_factory.mktemp(f"reference_{backend}")
            states[backend] = _state(_fit(_config(tmp, backend)))
        return states[backend]

    return get


# ------------------------------------------------------------------------------------------ SIGTERM and SIGINT
@pytest.mark.parametrize("backend", ["auto", "autograd"], ids=["fused", "generic"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_exits_nonzero_and_resume_is_bit_identical(tmp_path, reference, backend, signum):
    config = _config(tmp_path, backend)
    stop = 170 if backend == "auto" else 173  # not a multiple of the periodic checkpoints
    with pytest.raises(SystemExit) as exit_info:
        _fit(config, "--trainer.callbacks+=tests.test_resume.SignalAt", "--trainer.callbacks.step", str(stop),
             "--trainer.callbacks.signum", str(int(signum)))
    assert exit_info.value.code == (EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT)
    interrupted = tmp_path / "ckpt" / "interrupted.ckpt"
    saved = torch.load(interrupted, weights_only=False)
    assert saved["global_step"] == stop  # the step the signal arrived in, completed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main restored the handler
    _assert_identical(_state(_fit(config, "--ckpt_path", str(interrupted))), reference(backend))


# ------------------------------------------------------------------------------------------------ SIGKILL
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, reference):
    """Fault injection: a chain of fused runs, each resumed from the last periodic checkpoint and killed (SIGKILL)
    at a random step in a random hook (mid-step, after a step, after validation, while saving a checkpoint)."""
    config = _config(tmp_path)
    rng = random.Random(15)
    hooks = rng.sample(["on_train_batch_start", "on_train_batch_end", "on_validation_end", "on_save_checkpoint"], 4)
    last = tmp_path / "ckpt" / "last.ckpt"
    kills, step = [], 0
    for hook in hooks:  # each hook once, at increasing random steps (a hook fires at the first chance from `step`)
        step = rng.randrange(step + 30, step + 100, 10)
        args = ["--trainer.callbacks+=tests.test_resume.SignalAt", "--trainer.callbacks.step", str(step),
                "--trainer.callbacks.signum", str(int(signal.SIGKILL)), "--trainer.callbacks.hook", hook]
        resume = ["--ckpt_path", str(last)] if last.exists() else []
        code = "import sys; from lightning_lnsgd.cli import main; main(sys.argv[1:])"
        done = subprocess.run([sys.executable, "-c", code, "fit", "--config", str(config), *resume, *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        kills.append(torch.load(last, weights_only=False)["global_step"] if last.exists() else 0)
    print("SIGKILL chain: last.ckpt steps after each kill", kills, "hooks", hooks)
    assert kills == sorted(kills) and 0 < kills[-1] < MAX_STEPS, kills  # the chain moved on, and none finished
    _assert_identical(_state(_fit(config, "--ckpt_path", str(last))), reference("auto"))


# ------------------------------------------------------------------------------------- unreadable checkpoints
def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "hyper_parameters": {"lr": 0.5}}, good)
    files = {"empty": b"", "truncated": good.read_bytes()[: good.stat().st_size // 2], "text": b"not a checkpoint\n"}
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.ckpt"
        paths[name].write_bytes(data)
    paths["foreign"] = tmp_path / "foreign.ckpt"
    torch.save(torch.ones(3), paths["foreign"])
    paths["missing"] = tmp_path / "missing.ckpt"
    return paths


def test_check_checkpoint_names_the_file_and_the_cause(tmp_path):
    assert check_checkpoint(_write_good(tmp_path)) == {"lr": 0.5}
    for name, path in _bad_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError, match=rf"ckpt_path '.*{name}\.ckpt' is not a readable Lightning checkpoint: "):
            check_checkpoint(path)
    assert check_checkpoint("last") is None  # Lightning's own special values are left to it


def _write_good(tmp_path: Path) -> Path:
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "hyper_parameters": {"lr": 0.5}}, path)
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "foreign"])
def test_cli_refuses_an_unreadable_checkpoint_in_one_line(tmp_path, capsys, kind):
    path = _bad_checkpoints(tmp_path)[kind]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/sgd_clean.yaml", "--ckpt_path", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lightning_lnsgd: error: ckpt_path '{path}' is not a readable Lightning checkpoint: ")
    assert "Traceback" not in "\n".join(err)


# ------------------------------------------------------------------------------------------ changed settings
def _two_layer_fit(tmp_path: Path, steps: int, ckpt: str | None = None, **model_args):
    torch.manual_seed(0)
    model = TwoLayerLinear(dim=5, width=8, seed=0, **model_args)
    dm = SparseTeacherDataModule(dim=5, n_train=16, n_test=16, batch_size=1, seed=0, steps_per_epoch=10)
    trainer = make_trainer(max_steps=steps, callbacks=[LabelNoise(kind="rademacher", sigma=1.0, seed=0)],
                           default_root_dir=str(tmp_path), enable_checkpointing=False)
    trainer.fit(model, dm, ckpt_path=ckpt)
    return model, trainer


@pytest.mark.parametrize("backend", ["autograd", "torch"], ids=["generic", "fused"])
def test_resume_with_a_new_lr_warns_and_trains_at_it(tmp_path, backend):
    k = 1 if backend == "autograd" else 5
    _, trainer = _two_layer_fit(tmp_path, 20, lr=2e-3, backend=backend, steps_per_batch=k)
    ckpt = str(tmp_path / "at20.ckpt")
    trainer.save_checkpoint(ckpt)
    with pytest.warns(UserWarning, match=r"resuming with lr=0.0005 .*trained with lr=0.002.*continues at lr=0.0005"):
        model, trainer = _two_layer_fit(tmp_path, 40, ckpt, lr=5e-4, backend=backend, steps_per_batch=k)
    assert model.hparams.lr == 5e-4 and torch.equal(model.lr_per_replica.cpu(), torch.tensor(5e-4))
    if backend == "autograd":
        assert trainer.optimizers[0].param_groups[0]["lr"] == 5e-4


@pytest.mark.parametrize(("name", "value"), [("width", 16), ("seed", 1), ("steps_per_batch", 2)])
def test_resume_with_a_changed_shape_is_an_error_naming_the_field(tmp_path, name, value):
    args = {"width": 8, "seed": 0, "steps_per_batch": 1}
    _, trainer = _two_layer_fit(tmp_path, 10, backend="torch")
    ckpt = str(tmp_path / "at10.ckpt")
    trainer.save_checkpoint(ckpt)
    args[name] = value
    torch.manual_seed(0)
    model = TwoLayerLinear(dim=5, backend="torch", **args)
    dm = SparseTeacherDataModule(dim=5, n_train=16, n_test=16, batch_size=1, seed=0, steps_per_epoch=10)
    trainer = make_trainer(max_steps=20, default_root_dir=str(tmp_path), enable_checkpointing=False)
    with pytest.raises(ValueError, match=rf"resuming with {name}={value}, but the checkpoint was trained with {name}="):
        trainer.fit(model, dm, ckpt_path=ckpt)


def test_cli_resume_uses_the_lr_asked_for_and_config_yaml_records_it(tmp_path, reference):
    config = _config(tmp_path)
    _fit(config, "--trainer.max_steps", "100")
    last = str(tmp_path / "ckpt" / "last.ckpt")
    with pytest.warns(UserWarning, match=r"resuming with lr=0.0005 .*trained with lr=0.001"):
        cli = _fit(config, "--model.init_args.lr", "0.0005", "--ckpt_path", last, "--trainer.max_steps", "200")
    assert cli.model.hparams.lr == 5e-4 and torch.equal(cli.model.lr_per_replica.cpu(), torch.tensor(5e-4))
    saved = yaml.safe_load(Path(cli.trainer.log_dir, "config.yaml").read_text())
    assert saved["model"]["init_args"]["lr"] == 5e-4


def test_cli_resume_with_a_changed_width_is_an_error(tmp_path):
    config = _config(tmp_path)
    _fit(config, "--trainer.max_steps", "50")
    with pytest.raises(ValueError, match=r"resuming with width=30, but the checkpoint was trained with width=20"):
        _fit(config, "--model.init_args.width", "30", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
