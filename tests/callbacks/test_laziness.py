"""Function-space laziness: linearisation gap and NTK kernel distance (formulas, exact lazy limit, callback)."""

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from lightning_lnsgd.callbacks.laziness import (
    Laziness,
    empirical_ntk,
    kernel_distance,
    linearization_gap,
)
from lightning_lnsgd.examples.resnet import ResNet18
from tests.conftest import make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _perturb(model, scale, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _explicit_jacobian(model, x):
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
    rows = x.shape[0] * model(x).shape[1]
    return torch.cat([jac[n].reshape(rows, -1) for n in params], dim=1).double()


def test_linear_model_is_exactly_lazy():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x = torch.randn(9, 6)
    p0, K0 = _snapshot(model), empirical_ntk(model, x)
    _perturb(model, 1.0)  # a large move: a linear model stays equal to its linearisation
    assert float(linearization_gap(model, p0, x)) < 1e-5
    assert float(kernel_distance(K0, empirical_ntk(model, x))) < 1e-6


def test_moving_network_is_not_lazy_and_formulas_match_explicit_jacobian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.randn(6, 5)
    p0 = _snapshot(model)
    assert float(linearization_gap(model, p0, x)) == 0.0  # nothing moved: 0/0 := 0
    J0 = _explicit_jacobian(model, x)
    K0 = empirical_ntk(model, x)
    torch.testing.assert_close(K0, J0 @ J0.T, rtol=1e-5, atol=1e-5)
    _perturb(model, 0.3)
    delta = torch.cat([(p.detach() - p0[n]).flatten() for n, p in model.named_parameters()]).double()
    f0 = functional_call(model, p0, (x,)).double().flatten()
    ft = model(x).double().flatten()
    expect = (ft - f0 - J0 @ delta).norm() / (ft - f0).norm()
    gap = linearization_gap(model, p0, x)
    assert float(gap) > 0.05
    torch.testing.assert_close(gap, expect, rtol=1e-4, atol=1e-6)
    Kt = empirical_ntk(model, x)
    Jt = _explicit_jacobian(model, x)
    torch.testing.assert_close(Kt, Jt @ Jt.T, rtol=1e-5, atol=1e-5)
    expect_kd = 1 - (K0 * Kt).sum() / (K0.norm() * Kt.norm())
    torch.testing.assert_close(kernel_distance(K0, Kt), expect_kd, rtol=1e-6, atol=1e-9)
    assert float(expect_kd) > 1e-3


def test_batch_norm_network_is_evaluated_in_eval_mode():
    torch.manual_seed(0)
    net = ResNet18(num_classes=3, in_channels=1, width=0.0625)
    net.train()
    with torch.no_grad():  # give the running statistics some non-default values
        net(torch.randn(16, 1, 8, 8) * 2 + 1)
    stats = {n: b.clone() for n, b in net.named_buffers()}
    x = torch.randn(4, 1, 8, 8)
    p0 = _snapshot(net)
    K = empirical_ntk(net, x)
    assert K.shape == (12, 12)
    _perturb(net, 0.05)
    gap = linearization_gap(net, p0, x)
    assert 0 < float(gap) < 10
    assert net.training  # mode restored
    assert all(torch.equal(b, stats[n]) for n, b in net.named_buffers())  # eval mode: no running-stat update
    # per-example kernel in eval mode == kernel of the batched eval-mode forward
    net.eval()
    J = _explicit_jacobian(net, x)
    torch.testing.assert_close(empirical_ntk(net, x), J @ J.T, rtol=1e-4, atol=1e-4)


def _classes(lightning: ModuleType) -> tuple[type, type]:
    """A logger that records ``log_metrics`` rows and a small regressor, of ``lightning``'s package."""

    class Recorder(lightning.loggers.Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        @property
        def name(self):
            return "rec"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    class Regressor(lightning.LightningModule):
        def __init__(self, net, lr):
            super().__init__()
            self.net, self.lr = net, lr

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(x), y)

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return Recorder, Regressor


def test_callback_logs_at_global_step_zero_for_linear_and_positive_for_mlp(lightning, tmp_path):
    torch.manual_seed(0)
    cb = Laziness(probe_size=20, kernel_probe_size=5, every_n_steps=2)
    rec_lin = _fit_with(lightning, nn.Linear(4, 2), tmp_path, 0.5, cb)
    assert sorted(rec_lin) == [0, 2, 4, 6]
    # the probe is the first 20 inputs of the validation loader given to fit (not the training data)
    assert torch.equal(cb.probe, _data(1)[0][:20])
    for step, m in rec_lin.items():
        assert m["laziness/linearization_gap"] < 1e-4 and m["laziness/kernel_distance"] < 1e-6, (step, m)
    cb2 = Laziness(probe_size=16, kernel_probe_size=4, every_n_steps=3)
    rec_mlp = _fit_with(lightning, nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2)), tmp_path, 2.0, cb2)
    assert sorted(rec_mlp) == [0, 3, 6]
    assert rec_mlp[0]["laziness/linearization_gap"] == 0 and rec_mlp[0]["laziness/kernel_distance"] < 1e-6
    assert rec_mlp[6]["laziness/linearization_gap"] > 1e-3 and rec_mlp[6]["laziness/kernel_distance"] > 1e-4
    state = cb2.state_dict()
    assert set(state["params0"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    fresh = Laziness()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.probe, cb2.probe.cpu())


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 4, generator=g), torch.randn(64, 2, generator=g)


def _fit_with(lightning, net, tmp_path, lr, cb):
    Recorder, Regressor = _classes(lightning)
    torch.manual_seed(0)
    train = DataLoader(TensorDataset(*_data(0)), batch_size=16)
    val = DataLoader(TensorDataset(*_data(1)), batch_size=16)
    rec = Recorder()
    trainer = make_trainer(lightning, max_steps=6, logger=rec, limit_val_batches=1, callbacks=[cb],
                           default_root_dir=str(tmp_path))
    trainer.fit(Regressor(net, lr), train, val)
    return {step: m for step, m in rec.rows if any(k.startswith("laziness/") for k in m)}


def test_initial_buffers_mode_and_argument_checks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    cb = Laziness(probe=torch.randn(5, 3), kernel_probe_size=3, buffers="initial")
    cb._params0 = _snapshot(net)
    cb._buffers0 = {n: b.clone() for n, b in net.named_buffers()}
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 3) * 3)  # running statistics move, parameters do not
    # "initial": f(θ₀, B_t) ≠ f(θ₀, B₀) although θ_t = θ₀ and J·0 = 0: the whole move is unexplained, gap = 1
    out = cb.compute(net)
    assert float(out["linearization_gap"]) == pytest.approx(1.0)
    assert float(out["kernel_distance"]) > 0
    # "current" (default): only parameter changes count; none happened
    current = Laziness(probe=cb.probe, kernel_probe_size=3)
    current._params0, current._buffers0 = cb._params0, cb._buffers0
    assert float(current.compute(net)["linearization_gap"]) == 0.0
    assert float(current.compute(net)["kernel_distance"]) < 1e-6
    with pytest.raises(ValueError, match=r"buffers='both' must be 'current' or 'initial'"):
        Laziness(buffers="both")
    with pytest.raises(ValueError, match=r"probe_size=0 must be an integer >= 1"):
        Laziness(probe_size=0)
