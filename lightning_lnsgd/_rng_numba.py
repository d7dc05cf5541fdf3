"""Large CPU draws of :class:`~lightning_lnsgd.rng.CounterRNG` in one compiled pass (imported lazily: needs numba).

The torch expressions of :mod:`lightning_lnsgd.rng` build each value through a dozen int64 temporaries of the draw's
size; a fused batch of a thousand replicas × k steps draws millions of values, so those temporaries cost more time
and memory than the values. These functions write the same 64-bit values, and the integers and signs made from them,
straight into the output, bit for bit what the torch expressions give (the tests compare them).

Value j of draw t of replica r: ``mix(mix(key_r ^ mix(t·G + 1)) + j·G)`` in wrapping unsigned 64-bit arithmetic,
with ``mix`` the SplitMix64 finaliser and G the golden-ratio increment.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["KINDS", "draw"]

_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ONE = np.uint64(1)


@njit(cache=True, nogil=True, inline="always")
def _mix(z):  # pragma: no cover - compiled
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def _fill(keys, t0, out, kind, high):  # pragma: no cover - compiled
    """``out`` ``(R, n, numel)``: kind 0 the raw bits (a uint64 view), 1 ``randint(high)``, 2 Rademacher signs."""
    R, n, numel = out.shape
    for r in range(R):
        key = keys[r]
        for t in range(n):
            row = _mix(key ^ _mix(np.uint64(t0 + t) * _G + _ONE))
            for j in range(numel):
                z = _mix(row + np.uint64(j) * _G)
                if kind == 0:
                    out[r, t, j] = z
                elif kind == 1:
                    # as rng.randint: 53 bits as a float in [0, 1), times high, truncated, at most high − 1
                    v = np.int64((float(np.int64(z >> np.uint64(11))) * 2.0**-53) * high)  # < 2⁵³: exact
                    out[r, t, j] = min(v, high - 1)
                else:
                    out[r, t, j] = 1.0 if z & _ONE else -1.0


#: What :func:`draw` writes: the raw 64-bit values (int64), ``randint``'s integers (int64), Rademacher signs (float).
KINDS = ("bits", "randint", "rademacher")


def draw(keys: np.ndarray, t0: int, out: np.ndarray, kind: str, high: int = 0) -> None:
    """Draws ``t0, t0 + 1, …`` of the replicas whose keys (int64) are ``keys`` into ``out`` ``(R, n, numel)``: the
    values of :class:`~lightning_lnsgd.rng.CounterRNG`'s ``bits``, ``randint(high)`` or ``rademacher``
    (``kind``, one of :data:`KINDS`)."""
    code = KINDS.index(kind)
    _fill(keys.view(np.uint64), np.int64(t0), out.view(np.uint64) if code == 0 else out, code, np.int64(high))
