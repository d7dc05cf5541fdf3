"""A stacked sweep in TensorBoard: one run per replica (same tags as a single run), the means in the sweep's own run,
one HPARAMS row per replica, read back with TensorBoard's own readers."""

import csv
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from lightning_lnsgd import (
    HParamsSummary,
    LabelNoise,
    SparseTeacherDataModule,
    TwoLayerLinear,
)
from lightning_lnsgd.compat import Callback, TensorBoardLogger, pl
from lightning_lnsgd.twolayer.replica_runs import run_names
from tests.conftest import hparams_session_groups, make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIGMA, SEEDS = [0.5, 3.0, 3.0], [7, 7, 8]
NAMES = ["r0-sigma0.5-seed7", "r1-sigma3-seed7", "r2-sigma3-seed8"]


def build(root, replicas=3, sigma=SIGMA, seeds=SEEDS, lr=0.05, loggers=None, callbacks=(), steps=300, **model_kw):
    """A tiny stacked model on the torch backend, its datamodule and a Trainer logging every 50 SGD steps."""
    model = TwoLayerLinear(dim=6, width=12, lr=lr, replicas=replicas, replica_seeds=seeds, steps_per_batch=25,
                           backend="torch", **model_kw)
    dm = SparseTeacherDataModule(dim=6, n_train=20, seed=3)
    loggers = loggers if loggers is not None else [TensorBoardLogger(root, name="", version="")]
    trainer = make_trainer(max_steps=steps, logger=loggers, log_every_n_steps=50, limit_val_batches=0,
                           callbacks=[LabelNoise(sigma=sigma, seed=1), *callbacks])
    return model, dm, trainer


def fit(root, **kw):
    model, dm, trainer = build(root, **kw)
    trainer.fit(model, dm)
    return model, trainer


def events(directory):
    """TensorBoard's own reader over one run folder: ``{tag: {step: value}}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 3-replica sweep with a TensorBoard and a CSV logger and HParamsSummary, and a single run for its tags."""
    root = tmp_path_factory.mktemp("sweep")
    loggers = [TensorBoardLogger(root, name="", version=""), pl.loggers.CSVLogger(root / "csv", name="", version="")]
    model, trainer = fit(root, loggers=loggers, callbacks=[HParamsSummary()])
    single = tmp_path_factory.mktemp("single")
    fit(single, replicas=None, sigma=3.0, seeds=None, seed=8, loggers=[TensorBoardLogger(single, name="", version="")])
    return root, model, trainer, events(single)


def test_each_replica_is_a_run_named_by_its_settings_with_the_tags_of_a_single_run(sweep):
    root, model, _, single = sweep
    assert run_names(model.replica_settings()) == NAMES
    assert sorted(p.parent.name for p in root.glob("*/events.out.tfevents.*")) == NAMES
    final = {tag: v.double() for tag, v in model.dynamics().items()}  # (K,) per tag at the last step, 300
    own = events(root)
    runs = [events(root / name) for name in NAMES]
    curves = {t for t in single if t.startswith(("dynamics/", "train/", "test/"))}
    for k, run in enumerate(runs):
        assert {t for t in run if not t.startswith("replica/")} - {"phase/escape_step"} == curves, k
        assert {t: run[f"replica/{t}"] for t in ("sigma", "seed", "lr")} == {
            "sigma": {0: SIGMA[k]}, "seed": {0: SEEDS[k]}, "lr": {0: pytest.approx(0.05)}}
        for tag in curves:
            assert set(run[tag]) == set(own[tag]) == set(range(0, 301, 50)), tag
            assert run[tag][300] == pytest.approx(float(final[tag][k]), rel=1e-6, abs=1e-7), (k, tag)
        escape = int(model.escape_step[k])
        assert run.get("phase/escape_step", {}) == ({escape: escape} if escape >= 0 else {})
    assert any(int(e) >= 0 for e in model.escape_step)
    # The sweep's own run: the mean over replicas under the plain tags, nothing per replica.
    assert not [t for t in own if t.startswith("replica/") or re.search(r"/r\d+$", t)]
    for tag in curves:
        for step, value in own[tag].items():
            assert value == pytest.approx(sum(run[tag][step] for run in runs) / 3, rel=1e-5, abs=1e-6), (tag, step)


def test_other_loggers_keep_the_per_replica_tags(sweep):
    root = sweep[0]
    with open(root / "csv" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    for k in range(3):
        for tag in ("dynamics/norm_sq_mean", "train/loss", "replica/sigma"):
            assert f"{tag}/r{k}" in columns
    assert "dynamics/norm_sq_mean" in columns


def test_hparams_tab_has_one_row_per_replica_with_its_settings_and_final_values(sweep):
    from tensorboard.plugins.hparams import api_pb2

    root, model, _, _ = sweep
    groups = hparams_session_groups(root)
    rows = {g.sessions[0].name: g for g in groups}
    assert sorted(rows) == [".", *NAMES]  # the sweep's own row (the means) and one per replica
    for k, name in enumerate(NAMES):
        row = rows[name]
        assert row.sessions[0].status == api_pb2.STATUS_SUCCESS
        hp = {n: v.number_value for n, v in row.hparams.items() if n.startswith("replica/")}
        assert hp == {"replica/seed": SEEDS[k], "replica/lr": pytest.approx(0.05), "replica/init_scale": 1.0,
                      "replica/sigma": SIGMA[k]}
        assert row.hparams["model/width"].number_value == 12  # the sweep's shared hyper-parameters
        values = {m.name.tag: m.value for m in row.metric_values}
        run = events(root / name)
        assert values["train/loss"] == pytest.approx(run["train/loss"][300])
        if int(model.escape_step[k]) >= 0:
            assert values["phase/escape_step"] == int(model.escape_step[k])


class Fail(Callback):
    """Ends the fit with an exception once ``trainer.global_step`` reaches ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise RuntimeError("stop")


def test_replica_runs_are_complete_and_closed_when_the_fit_fails(tmp_path):
    model, dm, trainer = build(tmp_path, callbacks=[Fail(200)])
    with pytest.raises(RuntimeError, match="stop"):
        trainer.fit(model, dm)
    assert not model.recorder.replica_runs.serves(trainer.logger)  # closed: flushed, writer threads ended
    steps = set(events(tmp_path)["train/loss"])
    assert steps == {0, 50, 100, 150, 200}
    for name in NAMES:
        assert set(events(tmp_path / name)["train/loss"]) == steps, name


@pytest.mark.skipif(shutil.which("tensorboard") is None, reason="the tensorboard command is not installed")
def test_tensorboard_lists_one_run_per_replica(sweep):
    root = sweep[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [shutil.which("tensorboard"), "--logdir", str(root), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        runs = None
        for _ in range(600):  # up to a minute: the server starts, then reads the logdir
            if server.poll() is not None:
                pytest.fail(f"tensorboard exited with status {server.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    runs = json.load(r)
                if set(NAMES) <= set(runs):
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert runs is not None and sorted(runs) == [".", *NAMES], runs
        assert "dynamics/norm_sq_mean" in runs[NAMES[0]] and "dynamics/norm_sq_mean/r0" not in runs["."]
    finally:
        server.terminate()
        server.wait(timeout=30)
