"""The SAM ascent step ε as one pure function, shared by the SAM strategies and the fused two-layer kernels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["sam_perturbation"]


def sam_perturbation(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    rho: float,
    normalize: bool = True,
    adaptive: bool = False,
    eps: float = 1e-12,
    batch_dims: int = 0,
) -> list[Optional[Tensor]]:
    r"""The SAM ascent step ε for parameters ``params`` with gradients ``grads``.

    With :math:`T = |w|` (elementwise) if ``adaptive`` else :math:`T = 1`:

    * ``normalize=True``:  :math:`ε = ρ\, T^2 g / (\|T g\| + \text{eps})` (Foret's SAM; ASAM when adaptive),
    * ``normalize=False``: :math:`ε = ρ\, T^2 g` (unnormalised SAM).

    The norm :math:`\|T g\|` is the *global* Euclidean norm over all given parameters together.

    Args:
        params: the weights ``w`` (only read; used for ``adaptive``).
        grads: the gradients ``g``, same length and shapes as ``params``; an entry ``None`` marks a parameter
            without gradient: it is skipped (not perturbed, not in the norm) and its result is ``None``.
        rho: the radius ρ (> 0).
        normalize: divide by the global gradient norm.
        adaptive: scale by :math:`|w|` (ASAM).
        eps: added to the norm to avoid division by zero (a zero gradient gives ε = 0).
        batch_dims: the first ``batch_dims`` axes of every tensor index independent replicas (all tensors must
            share these leading axes, e.g. ``W`` of shape ``(K, m, d)`` and ``a`` of shape ``(K, m)`` with
            ``batch_dims=1``); the norm is then taken per replica over all remaining axes of all parameters, and
            ``rho`` may be a float or a tensor broadcastable to the replica shape ``(K,)``.

    Returns:
        A list with ε for every parameter (same shape and dtype as the parameter), ``None`` where the gradient is
        ``None``. The function is pure: it does not modify its inputs. Call it under ``torch.no_grad()`` unless you
        want to differentiate through it.
    """
    if len(params) != len(grads):
        raise ValueError(f"sam_perturbation: got {len(params)} params but {len(grads)} grads; they must match.")
    if batch_dims < 0:
        raise ValueError(f"sam_perturbation: batch_dims={batch_dims} must be >= 0.")
    pairs = [(i, p, g) for i, (p, g) in enumerate(zip(params, grads)) if g is not None]
    out: list[Optional[Tensor]] = [None] * len(params)
    if not pairs:
        return out

    batch_shape = pairs[0][2].shape[:batch_dims]
    for _, p, g in pairs:
        if g.shape != p.shape:
            raise ValueError(f"sam_perturbation: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}.")
        if g.dim() < batch_dims or g.shape[:batch_dims] != batch_shape:
            raise ValueError(
                f"sam_perturbation: batch_dims={batch_dims} needs every tensor to start with the replica shape "
                f"{tuple(batch_shape)}, got {tuple(g.shape)}."
            )

    def _expand(x: Tensor, ndim: int) -> Tensor:
        # (replica shape) -> (replica shape, 1, ..., 1) so that it broadcasts against a tensor with ndim axes
        return x.reshape(x.shape + (1,) * (ndim - batch_dims))

    # the norm is accumulated in at least float32 so that bf16/fp16 gradients do not overflow or lose precision
    tg = [(p.abs() * g) if adaptive else g for _, p, g in pairs]
    scale: Union[float, Tensor] = rho
    if normalize:
        sq: Optional[Tensor] = None
        for t in tg:
            acc = t.to(torch.promote_types(t.dtype, torch.float32))
            s = acc.pow(2).sum(dim=tuple(range(batch_dims, t.dim())))  # per replica; a scalar when batch_dims=0
            sq = s if sq is None else sq + s
        assert sq is not None
        scale = rho / (sq.sqrt() + eps)
    if isinstance(scale, Tensor):
        scale = scale.expand(batch_shape) if scale.dim() < batch_dims else scale

    def scale_of(t: Tensor) -> Union[float, Tensor]:
        return _expand(scale, t.dim()) if isinstance(scale, Tensor) else scale

    for (i, p, _), t in zip(pairs, tg):
        # T^2 g = T (T g)
        e = (p.abs() * t) if adaptive else t
        out[i] = (e * scale_of(e)).to(p.dtype)
    return out
