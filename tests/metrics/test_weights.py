"""Weight-space metrics: values against NumPy (float64), snapshot semantics, DDP reduction (two gloo ranks), and on
a GPU no host sync in ``update``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_lnsgd.metrics import (
    LazyDistance,
    NeuronAlignment,
    NeuronNorms,
    RelativeDistance,
    Sparsity,
    effective_rank,
    norm_fraction,
    outgoing_norms,
    stable_rank,
)
from lightning_lnsgd.metrics import functional as F
from tests.metrics import ddp_worker
from tests.metrics.numpy_reference import np_reference

REPO = Path(__file__).resolve().parents[2]


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
    with pytest.raises(ValueError, match=r"mass=1.5 must be in"):
        Sparsity(mass=1.5)


def test_functions_match_numpy_and_broadcast_over_replicas() -> None:
    g = torch.Generator().manual_seed(3)
    W, W0, v = torch.randn(3, 12, 5, generator=g), torch.randn(3, 12, 5, generator=g), torch.randn(5, generator=g)
    got = {
        "norm_sq": F.neuron_norms_sq(W), "frobenius": F.frobenius(W), "alignment": F.alignment(W, v),
        "cosine": F.cosine(W, v), "effective_rank": F.effective_rank(W), "stable_rank": F.stable_rank(W),
        "norm_fraction": F.norm_fraction(W), "relative_distance": F.relative_distance(W, W0),
        "lazy_distance": F.lazy_distance(W, W0),
    }
    for r in range(3):  # replica r of the stack is the single matrix W[r]
        ref = np_reference(W[r].numpy(), W0[r].numpy(), v.numpy())
        for key, value in got.items():
            np.testing.assert_allclose(value[r].double().numpy(), ref[key], rtol=2e-5, atol=1e-6, err_msg=key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_ddp_two_ranks_equal_single_process(tmp_path: Path) -> None:
    """Synchronised compute on two ranks holding the same weights returns the single-process value bit for bit."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "metrics" / "ddp_worker.py"), str(_free_port()), str(tmp_path)],
        check=True, env=env, timeout=120,
    )
    inp = ddp_worker.make_inputs()
    single = {}
    for name, metric in ddp_worker.metrics(inp).items():
        metric.update(inp["W"])
        single[name] = metric.compute()
    for rank in range(ddp_worker.WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in single.items():
            if isinstance(value, dict):
                for key in value:
                    assert torch.equal(got[name][key], value[key]), (rank, name, key)
            else:
                assert torch.equal(got[name], value), (rank, name)


@pytest.mark.gpu
def test_update_does_not_sync_and_gpu_equals_cpu() -> None:
    """``update`` runs without a device-to-host sync (a training loop can call it every step); values match CPU."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(5)
    W, W0, v = torch.randn(1000, 20, generator=g), torch.randn(1000, 20, generator=g), torch.randn(20, generator=g)

    def make() -> list:
        return [NeuronNorms(), NeuronAlignment(v), Sparsity(), RelativeDistance(W0), LazyDistance(W0)]

    gpu = [m.to(dev) for m in make()]
    Wd = W.to(dev)
    for m in gpu:  # warm-up: first-call allocations
        m.update(Wd)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for m in gpu:
            m.update(Wd)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for m, c in zip(gpu, make()):
        c.update(W)
        out, ref = m.compute(), c.compute()
        pairs = [(out[k], ref[k]) for k in out] if isinstance(out, dict) else [(out, ref)]
        for a, b in pairs:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
