"""The math core of the two-layer linear network ŷ = aᵀWx, shared by every training path.

Shapes: ``W`` is ``(..., m, d)`` (row i = neuron wᵢ), ``a`` is ``(..., m)``, inputs ``x`` are
``(..., B, d)`` and targets ``y`` are ``(..., B)``; any leading axes (stacked replicas, steps)
broadcast. The generic Lightning path differentiates :func:`predict` with autograd; the fast
engine calls :func:`grads` directly; tests check that the two agree.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "balancedness",
    "end_to_end",
    "grads",
    "half_mse",
    "half_mse_of_theta",
    "ntk_init",
    "predict",
    "sgd_step",
    "sgd_step_",
]


def end_to_end(W: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The end-to-end linear predictor θ = Wᵀa, shape ``(..., d)``."""
    # A batched matmul: einsum's generic path was ~100× slower here for (m, d) = (1000, 20).
    return (a.unsqueeze(-2) @ W).squeeze(-2)


def predict(W: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Predictions ŷ = aᵀWx = θᵀx for a batch ``x`` of shape ``(..., B, d)``; returns ``(..., B)``."""
    return (x @ end_to_end(W, a).unsqueeze(-1)).squeeze(-1)


def half_mse(W: torch.Tensor, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss ½·mean_b (ŷ_b − y_b)² over the batch axis, shape ``(...)``."""
    return 0.5 * (predict(W, a, x) - y).square().mean(-1)


def half_mse_of_theta(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`half_mse` of the network whose end-to-end predictor is ``theta`` ``(..., d)`` (computed in its dtype)."""
    dt = theta.dtype
    return 0.5 * ((x.to(dt) @ theta.unsqueeze(-1)).squeeze(-1) - y.to(dt)).square().mean(-1)


def _theta_grad(
    W: torch.Tensor, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, r)``: residuals r = ŷ − y and g = xᵀr / B, the loss gradient with respect to θ = Wᵀa."""
    r = predict(W, a, x) - y
    return (r.unsqueeze(-2) @ x).squeeze(-2) / x.shape[-2], r


def grads(
    W: torch.Tensor, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`half_mse`: ``(∇_W, ∇_a, r)``.

    With residuals r = ŷ − y and g = xᵀr / B (the gradient with respect to θ):
    ∇_W = a gᵀ (outer product, ``(..., m, d)``), ∇_a = W g (``(..., m)``).
    """
    g, r = _theta_grad(W, a, x, y)
    return a.unsqueeze(-1) * g.unsqueeze(-2), (W @ g.unsqueeze(-1)).squeeze(-1), r


def sgd_step(
    W: torch.Tensor, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain SGD step of both layers (simultaneous update); returns the new ``(W, a)``.

    ``lr`` is a float or a tensor broadcastable to the leading axes of ``a`` (per-replica η).
    """
    gW, ga, _ = grads(W, a, x, y)
    lr_t = torch.as_tensor(lr, dtype=W.dtype, device=W.device)
    return W - lr_t[..., None, None] * gW, a - lr_t[..., None] * ga


def sgd_step_(W: torch.Tensor, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float | torch.Tensor) -> None:
    """:func:`sgd_step` in place, for ``W`` of shape ``(m, d)`` or ``(R, m, d)``: the hot loop of the torch backend.

    The same gradients as :func:`grads`, with the outer-product update fused into one
    ``addr_``/``baddbmm_`` call (7 kernels a step instead of 11); tests check it equals :func:`sgd_step`.
    """
    if W.dim() not in (2, 3):
        W_new, a_new = sgd_step(W, a, x, y, lr)
        W.copy_(W_new), a.copy_(a_new)
        return
    if W.dim() == 2 and x.dim() == 2:  # one network: matrix–vector products, no broadcasting views
        r = x @ (a @ W) - y
        g = r @ x
        ga = W @ g
        step = -float(lr) / x.shape[0]  # the 1/B of the mean folded into the step
        W.addr_(a, g, alpha=step)
        a.add_(ga, alpha=step)
        return
    g, _ = _theta_grad(W, a, x, y)
    ga = (W @ g.unsqueeze(-1)).squeeze(-1)
    if W.dim() == 2:
        lr_f = float(lr)
        W.addr_(a, g, alpha=-lr_f)
        a.add_(ga, alpha=-lr_f)
        return
    lr_t = torch.as_tensor(lr, dtype=W.dtype, device=W.device)
    if lr_t.ndim == 0:
        W.baddbmm_(a.unsqueeze(-1), g.unsqueeze(-2), alpha=-float(lr_t))
        a.add_(ga, alpha=-float(lr_t))
    else:
        W.baddbmm_((a * lr_t.unsqueeze(-1)).unsqueeze(-1), g.unsqueeze(-2), alpha=-1.0)
        a.sub_(lr_t.unsqueeze(-1) * ga)


def balancedness(W: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-neuron balancedness ‖wᵢ‖² − aᵢ², shape ``(..., m)``; gradient flow conserves it."""
    return W.square().sum(-1) - a.square()


def ntk_init(
    width: int,
    dim: int,
    init_scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NTK initialisation: W_ij ~ N(0, 1/d) (so ‖wᵢ‖ ≈ 1) and aᵢ ~ N(0, 1/m), times ``init_scale``.

    Drawn on the CPU from a ``torch.Generator`` seeded with ``seed`` (in float64, then cast), so
    a seed gives the same network on every device and in every dtype.
    """
    gen = torch.Generator().manual_seed(int(seed))
    W = torch.randn(width, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    a = torch.randn(width, generator=gen, dtype=torch.float64) / math.sqrt(width)
    return (W * init_scale).to(dtype), (a * init_scale).to(dtype)
