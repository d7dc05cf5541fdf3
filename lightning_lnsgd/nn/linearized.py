r"""The first-order Taylor model of any network around its initial weights, as a trainable ``nn.Module``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..metrics.functional.laziness import Params, first_order_terms, network_function

__all__ = ["Linearized"]

#: Name of the submodule that holds θ₀.
THETA0 = "theta0"


def _call_with_arguments(module: nn.Module, arguments: tuple[tuple[Any, ...], dict[str, Any]]) -> torch.Tensor:
    args, kwargs = arguments
    return module(*args, **kwargs)


def _container(root: nn.Module, path: str) -> nn.Module:
    """The submodule of ``root`` at the dotted ``path``, created (as an empty ``nn.Module``) where missing."""
    module = root
    for part in path.split(".") if path else []:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]  # type: ignore[assignment]
    return module


def _tensor_at(root: nn.Module, name: str) -> torch.Tensor:
    """The tensor at the dotted ``name`` of ``root`` as it is now (also inside ``functional_call``, which swaps
    plain tensors in where the parameters were)."""
    path, _, leaf = name.rpartition(".")
    return getattr(root.get_submodule(path) if path else root, leaf)


class Linearized(nn.Module):
    r"""The first-order Taylor model of ``module`` around its parameters θ₀ at construction:

        f_lin(x; θ) = f(x; θ₀) + J_θ₀ f(x) · (θ − θ₀)

    an ``nn.Module`` whose ``parameters()`` are θ (initialised to θ₀), so any optimizer, the ``sam``/``sam_ddp``
    strategies, :class:`~lightning_lnsgd.LabelNoise`, :class:`~lightning_lnsgd.DynamicsMonitor` and
    :class:`~lightning_lnsgd.Laziness` train and measure it unchanged. f_lin is linear in θ (not in x): trained by
    gradient descent on the squared loss it follows the neural-tangent-kernel dynamics of ``module`` exactly.

    * **Names.** It takes ``module`` over and keeps its submodule, parameter and buffer names (``fc.weight`` of the
      module is ``fc.weight`` of the Linearized), so layer names given to the callbacks do not change. θ₀ is stored
      as buffers under ``theta0.`` (``theta0.fc.weight``), so ``state_dict()``/``load_state_dict()`` round-trip and
      checkpoints resume. The parameters *are* the module's (trained in place): wrap ``copy.deepcopy(net)`` to keep
      ``net`` as it was.
    * **Buffers** (batch-norm running statistics) are those of the module at construction, and stay so: each layer
      runs in its own mode (a batch-norm layer in train mode normalises with the batch's statistics, in eval mode with
      the stored ones), but the running-statistics updates of train mode are made on copies and discarded, so that
      f(x; θ₀) stays the network at θ₀.
    * **Parameters** linearised: all of the module's (``requires_grad=False`` ones too: they never move, so their
      term is zero).
    * **Cost.** One ``torch.func.jvp`` of ``torch.func.functional_call`` at θ₀ in the direction θ − θ₀: about three
      forward passes of ``module`` per forward (and the matching backward), and one extra copy of the parameters (θ₀)
      in memory. The module must support forward-mode AD (``torch.func.jvp``); fused attention kernels do not (see
      :func:`~lightning_lnsgd.metrics.functional.laziness.autodiff_kernels`).

    Args:
        module: the network; called as ``module(*args, **kwargs)`` with the Linearized's arguments, returning a tensor.

    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    >>> lin = Linearized(net)
    >>> [name for name, _ in lin.named_parameters()]
    ['0.weight', '0.bias', '2.weight', '2.bias']
    >>> x = torch.randn(4, 2)
    >>> torch.allclose(lin(x), net(x))  # equal at θ₀
    True
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"Linearized: module={type(module).__name__} must be an nn.Module.")
        if isinstance(module, Linearized):
            raise ValueError("Linearized: module is already a Linearized; wrap the network itself.")
        if THETA0 in module._modules or hasattr(module, THETA0):
            raise ValueError(f"Linearized: module has an attribute named {THETA0!r}, the name that holds θ₀; rename it.")
        # Outside the module tree: its children, parameters and buffers are registered on self under their own names.
        self.__dict__["_module"] = module
        for name, child in module._modules.items():
            self.add_module(name, child)
        for name, param in module._parameters.items():
            self.register_parameter(name, param)
        for name, buf in module._buffers.items():
            self.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
        self._param_names = [n for n, _ in module.named_parameters()]
        self._buffer_names = [n for n, _ in module.named_buffers()]
        self.add_module(THETA0, nn.Module())
        for name, param in module.named_parameters():
            path, _, leaf = name.rpartition(".")
            _container(self.theta0, path).register_buffer(leaf, param.detach().clone())
        self.train(module.training)

    @property
    def module(self) -> nn.Module:
        """The wrapped network (its parameters are this module's)."""
        return self._module  # type: ignore[no-any-return]

    def train(self, mode: bool = True) -> Linearized:
        super().train(mode)
        self._module.training = mode
        return self

    def parameters0(self) -> Params:
        """θ₀: ``{parameter name: tensor}`` (the stored buffers, not copies)."""
        return {n: _tensor_at(self.theta0, n) for n in self._param_names}

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """f(x; θ₀) + J_θ₀ f(x) · (θ − θ₀) on the module's arguments."""
        theta = {n: _tensor_at(self, n) for n in self._param_names}
        buffers = {n: _tensor_at(self, n) for n in self._buffer_names}
        network = network_function(self._module, _call_with_arguments)

        def with_fresh_buffers(params: Params, buffers: Params, arguments: Any) -> torch.Tensor:
            # Inside the jvp: train-mode batch norm updates its running statistics in place on these copies.
            return network(params, {n: b.clone() for n, b in buffers.items()}, arguments)

        f0, jv = first_order_terms(with_fresh_buffers, self.parameters0(), theta, buffers, (args, kwargs))
        return f0 + jv

    def extra_repr(self) -> str:
        return f"around {type(self._module).__name__}: {len(self._param_names)} parameter tensors, θ₀ in `theta0`"
