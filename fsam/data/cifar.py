"""CIFAR-10 and CIFAR-100 from the official python-pickle archives: find, check, download, extract, read.

``root`` holds the archive (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``) and/or its extracted folder
(``cifar-10-batches-py/``, ``cifar-100-python/``). The extracted folder is read when present; otherwise the
archive is checked against its md5 checksum and extracted; otherwise it is downloaded (when allowed) and then
checked and extracted. Each step writes under a temporary name and renames when complete, so an interrupted or
failed step never leaves something that looks finished: a truncated archive leaves no half-extracted folder, a
failed download leaves no archive.

The batches are pickles, and unpickling a file can run any code it names; a file planted in a data folder must
not. They are read by an unpickler that admits only what the format holds (NumPy arrays, their dtypes, numbers,
bytes, lists and dicts) and refuses any other global with a DataError before calling it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fsam.errors import DataError

# The released F-SAM recipe normalises both CIFAR variants with these CIFAR-10 statistics (std as in the
# widespread pytorch-cifar code, not the exact per-pixel std): kept for comparability with its numbers.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGE_SIZE = 32
CIFAR100_SUPERCLASSES = 20
DOWNLOAD_CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class CifarVariant:
    """Where one CIFAR variant lives on disk and on the web, and how its batches are laid out."""

    name: str  # the dataset.name value
    title: str  # for people
    folder: str  # the archive's top-level folder
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int


VARIANTS = {
    "cifar10": CifarVariant(
        name="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{number}" for number in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
    ),
    "cifar100": CifarVariant(
        name="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
    ),
}


@dataclass
class CifarSplits:
    """A CIFAR variant in memory: uint8 images [N, 3, 32, 32] and int64 labels [N] per split.

    ``train_coarse``: CIFAR-100's superclass of each training image (int64 [N]); None for CIFAR-10.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    train_coarse: np.ndarray | None


def load_cifar(
    name: str,
    root: str | Path,
    *,
    download: bool = True,
    url: str | None = None,
    md5: str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> CifarSplits:
    """Read CIFAR-10 or CIFAR-100 from ``root``, extracting or downloading it first when needed.

    ``url`` and ``md5`` replace the official ones (a mirror, or a re-packed archive). Under torch.distributed,
    rank 0 prepares the folder while the others wait, then they only read it.

    Raises:
        DataError: ``root`` is a file, the data is missing (and may not be downloaded), the download failed, the
            archive is corrupt, the folder is incomplete, ``root`` holds the other CIFAR variant, a batch holds
            pixels that are not uint8 or labels that are not class numbers, or a split has no images.
    """
    variant = VARIANTS[name]

    def prepare(allow_download: bool) -> Path:
        return prepare_folder(variant, Path(root), download=allow_download, url=url, md5=md5)

    folder = _rank_zero_first(prepare, download, rank, world_size)
    return read_folder(variant, folder)


def _rank_zero_first(prepare: Callable[[bool], Path], download: bool, rank: int, world_size: int) -> Path:
    """Run ``prepare`` on rank 0 first; the other ranks wait for it and never download themselves."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return prepare(download)
    if rank == 0:
        try:
            return prepare(download)
        finally:
            dist.barrier()  # also on failure, so that the others fail with their own message instead of hanging
    dist.barrier()
    return prepare(False)


def prepare_folder(variant: CifarVariant, root: Path, *, download: bool, url: str | None, md5: str | None) -> Path:
    """The complete extracted folder of ``variant`` under ``root``, made from the archive when needed."""
    if root.exists() and not root.is_dir():
        raise DataError(
            f"dataset.root={root} is a file, not a folder: point dataset.root= at the folder that holds (or is to "
            f"hold) {variant.folder}/ or {variant.archive}"
        )
    folder = root / variant.folder
    archive = root / variant.archive
    if folder.is_dir():
        missing = _missing_file(variant, folder)
        if missing:
            raise DataError(
                f"{folder} is incomplete: {missing} is missing; delete the folder to extract it again from "
                f"{variant.archive} (or to download it)"
            )
        return folder
    if archive.is_file():
        _check_md5(archive, md5 or variant.md5, archive, "delete it to download it again")
        _extract(variant, archive, root)
        return folder
    _refuse_the_other_variant(variant, root)
    if not download:
        raise DataError(
            f"{variant.title} not found: {root} holds neither {variant.folder}/ nor {variant.archive}; place "
            f"{variant.archive} from {variant.url} there, point dataset.root= at the folder that holds it, or "
            f"remove dataset.download=false to download it"
        )
    _download(variant, url or variant.url, md5 or variant.md5, root)
    _extract(variant, archive, root)
    return folder


def read_folder(variant: CifarVariant, folder: Path) -> CifarSplits:
    """Read the pickled batches of an extracted folder into arrays.

    Raises:
        DataError: a batch is unreadable, names anything but what a batch holds (code that unpickling would run),
            or holds pixels or labels that cannot be CIFAR's, or a split is empty.
    """
    train = [_read_batch(variant, folder / name) for name in variant.train_files]
    test = [_read_batch(variant, folder / name) for name in variant.test_files]
    for split, files, batches in (("training", variant.train_files, train), ("test", variant.test_files, test)):
        if not sum(len(batch["labels"]) for batch in batches):
            # An empty test split would "finish" a run at 0 % accuracy of nothing; an empty training split trains
            # nothing.
            raise DataError(
                f"{folder} holds no {split} images ({', '.join(files)}: 0 examples): delete {folder} to extract "
                f"it again from {variant.archive}"
            )
    coarse = None
    if variant.name == "cifar100":
        coarse = np.concatenate([batch["coarse"] for batch in train])
    return CifarSplits(
        train_images=np.concatenate([batch["images"] for batch in train]),
        train_labels=np.concatenate([batch["labels"] for batch in train]),
        test_images=np.concatenate([batch["images"] for batch in test]),
        test_labels=np.concatenate([batch["labels"] for batch in test]),
        train_coarse=coarse,
    )


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch and nothing else: a global outside :attr:`ADMITTED` is refused before anything
    looks it up or calls it."""

    ADMITTED = {
        # An ndarray: the official archives name NumPy 1's module, a batch pickled under NumPy 2 the new one.
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        # A NumPy number (in a label list, say).
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        # bytes as Python 3 writes them under protocol 2, the empty ones as a call of bytes (Python 2's own pickles
        # hold them as str opcodes).
        ("_codecs", "encode"), ("__builtin__", "bytes"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ADMITTED:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which no CIFAR batch does: not unpickled, as that would run it"
            )
        return super().find_class(module, name)


def _read_batch(variant: CifarVariant, path: Path) -> dict[str, np.ndarray]:
    """One pickled batch: ``images`` uint8 [n, 3, 32, 32], ``labels`` int64 [n] (CIFAR-100: ``coarse`` too)."""
    refetch = f"delete {path.parent} to extract it again from {variant.archive}"
    try:
        with open(path, "rb") as file:
            # The official archives were pickled by Python 2: bytes keys under encoding="bytes".
            content = _BatchUnpickler(file, encoding="bytes").load()
        batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()}
        pixels = _pixels(path, batch["data"], refetch)
        images = pixels.reshape(len(pixels), 3, IMAGE_SIZE, IMAGE_SIZE)
        read = {"images": images, "labels": _labels(path, variant.label_key, batch, variant.num_classes, refetch)}
        if variant.name == "cifar100":
            read["coarse"] = _labels(path, "coarse_labels", batch, CIFAR100_SUPERCLASSES, refetch)
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, ValueError, TypeError) as error:
        raise DataError(f"{path} is not a readable {variant.title} batch ({_one_line(error)}): {refetch}") from error
    for key in ("labels", "coarse"):
        if key in read and len(read[key]) != len(images):
            raise DataError(f"{path} holds {len(images)} images but {len(read[key])} {key} labels: {refetch}")
    return read


def _pixels(path: Path, data: object, refetch: str) -> np.ndarray:
    """The batch's ``data`` as uint8 [n, 3072], refusing values that a cast to uint8 would change.

    Float pixels (say float32 in [0, 1]) would become black images under a cast, and training on them would go
    unnoticed; integers outside 0-255 would wrap around.
    """
    values = np.asarray(data)
    if values.size == 0 or values.dtype == np.uint8:
        return values.astype(np.uint8, copy=False)
    if values.dtype.kind in "iuf":
        low, high = values.min(), values.max()
        if values.dtype.kind in "iu" and 0 <= low and high <= 255:
            return values.astype(np.uint8)
        found = f"{values.dtype} pixels in [{low:.4g}, {high:.4g}]"
    else:
        found = f"{values.dtype} pixels"
    raise DataError(f"{path} holds {found}: CIFAR batches hold uint8 pixels 0-255; {refetch}")


def _labels(path: Path, key: str, batch: dict, num_classes: int, refetch: str) -> np.ndarray:
    """The batch's ``key`` labels as int64 [n], refusing any that is not a whole number in [0, num_classes).

    Checked before the cast, which would truncate 2.7 to class 2.
    """
    raw = batch[key]
    values = np.asarray(raw)
    if values.size and values.dtype.kind not in "iu":
        # Name the first value that is not an integer as written (a list may mix ints and floats).
        items = raw if isinstance(raw, (list, tuple)) else values.reshape(-1).tolist()
        bad = next((item for item in items if isinstance(item, bool) or not isinstance(item, (int, np.integer))),
                   items[0])  # integers too large for int64
        bad = bad.item() if isinstance(bad, np.generic) else bad
        raise DataError(
            f"{path} holds the label {bad!r} in {key!r}: CIFAR labels are whole numbers in [0, {num_classes}); "
            f"{refetch}"
        )
    labels = values.astype(np.int64).reshape(-1)
    out_of_range = labels[(labels < 0) | (labels >= num_classes)]
    if len(out_of_range):
        raise DataError(
            f"{path} holds the label {int(out_of_range[0])} in {key!r}: CIFAR labels are whole numbers in "
            f"[0, {num_classes}); {refetch}"
        )
    return labels


def _missing_file(variant: CifarVariant, folder: Path) -> str | None:
    """The first batch file that ``folder`` lacks, or None when it has them all."""
    for name in (*variant.train_files, *variant.test_files):
        if not (folder / name).is_file():
            return name
    return None


def _refuse_the_other_variant(variant: CifarVariant, root: Path) -> None:
    for other in VARIANTS.values():
        if other is not variant and ((root / other.folder).is_dir() or (root / other.archive).is_file()):
            raise DataError(
                f"{root} holds {other.title} ({other.folder}/ or {other.archive}), not {variant.title}: use "
                f"dataset={other.name}, or point dataset.root= at a folder for {variant.folder}/"
            )


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5(path: Path, expected: str, shown_as: Path | str, fix: str) -> None:
    actual = _md5(path)
    if actual != expected.lower():
        raise DataError(
            f"{shown_as} does not match its md5 checksum (expected {expected}, got {actual}): it is truncated or "
            f"corrupt; {fix}, or set dataset.md5= if it is a different archive on purpose"
        )


def _extract(variant: CifarVariant, archive: Path, root: Path) -> None:
    """Extract into a temporary folder next to the target, check it, then rename it into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{variant.folder}.extracting-", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                # The "data" filter refuses absolute paths, links out of the folder and device files.
                tar.extractall(staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise DataError(
                f"{archive} is truncated or corrupt ({_one_line(error)}): delete it to download it again"
            ) from error
        extracted = staging / variant.folder
        if not extracted.is_dir():
            raise DataError(f"{archive} does not hold {variant.folder}/: it is not the {variant.title} archive")
        missing = _missing_file(variant, extracted)
        if missing:
            raise DataError(
                f"{archive} is incomplete: {variant.folder}/{missing} is missing; delete it to download it again"
            )
        try:
            extracted.rename(root / variant.folder)
        except OSError:
            if not (root / variant.folder).is_dir():  # another process may have finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(variant: CifarVariant, url: str, md5: str, root: Path) -> None:
    """Download ``url`` to ``root/<archive>.<random>.part``, check its md5, and only then give it its name."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in its path, no permission
        raise DataError(
            f"cannot create the folder dataset.root={root} to download {variant.title} into "
            f"({_one_line(error)}): point dataset.root= at a folder you can write"
        ) from error
    archive = root / variant.archive
    handle, part_name = tempfile.mkstemp(prefix=f"{variant.archive}.", suffix=".part", dir=root)
    part = Path(part_name)
    print(f"downloading {variant.title} from {url} to {root}", flush=True)
    try:
        try:
            with os.fdopen(handle, "wb") as file, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, file, DOWNLOAD_CHUNK_BYTES)
        # URLError, HTTPError and timeouts are OSErrors; HTTPException: a cut connection; ValueError: a bad url
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise DataError(
                f"{variant.title} download from {url} to {root} failed ({_one_line(error)}): check the network or "
                f"dataset.url, or place {variant.archive} (or its extracted folder {variant.folder}/) in a folder "
                f"yourself, point dataset.root= at it and set dataset.download=false"
            ) from error
        _check_md5(part, md5, f"the {variant.title} download from {url}", "it was deleted: try again")
        part.rename(archive)
    finally:
        part.unlink(missing_ok=True)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
