"""Speed of the fused SGD kernels on the paper's synthetic run, against the C yardstick, in one command.

    python benchmarks/kernels.py                 # CPU: C yardstick, torch loop, numba (1 run, R runs); triton if CUDA
    python benchmarks/kernels.py --gpu-only      # only the triton section (for the H200)

Settings (paper, Fig. 2): m = 1000, d = 20, n = 200 points sampled with replacement, η = 1e-3, Rademacher label
noise σ = 4, batch 1, float32, NTK init. Samples and noisy targets are drawn up front (outside the timings), as the
project's engine does before calling :func:`lightning_lnsgd.twolayer.kernels.run_steps`. Every timing is the best of
``--repeat`` runs (the machines are shared and noisy); ratios are against the C yardstick timed in the same command.
Also prints mean ‖wᵢ‖² after the run (≈ 0.16 after 100k steps, as the C loop gives).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_lnsgd.twolayer import functional as F  # noqa: E402
from lightning_lnsgd.twolayer.kernels import run_steps  # noqa: E402

M, D, N, LR, SIGMA = 1000, 20, 200, 1e-3, 4.0
YARDSTICK = Path(__file__).resolve().parents[1] / "shared" / "anchors" / "limit_cpu.c"
if not YARDSTICK.exists():
    YARDSTICK = Path("/work/shared/anchors/limit_cpu.c")


def paper_problem(R: int, k: int, seed: int = 0, device="cpu", dtype=torch.float32, shared_init: bool = True):
    """W (R, m, d), a (R, m), x (R, k, 1, d), y (R, k, 1): the paper's data, one sample stream per replica."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=gen)
    th = torch.randn(D, generator=gen)
    Y = X @ (th / th.norm())
    idx = torch.randint(0, N, (R, k), generator=gen)
    eps = SIGMA * (2 * torch.randint(0, 2, (R, k), generator=gen) - 1)
    x = X[idx].unsqueeze(2)
    y = (Y[idx] + eps).unsqueeze(2)
    W, a = F.ntk_init(M, D, seed=seed)
    W, a = W.expand(R, M, D).contiguous(), a.expand(R, M).contiguous()
    to = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    return to(W), to(a), to(x), to(y)


def mean_w2(W: torch.Tensor) -> float:
    return W.double().square().sum(-1).mean().item()


def best_of(fn, repeat: int, sync=lambda: None) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------------------------------------------------------
def bench_c(steps: int, repeat: int):
    """Compile and run the C yardstick; returns (steps/s best of repeat, mean ‖w‖²) or None without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None or not YARDSTICK.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "limit_cpu")
        subprocess.run([gcc, "-O3", "-march=native", "-ffast-math", "-o", exe, str(YARDSTICK), "-lm"], check=True)
        best, w2 = 0.0, float("nan")
        for _ in range(repeat):
            out = subprocess.run([exe, str(steps)], capture_output=True, text=True, check=True).stdout
            mt = re.search(r"([\d.]+) steps/s, mean\|\|w\|\|\^2 ([\d.]+)", out)
            best, w2 = max(best, float(mt.group(1))), float(mt.group(2))
    return best, w2


def bench_torch_loop(steps: int, repeat: int, device="cpu"):
    """The plain closed-form torch loop (functional.sgd_step), one run."""
    W0, a0, x, y = paper_problem(1, steps, device=device)
    W0, a0, x, y = W0[0], a0[0], x[0], y[0]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}

    def go():
        W, a = W0.clone(), a0.clone()
        for t in range(steps):
            W, a = F.sgd_step(W, a, x[t], y[t], LR)
        out["W"] = W

    nthreads = torch.get_num_threads()
    torch.set_num_threads(1)  # one run of tiny ops: threads only add overhead
    try:
        dt = best_of(go, repeat, sync)
    finally:
        torch.set_num_threads(nthreads)
    return steps / dt, mean_w2(out["W"])


def bench_kernel(backend: str, R: int, steps: int, repeat: int, device="cpu", sam_rho=None):
    """run_steps on R replicas for `steps` steps (SAM when ``sam_rho``); returns (replica-steps/s, mean ‖w‖² of
    replica 0)."""
    W0, a0, x, y = paper_problem(R, steps, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    Ww, aw = W0.clone(), a0.clone()
    run_steps(Ww, aw, x[:, :8], y[:, :8], LR, backend=backend, sam_rho=sam_rho)  # compile / warm up
    out = {}

    def go():
        W, a = W0.clone(), a0.clone()
        run_steps(W, a, x, y, LR, backend=backend, sam_rho=sam_rho)
        out["W"] = W

    dt = best_of(go, repeat, sync)
    return R * steps / dt, mean_w2(out["W"][0])


def benchmark_triton(replicas=(1, 132, 264, 528), steps: int = 100_000, repeat: int = 3, many_steps: int = 20_000):
    """Triton rows for the table: one run for ``steps`` steps, then ``R`` runs (one program each) for ``many_steps``."""
    rows = []
    for R in replicas:
        k = steps if R == 1 else many_steps
        rate, w2 = bench_kernel("triton", R, k, repeat, device="cuda")
        rows.append((f"triton R={R} ({k} steps)", rate, w2 if k >= 100_000 else float("nan"), "replica-steps/s"))
    return rows


def sweep_triton_warps(replicas=(1, 132), steps: int = 20_000, warps=(4, 8, 16, 32)):
    """Prints replica-steps/s of the triton kernel for several ``num_warps`` (tuning aid for the GPU)."""
    from lightning_lnsgd.twolayer.kernels import triton_gpu

    for R in replicas:
        W0, a0, x, y = paper_problem(R, steps, device="cuda")
        lr = torch.full((R,), LR, device="cuda")
        for nw in warps:
            W, a = W0.clone(), a0.clone()
            triton_gpu.run(W, a, x[:, :8].contiguous(), y[:, :8].contiguous(), lr, None, True, num_warps=nw)
            dt = best_of(lambda: triton_gpu.run(W, a, x, y, lr, None, True, num_warps=nw), 2, torch.cuda.synchronize)
            print(f"triton R={R} num_warps={nw}: {R * steps / dt:,.0f} replica-steps/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--torch-steps", type=int, default=5_000)
    p.add_argument("--replicas", type=int, default=0, help="CPU replicas (default: numba's thread count)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--sweep-warps", action="store_true", help="also time the triton kernel at several num_warps")
    p.add_argument("--gpu-replicas", type=int, nargs="+", default=[1, 132, 264, 528])
    p.add_argument("--gpu-steps", type=int, default=20_000, help="steps for the many-replica triton runs")
    args = p.parse_args(argv)

    rows = []  # (name, rate, mean w2, unit)
    c = None if args.gpu_only else bench_c(args.steps, args.repeat)
    if c is not None:
        rows.append(("C yardstick (gcc -O3 -ffast-math)", c[0], c[1], "steps/s"))
    if not args.gpu_only:
        rate, w2 = bench_torch_loop(args.torch_steps, 1)
        rows.append((f"torch closed-form loop ({args.torch_steps} steps)", rate, float("nan"), "steps/s"))
        try:
            import numba

            R = args.replicas or numba.get_num_threads()
            rate1, w2 = bench_kernel("numba", 1, args.steps, args.repeat)
            rows.append(("numba R=1", rate1, w2, "steps/s"))
            rateR, w2R = bench_kernel("numba", R, args.steps, args.repeat)
            rows.append((f"numba R={R} ({numba.get_num_threads()} threads)", rateR, w2R, "replica-steps/s"))
            rows.append((f"  numba R={R} / numba R=1", rateR / rate1, float("nan"), "x"))
            rate_sam, w2s = bench_kernel("numba", 1, args.steps, args.repeat, sam_rho=0.05)
            rows.append(("numba SAM (rho=0.05) R=1", rate_sam, w2s, "steps/s"))
        except ImportError:
            rows.append(("numba (not installed)", float("nan"), float("nan"), ""))
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401

            rows.append(("torch closed-form loop, CUDA (2000 steps)", *bench_torch_loop(2000, 1, "cuda")[:1],
                         float("nan"), "steps/s"))  # fmt: skip
            if args.sweep_warps:
                sweep_triton_warps()
            rows += benchmark_triton(tuple(args.gpu_replicas), args.steps, args.repeat, args.gpu_steps)
        except ImportError:
            rows.append(("triton (not installed)", float("nan"), float("nan"), ""))

    ref = c[0] if c is not None else None
    print(f"\npaper run: m={M} d={D} n={N} lr={LR} sigma={SIGMA} B=1 float32, {args.steps} steps, best of {args.repeat}")
    print(f"{'what':48s} {'rate':>14s} {'unit':16s} {'vs C':>8s} {'mean|w|^2':>10s}")
    for name, rate, w2, unit in rows:
        ratio = f"{rate / ref:8.2f}" if ref and unit.endswith("steps/s") else " " * 8
        r = f"{rate:14,.0f}" if unit != "x" else f"{rate:14.2f}"
        print(f"{name:48s} {r} {unit:16s} {ratio} {w2:10.4f}")


if __name__ == "__main__":
    main()
