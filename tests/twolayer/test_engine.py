"""The fused path: k SGD steps per Lightning step, stacked replicas, kernels, SAM — same trajectories."""


import pytest
import torch

from lightning_lnsgd import LabelNoise, SparseTeacherDataModule, TwoLayerLinear
from lightning_lnsgd.compat import MisconfigurationException, TensorBoardLogger
from lightning_lnsgd.strategies.sam import SAMStrategy
from lightning_lnsgd.twolayer.kernels import available_backends
from tests.conftest import make_trainer, read_replicas, read_scalars


def fit(steps=120, noise=1.5, strategy="auto", logger=False, every=50, root=None, ckpt=None, dm_seed=3, batch_size=2,
        accelerator="cpu", **model_kw):
    model_kw.setdefault("seed", 2)
    model_kw.setdefault("lr", 0.01)
    model = TwoLayerLinear(dim=6, width=12, **model_kw)
    dm = SparseTeacherDataModule(dim=6, n_train=20, batch_size=batch_size, seed=dm_seed, steps_per_epoch=37)
    trainer = make_trainer(
        accelerator=accelerator, devices=1, max_steps=steps, logger=logger, log_every_n_steps=every, strategy=strategy,
        callbacks=[LabelNoise(sigma=noise, seed=11)] if noise else [], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(model, dm, ckpt_path=ckpt)
    return model, trainer


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def test_fused_k1_equals_generic_autograd_path():
    generic, _ = fit(backend="autograd")
    fused, trainer = fit(backend="torch")
    assert fused.fused and not generic.fused and trainer.global_step == 120
    assert close(fused.W, generic.W) and close(fused.a, generic.a)


@pytest.mark.parametrize("k", [4, 7, 500])
def test_k_steps_per_batch_equal_k1_and_count_sgd_steps(k):
    one, _ = fit(backend="torch", steps_per_batch=1)
    many, trainer = fit(backend="torch", steps_per_batch=k)
    assert trainer.global_step == 120  # the last batch runs only what is left before max_steps
    assert torch.equal(many.W, one.W) and torch.equal(many.a, one.a)


def test_replica_equals_single_run_with_its_seed_and_grid_values():
    stacked, _ = fit(backend="torch", replicas=3, replica_seeds=[4, 5, 6], lr=[0.01, 0.02, 0.005],
                     init_scale=[1.0, 0.5, 2.0], steps_per_batch=9)
    for r, (seed, lr, scale) in enumerate([(4, 0.01, 1.0), (5, 0.02, 0.5), (6, 0.005, 2.0)]):
        single, _ = fit(backend="torch", replicas=1, replica_seeds=[seed], lr=[lr], init_scale=[scale])
        assert close(stacked.W[r], single.W[0]) and close(stacked.a[r], single.a[0]), r
    assert not close(stacked.W[0], stacked.W[1])


@pytest.mark.skipif("numba" not in available_backends(), reason="numba not installed")
def test_numba_backend_matches_torch_backend():
    ref, _ = fit(backend="torch", replicas=2, steps_per_batch=10)
    fast, _ = fit(backend="numba", replicas=2, steps_per_batch=10)
    assert close(fast.W, ref.W) and close(fast.a, ref.a)


@pytest.mark.parametrize("backend,batch_size", [
    ("torch", 2),
    pytest.param("numba", 1, marks=pytest.mark.skipif("numba" not in available_backends(), reason="no numba")),
    pytest.param("numba", 2, marks=pytest.mark.skipif("numba" not in available_backends(), reason="no numba")),
])
def test_fused_sam_equals_the_sam_strategy_on_the_generic_path(backend, batch_size):
    generic, _ = fit(backend="autograd", strategy=SAMStrategy(rho=0.05), batch_size=batch_size)
    fused, _ = fit(backend=backend, steps_per_batch=6, strategy=SAMStrategy(rho=0.05), batch_size=batch_size)
    plain, _ = fit(backend=backend, steps_per_batch=6, batch_size=batch_size)
    assert close(fused.W, generic.W) and close(fused.a, generic.a)
    assert not close(fused.W, plain.W, tol=1e-7)


def test_fused_resume_is_bitwise(tmp_path):
    ref, _ = fit(steps=100, backend="torch", steps_per_batch=8)
    _, first = fit(steps=40, backend="torch", steps_per_batch=8)
    first.save_checkpoint(tmp_path / "c.ckpt")
    resumed, trainer = fit(steps=100, backend="torch", steps_per_batch=8, ckpt=tmp_path / "c.ckpt")
    assert trainer.global_step == 100
    assert torch.equal(resumed.W, ref.W) and torch.equal(resumed.a, ref.a)


def _scalars(root):
    """``{tag: {step: value}}`` of the run under ``root``."""
    return {tag: dict(points) for tag, points in read_scalars(root).items()}


def test_fused_logging_grid_and_per_replica_tags(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="", version="")
    model, _ = fit(steps=130, noise=4.0, lr=0.05, backend="torch", replicas=2, steps_per_batch=40, logger=logger,
                   every=20, root=tmp_path)
    scalars = _scalars(tmp_path)
    # Logged on the SGD-step grid even though 40-step batches straddle it (last batch: 10 steps).
    assert set(scalars["dynamics/norm_sq_mean"]) == {0, 20, 40, 60, 80, 100, 120}
    final = model.dynamics()
    # With TensorBoard each replica is its own run (tests/twolayer/test_replica_runs.py), under the plain tags.
    replicas = {k: {tag: dict(points) for tag, points in run.items()} for k, run in read_replicas(tmp_path).items()}
    both = replicas[0]["dynamics/norm_sq_mean"][120], replicas[1]["dynamics/norm_sq_mean"][120]
    assert abs(scalars["dynamics/norm_sq_mean"][120] - sum(both) / 2) < 1e-6
    assert replicas[1]["replica/lr"][0] == pytest.approx(0.05)
    for r in range(2):
        escape = int(model.escape_step[r])
        assert escape > 0 and escape % 20 == 0
        assert replicas[r]["phase/escape_step"] == {escape: float(escape)}
    assert final["dynamics/norm_sq_mean"].shape == (2,)


@pytest.mark.parametrize("backend,every,steps", [
    ("torch", 30, 130),
    pytest.param("numba", 30, 130, marks=pytest.mark.skipif("numba" not in available_backends(), reason="no numba")),
    ("torch", 150, 460),  # escape checks every 100 steps, logging every 150: the kernel snapshots the union
])
def test_fused_path_logs_what_the_generic_path_logs(tmp_path, backend, every, steps):
    """Same tags, steps and values (escape step included) whether one or 40 SGD steps run per Lightning step."""
    runs = {}
    k = 40 if every < 100 else steps  # one batch of 460 steps: snapshots at 100, 150, 200, 300, 400, 450
    for name, kw in (("generic", dict(backend="autograd")), ("fused", dict(backend=backend, steps_per_batch=k))):
        root = tmp_path / name
        logger = TensorBoardLogger(root, name="", version="")
        model, _ = fit(steps=steps, noise=4.0, lr=0.05, logger=logger, every=every,
                       root=root, **kw)
        runs[name] = (model, _scalars(root))
    (generic, g), (fused, f) = runs["generic"], runs["fused"]
    assert int(generic.escape_step) > 0 and int(fused.escape_step) == int(generic.escape_step)
    assert set(f) == set(g) and "phase/escape_step" in f
    for tag in g:
        assert set(f[tag]) == set(g[tag]), tag
        for step, value in g[tag].items():
            assert f[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-6), (tag, step)


def test_fused_path_configuration_errors():
    with pytest.raises(ValueError, match="backend='autograd' runs one unstacked network"):
        TwoLayerLinear(dim=3, replicas=2, backend="autograd")
    with pytest.raises(ValueError, match="`lr` is a list of 2 values"):
        TwoLayerLinear(dim=3, lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="`replica_seeds` has 1 entries but replicas=2"):
        TwoLayerLinear(dim=3, replicas=2, replica_seeds=[1])
    with pytest.raises(ValueError, match="adaptive SAM"):
        fit(backend="torch", strategy=SAMStrategy(rho=0.05, adaptive=True))


def test_per_replica_rho_grid_equals_single_runs():
    stacked, _ = fit(backend="torch", replicas=2, replica_seeds=[3, 3], steps_per_batch=5,
                     strategy=SAMStrategy(rho=[0.02, 0.1]))
    for r, rho in enumerate([0.02, 0.1]):
        single, _ = fit(backend="torch", replicas=1, replica_seeds=[3], strategy=SAMStrategy(rho=rho))
        assert close(stacked.W[r], single.W[0]) and close(stacked.a[r], single.a[0])
    with pytest.raises(MisconfigurationException, match="rho has 2 values .* replicas=3"):
        fit(backend="torch", replicas=3, strategy=SAMStrategy(rho=[0.02, 0.1]))
    with pytest.raises(Exception, match="one ρ per replica"):
        fit(backend="autograd", strategy=SAMStrategy(rho=[0.02, 0.1]))


def test_per_replica_sigma_grid_equals_single_runs_and_escape_report(tmp_path):
    from lightning_lnsgd.report import escape_points, expand_replicas, load_run
    from lightning_lnsgd.report import main as report

    def run(replicas, seeds, sigma, root=None):
        model = TwoLayerLinear(dim=6, width=12, lr=0.05, replicas=replicas, replica_seeds=seeds,
                               steps_per_batch=25, backend="torch")
        dm = SparseTeacherDataModule(dim=6, n_train=20, seed=3)
        logger = TensorBoardLogger(root, name="", version="") if root else False
        make_trainer(accelerator="cpu", max_steps=300, logger=logger, log_every_n_steps=50,
                   callbacks=[LabelNoise(sigma=sigma, seed=1)], enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                   num_sanity_val_steps=0).fit(model, dm)
        return model

    stacked = run(2, [7, 7], [0.5, 3.0], root=tmp_path)
    for r, sigma in enumerate([0.5, 3.0]):
        single = run(1, [7], sigma)
        assert close(stacked.W[r], single.W[0]) and close(stacked.a[r], single.a[0])
    scalars, replicas = load_run(tmp_path)  # the replicas' own runs, r0-sigma0.5-seed7 and r1-sigma3-seed7
    points = escape_points(replicas, "sigma")
    assert [p[0] for p in points] == [3.0] or [p[0] for p in points] == [0.5, 3.0]
    assert points[-1][1] == float(stacked.escape_step[1])
    out = report([str(tmp_path), "--escape-vs", "sigma", "--out", str(tmp_path / "e.png")])
    assert out.stat().st_size > 5000
    # The phase figure draws one line per replica, labelled by what differs between replicas.
    labels = [label for label, _ in expand_replicas(scalars, "run", replicas)]
    assert labels == ["run r0 (sigma=0.5)", "run r1 (sigma=3)"]
    assert report([str(tmp_path), "--out", str(tmp_path / "p.png")]).stat().st_size > 5000
    with pytest.raises(ValueError, match="sigma` lists 2 values"):
        run(3, [1, 2, 3], [0.5, 3.0])


def test_triton_backend_through_fit_matches_torch_backend():
    """The GPU kernel inside a real fit, on the CPU through Triton's interpreter (tiny sizes)."""
    import os

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET unset")
    acc = "gpu" if torch.cuda.is_available() else "cpu"
    ref, _ = fit(steps=30, backend="torch", replicas=2, steps_per_batch=10, accelerator=acc)
    tri, _ = fit(steps=30, backend="triton", replicas=2, steps_per_batch=10, accelerator=acc)
    assert close(tri.W.cpu(), ref.W.cpu()) and close(tri.a.cpu(), ref.a.cpu())


def test_auto_backend_follows_the_layer_shape():
    """auto: numba when width ≥ dim (its cost per step grows as dim²), the torch loop over W otherwise."""
    wide, _ = fit(steps=20, steps_per_batch=10)  # width 12, dim 6
    narrow = TwoLayerLinear(dim=6, width=4, steps_per_batch=10, seed=2, lr=0.01)
    dm = SparseTeacherDataModule(dim=6, n_train=20, batch_size=2, seed=3)
    make_trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0).fit(narrow, dm)
    assert wide._engine.backend == ("numba" if "numba" in available_backends() else "torch")
    assert narrow._engine.backend == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("replicas", [None, 8])
def test_cuda_fit_never_syncs_in_the_engine_and_ends_at_the_cpu_weights(monkeypatch, replicas):
    """On CUDA the fused engine's steps run without a device-to-host sync (after the first, compiling call), and
    5000 steps at paper size end within 1e-5 (relative) of the CPU fit, on every GPU backend."""
    from lightning_lnsgd.twolayer.engine import FusedEngine

    def paper_fit(accelerator, backend):
        model = TwoLayerLinear(dim=20, width=1000, lr=1e-3, seed=0, steps_per_batch=1000, backend=backend,
                               replicas=replicas)
        data = SparseTeacherDataModule(dim=20, n_train=200, n_test=500, seed=0, steps_per_epoch=5)
        make_trainer(accelerator=accelerator, max_steps=5000, log_every_n_steps=500, limit_val_batches=0,
                     callbacks=[LabelNoise(sigma=4.0, seed=0)]).fit(model, data)
        return model

    reference = paper_fit("cpu", "torch")
    unchecked = FusedEngine.run
    for backend in [b for b in ("torch", "triton") if b in available_backends()]:
        calls = []

        def strict_run(self, x, y):
            calls.append(1)
            if len(calls) == 1:
                return unchecked(self, x, y)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return unchecked(self, x, y)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        monkeypatch.setattr(FusedEngine, "run", strict_run)
        gpu = paper_fit("gpu", backend)
        monkeypatch.setattr(FusedEngine, "run", unchecked)
        assert len(calls) == 5
        error = (gpu.W.cpu().double() - reference.W.double()).norm() / reference.W.double().norm()
        assert error <= 1e-5, (backend, float(error))


# ---------------------------------------------------------------------------------------------------------------------
# start-up: what the fused path says, and what it keeps Lightning from misreporting
# ---------------------------------------------------------------------------------------------------------------------
def test_fused_fit_start_says_what_runs_without_misleading_warnings(monkeypatch, tmp_path):
    import warnings

    from lightning_lnsgd.twolayer import engine

    lines: list[str] = []
    monkeypatch.setattr(engine, "rank_zero_info", lines.append)

    def warned() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(backend="torch", replicas=2, steps_per_batch=10, every=500, logger=TensorBoardLogger(tmp_path))
        return [str(w.message) for w in caught if "configure_optimizers" in str(w.message)
                or "logging interval" in str(w.message)]

    assert warned() == []
    # The filters end with the fit: the same warnings still reach another module's fit in this process.
    assert not any(getattr(f[1], "pattern", None) in TwoLayerLinear.FUSED_PATH_MISREADINGS for f in warnings.filters)
    said = " ".join(lines)
    assert "the fused path on the torch backend (cpu), 2 stacked replicas, SGD in closed form" in said
    assert "up to 10 SGD steps per Lightning step" in said
    monkeypatch.setattr(TwoLayerLinear, "FUSED_PATH_MISREADINGS", ())
    assert len(warned()) == 2  # what the filters hold back: both warnings, as Lightning words them


def test_a_slow_kernel_preparation_is_announced_while_it_runs(monkeypatch):
    import time

    from lightning_lnsgd.twolayer import engine, kernels

    said: list[str] = []
    monkeypatch.setattr(engine, "rank_zero_info", said.append)
    monkeypatch.setattr(engine, "COMPILE_NOTICE_AFTER", 0.05)
    seen_during: list[str] = []

    def slow_prepare(backend, dtype, sam):
        time.sleep(0.3)
        seen_during.extend(said)

    monkeypatch.setattr(kernels, "prepare", slow_prepare)
    engine.prepare_kernel("numba", torch.float32, False)
    assert any("compiling the numba kernel" in m for m in seen_during), seen_during  # said before it was done
    assert any("the numba kernel was ready after" in m for m in said)

    said.clear()
    monkeypatch.setattr(kernels, "prepare", lambda *args: None)
    engine.prepare_kernel("numba", torch.float32, False)
    assert not said  # a cached kernel loads without a word


@pytest.mark.skipif("numba" not in available_backends(), reason="numba not installed")
def test_numba_replicas_on_threads_equal_one_thread(monkeypatch):
    """Blocks of replicas run on threads; each replica's result does not depend on how many threads share them."""
    from lightning_lnsgd.twolayer.kernels import numba_cpu, run_steps

    gen = torch.Generator().manual_seed(0)
    W0, a0 = torch.randn(5, 30, 4, generator=gen) / 2, torch.randn(5, 30, generator=gen) / 5
    x, y = torch.randn(5, 200, 2, 4, generator=gen), torch.randn(5, 200, 2, generator=gen)
    results = []
    for threads in (1, 2, 5):
        monkeypatch.setattr(numba_cpu, "get_num_threads", lambda n=threads: n)
        W, a = W0.clone(), a0.clone()
        run_steps(W, a, x, y, torch.tensor([1e-2, 2e-2, 1e-2, 5e-3, 1e-2]), backend="numba", snapshots=[50, 200])
        results.append((W, a))
    for W, a in results[1:]:
        assert torch.equal(W, results[0][0]) and torch.equal(a, results[0][1])


@pytest.mark.skipif("numba" not in available_backends(), reason="numba not installed")
def test_numba_escape_check_on_the_tracked_neuron_gives_the_full_check_escape_steps(monkeypatch):
    """Between logging steps the numba path checks the lazy ball on one tracked neuron; the escape steps (and the
    weights) are those of reducing every neuron at every check, and those of the torch backend."""
    from lightning_lnsgd.twolayer.recorder import Recorder

    kw = dict(replicas=4, replica_seeds=[1, 2, 3, 4], lr=[0.002, 0.01, 0.03, 0.06], steps=1500, every=500,
              steps_per_batch=250, noise=2.0)  # checks every 100 steps, logging every 500
    tracked, _ = fit(backend="numba", **kw)
    reference, _ = fit(backend="torch", **kw)
    monkeypatch.setattr(Recorder, "inside_lazy_ball_sq", lambda self: 0.0)  # no neuron is ever "well inside"
    full, _ = fit(backend="numba", **kw)
    escaped = tracked.escape_step >= 0
    assert bool(escaped.any()) and not bool(escaped.all())  # some replicas escape within the run, some do not
    assert torch.equal(tracked.escape_step, full.escape_step) and torch.equal(tracked.W, full.W)
    assert torch.equal(tracked.escape_step, reference.escape_step)


def test_the_checkpoint_holds_the_weights_once_and_resume_rebuilds_the_initial_ones(tmp_path):
    model, trainer = fit(steps=40, backend="torch", steps_per_batch=8, replicas=2)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=False)["state_dict"]
    assert "W" in state and "W0" not in state
    resumed, _ = fit(steps=48, backend="torch", steps_per_batch=8, replicas=2, ckpt=tmp_path / "c.ckpt")
    assert torch.equal(resumed.W0, model.W0) and not torch.equal(resumed.W, resumed.W0)
    # a checkpoint of a release that saved W0 still loads; one whose W0 differs is refused
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=False)
    ckpt["state_dict"]["W0"] = model.W0.clone()
    torch.save(ckpt, tmp_path / "old.ckpt")
    fit(steps=48, backend="torch", steps_per_batch=8, replicas=2, ckpt=tmp_path / "old.ckpt")
    ckpt["state_dict"]["W0"] = model.W0 + 1
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="initial weights W0 differ"):
        fit(steps=48, backend="torch", steps_per_batch=8, replicas=2, ckpt=tmp_path / "other.ckpt")
