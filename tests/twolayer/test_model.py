"""TwoLayerLinear + SparseTeacherDataModule: gradients, data, logged tags, resume, divergence."""

import math
import warnings

import numpy as np
import pytest
import torch

from lightning_lnsgd import (
    DivergenceError,
    LabelNoise,
    SparseTeacherDataModule,
    TwoLayerLinear,
)
from lightning_lnsgd.compat import TensorBoardLogger, pl
from tests.conftest import make_trainer, read_scalars


def _trainer(tmp_path, max_steps, **kw):
    return make_trainer(max_steps=max_steps, limit_val_batches=0, default_root_dir=tmp_path, **kw)


def test_model_gradient_equals_closed_form():
    model = TwoLayerLinear(dim=5, width=8, seed=1).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    y = torch.randn(3, dtype=torch.float64)
    model.training_step((x, y), 0).backward()
    W, a = model.W.detach().numpy(), model.a.detach().numpy()
    r = a @ W @ x.numpy().T - y.numpy()  # residuals, one per example
    g = x.numpy().T @ r / 3  # ∂L/∂θ
    np.testing.assert_allclose(model.W.grad.numpy(), np.outer(a, g), rtol=1e-12)
    np.testing.assert_allclose(model.a.grad.numpy(), W @ g, rtol=1e-12)


def test_init_statistics_and_validation():
    model = TwoLayerLinear(dim=20, width=1000, seed=0)
    assert abs(model.W.detach().square().sum(-1).mean().item() - 1) < 0.05
    assert abs(model.a.detach().square().mean().item() * 1000 - 1) < 0.15
    assert torch.equal(model.W, TwoLayerLinear(dim=20, width=1000, seed=0).W)
    small = TwoLayerLinear(dim=20, width=1000, seed=0, init_scale=0.01)
    torch.testing.assert_close(small.W, model.W * 0.01)
    for kwargs, field in [({"dim": None}, "dim"), ({"dim": 3, "width": 0}, "width"), ({"dim": 3, "lr": -1.0}, "lr"),
                          ({"dim": 3, "init_scale": 0.0}, "init_scale"), ({"dim": 3, "init": "xavier"}, "init")]:
        with pytest.raises(ValueError, match=f"`{field}`"):
            TwoLayerLinear(**kwargs)


def test_datamodule_reproducible_teacher_and_unchanged_after_fit(tmp_path):
    dm = SparseTeacherDataModule(dim=10, n_train=30, n_test=40, teacher_norm=2.0, teacher_nonzeros=3, seed=4)
    twin = SparseTeacherDataModule(dim=10, n_train=30, n_test=40, teacher_norm=2.0, teacher_nonzeros=3, seed=4)
    other = SparseTeacherDataModule(dim=10, n_train=30, n_test=40, teacher_norm=2.0, teacher_nonzeros=3, seed=5)
    for name in ("teacher", "x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(dm, name), getattr(twin, name))
    assert not torch.equal(dm.x_train, other.x_train)
    assert int((dm.teacher != 0).sum()) == 3 and math.isclose(dm.teacher.norm().item(), 2.0, rel_tol=1e-6)
    np.testing.assert_allclose(dm.y_train.numpy(), dm.x_train.double().numpy() @ dm.teacher.double().numpy(), rtol=1e-5)
    model = TwoLayerLinear(dim=10, width=16, lr=0.01)
    _trainer(tmp_path, 50, callbacks=[LabelNoise(sigma=2.0)]).fit(model, dm)
    for name in ("teacher", "x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(dm, name), getattr(twin, name)), name


def test_sampling_is_uniform_with_replacement_and_seeded():
    dm = SparseTeacherDataModule(dim=3, n_train=5, batch_size=4, seed=0)
    dm.setup("fit")
    x, y = dm.sample(n=5000)
    assert x.shape == (5000, 4, 3) and y.shape == (5000, 4)
    # Recover indices by matching rows; every example is drawn ≈ equally often.
    idx = (x.reshape(-1, 1, 3) == dm.x_train[None]).all(-1).float().argmax(-1)
    counts = torch.bincount(idx, minlength=5).double()
    assert ((counts - 4000) ** 2 / 4000).sum() < 25  # χ², 4 dof
    again = SparseTeacherDataModule(dim=3, n_train=5, batch_size=4, seed=0)
    again.setup("fit")
    assert torch.equal(again.sample(n=5000)[0], x)


@pytest.mark.parametrize("kwargs,field", [
    ({"dim": 4, "teacher_nonzeros": 5}, "teacher_nonzeros"), ({"teacher_nonzeros": 2.5}, "teacher_nonzeros"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": "a"}, "batch_size"), ({"teacher_norm": float("inf")}, "teacher_norm"),
    ({"steps_per_epoch": 0}, "steps_per_epoch"),
])
def test_datamodule_rejects_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SparseTeacherDataModule(**kwargs)


def test_infinite_noise_and_radius_are_rejected():
    from lightning_lnsgd import SAMStrategy

    with pytest.raises(ValueError, match="`sigma` must be a finite float"):
        LabelNoise(sigma=float("inf"))
    with pytest.raises(ValueError, match="rho must be a finite float"):
        SAMStrategy(rho=float("inf"))
    with pytest.raises(ValueError, match=r"`lr` must be finite and > 0 \(or a list of such\), got 0"):
        TwoLayerLinear(dim=3, lr=0)


def _weights(model):
    return model.W.detach().clone(), model.a.detach().clone()


def test_resume_mid_epoch_is_bitwise_identical(tmp_path):
    def fresh():
        return (
            TwoLayerLinear(dim=6, width=12, lr=0.01, seed=2),
            SparseTeacherDataModule(dim=6, n_train=20, seed=3, steps_per_epoch=25),
            LabelNoise(sigma=1.0, seed=7),
        )

    model, dm, noise = fresh()
    _trainer(tmp_path / "a", 60, callbacks=[noise]).fit(model, dm)
    reference = _weights(model)

    model, dm, noise = fresh()
    first = _trainer(tmp_path / "b", 30, callbacks=[noise])
    first.fit(model, dm)
    ckpt = tmp_path / "half.ckpt"
    first.save_checkpoint(ckpt)
    model, dm, noise = fresh()
    second = _trainer(tmp_path / "b", 60, callbacks=[noise])
    with warnings.catch_warnings():
        warnings.simplefilter("error", pl.utilities.warnings.PossibleUserWarning)  # "dataloader is not resumable" must not appear
        second.fit(model, dm, ckpt_path=ckpt)
    resumed = _weights(model)
    assert torch.equal(resumed[0], reference[0]) and torch.equal(resumed[1], reference[1])
    # The interrupted epoch (25 batches) is finished, not restarted: epochs end at 50 steps, as uninterrupted,
    # so 10 batches of the last epoch were consumed at step 60.
    assert dm._train_loader.consumed == 10


def _scalars(root):
    """``{tag: {step: value}}`` of the run under ``root``."""
    return {tag: dict(points) for tag, points in read_scalars(root).items()}


def test_logged_tags_equal_numpy_computation(tmp_path):
    model = TwoLayerLinear(dim=8, width=30, lr=0.04, seed=0)
    W0 = model.W.detach().double().numpy().copy()
    dm = SparseTeacherDataModule(dim=8, n_train=40, n_test=50, seed=1)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    _trainer(tmp_path, 60, logger=logger, log_every_n_steps=20, callbacks=[LabelNoise(sigma=3.0)]).fit(model, dm)
    scalars = _scalars(tmp_path)
    W, a = model.W.detach().double().numpy(), model.a.detach().double().numpy()
    t = dm.teacher.double().numpy()
    theta = W.T @ a
    norms = np.linalg.norm(W, axis=1)
    expected = {
        "dynamics/norm_sq_mean": (norms**2).mean(),
        "dynamics/frobenius": np.sqrt((W**2).sum()),
        "dynamics/alignment_mean": np.abs(W @ t).mean(),
        "dynamics/cosine_mean": (np.abs(W @ t) / (norms * np.linalg.norm(t))).mean(),
        "dynamics/lazy_distance": math.sqrt(30) * np.linalg.norm(W - W0, axis=1).min(),
        "dynamics/a_abs_mean": np.abs(a).mean(),
        "dynamics/theta_error": np.linalg.norm(theta - t),
        "train/loss": 0.5 * ((dm.x_train.double().numpy() @ theta - dm.y_train.double().numpy()) ** 2).mean(),
        "test/loss": 0.5 * ((dm.x_test.double().numpy() @ theta - dm.y_test.double().numpy()) ** 2).mean(),
    }
    for tag, value in expected.items():
        assert set(scalars[tag]) == {0, 20, 40, 60}, tag
        np.testing.assert_allclose(scalars[tag][60], value, rtol=1e-5, err_msg=tag)
    assert scalars["dynamics/lazy_distance"][0] == 0.0
    # σ=3 and η=0.04 leave the lazy ball fast: the escape step is logged once, on the check grid.
    (escape,) = scalars["phase/escape_step"].values()
    assert escape % 20 == 0 and 0 < escape <= 60
    assert scalars["dynamics/lazy_distance"][escape] > 1 >= scalars["dynamics/lazy_distance"][escape - 20]


def test_divergence_names_step_eta_and_sigma(tmp_path):
    model = TwoLayerLinear(dim=20, width=200, lr=2.0)
    dm = SparseTeacherDataModule(dim=20, n_train=50)
    with pytest.raises(DivergenceError, match=r"step \d+ with η=2, σ=50.*η·σ=100"):
        _trainer(tmp_path, 500, callbacks=[LabelNoise(sigma=50.0)]).fit(model, dm)


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=pytest.mark.skipif(
    "numba" not in __import__("lightning_lnsgd.twolayer.kernels", fromlist=["x"]).available_backends(), reason="no numba"))])
@pytest.mark.parametrize("every", [0, 50])
def test_fused_divergence_is_caught_and_names_the_replica(tmp_path, backend, every):
    """Also with logging off: the fused path checks the weights at the end of every Lightning step."""
    model = TwoLayerLinear(dim=20, width=200, lr=[1e-3, 2.0], replicas=2, steps_per_batch=50, backend=backend)
    dm = SparseTeacherDataModule(dim=20, n_train=50)
    trainer = make_trainer(accelerator="cpu", max_steps=2000, logger=False, log_every_n_steps=every,
                         callbacks=[LabelNoise(sigma=50.0)], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    with pytest.raises(DivergenceError, match=r"step \d+ in replicas \[1\] with η=2, σ=50.*η·σ=100"):
        trainer.fit(model, dm)
    assert trainer.global_step < 2000


def test_predict_and_validation_loss_on_the_sgd_step_grid(tmp_path):
    model = TwoLayerLinear(dim=4, width=8, lr=0.01, steps_per_batch=10, backend="torch")
    dm = SparseTeacherDataModule(dim=4, n_train=10, n_test=6, steps_per_epoch=3)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = make_trainer(accelerator="cpu", max_steps=60, logger=logger, log_every_n_steps=10,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    # One epoch = 3 Lightning steps = 30 SGD steps: val/loss lands at SGD steps 30 and 60.
    assert set(_scalars(tmp_path)["val/loss"]) == {30, 60}
    (pred,) = trainer.predict(model, dm)
    torch.testing.assert_close(pred, dm.x_test @ (model.W.T @ model.a).detach())
