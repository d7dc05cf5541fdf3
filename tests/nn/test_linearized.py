"""Linearized: the first-order Taylor model of a network, against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lnsgd import LabelNoise, Laziness, Linearized
from lightning_lnsgd.examples.resnet import ResNet18
from tests.conftest import make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
def test_equals_the_module_at_theta0_with_batch_norm(train):
    torch.manual_seed(0)
    net = ResNet18(num_classes=10, in_channels=1, width=0.125).train(train)
    with torch.no_grad():  # running statistics away from their 0 / 1 start, so that eval mode uses them
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    lin = Linearized(copy.deepcopy(net))
    x = torch.randn(6, 1, 8, 8)
    stats = {n: b.clone() for n, b in lin.named_buffers()}
    torch.testing.assert_close(lin(x), copy.deepcopy(net)(x), rtol=0, atol=1e-6)
    assert lin.training == train and lin.bn1.training == train
    for n, b in lin.named_buffers():  # train-mode statistics updates are discarded: f(x; θ₀) stays fixed
        assert torch.equal(b, stats[n]), n
    assert [n for n, _ in lin.named_parameters()] == [n for n, _ in net.named_parameters()]


class RandomFeatures(nn.Module):
    """f(x) = W tanh(A x) + b with A a fixed buffer: linear in its parameters (W, b)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("A", torch.randn(16, 5))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x @ self.A.T))


def test_exact_for_a_model_linear_in_its_parameters():
    torch.manual_seed(1)
    net = RandomFeatures()
    lin = Linearized(copy.deepcopy(net))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (net, lin)]
    for _ in range(25):  # any loss, any optimizer: the Taylor model is the model
        for m, opt in zip((net, lin), opts):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    torch.testing.assert_close(lin.head.weight, net.head.weight, rtol=0, atol=1e-5)
    x_new = torch.randn(8, 5)
    torch.testing.assert_close(lin(x_new), net(x_new), rtol=0, atol=1e-5)
    assert not torch.allclose(lin.theta0.head.weight, lin.head.weight)  # it did move


def _jacobian(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n·c, P) Jacobian of the outputs w.r.t. all parameters, by torch.autograd.functional.jacobian."""
    names = [n for n, _ in net.named_parameters()]
    values = tuple(p.detach() for p in net.parameters())

    def f(*ps):
        return torch.func.functional_call(net, dict(zip(names, ps)), (x,)).reshape(-1)

    return torch.cat([j.reshape(j.shape[0], -1) for j in torch.autograd.functional.jacobian(f, values)], dim=1)


def test_gradient_descent_on_squared_loss_follows_the_kernel_formula():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 2)).double()
    X, Xs, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    f0_X, f0_s = net(X).detach().reshape(-1), net(Xs).detach().reshape(-1)
    J, Js = _jacobian(net, X), _jacobian(net, Xs)
    K, Ks = J @ J.T, Js @ J.T
    eta, t = 0.5 / torch.linalg.eigvalsh(K).max().item(), 40
    lin = Linearized(copy.deepcopy(net))
    opt = torch.optim.SGD(lin.parameters(), lr=eta)
    for _ in range(t):
        opt.zero_grad()
        (0.5 * ((lin(X) - y) ** 2).sum()).backward()
        opt.step()
    eye = torch.eye(K.shape[0], dtype=torch.float64)
    decay = eye - torch.linalg.matrix_power(eye - eta * K, t)
    expected = f0_s + Ks @ torch.linalg.solve(K, decay @ (y.reshape(-1) - f0_X))
    got = lin(Xs).detach().reshape(-1)
    assert (got - f0_s).norm() > 0.1  # the outputs moved
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_state_dict_round_trip_keeps_theta0():
    torch.manual_seed(3)
    lin = Linearized(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)))
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.1 * torch.randn_like(p))  # θ ≠ θ₀
    state = lin.state_dict()
    assert {"theta0.0.weight", "theta0.3.bias", "0.weight", "1.running_mean"} <= set(state)
    torch.manual_seed(4)
    other = Linearized(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)))
    other.load_state_dict(state)
    x = torch.randn(5, 3)
    lin.eval(), other.eval()
    torch.testing.assert_close(other(x), lin(x), rtol=0, atol=0)
    torch.testing.assert_close(other.parameters0()["3.weight"], lin.parameters0()["3.weight"], rtol=0, atol=0)
    clone = copy.deepcopy(lin)  # a copy computes with its own parameters, not the original's
    with torch.no_grad():
        clone.get_parameter("3.bias").add_(1.0)
    torch.testing.assert_close(clone(x), lin(x) + 1.0, rtol=0, atol=1e-5)


def test_argument_checks():
    with pytest.raises(TypeError, match="module=int must be an nn.Module"):
        Linearized(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already a Linearized"):
        Linearized(Linearized(nn.Linear(2, 2)))


def _classifier(lightning, net: nn.Module):
    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Classifier()


def test_lightning_fit_under_sam_with_label_noise_and_laziness(lightning, tmp_path):
    torch.manual_seed(5)
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes
    model = _classifier(lightning, Linearized(nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))))
    theta0 = {n: v.clone() for n, v in model.net.parameters0().items()}
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    noise = LabelNoise(kind="flip", flip_prob=0.1, num_classes=3, seed=1)
    lazy = Laziness(probe_size=16, kernel_probe_size=4, every_n_steps=5)
    trainer = make_trainer(lightning, strategy="sam", max_steps=30, limit_val_batches=1, callbacks=[noise, lazy],
                           default_root_dir=str(tmp_path))
    assert trainer.strategy.strategy_name == "sam"
    data = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    trainer.fit(model, data, DataLoader(TensorDataset(x, y), batch_size=16))
    assert trainer.global_step == 30
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    assert after < 0.7 * before
    for n, v in model.net.parameters0().items():  # θ₀ stays, θ moved
        assert torch.equal(v, theta0[n]), n
    assert not torch.equal(model.net.get_parameter("2.weight"), theta0["2.weight"])
    # The Taylor model is linear in θ: Laziness sees it exactly lazy (up to float32 rounding).
    assert lazy.last["laziness/linearization_gap"] < 1e-4 and lazy.last["laziness/kernel_distance"] < 1e-6
