"""Building blocks of the kernel-regime studies (:mod:`.width`, :mod:`.fig5`): a fixed small image subset, the wide
NTK-parameterised tanh MLP with its :class:`~lightning_lnsgd.Linearized` twin, full-batch gradient descent on the
squared error, and log–log slopes."""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ...nn import Linearized
from ..resnet import ImageMLP
from ..vision import squared_error

__all__ = ["ImageSubset", "add_regime_arguments", "gd_step", "image_subset", "loglog_slope", "ntk_mlp_pair"]


def add_regime_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options both kernel-regime studies take: the network (``--depth``), full-batch GD (``--steps``,
    ``--lr``), the image subset (``--n-train``, ``--n-test``, ``--data-seed``) and the kernel's test images
    (``--kernel-examples``)."""
    parser.add_argument("--depth", type=int, default=2, help="hidden layers (default %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="full-batch GD steps (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1.0, help="learning rate (default %(default)s)")
    parser.add_argument("--n-train", type=int, default=64,
                        help="training images, one full batch (default %(default)s)")
    parser.add_argument("--n-test", type=int, default=256, help="test images (default %(default)s)")
    parser.add_argument("--kernel-examples", type=int, default=4,
                        help="test images of the kernel (default %(default)s)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the image subset (default %(default)s)")


@dataclass(frozen=True)
class ImageSubset:
    """A fixed training subset and test subset: normalised images ``(n, C, H, W)`` and class indices ``(n,)``."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def image_subset(data: str = "digits", n_train: int = 64, n_test: int = 256, seed: int = 0,
                 data_dir: Optional[str] = None) -> ImageSubset:
    """``n_train`` training and ``n_test`` test images drawn without replacement (generator seeded with ``seed``)
    from the digits (:class:`~lightning_lnsgd.DigitsDataModule`'s split and normalisation) or CIFAR-10
    (:class:`~lightning_lnsgd.CIFAR10DataModule`, files under ``data_dir``; no download), without augmentation."""
    if data == "digits":
        from ..vision import DigitsDataModule

        dm = DigitsDataModule()
    elif data == "cifar10":
        from ..cifar import CIFAR10DataModule

        dm = CIFAR10DataModule(data_dir=data_dir, augment=False, num_workers=0)
    else:
        raise ValueError(f"image_subset: data={data!r} must be 'digits' or 'cifar10'.")
    dm.setup("fit")
    train, test = dm.train_set, dm.val_set
    assert train is not None and test is not None
    if not (1 <= n_train <= len(train) and 1 <= n_test <= len(test)):
        raise ValueError(
            f"image_subset: n_train={n_train} and n_test={n_test} must be in [1, {len(train)}] and [1, {len(test)}] for {data}."
        )
    g = torch.Generator().manual_seed(seed)
    x, y = train.__getitems__(torch.randperm(len(train), generator=g)[:n_train].tolist())
    x_test, y_test = test.__getitems__(torch.randperm(len(test), generator=g)[:n_test].tolist())
    return ImageSubset(x, y, x_test, y_test)


def ntk_mlp_pair(input_shape: Sequence[int], num_classes: int, width: int, depth: int = 2,
                 seed: int = 0) -> tuple[ImageMLP, Linearized]:
    """A tanh MLP in the NTK parameterisation (``depth`` hidden layers of ``width``; weights from ``seed``) and its
    Taylor model around the same initial weights (a separate copy)."""
    torch.manual_seed(seed)
    net = ImageMLP(input_shape, num_classes, [width] * depth, activation="tanh", parameterization="ntk")
    return net, Linearized(copy.deepcopy(net))


def gd_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    """One full-batch gradient-descent step on :func:`~lightning_lnsgd.examples.vision.squared_error`; returns the
    loss before the step."""
    model.zero_grad(set_to_none=True)
    loss = squared_error(model(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
    return float(loss.detach())


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of log y against log x.

    >>> round(loglog_slope([1, 2, 4, 8], [1, 0.5, 0.25, 0.125]), 6)
    -1.0
    """
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
