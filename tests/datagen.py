"""Tiny data sets in the real on-disk formats, so tests run the real reading code without a download.

- ``write_cifar_archive``: the official python-pickle layout (``cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``, ``batches.meta``; ``cifar-100-python/train``, ``test``, ``meta``) packed into the official
  ``.tar.gz`` name, and extracted next to it as a finished download would be.
- ``rewrite_cifar_batch``: one extracted batch with some entries replaced, to plant bad pixels or labels.
- ``write_imagefolder``: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

The pickles use bytes keys: that is what the official archives (pickled by Python 2) give under
``pickle.load(..., encoding="bytes")``.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
NUM_SUPERCLASSES = 20


@dataclass
class CifarArrays:
    """What a generated archive holds: uint8 images [N, 3, 32, 32] and int64 labels [N] per split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def cifar_arrays(variant: str = "cifar10", n_train: int = 64, n_test: int = 32, seed: int = 0) -> CifarArrays:
    """The random images and labels that ``write_cifar_archive`` writes for the same arguments."""
    rng = np.random.default_rng(seed)
    classes = NUM_CLASSES[variant]
    return CifarArrays(
        rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
        rng.integers(0, classes, n_train).astype(np.int64),
        rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
        rng.integers(0, classes, n_test).astype(np.int64),
    )


def superclass_of(fine_labels: np.ndarray) -> np.ndarray:
    """The coarse labels the generated CIFAR-100 uses: fine class f belongs to superclass f % 20.

    Deliberately not blocks of five consecutive classes, so a map that assumes blocks is caught.
    """
    return fine_labels % NUM_SUPERCLASSES


def md5_of(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _batch(variant: str, name: str, images: np.ndarray, labels: np.ndarray) -> dict:
    batch = {
        b"batch_label": name.encode(),
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"image_{i}.png".encode() for i in range(len(images))],
    }
    if variant == "cifar10":
        batch[b"labels"] = labels.tolist()
    else:
        batch[b"fine_labels"] = labels.tolist()
        batch[b"coarse_labels"] = superclass_of(labels).tolist()
    return batch


def _write_pickle(path: Path, content: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(content, file, protocol=2)


def write_cifar_archive(
    folder: str | Path,
    variant: str = "cifar10",
    n_train: int = 64,
    n_test: int = 32,
    seed: int = 0,
    extract: bool = True,
) -> Path:
    """Write ``folder/<official archive name>`` (and, with ``extract``, its extracted folder); return the archive."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = cifar_arrays(variant, n_train, n_test, seed)
    with tempfile.TemporaryDirectory() as staging:
        data_folder = Path(staging) / FOLDERS[variant]
        data_folder.mkdir()
        if variant == "cifar10":
            parts = np.array_split(np.arange(n_train), 5)
            for number, part in enumerate(parts, start=1):
                name = f"data_batch_{number}"
                _write_pickle(
                    data_folder / name,
                    _batch(variant, name, arrays.train_images[part], arrays.train_labels[part]),
                )
            test_batch = _batch(variant, "test_batch", arrays.test_images, arrays.test_labels)
            _write_pickle(data_folder / "test_batch", test_batch)
            _write_pickle(data_folder / "batches.meta", {b"label_names": [f"class_{c}".encode() for c in range(10)]})
        else:
            _write_pickle(data_folder / "train", _batch(variant, "train", arrays.train_images, arrays.train_labels))
            _write_pickle(data_folder / "test", _batch(variant, "test", arrays.test_images, arrays.test_labels))
            _write_pickle(
                data_folder / "meta",
                {
                    b"fine_label_names": [f"fine_{c}".encode() for c in range(100)],
                    b"coarse_label_names": [f"coarse_{c}".encode() for c in range(NUM_SUPERCLASSES)],
                },
            )
        archive = folder / ARCHIVES[variant]
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(data_folder, arcname=FOLDERS[variant])
        if extract:
            shutil.rmtree(folder / FOLDERS[variant], ignore_errors=True)
            shutil.copytree(data_folder, folder / FOLDERS[variant])
    return archive


def rewrite_cifar_batch(folder: str | Path, variant: str, batch_name: str, **entries: object) -> Path:
    """Replace entries (``data``, ``labels``, ``fine_labels``, ``coarse_labels``) of one extracted batch file.

    ``folder`` is what ``write_cifar_archive`` was given; returns the batch file's path.
    """
    path = Path(folder) / FOLDERS[variant] / batch_name
    with open(path, "rb") as file:
        batch = pickle.load(file, encoding="bytes")
    batch.update({key.encode(): value for key, value in entries.items()})
    _write_pickle(path, batch)
    return path


def write_imagefolder(folder: str | Path, classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    """Random-colour JPEGs in ``folder/{train,val}/class_<k>/image_<i>.JPEG``; returns ``folder``."""
    folder = Path(folder)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(classes):
            class_folder = folder / split / f"class_{label}"
            class_folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(class_folder / f"image_{index}.JPEG", format="JPEG")
    return folder
