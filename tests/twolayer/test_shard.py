"""The fused path under DDP: replicas sharded over the ranks run, log and resume exactly as in one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_lnsgd import SparseTeacherDataModule, TwoLayerLinear, compat
from lightning_lnsgd.cli import main
from lightning_lnsgd.twolayer.kernels import available_backends, share_cpu_threads
from lightning_lnsgd.twolayer.shard import ReplicaShard
from tests.conftest import make_trainer, read_replicas, read_scalars

ROOT = Path(__file__).resolve().parents[2]
K, STEPS, EVERY = 5, 2000, 100
SIGMA = [1.0, 2.0, 4.0, 8.0, 3.0]
LR = [0.02, 0.01, 0.02, 0.005, 0.01]  # replicas escape at steps 100, 700, 1000 and 1600; replica 0 does not


def test_blocks_are_contiguous_and_the_first_ones_larger():
    assert [ReplicaShard(5, 2, r).block for r in (0, 1)] == [slice(0, 3), slice(3, 5)]
    assert ReplicaShard(16, 3, 2).index == tuple(range(11, 16)) and ReplicaShard(16, 3, 0).sizes == [6, 5, 5]


def test_fewer_replicas_than_ranks_is_refused_naming_both():
    for replicas in (2, None):
        model = TwoLayerLinear(dim=3, width=4, replicas=replicas, steps_per_batch=5)
        model.trainer = make_trainer(devices=3, strategy="ddp")
        with pytest.raises(ValueError, match=rf"replicas={replicas} with world_size=3: use replicas >= 3"):
            model.setup("fit")


def test_a_rank_block_draws_its_replicas_own_samples():
    """The layout of rank 1's block names its replicas; the datamodule draws their streams with rank 0, so rows
    3 and 4 of a one-process batch are rank 1's batch."""
    model = TwoLayerLinear(dim=4, width=6, replicas=K, replica_seeds=[7, 1, 2, 7, 5], steps_per_batch=3)
    model.shard = ReplicaShard(K, 2, 1)
    layout = model.step_layout()
    assert layout.replica_seeds == (7, 5) and layout.replica_index == (3, 4) and layout.total_replicas == K
    assert layout.stream_rank(1) == 0
    x, y = SparseTeacherDataModule(dim=4, seed=3).sample(n=3, replica_seeds=[7, 1, 2, 7, 5])
    on_rank_1 = SparseTeacherDataModule(dim=4, seed=3)
    on_rank_1._rank = 1  # what setup() on rank 1 sets
    bx, by = on_rank_1.sample(n=3, replica_seeds=[7, 5], rank=layout.stream_rank(1))
    assert torch.equal(bx, x[3:]) and torch.equal(by, y[3:])
    on_rank_1 = SparseTeacherDataModule(dim=4, seed=3)
    on_rank_1._rank = 1
    assert not torch.equal(on_rank_1.sample(n=3, replica_seeds=[7, 5])[0], x[3:])  # unsharded: the rank's own streams


@pytest.mark.skipif("numba" not in available_backends(), reason="numba not installed")
def test_numba_threads_are_shared_between_local_ranks(monkeypatch):
    import numba

    before = numba.get_num_threads()
    try:
        monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
        assert share_cpu_threads(2) == max(1, numba.config.NUMBA_NUM_THREADS // 2)
        numba.set_num_threads(before)
        monkeypatch.setenv("NUMBA_NUM_THREADS", str(numba.config.NUMBA_NUM_THREADS))  # the user's choice is kept
        assert share_cpu_threads(2) == before
    finally:
        numba.set_num_threads(before)


# ------------------------------------------------------------------------------------------ two gloo CPU ranks
def _config(tmp_path: Path, name: str) -> Path:
    """configs/sweep_sigma.yaml made small: K = 5 replicas (uneven on 2 ranks), width 50, dim 5, 2000 SGD steps of
    100 per Lightning step, logged every 100, checkpoints at steps 1000 and 2000 into tmp_path/name/ckpt."""
    cfg = yaml.safe_load((ROOT / "configs" / "sweep_sigma.yaml").read_text())
    run = tmp_path / name
    cfg["trainer"].update(max_steps=STEPS, log_every_n_steps=EVERY, num_sanity_val_steps=0, enable_progress_bar=False,
                          default_root_dir=str(run / "runs"))
    callbacks = [c for c in cfg["trainer"]["callbacks"] if "StepProgressBar" not in c["class_path"]]
    for c in callbacks:
        if c["class_path"].endswith("LabelNoise"):
            c["init_args"]["sigma"] = SIGMA
    callbacks.append({"class_path": "ModelCheckpoint", "init_args": {
        "dirpath": str(run / "ckpt"), "filename": "{step}", "every_n_train_steps": STEPS // 2, "save_top_k": -1}})
    cfg["trainer"]["callbacks"] = callbacks
    cfg["model"]["init_args"].update(width=50, replicas=K, replica_seeds=[0, 1, 2, 0, 1], lr=LR, steps_per_batch=100)
    cfg["data"]["init_args"].update(dim=5, steps_per_epoch=5)
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run / "config.yaml"


def _fit_two_ranks(config: Path, *extra: str, package: str = compat.PACKAGE) -> str:
    """``python -m lightning_lnsgd fit --config … --trainer.strategy ddp --trainer.devices 2`` (Lightning starts rank 1);
    returns the output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env[compat.ENV_VAR] = "lightning" if package == "lightning.pytorch" else package
    done = subprocess.run(
        [sys.executable, "-m", "lightning_lnsgd", "fit", "--config", str(config), "--trainer.strategy", "ddp",
         "--trainer.devices", "2", *extra],
        cwd=config.parent, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _final(config: Path) -> dict:
    return torch.load(config.parent / "ckpt" / f"step={STEPS}.ckpt", weights_only=False)["state_dict"]


def _assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.ddp
def test_two_ranks_equal_one_process_tag_by_tag_and_resume_exactly(tmp_path):
    one = _config(tmp_path, "one")
    main(["fit", "--config", str(one)])
    ref, ref_replicas = read_scalars(one.parent / "runs"), read_replicas(one.parent / "runs")

    two = _config(tmp_path, "two")
    output = _fit_two_ranks(two)
    # Every tag (the means, validation and label noise of the sweep's run, and each replica's own run with its
    # escape step) at every step, bit for bit.
    assert read_scalars(two.parent / "runs") == ref
    assert read_replicas(two.parent / "runs") == ref_replicas
    assert sorted(ref_replicas) == list(range(K)) and "dynamics/lazy_distance" in ref_replicas[4]
    assert all("phase/escape_step" in ref_replicas[k] for k in (1, 2, 3, 4))
    # The checkpoint of the 2-rank run holds all K replicas, equal to one process's.
    state = _final(two)
    assert state["W"].shape[0] == state["a"].shape[0] == K
    _assert_same_state(state, _final(one))
    for noise in ("all_gather is deprecated", "sync_dist=True"):  # no warning about our internals or a needless sync
        assert noise not in output

    # Resume from the 2-rank run's step-1000 checkpoint: on two ranks (with the other installed Lightning package,
    # when there is one) and on one process; both end where the uninterrupted run ends and log what it logs.
    mid = str(two.parent / "ckpt" / f"step={STEPS // 2}.ckpt")
    again = _config(tmp_path, "resume_two_ranks")
    _fit_two_ranks(again, "--ckpt_path", mid, package=compat.INSTALLED[-1])
    single = _config(tmp_path, "resume_one_process")
    main(["fit", "--config", str(single), "--ckpt_path", mid])
    for config in (again, single):
        _assert_same_state(_final(config), _final(one))
        resumed, resumed_replicas = read_scalars(config.parent / "runs"), read_replicas(config.parent / "runs")
        runs = [(resumed, ref)] + [(resumed_replicas[k], ref_replicas[k]) for k in sorted(resumed_replicas)]
        for got, want in runs:
            for tag, points in got.items():
                if tag == "hp_metric":  # the placeholder that Lightning writes at step 0 of every new log
                    continue
                # A resumed run writes every replica's escape step (those from the checkpoint too), the rest after it.
                after = want[tag] if tag.startswith("phase/") else [p for p in want[tag] if p[0] > STEPS // 2]
                assert points == after, (config, tag)
        assert "phase/escape_step" in resumed_replicas[1]  # replica 1 escapes at step 1600, after the resume
