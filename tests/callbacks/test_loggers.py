"""The callbacks under loggers other than TensorBoard (CSV, MLflow, several at once), with both Lightning packages.

What Lightning's public logger API carries (hyper-parameters, scalars) reaches every logger; what it cannot carry
(histograms, figures) is named in one warning at setup per callback and logger. The values are read back from each
logger's own files (``hparams.yaml`` and ``metrics.csv``; MLflow's client over its local file store), and the final
values are checked against the last point of the curves there.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from lightning_lnsgd.callbacks import DynamicsMonitor, HParamsSummary, PruningCurve
from tests.callbacks.user_model import user_classes
from tests.conftest import hparams_session_groups, make_trainer, read_events, read_scalars

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CURVE = "dynamics/backbone.fc1/cosine_mean"
METRICS = ["val/loss", CURVE, "pruning/val/acc@0.5", "never/logged"]
OURS = ("DynamicsMonitor", "PruningCurve", "HParamsSummary")


def _loggers(lightning: ModuleType, kinds: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in kinds.split("+"):
        if kind == "tb":
            out[kind] = lightning.loggers.TensorBoardLogger(str(root), name="tb")
        elif kind == "csv":
            out[kind] = lightning.loggers.CSVLogger(str(root), name="csv")
        else:
            pytest.importorskip("mlflow")
            # MLflow 3 keeps its file store only behind this switch; a local store needs no server
            monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
            out[kind] = lightning.loggers.MLFlowLogger(experiment_name="lnsgd", tracking_uri=(root / "mlruns").as_uri())
    return out


def _fit(lightning: ModuleType, loggers: dict[str, Any]) -> tuple[Any, PruningCurve, list[str]]:
    UserModel, BlobData = user_classes(lightning)
    lightning.seed_everything(0)
    callbacks = [
        DynamicsMonitor(layers=["backbone.fc1"], reference="teacher", every_n_steps=10, scatter_steps=[0]),
        PruningCurve(kept_fractions=[1.0, 0.5], monitor="val/acc"),
        HParamsSummary(metrics=METRICS, extra={"noise_sigma": 4.0}),
    ]
    trainer = make_trainer(lightning, max_steps=40, log_every_n_steps=10, logger=list(loggers.values()),
                           callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(UserModel(), BlobData())
    ours = [str(w.message) for w in caught if str(w.message).startswith(OURS)]
    return trainer, callbacks[1], ours


def _csv_curves(logger: Any) -> tuple[dict[str, Any], dict[str, list[tuple[int, float]]]]:
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for tag, value in row.items():
                if tag != "step" and value not in ("", None):
                    curves.setdefault(tag, []).append((int(row["step"]), float(value)))
    return hparams, curves


def _mlflow_curves(logger: Any) -> tuple[dict[str, Any], dict[str, list[tuple[int, float]]]]:
    client, run_id = logger.experiment, logger.run_id
    run = client.get_run(run_id)
    curves = {}
    for tag in run.data.metrics:
        history = sorted(client.get_metric_history(run_id, tag), key=lambda m: (m.step, m.timestamp))
        curves[tag] = [(m.step, m.value) for m in history]
    return run.data.params, curves


def _check_scalar_logger(hparams: dict[str, Any], curves: dict[str, list[tuple[int, float]]], pruning: PruningCurve,
                         pruning_tag: str) -> None:
    # the summary's hyper-parameters, under the same flat names as in TensorBoard's HPARAMS tab
    assert float(hparams["model/lr"]) == pytest.approx(0.2)
    assert int(hparams["data/n"]) == 512 and float(hparams["noise_sigma"]) == 4.0
    # the final values are the last points of the curves that this logger holds; one never logged is left out
    for tag in ("val/loss", CURVE):
        assert len(curves[tag]) > 1
        assert curves[f"final/{tag}"] == [(40, pytest.approx(curves[tag][-1][1]))]
    assert not any("never/logged" in tag for tag in curves)
    # the monitor's scalars and the pruning curve, as scalars
    assert [s for s, _ in curves[CURVE]] == [0, 10, 20, 30, 40]
    assert curves[pruning_tag] == [(40, pytest.approx(pruning.curve[0.5]))]
    assert curves[f"final/{pruning_tag}"] == [(40, pytest.approx(pruning.curve[0.5]))]
    assert math.isfinite(curves["dynamics/backbone.fc1/lazy_distance"][-1][1])


@pytest.mark.parametrize("kinds", ["csv", "mlflow", "tb+csv+mlflow"])
def test_every_logger_gets_what_it_can_take_and_a_warning_for_the_rest(
    lightning: ModuleType, kinds: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loggers = _loggers(lightning, kinds, tmp_path, monkeypatch)
    trainer, pruning, ours = _fit(lightning, loggers)

    # one warning per callback and logger that cannot take histograms or figures; none for TensorBoard
    others = [type(lg).__name__ for kind, lg in loggers.items() if kind != "tb"]
    assert len(ours) == 2 * len(others), ours
    for name in others:
        (dyn,) = [m for m in ours if m.startswith("DynamicsMonitor") and f"not to {name} " in m]
        assert "histograms dynamics/*" in dyn and "scatter figures" in dyn and "histograms=False" in dyn
        # advice to add a TensorBoard logger only where there is none
        assert ("Add a TensorBoardLogger" in dyn) == ("tb" not in loggers), dyn
        (fig,) = [m for m in ours if m.startswith("PruningCurve") and f"not to {name} " in m]
        assert "figure pruning/val/acc" in fig and "scalars pruning/val/acc@<α>" in fig
    assert not any("not to TensorBoardLogger" in m for m in ours)

    if "csv" in loggers:
        _check_scalar_logger(*_csv_curves(loggers["csv"]), pruning, "pruning/val/acc@0.5")
    if "mlflow" in loggers:
        # MLflow allows no '@' in a metric name: Lightning's MLFlowLogger drops it (and says so)
        _check_scalar_logger(*_mlflow_curves(loggers["mlflow"]), pruning, "pruning/val/acc0.5")
    if "tb" in loggers:  # TensorBoard keeps its HPARAMS row, histograms and figures, and no final/* scalars
        run_dir = Path(loggers["tb"].log_dir)
        (group,) = hparams_session_groups(run_dir)
        assert group.hparams["noise_sigma"].number_value == 4.0
        tags = read_events(run_dir).Tags()
        assert "dynamics/backbone.fc1/norm_sq" in tags["histograms"]
        assert {"pruning/val/acc", "dynamics/backbone.fc1/scatter"} <= set(tags["images"])
        assert not any(tag.startswith("final/") for tag in read_scalars(run_dir))


def test_no_warning_when_nothing_is_asked_that_a_logger_cannot_take(lightning: ModuleType, tmp_path: Path) -> None:
    UserModel, BlobData = user_classes(lightning)
    monitor = DynamicsMonitor(layers=["backbone.fc1"], every_n_steps=10, histograms=False)
    logger = lightning.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(lightning, max_steps=10, logger=logger, limit_val_batches=0, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(UserModel(), BlobData())
    assert not [w for w in caught if str(w.message).startswith(OURS)]
    _, curves = _csv_curves(logger)
    assert [s for s, _ in curves["dynamics/backbone.fc1/norm_sq_mean"]] == [0, 10]
