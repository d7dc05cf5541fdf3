"""HParamsSummary with both Lightning packages: TensorBoard's own hparams plugin code reads the table back."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from lightning_lnsgd.callbacks import DynamicsMonitor, HParamsSummary
from tests.callbacks.user_model import user_classes
from tests.conftest import hparams_session_groups, make_trainer, read_scalars

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hparams_tab_shows_final_metrics(lightning: ModuleType, tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import api_pb2

    UserModel, BlobData = user_classes(lightning)
    lightning.seed_everything(0)
    tags = ["val/loss", "dynamics/backbone.fc1/cosine_mean", "never/logged"]
    hp = HParamsSummary(metrics=tags, extra={"noise_sigma": 4.0})
    monitor = DynamicsMonitor(layers=["backbone.fc1"], reference="teacher", every_n_steps=10, histograms=False)
    logger = lightning.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer = make_trainer(lightning, max_steps=40, log_every_n_steps=10, logger=logger, callbacks=[monitor, hp])
    trainer.fit(UserModel(), BlobData())
    groups = hparams_session_groups(tmp_path / "run")
    assert len(groups) == 1
    group = groups[0]
    assert group.sessions[0].status == api_pb2.STATUS_SUCCESS
    assert group.hparams["model/lr"].number_value == pytest.approx(0.2)
    assert group.hparams["data/n"].number_value == 512
    assert group.hparams["noise_sigma"].number_value == 4.0
    values = {mv.name.tag: mv.value for mv in group.metric_values}
    scalars = read_scalars(trainer.log_dir)
    # the columns are our metrics (not Lightning's hp_metric), each the last value of its curve
    assert set(values) == {"val/loss", "dynamics/backbone.fc1/cosine_mean"}
    for tag in values:
        assert values[tag] == pytest.approx(scalars[tag][-1][1])
    # the curves hold only what was logged: no placeholder point from the hparams record
    assert scalars["dynamics/backbone.fc1/cosine_mean"][0][0] == 0 and "never/logged" not in scalars
    assert [s for s, _ in scalars["val/loss"]] == sorted({s for s, _ in scalars["val/loss"]}) and scalars["val/loss"][0][0] > 0


def test_refuses_empty_metrics() -> None:
    with pytest.raises(ValueError, match=r"metrics=\[\] must be a non-empty list"):
        HParamsSummary(metrics=[])
