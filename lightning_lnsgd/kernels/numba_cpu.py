"""Numba CPU kernels for :func:`lightning_lnsgd.kernels.run_steps` (imported lazily: needs ``numba``).

Every kernel runs ``k`` steps for each replica ``r`` of ``W`` ``(R, m, d)`` and ``a`` ``(R, m)`` in place, replicas
in parallel (``prange``), steps in order. Inputs are NumPy views of the torch tensors, all of one float dtype
(float32 or float64; one compiled specialisation each). ``x`` is ``(Rx, k, B, d)`` and ``y`` ``(Rx, k, B)`` with
``Rx == R`` or ``Rx == 1`` (one sample stream shared by all replicas); ``lr`` and ``rho`` are ``(R,)``.

Memory traffic: the plain-SGD kernels read and write ``W`` once per step (one pass in memory order, over ``W`` or,
for batch 1, over a transposed copy).

* ``B == 1`` (:func:`sgd_b1`): works on a transposed copy ``Wᵀ`` ``(d, m)`` for the whole call (transposed in and
  out once). The pass over column j updates ``w_·j`` for all neurons and adds ``w_·j^new x_{t+1,j}`` to the next
  sample's ``p = W^new x_{t+1}``: every inner loop runs over the m neurons (SIMD lanes = neurons, no per-neuron
  horizontal sum, which is what bounds a row-by-row loop such as the C yardstick). ``∇a_i = (W g)_i = r p_i`` then
  needs no dot product, and ``ŷ_{t+1} = Σ_i a_i^new p_i`` is one sum over m: 2·m·d flops a step (the C loop's count),
  ≈ 1.6–1.9× the row-by-row version of this kernel on the project machine.
* ``B > 1`` (:func:`sgd_theta`): the pass computes ``(W g)_i`` and updates row i while accumulating the next
  end-to-end predictor ``θ_new = Σ_i a_i^new w_i^new`` (a fresh sum of the new weights, so no drift); the next
  step's predictions are ``θ_new · x_b``: 3·m·d flops a step.
* SAM, ``B == 1`` (:func:`sam_b1`): one pass over ``Wᵀ`` a step, like :func:`sgd_b1`: the perturbed point's
  prediction and gradient follow from ``p = W x``, ``‖a‖²`` and ``‖p‖²`` in closed form (see the kernel).
* SAM, ``B > 1`` (:func:`sam_theta`): two passes a step. Pass 1 computes ``h = W g`` and ``s = Wᵀh`` (plus ``‖a‖²``, ``‖h‖²``,
  ``aᵀh``) at the current point; the perturbed predictor then follows in closed form,
  ``θ' = Σ_i (a_i + c h_i)(w_i + c a_i g) = θ + c‖a‖² g + c s + c² (aᵀh) g``. Pass 2 updates every row with the
  gradients at the perturbed point (recomputing ``w_i' = w_i + c a_i g`` on the fly) and accumulates ``θ_new``.

Snapshots: every kernel takes ``snap`` ``(S,)`` (increasing step counts in 1..k) and buffers ``SW`` ``(S, R, m, d)``,
``SA`` ``(S, R, m)``; after ``snap[s]`` steps replica r's weights are copied to ``SW[s, r]``, ``SA[s, r]`` (S = 0: none).
This lets the engine run all k steps of a Lightning step in one call and still read the weights on its escape-check
and logging grids.

The arithmetic follows the torch reference's rounding order where it is cheap to do so (``η (a_i g_j)``, ``g / B``);
reductions are summed in a different order than torch's BLAS, which is why results agree to rounding, not bitwise.
``fastmath`` is limited to re-association and FMA contraction (no ``nnan``/``ninf``/approximate reciprocals): that
changes results only at the rounding level, like any other summation order, and keeps NaN/inf propagation.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["sam_b1", "sam_theta", "sgd_b1", "sgd_theta"]

_FM = {"reassoc", "contract", "nsz"}
_OPTS = dict(parallel=True, cache=True, fastmath=_FM, nogil=True, error_model="numpy")


@njit(**_OPTS)
def sgd_b1(W, a, x, y, lr, WT, P, PN, zero, snap, SW, SA):  # pragma: no cover - compiled
    """Plain SGD, batch size 1. Scratch: ``WT`` ``(R, d, m)`` (W transposed), ``P``, ``PN`` ``(R, m)``."""
    R, m, d = W.shape
    k = x.shape[1]
    shared = x.shape[0] == 1
    for r in prange(R):
        xr = np.int64(0) if shared else np.int64(r)
        eta = lr[r]
        ar = a[r]
        Tr = WT[r]
        Pc = P[r]  # p = W x_t for the current sample
        Pn = PN[r]  # the same for the next sample, accumulated during the pass
        si = 0
        _transpose(Tr, W[r])
        _project(Pc, Tr, x[xr, 0, 0], zero)
        pred = zero
        for i in range(m):
            pred += ar[i] * Pc[i]
        for t in range(k):
            res = pred - y[xr, t, 0]
            # ∇W_ij = a_i g_j with g = r x_t, and p_next = W^new x_{t+1}
            _column_pass(Tr, ar, res, x[xr, t, 0], x[xr, t + 1 if t + 1 < k else t, 0], eta, Pn, zero)
            # ∇a_i = (W g)_i = r p_i (the old W, the current sample); then ŷ_{t+1} = Σ_i a_i^new p_i^next
            pred = zero
            for i in range(m):
                ai_new = ar[i] - eta * (res * Pc[i])
                ar[i] = ai_new
                pred += ai_new * Pn[i]
            Pc, Pn = Pn, Pc
            si = _snapshot_t(snap, si, t, SW, SA, r, Tr, ar)
        _transpose(W[r], Tr)


@njit(**_OPTS)
def sam_b1(W, a, x, y, lr, rho, normalize, eps, WT, P, PN, AP, zero, snap, SW, SA):  # pragma: no cover - compiled
    """SAM, batch size 1, on a transposed copy like :func:`sgd_b1`. Scratch: ``WT`` ``(R, d, m)``; ``P``, ``PN``,
    ``AP`` ``(R, m)``. With ``p = W x``: ``∇a = r p``, ``‖∇‖² = ‖a‖² r²‖x‖² + r²‖p‖²``, and at the perturbed point
    ``p' = p + c a (g·x)``, ``ŷ' = ŷ + c (g·x) ‖a‖² + c r ‖p‖² + c² r (g·x) ŷ`` — no extra pass over W."""
    R, m, d = W.shape
    k = x.shape[1]
    shared = x.shape[0] == 1
    for r in prange(R):
        xr = np.int64(0) if shared else np.int64(r)
        eta = lr[r]
        rr = rho[r]
        ar = a[r]
        Tr = WT[r]
        Pc = P[r]
        Pn = PN[r]
        Ap = AP[r]
        si = 0
        _transpose(Tr, W[r])
        _project(Pc, Tr, x[xr, 0, 0], zero)
        pred = zero
        aa = zero
        pp = zero
        for i in range(m):
            pred += ar[i] * Pc[i]
            aa += ar[i] * ar[i]
            pp += Pc[i] * Pc[i]
        for t in range(k):
            xt = x[xr, t, 0]
            yt = y[xr, t, 0]
            res = pred - yt
            xx = zero
            for j in range(d):
                xx += xt[j] * xt[j]
            if normalize:
                c = rr / (np.sqrt(aa * (res * res * xx) + res * res * pp) + eps)
            else:
                c = rr
            gx = res * xx  # g·x with g = r x
            res_p = (pred + c * gx * aa + c * res * pp + c * c * res * gx * pred) - yt
            crs = c * res
            for i in range(m):
                Ap[i] = ar[i] + crs * Pc[i]  # a' = a + c ∇a
            # ∇W' = a' g'ᵀ with g' = r' x_t, and p_next = W^new x_{t+1}
            _column_pass(Tr, Ap, res_p, xt, x[xr, t + 1 if t + 1 < k else t, 0], eta, Pn, zero)
            cgx = c * gx
            pred = zero
            aa = zero
            pp = zero
            for i in range(m):
                ai_new = ar[i] - eta * (res_p * (Pc[i] + cgx * ar[i]))  # ∇a' = W' g' = r' p', p' = p + c a (g·x)
                ar[i] = ai_new
                pred += ai_new * Pn[i]
                aa += ai_new * ai_new
                pp += Pn[i] * Pn[i]
            Pc, Pn = Pn, Pc
            si = _snapshot_t(snap, si, t, SW, SA, r, Tr, ar)
        _transpose(W[r], Tr)


_INLINE = dict(inline="always", cache=True, fastmath=_FM, nogil=True, error_model="numpy")


@njit(**_INLINE)
def _snapshot(snap, si, t, SW, SA, r, Wr, ar):  # pragma: no cover - compiled
    """Copies replica r's weights to snapshot ``si`` when ``t + 1`` steps are done at ``snap[si]``; the next index."""
    if si < snap.shape[0] and snap[si] == t + 1:
        SW[si, r, :, :] = Wr
        SA[si, r, :] = ar
        return si + 1
    return si


@njit(**_INLINE)
def _transpose(dst, src):  # pragma: no cover - compiled
    """``dst[j, i] = src[i, j]``."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[j, i] = src[i, j]


@njit(**_INLINE)
def _project(p, Tr, xv, zero):  # pragma: no cover - compiled
    """``p = W x`` from ``Wᵀ`` ``(d, m)``: one vector operation over the neurons per input coordinate."""
    for i in range(p.shape[0]):
        p[i] = zero
    for j in range(Tr.shape[0]):
        xj = xv[j]
        row = Tr[j]
        for i in range(p.shape[0]):
            p[i] += row[i] * xj


@njit(**_INLINE)
def _column_pass(Tr, v, res, xt, xn, eta, pn, zero):  # pragma: no cover - compiled
    """The update of a batch-1 step on ``Wᵀ``: ``W_ij ← W_ij − η (v_i (res xt_j))`` (∇W = v gᵀ with g = res·xt), and
    ``pn = W^new xn`` accumulated in the same pass."""
    for i in range(pn.shape[0]):
        pn[i] = zero
    for j in range(Tr.shape[0]):
        gj = res * xt[j]
        xnj = xn[j]
        row = Tr[j]
        for i in range(pn.shape[0]):
            wn = row[i] - eta * (v[i] * gj)
            row[i] = wn
            pn[i] += wn * xnj


@njit(**_INLINE)
def _snapshot_t(snap, si, t, SW, SA, r, Tr, ar):  # pragma: no cover - compiled
    """:func:`_snapshot` for kernels that hold ``Wᵀ``."""
    if si < snap.shape[0] and snap[si] == t + 1:
        _transpose(SW[si, r], Tr)
        SA[si, r, :] = ar
        return si + 1
    return si


@njit(**_INLINE)
def _predictor(th, Wr, ar, zero):  # pragma: no cover - compiled
    """θ = Wᵀa into ``th`` (one pass over W)."""
    for j in range(th.shape[0]):
        th[j] = zero
    for i in range(Wr.shape[0]):
        ai = ar[i]
        for j in range(th.shape[0]):
            th[j] += ai * Wr[i, j]


@njit(**_INLINE)
def _batch_gradient(out, th, xs, ys, zero):  # pragma: no cover - compiled
    """out = (1/B) Σ_b (θᵀx_b − y_b) x_b: the gradient of ½·mean (θᵀx − y)² in θ, for ``xs`` (B, d)."""
    d = out.shape[0]
    B = xs.shape[0]
    for j in range(d):
        out[j] = zero
    for b in range(B):
        xb = xs[b]
        pred = zero
        for j in range(d):
            pred += th[j] * xb[j]
        res = pred - ys[b]
        for j in range(d):
            out[j] += res * xb[j]
    for j in range(d):
        out[j] = out[j] / B


@njit(**_OPTS)
def sgd_theta(W, a, x, y, lr, TH, G, zero, snap, SW, SA):  # pragma: no cover - compiled
    """Plain SGD, any batch size. ``TH`` and ``G`` ``(R, d)`` are scratch (θ and g)."""
    R, m, d = W.shape
    k = x.shape[1]
    shared = x.shape[0] == 1
    for r in prange(R):
        xr = np.int64(0) if shared else np.int64(r)
        eta = lr[r]
        Wr = W[r]
        ar = a[r]
        th = TH[r]
        g = G[r]
        si = 0
        _predictor(th, Wr, ar, zero)
        for t in range(k):
            _batch_gradient(g, th, x[xr, t], y[xr, t], zero)
            for j in range(d):
                th[j] = zero
            for i in range(m):
                ai = ar[i]
                h = zero
                for j in range(d):
                    h += Wr[i, j] * g[j]
                ai_new = ai - eta * h
                for j in range(d):
                    wn = Wr[i, j] - eta * (ai * g[j])
                    Wr[i, j] = wn
                    th[j] += ai_new * wn
                ar[i] = ai_new
            si = _snapshot(snap, si, t, SW, SA, r, Wr, ar)


@njit(**_OPTS)
def sam_theta(W, a, x, y, lr, rho, normalize, eps, TH, G, S, H, zero, snap, SW, SA):  # pragma: no cover - compiled
    """SAM (normalised or not), any batch size. ``TH``, ``G``, ``S`` ``(R, d)`` and ``H`` ``(R, m)`` are scratch."""
    R, m, d = W.shape
    k = x.shape[1]
    shared = x.shape[0] == 1
    for r in prange(R):
        xr = np.int64(0) if shared else np.int64(r)
        eta = lr[r]
        rr = rho[r]
        Wr = W[r]
        ar = a[r]
        th = TH[r]
        g = G[r]
        s = S[r]
        h = H[r]
        si = 0
        _predictor(th, Wr, ar, zero)
        for t in range(k):
            # --- gradient at (W, a): g = (1/B) Σ_b r_b x_b
            _batch_gradient(g, th, x[xr, t], y[xr, t], zero)
            gg = zero
            for j in range(d):
                gg += g[j] * g[j]
                s[j] = zero
            # --- pass 1: h = W g, s = Wᵀ h, ‖a‖², ‖h‖², aᵀh
            aa = zero
            hh = zero
            ah = zero
            for i in range(m):
                hi = zero
                for j in range(d):
                    hi += Wr[i, j] * g[j]
                h[i] = hi
                for j in range(d):
                    s[j] += hi * Wr[i, j]
                ai = ar[i]
                aa += ai * ai
                hh += hi * hi
                ah += ai * hi
            if normalize:
                c = rr / (np.sqrt(aa * gg + hh) + eps)
            else:
                c = rr
            # --- perturbed predictor θ' = θ + c‖a‖² g + c s + c² (aᵀh) g, its gradient g'
            for j in range(d):
                th[j] = th[j] + c * aa * g[j] + c * s[j] + c * c * ah * g[j]
            _batch_gradient(s, th, x[xr, t], y[xr, t], zero)  # s now holds g'
            for j in range(d):
                th[j] = zero
            # --- pass 2: ∇W' = a' g'ᵀ, ∇a' = W' g' with W' = W + c a gᵀ, a' = a + c h; update; θ_new
            for i in range(m):
                ai = ar[i]
                ap = ai + h[i] * c
                hp = zero
                for j in range(d):
                    hp += (Wr[i, j] + (ai * g[j]) * c) * s[j]
                ai_new = ai - eta * hp
                for j in range(d):
                    wn = Wr[i, j] - eta * (ap * s[j])
                    Wr[i, j] = wn
                    th[j] += ai_new * wn
                ar[i] = ai_new
            si = _snapshot(snap, si, t, SW, SA, r, Wr, ar)


def run(
    W: np.ndarray, a: np.ndarray, x: np.ndarray, y: np.ndarray, lr: np.ndarray, rho, normalize: bool, snapshots=None
) -> None:
    """Dispatch to the right kernel. All arrays C-contiguous, one float dtype; ``rho`` None or ``(R,)``;
    ``snapshots`` None or ``(snap, SW, SA)`` (see the module docstring)."""
    R, m, d = W.shape
    B = x.shape[2]
    zero = W.dtype.type(0)
    if snapshots is None:
        snapshots = (np.empty(0, np.int64), np.empty((0, R, m, d), W.dtype), np.empty((0, R, m), W.dtype))
    if rho is not None and B == 1:
        scratch = [np.empty((R, m), W.dtype) for _ in range(3)]
        sam_b1(W, a, x, y, lr, rho, bool(normalize), W.dtype.type(1e-12), np.empty((R, d, m), W.dtype), *scratch, zero,
               *snapshots)
    elif rho is not None:
        TH = np.empty((R, d), W.dtype)
        G = np.empty((R, d), W.dtype)
        S = np.empty((R, d), W.dtype)
        H = np.empty((R, m), W.dtype)
        sam_theta(W, a, x, y, lr, rho, bool(normalize), W.dtype.type(1e-12), TH, G, S, H, zero, *snapshots)
    elif B == 1:
        sgd_b1(W, a, x, y, lr, np.empty((R, d, m), W.dtype), np.empty((R, m), W.dtype), np.empty((R, m), W.dtype),
               zero, *snapshots)
    else:
        sgd_theta(W, a, x, y, lr, np.empty((R, d), W.dtype), np.empty((R, d), W.dtype), zero, *snapshots)
