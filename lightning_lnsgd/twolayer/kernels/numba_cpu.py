"""Numba CPU kernel for :func:`lightning_lnsgd.kernels.run_steps` (imported lazily: needs ``numba``).

The kernel runs ``k`` steps for each replica ``r`` of ``W`` ``(R, m, d)`` and ``a`` ``(R, m)`` in place, steps in
order; blocks of replicas run in parallel on Python threads (the compiled function releases the GIL), as many as
``numba.get_num_threads()`` (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``). Inputs are NumPy views of the torch
tensors, all of one float dtype (float32 or float64; one compiled specialisation each). ``x`` is a table of inputs
``(n, d)`` and ``xi`` ``(Rx, k, B)`` the row of each example, ``y`` ``(Rx, k, B)``, with ``Rx == R`` or ``Rx == 1``
(one sample stream shared by all replicas); ``lr`` and ``rho`` are ``(R,)``.

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
escape-check and logging grids. With ``ST`` ``(S, R, 5 + d)`` non-empty it reads them without copying them out: at
each snapshot step it forms every neuron's weights and sums what the logged tags need into ``ST[s, r]`` (the
:data:`~lightning_lnsgd.twolayer.dynamics.STATS` of :func:`~lightning_lnsgd.twolayer.dynamics.weight_stats`, then θ
from the moments), which saves the copies and the passes of torch over them. The SAM step's second gradient repeats
the first one's loop rather than calling a compiled helper (see "Compile time").

The escape check reads one number per replica, whether some neuron is still inside the lazy ball (minᵢ‖wᵢ − wᵢ(0)‖
below its radius), every 100 steps, and in a phase diagram some replicas never leave it: a full reduction there would
cost O(m·d²) per check and replica, several times the steps between two checks. So a snapshot can ask for that check
alone (``need`` 2): the kernel forms only the neuron that moved least at the last full reduction (``track``); while
it is inside the ball by a margin, so is the minimum, which is all the check needs. Only when it leaves does the
kernel reduce every neuron again and track the new least-moved one.

Inputs: the kernel reads example b of step t of replica r as row ``xi[r, t, b]`` of a table ``x`` ``(n, d)`` (``Rx``
= 1: one stream shared by all replicas), so a batch of k steps can carry indices into the training set rather than
k·B·d inputs per replica (:func:`run` builds the trivial index for inputs given in full).

Compile time: the whole step is one compiled function with no compiled helpers and no ``parallel=True`` (each
helper and numba's parallel pass add seconds of compilation on a first run and nothing to the speed), and SGD and
SAM are two specialisations of it: ``rho`` is ``None`` for SGD, which numba prunes at compile time, so a run compiles
only the one it uses. Both are cached on disk (``cache=True``; ``NUMBA_CACHE_DIR`` moves the cache).

``fastmath`` is limited to re-association and FMA contraction (no ``nnan``/``ninf``/approximate reciprocals): that
changes results only at the rounding level and keeps NaN/inf propagation (a diverging run ends with non-finite
weights, which the model reports).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numpy as np
from numba import get_num_threads, njit

__all__ = ["STATS", "prepare", "run", "steps"]

_FM = {"reassoc", "contract", "nsz"}


@njit(cache=True, fastmath=_FM, nogil=True, error_model="numpy")
def steps(  # pragma: no cover
    W, a, x, xi, y, lr, rho, normalize, eps, snap, SW, SA, W0, ref, ST, need, track, inside_sq, scratch, first, last
):
    """k SGD (``rho`` None) or SAM steps on replicas ``first`` … ``last − 1`` (see the module docstring).

    ``scratch`` ``(R, L)`` float64, one padded row per replica: S, P, Pᵀ and 11 vectors of length d + 1."""
    _, m, d = W.shape
    k = xi.shape[1]
    B = xi.shape[2]
    D = d + 1
    with_stats = ST.shape[0] > 0
    ref_norm = 0.0
    for p in range(ref.shape[0]):
        ref_norm += ref[p] * ref[p]
    ref_norm = math.sqrt(ref_norm)
    for r in range(first, last):
        xr = 0 if xi.shape[0] == 1 else r
        eta = float(lr[r])
        e2 = eta * eta
        S = scratch[r, 0 : D * D].reshape((D, D))
        P = scratch[r, D * D : 2 * D * D].reshape((D, D))
        PT = scratch[r, 2 * D * D : 3 * D * D].reshape((D, D))
        V = scratch[r, 3 * D * D : 3 * D * D + 11 * D].reshape((11, D))
        g, gp, e, f, se, sf, X, Y, eP, fP, acc = V[0], V[1], V[2], V[3], V[4], V[5], V[6], V[7], V[8], V[9], V[10]
        for p in range(D):
            for q in range(D):
                S[p, q] = 0.0
                P[p, q] = 0.0
            P[p, p] = 1.0
        for i in range(m):  # S = Σᵢ zᵢ zᵢᵀ, zᵢ = (wᵢ, aᵢ)
            for p in range(d):
                acc[p] = W[r, i, p]
            acc[d] = a[r, i]
            for p in range(D):
                zp = acc[p]
                for q in range(D):
                    S[p, q] += zp * acc[q]
        si = 0
        for t in range(k + 1):
            while (si < snap.shape[0] and snap[si] == t) or t == k:
                # (wᵢ, aᵢ) ← P (wᵢ, aᵢ): into the next snapshot buffers when step t is one, else (t = k) in place.
                # Accumulated as axpys over the columns of P (SIMD across the outputs), not one dot product per output.
                into = si < snap.shape[0] and snap[si] == t
                stats = into and with_stats
                if stats and need[si, r] == 0:  # nobody reads them: NaN, and the O(m·d²) reduction is skipped
                    for p in range(ST.shape[2]):
                        ST[si, r, p] = math.nan
                    si += 1
                    continue
                for p in range(D):
                    for q in range(D):
                        PT[q, p] = P[p, q]
                if stats and need[si, r] == 2:
                    # Only "is some neuron still inside the lazy ball?": if the neuron that moved least at the last
                    # full reduction is still well inside, the minimum is too, and the O(m·d²) pass is skipped.
                    j = track[r]
                    moved_sq = 0.0
                    for p in range(d):
                        acc_p = float(a[r, j]) * PT[d, p]
                        for q in range(d):
                            acc_p += float(W[r, j, q]) * PT[q, p]
                        moved_sq += (acc_p - W0[r, j, p]) * (acc_p - W0[r, j, p])
                    if moved_sq < inside_sq:
                        for p in range(ST.shape[2]):
                            ST[si, r, p] = math.nan
                        ST[si, r, 3] = moved_sq  # an upper bound of the minimum, inside the ball
                        si += 1
                        continue
                norm_sq_sum, align_sum, cos_sum, lazy_min_sq, a_abs_sum = 0.0, 0.0, 0.0, math.inf, 0.0
                least = 0
                for i in range(m):
                    for p in range(D):
                        acc[p] = 0.0
                    for q in range(d):
                        zq = float(W[r, i, q])
                        for p in range(D):
                            acc[p] += zq * PT[q, p]
                    zq = float(a[r, i])
                    for p in range(D):
                        acc[p] += zq * PT[d, p]
                    if stats:  # the per-neuron quantities of the dynamics tags, reduced over the neurons
                        w_sq, dot, moved_sq = 0.0, 0.0, 0.0
                        for p in range(d):
                            w_sq += acc[p] * acc[p]
                            dot += acc[p] * ref[p]
                            moved_sq += (acc[p] - W0[r, i, p]) * (acc[p] - W0[r, i, p])
                        norm_sq_sum += w_sq
                        align_sum += abs(dot)
                        cos_sum += abs(dot) / max(math.sqrt(w_sq) * ref_norm, 1e-30)
                        if moved_sq < lazy_min_sq:
                            lazy_min_sq = moved_sq
                            least = i
                        a_abs_sum += abs(acc[d])
                    elif into:
                        for p in range(d):
                            SW[si, r, i, p] = acc[p]
                        SA[si, r, i] = acc[d]
                    else:
                        for p in range(d):
                            W[r, i, p] = acc[p]
                        a[r, i] = acc[d]
                if stats:
                    ST[si, r, 0] = norm_sq_sum
                    ST[si, r, 1] = align_sum
                    ST[si, r, 2] = cos_sum
                    ST[si, r, 3] = lazy_min_sq
                    ST[si, r, 4] = a_abs_sum
                    track[r] = least
                    for p in range(d):
                        ST[si, r, 5 + p] = S[p, d]  # θ = Σᵢ aᵢwᵢ, from the moments
                if not into:
                    break
                si += 1
            if t == k:
                break
            # u = (g, 0): g = (1/B) Σ_b (θ·x_b − y_b) x_b with θ = S[:d, d]
            for j in range(D):
                g[j] = 0.0
            for b in range(B):
                xb = x[xi[xr, t, b]]
                res = -float(y[xr, t, b])
                for j in range(d):
                    res += S[j, d] * xb[j]
                for j in range(d):
                    g[j] += res * xb[j]
            for j in range(d):
                g[j] = g[j] / B
            if rho is not None:
                # SAM: (I + cU) perturbs every neuron; e = v + c u, u' = (g', 0) the gradient at the perturbed θ'.
                for p in range(D):
                    acc_p = 0.0
                    for q in range(d):
                        acc_p += S[p, q] * g[q]
                    se[p] = acc_p  # S u
                gg = 0.0
                gse = 0.0
                for p in range(d):
                    gg += g[p] * g[p]
                    gse += g[p] * se[p]
                nrm2 = S[d, d] * gg + gse  # ‖∇‖² = ‖a‖²‖g‖² + gᵀWᵀWg
                rr = float(rho[r])
                c = rr / (math.sqrt(nrm2) + eps) if normalize else rr
                if nrm2 == 0.0:  # ∇ = 0: no perturbation whatever c is, and a huge c would only overflow P
                    c = 0.0
                for p in range(d):
                    e[p] = c * g[p]
                e[d] = 1.0
                for p in range(D):
                    acc_p = 0.0
                    for q in range(D):
                        acc_p += S[p, q] * e[q]
                    se[p] = acc_p  # S e
                for p in range(d):
                    eP[p] = se[p] + c * g[p] * se[d]  # θ' = column d of (I + cU) S (I + cU)ᵀ
                for j in range(D):
                    gp[j] = 0.0
                for b in range(B):
                    xb = x[xi[xr, t, b]]
                    res = -float(y[xr, t, b])
                    for j in range(d):
                        res += eP[j] * xb[j]
                    for j in range(d):
                        gp[j] += res * xb[j]
                gpg = 0.0
                for j in range(d):
                    gp[j] = gp[j] / B
                    gpg += gp[j] * g[j]
                for p in range(d):
                    f[p] = gp[p]
                f[d] = c * gpg
            else:
                for p in range(D):
                    e[p] = 0.0
                    gp[p] = g[p]
                    f[p] = g[p]
                    se[p] = S[p, d]
                e[d] = 1.0
            for p in range(D):
                acc_p = 0.0
                for q in range(D):
                    acc_p += S[p, q] * f[q]
                sf[p] = acc_p  # S f
            EE = 0.0
            FF = 0.0
            GG = 0.0
            for p in range(D):
                EE += e[p] * se[p]
                FF += f[p] * sf[p]
                GG += e[p] * sf[p]
            for p in range(D):
                Y[p] = -eta * se[p] + 0.5 * e2 * EE * gp[p]
                X[p] = -eta * sf[p] + e2 * GG * gp[p]
            X[d] += 0.5 * e2 * FF
            # S ← M S Mᵀ = S + Y u'ᵀ + u' Yᵀ + X vᵀ + v Xᵀ
            for p in range(D):
                yp = Y[p]
                up = gp[p]
                for q in range(D):
                    S[p, q] += yp * gp[q] + up * Y[q]
            for p in range(D):
                S[p, d] += X[p]
            for p in range(D):
                S[d, p] += X[p]
            # P ← M P = P − η (u' (eᵀP) + v (fᵀP))
            for q in range(D):
                acc_e = 0.0
                acc_f = 0.0
                for p in range(D):
                    acc_e += e[p] * P[p, q]
                    acc_f += f[p] * P[p, q]
                eP[q] = acc_e
                fP[q] = acc_f
            for p in range(d):
                up = eta * gp[p]
                for q in range(D):
                    P[p, q] -= up * eP[q]
            for q in range(D):
                P[d, q] -= eta * fP[q]


_POOL: tuple[ThreadPoolExecutor, int] | None = None  # the pool and its number of threads


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[1] < workers:
        if _POOL is not None:
            _POOL[0].shutdown(wait=False)
        _POOL = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lnsgd-numba"), workers)
    return _POOL[0]


def prepare(dtype: np.dtype, sam: bool) -> None:
    """Compiles the specialisation of :func:`steps` for weights of ``dtype`` (SGD, or SAM), or loads it from numba's
    disk cache: a call on arrays of one element, so that a later call does not pause for it."""
    W, a = np.zeros((1, 1, 1), dtype), np.zeros((1, 1), dtype)
    x, y, lr = np.zeros((1, 0, 1, 1), dtype), np.zeros((1, 0, 1), dtype), np.zeros(1, dtype)
    run(W, a, x, y, lr, lr if sam else None, True)


#: The statistics :func:`run` returns per snapshot and replica with ``stats_against``, in this order, then θ (d values).
STATS = ("norm_sq_sum", "alignment_sum", "cosine_sum", "lazy_min_sq", "a_abs_sum")


def run(
    W: np.ndarray, a: np.ndarray, x: np.ndarray, y: np.ndarray, lr: np.ndarray, rho, normalize: bool, snapshots=None,
    stats_against=None, needed=None, index=None, track=None, inside_sq: float = 0.0,
) -> None:
    """Runs :func:`steps`. All arrays C-contiguous, one float dtype; ``rho`` None (SGD) or ``(R,)`` (SAM);
    ``snapshots`` None or ``(snap, SW, SA)`` (see the module docstring). Replicas are split into as many blocks as
    there are numba threads, one thread each.

    ``x`` is ``(Rx, k, B, d)``, or with ``index`` ``(Rx, k, B)`` int64 a table of inputs ``(n, d)`` of which example b
    of step t of replica r is row ``index[r, t, b]`` (read inside the step loop: the batch holds no inputs).

    ``stats_against`` ``(W0, v, ST)``: at the snapshot steps, instead of copying the weights into ``SW``, ``SA``
    (then empty), reduce them into ``ST`` ``(S, R, 5 + d)`` float64: Σᵢ‖wᵢ‖², Σᵢ|⟨wᵢ, v⟩|, Σᵢ|cos(wᵢ, v)|,
    minᵢ‖wᵢ − W0ᵢ‖², Σᵢ|aᵢ| (:data:`STATS`) and θ = Σᵢ aᵢwᵢ; ``W0`` like ``W``, ``v`` ``(d,)`` float64.
    ``needed`` ``(S, R)`` uint8 (default all 1): the statistics of snapshot s and replica r are computed where it is 1,
    and NaN where it is 0 (the weights do not change at a snapshot, so skipping one changes nothing else). Where it is
    2 only the lazy-ball check is wanted: if the neuron ``track[r]`` has moved by a squared distance below
    ``inside_sq``, that distance stands in for minᵢ‖wᵢ − W0ᵢ‖² (an upper bound of it) and the rest is NaN, at O(d²);
    otherwise, as everywhere the statistics are computed, all of them are, and ``track[r]`` (``(R,)`` int64, default
    zeros, updated in place) becomes the neuron that moved least."""
    R, m, d = W.shape
    if snapshots is None:
        snapshots = (np.empty(0, np.int64), np.empty((0, R, m, d), W.dtype), np.empty((0, R, m), W.dtype))
    if stats_against is None:
        stats_against = (W, np.zeros(d), np.empty((0, R, 5 + d)))
    if needed is None:
        needed = np.ones((stats_against[2].shape[0], R), np.uint8)
    if track is None:
        track = np.zeros(R, np.int64)
    if index is None:  # the inputs as a table of their own rows, in order
        index = np.arange(x.shape[0] * x.shape[1] * x.shape[2], dtype=np.int64).reshape(x.shape[:3])
        x = x.reshape(-1, d)
    D = d + 1
    # One row per replica, padded to whole 64-byte lines plus one: threads never write a line another thread uses.
    width = -(-(3 * D * D + 11 * D) // 8) * 8 + 8
    scratch = np.empty((R, width))
    args = (W, a, x, index, y, lr, rho, bool(normalize), 1e-12, *snapshots, *stats_against, needed, track,
            float(inside_sq), scratch)
    threads = min(R, get_num_threads())
    if threads <= 1:
        steps(*args, 0, R)
        return
    bounds = np.linspace(0, R, threads + 1).astype(np.int64)
    for future in [_pool(threads).submit(steps, *args, int(lo), int(hi)) for lo, hi in pairwise(bounds)]:
        future.result()
