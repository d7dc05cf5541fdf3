r"""Fused multi-step kernels for the closed-form SGD / SAM step of the two-layer linear model ŷ = aᵀWx.

:func:`run_steps` runs ``k`` SGD (or SAM) steps in one call, in place, on ``R`` independent replicas, consuming
samples ``x`` and (already noisy) targets ``y`` that the caller produced: sampling and label noise stay exactly
the project's (:mod:`lightning_lnsgd.callbacks.label_noise`, :mod:`lightning_lnsgd.twolayer.data`); only the arithmetic is fused.

Math (per replica r, per step t, batch ``(x_b, y_b)_{b<B} = (x[r,t], y[r,t])``, loss ½·mean_b (aᵀWx_b − y_b)²)::

    r_b = aᵀW x_b − y_b,   g = (1/B) Σ_b r_b x_b  ∈ ℝ^d,   ∇W = a gᵀ,   ∇a = W g
    SGD:  W ← W − η ∇W,   a ← a − η ∇a                        (simultaneous update)
    SAM:  (∇W, ∇a) at (W, a);  ε = ρ (∇W, ∇a) / (‖(∇W, ∇a)‖ + 1e-12)     (sam_normalize=True, Foret et al.)
                                ε = ρ (∇W, ∇a)                          (sam_normalize=False)
          (∇W', ∇a') at (W + ε_W, a + ε_a) on the same batch;  W ← W − η ∇W',  a ← a − η ∇a'

The norm is the global Euclidean norm over both layers of one replica; ``1e-12`` is the ``eps`` of
:func:`lightning_lnsgd.sam.sam_perturbation` (the torch backend calls that function when it is importable).

Backends:

* ``"torch"``: the reference: a loop over the steps calling :func:`lightning_lnsgd.functional.grads` on the stacked
  replicas; any device and float dtype.
* ``"numba"``: CPU, float32/float64, blocks of replicas in parallel on numba's thread count. Every neuron's step is the same linear map
  of (wᵢ, aᵢ), so the kernel steps the (d+1)² second moments and the product of those maps, O(d²) a step whatever the
  width, and applies the product to W at snapshots and at the end (see :mod:`lightning_lnsgd.kernels.numba_cpu`).
  Compiled on first use, only the specialisation in use (dtype; SGD or SAM), and cached on disk; :func:`prepare`
  does it ahead of the first step.
* ``"triton"``: CUDA, float32/float64, one program per replica with ``W`` and ``a`` held on chip across all ``k``
  steps (see :mod:`lightning_lnsgd.kernels.triton_gpu`; limit: ``pow2(m)·pow2(d) ≤ 32768`` in float32).
* ``"auto"``: triton for CUDA tensors when triton is installed, numba for CPU tensors when numba is installed and
  d ≤ m (measured on one core: m = 1000, d = 20: numba 618k steps/s, torch 14k; m = d = 100: 77k vs 47k; m = 50,
  d = 200: 16k vs 42k; m = 100, d = 1000: 351 vs 17k), else torch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from .. import functional as F
from ..dynamics import STATS, weight_stats

__all__ = ["available_backends", "prepare", "resolve_backend", "run_steps", "run_steps_torch", "share_cpu_threads"]

_BACKENDS = ("auto", "torch", "numba", "triton")
SAM_EPS = 1e-12


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):  # pragma: no cover
        return False


def available_backends() -> list[str]:
    """Backends usable in this environment (``"torch"`` always; ``"triton"`` only with a CUDA device)."""
    out = ["torch"]
    if _has("numba"):
        out.append("numba")
    if _has("triton") and torch.cuda.is_available():
        out.append("triton")
    return out


def share_cpu_threads(processes: int) -> int:
    """Gives the numba kernel of this process ``cpu_count // processes`` threads (at least 1), for ``processes``
    ranks sharing one machine, unless the user chose them with ``NUMBA_NUM_THREADS``; returns the number in use."""
    import os

    import numba

    if processes > 1 and "NUMBA_NUM_THREADS" not in os.environ:
        numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS // processes))
    return numba.get_num_threads()


def resolve_backend(backend: str, device: torch.device, width_dim: Optional[tuple[int, int]] = None) -> str:
    """The concrete backend ``backend`` stands for on ``device``; raises if it cannot run there.

    ``width_dim`` = ``(m, d)`` lets ``"auto"`` pass over numba when d > m: its cost per step grows as d² whatever m
    (see :mod:`lightning_lnsgd.kernels.numba_cpu`), so a loop over W does less work there.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"run_steps: unknown backend {backend!r}; choose one of {_BACKENDS}.")
    if backend == "auto":
        if device.type == "cuda" and _has("triton"):
            return "triton"
        if device.type == "cpu" and _has("numba") and (width_dim is None or width_dim[1] <= width_dim[0]):
            return "numba"
        return "torch"
    if backend == "numba":
        if not _has("numba"):
            raise ImportError("run_steps(backend='numba') needs numba: `pip install numba` (or use backend='torch').")
        if device.type != "cpu":
            raise ValueError(f"run_steps(backend='numba') runs on CPU tensors, got device {device}; use 'triton'.")
    if backend == "triton":
        if not _has("triton"):
            raise ImportError(
                "run_steps(backend='triton') needs triton: `pip install triton` (and a CUDA build of torch)."
            )
        import os

        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not (interpret and device.type == "cpu"):
            raise ValueError(
                f"run_steps(backend='triton') runs on CUDA tensors, got device {device} "
                "(CPU tensors only under TRITON_INTERPRET=1, for tests); use backend='numba' or 'torch'."
            )
    return backend


def prepare(backend: str, dtype: torch.dtype, sam: bool) -> None:
    """Compiles (or loads from the disk cache) what ``backend`` will run for weights of ``dtype``, SGD or SAM: the
    numba kernel's specialisation; nothing for the torch backend, and triton compiles at its first launch."""
    if backend == "numba":
        from . import numba_cpu

        numba_cpu.prepare(torch.empty(0, dtype=dtype).numpy().dtype, sam)


def _per_replica(v: Union[float, Tensor], R: int, like: Tensor, name: str) -> Tensor:
    if not isinstance(v, Tensor):  # a fill, not a host-to-device copy (which would synchronise a CUDA stream)
        return torch.full((R,), float(v), dtype=like.dtype, device=like.device)
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(R)
    if t.shape != (R,):
        raise ValueError(f"run_steps: {name} must be a float or hold one value per replica ({R}), got {tuple(t.shape)}.")
    return t.contiguous()


def _check(
    W: Tensor, a: Tensor, x: Tensor, y: Tensor, index: Optional[Tensor] = None
) -> tuple[bool, int, int, int, int, int]:
    """Validates shapes; returns (has replica axis, R, k, B, m, d)."""
    if index is not None:
        if x.dim() != 2:
            raise ValueError(f"run_steps: with `index`, x must be the table of inputs (n, d), got {tuple(x.shape)}.")
        if index.dtype != torch.int64:
            raise TypeError(f"run_steps: index must be int64, got {index.dtype}.")
        if index.device != x.device:
            raise ValueError(f"run_steps: index is on {index.device}, x on {x.device}.")
        if x.shape[0] == 0:
            raise ValueError("run_steps: the table of inputs x is empty.")
        x = x[:1].expand(*index.shape, x.shape[-1])  # a view shaped like the gathered inputs, for the checks below
    if W.dim() not in (2, 3):
        raise ValueError(f"run_steps: W must be (m, d) or (R, m, d), got {tuple(W.shape)}.")
    rep = W.dim() == 3
    R = W.shape[0] if rep else 1
    m, d = W.shape[-2:]
    if tuple(a.shape) != tuple(W.shape[:-1]):
        raise ValueError(f"run_steps: a must have shape {tuple(W.shape[:-1])}, got {tuple(a.shape)}.")
    if x.dim() == 4 and rep:
        if x.shape[0] not in (1, R):
            raise ValueError(f"run_steps: x's replica axis is {x.shape[0]}, W has {R} replicas.")
    elif x.dim() != 3:
        raise ValueError(
            "run_steps: x must be (R, k, B, d) (or (k, B, d): no replica axis, or one stream shared by all "
            f"replicas), got {tuple(x.shape)}."
        )
    k, B, dx = x.shape[-3:]
    if dx != d:
        raise ValueError(f"run_steps: x has feature size {dx}, W has d={d}.")
    if tuple(y.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"run_steps: y must have shape {tuple(x.shape[:-1])}, got {tuple(y.shape)}.")
    for n, t in (("a", a), ("x", x), ("y", y)):
        if t.device != W.device:
            raise ValueError(f"run_steps: {n} is on {t.device}, W on {W.device}.")
    if not W.is_floating_point():
        raise TypeError(f"run_steps: W must be floating point, got {W.dtype}.")
    if a.dtype != W.dtype:
        raise TypeError(f"run_steps: a has dtype {a.dtype}, W has {W.dtype}.")
    return rep, R, k, B, m, d


def _sam_eps(W: Tensor, a: Tensor, gW: Tensor, ga: Tensor, rho: Tensor, normalize: bool, batch_dims: int):
    from ...strategies.perturbation import sam_perturbation

    rho_arg: Union[float, Tensor] = rho if batch_dims else rho.reshape(())
    eW, ea = sam_perturbation([W, a], [gW, ga], rho_arg, normalize=normalize, eps=SAM_EPS, batch_dims=batch_dims)
    return eW, ea


@torch.no_grad()
def run_steps_torch(
    W: Tensor,
    a: Tensor,
    x: Tensor,
    y: Tensor,
    lr: Union[float, Tensor],
    *,
    sam_rho: Union[float, Tensor, None] = None,
    sam_normalize: bool = True,
) -> None:
    """The torch reference of :func:`run_steps` (a loop over the steps; same arguments, in place)."""
    rep, R, k, B, m, d = _check(W, a, x, y)
    x = x.to(W.dtype)
    y = y.to(W.dtype)
    lr_t = _per_replica(lr, R, W, "lr")
    if not rep:
        lr_t = lr_t.reshape(())
    rho_t = None if sam_rho is None else _per_replica(sam_rho, R, W, "sam_rho")
    # One network: a Python float (an `alpha`), read from the host when given as one (float() of a CUDA tensor syncs).
    lr_step: Union[float, Tensor] = lr_t if rep else (float(lr) if not isinstance(lr, Tensor) else float(lr_t))
    if rho_t is None:
        for xt, yt in zip(x.unbind(-3), y.unbind(-2)):  # unbind: one call for all k step views
            F.sgd_step_(W, a, xt, yt, lr_step)
        return
    for t in range(k):
        xt, yt = x[..., t, :, :], y[..., t, :]
        gW, ga, _ = F.grads(W, a, xt, yt)
        eW, ea = _sam_eps(W, a, gW, ga, rho_t, sam_normalize, 1 if rep else 0)
        gW, ga, _ = F.grads(W + eW, a + ea, xt, yt)
        W.sub_(lr_t[..., None, None] * gW)
        a.sub_(lr_t[..., None] * ga)


@torch.no_grad()
def run_steps(
    W: Tensor,
    a: Tensor,
    x: Tensor,
    y: Tensor,
    lr: Union[float, Tensor],
    *,
    sam_rho: Optional[Union[float, Tensor]] = None,
    sam_normalize: bool = True,
    backend: str = "auto",
    snapshots: Optional[Sequence[int]] = None,
    stats_against: Optional[tuple[Tensor, Tensor]] = None,
    stats_needed: Optional[Tensor] = None,
    index: Optional[Tensor] = None,
    track: Optional[Tensor] = None,
    inside_sq: float = 0.0,
) -> Optional[Union[tuple[Tensor, Tensor], Tensor]]:
    """Run ``k`` SGD (or SAM) steps of the two-layer linear model in place (see the module docstring for the math).

    Args:
        W: first layer ``(R, m, d)`` (R replicas) or ``(m, d)``; updated in place.
        a: second layer ``(R, m)`` or ``(m,)``; updated in place, same dtype as ``W``.
        x: inputs ``(R, k, B, d)``; ``(k, B, d)`` when ``W`` has no replica axis, or (also ``(1, k, B, d)``) one
            stream shared by all replicas. Cast to ``W``'s dtype. With ``index``, the table of inputs ``(n, d)``.
        y: targets ``(R, k, B)`` / ``(k, B)``, already noisy (the label noise is the caller's).
        lr: the step size η: a float or one value per replica ``(R,)``.
        sam_rho: ``None`` for plain SGD; else the SAM radius ρ, a float or ``(R,)``.
        sam_normalize: SAM's ε = ρ g/(‖g‖ + 1e-12) (True) or ε = ρ g (False).
        backend: ``"auto"``, ``"torch"``, ``"numba"`` or ``"triton"``.
        snapshots: step counts ``0 < t₁ < t₂ < … ≤ k``: after ``tᵢ`` of the ``k`` steps, a copy of the weights is
            kept. The numba kernel writes them from inside its step loop (one call for all k steps); the other backends
            run the steps between two snapshots as separate calls.
        stats_against: ``(W0, θ⋆)``, the initial weights (shaped like ``W``) and the teacher ``(d,)``: with
            ``snapshots``, return the :func:`~lightning_lnsgd.twolayer.dynamics.weight_stats` of the weights at the
            snapshot steps instead of copies of them. The numba kernel reduces the weights as it produces them,
            without copying them out; the other backends reduce the copies.
        stats_needed: with ``stats_against`` on the numba backend, ``(S, R)`` (``(S,)`` without a replica axis), bool
            or integer: the statistics of snapshot s and replica r are computed where it is 1 (``True``) and are NaN
            where it is 0, which saves the O(m·d²) reduction; the weights are the same either way. Where it is 2 only
            the lazy-ball check is wanted: while the neuron ``track[r]`` has moved by a squared distance below
            ``inside_sq``, that distance is returned as ``lazy_min_sq`` (an upper bound of the minimum) and the rest
            is NaN, at O(d²); else all statistics are computed. Other backends ignore it and compute them all.
        index: the row of ``x`` of each example, int64 ``(R, k, B)`` (``(k, B)``, ``(1, k, B)`` as for ``x``): the
            numba kernel reads the rows inside its step loop; the other backends gather them first.
        track: with ``stats_needed``, ``(R,)`` int64 (``()`` without a replica axis), updated in place: the neuron
            that moved least at each replica's last full reduction (start with zeros; any neuron is correct, a
            well-chosen one is faster).
        inside_sq: the squared distance from its initial weights below which a neuron is inside the lazy ball, with
            whatever margin the caller's check needs (0: every check is a full reduction).

    Returns:
        ``None`` without ``snapshots``; else ``(Ws, As)``, the weights after each snapshot step, with shapes
        ``(S,) + W.shape`` and ``(S,) + a.shape`` (S = ``len(snapshots)``); with ``stats_against``, their statistics
        ``(S,) + W.shape[:-2] + (5 + d,)`` in float64.
    """
    rep, R, k, B, m, d = _check(W, a, x, y, index)
    be = resolve_backend(backend, W.device, (m, d))
    if index is not None and be != "numba":
        x, index = x[index], None
    if snapshots is not None:
        snaps = [int(t) for t in snapshots]
        if any(not 0 < t <= k for t in snaps) or any(b <= a_ for a_, b in zip(snaps, snaps[1:])):
            raise ValueError(f"run_steps: snapshots must increase strictly within 1..k={k}, got {snaps}.")
        if be == "numba" and snaps and stats_against is not None:
            stats = torch.empty((len(snaps), R, len(STATS) + d), dtype=torch.float64)
            W0, teacher = stats_against
            needed = None if stats_needed is None else stats_needed.reshape(len(snaps), R).to(torch.uint8).contiguous()
            if track is not None and (
                track.dtype != torch.int64 or track.numel() != R or not track.is_contiguous()
                or bool((track < 0).any() | (track >= m).any())
            ):
                raise ValueError(
                    f"run_steps: track must be a contiguous int64 tensor of {R} neuron indices in [0, {m}), got "
                    f"{track!r}."
                )
            _run_compiled(be, rep, R, W, a, x, y, lr, sam_rho, sam_normalize, snaps, stats=(W0, teacher, stats),
                          needed=needed, index=index, track=track, inside_sq=inside_sq)
            return stats if rep else stats[:, 0]
        Ws = W.new_empty((len(snaps),) + tuple(W.shape))
        As = a.new_empty((len(snaps),) + tuple(a.shape))
        if be == "numba" and snaps:
            _run_compiled(be, rep, R, W, a, x, y, lr, sam_rho, sam_normalize, snaps, Ws, As, index=index)
        else:
            if index is not None:
                x = x[index]
            _run_between_snapshots(W, a, x, y, lr, sam_rho, sam_normalize, be, snaps, Ws, As)
        if stats_against is not None:
            return weight_stats(Ws, As, *stats_against)
        return Ws, As
    if k == 0:
        return None
    if be == "torch":
        run_steps_torch(W, a, x, y, lr, sam_rho=sam_rho, sam_normalize=sam_normalize)
        return None
    _run_compiled(be, rep, R, W, a, x, y, lr, sam_rho, sam_normalize, index=index)
    return None


def _run_between_snapshots(
    W: Tensor, a: Tensor, x: Tensor, y: Tensor, lr: Union[float, Tensor], sam_rho: Optional[Union[float, Tensor]],
    sam_normalize: bool, be: str, snaps: list[int], Ws: Tensor, As: Tensor,
) -> None:
    """The steps between two snapshots as separate calls, copying the weights into ``Ws``, ``As`` after each."""
    prev = 0
    for i, t in enumerate(snaps):
        run_steps(W, a, x[..., prev:t, :, :], y[..., prev:t, :], lr,
                  sam_rho=sam_rho, sam_normalize=sam_normalize, backend=be)
        Ws[i].copy_(W)
        As[i].copy_(a)
        prev = t
    run_steps(W, a, x[..., prev:, :, :], y[..., prev:, :], lr, sam_rho=sam_rho, sam_normalize=sam_normalize, backend=be)


def _run_compiled(
    be: str, rep: bool, R: int, W: Tensor, a: Tensor, x: Tensor, y: Tensor, lr: Union[float, Tensor],
    sam_rho: Optional[Union[float, Tensor]], sam_normalize: bool,
    snaps: Optional[list[int]] = None, Ws: Optional[Tensor] = None, As: Optional[Tensor] = None,
    stats: Optional[tuple[Tensor, Tensor, Tensor]] = None, needed: Optional[Tensor] = None,
    index: Optional[Tensor] = None, track: Optional[Tensor] = None, inside_sq: float = 0.0,
) -> None:
    """The numba / triton call of :func:`run_steps` (arguments already checked; ``index`` numba only)."""
    if W.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"run_steps(backend={be!r}) supports float32 and float64, got {W.dtype}; use 'torch'.")
    W3 = W if rep else W.unsqueeze(0)
    a2 = a if rep else a.unsqueeze(0)
    if index is not None:
        x4 = x.to(W.dtype).contiguous()  # the table; the index carries the (replica, step, example) axes
        index = (index if index.dim() == 3 else index.unsqueeze(0)).contiguous()
    else:
        x4 = (x if x.dim() == 4 else x.unsqueeze(0)).to(W.dtype).contiguous()
    y3 = (y if y.dim() == 3 else y.unsqueeze(0)).to(W.dtype).contiguous()
    Wc = W3.contiguous()
    ac = a2.contiguous()
    lr_t = _per_replica(lr, R, W, "lr")
    rho_t = None if sam_rho is None else _per_replica(sam_rho, R, W, "sam_rho")
    if be == "numba":
        import numpy as np

        from . import numba_cpu

        snap_args = stats_args = None
        if snaps is not None:
            m, d = W.shape[-2:]
            if stats is not None:  # the weights are reduced, not copied: empty copy buffers
                Ws, As = W.new_empty((0, R, m, d)), a.new_empty((0, R, m))
                W0, teacher, out = stats
                W0c = (W0 if rep else W0.unsqueeze(0)).to(W.dtype).contiguous()
                stats_args = (W0c.numpy(), teacher.detach().double().contiguous().numpy(), out.numpy())
            assert Ws is not None and As is not None
            snap_args = (
                np.asarray(snaps, dtype=np.int64),
                Ws.view(-1, R, m, d).numpy(),
                As.view(-1, R, m).numpy(),
            )
        numba_cpu.run(
            Wc.detach().numpy(),
            ac.detach().numpy(),
            x4.numpy(),
            y3.numpy(),
            lr_t.numpy(),
            None if rho_t is None else rho_t.numpy(),
            sam_normalize,
            snap_args,
            stats_args,
            None if needed is None else needed.numpy(),
            None if index is None else index.numpy(),
            None if track is None else track.view(-1).numpy(),
            inside_sq,
        )
    else:
        from . import triton_gpu

        triton_gpu.run(Wc, ac, x4, y3, lr_t, rho_t, sam_normalize)
    if Wc.data_ptr() != W3.data_ptr():
        W3.copy_(Wc)
    if ac.data_ptr() != a2.data_ptr():
        a2.copy_(ac)
