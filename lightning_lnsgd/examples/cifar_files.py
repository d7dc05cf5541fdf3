"""CIFAR-10's files: the official python batches, their download with an MD5 check, and a miniature archive.

``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` are pickled dicts with ``b"data"`` (uint8,
``(N, 3072)``, channel-major) and ``b"labels"``: the layout torchvision's ``CIFAR10(root=data_dir)`` uses too.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import torch

__all__ = [
    "ARCHIVE_NAME",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "FOLDER",
    "TEST_FILE",
    "TRAIN_FILES",
    "download_and_extract",
    "md5sum",
    "read_batch",
    "safe_extract",
    "write_cifar10_archive",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"


def md5sum(path: Path) -> str:
    """The MD5 hex digest of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One official batch file as ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data, labels = d[b"data"], d.get(b"labels", d.get(b"fine_labels"))
    x = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
    return x, torch.as_tensor(list(labels), dtype=torch.long)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extracts the ``.tar.gz`` ``archive`` into ``dest``, refusing members that are not plain files or folders or
    that would land outside ``dest``."""
    with tarfile.open(archive, "r:gz") as tar:
        root = dest.resolve()
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if root not in target.parents and target != root:
                raise RuntimeError(f"CIFAR10DataModule: refusing to extract {member.name!r} outside {dest}.")
            if not (member.isfile() or member.isdir()):
                raise RuntimeError(f"CIFAR10DataModule: unexpected archive member {member.name!r} (not a file).")
        tar.extractall(dest)


def write_cifar10_archive(
    root: str | os.PathLike,
    n_per_batch: int = 4,
    n_test: int = 8,
    seed: int = 0,
    extract: bool = False,
) -> tuple[Path, str]:
    """Writes a miniature CIFAR-10 in the official format: ``<root>/cifar-10-python.tar.gz``.

    The archive holds ``cifar-10-batches-py/`` with ``data_batch_1..5`` (``n_per_batch`` random images each),
    ``test_batch`` (``n_test``) and ``batches.meta``; labels cycle through 0..9. With ``extract=True`` the folder is
    also extracted under ``root`` (ready for ``CIFAR10DataModule(data_dir=root)``).

    Returns ``(archive path, its MD5 hex digest)``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def batch(n: int, offset: int, name: str) -> bytes:
        data = torch.randint(0, 256, (n, 3072), generator=gen, dtype=torch.uint8).numpy()
        labels = [(offset + i) % 10 for i in range(n)]
        return pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": []})

    files = {f"data_batch_{i}": batch(n_per_batch, i * n_per_batch, f"training batch {i} of 5") for i in range(1, 6)}
    files[TEST_FILE] = batch(n_test, 0, "testing batch 1 of 1")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    files["batches.meta"] = pickle.dumps({b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    archive = root / ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(payload)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))
    if extract:
        safe_extract(archive, root)
    return archive, md5sum(archive)




def download_and_extract(url: str, md5: str, data_dir: Path) -> None:
    """Downloads ``cifar-10-python.tar.gz`` from ``url`` into ``data_dir`` (unless it is there), checks its ``md5``
    and extracts it; a mismatching archive is moved aside to ``<name>.bad`` so that a retry downloads again."""
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / ARCHIVE_NAME
    if not archive.is_file():
        _fetch(url, archive)
    got = md5sum(archive)
    if got != md5:
        bad = archive.with_name(archive.name + ".bad")
        archive.replace(bad)
        raise RuntimeError(
            f"CIFAR10DataModule: checksum mismatch for {archive} (from {url}): MD5 {got}, expected "
            f"{md5}. The file was moved to {bad}; delete it and retry, or pass the right `md5`/`url`."
        )
    safe_extract(archive, data_dir)
    folder = data_dir / FOLDER
    missing = [n for n in (*TRAIN_FILES, TEST_FILE) if not (folder / n).is_file()]
    if missing:
        raise RuntimeError(
            f"CIFAR10DataModule: {archive} was extracted but {folder} lacks {missing}; "
            "is it the CIFAR-10 *python* archive?"
        )


def _fetch(url: str, archive: Path) -> None:
    # Into a temporary file first, so that an interrupted download never looks like a complete archive.
    fd, tmp = tempfile.mkstemp(prefix=".cifar10-", suffix=".part", dir=archive.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(tmp, archive)
    except OSError as err:  # URLError is an OSError
        raise RuntimeError(
            f"CIFAR10DataModule: could not download {url} ({err}). Without internet access, download "
            f"{ARCHIVE_NAME} elsewhere and put it (or its extracted {FOLDER}/ folder) into "
            f"{archive.parent.resolve()}."
        ) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
