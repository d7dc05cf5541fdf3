"""A download-free classification example for label-flip noise: a Gaussian mixture and an MLP.

:class:`GaussianMixtureDataModule` draws ``num_classes`` class centres in ``dim`` dimensions and
samples each point as its class centre plus standard normal noise; :class:`MLPClassifier` is a
one-hidden-layer ReLU network trained by plain SGD on cross-entropy. Together with
:class:`~lightning_lnsgd.LabelNoise` (``kind="flip"``) they reproduce, at toy scale, the
paper's classification setting (science §3, §7.1): labels flipped with probability τ to a
different class, fresh every step. See ``configs/classifier_label_noise.yaml``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from ..compat import LightningDataModule, LightningModule, trainer_of

__all__ = ["GaussianMixtureDataModule", "MLPClassifier"]


class GaussianMixtureDataModule(LightningDataModule):
    """Gaussian-mixture classification data: ``x = centre[y] + N(0, noise_std² I)``, ``y`` uniform.

    Args:
        dim: input dimension d.
        num_classes: number of classes c (≥ 2).
        n_train: number of training samples.
        n_val: number of validation samples (also served as the test set).
        center_scale: class centres are drawn N(0, center_scale² I_d); with d = 20 the default
            0.5 puts neighbouring centres about 3 noise standard deviations apart, so the task
            is learnable but not trivial.
        noise_std: standard deviation of the within-class noise, per coordinate.
        seed: seed of the centres and samples (independent of the global seed).
        batch_size: training and validation batch size.
        num_workers: DataLoader workers.

    Batches are ``(x, y)`` with ``x`` float32 of shape ``(B, dim)`` and ``y`` int64 of shape ``(B,)``.
    """

    def __init__(
        self,
        dim: int = 20,
        num_classes: int = 10,
        n_train: int = 5000,
        n_val: int = 2000,
        center_scale: float = 0.5,
        noise_std: float = 1.0,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"GaussianMixtureDataModule: `dim` must be >= 1, got {dim}.")
        if num_classes < 2:
            raise ValueError(f"GaussianMixtureDataModule: `num_classes` must be >= 2, got {num_classes}.")
        if n_train < 1 or n_val < 1:
            raise ValueError(f"GaussianMixtureDataModule: `n_train` and `n_val` must be >= 1, got {n_train}, {n_val}.")
        if batch_size < 1:
            raise ValueError(f"GaussianMixtureDataModule: `batch_size` must be >= 1, got {batch_size}.")
        if center_scale < 0 or noise_std < 0:
            raise ValueError(
                f"GaussianMixtureDataModule: `center_scale` and `noise_std` must be >= 0, got {center_scale}, {noise_std}."
            )
        self.save_hyperparameters()
        self.dim = dim
        self.num_classes = num_classes
        self.n_train = n_train
        self.n_val = n_val
        self.center_scale = center_scale
        self.noise_std = noise_std
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _sample(self, n: int, gen: torch.Generator) -> TensorDataset:
        y = torch.randint(self.num_classes, (n,), generator=gen)
        x = self.centers[y] + self.noise_std * torch.randn(n, self.dim, generator=gen)
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        self.centers = self.center_scale * torch.randn(self.num_classes, self.dim, generator=gen)
        self.train_set = self._sample(self.n_train, gen)
        self.val_set = self._sample(self.n_val, gen)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The validation points (with their labels, which ``predict_step`` ignores)."""
        return self.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class MLPClassifier(LightningModule):
    """A one-hidden-layer ReLU network ``dim → hidden → num_classes`` trained by plain SGD.

    Args:
        dim: input dimension; ``None``: taken from the datamodule's ``dim`` at setup.
        num_classes: number of classes; ``None``: taken from the datamodule's ``num_classes``.
        hidden: hidden width.
        lr: SGD learning rate (no momentum, no weight decay, as in the paper's CIFAR runs).

    Logs ``train/loss`` (cross-entropy on the, possibly noisy, training batch), ``val/loss``
    and ``val/acc`` (accuracy on clean validation labels).
    """

    def __init__(self, dim: int | None = None, num_classes: int | None = None, hidden: int = 256, lr: float = 0.1) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"MLPClassifier: `hidden` must be >= 1, got {hidden}.")
        if lr <= 0:
            raise ValueError(f"MLPClassifier: `lr` must be > 0, got {lr}.")
        self.save_hyperparameters()
        self.net: nn.Module | None = None
        if dim is not None and num_classes is not None:
            self._build(dim, num_classes)

    def _build(self, dim: int, num_classes: int) -> None:
        if dim < 1 or num_classes < 2:
            raise ValueError(f"MLPClassifier: need `dim` >= 1 and `num_classes` >= 2, got {dim}, {num_classes}.")
        # Record the sizes in the hyper-parameters (those loggers and checkpoints see), so that a lazily built
        # model is loadable and its hparams agree with the datamodule's.
        self.save_hyperparameters({**self.hparams, "dim": dim, "num_classes": num_classes})
        self.dim, self.num_classes = dim, num_classes
        self.net = nn.Sequential(nn.Linear(dim, self.hparams.hidden), nn.ReLU(), nn.Linear(self.hparams.hidden, num_classes))
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def setup(self, stage: str) -> None:
        if self.net is not None:
            return
        trainer = trainer_of(self)
        dm = trainer.datamodule if trainer is not None else None
        dim = self.hparams.dim if self.hparams.dim is not None else getattr(dm, "dim", None)
        num_classes = self.hparams.num_classes if self.hparams.num_classes is not None else getattr(dm, "num_classes", None)
        if dim is None or num_classes is None:
            raise ValueError(
                "MLPClassifier: `dim` and `num_classes` are None and the datamodule does not provide them;"
                " pass them to MLPClassifier(dim=..., num_classes=...)."
            )
        self._build(int(dim), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape ``(B, num_classes)``."""
        assert self.net is not None, "MLPClassifier: network not built; pass dim/num_classes or use a datamodule."
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("test/acc", (logits.argmax(-1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
