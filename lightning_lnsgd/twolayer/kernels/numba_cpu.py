"""Numba CPU kernel for :func:`lightning_lnsgd.kernels.run_steps` (imported lazily: needs ``numba``).

The kernel runs ``k`` steps for each replica ``r`` of ``W`` ``(R, m, d)`` and ``a`` ``(R, m)`` in place, replicas in
parallel (``prange``), steps in order. Inputs are NumPy views of the torch tensors, all of one float dtype (float32 or
float64; one compiled specialisation each). ``x`` is ``(Rx, k, B, d)`` and ``y`` ``(Rx, k, B)`` with ``Rx == R`` or
``Rx == 1`` (one sample stream shared by all replicas); ``lr`` and ``rho`` are ``(R,)``.

Why it never touches W inside the step loop
-------------------------------------------
Write neuron i as ``zᵢ = (wᵢ, aᵢ) ∈ ℝ^{d+1}``. With the batch gradient in θ, ``g = (1/B) Σ_b (θᵀx_b − y_b) x_b`` where
``θ = Σᵢ aᵢ wᵢ``, one SGD step is ``wᵢ ← wᵢ − η aᵢ g``, ``aᵢ ← aᵢ − η wᵢ·g``: the *same* linear map for every neuron,
``zᵢ ← (I − η U) zᵢ`` with ``U = u vᵀ + v uᵀ``, ``u = (g, 0)``, ``v = (0, …, 0, 1)``. SAM's perturbation
``ε = ρ ∇ / ‖∇‖`` is ``zᵢ ← (I + c U) zᵢ`` for the same reason, and its step ``zᵢ ← zᵢ − η U(g') (I + c U) zᵢ``.
So the kernel carries, per replica and in float64:

* ``S = Σᵢ zᵢ zᵢᵀ`` ((d+1)², computed from the weights once per call): it holds θ (``S[:d, d]``), ``‖a‖²`` and
  ``WᵀW``, which is all that a prediction, a gradient or SAM's ``‖∇‖² = ‖a‖²‖g‖² + gᵀWᵀWg`` needs;
* ``P``, the product of the steps' maps since the start of the call.

A step's map is ``M = I − η L`` with ``L = u' eᵀ + v fᵀ`` (SGD: ``u' = u``, ``e = v``, ``f = u``; SAM: ``u' = (g', 0)``,
``e = v + c u``, ``f = u' + c (g'·g) v``), so ``S ← M S Mᵀ`` and ``P ← M P`` are rank-2 updates: O((d+1)²) a step,
independent of the width m, instead of the O(m d) of a step on W. The weights themselves are ``zᵢ ← P zᵢ`` at the
end of the call and at each snapshot step, O(m (d+1)²) each. The result equals the step-by-step recursion to
rounding; it is more accurate than it (float64 moments; about 3e-8 relative to a float64 run after 10k float32
steps, where a float32 step-by-step loop is at 2.5e-6). The price: a step costs O(d²) however narrow the layer, so
for d > m a loop over W does less work, and ``backend="auto"`` then picks the torch backend instead.

Snapshots: the kernel takes ``snap`` ``(S,)`` (increasing step counts in 1..k) and buffers ``SW`` ``(S, R, m, d)``,
``SA`` ``(S, R, m)``; after ``snap[s]`` steps replica r's weights are written to ``SW[s, r]``, ``SA[s, r]`` (S = 0:
none). This lets the engine run all k steps of a Lightning step in one call and still read the weights on its
escape-check and logging grids.

``fastmath`` is limited to re-association and FMA contraction (no ``nnan``/``ninf``/approximate reciprocals): that
changes results only at the rounding level and keeps NaN/inf propagation (a diverging run ends with non-finite
weights, which the model reports).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["run", "steps"]

_FM = {"reassoc", "contract", "nsz"}
_OPTS = dict(parallel=True, cache=True, fastmath=_FM, nogil=True, error_model="numpy")
_INLINE = dict(inline="always", cache=True, fastmath=_FM, nogil=True, error_model="numpy")


@njit(**_INLINE)
def _gradient(g, theta_col, xs, ys, d):  # pragma: no cover - compiled
    """``g[:d] = (1/B) Σ_b (θ·x_b − y_b) x_b`` with θ = ``theta_col[:d]``; ``g[d] = 0``."""
    B = xs.shape[0]
    for j in range(d + 1):
        g[j] = 0.0
    for b in range(B):
        pred = 0.0
        for j in range(d):
            pred += theta_col[j] * xs[b, j]
        res = pred - ys[b]
        for j in range(d):
            g[j] += res * xs[b, j]
    for j in range(d):
        g[j] = g[j] / B


@njit(**_INLINE)
def _matvec(out, S, vec):  # pragma: no cover - compiled
    n = S.shape[0]
    for p in range(n):
        acc = 0.0
        for q in range(n):
            acc += S[p, q] * vec[q]
        out[p] = acc


@njit(**_INLINE)
def _dot(u, v):  # pragma: no cover - compiled
    acc = 0.0
    for p in range(u.shape[0]):
        acc += u[p] * v[p]
    return acc


@njit(**_INLINE)
def _apply(P, W, a, OW, OA, d):  # pragma: no cover - compiled
    """``(OW[i], OA[i]) = P (W[i], a[i])`` for every neuron i (OW/OA may be W/a: each zᵢ is read before it is written).

    Accumulates ``Σ_q z_q P[:, q]`` (axpys over a column of P, SIMD across the outputs) rather than one dot product
    per output, which would end in a horizontal sum each."""
    D = d + 1
    PT = np.empty((D, D))
    for p in range(D):
        for q in range(D):
            PT[q, p] = P[p, q]
    acc = np.empty(D)
    for i in range(W.shape[0]):
        for p in range(D):
            acc[p] = 0.0
        for q in range(d):
            zq = np.float64(W[i, q])
            for p in range(D):
                acc[p] += zq * PT[q, p]
        zq = np.float64(a[i])
        for p in range(D):
            acc[p] += zq * PT[d, p]
        for p in range(d):
            OW[i, p] = acc[p]
        OA[i] = acc[d]


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def _replica(W, a, x, y, lr, rho, sam, normalize, eps, snap, SW, SA, r):  # pragma: no cover - compiled
    """The k steps of replica r (see the module docstring)."""
    _, m, d = W.shape
    k = x.shape[1]
    D = d + 1
    xr = np.int64(0) if x.shape[0] == 1 else np.int64(r)
    eta = np.float64(lr[r])
    rr = np.float64(rho[r])
    # Allocated per replica, by the thread that runs it: with one (R, …) array, two threads would write the
    # cache line that two neighbouring replicas share at every step (measured: 2 replicas no faster than 1).
    Sr = np.empty((D, D))
    Pr = np.empty((D, D))
    Vr = np.empty((10, D))
    g, gp, e, f, se, sf, X, Y, eP, fP = Vr[0], Vr[1], Vr[2], Vr[3], Vr[4], Vr[5], Vr[6], Vr[7], Vr[8], Vr[9]
    zi = X  # scratch: one neuron's (w, a) while S is summed (X is free before the first step)
    for p in range(D):
        for q in range(D):
            Sr[p, q] = 0.0
            Pr[p, q] = 0.0
        Pr[p, p] = 1.0
    for i in range(m):
        for p in range(d):
            zi[p] = W[r, i, p]
        zi[d] = a[r, i]
        for p in range(D):
            zp = zi[p]
            for q in range(D):
                Sr[p, q] += zp * zi[q]
    si = 0
    for t in range(k):
        xs = x[xr, t]
        ys = y[xr, t]
        _gradient(g, Sr[:d, d], xs, ys, d)  # g = (g, 0) is u
        for p in range(D):
            e[p] = 0.0
        e[d] = 1.0
        if sam:
            _matvec(se, Sr, g)  # S u
            nrm2 = Sr[d, d] * _dot(g, g) + _dot(g, se)  # ‖a‖²‖g‖² + gᵀWᵀWg
            c = rr / (np.sqrt(nrm2) + eps) if normalize else rr
            if nrm2 == 0.0:  # ∇ = 0: no perturbation whatever c is, and a huge c would only overflow P
                c = 0.0
            for p in range(d):
                e[p] = c * g[p]  # e = v + c u
            _matvec(se, Sr, e)
            for p in range(d):
                eP[p] = se[p] + c * g[p] * se[d]  # θ' = column d of (I + cU) S (I + cU)ᵀ
            _gradient(gp, eP, xs, ys, d)  # u' = (g', 0)
            for p in range(D):
                f[p] = gp[p]
            f[d] = c * _dot(gp, g)
        else:
            for p in range(D):
                gp[p] = g[p]
                f[p] = g[p]
                se[p] = Sr[p, d]
        _matvec(sf, Sr, f)
        EE = _dot(e, se)
        FF = _dot(f, sf)
        GG = _dot(e, sf)
        e2 = eta * eta
        for p in range(D):
            Y[p] = -eta * se[p] + 0.5 * e2 * EE * gp[p]
            X[p] = -eta * sf[p] + e2 * GG * gp[p]
        X[d] += 0.5 * e2 * FF
        # S ← M S Mᵀ = S + Y u'ᵀ + u' Yᵀ + X vᵀ + v Xᵀ
        for p in range(D):
            yp = Y[p]
            up = gp[p]
            for q in range(D):
                Sr[p, q] += yp * gp[q] + up * Y[q]
        for p in range(D):
            Sr[p, d] += X[p]
        for p in range(D):
            Sr[d, p] += X[p]
        # P ← M P = P − η (u' (eᵀP) + v (fᵀP))
        for q in range(D):
            acc_e = 0.0
            acc_f = 0.0
            for p in range(D):
                acc_e += e[p] * Pr[p, q]
                acc_f += f[p] * Pr[p, q]
            eP[q] = acc_e
            fP[q] = acc_f
        for p in range(d):
            up = eta * gp[p]
            for q in range(D):
                Pr[p, q] -= up * eP[q]
        for q in range(D):
            Pr[d, q] -= eta * fP[q]
        if si < snap.shape[0] and snap[si] == t + 1:
            _apply(Pr, W[r], a[r], SW[si, r], SA[si, r], d)
            si += 1
    _apply(Pr, W[r], a[r], W[r], a[r], d)


@njit(**_OPTS)
def steps(W, a, x, y, lr, rho, sam, normalize, eps, snap, SW, SA):  # pragma: no cover - compiled
    """k SGD (``sam`` False) or SAM steps on every replica, replicas spread over numba's threads."""
    for r in prange(W.shape[0]):
        _replica(W, a, x, y, lr, rho, sam, normalize, eps, snap, SW, SA, r)


def run(
    W: np.ndarray, a: np.ndarray, x: np.ndarray, y: np.ndarray, lr: np.ndarray, rho, normalize: bool, snapshots=None
) -> None:
    """Runs :func:`steps`. All arrays C-contiguous, one float dtype; ``rho`` None (SGD) or ``(R,)`` (SAM);
    ``snapshots`` None or ``(snap, SW, SA)`` (see the module docstring)."""
    R, m, d = W.shape
    if snapshots is None:
        snapshots = (np.empty(0, np.int64), np.empty((0, R, m, d), W.dtype), np.empty((0, R, m), W.dtype))
    sam = rho is not None
    rho_arr = rho if sam else lr
    steps(W, a, x, y, lr, rho_arr, sam, bool(normalize), 1e-12, *snapshots)
