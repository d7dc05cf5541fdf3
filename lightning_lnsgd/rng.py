"""Counter-based random streams shared by the data sampler, the label noise and the fast engine.

A :class:`CounterRNG` draws value ``j`` of draw ``t`` of replica ``r`` as a pure function
``hash(key_r, t, j)`` (a SplitMix64 finaliser over 64-bit integers). Nothing but the draw
counter ``t`` is state, which buys four properties the project relies on:

* resume is exact: the checkpoint stores ``t`` and the next draw is the one an uninterrupted
  run would have made;
* draws are independent of how they are chunked: ``k`` draws of shape ``(B,)`` equal one
  call ``draw(k, (B,))``, so a fused k-step engine sees exactly the noise of k single steps;
* stacked replicas each get their own stream (one key per replica), vectorised;
* the same seed gives the same numbers on CPU and GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["CounterRNG", "mix64", "replica_stream"]

_MASK64 = (1 << 64) - 1


def _i64(value: int) -> int:
    """The signed int64 with the same 64 bits as the unsigned ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_M1 = _i64(0xBF58476D1CE4E5B9)
_M2 = _i64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask off the copied sign bits to get a logical shift.
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on an int64 tensor (wrapping 64-bit arithmetic), elementwise."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _mix_int(z: int) -> int:
    """:func:`mix64` on a Python int, for keys (no tensor round trip)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return _i64(z ^ (z >> 31))


class CounterRNG:
    """A counter-based random stream per replica; its only state is the draw counter.

    Args:
        seeds: one seed, or one seed per replica (stacked runs).
        stream: a name that separates independent uses of the same seed
            (e.g. ``"sampling"`` and ``"label_noise"``), and the DDP rank.

    A *draw* is one call of :meth:`bits` (or its typed wrappers) with ``n=None`` and has the
    requested shape; ``n=k`` makes k consecutive draws at once, shape ``(k, *shape)``, equal
    to k single draws. Several seeds add a leading replica axis ``(R, ...)``.
    """

    def __init__(self, seeds: int | Sequence[int], stream: str | int = 0, rank: int = 0) -> None:
        self.replicated = not isinstance(seeds, int)
        seed_list = [int(s) for s in (seeds if self.replicated else [seeds])]  # type: ignore[union-attr]
        if not seed_list:
            raise ValueError("CounterRNG: `seeds` is empty; give one seed or one per replica.")
        stream_id = _stream_id(stream)
        self.keys = [
            _mix_int(_mix_int(_mix_int(s) ^ stream_id) ^ (int(rank) * 0x632BE59BD9B4E019)) for s in seed_list
        ]
        self.counter = 0
        self._key_cache: dict[torch.device, torch.Tensor] = {}

    def _key_tensor(self, device: torch.device) -> torch.Tensor:
        key = self._key_cache.get(device)
        if key is None:
            key = torch.tensor(self.keys, dtype=torch.int64, device=device)
            self._key_cache[device] = key
        return key

    #: Draws of at least this many values on CPU are made by :mod:`lightning_lnsgd._rng_numba` in one compiled pass
    #: (the same values, without the torch expressions' temporaries), when numba is installed.
    COMPILED_FROM = 1 << 15

    def _compiled(
        self, kind: str, shape: Sequence[int], n: int | None, device: torch.device | str, dtype: torch.dtype,
        high: int = 0,
    ) -> torch.Tensor | None:
        """The draw from the compiled kernels, or ``None`` where the torch expressions make it (small draws, other
        devices, no numba). Advances the counter only when it draws."""
        # The size first: small draws, one per SGD step on the generic path, should pay next to nothing here.
        draws = 1 if n is None else int(n)
        numel = math.prod(shape)
        if draws * numel * len(self.keys) < self.COMPILED_FROM or torch.device(device).type != "cpu":
            return None
        shape = tuple(int(s) for s in shape)
        try:
            from . import _rng_numba
        except ImportError:  # pragma: no cover - numba is a dependency; a broken install falls back to torch
            return None
        out = torch.empty((len(self.keys), draws, numel), dtype=dtype)
        _rng_numba.draw(torch.tensor(self.keys, dtype=torch.int64).numpy(), self.counter, out.numpy(), kind, high)
        self.counter += draws
        out = out.view(len(self.keys), draws, *shape)
        if n is None:
            out = out[:, 0]
        return out if self.replicated else out[0]

    def bits(self, shape: Sequence[int], n: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniformly random 64-bit integers (as int64): one draw of ``shape``, or ``n`` draws stacked."""
        compiled = self._compiled("bits", shape, n, device, torch.int64)
        if compiled is not None:
            return compiled
        device = torch.device(device)
        shape = tuple(int(s) for s in shape)
        draws = 1 if n is None else int(n)
        t0 = self.counter
        self.counter += draws
        numel = 1
        for s in shape:
            numel *= s
        if draws * len(self.keys) <= 256:
            # Few (replica, draw) rows: derive their keys in Python, saving ~20 tiny kernel launches.
            rows = [_mix_int(k ^ _mix_int((t * _GOLDEN + 1) & _MASK64)) for k in self.keys for t in range(t0, t0 + draws)]
            if len(rows) * numel <= 64:  # batch-1 steps: a handful of values, cheapest in pure Python
                vals = [_mix_int(r + j * _GOLDEN) for r in rows for j in range(numel)]
                out = torch.tensor(vals, dtype=torch.int64, device=device).view(len(self.keys), draws, *shape)
            else:
                row = torch.tensor(rows, dtype=torch.int64, device=device).view(len(self.keys), draws)
                out = self._expand(row, numel, device).view(len(self.keys), draws, *shape)
        else:
            key = self._key_tensor(device)
            t = torch.arange(t0, t0 + draws, dtype=torch.int64, device=device)
            row = mix64(key[:, None] ^ mix64(t * _GOLDEN + 1))  # (R, n): one key per (replica, draw)
            out = self._expand(row, numel, device).view(len(self.keys), draws, *shape)
        if n is None:
            out = out[:, 0]
        return out if self.replicated else out[0]

    @staticmethod
    def _expand(row: torch.Tensor, numel: int, device: torch.device) -> torch.Tensor:
        j = torch.arange(numel, dtype=torch.int64, device=device) * _GOLDEN
        return mix64(row[:, :, None] + j)

    def uniform(
        self, shape: Sequence[int], n: int | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Uniform floats in [0, 1) with 53 random bits (rounded to ``dtype``, kept < 1)."""
        u = _shr(self.bits(shape, n, device), 11).to(torch.float64) * (2.0**-53)
        return u.to(dtype).clamp_(max=1.0 - torch.finfo(dtype).eps / 2)

    def randint(self, high: int, shape: Sequence[int], n: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Integers uniform on {0, …, high−1} (int64); bias below high/2⁵³."""
        compiled = self._compiled("randint", shape, n, device, torch.int64, int(high))
        if compiled is not None:
            return compiled
        u = _shr(self.bits(shape, n, device), 11).to(torch.float64) * (2.0**-53)
        return (u * high).to(torch.int64).clamp_(max=high - 1)

    def rademacher(
        self, shape: Sequence[int], n: int | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Signs ±1 with probability ½ each."""
        if dtype in (torch.float32, torch.float64):
            compiled = self._compiled("rademacher", shape, n, device, dtype)
            if compiled is not None:
                return compiled
        b = self.bits(shape, n, device) & 1
        return (b * 2 - 1).to(dtype)

    def normal(
        self, shape: Sequence[int], n: int | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Standard normal values: Box–Muller on the two 32-bit halves of one 64-bit draw, in float64."""
        z = self.bits(shape, n, device)
        # Two independent 32-bit halves → two uniforms; u1 in (0, 1] so log(u1) is finite.
        u1 = (_shr(z, 32).to(torch.float64) + 1.0) * (2.0**-32)
        u2 = (z & 0xFFFFFFFF).to(torch.float64) * (2.0**-32)
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).to(dtype)

    def state_dict(self) -> dict[str, int]:
        return {"counter": self.counter}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counter = int(state["counter"])


def replica_stream(seed: int, replica_seed: int) -> int:
    """The seed of one stacked replica's stream: a hash of (the owner's seed, the replica's seed).

    Stacked runs (the fused engine) give replica r the stream ``replica_stream(seed, seeds[r])``,
    so replica r draws exactly what a one-replica run with seed ``seeds[r]`` draws.
    """
    return _mix_int(_mix_int(int(seed)) ^ _mix_int(int(replica_seed) + 0x9E3779B97F4A7C15))


def _stream_id(stream: str | int) -> int:
    if isinstance(stream, int):
        return _mix_int(stream + 0x5851F42D4C957F2D)
    acc = 0xCBF29CE484222325  # FNV-1a over the name: stable across processes, unlike hash()
    for byte in stream.encode():
        acc = ((acc ^ byte) * 0x100000001B3) & _MASK64
    return _i64(acc)
