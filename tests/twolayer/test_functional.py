"""The math core: closed-form gradients, the balancedness identity, NTK init."""

import math

import numpy as np
import pytest
import torch

from lightning_lnsgd.twolayer import functional as F


def _rand(shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("lead", [(), (3,)])
def test_closed_form_gradients_equal_autograd(batch, lead):
    m, d = 7, 4
    W = _rand((*lead, m, d), 0).requires_grad_()
    a = _rand((*lead, m), 1).requires_grad_()
    x, y = _rand((*lead, batch, d), 2), _rand((*lead, batch), 3)
    F.half_mse(W, a, x, y).sum().backward()
    gW, ga, r = F.grads(W.detach(), a.detach(), x, y)
    torch.testing.assert_close(gW, W.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, a.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r, F.predict(W, a, x).detach() - y)


def test_prediction_is_a_transpose_W_x_in_numpy():
    W, a, x = _rand((6, 3), 0), _rand((6,), 1), _rand((4, 3), 2)
    expected = np.stack([a.numpy() @ W.numpy() @ xb for xb in x.numpy()])
    np.testing.assert_allclose(F.predict(W, a, x).numpy(), expected, rtol=1e-13)


def test_balancedness_identity_of_one_sgd_step():
    """‖wᵢ⁺‖² − aᵢ⁺² = ‖wᵢ‖² − aᵢ² + η² r² (aᵢ²‖x‖² − (xᵀwᵢ)²) (science.md §4), batch 1."""
    m, d, eta = 50, 10, 0.01
    W, a = _rand((m, d), 0) / math.sqrt(d), _rand((m,), 1) / math.sqrt(m)
    for step in range(20):
        x, y = _rand((1, d), 10 + step), _rand((1,), 100 + step) * 4.0
        r = (F.predict(W, a, x) - y)[0]
        before = F.balancedness(W, a)
        W_new, a_new = F.sgd_step(W, a, x, y, eta)
        xw = W @ x[0]
        predicted = before + eta**2 * r**2 * (a**2 * x[0].square().sum() - xw**2)
        torch.testing.assert_close(F.balancedness(W_new, a_new), predicted, rtol=1e-12, atol=1e-12)
        # The first-layer norm falls by the squared oscillation of the second layer (when aᵢ is small).
        torch.testing.assert_close((a_new - a).square(), (eta * r * xw).square(), rtol=1e-12, atol=1e-15)
        W, a = W_new, a_new


def test_sgd_step_per_replica_learning_rates():
    W, a = _rand((3, 5, 4), 0), _rand((3, 5), 1)
    x, y = _rand((3, 2, 4), 2), _rand((3, 2), 3)
    lr = torch.tensor([0.1, 0.01, 0.0], dtype=torch.float64)
    W1, a1 = F.sgd_step(W, a, x, y, lr)
    for k in range(3):
        Wk, ak = F.sgd_step(W[k], a[k], x[k], y[k], float(lr[k]))
        torch.testing.assert_close(W1[k], Wk)
        torch.testing.assert_close(a1[k], ak)
    torch.testing.assert_close(W1[2], W[2])


def test_ntk_init_scales_and_seed():
    W, a = F.ntk_init(4000, 20, seed=3)
    assert W.dtype == torch.float32
    assert abs(W.square().sum(-1).mean().item() - 1.0) < 0.02  # ‖wᵢ‖² ≈ 1
    assert abs(a.square().sum().item() - 1.0) < 0.1  # Σ aᵢ² ≈ 1 (aᵢ ~ N(0, 1/m))
    W2, a2 = F.ntk_init(4000, 20, seed=3)
    assert torch.equal(W, W2) and torch.equal(a, a2)
    Ws, _ = F.ntk_init(4000, 20, init_scale=0.1, seed=3, dtype=torch.float64)
    torch.testing.assert_close(Ws.float(), W * 0.1)


@pytest.mark.parametrize("lead,lr", [((), 0.1), ((3,), 0.1), ((3,), "per-replica")])
def test_in_place_sgd_step_equals_pure_step(lead, lr):
    W, a = _rand((*lead, 6, 4), 0), _rand((*lead, 6), 1)
    x, y = _rand((*lead, 2, 4), 2), _rand((*lead, 2), 3)
    if lr == "per-replica":
        lr = torch.tensor([0.1, 0.02, 0.3], dtype=torch.float64)
    W_ref, a_ref = F.sgd_step(W, a, x, y, lr)
    F.sgd_step_(W, a, x, y, lr)
    torch.testing.assert_close(W, W_ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(a, a_ref, rtol=1e-13, atol=1e-15)
