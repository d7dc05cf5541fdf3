"""Tests of the SAM strategies (lightning_lnsgd/strategies/sam.py), against both Lightning packages where it matters.

The reference steps are computed independently in float64 with plain autograd; the SAM runs use float32.

This file is also a script: ``python tests/strategies/test_sam.py ddp-worker OUTDIR`` runs a two-rank gloo DDP
training through the served package's own ``LightningCLI`` with ``--trainer.strategy lightning_lnsgd.SAMDDPStrategy``
(Lightning's subprocess launcher re-runs this same command for rank 1) and saves what every rank saw;
``test_ddp_two_ranks`` starts it once per installed package (``LIGHTNING_LNSGD_PACKAGE``) and checks the result.
"""

import copy
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # so that the script mode and an uninstalled checkout find the package
    sys.path.insert(0, str(REPO))

from lightning_lnsgd import compat  # noqa: E402
from lightning_lnsgd.compat import Callback, LightningModule  # noqa: E402
from lightning_lnsgd.protocol import StepLayout  # noqa: E402
from lightning_lnsgd.strategies.sam import (  # noqa: E402
    SAMDDPStrategy,
    SAMStrategy,
    is_perturbed_pass,
    is_sam_strategy,
    sam_perturbation,
    sam_settings,
    sam_strategy_class,
)
from tests.conftest import QUIET, make_trainer  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# A tiny model
# ----------------------------------------------------------------------------------------------------------------
def make_data(n: int = 16, d: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class TinyModule(LightningModule):
    """MLP 3-4-1 with MSE loss; counts hooks and passes; optionally batch norm."""

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.1,
        batch_norm: bool = False,
        n: int = 16,
        batch_size: int = 4,
        seed: int = 0,
        sync_dist: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(3, 4)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(4))
        layers += [nn.Tanh(), nn.Linear(4, 1)]
        self.net = nn.Sequential(*layers)
        self.optimizer_name = optimizer
        self.lr = lr
        self.n = n
        self.batch_size = batch_size
        self.sync_dist = sync_dist
        self.counts: Counter = Counter()
        self.grad_norms_before_step: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        perturbed = is_perturbed_pass(self)
        self.counts["device_" + self.net[0].weight.device.type] += 1
        self.counts["training_step_perturbed" if perturbed else "training_step_first"] += 1
        self.log("train_loss", loss, on_step=True, on_epoch=False, sync_dist=self.sync_dist)
        # the epoch mean of this flag must stay 0: the perturbed pass never reaches the logger
        self.log("perturbed_flag", float(perturbed), on_step=False, on_epoch=True, sync_dist=self.sync_dist)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr)
        raise ValueError(self.optimizer_name)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(self.n), batch_size=self.batch_size, shuffle=False)

    # hook counters
    def on_before_backward(self, loss: Tensor) -> None:
        self.counts["on_before_backward"] += 1

    def on_after_backward(self) -> None:
        self.counts["on_after_backward"] += 1

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.counts["on_before_optimizer_step"] += 1
        assert not is_perturbed_pass(self)
        norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.grad_norms_before_step.append(float(torch.linalg.vector_norm(torch.stack(norms))))

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
        self.counts["configure_gradient_clipping"] += 1
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


class Recorder(Callback):
    """Records weights before each step, the logged loss and the loop's loss output after each step."""

    def __init__(self) -> None:
        self.weights_before: list[list[Tensor]] = []
        self.logged_loss: list[float] = []
        self.output_loss: list[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.weights_before.append([p.detach().clone() for p in pl_module.parameters()])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # the optimizer must see the restored weights w, bit for bit
        for p, w in zip(pl_module.parameters(), self.weights_before[-1]):
            assert torch.equal(p.detach(), w)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.logged_loss.append(float(trainer.callback_metrics["train_loss"]))
        self.output_loss.append(float(outputs["loss"]))


# ----------------------------------------------------------------------------------------------------------------
# Independent float64 reference
# ----------------------------------------------------------------------------------------------------------------
def ref_perturbation(params: list[Tensor], grads: list[Tensor], rho: float, normalize: bool, adaptive: bool) -> list[Tensor]:
    t2 = [p.abs() ** 2 if adaptive else torch.ones_like(p) for p in params]
    if not normalize:
        return [rho * a * g for a, g in zip(t2, grads)]
    norm = torch.sqrt(sum(((a.sqrt() * g) ** 2).sum() for a, g in zip(t2, grads)))
    return [rho * a * g / norm for a, g in zip(t2, grads)]


def ref_loss(net: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(functional_call(net, params, (x,)), y)


def ref_sam_step(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[tuple[Tensor, Tensor]],
    rho: float,
    normalize: bool,
    adaptive: bool,
    clip: Optional[float] = None,
) -> float:
    """One SAM step of ``net`` (float64); ``batches`` has one batch per rank (ascent per rank, mean of 2nd grads)."""
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    second: list[list[Tensor]] = []
    losses = []
    for x, y in batches:
        loss = ref_loss(net, dict(zip(names, params)), x, y)
        losses.append(float(loss.detach()))
        g = torch.autograd.grad(loss, params)
        e = ref_perturbation([p.detach() for p in params], list(g), rho, normalize, adaptive)
        shifted = {n: p.detach() + ei for n, p, ei in zip(names, params, e)}
        shifted = {n: t.requires_grad_() for n, t in shifted.items()}
        loss2 = ref_loss(net, shifted, x, y)
        second.append(list(torch.autograd.grad(loss2, list(shifted.values()))))
    for i, p in enumerate(params):
        p.grad = torch.stack([s[i] for s in second]).mean(0)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad()
    return losses[0]


def make_ref_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9) if name == "sgd" else torch.optim.Adam(params, lr=lr)


# ----------------------------------------------------------------------------------------------------------------
# sam_perturbation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("adaptive", [True, False])
def test_sam_perturbation_matches_reference(normalize: bool, adaptive: bool) -> None:
    torch.manual_seed(1)
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    got = sam_perturbation(params, grads, 0.3, normalize=normalize, adaptive=adaptive)
    want = ref_perturbation(params, grads, 0.3, normalize, adaptive)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if normalize and not adaptive:
        norm = torch.sqrt(sum((e**2).sum() for e in got))
        assert float(norm) == pytest.approx(0.3)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("adaptive", [True, False])
def test_sam_perturbation_batch_dims_is_per_replica(normalize: bool, adaptive: bool) -> None:
    torch.manual_seed(2)
    K, m, d = 5, 7, 3
    W, a = torch.randn(K, m, d), torch.randn(K, m)
    gW, ga = torch.randn(K, m, d), torch.randn(K, m)
    eW, ea = sam_perturbation([W, a], [gW, ga], 0.1, normalize=normalize, adaptive=adaptive, batch_dims=1)
    assert eW.shape == W.shape and ea.shape == a.shape
    for k in range(K):
        rW, ra = sam_perturbation([W[k], a[k]], [gW[k], ga[k]], 0.1, normalize=normalize, adaptive=adaptive)
        torch.testing.assert_close(eW[k], rW)
        torch.testing.assert_close(ea[k], ra)
    # per-replica radius
    rho = torch.linspace(0.1, 0.5, K)
    eW2, _ = sam_perturbation([W, a], [gW, ga], rho, normalize=normalize, adaptive=adaptive, batch_dims=1)
    torch.testing.assert_close(eW2[2], sam_perturbation([W[2], a[2]], [gW[2], ga[2]], float(rho[2]), normalize, adaptive)[0])


def test_sam_perturbation_skips_missing_and_zero_grads() -> None:
    p = [torch.ones(3), torch.ones(2)]
    out = sam_perturbation(p, [None, torch.zeros(2)], 0.5)
    assert out[0] is None
    assert torch.equal(out[1], torch.zeros(2))
    out = sam_perturbation(p, [None, torch.tensor([3.0, 4.0])], 0.5)
    torch.testing.assert_close(out[1], torch.tensor([0.3, 0.4]))
    # the input is not modified
    assert torch.equal(p[1], torch.ones(2))


# ----------------------------------------------------------------------------------------------------------------
# One-device steps against the float64 reference
# ----------------------------------------------------------------------------------------------------------------
VARIANTS = {
    "normalized": dict(normalize=True, adaptive=False),
    "unnormalized": dict(normalize=False, adaptive=False),
    "adaptive": dict(normalize=True, adaptive=True),
    "adaptive_unnormalized": dict(normalize=False, adaptive=True),
}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_device_steps_match_reference(variant: str, optimizer: str) -> None:
    rho, lr, steps = 0.2, 0.05, 3
    model = TinyModule(optimizer=optimizer, lr=lr)
    net64 = copy.deepcopy(model.net).double()
    opt64 = make_ref_optimizer(optimizer, net64.parameters(), lr)
    rec = Recorder()
    trainer = make_trainer(strategy=SAMStrategy(rho=rho, **VARIANTS[variant]), max_steps=steps, callbacks=[rec])
    trainer.fit(model)

    data = make_data()
    ref_losses = []
    for s in range(steps):
        x, y = data.tensors[0][4 * s : 4 * s + 4].double(), data.tensors[1][4 * s : 4 * s + 4].double()
        ref_losses.append(ref_sam_step(net64, opt64, [(x, y)], rho, **VARIANTS[variant]))
    for p, q in zip(model.net.parameters(), net64.parameters()):
        torch.testing.assert_close(p.detach().double(), q.detach(), atol=2e-6, rtol=1e-5)
    # the logged loss and the loop's loss are the losses at w (first pass)
    assert rec.logged_loss == pytest.approx(ref_losses, rel=1e-5)
    assert rec.output_loss == pytest.approx(ref_losses, rel=1e-5)
    assert float(trainer.callback_metrics["perturbed_flag"]) == 0.0


def test_hooks_clipping_and_logging_per_step() -> None:
    rho, lr, steps, clip = 0.1, 0.1, 4, 0.05
    model = TinyModule(optimizer="sgd", lr=lr)
    net64 = copy.deepcopy(model.net).double()
    opt64 = make_ref_optimizer("sgd", net64.parameters(), lr)
    rec = Recorder()
    trainer = make_trainer(strategy=SAMStrategy(rho=rho), max_steps=steps, callbacks=[rec], gradient_clip_val=clip)
    trainer.fit(model)

    c = model.counts
    assert c["training_step_first"] == steps and c["training_step_perturbed"] == steps
    assert c["on_before_backward"] == 2 * steps and c["on_after_backward"] == 2 * steps
    assert c["on_before_optimizer_step"] == steps
    assert c["configure_gradient_clipping"] == steps
    # clipping must have been active (else the test would not test it) and applied to the second gradient only
    assert all(n > clip for n in model.grad_norms_before_step)
    data = make_data()
    for s in range(steps):
        x, y = data.tensors[0][4 * s : 4 * s + 4].double(), data.tensors[1][4 * s : 4 * s + 4].double()
        ref_sam_step(net64, opt64, [(x, y)], rho, True, False, clip=clip)
    for p, q in zip(model.net.parameters(), net64.parameters()):
        torch.testing.assert_close(p.detach().double(), q.detach(), atol=2e-6, rtol=1e-5)
    assert float(trainer.callback_metrics["perturbed_flag"]) == 0.0
    assert not is_perturbed_pass(trainer) and not is_perturbed_pass(model) and not is_perturbed_pass()


def ref_plain_step(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """One plain step of ``opt`` with the gradient at ``w`` (float64)."""
    params = list(net.parameters())
    for p, g in zip(params, torch.autograd.grad(nn.functional.mse_loss(net(x), y), params)):
        p.grad = g
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("every", [2, 3])
def test_every_n_steps_matches_reference_loop(every: int) -> None:
    rho, lr, steps = 0.2, 0.05, 7
    model = TinyModule(optimizer="sgd", lr=lr, n=4 * steps)
    net64 = copy.deepcopy(model.net).double()
    opt64 = make_ref_optimizer("sgd", net64.parameters(), lr)
    rec = Recorder()
    trainer = make_trainer(strategy=SAMStrategy(rho=rho, every_n_steps=every), max_steps=steps, callbacks=[rec])
    trainer.fit(model)

    data = make_data(4 * steps)
    ref_losses = []
    for s in range(steps):
        x, y = data.tensors[0][4 * s : 4 * s + 4].double(), data.tensors[1][4 * s : 4 * s + 4].double()
        if s % every == 0:  # SAM on steps 0, n, 2n, ... (trainer.global_step before the step)
            ref_losses.append(ref_sam_step(net64, opt64, [(x, y)], rho, True, False))
        else:
            ref_losses.append(float(nn.functional.mse_loss(net64(x), y).detach()))
            ref_plain_step(net64, opt64, x, y)
    for p, q in zip(model.net.parameters(), net64.parameters()):
        torch.testing.assert_close(p.detach().double(), q.detach(), atol=2e-6, rtol=1e-5)
    assert model.counts["training_step_perturbed"] == len(range(0, steps, every))
    assert model.counts["training_step_first"] == steps and model.counts["on_before_optimizer_step"] == steps
    assert rec.logged_loss == pytest.approx(ref_losses, rel=1e-5)
    assert float(trainer.callback_metrics["perturbed_flag"]) == 0.0


def test_bf16_mixed_runs_close_to_fp32() -> None:
    ref = TinyModule(lr=0.05)
    make_trainer(strategy=SAMStrategy(rho=0.1), max_steps=2).fit(ref)
    model = TinyModule(lr=0.05)
    make_trainer(strategy=SAMStrategy(rho=0.1), max_steps=2, precision="bf16-mixed").fit(model)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("bn_update", ["first", "both"])
def test_batch_norm_running_stats(bn_update: str) -> None:
    model = TinyModule(batch_norm=True)
    first = copy.deepcopy(model.net)  # one training-mode forward at w on the first batch = the expected update
    x, _ = make_data().tensors
    first.train()(x[:4])
    make_trainer(strategy=SAMStrategy(rho=0.5, bn_update=bn_update), max_steps=1).fit(model)
    bn, bn_ref = model.net[1], first[1]
    if bn_update == "first":
        assert int(bn.num_batches_tracked) == 1
        torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
        torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    else:
        assert int(bn.num_batches_tracked) == 2
        assert not torch.allclose(bn.running_mean, bn_ref.running_mean)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_from_checkpoint_is_identical(tmp_path: Path, optimizer: str) -> None:
    # 8 samples, batch 4: 2 steps per epoch; stop after epoch 1, resume to epoch 2
    straight = TinyModule(optimizer=optimizer, n=8, lr=0.05)
    make_trainer(strategy=SAMStrategy(rho=0.1), max_epochs=2).fit(straight)

    first = TinyModule(optimizer=optimizer, n=8, lr=0.05)
    t1 = make_trainer(strategy=SAMStrategy(rho=0.1), max_epochs=1)
    t1.fit(first)
    ckpt = tmp_path / "sam.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = TinyModule(optimizer=optimizer, n=8, lr=0.05, seed=123)  # different init: the checkpoint must win
    t2 = make_trainer(strategy=SAMStrategy(rho=0.1), max_epochs=2)
    t2.fit(resumed, ckpt_path=ckpt)
    assert t2.global_step == 4
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_every_n_steps_resume_mid_cycle_is_identical(tmp_path: Path) -> None:
    # 12 samples, batch 4: 3 steps per epoch; with every_n_steps=2 the run stops after step 2 (a SAM step) and the
    # resumed run starts with step 3, a plain one: the schedule follows trainer.global_step, not a counter of its own
    def strategy() -> Any:
        return SAMStrategy(rho=0.1, every_n_steps=2)

    straight = TinyModule(optimizer="adam", n=12, lr=0.05)
    make_trainer(strategy=strategy(), max_epochs=2).fit(straight)
    assert straight.counts["training_step_perturbed"] == 3  # steps 0, 2, 4

    first = TinyModule(optimizer="adam", n=12, lr=0.05)
    t1 = make_trainer(strategy=strategy(), max_epochs=1)
    t1.fit(first)
    ckpt = tmp_path / "sam.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = TinyModule(optimizer="adam", n=12, lr=0.05, seed=123)
    t2 = make_trainer(strategy=strategy(), max_epochs=2)
    t2.fit(resumed, ckpt_path=ckpt)
    assert t2.global_step == 6
    assert first.counts["training_step_perturbed"] + resumed.counts["training_step_perturbed"] == 3
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------------------------------
# Registry, CLI, devices
# ----------------------------------------------------------------------------------------------------------------
def test_registry_names_resolve(lightning: ModuleType) -> None:
    single, ddp = sam_strategy_class(lightning), sam_strategy_class(lightning, ddp=True)
    t = make_trainer(package=lightning, strategy="sam")
    assert type(t.strategy) is single and isinstance(t.strategy, lightning.strategies.SingleDeviceStrategy)
    assert t.strategy.root_device == torch.device("cpu")
    t = make_trainer(package=lightning, devices=2, strategy="sam_ddp")
    assert type(t.strategy) is ddp and isinstance(t.strategy, lightning.strategies.DDPStrategy)
    assert len(t.strategy.parallel_devices) == 2
    registry = lightning.strategies.StrategyRegistry
    assert registry["sam_ddp"]["init_params"] == {"start_method": "popen"}
    assert registry["sam_ddp_spawn"]["init_params"] == {"start_method": "spawn"}
    assert type(make_trainer(package=lightning, devices=2, strategy="sam_ddp_spawn").strategy) is ddp


def test_flavours_are_importable_by_name_and_picklable(lightning: ModuleType) -> None:
    import importlib
    import pickle

    for ddp in (False, True):
        cls = sam_strategy_class(lightning, ddp=ddp)
        assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls
        assert is_sam_strategy(cls(rho=0.3))
        assert sam_settings(pickle.loads(pickle.dumps(cls(rho=0.3, adaptive=True)))) == (0.3, True, True)
    assert sam_strategy_class(compat.PACKAGE) is SAMStrategy
    assert sam_strategy_class(compat.PACKAGE, ddp=True) is SAMDDPStrategy
    assert sam_settings(lightning.strategies.SingleDeviceStrategy("cpu")) is None


def test_sam_on_more_than_one_device_is_refused(lightning: ModuleType) -> None:
    with pytest.raises(Exception, match="SAMStrategy runs on one device.*devices=1.*sam_ddp"):
        make_trainer(package=lightning, devices=2, strategy="sam")


@pytest.mark.gpu
def test_gpu_device_from_accelerator() -> None:
    def gpu_trainer(**kw: Any) -> Any:
        return make_trainer(accelerator="gpu", strategy="sam", max_steps=2, **kw)

    t = gpu_trainer()
    assert type(t.strategy) is SAMStrategy and t.strategy.root_device.type == "cuda"
    ref = TinyModule(lr=0.05)
    gpu_trainer().fit(ref)
    assert ref.counts["device_cuda"] == 4 and ref.counts["device_cpu"] == 0  # Lightning moves it back at teardown
    assert ref.counts["training_step_perturbed"] == 2
    # the same steps on the CPU
    cpu = TinyModule(lr=0.05)
    make_trainer(strategy="sam", max_steps=2).fit(cpu)
    for p, q in zip(ref.parameters(), cpu.parameters()):
        torch.testing.assert_close(p.cpu(), q, atol=1e-5, rtol=1e-4)
    bf16 = TinyModule(lr=0.05)
    gpu_trainer(precision="bf16-mixed").fit(bf16)
    for p, q in zip(bf16.parameters(), cpu.parameters()):
        torch.testing.assert_close(p.cpu(), q, atol=3e-2, rtol=3e-2)
    with pytest.raises(Exception, match=r"precision='16-mixed'.*allowed: 32-true"):
        gpu_trainer(precision="16-mixed").fit(TinyModule())


def test_lightning_cli_resolves_name_and_class_path(tmp_path: Path) -> None:
    LightningCLI = compat.LightningCLI
    common = ["--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.devices", "1"]
    cli = LightningCLI(TinyModule, run=False, args=["--trainer.strategy", "sam", *common])
    assert type(cli.trainer.strategy) is SAMStrategy

    cfg = tmp_path / "sam.yaml"
    cfg.write_text(
        "trainer:\n"
        "  strategy:\n"
        "    class_path: lightning_lnsgd.SAMStrategy\n"
        "    init_args:\n"
        "      rho: 0.2\n"
        "      normalize: false\n"
        "      adaptive: true\n"
        "      bn_update: both\n"
    )
    cli = LightningCLI(TinyModule, run=False, args=["--config", str(cfg), *common])
    s = cli.trainer.strategy
    assert type(s) is SAMStrategy and (s.rho, s.normalize, s.adaptive, s.bn_update) == (0.2, False, True, "both")

    cfg.write_text(
        "trainer:\n"
        "  strategy:\n"
        "    class_path: lightning_lnsgd.strategies.sam.SAMDDPStrategy\n"
        "    init_args:\n"
        "      rho: 0.3\n"
        "      sync_ascent: true\n"
    )
    cli = LightningCLI(TinyModule, run=False, args=["--config", str(cfg), "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.logger", "false"])
    s = cli.trainer.strategy
    assert type(s) is SAMDDPStrategy and s.rho == 0.3 and s.sync_ascent


# ----------------------------------------------------------------------------------------------------------------
# Both Lightning packages: Lightning's demo BoringModel, SAM as object / registered name / CLI class path
# ----------------------------------------------------------------------------------------------------------------
DEMO_STEPS = 3


class StepRecorder(Callback):
    """Records the weights before and the batch of every step, and the loop's loss output (either package)."""

    def __init__(self) -> None:
        self.weights: list[list[Tensor]] = []
        self.batches: list[Tensor] = []
        self.output_loss: list[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.weights.append([p.detach().clone() for p in pl_module.parameters()])
        self.batches.append(batch.detach().clone())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.output_loss.append(float(outputs["loss"]))


def demo_reference(rec: StepRecorder, rho: float, every_n_steps: int = 1) -> tuple[list[Tensor], list[float]]:
    """Float64 SAM steps of the demo BoringModel (Linear 32->2, MSE to ones, SGD lr 0.1) from the recorded start;
    with ``every_n_steps`` a plain SGD step on the steps whose index is not a multiple of it."""
    net = nn.Linear(32, 2).double()
    with torch.no_grad():
        for p, w in zip(net.parameters(), rec.weights[0]):
            p.copy_(w.double())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    losses = []
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    for step, x in enumerate(rec.batches):
        x = x.double()
        loss = nn.functional.mse_loss(net(x), torch.ones(len(x), 2, dtype=torch.float64))
        losses.append(float(loss.detach()))
        if step % every_n_steps:
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            opt.step()
            opt.zero_grad()
            continue
        e = ref_perturbation([p.detach() for p in params], list(torch.autograd.grad(loss, params)), rho, True, False)
        shifted = {n: (p.detach() + ei).requires_grad_() for n, p, ei in zip(names, params, e)}
        out = functional_call(net, shifted, (x,))
        grads = torch.autograd.grad(nn.functional.mse_loss(out, torch.ones_like(out)), list(shifted.values()))
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in params], losses


def run_demo(lightning: ModuleType, how: str, tmp_path: Path) -> tuple[Any, StepRecorder, float]:
    import importlib

    BoringModel = importlib.import_module(f"{lightning.__name__}.demos.boring_classes").BoringModel
    LightningCLI = importlib.import_module(f"{lightning.__name__}.cli").LightningCLI
    rec = StepRecorder()
    quiet = dict(QUIET, max_steps=DEMO_STEPS, limit_val_batches=0, callbacks=[rec], default_root_dir=str(tmp_path))
    lightning.seed_everything(0, verbose=False)
    if how == "cli":
        cls = sam_strategy_class(lightning)
        path = "lightning_lnsgd.SAMStrategy" if cls is SAMStrategy else f"{cls.__module__}.{cls.__qualname__}"
        args = ["fit", "--seed_everything", "0", "--trainer.strategy", path, "--trainer.strategy.rho", "0.1"]
        cli = LightningCLI(BoringModel, args=args, trainer_defaults=quiet, save_config_callback=None)
        return cli.model, rec, cli.trainer.strategy.rho
    strategy = sam_strategy_class(lightning)(rho=0.1) if how == "object" else "sam"
    model = BoringModel()
    trainer = lightning.Trainer(strategy=strategy, **quiet)
    assert is_sam_strategy(trainer.strategy)
    trainer.fit(model)
    return model, rec, trainer.strategy.rho


@pytest.mark.parametrize("how", ["object", "name", "cli"])
def test_demo_boring_model_matches_reference(lightning: ModuleType, how: str, tmp_path: Path) -> None:
    model, rec, rho = run_demo(lightning, how, tmp_path)
    assert rho == (0.05 if how == "name" else 0.1)  # the registered name gives the default radius
    assert len(rec.batches) == DEMO_STEPS
    want, losses = demo_reference(rec, rho)
    for p, q in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach().double(), q, atol=2e-6, rtol=1e-5)
    # the dict output's loss that the loop reports is the first pass's (at w), not the perturbed one
    assert rec.output_loss == pytest.approx(losses, rel=1e-5)
    if how == "cli":  # same seed, same rho: the CLI run is the object run, bit for bit
        obj, _, _ = run_demo(lightning, "object", tmp_path)
        for p, q in zip(model.parameters(), obj.parameters()):
            assert torch.equal(p, q)


def test_every_n_steps_on_demo_model_matches_reference(lightning: ModuleType, tmp_path: Path) -> None:
    import importlib

    BoringModel = importlib.import_module(f"{lightning.__name__}.demos.boring_classes").BoringModel
    rec = StepRecorder()
    quiet = dict(QUIET, max_steps=5, limit_val_batches=0, callbacks=[rec], default_root_dir=str(tmp_path))
    lightning.seed_everything(0, verbose=False)
    model = BoringModel()
    lightning.Trainer(strategy=sam_strategy_class(lightning)(rho=0.1, every_n_steps=2), **quiet).fit(model)
    want, losses = demo_reference(rec, 0.1, every_n_steps=2)
    for p, q in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach().double(), q, atol=2e-6, rtol=1e-5)
    assert rec.output_loss == pytest.approx(losses, rel=1e-5)
    # and it is not the every-step SAM run
    every_step, _ = demo_reference(rec, 0.1)
    assert not all(torch.allclose(p.detach().double(), q, atol=1e-4) for p, q in zip(model.parameters(), every_step))


# ----------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.0, -0.1])
def test_bad_rho_refused(rho: float) -> None:
    with pytest.raises(ValueError, match=rf"rho={rho}.*> 0"):
        SAMStrategy(rho=rho)
    with pytest.raises(ValueError, match=rf"rho={rho}.*> 0"):
        SAMDDPStrategy(rho=rho)


@pytest.mark.parametrize("every", [0, -2, 1.5, True, "2"])
def test_bad_every_n_steps_refused(every: Any) -> None:
    for cls in (SAMStrategy, SAMDDPStrategy):
        with pytest.raises(ValueError, match=rf"every_n_steps={every!r} is not allowed; it must be an integer >= 1"):
            cls(every_n_steps=every)


def test_bad_bn_update_refused() -> None:
    with pytest.raises(ValueError, match="bn_update='never'.*'first'.*'both'"):
        SAMStrategy(bn_update="never")  # type: ignore[arg-type]


def test_accumulate_grad_batches_refused() -> None:
    with pytest.raises(Exception, match=r"accumulate_grad_batches=2.*accumulate_grad_batches=1"):
        make_trainer(strategy=SAMStrategy(), max_steps=1, accumulate_grad_batches=2).fit(TinyModule())


def test_manual_optimization_refused() -> None:
    class Manual(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(Exception, match=r"automatic_optimization=False.*automatic_optimization=True"):
        make_trainer(strategy=SAMStrategy(), max_steps=1).fit(Manual())


def test_lbfgs_refused() -> None:
    with pytest.raises(Exception, match="LBFGS.*exactly once"):
        make_trainer(strategy=SAMStrategy(), max_steps=1).fit(TinyModule(optimizer="lbfgs"))


def test_two_optimizers_refused() -> None:
    class Two(TinyModule):
        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]

    # Lightning itself refuses several optimizers under automatic optimisation before SAM's own check
    with pytest.raises(Exception, match="multiple optimizers|optimizers were configured"):
        make_trainer(strategy=SAMStrategy(), max_steps=1).fit(Two())


def test_fp16_mixed_refused() -> None:
    MixedPrecision = compat.pl.plugins.precision.MixedPrecision
    with pytest.raises(Exception, match=r"precision='16-mixed'.*allowed: 32-true"):
        make_trainer(strategy=SAMStrategy(), max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu")]).fit(TinyModule())


def test_closure_called_twice_refused_and_weights_restored() -> None:
    class TwiceSGD(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            closure()
            return super().step(closure)

    class M(TinyModule):
        def configure_optimizers(self) -> Any:
            return TwiceSGD(self.parameters(), lr=0.1)

    model = M()
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="called the closure 2 times"):
        make_trainer(strategy=SAMStrategy(), max_steps=1).fit(model)
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w)


class FusedSAM(TinyModule):
    """A MultiStepModule stand-in: three stacked replicas, runs the SAM step itself (manual optimisation)."""

    def __init__(self, replicas: int = 3) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.replicas = replicas
        self.seen_rho: Any = None

    @property
    def runs_sam_step(self) -> bool:
        return True

    def step_layout(self) -> Optional[StepLayout]:
        return StepLayout(tuple(range(self.replicas)), 1)

    def replica_settings(self) -> None:
        return None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.seen_rho = sam_settings(self.trainer.strategy)[0]


def test_rho_list_accepted_for_module_running_sam_with_that_many_replicas() -> None:
    model = FusedSAM(replicas=3)
    # no optimizer step: the stand-in does not advance global_step, so bound the run by batches
    make_trainer(strategy=SAMStrategy(rho=[0.1, 0.2, 0.3]), max_epochs=1, limit_train_batches=2).fit(model)
    assert model.seen_rho == [0.1, 0.2, 0.3]
    assert model.counts["training_step_perturbed"] == 0  # the strategy ran no SAM pass of its own


def test_rho_list_refused_for_wrong_replicas_or_plain_module() -> None:
    with pytest.raises(Exception, match=r"rho has 2 values.*replicas=3"):
        make_trainer(strategy=SAMStrategy(rho=[0.1, 0.2]), max_steps=1).fit(FusedSAM(replicas=3))
    with pytest.raises(Exception, match=r"rho=\[0.1, 0.2\].*one float rho"):
        make_trainer(strategy=SAMStrategy(rho=[0.1, 0.2]), max_steps=1).fit(TinyModule())
    with pytest.raises(ValueError, match=r"rho=\[0.1, -1.0\].*one finite float > 0 per replica"):
        SAMStrategy(rho=[0.1, -1.0])


def test_epoch_and_step_logging_see_only_the_first_pass(lightning: ModuleType) -> None:
    """A module of either package logging on_step and on_epoch gets exactly the losses at w."""

    class Logs(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(3, 1)
            self.first_losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            if not is_perturbed_pass(self):
                self.first_losses.append(float(loss.detach()))
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            self.log_dict({"perturbed": float(is_perturbed_pass(self))}, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(make_data(8), batch_size=4)

    class Steps(Callback):
        def __init__(self) -> None:
            self.step_values: list[float] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.step_values.append(float(trainer.callback_metrics["train_loss_step"]))

    model, steps = Logs(), Steps()
    trainer = make_trainer(package=lightning, strategy=sam_strategy_class(lightning)(rho=0.5), max_epochs=1, callbacks=[steps])
    trainer.fit(model)
    assert len(model.first_losses) == 2
    assert steps.step_values == pytest.approx(model.first_losses, rel=1e-6)
    assert float(trainer.callback_metrics["train_loss_epoch"]) == pytest.approx(sum(model.first_losses) / 2, rel=1e-6)
    assert float(trainer.callback_metrics["perturbed"]) == 0.0
    assert "log" not in vars(model)  # the module's own log method is back


def test_training_step_returning_none_skips_the_step() -> None:
    class Skip(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
            super().training_step(batch, batch_idx)
            return None

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            pass  # no gradients to measure in a skipped step

    model = Skip()
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="returned `None`"):
        make_trainer(strategy=SAMStrategy(rho=0.1), max_steps=2).fit(model)
    assert model.counts["training_step_perturbed"] == 0
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w)


# ----------------------------------------------------------------------------------------------------------------
# Two gloo DDP ranks on CPU
# ----------------------------------------------------------------------------------------------------------------
DDP_RHO, DDP_LR, DDP_STEPS = 0.2, 0.1, 6
DDP_SYNC_FROM = 2  # steps before: per-rank ascent (default); from this step on: sync_ascent=True
DDP_EVERY = 2  # every_n_steps: SAM on steps 0, 2, 4 (per-rank ascent, then synchronised), plain steps 1, 3, 5


class DDPRecorder(Callback):
    """Saves, per rank, the initial weights, every batch and the weights after every step."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.record: dict[str, Any] = {"batches": [], "weights": []}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.record["initial"] = [p.detach().clone() for p in pl_module.net.parameters()]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # one process run covers both ascent modes (process start-up dominates the test's time)
        trainer.strategy.sync_ascent = trainer.global_step >= DDP_SYNC_FROM
        self.record["batches"].append([t.detach().clone() for t in batch])

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.record["weights"].append([p.detach().clone() for p in pl_module.net.parameters()])

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.record["perturbed_flag"] = float(trainer.callback_metrics["perturbed_flag"])
        torch.save(self.record, self.outdir / f"rank{trainer.global_rank}.pt")
        (self.outdir / "served").write_text(type(trainer).__module__.split(".trainer")[0])


def ddp_worker(outdir: str) -> None:
    """Two CPU ranks through the served package's own LightningCLI, SAM given by the package-level class path."""
    torch.set_num_threads(1)
    args = [
        "fit",
        "--trainer.strategy", "lightning_lnsgd.SAMDDPStrategy",
        "--trainer.strategy.rho", str(DDP_RHO),
        "--trainer.strategy.every_n_steps", str(DDP_EVERY),
        "--trainer.devices", "2",
        "--trainer.max_steps", str(DDP_STEPS),
        "--model.lr", str(DDP_LR),
        "--model.n", str(4 * 2 * DDP_STEPS),
        "--model.sync_dist", "true",
    ]
    defaults = dict(QUIET, devices=2, callbacks=[DDPRecorder(Path(outdir))], default_root_dir=outdir)
    cli = compat.LightningCLI(TinyModule, args=args, trainer_defaults=defaults, save_config_callback=None)
    strategy = cli.trainer.strategy
    assert type(strategy) is SAMDDPStrategy and strategy.rho == DDP_RHO and strategy.every_n_steps == DDP_EVERY


@pytest.mark.ddp
@pytest.mark.parametrize("package", compat.INSTALLED, ids=lambda name: name.split(".")[0])
def test_ddp_two_ranks(tmp_path: Path, package: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env[compat.ENV_VAR] = package  # the worker serves this package and uses its LightningCLI and Trainer
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "ddp-worker", str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "served").read_text() == package
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(r0["weights"]) == len(r1["weights"]) == DDP_STEPS

    # all ranks identical after every step, and they saw different data
    for w0, w1 in zip(r0["weights"], r1["weights"]):
        for a, b in zip(w0, w1):
            assert torch.equal(a, b)
    assert not torch.equal(r0["batches"][0][0], r1["batches"][0][0])
    assert r0["perturbed_flag"] == r1["perturbed_flag"] == 0.0

    # float64 reference: on SAM steps, ascent from the rank's own batch (sync_ascent=False) or from both batches
    # (True), then the mean of the two ranks' second-pass gradients; on plain steps the mean of the ranks' gradients
    net64 = TinyModule().net.double()
    with torch.no_grad():
        for p, w in zip(net64.parameters(), r0["initial"]):
            p.copy_(w.double())
    opt64 = make_ref_optimizer("sgd", net64.parameters(), DDP_LR)
    names = [n for n, _ in net64.named_parameters()]
    params = list(net64.parameters())
    for s in range(DDP_STEPS):
        b = [(r["batches"][s][0].double(), r["batches"][s][1].double()) for r in (r0, r1)]
        if s % DDP_EVERY:
            loss = sum(ref_loss(net64, dict(zip(names, params)), x, y) for x, y in b) / 2
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            opt64.step()
            opt64.zero_grad()
        elif s >= DDP_SYNC_FROM:
            # the all-reduced ascent gradient is the gradient of the mean of the two ranks' losses
            loss = sum(ref_loss(net64, dict(zip(names, params)), x, y) for x, y in b) / 2
            g = torch.autograd.grad(loss, params)
            e = ref_perturbation([p.detach() for p in params], list(g), DDP_RHO, True, False)
            shifted = {n: (p.detach() + ei).requires_grad_() for n, p, ei in zip(names, params, e)}
            grads = [torch.autograd.grad(ref_loss(net64, shifted, x, y), list(shifted.values())) for x, y in b]
            for i, p in enumerate(params):
                p.grad = (grads[0][i] + grads[1][i]) / 2
            opt64.step()
            opt64.zero_grad()
        else:
            ref_sam_step(net64, opt64, b, DDP_RHO, True, False)
        for p, q in zip(r0["weights"][s], net64.parameters()):
            torch.testing.assert_close(p.double(), q.detach(), atol=2e-6, rtol=1e-5)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "ddp-worker":
        ddp_worker(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__, *sys.argv[1:]]))
