"""CIFAR-10 from the official python batches, without torchvision.

:class:`CIFAR10DataModule` reads ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (pickled dicts
with ``b"data"``, uint8 of shape ``(N, 3072)`` in channel-major order, and ``b"labels"``), the layout torchvision's
``CIFAR10(root=data_dir)`` uses too. ``download=True`` fetches ``cifar-10-python.tar.gz`` from ``url``, checks its MD5
and extracts it. ``data_dir=None`` means ``$LNSGD_DATA_DIR`` if that environment variable is set, else ``./data``.

Images are kept as uint8 in memory (150 MB for the training set). A batch is produced in one piece (the dataset's
``__getitems__``): gather the indexed images, optional random crop (zero padding 4) and horizontal flip on the whole
batch with torch ops, convert to float, normalise per channel. Batches are therefore already normalised float
tensors when they leave the DataLoader, so any consumer (``validation_step``, PruningCurve, the laziness probe)
sees the same inputs.

:func:`~lightning_lnsgd.examples.cifar_files.write_cifar10_archive` writes a miniature dataset in the official format
(tests, smoke runs); the file handling lives in :mod:`lightning_lnsgd.examples.cifar_files`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..compat import LightningDataModule
from .cifar_files import (
    ARCHIVE_NAME,
    CIFAR10_MD5,
    CIFAR10_URL,
    FOLDER,
    TEST_FILE,
    TRAIN_FILES,
    download_and_extract,
    read_batch,
)

__all__ = [
    "CIFAR10DataModule",
    "ImageBatches",
    "default_data_dir",
    "random_crop_flip",
]

#: Per-channel mean and standard deviation of the CIFAR-10 training images (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DATA_ENV = "LNSGD_DATA_DIR"


def default_data_dir() -> str:
    """``$LNSGD_DATA_DIR`` if set (and non-empty), else ``"data"`` (relative to the working directory)."""
    return os.environ.get(DATA_ENV) or "data"


# ------------------------------------------------------------------------------------------------------------------
# Augmentation and batched dataset
# ------------------------------------------------------------------------------------------------------------------
def random_crop_flip(
    x: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random ``H×W`` crop of the zero-padded images and random horizontal flip, independently per image.

    ``x``: ``(B, C, H, W)``. Equivalent to torchvision's ``RandomCrop(H, padding)`` + ``RandomHorizontalFlip()``
    applied image by image (zero padding, crop offsets uniform in ``[0, 2·padding]``, flip with probability ½).
    """
    b, _, h, w = x.shape
    out = x
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
        rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
        idx = torch.arange(b, device=x.device)[:, None, None]
        out = padded[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    if flip:
        mask = torch.rand(b, generator=generator, device=x.device) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


class ImageBatches(Dataset):
    """uint8 images ``(N, C, H, W)`` and int64 labels, served as normalised float batches.

    ``dataset[i]`` gives one ``(image, label)``; the DataLoader fetches a whole batch at once through
    ``__getitems__`` (augment, then normalise), and :func:`collate_batch` passes it through unchanged. The random
    crop/flip draws from torch's global generator, which DataLoader seeds separately in every worker.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        padding: int = 4,
        scale: float = 255.0,
        flip: bool = True,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"ImageBatches: {images.shape[0]} images but {labels.shape[0]} labels.")
        self.images, self.labels = images, labels.long()
        c = images.shape[1]
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, c, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, c, 1, 1)
        self.augment, self.padding, self.scale, self.flip = augment, padding, scale, flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx].float().div_(self.scale)
        if self.augment:
            x = random_crop_flip(x, self.padding, self.flip)
        return (x - self.mean) / self.std, self.labels[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


def collate_batch(batch: Any) -> Any:
    """The DataLoader's ``collate_fn`` for :class:`ImageBatches`: the batch is already built."""
    return batch


# ------------------------------------------------------------------------------------------------------------------
# DataModule
# ------------------------------------------------------------------------------------------------------------------
class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 (50,000 training, 10,000 test images, 32×32×3, 10 classes); validation = the test batch.

    Args:
        data_dir: the folder that holds (or receives) ``cifar-10-batches-py/``. ``None``: ``$LNSGD_DATA_DIR`` if that
            environment variable is set, else ``./data``.
        download: if the batches are missing, download ``cifar-10-python.tar.gz`` from ``url`` into ``data_dir``,
            check its MD5 and extract it (in ``prepare_data``, once per node).
        url: where to download from (an ``http(s)://`` or ``file://`` URL).
        md5: expected MD5 of the archive (default: the official archive's).
        batch_size: training batch size (validation/test use ``eval_batch_size``, default the same).
        eval_batch_size: validation/test batch size; ``None``: ``batch_size``.
        augment: random crop (zero padding ``padding``) and horizontal flip of training images.
        padding: crop padding in pixels.
        mean, std: per-channel normalisation of pixel values in [0, 1] (default: CIFAR-10 training-set statistics).
        subset: use only the first ``subset`` training images (quick runs); ``None``: all.
        val_subset: use only the first ``val_subset`` test images for validation/test; ``None``: all.
        num_workers: DataLoader workers (each holds a copy-on-write view of the uint8 arrays).
        pin_memory: pin batches for faster host-to-GPU copies (ignored on CPU-only machines).
        drop_last: drop the last incomplete training batch.

    Batches are ``(images, labels)``: float32 ``(B, 3, 32, 32)`` normalised, int64 ``(B,)``.
    """

    num_classes = 10
    input_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: str | None = None,
        download: bool = False,
        url: str = CIFAR10_URL,
        md5: str = CIFAR10_MD5,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        augment: bool = True,
        padding: int = 4,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        subset: int | None = None,
        val_subset: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"CIFAR10DataModule: batch sizes must be >= 1, got {batch_size}, {eval_batch_size}.")
        for name, value in (("subset", subset), ("val_subset", val_subset)):
            if value is not None and value < 1:
                raise ValueError(f"CIFAR10DataModule: `{name}` must be >= 1 or None, got {value}.")
        if padding < 0:
            raise ValueError(f"CIFAR10DataModule: `padding` must be >= 0, got {padding}.")
        mean = list(CIFAR10_MEAN if mean is None else mean)
        std = list(CIFAR10_STD if std is None else std)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"CIFAR10DataModule: `mean` and `std` need 3 entries (std > 0), got {mean}, {std}.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir if data_dir is not None else default_data_dir())
        self.download, self.url, self.md5 = download, url, md5
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.augment, self.padding = augment, padding
        self.mean, self.std = mean, std
        self.subset, self.val_subset = subset, val_subset
        self.num_workers, self.drop_last = num_workers, drop_last
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.train_set: ImageBatches | None = None
        self.val_set: ImageBatches | None = None

    @property
    def folder(self) -> Path:
        return self.data_dir / FOLDER

    @property
    def archive(self) -> Path:
        return self.data_dir / ARCHIVE_NAME

    def _missing(self) -> list[str]:
        return [n for n in (*TRAIN_FILES, TEST_FILE) if not (self.folder / n).is_file()]

    # -- download ------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if not self._missing():
            return
        if not self.download:
            return  # setup raises the explanatory error
        download_and_extract(self.url, self.md5, self.data_dir)

    # -- loading -------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        missing = self._missing()
        if missing and self.download and self.trainer is None:  # used outside a Trainer: prepare here
            self.prepare_data()
            missing = self._missing()
        if missing:
            raise FileNotFoundError(
                f"CIFAR10DataModule: CIFAR-10 not found: {self.folder.resolve()} lacks {', '.join(missing)}. Put the "
                f"official python batches there (extract {ARCHIVE_NAME} from {CIFAR10_URL} into "
                f"{self.data_dir.resolve()}, so that {FOLDER}/data_batch_1..5 and test_batch exist), or set "
                f"`download: true` (data.init_args.download) to fetch and check it, or point `data_dir` (or the "
                f"environment variable {DATA_ENV}) at the folder that contains {FOLDER}/."
            )
        xs, ys = zip(*(read_batch(self.folder / n) for n in TRAIN_FILES))
        x_train, y_train = torch.cat(xs), torch.cat(ys)
        x_test, y_test = read_batch(self.folder / TEST_FILE)
        if self.subset is not None:
            x_train, y_train = x_train[: self.subset], y_train[: self.subset]
        if self.val_subset is not None:
            x_test, y_test = x_test[: self.val_subset], y_test[: self.val_subset]
        self.train_set = ImageBatches(x_train, y_train, self.mean, self.std, self.augment, self.padding)
        self.val_set = ImageBatches(x_test, y_test, self.mean, self.std, augment=False)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_set is not None
        return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self.val_set is not None
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
