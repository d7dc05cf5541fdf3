"""TwoLayerLinear's messages name only what is in play: the divergence error, and the Trainer settings the fused
path refuses (precision, gradient clipping) while the ones it honours keep working."""

import pytest
import torch

from lightning_lnsgd import (
    DivergenceError,
    LabelNoise,
    SAMStrategy,
    SparseTeacherDataModule,
    TwoLayerLinear,
)
from tests.conftest import make_trainer


def _fit(model, max_steps=300, **trainer_kw):
    dm = SparseTeacherDataModule(dim=model.W.shape[-1], n_train=50, n_test=20, steps_per_epoch=5)
    trainer = make_trainer(max_steps=max_steps, logger=False, limit_val_batches=0, **trainer_kw)
    trainer.fit(model, dm)
    return trainer


def _divergence(model, **trainer_kw) -> str:
    with pytest.raises(DivergenceError) as err:
        _fit(model, **trainer_kw)
    return str(err.value)


@pytest.mark.parametrize("fused", [False, True])
def test_clean_sgd_divergence_speaks_of_eta_alone(fused):
    kw = {"steps_per_batch": 10, "backend": "torch"} if fused else {}
    msg = _divergence(TwoLayerLinear(dim=20, width=50, lr=4.0, **kw))
    assert "with η=4." in msg and "lower `model.lr`." in msg
    assert "σ" not in msg and "noise level" not in msg and "ρ" not in msg


def test_noisy_divergence_names_sigma_and_the_product():
    msg = _divergence(TwoLayerLinear(dim=20, width=50, lr=2.0), callbacks=[LabelNoise(sigma=50.0)])
    assert "with η=2, σ=50, η·σ=100." in msg
    assert "lower `model.lr` or LabelNoise's `sigma`." in msg and "ρ" not in msg


def test_noise_switched_off_for_the_diverging_replica_is_not_named():
    """fig2_pair-style: replica 1 runs without noise (σ=0); its divergence is a clean-SGD one."""
    model = TwoLayerLinear(dim=20, width=50, lr=[1e-3, 4.0], replicas=2, steps_per_batch=10, backend="torch")
    msg = _divergence(model, callbacks=[LabelNoise(sigma=[1.0, 0.0])])
    assert "in replicas [1] with η=4." in msg and "σ" not in msg


@pytest.mark.parametrize("fused", [False, True])
def test_sam_divergence_names_rho(fused):
    kw = {"steps_per_batch": 10, "backend": "torch"} if fused else {}
    msg = _divergence(TwoLayerLinear(dim=20, width=50, lr=4.0, **kw), strategy=SAMStrategy(rho=0.05))
    assert "with η=4, SAM ρ=0.05." in msg and "the SAM strategy's `rho`" in msg and "σ" not in msg


@pytest.mark.parametrize(
    "setting, field",
    [
        ({"precision": "bf16-mixed"}, "trainer.precision='bf16-mixed'"),
        ({"precision": "bf16-true"}, "trainer.precision='bf16-true'"),  # numba: float32/float64 only
        ({"gradient_clip_val": 1.0}, "trainer.gradient_clip_val=1.0"),
        ({"accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches=2"),
    ],
)
def test_fused_path_refuses_settings_it_cannot_honour(setting, field):
    pytest.importorskip("numba")
    model = TwoLayerLinear(dim=4, width=8, lr=0.01, steps_per_batch=10, backend="numba")
    W0 = model.W.detach().clone()
    with pytest.raises(ValueError) as err:
        _fit(model, max_steps=20, **setting)
    msg = str(err.value)
    assert field in msg and "backend: autograd" in msg and "\n" not in msg
    assert torch.equal(model.W.detach().float(), W0)  # refused before any step


def test_generic_path_keeps_gradient_clipping():
    model = TwoLayerLinear(dim=4, width=8, lr=0.01, backend="autograd")
    trainer = _fit(model, max_steps=5, gradient_clip_val=1.0)
    assert trainer.global_step == 5


def test_fused_path_computes_in_float64_under_64_true():
    """64-true: the weights become float64 and every fused step runs in float64 (the same weights, bit for bit, as
    a float64 model under 32-true, and not those of a float32 run)."""
    kw = {"dim": 6, "width": 16, "lr": 0.05, "steps_per_batch": 10, "backend": "torch"}
    under_64 = TwoLayerLinear(**kw)
    _fit(under_64, max_steps=40, precision="64-true")
    assert under_64.W.dtype == torch.float64
    double = TwoLayerLinear(**kw).double()
    _fit(double, max_steps=40)
    assert torch.equal(under_64.W, double.W) and torch.equal(under_64.a, double.a)
    single = TwoLayerLinear(**kw)
    _fit(single, max_steps=40)
    assert single.W.dtype == torch.float32 and not torch.equal(under_64.W.float(), single.W)


def test_sam_every_n_steps_refused_on_the_fused_path_and_run_on_the_generic_one():
    fused = TwoLayerLinear(dim=20, width=50, lr=0.01, steps_per_batch=10, backend="torch")
    with pytest.raises(Exception, match=r"every_n_steps=3 is not supported for TwoLayerLinear.*every_n_steps=1") as err:
        _fit(fused, max_steps=10, strategy=SAMStrategy(rho=0.05, every_n_steps=3))
    assert "\n" not in str(err.value)
    # the generic path (one Lightning step per SGD step) runs it: SAM on steps 0 and 3 only
    runs = {}
    for every in (1, 3):
        model = TwoLayerLinear(dim=20, width=50, lr=0.01)
        _fit(model, max_steps=4, strategy=SAMStrategy(rho=0.05, every_n_steps=every))
        runs[every] = model.W.detach().clone()
    plain = TwoLayerLinear(dim=20, width=50, lr=0.01)
    _fit(plain, max_steps=4)
    assert not torch.equal(runs[3], runs[1]) and not torch.equal(runs[3], plain.W)
