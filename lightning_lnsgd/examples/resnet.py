"""Backbones for :class:`~lightning_lnsgd.vision.ImageClassifier`: the CIFAR ResNet-18 and a flat MLP (standard or NTK
parameterisation).

:class:`ResNet18` is the CIFAR variant used by the paper's Fig. 1 runs (and by HaoChen et al. 2021, Damian et al.
2021): a 3×3 stride-1 stem convolution, no max-pool, four stages of two BasicBlocks with widths 64, 128, 256, 512
(strides 1, 2, 2, 2), global average pooling and a linear head. ``width`` multiplies every channel count (tests use
``width=0.125``: 8..64 channels). On 32×32 inputs the full network has 11.2 M parameters and ≈ 0.56 GFLOP per image
(forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "BasicBlock", "ImageMLP", "NTKLinear", "ResNet18"]

#: The MLP's activations by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with an identity (or 1×1 conv–BN projection) shortcut, ReLU after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3×3 stem, no max-pool, BasicBlocks [2, 2, 2, 2], widths ``width`` × (64, 128, 256, 512).

    Args:
        num_classes: outputs of the linear head.
        in_channels: image channels (3 for CIFAR-10, 1 for the digits).
        width: channel multiplier (> 0); each stage has ``max(1, round(width · base))`` channels.

    Module paths (for ``DynamicsMonitor.layers`` / ``PruningCurve.parameters``): ``conv1``, ``bn1``,
    ``layer{1..4}.{0,1}.conv{1,2}``, ``layer{2..4}.0.shortcut.0``, ``fc``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"ResNet18: need num_classes >= 1 and in_channels >= 1, got {num_classes}, {in_channels}.")
        if not width > 0:
            raise ValueError(f"ResNet18: `width` must be > 0, got {width}.")
        widths = [max(1, int(round(width * w))) for w in (64, 128, 256, 512)]
        self.widths = widths
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for planes, stride in zip(widths, (1, 2, 2, 2)):
            blocks = []
            for s in (stride, 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class NTKLinear(nn.Linear):
    """A linear layer in the NTK parameterisation (Jacot et al. 2018): y = W x / √fan_in + β b with W and b drawn
    N(0, 1), so that the network's tangent kernel has a limit as the width grows and training becomes lazy.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: learn the bias b.
        bias_scale: β, the bias multiplier (Jacot et al. use 0.1).

    The parameters keep ``nn.Linear``'s names and shapes (``weight``, ``bias``); only their scale and the forward differ.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_scale: float = 0.1) -> None:
        self.bias_scale = float(bias_scale)
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.normal_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight) / self.in_features**0.5
        return out if self.bias is None else out + self.bias_scale * self.bias


class ImageMLP(nn.Module):
    """Flattens the image and applies layers ``hidden`` with ``activation`` after each, and a linear head.

    Args:
        input_shape: ``[C, H, W]`` of the images.
        num_classes: outputs of the head.
        hidden: hidden widths.
        activation: ``"relu"`` or ``"tanh"``.
        parameterization: ``"standard"`` (``nn.Linear``: PyTorch's uniform initialisation) or ``"ntk"``
            (:class:`NTKLinear`: weights N(0, 1), each layer's output scaled by 1/√fan_in; the head too).

    Module paths: ``layers.0``, ``layers.2``, ... (the linear layers; activations in between) and ``fc`` (the head).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int = 10,
        hidden: Sequence[int] = (512,),
        activation: str = "relu",
        parameterization: str = "standard",
    ) -> None:
        super().__init__()
        dim = 1
        for s in input_shape:
            dim *= int(s)
        if dim < 1 or num_classes < 1 or any(int(h) < 1 for h in hidden):
            raise ValueError(
                f"ImageMLP: need a non-empty input shape, num_classes >= 1 and hidden widths >= 1; got "
                f"input_shape={list(input_shape)}, num_classes={num_classes}, hidden={list(hidden)}."
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"ImageMLP: activation={activation!r} must be one of {sorted(ACTIVATIONS)}.")
        if parameterization not in ("standard", "ntk"):
            raise ValueError(f"ImageMLP: parameterization={parameterization!r} must be 'standard' or 'ntk'.")
        linear = NTKLinear if parameterization == "ntk" else nn.Linear
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [linear(dim, int(h)), ACTIVATIONS[activation]()]
            dim = int(h)
        self.layers = nn.Sequential(*layers)
        self.fc = linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(x.flatten(1)))
