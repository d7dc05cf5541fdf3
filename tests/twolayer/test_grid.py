"""A grid of replicas (``TwoLayerLinear(grid=...)``): its expansion, the plug-ins' per-replica values, the results
table, and exactness against the same replica run alone (one process, and sharded over two gloo ranks)."""

import csv
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_lnsgd import LabelNoise, SparseTeacherDataModule, TwoLayerLinear
from lightning_lnsgd.cli import main
from lightning_lnsgd.compat import TensorBoardLogger
from lightning_lnsgd.protocol import replica_column
from lightning_lnsgd.strategies.sam import SAMStrategy
from lightning_lnsgd.twolayer.grid import expand_grid
from lightning_lnsgd.twolayer.replica_runs import run_names
from lightning_lnsgd.twolayer.replica_table import read_replica_table
from tests.conftest import make_trainer

ROOT = Path(__file__).resolve().parents[2]
GRID = {"sigma": [0.5, 3.0], "lr": [0.01, 0.03], "seed": [0, 1, 2]}


def fit(strategy="auto", noise=None, logger=False, steps=300, **model_kw):
    model = TwoLayerLinear(dim=6, width=12, steps_per_batch=25, **model_kw)
    dm = SparseTeacherDataModule(dim=6, n_train=20, seed=3)
    trainer = make_trainer(max_steps=steps, logger=logger, log_every_n_steps=50, strategy=strategy,
                           callbacks=[noise or LabelNoise(sigma="grid", seed=1)], limit_val_batches=0)
    trainer.fit(model, dm)
    return model, trainer


def test_grid_expands_to_the_product_last_axis_fastest():
    columns = expand_grid(GRID)
    cells = [(s, lr, seed) for s in GRID["sigma"] for lr in GRID["lr"] for seed in GRID["seed"]]  # nested loops
    assert list(zip(columns["sigma"], columns["lr"], columns["seed"])) == cells
    model = TwoLayerLinear(dim=6, width=12, seed=10, grid=GRID)
    assert model.replicas == 12 and model.hparams.replicas is None and model.hparams.grid == GRID
    assert model.replica_seeds == [10 + seed for *_, seed in cells]  # seed axis: offsets to `seed`
    assert model.lr_per_replica.tolist() == torch.tensor([lr for _, lr, _ in cells]).tolist()
    assert model.grid_column("sigma") == [s for s, _, _ in cells] and model.grid_column("rho") is None
    # A replica's initialisation is that of its seed and α alone.
    alone = TwoLayerLinear(dim=6, width=12, replicas=1, replica_seeds=[12], init_scale=[0.5])
    scaled = TwoLayerLinear(dim=6, width=12, seed=10, grid={"init_scale": [1.0, 0.5], "seed": [0, 1, 2]})
    assert torch.equal(scaled.W[5], alone.W[0]) and torch.equal(scaled.a[5], alone.a[0])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"grid": {"width": [1, 2]}}, "`grid` axis 'width' is not allowed; allowed: seed, lr, init_scale, sigma, rho"),
    ({"grid": {"lr": []}}, r"`grid.lr` must be a non-empty list"),
    ({"grid": {"lr": [0.1, -1.0]}}, r"`grid.lr` must hold finite floats > 0"),
    ({"grid": {"seed": [0, 1.5]}}, r"`grid.seed` must hold ints >= 0"),
    ({"grid": {"sigma": [1, 2]}, "replicas": 3}, "`replicas`=3 but the grid's axes make 2 replicas"),
    ({"grid": {"sigma": [1, 2]}, "replica_seeds": [0, 1]}, "give the seeds as the grid's `seed` axis"),
    ({"grid": {"lr": [0.1, 0.2]}, "lr": [0.1, 0.2], "replicas": 2}, "`lr` is a list and `grid` has a `lr` axis"),
])
def test_bad_grids_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TwoLayerLinear(dim=3, **kwargs)


def test_plugins_take_their_column_from_the_grid():
    grid = {"rho": [0.01, 0.05], "sigma": [0.5, 3.0], "seed": [0, 1]}
    sam = SAMStrategy(rho="grid")
    noise = LabelNoise(sigma="grid", seed=1)
    with pytest.raises(RuntimeError, match="sigma='grid' takes its values from the module's grid"):
        noise.level  # not known before the fit
    model, _ = fit(strategy=sam, noise=noise, grid=grid, steps=50)
    columns = expand_grid(grid)
    assert noise.sigma == columns["sigma"] and sam.rho == columns["rho"]
    assert noise.level == pytest.approx(sum(columns["sigma"]) / len(columns["sigma"]))
    settings = model.replica_settings()
    for name in ("rho", "sigma"):
        assert [row[name] for row in settings] == columns[name]
    assert [row["seed"] for row in settings] == columns["seed"]
    assert run_names(settings)[:3] == ["r0-sigma0.5-rho0.01-seed0", "r1-sigma0.5-rho0.01-seed1",
                                       "r2-sigma3-rho0.01-seed0"]


def test_a_grid_axis_and_grid_setting_must_meet():
    with pytest.raises(ValueError, match="LabelNoise: sigma='grid' .* has no grid axis 'sigma'"):
        fit(grid={"lr": [0.01, 0.02]})
    with pytest.raises(ValueError, match="`grid` has a `sigma` axis, but no plug-in of this fit takes it"):
        fit(grid={"sigma": [1.0, 2.0]}, noise=LabelNoise(sigma=1.0))
    with pytest.raises(ValueError, match="SAMStrategy: rho='grid' .* has no grid axis 'rho'"):
        fit(grid={"sigma": [1.0, 2.0]}, strategy=SAMStrategy(rho="grid"))
    with pytest.raises(ValueError, match="no grid axis 'sigma'"):
        replica_column(torch.nn.Linear(1, 1), "sigma", "LabelNoise")


def test_a_grid_cell_is_bit_identical_to_the_same_replica_run_alone():
    grid, _ = fit(grid=GRID, seed=4)
    columns = expand_grid(GRID)
    assert (grid.escape_step >= 0).any() and (grid.escape_step < 0).any()  # both kinds of replica are compared
    for r in (0, 5, 7, 11):
        alone, _ = fit(replicas=1, replica_seeds=[4 + columns["seed"][r]], lr=[columns["lr"][r]],
                       noise=LabelNoise(sigma=[columns["sigma"][r]], seed=1))
        assert torch.equal(grid.W[r], alone.W[0]) and torch.equal(grid.a[r], alone.a[0]), r
        assert grid.escape_step[r] == alone.escape_step[0]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("log_replicas", [2, 16])
def test_the_table_holds_each_replica_settings_escape_and_final_values(tmp_path, log_replicas):
    logger = TensorBoardLogger(tmp_path, name="", version="")
    model, trainer = fit(grid=GRID, seed=4, logger=logger, log_replicas=log_replicas)
    rows = _csv(tmp_path / "replicas.csv")
    settings, values = model.replica_settings(), model.dynamics()
    assert [int(row["replica"]) for row in rows] == list(range(12))
    for k, row in enumerate(rows):
        assert {name: float(row[name]) for name in settings[k]} == {n: float(v) for n, v in settings[k].items()}
        assert int(row["escape_step"]) == int(model.escape_step[k]) and int(row["step"]) == trainer.global_step == 300
        for tag, v in values.items():
            assert float(row[tag]) == float(v[k].double()), (k, tag)  # exact: written with repr
    assert read_replica_table(tmp_path)[3]["sigma"] == 0.5
    # Per-replica TensorBoard runs only up to log_replicas; past it the table alone.
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == ([] if log_replicas == 2 else run_names(settings))


# ------------------------------------------------------------------------------------------ two gloo CPU ranks
def _config(tmp_path: Path, name: str) -> Path:
    """configs/phase_diagram.yaml made small: 5 σ × 1 η × 1 seed (uneven on 2 ranks), width 50, dim 5, 1000 steps."""
    cfg = yaml.safe_load((ROOT / "configs" / "phase_diagram.yaml").read_text())
    run = tmp_path / name
    cfg["trainer"].update(max_steps=1000, log_every_n_steps=100, num_sanity_val_steps=0, enable_progress_bar=False,
                          enable_checkpointing=False, default_root_dir=str(run / "runs"))
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "StepProgressBar" not in c["class_path"]]
    cfg["model"]["init_args"].update(width=50, steps_per_batch=100,
                                     grid={"sigma": [1.0, 2.0, 4.0, 6.0, 8.0], "lr": [0.01], "seed": [3]})
    cfg["data"]["init_args"].update(dim=5, steps_per_epoch=5)
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run / "config.yaml"


@pytest.mark.ddp
def test_a_grid_sharded_over_two_ranks_equals_one_process(tmp_path):
    one = _config(tmp_path, "one")
    main(["fit", "--config", str(one)])
    two = _config(tmp_path, "two")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "lightning_lnsgd", "fit", "--config", str(two), "--trainer.strategy", "ddp",
         "--trainer.devices", "2"],
        cwd=two.parent, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = [_csv(next((config.parent / "runs").rglob("replicas.csv"))) for config in (one, two)]
    assert table[0] == table[1] and len(table[0]) == 5  # settings, escape steps and final values, to the last digit
    assert sum(int(row["escape_step"]) >= 0 for row in table[0]) >= 2
