"""Metrics (against NumPy, float64), their DDP reduction (two gloo ranks) and the callbacks on a real fit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_lnsgd.callbacks import DynamicsMonitor, HParamsSummary, PruningCurve, resolve_weights
from lightning_lnsgd.metrics import (
    HalfMSE,
    LazyDistance,
    MeanLoss,
    NeuronAlignment,
    NeuronNorms,
    RelativeDistance,
    Sparsity,
    effective_rank,
    norm_fraction,
    outgoing_norms,
    stable_rank,
)

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------------------------
# NumPy references (float64, written independently of the torch code)
# ------------------------------------------------------------------------------------------------------------------
def np_reference(W: np.ndarray, W0: np.ndarray, v: np.ndarray, mass: float = 0.9) -> dict[str, float | np.ndarray]:
    W, W0, v = (np.asarray(x, dtype=np.float64) for x in (W, W0, v))
    m = W.shape[0]
    norms = np.array([np.dot(w, w) for w in W])
    dots = np.abs(W @ v)
    cos = dots / (np.linalg.norm(W, axis=1) * np.linalg.norm(v))
    s = np.linalg.svd(W, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    order = np.sort(norms)[::-1]
    k = 1
    while order[:k].sum() < mass * norms.sum():
        k += 1
    return {
        "norm_sq": norms,
        "norm_sq_mean": norms.mean(),
        "frobenius": np.sqrt((W**2).sum()),
        "alignment": dots,
        "alignment_mean": dots.mean(),
        "cosine": cos,
        "cosine_mean": cos.mean(),
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "stable_rank": float((s**2).sum() / s.max() ** 2),
        "norm_fraction": k / m,
        "relative_distance": float(np.linalg.norm(W - W0) / np.linalg.norm(W0)),
        "lazy_distance": float(np.sqrt(m) * np.linalg.norm(W - W0, axis=1).min()),
    }


def metric_values(W: torch.Tensor, W0: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for metric in (NeuronNorms(), NeuronAlignment(v), Sparsity(), RelativeDistance(W0), LazyDistance(W0)):
        metric.update(W)
        value = metric.compute()
        out.update(value if isinstance(value, dict) else {type(metric).__name__: value})
    out["relative_distance"] = out.pop("RelativeDistance")
    out["lazy_distance"] = out.pop("LazyDistance")
    return out


@pytest.mark.parametrize("shape", [(40, 7), (5, 12)])
def test_weight_metrics_match_numpy(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    W, W0, v = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g), torch.randn(shape[1], generator=g)
    ref = np_reference(W.numpy(), W0.numpy(), v.numpy())
    got = metric_values(W, W0, v)
    assert set(got) == set(ref)
    for key, expected in ref.items():
        np.testing.assert_allclose(got[key].double().numpy(), expected, rtol=2e-5, atol=1e-6, err_msg=key)


def test_sparsity_of_structured_matrices() -> None:
    u, w = torch.randn(30), torch.randn(6)
    rank_one = torch.outer(u, w)
    s = Sparsity()
    s.update(rank_one)
    values = s.compute()
    # Gram route in float64: a rank-one float32 matrix gives effective rank 1 to ~1e-6, not ~1.05
    assert abs(float(values["effective_rank"]) - 1) < 1e-4 and abs(float(values["stable_rank"]) - 1) < 1e-4
    eye = torch.eye(8)
    s.update(eye)
    assert torch.allclose(s.compute()["effective_rank"], torch.tensor(8.0)) and float(s.compute()["stable_rank"]) == 8
    # 8 equal neurons: 90% of the mass needs ⌈7.2⌉ = 8 of them; one dominant neuron carries it alone
    assert float(norm_fraction(eye)) == 1.0
    spiky = torch.cat([10 * torch.ones(1, 4), 0.01 * torch.ones(99, 4)])
    assert float(norm_fraction(spiky)) == pytest.approx(0.01)
    assert float(effective_rank(torch.zeros(3, 3))) == 0 and float(stable_rank(torch.zeros(3, 3))) == 0
    assert float(norm_fraction(torch.zeros(3, 3))) == 0
    # plain functions broadcast over leading axes (stacked replicas)
    stack = torch.randn(3, 9, 4)
    assert effective_rank(stack).shape == (3,) and norm_fraction(stack).shape == (3,)


def test_conv_kernels_and_second_layer() -> None:
    conv = torch.randn(6, 3, 3, 3)
    norms = NeuronNorms()
    norms.update(conv)
    np.testing.assert_allclose(norms.compute()["norm_sq"].numpy(), (conv.reshape(6, -1) ** 2).sum(1).numpy(), rtol=1e-6)
    a = torch.tensor([-2.0, 0.5, 3.0])
    assert torch.equal(outgoing_norms(a), a.abs())
    A = torch.randn(4, 3)
    np.testing.assert_allclose(outgoing_norms(A).numpy(), np.linalg.norm(A.numpy(), axis=0), rtol=1e-6)


def test_snapshot_semantics_forward_and_validation() -> None:
    W1, W2 = torch.randn(10, 4), torch.randn(10, 4)
    for metric in (NeuronNorms(), LazyDistance(torch.zeros(10, 4)), Sparsity()):
        batch_value = metric(W1)  # forward: value at W1, state = snapshot of W1
        metric(W2)
        final = metric.compute()
        fresh = type(metric)(**({"initial": torch.zeros(10, 4)} if isinstance(metric, LazyDistance) else {}))
        fresh.update(W2)
        expected = fresh.compute()
        if isinstance(final, dict):
            assert all(torch.equal(final[k], expected[k]) for k in final)
            assert not torch.equal(batch_value["norm_sq_mean" if "norm_sq_mean" in batch_value else "effective_rank"], expected["norm_sq_mean" if "norm_sq_mean" in expected else "effective_rank"])
        else:
            assert torch.equal(final, expected)
    with pytest.raises(ValueError, match="reference vector has 3 entries"):
        NeuronAlignment([1.0, 2.0, 3.0]).update(W1)
    with pytest.raises(ValueError, match="≥ 2 axes"):
        NeuronNorms().update(torch.ones(3))
    with pytest.raises(ValueError, match="`mass` must be in"):
        Sparsity(mass=1.5)


def test_mean_loss_is_mean_over_samples() -> None:
    preds, target = torch.randn(13), torch.randn(13)
    metric = HalfMSE()
    metric.update(preds[:3], target[:3])
    metric.update(preds[3:], target[3:])
    expected = 0.5 * np.mean((preds.double().numpy() - target.double().numpy()) ** 2)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-6)
    ml = MeanLoss()
    assert ml(torch.tensor([1.0, 3.0])) == 2.0 and float(ml(torch.tensor([5.0]))) == 5.0
    assert float(ml.compute()) == 3.0  # forward accumulates: (1 + 3 + 5) / 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_equal_single_process(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from tests.metrics import _metrics_ddp as helper
    finally:
        sys.path.pop(0)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "metrics" / "_metrics_ddp.py"), str(_free_port()), str(tmp_path)],
        check=True, env=env, timeout=120,
    )
    inp = helper.make_inputs()
    single = {}
    for name, metric in helper.metrics(inp).items():
        if name == "loss":
            metric.update(inp["preds"], inp["target"])  # the union of both ranks' shards
        else:
            metric.update(inp["W"])
        single[name] = metric.compute()
    for rank in range(helper.WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in single.items():
            if name == "loss":  # sum-and-count: exact up to summation order
                assert torch.allclose(got[name], value, rtol=1e-12, atol=0), (rank, name)
            elif isinstance(value, dict):  # replicated weights: bit for bit
                for key in value:
                    assert torch.equal(got[name][key], value[key]), (rank, name, key)
            else:
                assert torch.equal(got[name], value), (rank, name)


# ------------------------------------------------------------------------------------------------------------------
# Callbacks on a real fit
# ------------------------------------------------------------------------------------------------------------------
class Backbone(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))


class UserModel(pl.LightningModule):
    """A user-style classifier: ``backbone.fc1``, ``backbone.fc2``, ``head``; logs a torchmetrics accuracy."""

    def __init__(self, d: int = 10, h: int = 32, lr: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = Backbone(d, h)
        self.head = nn.Linear(h, 2)
        from torchmetrics.classification import BinaryAccuracy

        self.val_acc = BinaryAccuracy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits.argmax(-1), y)
        self.log("val/acc", self.val_acc)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class BlobData(pl.LightningDataModule):
    """Labels y = [⟨x, teacher⟩ > 0]; ``teacher`` is the reference vector of the monitor."""

    def __init__(self, d: int = 10, n: int = 512) -> None:
        super().__init__()
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(1)
        self.teacher = torch.randn(d, generator=g)
        self.x = torch.randn(n, d, generator=g)
        self.y = (self.x @ self.teacher > 0).long()
        self.xv = torch.randn(200, d, generator=g)
        self.yv = (self.xv @ self.teacher > 0).long()

    def train_dataloader(self):
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.xv, self.yv), batch_size=64)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    """One short fit with all three callbacks; returns what the tests inspect."""
    from pytorch_lightning.loggers import TensorBoardLogger

    root = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0)
    model, data = UserModel(), BlobData()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = DynamicsMonitor(
        layers=["backbone.fc*"], reference="teacher", second_layer="head", every_n_steps=10, scatter_steps=[0, 20]
    )
    pruning = PruningCurve(kept_fractions=[1.0, 0.5, 0.1, 0.0], monitor="val/acc")
    hp = HParamsSummary(metrics=["val/acc", "dynamics/backbone.fc1/cosine_mean", "pruning/val/acc@0.1"])
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=60, log_every_n_steps=10, logger=TensorBoardLogger(str(root), name="run"),
        callbacks=[monitor, pruning, hp], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    trainer.loggers[0].experiment.flush()
    return {"trainer": trainer, "model": model, "data": data, "initial": initial, "log_dir": trainer.log_dir,
            "monitor": monitor, "pruning": pruning}


def _events(log_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_resolve_weights_patterns() -> None:
    model = UserModel()
    assert list(resolve_weights(model, ["backbone.fc*"])) == ["backbone.fc1", "backbone.fc2"]
    assert list(resolve_weights(model, ["head.weight", "backbone.fc1"])) == ["head.weight", "backbone.fc1"]
    with pytest.raises(ValueError, match="'nope' matches no layer"):
        resolve_weights(model, ["nope"])


def test_monitor_logs_correct_values(fitted) -> None:
    acc = _events(fitted["log_dir"])
    scalars = acc.Tags()["scalars"]
    model, data = fitted["model"], fitted["data"]
    for layer, module in (("backbone.fc1", model.backbone.fc1), ("backbone.fc2", model.backbone.fc2)):
        events = acc.Scalars(f"dynamics/{layer}/norm_sq_mean")
        assert [e.step for e in events] == [0, 10, 20, 30, 40, 50, 60]
        W, W0 = module.weight.detach(), fitted["initial"][f"{layer}.weight"]
        v = data.teacher if layer == "backbone.fc1" else torch.ones(W.shape[1])
        ref = np_reference(W.numpy(), W0.numpy(), v.numpy())
        keys = ["norm_sq_mean", "frobenius", "effective_rank", "stable_rank", "norm_fraction", "relative_distance", "lazy_distance"]
        if layer == "backbone.fc1":
            keys += ["alignment_mean", "cosine_mean"]
        else:  # input dimension 32 ≠ len(teacher) = 10: no alignment for fc2
            assert f"dynamics/{layer}/cosine_mean" not in scalars
        for key in keys:
            last = acc.Scalars(f"dynamics/{layer}/{key}")[-1]
            assert last.step == 60
            assert last.value == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
        first = acc.Scalars(f"dynamics/{layer}/relative_distance")[0]
        assert first.step == 0 and first.value == 0.0
    head_last = acc.Scalars("dynamics/head/outgoing_norm_mean")[-1]
    assert head_last.value == pytest.approx(float(model.head.weight.detach().norm(dim=0).mean()), rel=1e-5)
    assert [e.step for e in acc.Scalars("dynamics/head/oscillation")] == [10, 20, 30, 40, 50, 60]
    hists = acc.Tags()["histograms"]
    for tag in ("dynamics/backbone.fc1/norm_sq", "dynamics/backbone.fc1/cosine", "dynamics/head/outgoing_norm"):
        assert tag in hists
    images = acc.Tags()["images"]
    assert "dynamics/backbone.fc1/scatter" in images and "dynamics/backbone.fc2/scatter" not in images
    assert [e.step for e in acc.Images("dynamics/backbone.fc1/scatter")] == [0, 20]
    state = fitted["monitor"].state_dict()
    assert torch.equal(state["initial"]["backbone.fc1"], fitted["initial"]["backbone.fc1.weight"])


def test_pruning_curve_restores_weights_and_is_sensible(fitted) -> None:
    trainer, model, pruning = fitted["trainer"], fitted["model"], fitted["pruning"]
    curve = pruning.curve
    assert list(curve) == [1.0, 0.5, 0.1, 0.0]
    # α = 1 is the trained model; the easy task is learnt; α = 0 (all weights zero) predicts one class
    with torch.no_grad():
        direct = float((model(fitted["data"].xv).argmax(-1) == fitted["data"].yv).float().mean())
    assert curve[1.0] == pytest.approx(direct, abs=1e-6) and curve[1.0] > 0.85
    assert curve[0.0] < 0.75 and curve[0.0] <= curve[0.1] + 0.05
    acc = _events(fitted["log_dir"])
    assert acc.Scalars("pruning/val/acc@0.5")[-1].value == pytest.approx(curve[0.5])
    assert "pruning/val/acc" in acc.Tags()["images"]
    # bit-for-bit restore, also of the logged torchmetrics state; a tensor-valued key works too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    loss_curve = PruningCurve(kept_fractions=[0.3, 1.0], monitor="val/loss").evaluate(trainer, model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loss_curve[0.3] > loss_curve[1.0] > 0
    assert model.training and model.backbone.fc1.training  # mode restored, not forced to eval
    with pytest.raises(ValueError, match="`monitor`='val/nope' was not logged"):
        PruningCurve(monitor="val/nope").evaluate(trainer, model)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_hparams_tab_shows_final_metrics(fitted) -> None:
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    logdir = str(Path(fitted["log_dir"]).parent)
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    tb = base_plugin.TBContext(logdir=logdir, multiplexer=mux, data_provider=data_provider.MultiplexerDataProvider(mux, logdir))
    statuses = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING]
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=10, allowed_statuses=statuses)
    response = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request).run()
    assert len(response.session_groups) == 1
    group = response.session_groups[0]
    assert group.sessions[0].status == api_pb2.STATUS_SUCCESS
    assert group.hparams["model/lr"].number_value == pytest.approx(0.2)
    assert group.hparams["data/n"].number_value == 512
    values = {mv.name.tag: mv.value for mv in group.metric_values}
    assert set(values) == {"val/acc", "dynamics/backbone.fc1/cosine_mean", "pruning/val/acc@0.1"}
    acc = _events(fitted["log_dir"])
    assert values["dynamics/backbone.fc1/cosine_mean"] == pytest.approx(acc.Scalars("dynamics/backbone.fc1/cosine_mean")[-1].value)
    assert values["pruning/val/acc@0.1"] == pytest.approx(fitted["pruning"].curve[0.1])
