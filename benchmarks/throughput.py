"""Steps per second of the paper's synthetic run: plain-PyTorch anchors vs the project's `fit` path.

Settings (the paper's Fig. 2): m = 1000, d = 20, n = 200 examples sampled with replacement,
η = 1e-3, Rademacher label noise σ = 4, batch 1, float32. Everything runs in this one process,
so the ratios project/anchor are meaningful on a shared, noisy machine; absolute numbers are not.

    python benchmarks/throughput.py                 # CPU: anchors, fit paths, ratios
    python benchmarks/throughput.py --device cuda   # GPU: adds the CUDA-graph anchor, 4096 replicas
    python benchmarks/throughput.py --quick         # fewer steps, for a smoke test
    python benchmarks/throughput.py --shipped       # only: the shipped CLI jobs against the kernel and the C yardstick

``--shipped`` times what a user runs, ``python -m lightning_lnsgd fit --config configs/<job>.yaml`` with its logging,
checks and checkpoints as shipped, by difference: a long run minus a short one of the same job cancels start-up, and
(long − short steps) / (long − short seconds) is the job's marginal rate. In the same command: the C yardstick, the
numba kernel alone (one run, and the sweep's 16 replicas), and the first run of the main job with an empty numba
cache (``NUMBA_CACHE_DIR`` a new folder) against a second, warm run.

Anchors: an autograd loop, a closed-form loop, a stacked-replica closed-form loop and (GPU) a
CUDA graph of 100 closed-form steps, all hand-written here. Project: `Trainer.fit` of
`TwoLayerLinear` with `LabelNoise` on the generic path (one step per Lightning step) and on the
fused path (1000 steps per Lightning step) on each available backend, timed from `fit` start to
end, set-up included.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

M, D, N, ETA, SIGMA = 1000, 20, 200, 1e-3, 4.0


def _data(device: torch.device, replicas: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(D, generator=gen)
    teacher /= teacher.norm()
    x = torch.randn(N, D, generator=gen)
    W = torch.randn(replicas, M, D, generator=gen) / math.sqrt(D)
    a = torch.randn(replicas, M, generator=gen) / math.sqrt(M)
    return x.to(device), (x @ teacher).to(device), W.to(device), a.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def anchor_autograd(steps: int, device: torch.device) -> float:
    x, y, W, a = _data(device)
    W, a = W[0].requires_grad_(), a[0].requires_grad_()
    opt = torch.optim.SGD([W, a], lr=ETA)
    idx = torch.randint(N, (steps,), device=device)
    eps = SIGMA * (torch.randint(0, 2, (steps,), device=device) * 2 - 1).float()
    _sync(device)
    t = time.perf_counter()
    for s in range(steps):
        xb = x[idx[s]]
        loss = 0.5 * (a @ (W @ xb) - (y[idx[s]] + eps[s])) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps / (time.perf_counter() - t)


def _closed_form_step(W, a, xb, yb):
    # Closed-form gradients of ½(aᵀWx − y)², batch 1, stacked over a leading replica axis.
    theta = (a.unsqueeze(-2) @ W).squeeze(-2)
    r = (theta * xb).sum(-1) - yb
    g = r.unsqueeze(-1) * xb
    ga = (W @ g.unsqueeze(-1)).squeeze(-1)
    W.sub_(ETA * a.unsqueeze(-1) * g.unsqueeze(-2))
    a.sub_(ETA * ga)


def anchor_closed_form(steps: int, device: torch.device, replicas: int = 1) -> float:
    x, y, W, a = _data(device, replicas)
    idx = torch.randint(N, (steps, replicas), device=device)
    eps = SIGMA * (torch.randint(0, 2, (steps, replicas), device=device) * 2 - 1).float()
    xs, ys = x[idx], y[idx] + eps
    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(steps):
            _closed_form_step(W, a, xs[s], ys[s])
    _sync(device)
    return steps * replicas / (time.perf_counter() - t)


def anchor_cuda_graph(steps: int, device: torch.device, chunk: int = 100) -> float:
    x, y, W, a = _data(device)
    xs = torch.empty(chunk, 1, D, device=device)
    ys = torch.empty(chunk, 1, device=device)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for s in range(chunk):  # warm-up before capture
                _closed_form_step(W, a, xs[s], ys[s])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for s in range(chunk):
                _closed_form_step(W, a, xs[s], ys[s])
        idx = torch.randint(N, (steps // chunk, chunk, 1), device=device)
        eps = SIGMA * (torch.randint(0, 2, idx.shape, device=device) * 2 - 1).float()
        _sync(device)
        t = time.perf_counter()
        for c in range(steps // chunk):
            xs.copy_(x[idx[c]])
            ys.copy_(y[idx[c]] + eps[c])
            graph.replay()
        _sync(device)
    return (steps // chunk) * chunk / (time.perf_counter() - t)


def project_fit(steps: int, device: torch.device, backend: str, replicas: int | None = None, k: int = 1000) -> float:
    import pytorch_lightning as pl

    from lightning_lnsgd import LabelNoise, SparseTeacherDataModule, TwoLayerLinear

    model = TwoLayerLinear(dim=D, width=M, lr=ETA, replicas=replicas, steps_per_batch=k if backend != "autograd" else 1,
                           backend=backend)
    data = SparseTeacherDataModule(dim=D, n_train=N, steps_per_epoch=max(1, steps // (k if backend != "autograd" else 1)))
    trainer = pl.Trainer(
        accelerator=device.type if device.type == "cpu" else "gpu", devices=1, max_steps=steps, logger=False,
        log_every_n_steps=10_000, callbacks=[LabelNoise(sigma=SIGMA)], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    t = time.perf_counter()
    trainer.fit(model, data)
    _sync(device)
    return steps * (replicas or 1) / (time.perf_counter() - t)


def memory_check(steps: int = 1_000_000) -> list[tuple[int, float]]:
    """Resident set size (MiB) every 100k SGD steps of a fused fit: it must stay flat."""
    import pytorch_lightning as pl

    from lightning_lnsgd import LabelNoise, SparseTeacherDataModule, TwoLayerLinear

    page = __import__("os").sysconf("SC_PAGE_SIZE")
    samples: list[tuple[int, float]] = []

    class RSS(pl.Callback):
        def on_train_batch_end(self, trainer, *_):
            if trainer.global_step % 100_000 == 0:
                with open("/proc/self/statm") as f:
                    samples.append((trainer.global_step, int(f.read().split()[1]) * page / 2**20))

    model = TwoLayerLinear(dim=D, width=M, lr=ETA, steps_per_batch=1000)
    pl.Trainer(accelerator="cpu", max_steps=steps, logger=pl.loggers.TensorBoardLogger("/tmp/lnsgd_bench", "memory"),
               log_every_n_steps=500, callbacks=[LabelNoise(sigma=SIGMA), RSS()], enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
               num_sanity_val_steps=0).fit(model, SparseTeacherDataModule(steps_per_epoch=100))
    return samples


def _cli_seconds(config: str, steps: int, root: str, env: dict[str, str] | None = None) -> float:
    """Wall seconds of ``python -m lightning_lnsgd fit --config configs/<config>.yaml`` for ``steps`` SGD steps."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "lightning_lnsgd", "fit", "--config", f"configs/{config}.yaml",
           "--trainer.max_steps", str(steps), "--trainer.default_root_dir", root]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds


def shipped(repeat: int = 2) -> None:
    """The shipped jobs' marginal rates against the kernel alone and the C yardstick, and cold against warm start."""
    import os
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from kernels import bench_c, bench_kernel

    tmp = tempfile.mkdtemp(prefix="lnsgd_shipped_")
    try:
        cold_cache = os.path.join(tmp, "numba_cache")
        env = {"NUMBA_CACHE_DIR": cold_cache}
        cold = _cli_seconds("label_noise_sgd", 200_000, os.path.join(tmp, "cold"), env)
        warm = min(_cli_seconds("label_noise_sgd", 200_000, os.path.join(tmp, f"warm{i}"), env) for i in range(repeat))
        c = bench_c(100_000, 3)
        kernel_1 = bench_kernel("numba", 1, 100_000, 3)[0]
        kernel_16 = bench_kernel("numba", 16, 20_000, 3)[0]

        def marginal(config: str, short: int, long: int, replicas: int) -> float:
            best = float("inf")
            for i in range(repeat):
                t_short = _cli_seconds(config, short, os.path.join(tmp, f"{config}_s{i}"), env)
                t_long = _cli_seconds(config, long, os.path.join(tmp, f"{config}_l{i}"), env)
                best = min(best, (t_long - t_short) / (long - short))
            return replicas / best

        main_job = marginal("label_noise_sgd", 200_000, 2_200_000, 1)
        sweep = marginal("sweep_sigma", 100_000, 600_000, 16)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [("yardstick: C loop (shared/anchors/limit_cpu.c)", c[0] if c else float("nan"), "steps/s"),
            ("numba kernel alone, one run", kernel_1, "steps/s"),
            ("numba kernel alone, 16 replicas", kernel_16, "replica-steps/s"),
            ("label_noise_sgd.yaml, marginal (2.2M − 0.2M steps)", main_job, "steps/s"),
            ("sweep_sigma.yaml, marginal (0.6M − 0.1M steps, 16 replicas)", sweep, "replica-steps/s")]
    for name, value, unit in rows:
        print(f"{name:<62} {value:>14,.0f} {unit}")
    if c:
        print(f"  main job / C yardstick {main_job / c[0]:27.2f}x   (target ≥ 2)")
    print(f"  main job / kernel alone {main_job / kernel_1:26.2f}x")
    print(f"  sweep / kernel alone on 16 replicas {sweep / kernel_16:14.2f}x   (target ≥ 0.5)")
    print(f"first run, empty numba cache: {cold:.1f} s; warm run (best of {repeat}): {warm:.1f} s; "
          f"ratio {cold / warm:.2f}x   (target ≤ 1.5)")


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke test, not a measurement")
    parser.add_argument("--replicas", type=int, default=None, help="stacked replicas (default 64 CPU, 4096 GPU)")
    parser.add_argument("--memory", action="store_true", help="only: resident memory over a 1M-step fused fit")
    parser.add_argument("--shipped", action="store_true", help="only: the shipped CLI jobs, marginal rates and cold start")
    args = parser.parse_args(argv)
    if args.shipped:
        shipped()
        return []
    if args.memory:
        for step, mib in memory_check():
            print(f"step {step:>9,}: RSS {mib:8.1f} MiB")
        return []
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    R = args.replicas or (4096 if gpu else 64)
    scale = 0.05 if args.quick else 1.0
    n = lambda s: max(100, int(s * scale))  # noqa: E731
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    from lightning_lnsgd.twolayer.kernels import available_backends

    rows: list[tuple[str, float]] = []

    def add(name: str, value: float) -> None:
        rows.append((name, value))
        print(f"{name:<52} {value:>14,.0f}", flush=True)

    print(f"{'loop (device ' + device.type + ')':<52} {'steps/s':>14}")
    if not gpu:  # the C yardstick of ../shared/anchors (built here when gcc and the file are present)
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent))
        from kernels import bench_c

        c = bench_c(n(100_000), 1 if args.quick else 3)
        if c is not None:
            add("yardstick: C loop (shared/anchors/limit_cpu.c)", c[0])
    add("anchor: autograd loop", anchor_autograd(n(3000), device))
    add("anchor: closed-form loop", anchor_closed_form(n(20000), device))
    add(f"anchor: closed-form, {R} stacked replicas [replica-steps/s]", anchor_closed_form(n(2000), device, R))
    if gpu:
        add("anchor: CUDA graph of 100 closed-form steps", anchor_cuda_graph(n(50000), device))
    add("project: fit, generic autograd path", project_fit(n(3000), device, "autograd"))
    add("project: fit, fused torch, k=1000", project_fit(n(60000), device, "torch"))
    add(f"project: fit, fused torch, {R} replicas [replica-steps/s]", project_fit(n(2000), device, "torch", R))
    for backend in [b for b in available_backends() if b != "torch"]:
        steps = n(400_000 if backend == "triton" else 200_000)
        add(f"project: fit, fused {backend}, k=1000", project_fit(steps, device, backend))
        add(f"project: fit, fused {backend}, {R} replicas [replica-steps/s]",
            project_fit(n(50_000 if gpu else 20_000), device, backend, R))

    value = dict(rows)
    print("\nratios (same process):")
    ratios = [
        ("fused torch / closed-form loop", "project: fit, fused torch, k=1000", "anchor: closed-form loop"),
        (f"fused torch {R} replicas / stacked loop", f"project: fit, fused torch, {R} replicas [replica-steps/s]",
         f"anchor: closed-form, {R} stacked replicas [replica-steps/s]"),
        ("generic autograd path / autograd loop", "project: fit, generic autograd path", "anchor: autograd loop"),
    ]
    if gpu:
        ratios.append(("fused torch / CUDA graph loop", "project: fit, fused torch, k=1000",
                       "anchor: CUDA graph of 100 closed-form steps"))
    for backend in [b for b in available_backends() if b != "torch"]:
        ratios.append((f"fused {backend} / closed-form loop", f"project: fit, fused {backend}, k=1000",
                       "anchor: closed-form loop"))
    if "yardstick: C loop (shared/anchors/limit_cpu.c)" in value:
        for backend in [b for b in available_backends() if b != "torch"]:
            ratios.append((f"fused {backend} / C yardstick", f"project: fit, fused {backend}, k=1000",
                           "yardstick: C loop (shared/anchors/limit_cpu.c)"))
            ratios.append((f"fused {backend} {R} replicas / its one run", f"project: fit, fused {backend}, {R} replicas "
                           "[replica-steps/s]", f"project: fit, fused {backend}, k=1000"))
    for name, num, den in ratios:
        print(f"  {name:<50} {value[num] / value[den]:6.2f}x")
    if not args.quick and not gpu:  # the paper's Fig. 2 pair from the command line (CPU configs), start-up included
        import subprocess
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent

        def cli(config: str) -> list[str]:
            return [sys.executable, "-m", "lightning_lnsgd", "fit", "--config", f"configs/{config}.yaml",
                    "--trainer.default_root_dir", f"/tmp/lnsgd_bench/{config}", "--trainer.enable_checkpointing",
                    "false"]

        pair = ("label_noise_sgd", "sgd_clean")
        start = time.perf_counter()
        for config in pair:
            subprocess.run(cli(config), cwd=root, check=True, capture_output=True)
        print(f"\nFig. 2 pair (label_noise_sgd + sgd_clean, 200k steps each, two CLI processes, one after the "
              f"other): {time.perf_counter() - start:.1f} s wall")
        start = time.perf_counter()
        procs = [subprocess.Popen(cli(c), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in pair]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError("a Fig. 2 CLI run failed")
        print(f"Fig. 2 pair, the two CLI processes at once (one per core): {time.perf_counter() - start:.1f} s wall")
        start = time.perf_counter()
        subprocess.run(cli("fig2_pair"), cwd=root, check=True, capture_output=True)
        print(f"Fig. 2 pair as two replicas of one run (configs/fig2_pair.yaml): {time.perf_counter() - start:.1f} s wall")
    return rows


if __name__ == "__main__":
    main()
