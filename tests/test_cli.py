"""The command line: every config parses and runs, overrides, linking, outputs."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_lnsgd import compat
from lightning_lnsgd.cli import main

CONFIGS = sorted(str(p) for p in (Path(__file__).parent.parent / "configs").glob("*.yaml"))
FAST = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1"]


@pytest.fixture(autouse=True)
def _miniature_cifar10(tmp_path_factory, monkeypatch):
    """The CIFAR-10 configs read `$LNSGD_DATA_DIR`: point it at a miniature archive in the official format."""
    from lightning_lnsgd.examples.cifar_files import write_cifar10_archive

    root = tmp_path_factory.getbasetemp() / "mini_cifar10"
    if not (root / "cifar-10-batches-py" / "test_batch").is_file():
        write_cifar10_archive(root, n_per_batch=4, n_test=8, extract=True)
    monkeypatch.setenv("LNSGD_DATA_DIR", str(root))


def _small(config):
    """Overrides that keep a config's smoke run small without changing what it builds."""
    text = Path(config).read_text()
    if "CIFAR10DataModule" in text:
        return ["--model.width", "0.125", "--data.num_workers", "0"]
    return []


def test_configs_exist():
    names = {Path(p).name for p in CONFIGS}
    assert {"label_noise_sgd.yaml", "label_noise_long.yaml", "fig2_pair.yaml", "sgd_clean.yaml", "sam.yaml", "sam_label_noise.yaml", "periodic_noise.yaml",
            "oscillation_only.yaml", "sweep_sigma.yaml", "sweep_lr.yaml", "phase_diagram.yaml", "small_init.yaml",
            "classifier_label_noise.yaml", "digits_label_noise.yaml", "cifar10_resnet18_sgd.yaml",
            "cifar10_resnet18_label_noise.yaml", "cifar10_resnet18_sam.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).name)
def test_every_config_parses_and_runs_a_few_steps(config, tmp_path):
    if "DigitsDataModule" in Path(config).read_text():
        pytest.importorskip("sklearn", reason="the digits example needs the `examples` extra (scikit-learn)")
    # With the progress bar off, as a batch job runs it: a config's StepProgressBar steps aside.
    cli = main(["fit", "--config", config, *FAST, *_small(config), "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step >= 1
    assert cli.trainer.progress_bar_callback is None
    # Every output lands under default_root_dir: event files and the config copy.
    assert glob.glob(f"{tmp_path}/**/events.out.tfevents*", recursive=True)
    assert glob.glob(f"{tmp_path}/**/config.yaml", recursive=True)


def test_overrides_and_dim_comes_from_data(tmp_path):
    cfg = "configs/label_noise_sgd.yaml"
    cli = main(["--config", cfg, *FAST, "--model.width", "50", "--data.dim", "7", "--data.seed", "3",
                "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model.W.shape == (50, 7)
    assert cli.datamodule.seed == 3
    assert cli.config["model"]["init_args"]["dim"] == 7


def test_conflicting_dim_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"model.init_args.dim.*=5 disagrees with `data.init_args.dim`=20"):
        main(["--config", "configs/sgd_clean.yaml", "--model.dim", "5", *FAST], run=False)


def test_validate_and_test_subcommands(tmp_path):
    for sub in ("validate", "test"):
        cli = main([sub, "--config", "configs/sgd_clean.yaml", "--trainer.default_root_dir", str(tmp_path)])
        key = "val/loss" if sub == "validate" else "test/loss"
        assert key in cli.trainer.callback_metrics


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/label_noise_sgd.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["lr"] == 0.001
    assert printed["data"]["init_args"]["n_train"] == 200


@pytest.mark.parametrize(("args", "last_line"), [
    (["--model.init_args.width", "abc"],
     "model.init_args.width (lightning_lnsgd.TwoLayerLinear): Expected a <class 'int'>. Got value: abc"),
    (["--model.init_args.nosuch", "3"], "model.init_args.nosuch (lightning_lnsgd.TwoLayerLinear): Option 'nosuch' is not accepted"),
    (["--trainer.callbacks.init_args.refresh_rate", "0"],
     "trainer.callbacks.init_args.refresh_rate (lightning_lnsgd.LabelNoise): Option 'refresh_rate' is not accepted"),
    (["--trainer.max_steps", "x"], "trainer.max_steps: Expected a <class 'int'>. Got value: x"),
    (["--model.init_args.lr", "-1"], "TwoLayerLinear: `lr` must be finite and > 0 (or a list of such), got -1.0."),
])
def test_a_config_error_ends_in_one_line_naming_field_value_and_reason(capsys, args, last_line):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/label_noise_sgd.yaml", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"lightning_lnsgd: error: {last_line}"
    assert not any("NoneType" in line or line.lstrip().startswith("[--") for line in err)  # no union alternatives, no usage page


def test_progress_bar_off_builds_every_config_under_the_other_lightning_package(tmp_path):
    """The other package than the one this process serves, in a fresh interpreter: every config builds its Trainer
    with the bar off, and two fit a few steps, SAM and the phase-diagram grid (the served package runs them all
    above)."""
    if len(compat.INSTALLED) < 2:
        pytest.skip("needs both pytorch_lightning and lightning installed")
    other = "lightning" if compat.INSTALLED[1] == "lightning.pytorch" else compat.INSTALLED[1]
    code = f"""
import sys
from lightning_lnsgd import compat
from lightning_lnsgd.cli import main
assert compat.PACKAGE == {compat.INSTALLED[1]!r}, compat.PACKAGE
fast = {FAST!r} + ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", {str(tmp_path)!r}]
for config in sys.argv[1:]:
    small = ["--model.width", "0.125", "--data.num_workers", "0"] if "cifar10" in config else []
    cli = main(["--config", config, *fast, *small], run=False)
    assert cli.trainer.progress_bar_callback is None, config
    assert type(cli.trainer).__module__.startswith(compat.PACKAGE), type(cli.trainer)
cli = main(["fit", "--config", "configs/sam.yaml", *fast])
assert cli.trainer.global_step == 3 and cli.trainer.progress_bar_callback is None
# the grid: LabelNoise takes its sigma column from the model's grid, and the replicas' table is written
from lightning_lnsgd import read_replica_table
cli = main(["fit", "--config", "configs/phase_diagram.yaml", *fast, "--model.width", "4"])
rows = read_replica_table(cli.trainer.log_dir)
assert len(rows) == 1024 and rows[9]["sigma"] == 1.0 and rows[1023]["sigma"] == 8.0, rows[9]
print("ok", len(sys.argv) - 1)
"""
    configs = CONFIGS  # run=False builds the digits datamodule without loading scikit-learn's data
    env = {**os.environ, compat.ENV_VAR: other}
    out = subprocess.run([sys.executable, "-c", code, *configs], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent.parent, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"ok {len(configs)}"
