"""Real networks on real images: :class:`ImageClassifier`, :class:`DigitsDataModule` (and re-exports).

* :class:`ImageClassifier`: any backbone (``"resnet18"``, ``"mlp"`` or an ``nn.Module``) trained by SGD on
  cross-entropy; plugs into :class:`~lightning_lnsgd.LabelNoise` (``kind="flip"``), the ``sam``/``sam_ddp``
  strategies, :class:`~lightning_lnsgd.callbacks.DynamicsMonitor`, :class:`~lightning_lnsgd.callbacks.PruningCurve`
  and :class:`~lightning_lnsgd.callbacks.Laziness` without special cases.
* :class:`DigitsDataModule`: scikit-learn's bundled 8×8 digits (1,797 images, 10 classes, no download).
* Re-exported: :class:`~lightning_lnsgd.cifar.CIFAR10DataModule`, :class:`~lightning_lnsgd.resnet.ResNet18`.

See ``docs/real-networks.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from ..compat import LightningDataModule, LightningModule, trainer_of
from ..strategies.sam import is_perturbed_pass
from .cifar import CIFAR10DataModule, ImageBatches, collate_batch
from ..nn import Linearized
from .resnet import ACTIVATIONS, ImageMLP, ResNet18

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageClassifier",
    "ImageMLP",
    "ResNet18",
    "build_backbone",
    "squared_error",
]


def squared_error(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """½‖f(x) − e_y‖² averaged over the batch: class scores ``(B, C)`` against class indices ``(B,)`` (e_y one-hot).

    >>> squared_error(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1]))
    tensor(0.2500)
    """
    target = F.one_hot(y, scores.shape[-1]).to(scores.dtype)
    return 0.5 * (scores - target).pow(2).sum(-1).mean()


# ------------------------------------------------------------------------------------------------------------------
# Digits
# ------------------------------------------------------------------------------------------------------------------
class DigitsDataModule(LightningDataModule):
    """scikit-learn's digits: 1,797 grey 8×8 images (pixel values 0..16), 10 classes; needs ``scikit-learn``.

    A fixed random split (``seed``) into ``n_val`` validation images (also the test set) and the rest for training.
    Pixels are scaled to [0, 1] and normalised with the training split's mean and standard deviation (one channel).

    Args:
        n_val: validation/test images (the rest train; default 497, so 1,300 train).
        batch_size: training batch size (validation uses the same).
        seed: seed of the split.
        augment: random crop with ``padding`` (1 pixel by default) of the training images; no flips (digits are
            not mirror-symmetric).
        padding: crop padding in pixels.
        num_workers: DataLoader workers (0 is fastest for this tiny set).

    Batches are ``(images, labels)``: float32 ``(B, 1, 8, 8)``, int64 ``(B,)``.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        n_val: int = 497,
        batch_size: int = 64,
        seed: int = 0,
        augment: bool = False,
        padding: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 1 <= n_val < 1797:
            raise ValueError(f"DigitsDataModule: `n_val` must be in [1, 1796], got {n_val}.")
        if batch_size < 1:
            raise ValueError(f"DigitsDataModule: `batch_size` must be >= 1, got {batch_size}.")
        self.save_hyperparameters()
        self.n_val, self.batch_size, self.seed = n_val, batch_size, seed
        self.augment, self.padding, self.num_workers = augment, padding, num_workers
        self.train_set: ImageBatches | None = None
        self.val_set: ImageBatches | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "DigitsDataModule needs scikit-learn: `pip install scikit-learn` (or `pip install lightning-lnsgd[examples]`)."
            ) from err
        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
        y = torch.as_tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = perm[: self.n_val], perm[self.n_val :]
        scaled = x[train_idx].float() / 16.0
        mean, std = [float(scaled.mean())], [float(scaled.std())]
        self.train_set = ImageBatches(
            x[train_idx], y[train_idx], mean, std, self.augment, self.padding, scale=16.0, flip=False
        )
        self.val_set = ImageBatches(x[val_idx], y[val_idx], mean, std, augment=False, scale=16.0)

    def _loader(self, dataset: ImageBatches, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers, collate_fn=collate_batch
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_set is not None
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self.val_set is not None
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ------------------------------------------------------------------------------------------------------------------
# ImageClassifier
# ------------------------------------------------------------------------------------------------------------------
def build_backbone(
    name: str,
    num_classes: int,
    input_shape: Sequence[int],
    width: float = 1.0,
    hidden: Sequence[int] = (512,),
    activation: str = "relu",
    parameterization: str = "standard",
) -> nn.Module:
    """``"resnet18"``: :class:`ResNet18` (``width``, in_channels = input_shape[0]); ``"mlp"``: :class:`ImageMLP`
    (``hidden``, ``activation``, ``parameterization``)."""
    if name == "resnet18":
        return ResNet18(num_classes=num_classes, in_channels=int(input_shape[0]), width=width)
    if name == "mlp":
        return ImageMLP(input_shape, num_classes, hidden, activation, parameterization)
    raise ValueError(f"ImageClassifier: unknown `backbone` {name!r}; choose 'resnet18' or 'mlp', or pass an nn.Module.")


class ImageClassifier(LightningModule):
    """An image classifier trained by SGD on cross-entropy (or on the squared error to one-hot targets).

    Args:
        backbone: ``"resnet18"`` (CIFAR ResNet-18), ``"mlp"`` (flatten + ReLU layers ``hidden``) or an ``nn.Module``
            mapping ``(B, C, H, W)`` images to ``(B, num_classes)`` logits (then ``width``/``hidden`` are unused).
        num_classes: number of classes; ``None``: from the datamodule's ``num_classes`` at setup (the CLI also copies
            ``data.init_args.num_classes`` when the datamodule has that argument).
        input_shape: ``[C, H, W]``; ``None``: from the datamodule's ``input_shape`` (default ``[3, 32, 32]``).
        width: ResNet-18 channel multiplier (1 = 64..512 channels).
        hidden: hidden widths of the ``"mlp"`` backbone.
        activation: activation of the ``"mlp"`` backbone: ``"relu"`` or ``"tanh"``.
        parameterization: of the ``"mlp"`` backbone: ``"standard"`` (``nn.Linear``) or ``"ntk"``
            (:class:`~lightning_lnsgd.examples.resnet.NTKLinear`: weights N(0, 1), each layer's output scaled by
            1/√fan_in, so that training approaches the lazy (kernel) regime as the width grows).
        linearize: train the first-order Taylor model of the backbone around its initial weights,
            :class:`~lightning_lnsgd.Linearized` (the same as passing ``backbone=Linearized(net)``; names unchanged).
        loss: ``"cross_entropy"``, or ``"mse"``: ½‖f(x) − e_y‖² (e_y the one-hot target, summed over classes,
            averaged over the batch), the loss of the kernel-regime theory.
        lr: SGD learning rate (paper: 0.1).
        momentum: SGD momentum (paper: 0).
        weight_decay: SGD weight decay (paper: 0).
        nesterov: Nesterov momentum (needs momentum > 0).
        schedule: ``"constant"``; ``"cosine"``: cosine decay to 0 over the whole run, per optimizer step;
            ``"step"``: multiply by ``gamma`` at each epoch in ``milestones``.
        milestones: epochs of the step schedule.
        gamma: factor of the step schedule.

    The network is ``self.backbone``: module paths for DynamicsMonitor/PruningCurve are ``backbone.conv1``,
    ``backbone.layer4.1.conv2``, ``backbone.fc`` (ResNet-18) or ``backbone.layers.0``, ``backbone.fc`` (MLP).

    :class:`~lightning_lnsgd.PruningCurve` does not apply to a linearised backbone (pruning renames the weights it
    linearises).

    Logs ``train/loss`` and ``train/acc`` (on the training labels the step saw, i.e. the noisy ones under
    LabelNoise; not in SAM's perturbed pass), ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` (clean labels),
    and ``lr``.
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "resnet18",
        num_classes: int | None = None,
        input_shape: list[int] | None = None,
        width: float = 1.0,
        hidden: list[int] | None = None,
        activation: Literal["relu", "tanh"] = "relu",
        parameterization: Literal["standard", "ntk"] = "standard",
        linearize: bool = False,
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        schedule: Literal["constant", "cosine", "step"] = "constant",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"ImageClassifier: `lr` must be > 0, got {lr}.")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"ImageClassifier: `momentum` and `weight_decay` must be >= 0, got {momentum}, {weight_decay}.")
        if nesterov and momentum <= 0:
            raise ValueError("ImageClassifier: `nesterov=True` needs `momentum` > 0.")
        if schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"ImageClassifier: `schedule` must be 'constant', 'cosine' or 'step', got {schedule!r}.")
        if schedule == "step" and not milestones:
            raise ValueError("ImageClassifier: schedule='step' needs `milestones` (epochs at which lr *= gamma).")
        if isinstance(backbone, str) and backbone not in ("resnet18", "mlp"):
            raise ValueError(f"ImageClassifier: unknown `backbone` {backbone!r}; choose 'resnet18' or 'mlp', or pass an nn.Module.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ImageClassifier: activation={activation!r} must be one of {sorted(ACTIVATIONS)}.")
        if parameterization not in ("standard", "ntk"):
            raise ValueError(f"ImageClassifier: parameterization={parameterization!r} must be 'standard' or 'ntk'.")
        if backbone != "mlp" and (activation, parameterization) != ("relu", "standard"):
            raise ValueError(
                f"ImageClassifier: activation={activation!r} and parameterization={parameterization!r} apply to "
                "backbone='mlp' only; leave them at 'relu' and 'standard' for other backbones."
            )
        if not isinstance(linearize, bool):
            raise ValueError(f"ImageClassifier: linearize={linearize!r} must be true or false.")
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"ImageClassifier: loss={loss!r} must be 'cross_entropy' or 'mse'.")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"ImageClassifier: `num_classes` must be >= 2, got {num_classes}.")
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.hidden = list(hidden) if hidden is not None else [512]
        self.backbone: nn.Module | None = backbone if isinstance(backbone, nn.Module) else None
        self.num_classes = num_classes
        self.input_shape = list(input_shape) if input_shape is not None else None
        if num_classes is not None and (self.backbone is not None or input_shape is not None):
            self._build(num_classes, self.input_shape or [3, 32, 32])

    def _build(self, num_classes: int, input_shape: Sequence[int]) -> None:
        # In the hyper-parameters that loggers and checkpoints see, so that a lazily built model stays loadable.
        self.save_hyperparameters({**self.hparams, "num_classes": int(num_classes), "input_shape": [int(s) for s in input_shape]})
        self.num_classes, self.input_shape = int(num_classes), [int(s) for s in input_shape]
        hp = self.hparams
        if self.backbone is None:
            self.backbone = build_backbone(
                hp.backbone, self.num_classes, self.input_shape, hp.width, self.hidden, hp.activation, hp.parameterization
            )
        if hp.linearize and not isinstance(self.backbone, Linearized):
            self.backbone = Linearized(self.backbone)
        self.train_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    def setup(self, stage: str) -> None:
        if hasattr(self, "val_acc"):
            return
        trainer = trainer_of(self)
        dm = trainer.datamodule if trainer is not None else None
        num_classes = self.num_classes if self.num_classes is not None else getattr(dm, "num_classes", None)
        shape = self.input_shape if self.input_shape is not None else getattr(dm, "input_shape", None)
        if num_classes is None:
            raise ValueError(
                "ImageClassifier: `num_classes` is None and the datamodule has no `num_classes`; pass it explicitly."
            )
        self._build(int(num_classes), list(shape) if shape is not None else [3, 32, 32])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        if self.backbone is None:
            raise RuntimeError("ImageClassifier: network not built yet; pass `num_classes` or fit with a datamodule.")
        return self.backbone(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss (``loss``) of class scores ``(B, num_classes)`` against class indices ``(B,)``."""
        return squared_error(logits, y) if self.hparams.loss == "mse" else F.cross_entropy(logits, y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        # Lightning's self.log is already a no-op in SAM's perturbed pass; the metric's state is not, so guard it.
        if not is_perturbed_pass(self):
            self.train_acc.update(logits.detach(), y)
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=y.shape[0])
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=y.shape[0])
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        metric.update(logits, y)
        self.log(f"{prefix}/loss", self.loss(logits, y), on_epoch=True, batch_size=y.shape[0])
        self.log(f"{prefix}/acc", metric, on_epoch=True, prog_bar=True, batch_size=y.shape[0])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):  # type: ignore[override]
        hp = self.hparams
        opt = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        if hp.schedule == "constant":
            return opt
        if hp.schedule == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        # Lightning hands step values to the loggers every `log_every_n_steps` itself.
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=1)
