r"""Function-space laziness of any network (the paper's Figs. 3 and 5, for models of any architecture).

On a probe batch ``x`` (k examples, c outputs each), with θ₀ the parameters at the start of training:

* **linearisation gap** (how far the network is from its linearisation around θ₀)::

      gap(t) = ‖f(x; θ_t) − [f(x; θ₀) + J_θ₀ (θ_t − θ₀)]‖ / ‖f(x; θ_t) − f(x; θ₀)‖

  One Jacobian-vector product (``torch.func.jvp`` of ``torch.func.functional_call`` at θ₀ in the direction
  θ_t − θ₀) plus one forward pass at θ_t: ≈ 3 forward passes on the probe. 0 when nothing moved (0/0 := 0).
* **kernel distance** (how far the empirical NTK moved)::

      K = J Jᵀ  (J: the (k·c) × P Jacobian of all outputs on the probe w.r.t. all P parameters)
      dist(t) = 1 − ⟨K₀, K_t⟩_F / (‖K₀‖_F ‖K_t‖_F)

  J is built per example with ``vmap(jacrev)``: k·c backward passes of a single example and k·c·P floats of memory
  (8 examples × 10 classes × 11.2 M parameters of ResNet-18 = 3.6 GB in float32), plus ``(k·c)²·P`` FLOPs for J Jᵀ.

Both are exactly zero for a model that is linear in its parameters (the lazy / NTK limit) and grow as the network
learns features. The network is evaluated in eval mode (batch norm uses running statistics, dropout is off) and left
in the mode it was in; the buffers (running statistics) go through ``functional_call`` as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

__all__ = ["empirical_ntk", "eval_mode", "kernel_distance", "linearization_gap", "parameters_and_buffers"]

Params = dict[str, torch.Tensor]


def parameters_and_buffers(model: nn.Module) -> tuple[Params, Params]:
    """``({name: trainable parameter}, {name: buffer})`` of ``model``, detached (no copy).

    >>> params, buffers = parameters_and_buffers(nn.BatchNorm1d(3))
    >>> sorted(params), sorted(buffers)
    (['bias', 'weight'], ['num_batches_tracked', 'running_mean', 'running_var'])
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    return params, buffers


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Runs the block with every submodule of ``model`` in eval mode, then puts each back in its own mode.

    >>> net = nn.Sequential(nn.Dropout()).train()
    >>> with eval_mode(net):
    ...     net[0].training
    False
    >>> net[0].training
    True
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _forward(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, (params, buffers), (x,), strict=False)


def linearization_gap(
    model: nn.Module,
    params0: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    buffers0: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """‖f(x; θ) − f(x; θ₀) − J_θ₀(θ − θ₀)‖ / ‖f(x; θ) − f(x; θ₀)‖ (0 when f(x; θ) = f(x; θ₀)), a 0-dim float64 tensor.

    Args:
        model: the network; evaluated in eval mode through ``functional_call``.
        params0: θ₀ by parameter name (every trainable parameter of ``model``).
        x: the probe inputs.
        params: θ; default: the model's current parameters.
        buffers: buffers used at θ; default: the model's current buffers.
        buffers0: buffers used at θ₀; default: ``buffers``.

    f(x; w) = w² at x = 1 moved from w₀ = 1 to w = 2: f moved by 3, the linearisation 2w₀·(w − w₀) explains 2, so the
    gap is 1/3:

    >>> class Square(nn.Module):
    ...     def __init__(self): super().__init__(); self.w = nn.Parameter(torch.tensor(2.0))
    ...     def forward(self, x): return self.w ** 2 * x
    >>> linearization_gap(Square(), {"w": torch.tensor(1.0)}, torch.ones(1))
    tensor(0.3333, dtype=torch.float64)
    """
    cur_params, cur_buffers = parameters_and_buffers(model)
    params = dict(cur_params if params is None else params)
    buffers = dict(cur_buffers if buffers is None else buffers)
    buffers0 = dict(buffers if buffers0 is None else buffers0)
    names = list(params0)
    if set(names) != set(params):
        raise ValueError(f"linearization_gap: params0 has {sorted(params0)} but the model has {sorted(params)}.")
    p0 = tuple(params0[n].detach() for n in names)
    delta = tuple(params[n].detach() - params0[n].detach() for n in names)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return _forward(model, dict(zip(names, ps)), buffers0, x)

    with eval_mode(model), torch.no_grad():
        f_t = _forward(model, params, buffers, x)
        f_0, jv = jvp(f, p0, delta)
    moved = (f_t - f_0).double()
    residual = moved - jv.double()
    num, den = residual.norm(), moved.norm()
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def empirical_ntk(
    model: nn.Module,
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The empirical NTK K = J Jᵀ on ``x``, shape ``(k·c, k·c)`` (rows: example-major, then output), float64.

    J is computed per example (``vmap`` over examples of ``jacrev`` over parameters; the network runs in eval mode on
    one example at a time, so batch norm must use running statistics). ``chunk_size`` limits how many examples
    ``vmap`` processes at once (memory). Cost: k·c single-example backward passes, k·c·P floats for J.

    For a linear map without bias, f(x) = W x with one output, J = xᵀ, so K = X Xᵀ:

    >>> net = nn.Linear(2, 1, bias=False)
    >>> empirical_ntk(net, torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    tensor([[5., 3.],
            [3., 9.]], dtype=torch.float64)
    """
    cur_params, cur_buffers = parameters_and_buffers(model)
    params = dict(cur_params if params is None else params)
    buffers = dict(cur_buffers if buffers is None else buffers)
    names = list(params)

    def f_single(ps: Params, xi: torch.Tensor) -> torch.Tensor:
        return _forward(model, ps, buffers, xi.unsqueeze(0)).reshape(-1)

    with eval_mode(model), torch.no_grad():
        jac = vmap(jacrev(f_single), in_dims=(None, 0), chunk_size=chunk_size)(
            {n: params[n].detach() for n in names}, x
        )  # {name: (k, c, *shape)}
        k = x.shape[0]
        rows = torch.cat([jac[n].reshape(k * jac[n].shape[1], -1) for n in names], dim=1)  # (k·c, P)
        del jac
        K = rows @ rows.T
    return K.double()


def kernel_distance(K0: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """1 − ⟨K₀, K⟩_F / (‖K₀‖_F ‖K‖_F), clamped to [0, 2] against rounding; a 0-dim float64 tensor.

    Orthogonal kernels are at distance 1; a kernel and a multiple of it at distance 0:

    >>> kernel_distance(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    tensor(1., dtype=torch.float64)
    >>> kernel_distance(torch.eye(2), 3 * torch.eye(2))
    tensor(0., dtype=torch.float64)
    """
    K0, K = K0.double(), K.double()
    cos = (K0 * K).sum() / (K0.norm() * K.norm()).clamp_min(torch.finfo(torch.float64).tiny)
    return (1.0 - cos).clamp(0.0, 2.0)
