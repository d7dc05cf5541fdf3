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

__all__ = ["bits", "rademacher", "randint"]

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
    """``out`` ``(R, n, numel)``: kind 0 the raw bits (uint64 view of int64), 1 ``randint(high)`` (int64),
    2 Rademacher signs (float)."""
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


def _draw(keys: np.ndarray, t0: int, out: np.ndarray, kind: int, high: int = 0) -> None:
    _fill(keys.view(np.uint64), np.int64(t0), out, kind, np.int64(high))


def bits(keys: np.ndarray, t0: int, out: np.ndarray) -> None:
    """The 64-bit values of draws ``t0, t0 + 1, …`` into ``out`` ``(R, n, numel)`` int64, one row of ``keys`` (int64)
    per replica."""
    _draw(keys, t0, out.view(np.uint64), 0)


def randint(keys: np.ndarray, t0: int, high: int, out: np.ndarray) -> None:
    """:meth:`~lightning_lnsgd.rng.CounterRNG.randint`'s integers in {0, …, high − 1} into ``out`` int64."""
    _draw(keys, t0, out, 1, high)


def rademacher(keys: np.ndarray, t0: int, out: np.ndarray) -> None:
    """:meth:`~lightning_lnsgd.rng.CounterRNG.rademacher`'s signs ±1 into ``out`` (float32 or float64)."""
    _draw(keys, t0, out, 2)
