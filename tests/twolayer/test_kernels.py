"""Kernel backends of :func:`lightning_lnsgd.twolayer.kernels.run_steps` against a pure-torch reference loop.

Exactness targets: relative error of W and a ≤ 1e-5 after 10k steps in float32, ≤ 1e-12 in float64, for SGD and
SAM (normalised and not), one and several replicas, per-replica η. The triton kernel runs under
``TRITON_INTERPRET=1`` on CPU (small sizes, few steps) when no CUDA device is present.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # must be set before triton.jit decorates the kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lightning_lnsgd.twolayer import functional as F  # noqa: E402
from lightning_lnsgd.twolayer import kernels as K  # noqa: E402

HAS_NUMBA = K._has("numba")
HAS_TRITON = K._has("triton")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed (pip install numba)")
needs_triton = pytest.mark.skipif(
    not TRITON_OK, reason="triton not installed (pip install triton), or no CUDA and TRITON_INTERPRET unset"
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------------------
# an independent reference: functional.grads + the SAM formula, one step at a time
# ---------------------------------------------------------------------------------------------------------------------
def _eps(W, a, gW, ga, rho, normalize, rep):
    """ε = ρ g / (‖g‖ + 1e-12) per replica (or ρ g), via lightning_lnsgd.strategies.sam.sam_perturbation when it exists."""
    try:
        from lightning_lnsgd.strategies.sam import sam_perturbation
    except Exception:  # pragma: no cover
        sam_perturbation = None
    if sam_perturbation is not None:
        return sam_perturbation([W, a], [gW, ga], rho if rep else rho.reshape(()), normalize=normalize,
                                eps=1e-12, batch_dims=1 if rep else 0)  # fmt: skip
    s = rho
    if normalize:
        s = rho / ((gW.square().sum((-2, -1)) + ga.square().sum(-1)).sqrt() + 1e-12)
    return gW * s[..., None, None], ga * s[..., None]


@torch.no_grad()
def reference(W, a, x, y, lr, rho=None, normalize=True):
    W, a = W.clone(), a.clone()
    rep = W.dim() == 3
    R = W.shape[0] if rep else 1
    lr = torch.as_tensor(lr, dtype=W.dtype).reshape(-1).expand(R)
    lr = lr if rep else lr.reshape(())
    if rho is not None:
        rho = torch.as_tensor(rho, dtype=W.dtype).reshape(-1).expand(R)
    for t in range(x.shape[-3]):
        xt, yt = x[..., t, :, :], y[..., t, :]
        gW, ga, _ = F.grads(W, a, xt, yt)
        if rho is not None:
            eW, ea = _eps(W, a, gW, ga, rho, normalize, rep)
            gW, ga, _ = F.grads(W + eW, a + ea, xt, yt)
        W, a = W - lr[..., None, None] * gW, a - lr[..., None] * ga
    return W, a


def problem(R, m, d, k, B, dtype, shared=False, seed=0, device="cpu"):
    """NTK init, Gaussian inputs from n = 50 points sampled with replacement, Rademacher noise σ = 4."""
    gen = torch.Generator().manual_seed(seed)
    W0, a0 = F.ntk_init(m, d, seed=seed, dtype=torch.float64)
    W = W0.expand(R, m, d) + 0.05 * torch.randn(R, m, d, generator=gen, dtype=torch.float64)
    a = a0.expand(R, m).clone()
    n = 50
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    th = torch.randn(d, generator=gen, dtype=torch.float64)
    Y = X @ (th / th.norm())
    Rx = 1 if shared else R
    idx = torch.randint(0, n, (Rx, k, B), generator=gen)
    noise = 4.0 * (2 * torch.randint(0, 2, (Rx, k, B), generator=gen) - 1)
    x, y = X[idx], Y[idx] + noise
    lr = torch.linspace(1e-3, 2e-3, R, dtype=torch.float64)
    cast = lambda t: t.to(dtype=dtype, device=device).contiguous()  # noqa: E731
    return cast(W), cast(a), cast(x), cast(y), cast(lr)


def rel(u, v):
    return ((u.double() - v.double()).norm() / v.double().norm()).item()


def check(backend, R, m, d, k, B, dtype, rho=None, normalize=True, shared=False, device="cpu", squeeze=False):
    W, a, x, y, lr = problem(R, m, d, k, B, dtype, shared=shared, device=device)
    if squeeze:  # no replica axis
        W, a, x, y, lr = W[0].clone(), a[0].clone(), x[0].contiguous(), y[0].contiguous(), float(lr[0])
    Wr, ar = reference(W.cpu(), a.cpu(), x.cpu(), y.cpu(), lr.cpu() if torch.is_tensor(lr) else lr, rho, normalize)
    Wk, ak = W.clone(), a.clone()
    K.run_steps(Wk, ak, x, y, lr, sam_rho=rho, sam_normalize=normalize, backend=backend)
    tol = TOL[dtype]
    eW, ea = rel(Wk.cpu(), Wr), rel(ak.cpu(), ar)
    assert eW <= tol and ea <= tol, f"{backend}: relative error W {eW:.3g}, a {ea:.3g} > {tol:g}"
    assert rel(Wk.cpu(), W.cpu()) > 100 * tol, "the weights hardly moved: the test would prove nothing"


MODES = {"sgd": (None, True), "sam": (0.05, True), "sam_unnorm": (0.02, False)}


# ---------------------------------------------------------------------------------------------------------------------
# torch backend (always available) and numba
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_matches_reference(mode, dtype):
    rho, norm = MODES[mode]
    check("torch", 2, 16, 4, 300, 2, dtype, rho, norm)


@needs_numba
@pytest.mark.parametrize("R,B", [(1, 1), (3, 3)])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_numba_matches_reference_10k_steps(dtype, mode, R, B):
    rho, norm = MODES[mode]
    k = 10_000 if dtype == torch.float32 else (5_000 if mode == "sgd" else 3_000)
    check("numba", R, 64, 8, k, B, dtype, rho, norm)


@needs_numba
def test_numba_paper_size_float32():
    check("numba", 1, 1000, 20, 300, 1, torch.float32)


@needs_numba
@pytest.mark.parametrize("mode", ["sgd", "sam"])
def test_numba_shared_stream_and_no_replica_axis(mode):
    rho, norm = MODES[mode]
    check("numba", 2, 16, 5, 500, 1, torch.float64, rho, norm, shared=True)
    check("numba", 1, 16, 5, 500, 2, torch.float64, rho, norm, squeeze=True)


@needs_numba
def test_numba_non_contiguous_and_zero_gradient():
    W, a, x, y, lr = problem(2, 12, 3, 50, 1, torch.float64)
    Wt = W.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    Wr, ar = reference(W, a, x, y, lr, 0.05)
    ak = a.clone()
    K.run_steps(Wt, ak, x, y, lr, sam_rho=0.05, backend="numba")
    assert rel(Wt, Wr) <= 1e-12 and rel(ak, ar) <= 1e-12
    # all-zero weights: zero gradient, ε = 0 (the eps guard), nothing moves, no NaN
    Z, z = torch.zeros_like(W), torch.zeros_like(a)
    K.run_steps(Z, z, x, y, lr, sam_rho=0.05, backend="numba")
    assert torch.equal(Z, torch.zeros_like(W)) and torch.equal(z, torch.zeros_like(a))


def _snapshot_backends():
    out = [pytest.param("torch", "cpu")]
    out.append(pytest.param("numba", "cpu", marks=needs_numba))
    out.append(pytest.param("triton", TRITON_DEVICE, marks=needs_triton))
    return out


@pytest.mark.parametrize("backend,device", _snapshot_backends())
@pytest.mark.parametrize("mode,B", [("sgd", 1), ("sgd", 3), ("sam", 1)])
def test_snapshots_are_the_weights_after_those_steps(backend, device, mode, B):
    """run_steps(snapshots=[t…]) returns the weights a run of exactly t steps ends with, and leaves the end unchanged."""
    rho, norm = MODES[mode]
    k = 40 if backend == "triton" and device == "cpu" else 300
    W, a, x, y, lr = problem(2, 16, 5, k, B, torch.float64, device=device)
    snaps = [1, k // 3, k // 2 + 1, k]
    Wk, ak = W.clone(), a.clone()
    Ws, As = K.run_steps(Wk, ak, x, y, lr, sam_rho=rho, sam_normalize=norm, backend=backend, snapshots=snaps)
    assert Ws.shape == (len(snaps),) + W.shape and As.shape == (len(snaps),) + a.shape
    for i, t in enumerate(snaps):
        Wr, ar = reference(W.cpu(), a.cpu(), x[:, :t].cpu(), y[:, :t].cpu(), lr.cpu(), rho, norm)
        assert rel(Ws[i].cpu(), Wr) <= 1e-12 and rel(As[i].cpu(), ar) <= 1e-12, f"snapshot after {t} steps"
    Wp, ap = W.clone(), a.clone()
    K.run_steps(Wp, ap, x, y, lr, sam_rho=rho, sam_normalize=norm, backend=backend)
    assert rel(Wk.cpu(), Wp.cpu()) <= 1e-12 and rel(ak.cpu(), ap.cpu()) <= 1e-12
    assert torch.equal(Ws[-1], Wk)


@needs_numba
@pytest.mark.parametrize("mode,B,replicas", [("sgd", 1, True), ("sgd", 3, False), ("sam", 1, True)])
def test_numba_stats_equal_the_reduction_of_the_weights_at_those_steps(mode, B, replicas):
    """With ``stats_against``, the numba kernel reduces the weights at the snapshot steps itself; the sums equal
    ``weight_stats`` of the copies the torch backend takes (float64: to rounding), and the end weights are unchanged."""
    from lightning_lnsgd.twolayer.dynamics import weight_stats

    rho, norm = MODES[mode]
    W, a, x, y, lr = problem(2, 16, 5, 300, B, torch.float64)
    if not replicas:
        W, a, x, y, lr = W[0].clone(), a[0].clone(), x[0].contiguous(), y[0].contiguous(), float(lr[0])
    W0, teacher = W.clone() + 0.01, torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    snaps = [1, 100, 299, 300]
    Wn, an, Wt, at = W.clone(), a.clone(), W.clone(), a.clone()
    stats = K.run_steps(Wn, an, x, y, lr, sam_rho=rho, sam_normalize=norm, backend="numba", snapshots=snaps,
                        stats_against=(W0, teacher))
    Ws, As = K.run_steps(Wt, at, x, y, lr, sam_rho=rho, sam_normalize=norm, backend="torch", snapshots=snaps)
    want = weight_stats(Ws, As, W0, teacher)
    assert stats.shape == want.shape == (len(snaps),) + W.shape[:-2] + (5 + 5,) and stats.dtype == torch.float64
    assert rel(stats, want) <= 1e-10
    assert rel(Wn, Wt) <= 1e-12 and rel(an, at) <= 1e-12
    assert float(want[..., 0].std()) > 0  # the snapshots differ: the test compares four distinct states


@pytest.mark.parametrize("snaps", [[0], [5, 5], [7, 3], [301]])
def test_snapshots_must_increase_within_the_run(snaps):
    W, a, x, y, lr = problem(1, 4, 2, 300, 1, torch.float64)
    with pytest.raises(ValueError, match="snapshots must increase strictly within 1..k=300"):
        K.run_steps(W, a, x, y, lr, backend="torch", snapshots=snaps)


# ---------------------------------------------------------------------------------------------------------------------
# triton (CUDA, or the CPU interpreter)
# ---------------------------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_triton_matches_reference(dtype, mode):
    rho, norm = MODES[mode]
    interp = TRITON_DEVICE == "cpu"
    k = 60 if interp else 10_000
    check("triton", 2, 16, 5, k, 1, dtype, rho, norm, device=TRITON_DEVICE)


@needs_triton
def test_triton_batches_shared_stream_no_replica_axis():
    interp = TRITON_DEVICE == "cpu"
    check("triton", 2, 12, 3, 20 if interp else 2000, 3, torch.float64, 0.05, shared=True, device=TRITON_DEVICE)
    check("triton", 1, 12, 3, 20 if interp else 2000, 2, torch.float32, squeeze=True, device=TRITON_DEVICE)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="paper size is too slow for the triton interpreter")
def test_triton_paper_size_cuda():  # pragma: no cover - GPU only
    check("triton", 4, 1000, 20, 10_000, 1, torch.float32, device="cuda")


@needs_triton
def test_triton_size_limit_is_clear():
    from lightning_lnsgd.twolayer.kernels import triton_gpu

    triton_gpu.check_size(1000, 20, 1, torch.float32)  # the paper's size fits
    with pytest.raises(ValueError, match="on chip"):
        triton_gpu.check_size(1000, 40, 1, torch.float32)
    with pytest.raises(ValueError, match="on chip"):
        triton_gpu.check_size(1000, 20, 1, torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# dispatch, fallbacks and errors
# ---------------------------------------------------------------------------------------------------------------------
def test_auto_and_fallback_without_numba_or_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # find_spec -> None: "not installed"
    monkeypatch.setitem(sys.modules, "triton", None)
    assert K.available_backends() == ["torch"]
    assert K.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ImportError, match="pip install numba"):
        K.run_steps(*problem(1, 4, 2, 3, 1, torch.float32), backend="numba")
    with pytest.raises(ImportError, match="pip install triton"):
        K.run_steps(*problem(1, 4, 2, 3, 1, torch.float32), backend="triton")
    check("auto", 2, 8, 3, 50, 1, torch.float64, 0.05)


def test_auto_picks_numba_on_cpu_unless_the_input_is_wider_than_the_layer():
    cpu = torch.device("cpu")
    assert K.resolve_backend("auto", cpu) == ("numba" if HAS_NUMBA else "torch")
    assert K.resolve_backend("auto", cpu, (1000, 20)) == ("numba" if HAS_NUMBA else "torch")
    assert K.resolve_backend("auto", cpu, (50, 200)) == "torch"  # numba's cost per step grows as d²
    if HAS_NUMBA:
        assert K.resolve_backend("numba", cpu, (50, 200)) == "numba"  # asked for by name: honoured


def test_package_imports_without_numba_and_triton(monkeypatch):
    import importlib

    import lightning_lnsgd.twolayer

    monkeypatch.setitem(sys.modules, "numba", None)  # "import numba" now raises ImportError
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in [n for n in sys.modules if n.startswith("lightning_lnsgd.twolayer.kernels")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(lightning_lnsgd.twolayer, "kernels", K)  # restored after the fresh import below
    fresh = importlib.import_module("lightning_lnsgd.twolayer.kernels")
    assert fresh is not K
    W, a = torch.zeros(3, 2), torch.ones(3)
    fresh.run_steps(W, a, torch.ones(4, 1, 2), torch.ones(4, 1), 0.1)  # auto -> torch
    assert W.abs().sum() > 0


def test_errors(monkeypatch):
    W, a, x, y, lr = problem(2, 4, 3, 5, 1, torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        K.run_steps(W, a, x, y, lr, backend="cuda")
    with pytest.raises(ValueError, match="feature size"):
        K.run_steps(W, a, x[..., :2], y, lr, backend="torch")
    with pytest.raises(ValueError, match="a must have shape"):
        K.run_steps(W, a[:, :3], x, y, lr, backend="torch")
    with pytest.raises(ValueError, match="one value per replica"):
        K.run_steps(W, a, x, y, torch.ones(3), backend="torch")
    if HAS_NUMBA:
        with pytest.raises(TypeError, match="float32 and float64"):
            K.run_steps(W.half(), a.half(), x, y, lr, backend="numba")
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA tensors"):
            K.run_steps(W, a, x, y, lr, backend="triton")


@needs_numba
def test_numba_skips_only_the_statistics_it_is_told_nobody_reads():
    gen = torch.Generator().manual_seed(5)
    R, k, m, d = 3, 40, 16, 4
    W0, a0 = torch.randn(R, m, d, generator=gen) / d**0.5, torch.randn(R, m, generator=gen) / m**0.5
    x, y = torch.randn(R, k, 1, d, generator=gen), torch.randn(R, k, 1, generator=gen)
    against = (W0.clone(), torch.ones(d) / d**0.5)
    snaps = [10, 20, 40]
    needed = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    runs = []
    for mask in (None, needed):
        W, a = W0.clone(), a0.clone()
        stats = K.run_steps(W, a, x, y, 0.01, backend="numba", snapshots=snaps, stats_against=against,
                            stats_needed=mask)
        runs.append((W, a, stats))
    (W_all, a_all, full), (W_some, a_some, some) = runs
    assert bool(full.isfinite().all()) and not torch.equal(W_all, W0)
    assert torch.equal(W_all, W_some) and torch.equal(a_all, a_some)  # the weights never depend on the mask
    assert torch.equal(some[needed], full[needed]) and bool(some[~needed].isnan().all())


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=needs_numba)])
@pytest.mark.parametrize("mode", ["sgd", "sam"])
@pytest.mark.parametrize(("shared", "B"), [(False, 1), (False, 3), (True, 2)])
def test_inputs_by_index_equal_the_gathered_inputs(backend, mode, shared, B):
    """``index`` into a table of inputs: the same weights and statistics, bit for bit, as the gathered inputs."""
    gen = torch.Generator().manual_seed(3)
    R, k, m, d, n = 3, 60, 10, 4, 7
    W0, a0 = torch.randn(R, m, d, generator=gen) / d**0.5, torch.randn(R, m, generator=gen) / m**0.5
    table = torch.randn(n, d, generator=gen)
    index = torch.randint(0, n, (1 if shared else R, k, B), generator=gen)
    y = torch.randn(index.shape, generator=gen)
    rho, normalize = MODES[mode]
    against = (W0.clone(), torch.ones(d) / d**0.5)
    runs = []
    for inputs, idx in ((table[index], None), (table, index)):
        W, a = W0.clone(), a0.clone()
        stats = K.run_steps(W, a, inputs, y, 0.05, sam_rho=rho, sam_normalize=normalize, backend=backend,
                            snapshots=[20, 60], stats_against=against, index=idx)
        runs.append((W, a, stats))
    (W1, a1, s1), (W2, a2, s2) = runs
    assert not torch.equal(W1, W0)
    assert torch.equal(W1, W2) and torch.equal(a1, a2) and torch.equal(s1, s2)


def test_index_errors():
    W, a = torch.zeros(2, 3, 4), torch.zeros(2, 3)
    table, index, y = torch.zeros(5, 4), torch.zeros(2, 6, 1, dtype=torch.int64), torch.zeros(2, 6, 1)
    with pytest.raises(ValueError, match="table of inputs"):
        K.run_steps(W, a, table[None], y, 0.1, index=index, backend="torch")
    with pytest.raises(TypeError, match="index must be int64"):
        K.run_steps(W, a, table, y, 0.1, index=index.int(), backend="torch")
    with pytest.raises(ValueError, match="feature size"):
        K.run_steps(W, a, table[:, :3], y, 0.1, index=index, backend="torch")
    with pytest.raises(ValueError, match="y must have shape"):
        K.run_steps(W, a, table, y[:, :5], 0.1, index=index, backend="torch")
    if HAS_NUMBA:
        with pytest.raises(ValueError, match=r"track must be .* neuron indices in \[0, 3\)"):
            K.run_steps(W, a, table, y, 0.1, index=index, backend="numba", snapshots=[3],
                        stats_against=(W.clone(), torch.ones(4)), track=torch.tensor([0, 3]))


@needs_numba
def test_numba_escape_only_check_decides_as_the_full_reduction_and_tracks_the_least_moved_neuron():
    """``stats_needed`` 2: while the tracked neuron is inside the ball, its distance (≥ the minimum, < ``inside_sq``)
    stands in for the minimum; once it is out, everything is computed and the least-moved neuron is tracked."""
    gen = torch.Generator().manual_seed(8)
    R, k, m, d = 6, 200, 12, 5
    W0, a0 = torch.randn(R, m, d, generator=gen) / d**0.5, torch.randn(R, m, generator=gen) / m**0.5
    x, y = torch.randn(R, k, 1, d, generator=gen), 3 * torch.randn(R, k, 1, generator=gen)
    lr = torch.linspace(0.002, 0.05, R)  # from replicas that stay inside to replicas that leave early
    against = (W0.clone(), torch.ones(d) / d**0.5)
    snaps = list(range(10, k + 1, 10))
    inside_sq = 0.5 / m
    W, a = W0.clone(), a0.clone()
    full = K.run_steps(W, a, x, y, lr, backend="numba", snapshots=snaps, stats_against=against)
    Wc, ac, track = W0.clone(), a0.clone(), torch.zeros(R, dtype=torch.int64)
    needed = torch.full((len(snaps), R), 2, dtype=torch.uint8)
    cheap = K.run_steps(Wc, ac, x, y, lr, backend="numba", snapshots=snaps, stats_against=against,
                        stats_needed=needed, track=track, inside_sq=inside_sq)
    assert bool(full.isfinite().all()) and torch.equal(Wc, W) and torch.equal(ac, a)
    lazy, lazy_full = cheap[..., 3], full[..., 3]
    skipped = cheap[..., 0].isnan()
    assert bool(skipped.any()) and bool((~skipped).any())
    # ≥ the minimum, up to the rounding of one neuron's distance formed outside the loop over all of them
    assert bool((lazy[skipped] >= lazy_full[skipped] * (1 - 1e-9)).all()) and bool((lazy[skipped] < inside_sq).all())
    assert torch.equal(cheap[~skipped], full[~skipped])
    assert torch.equal(lazy < inside_sq, lazy_full < inside_sq)  # the decision of every check
    # the tracked neuron is the least-moved one of each replica's last full reduction
    moved = torch.stack(
        [(Ws - W0).square().sum(-1) for Ws in _weights_at(W0, a0, x, y, lr, snaps)]
    )  # (S, R, m)
    for r in range(R):
        done = torch.nonzero(~skipped[:, r]).flatten()
        if len(done):
            assert int(track[r]) == int(moved[done[-1], r].argmin())


def _weights_at(W0, a0, x, y, lr, snaps):
    """W after each of ``snaps`` steps, by the numba kernel's snapshot copies."""
    Ws, _ = K.run_steps(W0.clone(), a0.clone(), x, y, lr, backend="numba", snapshots=snaps)
    return list(Ws)
