"""DynamicsMonitor on real fits with both Lightning packages: logged values equal an independent NumPy computation."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch

from lightning_lnsgd import compat
from lightning_lnsgd.callbacks import DynamicsMonitor, resolve_weights
from tests.callbacks.user_model import user_classes
from tests.conftest import make_trainer, read_events, read_scalars
from tests.metrics.numpy_reference import np_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=compat.INSTALLED, ids=lambda n: n.split(".")[0])
def fitted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A 60-step fit of the user model with the monitor, per Lightning package."""
    lightning = compat.package(request.param)
    UserModel, BlobData = user_classes(lightning)
    lightning.seed_everything(0)
    model, data = UserModel(), BlobData()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = DynamicsMonitor(
        layers=["backbone.fc*"], reference="teacher", second_layer="head", every_n_steps=10, scatter_steps=[0, 20]
    )
    logger = lightning.loggers.TensorBoardLogger(str(tmp_path_factory.mktemp("fit")), name="run")
    trainer = make_trainer(lightning, max_steps=60, log_every_n_steps=10, logger=logger, callbacks=[monitor],
                           limit_val_batches=0)
    trainer.fit(model, data)
    logger.experiment.flush()
    return {"model": model, "data": data, "initial": initial, "log_dir": trainer.log_dir, "monitor": monitor}


def test_resolve_weights_patterns(lightning: ModuleType) -> None:
    model = user_classes(lightning)[0]()
    assert list(resolve_weights(model, ["backbone.fc*"])) == ["backbone.fc1", "backbone.fc2"]
    assert list(resolve_weights(model, ["head.weight", "backbone.fc1"])) == ["head.weight", "backbone.fc1"]
    with pytest.raises(ValueError, match="'nope' matches no layer"):
        resolve_weights(model, ["nope"])


def test_monitor_logs_correct_values(fitted) -> None:
    scalars = read_scalars(fitted["log_dir"])
    model, data = fitted["model"], fitted["data"]
    for layer, module in (("backbone.fc1", model.backbone.fc1), ("backbone.fc2", model.backbone.fc2)):
        assert [s for s, _ in scalars[f"dynamics/{layer}/norm_sq_mean"]] == [0, 10, 20, 30, 40, 50, 60]
        W, W0 = module.weight.detach(), fitted["initial"][f"{layer}.weight"]
        v = data.teacher if layer == "backbone.fc1" else torch.ones(W.shape[1])
        ref = np_reference(W.numpy(), W0.numpy(), v.numpy())
        keys = ["norm_sq_mean", "frobenius", "effective_rank", "stable_rank", "norm_fraction", "relative_distance",
                "lazy_distance"]
        if layer == "backbone.fc1":
            keys += ["alignment_mean", "cosine_mean"]
        else:  # input dimension 32 ≠ len(teacher) = 10: no alignment for fc2
            assert f"dynamics/{layer}/cosine_mean" not in scalars
        for key in keys:
            step, value = scalars[f"dynamics/{layer}/{key}"][-1]
            assert step == 60 and value == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
        assert scalars[f"dynamics/{layer}/relative_distance"][0] == (0, 0.0)
    assert scalars["dynamics/head/outgoing_norm_mean"][-1][1] == pytest.approx(
        float(model.head.weight.detach().norm(dim=0).mean()), rel=1e-5
    )
    assert [s for s, _ in scalars["dynamics/head/oscillation"]] == [10, 20, 30, 40, 50, 60]
    acc = read_events(fitted["log_dir"])
    for tag in ("dynamics/backbone.fc1/norm_sq", "dynamics/backbone.fc1/cosine", "dynamics/head/outgoing_norm"):
        assert tag in acc.Tags()["histograms"]
    assert [e.step for e in acc.Images("dynamics/backbone.fc1/scatter")] == [0, 20]
    assert "dynamics/backbone.fc2/scatter" not in acc.Tags()["images"]
    state = fitted["monitor"].state_dict()
    assert torch.equal(state["initial"]["backbone.fc1"], fitted["initial"]["backbone.fc1.weight"])


def test_boring_model_same_numbers_with_both_packages(tmp_path) -> None:
    """The monitor on Lightning's demo BoringModel logs the same values whichever package trains it."""
    runs = {}
    for name in compat.INSTALLED:
        lightning = compat.package(name)
        from importlib import import_module

        demos = import_module(f"{name}.demos.boring_classes")
        lightning.seed_everything(7)
        model = demos.BoringModel()
        logger = lightning.loggers.TensorBoardLogger(str(tmp_path / name), name="run")
        trainer = make_trainer(lightning, max_steps=8, log_every_n_steps=4, logger=logger, limit_val_batches=0,
                               callbacks=[DynamicsMonitor(layers=["layer"], histograms=False)])
        trainer.fit(model)
        logger.experiment.flush()
        runs[name] = {t: v for t, v in read_scalars(trainer.log_dir).items() if t.startswith("dynamics/")}
        W = model.layer.weight.detach().numpy()
        assert runs[name]["dynamics/layer/frobenius"][-1] == (8, pytest.approx(float(np.linalg.norm(W)), rel=1e-6))
    first, *others = runs.values()
    assert len(first) == 7 and [s for s, _ in first["dynamics/layer/norm_sq_mean"]] == [0, 4, 8]
    for other in others:
        assert other == first


def test_refusals() -> None:
    with pytest.raises(ValueError, match=r"scatter_y='x' must be 'cosine' or 'alignment'"):
        DynamicsMonitor(layers=["fc"], scatter_y="x")
    with pytest.raises(ValueError, match=r"layers='fc' must be a non-empty list"):
        DynamicsMonitor(layers="fc")


def test_setup_refuses_a_reference_of_no_layer_dimension(lightning: ModuleType) -> None:
    UserModel, BlobData = user_classes(lightning)
    trainer = make_trainer(lightning, max_steps=1, callbacks=[DynamicsMonitor(layers=["backbone.fc2"], reference="teacher")])
    with pytest.raises(ValueError, match="reference has 10 entries but no layer has that input dimension"):
        trainer.fit(UserModel(), BlobData())
