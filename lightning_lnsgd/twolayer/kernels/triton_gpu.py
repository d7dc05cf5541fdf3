"""Triton kernel for :func:`lightning_lnsgd.kernels.run_steps` on CUDA (imported lazily: needs ``triton``).

One program per replica. The program loads its ``W`` (padded to a ``BM × BD`` tile, ``BM = pow2(m)``,
``BD = pow2(d)``) and ``a`` once, keeps them in registers for all ``k`` steps and stores them once at the end; each
step reads only its batch ``x[r, t]`` (``B × d``) and ``y[r, t]`` from global memory, prefetched one step ahead.

Per step (batch of ``B``, the ``b`` loop unrolled at compile time)::

    p_b = W x_b,  r_b = aᵀ p_b − y_b,  g = (1/B) Σ_b r_b x_b,  h = W g = (1/B) Σ_b r_b p_b
    SGD:  a ← a − η h,  W ← W − η a gᵀ
    SAM:  c = ρ / (sqrt(‖a‖²‖g‖² + ‖h‖²) + eps)   (c = ρ unnormalised);  a' = a + c h,  W' = W + c a gᵀ (implicit:
          W' x = W x + c a (g·x)),  r'_b, g' at (W', a'),  h' = W' g' = W g' + c a (g·g');
          a ← a − η h',  W ← W − η a' g'ᵀ

Size limit (registers): ``BM · BD ≤ 32768`` in float32 and ``≤ 16384`` in float64 (m = 1000, d = 20 → 1024 × 32
fits in float32); ``B ≤ 64``. Larger problems raise ``ValueError``: use ``backend="torch"``.

Measured on one H200 (triton 3.6, torch 2.11, paper size, float32, B = 1): one run ≈ 197k steps/s (num_warps 16;
8: 189k, 32: 169k, 4: 16k); 132, 264 or 528 runs ≈ 25M replica-steps/s. The yardstick's hand-written kernel reached
about 700k steps/s and 90M replica-steps/s, so there is headroom (≈ 5 µs a step here: the per-step reductions and
layout conversions dominate). Tried and dropped: loading x straight into W's register layout (broadcast over rows)
to avoid the conversion: 3-9x slower.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_TILE", "MAX_BATCH", "run"]

MAX_TILE = {torch.float32: 32768, torch.float64: 16384}
MAX_BATCH = 64


@triton.jit
def _steps_kernel(
    W, A, X, Y, LR, RHO, k, m, d, x_rstride, y_rstride, eps,
    B: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    SAM: tl.constexpr, NORMALIZE: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BD)
    bs = tl.arange(0, BB)
    rmask = rows < m
    cmask = cols < d
    bmask = bs < B
    wmask = rmask[:, None] & cmask[None, :]
    wptr = W + r * m * d + rows[:, None] * d + cols[None, :]
    w = tl.load(wptr, mask=wmask, other=0.0)
    av = tl.load(A + r * m + rows, mask=rmask, other=0.0)
    eta = tl.load(LR + r)
    rho = tl.load(RHO + r)
    xb_ptr = X + r * x_rstride
    yb_ptr = Y + r * y_rstride
    xmask = bmask[:, None] & cmask[None, :]
    # prefetched batch of step 0
    xt = tl.load(xb_ptr + bs[:, None] * d + cols[None, :], mask=xmask, other=0.0)
    yt = tl.load(yb_ptr + bs, mask=bmask, other=0.0)
    for t in range(k):
        tn = tl.minimum(t + 1, k - 1).to(tl.int64)
        xn = tl.load(xb_ptr + (tn * B + bs[:, None]) * d + cols[None, :], mask=xmask, other=0.0)
        yn = tl.load(yb_ptr + tn * B + bs, mask=bmask, other=0.0)
        g = tl.zeros([BD], dtype=w.dtype)
        h = tl.zeros([BM], dtype=w.dtype)
        for b in tl.static_range(B):
            xb = tl.sum(tl.where(bs[:, None] == b, xt, 0.0), axis=0)
            yb = tl.sum(tl.where(bs == b, yt, 0.0), axis=0)
            p = tl.sum(w * xb[None, :], axis=1)
            res = tl.sum(av * p, axis=0) - yb
            g += res * xb
            h += res * p
        g = g / B
        h = h / B
        if SAM:
            if NORMALIZE:
                nrm = tl.sqrt(tl.sum(av * av, axis=0) * tl.sum(g * g, axis=0) + tl.sum(h * h, axis=0))
                c = rho / (nrm + eps)
            else:
                c = rho
            ap = av + h * c
            g2 = tl.zeros([BD], dtype=w.dtype)
            for b in tl.static_range(B):
                xb = tl.sum(tl.where(bs[:, None] == b, xt, 0.0), axis=0)
                yb = tl.sum(tl.where(bs == b, yt, 0.0), axis=0)
                p = tl.sum(w * xb[None, :], axis=1) + av * (c * tl.sum(g * xb, axis=0))
                res = tl.sum(ap * p, axis=0) - yb
                g2 += res * xb
            g2 = g2 / B
            h2 = tl.sum(w * g2[None, :], axis=1) + av * (c * tl.sum(g * g2, axis=0))
            av = av - eta * h2
            w = w - eta * (ap[:, None] * g2[None, :])
        else:
            w = w - eta * (av[:, None] * g[None, :])
            av = av - eta * h
        xt = xn
        yt = yn
    tl.store(wptr, w, mask=wmask)
    tl.store(A + r * m + rows, av, mask=rmask)


def tile(m: int, d: int) -> tuple[int, int]:
    """The padded on-chip tile ``(BM, BD)`` for an ``m × d`` layer."""
    return triton.next_power_of_2(m), triton.next_power_of_2(d)


def check_size(m: int, d: int, B: int, dtype: torch.dtype) -> None:
    BM, BD = tile(m, d)
    if dtype not in MAX_TILE:
        raise TypeError(f"run_steps(backend='triton') supports float32 and float64, got {dtype}.")
    if BM * BD > MAX_TILE[dtype]:
        raise ValueError(
            f"run_steps(backend='triton'): W of {m}×{d} pads to {BM}×{BD} = {BM * BD} values per replica, more than "
            f"the {MAX_TILE[dtype]} that stay on chip in {dtype}; use backend='torch' (or a smaller layer)."
        )
    if B > MAX_BATCH:
        raise ValueError(f"run_steps(backend='triton'): batch size {B} > {MAX_BATCH}; use backend='torch'.")


def run(W, a, x, y, lr, rho, normalize: bool, num_warps: int | None = None) -> None:
    """Launch the kernel on contiguous ``W`` (R, m, d), ``a`` (R, m), ``x`` (Rx, k, B, d), ``y`` (Rx, k, B)."""
    R, m, d = W.shape
    Rx, k, B, _ = x.shape
    check_size(m, d, B, W.dtype)
    BM, BD = tile(m, d)
    if num_warps is None:
        n = BM * BD
        num_warps = 16 if n >= 16384 else 8 if n >= 4096 else 4
    sam = rho is not None
    rho_t = rho if sam else lr
    _steps_kernel[(R,)](
        W, a, x, y, lr, rho_t, k, m, d,
        0 if Rx == 1 else k * B * d, 0 if Rx == 1 else k * B, 1e-12,
        B=B, BB=max(triton.next_power_of_2(B), 1), BM=BM, BD=BD,
        SAM=sam, NORMALIZE=bool(normalize), num_warps=num_warps,
    )  # fmt: skip
