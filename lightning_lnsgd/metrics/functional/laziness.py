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

:func:`relative_kernel_change` ‖K_t − K₀‖_F / ‖K₀‖_F is the kernel's change in the form lazy-training theory bounds
(it also sees a change of scale); :func:`first_order_terms` is the one ``jvp`` behind both the gap and
:class:`~lightning_lnsgd.Linearized`.

Both are exactly zero for a model that is linear in its parameters (the lazy / NTK limit) and grow as the network
learns features. The network is evaluated in eval mode (batch norm uses running statistics, dropout is off) and left
in the mode it was in; the buffers (running statistics) go through ``functional_call`` as well.

**How the network is called.** By default f(x) = ``model(x)`` with ``x`` a tensor. ``forward=fn`` measures
f(batch) = ``fn(model, batch)`` instead, for models with several inputs (``model(inputs, target)``), with no
``forward`` of their own, or returning more than the output (``model(x, hidden)[0]``): ``fn`` runs inside
``functional_call`` on a wrapper module whose only child is ``model``, so every parameter and buffer ``fn`` reaches
through ``model`` is the one being differentiated. ``batch`` is then any nesting of tuples, lists and dicts whose
tensors of rank ≥ 1 hold the examples along dim 0 (batch first); 0-dim tensors and other values are passed unchanged.
``fn`` must return a tensor.

**Kernels.** Fused inference kernels have no forward-mode (``jvp``) or batched (``vmap``) derivatives: the
multi-head-attention fast path, the flash / memory-efficient scaled-dot-product attention, and the oneDNN / cuDNN
recurrent layers. Both functions run under :func:`autodiff_kernels`, which selects PyTorch's math implementations
of these (the oneDNN / cuDNN switch only for models containing an ``nn.RNNBase``, since it also covers convolutions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "autodiff_kernels",
    "concat_examples",
    "empirical_ntk",
    "eval_mode",
    "first_examples",
    "first_order_terms",
    "kernel_distance",
    "linearization_gap",
    "map_tensors",
    "network_function",
    "num_examples",
    "parameters_and_buffers",
    "relative_kernel_change",
    "VmapFailed",
]


class VmapFailed(RuntimeError):
    """``vmap`` could not batch the probe examples through the network (data-dependent control flow such as
    ``if mask.all():`` or ``.item()`` in its forward, or an ``nn.LSTM`` whose state is built inside the call);
    ``chunk_size=1`` computes the same kernel one example at a time without ``vmap``. ``__cause__``: vmap's error.

    >>> class Gate(nn.Module):  # branches on the value of its input
    ...     def __init__(self): super().__init__(); self.w = nn.Parameter(torch.ones(2))
    ...     def forward(self, x): return x @ self.w if x.sum() > 0 else -(x @ self.w)
    >>> try:
    ...     empirical_ntk(Gate(), torch.ones(3, 2))
    ... except VmapFailed:
    ...     print(empirical_ntk(Gate(), torch.ones(3, 2), chunk_size=1))
    tensor([[2., 2., 2.],
            [2., 2., 2.],
            [2., 2., 2.]], dtype=torch.float64)
    """

Params = dict[str, torch.Tensor]

#: How the network is called on a probe batch: ``forward(model, batch)`` returns the output tensor being measured.
Forward = Callable[[nn.Module, Any], torch.Tensor]


# ------------------------------------------------------------------------------------------------------------------
# Probe batches: tensors with the examples along dim 0, nested in tuples, lists and dicts
# ------------------------------------------------------------------------------------------------------------------
def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """``batch`` with every tensor ``t`` replaced by ``fn(t)``, through tuples (named ones too), lists and dicts.

    >>> map_tensors(lambda t: t * 2, {"x": torch.ones(2), "n": 3})
    {'x': tensor([2., 2.]), 'n': 3}
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: map_tensors(fn, v) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple: rebuilt from fields
        return type(batch)(*(map_tensors(fn, v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def _example_tensors(batch: Any) -> list[torch.Tensor]:
    """The tensors of rank ≥ 1 of ``batch`` (examples along dim 0), in :func:`map_tensors` order."""
    found: list[torch.Tensor] = []
    map_tensors(lambda t: found.append(t) if t.ndim else None, batch)
    return found


def _replace_example_tensors(batch: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """``batch`` with its tensors of rank ≥ 1 replaced, in order, by ``tensors``."""
    it = iter(tensors)
    return map_tensors(lambda t: next(it) if t.ndim else t, batch)


def num_examples(batch: Any) -> int:
    """The number of examples in ``batch``: the common size of dim 0 of its tensors of rank ≥ 1.

    >>> num_examples((torch.zeros(3, 5), torch.zeros(3), torch.tensor(1.0)))
    3
    """
    sizes = {t.shape[0] for t in _example_tensors(batch)}
    if len(sizes) != 1:
        found = "no tensor of rank >= 1" if not sizes else f"tensors with {sorted(sizes)} rows"
        raise ValueError(f"probe batch: found {found}; its tensors must hold the same examples along dim 0.")
    return sizes.pop()


def first_examples(batch: Any, n: int) -> Any:
    """The first ``n`` examples of ``batch`` (each tensor of rank ≥ 1 sliced ``[:n]``).

    >>> first_examples([torch.arange(4), torch.tensor(7)], 2)
    [tensor([0, 1]), tensor(7)]
    """
    return map_tensors(lambda t: t[:n] if t.ndim else t, batch)


def concat_examples(batches: Sequence[Any]) -> Any:
    """The examples of ``batches`` (same layout) one after the other; values other than tensors of rank ≥ 1 are taken
    from the first batch.

    >>> concat_examples([(torch.zeros(2), "a"), (torch.ones(1), "b")])
    (tensor([0., 0., 1.]), 'a')
    """
    columns = zip(*(_example_tensors(b) for b in batches))
    return _replace_example_tensors(batches[0], [torch.cat(column) for column in columns])


# ------------------------------------------------------------------------------------------------------------------
# Calling the network
# ------------------------------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def autodiff_kernels(model: nn.Module) -> Iterator[None]:
    """Runs the block with the math implementations of attention (and, when ``model`` contains an ``nn.RNNBase``, of
    recurrent layers: oneDNN and cuDNN off), which ``torch.func.jvp`` and ``vmap`` can differentiate; the previous
    settings are restored afterwards.

    >>> with autodiff_kernels(nn.LSTM(2, 2)):
    ...     torch.backends.mha.get_fastpath_enabled(), torch.backends.mkldnn.enabled
    (False, False)
    >>> torch.backends.mha.get_fastpath_enabled()
    True
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    recurrent = any(isinstance(m, nn.RNNBase) for m in model.modules())
    mkldnn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    torch.backends.mha.set_fastpath_enabled(False)
    if recurrent:
        torch.backends.mkldnn.enabled = False
        torch.backends.cudnn.enabled = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = mkldnn, cudnn


class _Called(nn.Module):
    """``forward(module, batch)`` as a module whose only child is ``module``, so that ``functional_call`` can swap the
    parameters and buffers that the user's function reaches through ``module``."""

    def __init__(self, module: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.module = module
        self.call = forward

    def forward(self, batch: Any) -> Any:
        return self.call(self.module, batch)


def network_function(model: nn.Module, forward: Optional[Forward] = None) -> Callable[[Params, Params, Any], torch.Tensor]:
    """``f(params, buffers, batch)``: the network's output on ``batch`` with the given parameters and buffers (named as
    in ``model``, swapped in through ``functional_call``); ``model(batch)`` or ``forward(model, batch)``.

    >>> f = network_function(nn.Linear(1, 1))
    >>> f({"weight": torch.tensor([[2.0]]), "bias": torch.tensor([1.0])}, {}, torch.tensor([[3.0]]))
    tensor([[7.]])
    """
    target, prefix = (model, "") if forward is None else (_Called(model, forward), "module.")

    def f(params: Params, buffers: Params, batch: Any) -> torch.Tensor:
        state = ({prefix + n: v for n, v in params.items()}, {prefix + n: v for n, v in buffers.items()})
        out = functional_call(target, state, (batch,), strict=False)
        if not isinstance(out, torch.Tensor):
            how = "model(x)" if forward is None else "forward(model, batch)"
            raise TypeError(
                f"{how} returned a {type(out).__name__}, not a tensor: pass forward=(module, batch) -> the output tensor."
            )
        return out

    return f


def first_order_terms(
    network: Callable[[Params, Params, Any], torch.Tensor],
    params0: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    buffers0: Mapping[str, torch.Tensor],
    batch: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x; θ₀), J_θ₀ f(x) · (θ − θ₀))``: the two terms of the first-order Taylor model, from one ``torch.func.jvp``
    of ``network`` (see :func:`network_function`) at θ₀ = ``params0`` in the direction θ − θ₀ (≈ 3 forward passes).

    The second term is differentiable in ``params`` (θ) by ordinary autograd; ``params0`` and ``buffers0`` are
    constants. The names of ``params0`` are the ones differentiated.

    f(w) = w² x at x = 1, w₀ = 1, w = 3: f(w₀) = 1 and f'(w₀)·(w − w₀) = 2 · 2 = 4:

    >>> square = lambda p, b, x: p["w"] ** 2 * x
    >>> first_order_terms(square, {"w": torch.tensor(1.0)}, {"w": torch.tensor(3.0)}, {}, torch.tensor(1.0))
    (tensor(1.), tensor(4.))
    """
    names = list(params0)
    p0 = tuple(params0[n] for n in names)
    delta = tuple(params[n] - params0[n] for n in names)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return network(dict(zip(names, ps)), dict(buffers0), batch)

    return jvp(f, p0, delta)


def linearization_gap(
    model: nn.Module,
    params0: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    buffers0: Mapping[str, torch.Tensor] | None = None,
    forward: Optional[Forward] = None,
) -> torch.Tensor:
    """‖f(x; θ) − f(x; θ₀) − J_θ₀(θ − θ₀)‖ / ‖f(x; θ) − f(x; θ₀)‖ (0 when f(x; θ) = f(x; θ₀)), a 0-dim float64 tensor.

    Args:
        model: the network; evaluated in eval mode through ``functional_call``.
        params0: θ₀ by parameter name (every trainable parameter of ``model``).
        x: the probe: a tensor, called as ``model(x)``; with ``forward``, any probe batch (see the module's notes).
        params: θ; default: the model's current parameters.
        buffers: buffers used at θ; default: the model's current buffers.
        buffers0: buffers used at θ₀; default: ``buffers``.
        forward: how the network is called: ``forward(model, x)`` returns the output tensor; default ``model(x)``.

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
    if set(params0) != set(params):
        raise ValueError(f"linearization_gap: params0 has {sorted(params0)} but the model has {sorted(params)}.")
    p0 = {n: v.detach() for n, v in params0.items()}
    net = network_function(model, forward)
    with eval_mode(model), autodiff_kernels(model), torch.no_grad():
        f_t = net(params, buffers, x)
        f_0, jv = first_order_terms(net, p0, params, buffers0, x)
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
    forward: Optional[Forward] = None,
) -> torch.Tensor:
    """The empirical NTK K = J Jᵀ on ``x``, shape ``(k·c, k·c)`` (rows: example-major, then output), float64.

    J is computed per example (``vmap`` over examples of ``jacrev`` over parameters; the network runs in eval mode on
    one example at a time, so batch norm must use running statistics). ``chunk_size`` limits how many examples
    ``vmap`` processes at once (memory); ``chunk_size=1`` takes one example at a time in a loop, without ``vmap`` over
    examples, for networks that ``vmap`` cannot batch: data-dependent control flow in the forward (Hugging Face
    BERT's attention-mask code, ``.item()``) or an ``nn.LSTM`` whose initial state is built inside the call; for those
    the batched path raises :class:`VmapFailed`.
    Cost: k·c single-example backward passes, k·c·P floats for J. ``x`` and ``forward`` as in
    :func:`linearization_gap`; each example is passed as a probe batch of one example.

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
    net = network_function(model, forward)
    k, examples = num_examples(x), _example_tensors(x)
    ps = {n: params[n].detach() for n in names}

    def f_single(ps: Params, *example: torch.Tensor) -> torch.Tensor:
        return net(ps, buffers, _replace_example_tensors(x, [t.unsqueeze(0) for t in example])).reshape(-1)

    def rows_of(jac: Params, m: int) -> torch.Tensor:  # {name: (m, c, *shape)} -> (m·c, P)
        return torch.cat([jac[n].reshape(m * jac[n].shape[1], -1) for n in names], dim=1)

    with eval_mode(model), autodiff_kernels(model), torch.no_grad():
        if chunk_size == 1:
            per_example = jacrev(f_single)
            rows = torch.cat([rows_of({n: j.unsqueeze(0) for n, j in per_example(ps, *(t[i] for t in examples)).items()}, 1)
                              for i in range(k)])
        else:
            batched = vmap(jacrev(f_single), in_dims=(None, *(0 for _ in examples)), chunk_size=chunk_size)
            try:
                rows = rows_of(batched(ps, *examples), k)
            except (RuntimeError, NotImplementedError) as err:
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise VmapFailed(
                    f"empirical_ntk: vmap over the probe examples failed ({first}); chunk_size=1 computes the "
                    "Jacobian one example at a time without vmap."
                ) from err
        K = rows @ rows.T
    return K.double()


def relative_kernel_change(K0: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """‖K − K₀‖_F / ‖K₀‖_F, the relative change of the empirical NTK (the quantity that lazy-training theory bounds by
    O(m^-1/2) in the width m); a 0-dim float64 tensor. Unlike :func:`kernel_distance` it also sees a change of scale.

    >>> relative_kernel_change(torch.eye(2), 3 * torch.eye(2))
    tensor(2., dtype=torch.float64)
    """
    K0, K = K0.double(), K.double()
    return (K - K0).norm() / K0.norm().clamp_min(torch.finfo(torch.float64).tiny)


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
