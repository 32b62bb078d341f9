"""The data package's contract, pinned where the behaviour tests leave room: exact refusals, edge values, the
error paths of the readers and the loaders' bookkeeping. Written against the survivors of mutation testing
(``python scripts/mutation.py fsam/data``): each test states a behaviour that one of them broke unnoticed.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import pickletools
import random
import socket
import struct
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datagen import md5_of, write_cifar_archive, write_imagefolder
from fsam.data import AugmentSpec, NoiseSpec, build_data, cifar, seeding
from fsam.data.augment import augment, draw_augmentation
from fsam.data.imagefolder import FolderLoader
from fsam.data.loaders import DeviceLoader
from fsam.data.noise import corrupt_labels
from fsam.errors import DataError
from fsam.data.seeding import derive_seed, generator
from fsam.errors import ConfigError

NO_AUGMENT = AugmentSpec(crop=False, flip=False, cutout=False, normalize=False)


def test_derived_seeds_are_63_bit_deterministic_and_differ_in_every_part():
    seeds = {derive_seed(1, 2, 3), derive_seed(1, 2, 4), derive_seed(2, 2, 3), derive_seed(1, 2), derive_seed(3, 2, 1)}
    assert len(seeds) == 5
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert max(seeds) >= 2**40  # both 32-bit words are used, not only the low one
    assert generator(5, 1).initial_seed() == derive_seed(5, 1)


@pytest.mark.parametrize(("spec", "message"), [
    (lambda: AugmentSpec(crop=1), "dataset.augment.crop=1 is not allowed: must be true or false"),
    (lambda: AugmentSpec(normalize="yes"), "dataset.augment.normalize='yes' is not allowed: must be true or false"),
    (lambda: AugmentSpec(padding=-1), "dataset.augment.padding=-1 is not allowed: must be a whole number >= 0"),
    (lambda: AugmentSpec(padding=True), "dataset.augment.padding=True is not allowed: must be a whole number >= 0"),
    (lambda: AugmentSpec(cutout_size=2.0), "dataset.augment.cutout_size=2.0 is not allowed: must be a whole number"),
    (lambda: AugmentSpec(cutout_prob=1.5), "dataset.augment.cutout_prob=1.5 is not allowed: must be in [0, 1]"),
    (lambda: AugmentSpec(cutout_prob=-0.1), "dataset.augment.cutout_prob=-0.1 is not allowed: must be in [0, 1]"),
    (lambda: AugmentSpec(cutout_prob=False), "dataset.augment.cutout_prob=False is not allowed: must be in [0, 1]"),
    (lambda: NoiseSpec(kind="pair"), "dataset.noise.kind='pair' is not allowed: use one of none, symmetric, "
                                     "asymmetric"),
    (lambda: NoiseSpec(ratio="0.2"), "dataset.noise.ratio='0.2' is not allowed: must be in [0, 1]"),
    (lambda: NoiseSpec(seed=-3), "dataset.noise.seed=-3 is not allowed: must be a whole number >= 0"),
])
def test_bad_specs_are_refused_in_words_that_name_the_key_the_value_and_the_rule(spec, message):
    with pytest.raises(ConfigError) as error:
        spec()
    assert str(error.value).startswith(message)


def test_the_edges_of_every_range_are_allowed():
    AugmentSpec(padding=0, cutout_size=0, cutout_prob=0.0)
    AugmentSpec(cutout_prob=1.0)
    AugmentSpec(cutout_prob=1)
    NoiseSpec(kind="symmetric", ratio=1.0, seed=0)
    NoiseSpec(kind="asymmetric", ratio=0)


# --- the lazy exports of fsam.data -------------------------------------------------------------------------------


def test_build_data_and_data_bundle_are_loaded_on_first_use_and_other_names_are_refused():
    import fsam.data
    from fsam.data import factory

    assert fsam.data.build_data is factory.build_data and fsam.data.DataBundle is factory.DataBundle
    with pytest.raises(AttributeError) as error:
        fsam.data.load_everything
    assert str(error.value) == "module 'fsam.data' has no attribute 'load_everything'"


# --- downloading CIFAR -------------------------------------------------------------------------------------------


class _RecordingHandler(SimpleHTTPRequestHandler):
    """Serves files, and notes what the download folder holds when each request arrives."""

    seen: list[list[str]] = []
    watched: Path | None = None

    def do_GET(self):  # noqa: N802 (the handler's API)
        if self.watched is not None:
            type(self).seen.append(sorted(path.name for path in self.watched.iterdir()))
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def recording_server(tmp_path):
    """A real HTTP server serving tmp_path/served; yields (served folder, base url, handler class)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = type("Handler", (_RecordingHandler,), {"seen": [], "watched": None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_download_goes_to_a_part_file_beside_the_archive_into_a_folder_created_with_its_parents(
        tmp_path, recording_server, capsys):
    served, base_url, handler = recording_server
    archive = write_cifar_archive(served, n_train=20, extract=False)
    root = tmp_path / "not" / "yet" / "data"
    handler.watched = root
    url = f"{base_url}/{archive.name}"
    build_data("cifar10", str(root), batch_size=4, url=url, md5=md5_of(archive), augment=NO_AUGMENT)
    (listing,) = handler.seen
    assert len(listing) == 1 and listing[0].startswith("cifar-10-python.tar.gz.") and listing[0].endswith(".part")
    assert f"downloading CIFAR-10 from {url} to {root}\n" in capsys.readouterr().out
    assert sorted(path.name for path in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_a_download_into_an_existing_empty_folder_works(tmp_path, recording_server):
    served, base_url, _ = recording_server
    archive = write_cifar_archive(served, n_train=20, extract=False)
    root = tmp_path / "data"
    root.mkdir()
    bundle = build_data("cifar10", str(root), batch_size=4, url=f"{base_url}/{archive.name}", md5=md5_of(archive))
    assert bundle.info["num_train"] == 20


def test_a_download_with_the_wrong_checksum_says_which_download_and_that_it_was_deleted(tmp_path, recording_server):
    served, base_url, _ = recording_server
    archive = write_cifar_archive(served, extract=False)
    url = f"{base_url}/{archive.name}"
    with pytest.raises(DataError) as error:
        build_data("cifar10", str(tmp_path / "data"), batch_size=4, url=url, md5="0" * 32)
    message = str(error.value)
    assert message.startswith(f"the CIFAR-10 download from {url} does not match its md5 checksum")
    assert "it is truncated or corrupt; it was deleted: try again, or set dataset.md5=" in message


def test_a_refused_connection_gives_its_reason_in_the_message(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError) as error:
        build_data("cifar10", str(tmp_path), batch_size=4, url=f"http://127.0.0.1:{port}/x.tar.gz", md5="0" * 32)
    assert "failed (<urlopen error [Errno 111] Connection refused>): check the network" in str(error.value)


def test_a_server_that_never_answers_times_out_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "DOWNLOAD_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/cifar-10-python.tar.gz"
        with pytest.raises(DataError) as error:
            build_data("cifar10", str(tmp_path / "data"), batch_size=4, url=url, md5="0" * 32)
    assert "timed out" in str(error.value)
    assert list((tmp_path / "data").iterdir()) == []


def test_an_error_without_text_is_named_by_its_type():
    assert cifar._one_line(TimeoutError()) == "TimeoutError"
    assert cifar._one_line(OSError("two\n  lines")) == "two lines"


def test_either_trace_of_the_other_variant_is_named(tmp_path):
    write_cifar_archive(tmp_path, "cifar100", extract=False)  # the archive only, no extracted folder
    with pytest.raises(DataError, match="CIFAR-100"):
        build_data("cifar10", str(tmp_path), batch_size=4, download=False)


# --- the ImageFolder loader --------------------------------------------------------------------------------------


def _png_files(folder: Path, count: int, mode: str = "RGB") -> list[str]:
    """``count`` 6x6 images of ``mode`` (RGB, L, RGBA), each filled with its own index as the pixel value."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"image_{index}.png"
        Image.new(mode, (6, 6), color=index if mode == "L" else (index,) * len(mode)).save(path)
        paths.append(str(path))
    return paths


def _drawing(image: Image.Image) -> torch.Tensor:
    """A test transform: channel 0 is the image's first pixel value, channel 1 a draw from torch's global
    generator, channel 2 a draw from Python's; 3 channels of 1 pixel, so only the bookkeeping shows."""
    return torch.tensor([[[image.getpixel((0, 0))[0]]], [[torch.rand(()).item()]], [[random.random()]]])


def _folder_loader(paths, *, train=True, seed=1, batch_size=2, **kwargs) -> FolderLoader:
    labels = np.arange(len(paths), dtype=np.int64)  # each example its own label, to follow it
    return FolderLoader(paths, labels, _drawing, batch_size=batch_size, seed=seed, train=train, **kwargs)


def _examples(loader: FolderLoader, epoch: int, start_batch: int = 0) -> list[int]:
    return [label for _, targets in loader.iterate(epoch, start_batch) for label in targets.tolist()]


def test_training_batches_are_a_shuffled_equal_block_per_rank_without_the_last_partial_batch(tmp_path):
    paths = _png_files(tmp_path, 11)
    assert len(_folder_loader(paths)) == 5 and len(_examples(_folder_loader(paths), 0)) == 10
    assert len(_folder_loader(paths, drop_last=False)) == 6 and sorted(_examples(_folder_loader(paths, drop_last=False), 0)) == list(range(11))
    ranks = [_folder_loader(paths, rank=rank, world_size=2) for rank in (0, 1)]
    assert [len(loader) for loader in ranks] == [2, 2]  # 5 positions each, the 11th left out
    seen = [_examples(loader, 3) for loader in ranks]
    assert len(set(seen[0]) | set(seen[1])) == 8 and not set(seen[0]) & set(seen[1])
    whole = torch.randperm(11, generator=seeding.generator(seeding.EPOCH_ORDER, 1, 3)).tolist()
    assert seen == [whole[0:4], whole[5:9]]  # each rank's block of one permutation, in its order


def test_test_batches_are_in_file_order_contiguous_per_rank_and_keep_the_last_batch(tmp_path):
    paths = _png_files(tmp_path, 7)
    assert _examples(_folder_loader(paths, train=False), 4) == list(range(7))
    ranks = [_folder_loader(paths, train=False, rank=rank, world_size=2) for rank in (0, 1)]
    assert [len(loader) for loader in ranks] == [2, 2]
    assert [_examples(loader, 0) for loader in ranks] == [[0, 1, 2, 3], [4, 5, 6]]


def test_the_data_loader_length_is_the_batches_left_from_where_the_epoch_starts(tmp_path):
    loader = _folder_loader(_png_files(tmp_path, 9))
    assert len(loader.loader) == len(loader) == 4  # before any epoch starts
    whole = _examples(loader, 2)
    assert _examples(loader, 2, start_batch=1) == whole[2:]
    assert len(loader.loader) == 3
    loader.batches.start(2, 6)
    assert len(loader.loader) == 0


def test_each_examples_random_transform_is_drawn_from_seed_epoch_and_index_and_the_callers_state_is_kept(tmp_path):
    paths = _png_files(tmp_path, 4)

    def draws(seed: int, epoch: int) -> dict[int, tuple[float, float]]:
        found = {}
        for inputs, targets in _folder_loader(paths, seed=seed, batch_size=1).iterate(epoch):
            found[targets.item()] = (inputs[0, 1, 0, 0].item(), inputs[0, 2, 0, 0].item())
        return found

    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = draws(seed=1, epoch=0)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert first == draws(seed=1, epoch=0)
    assert len(set(first.values())) == 4  # every example its own draw
    other_seed, other_epoch = draws(seed=2, epoch=0), draws(seed=1, epoch=1)
    assert all(first[k] != other_seed[k] and first[k] != other_epoch[k] for k in first)
    with _seeded(seeding.derive_seed(seeding.SAMPLE_TRANSFORM, 1, 0, 3)):
        assert first[3] == pytest.approx((torch.rand(()).item(), random.random()))


def _seeded(seed: int):
    from fsam.data.imagefolder import _seeded_global_generators

    return _seeded_global_generators(seed)


def test_test_images_are_transformed_without_seeding(tmp_path):
    paths = _png_files(tmp_path, 2)
    torch.manual_seed(123)
    expected = torch.rand(()).item()
    torch.manual_seed(123)
    inputs, _ = next(_folder_loader(paths, train=False, batch_size=1).iterate(0))
    assert inputs[0, 1, 0, 0].item() == pytest.approx(expected)  # drawn from the caller's generator as it stood


@pytest.mark.parametrize("mode", ["L", "RGBA", "RGB"])
def test_grey_and_transparent_images_are_read_as_rgb(tmp_path, mode):
    paths = _png_files(tmp_path, 3, mode=mode)
    seen = FolderLoader(paths, np.zeros(3, dtype=np.int64), lambda image: torch.tensor(image.getpixel((0, 0)),
                        dtype=torch.float32), batch_size=3, seed=0, train=False)
    inputs, targets = next(seen.iterate(0))
    assert inputs.tolist() == [[0.0] * 3, [1.0] * 3, [2.0] * 3] and targets.dtype == torch.int64


def test_an_unreadable_image_is_named_with_the_readers_reason_in_one_line(tmp_path):
    paths = _png_files(tmp_path, 2)
    Path(paths[1]).write_bytes(b"not an\nimage")
    with pytest.raises(DataError) as error:
        list(_folder_loader(paths, train=False).iterate(0))
    assert str(error.value) == (f"cannot read image {paths[1]} (cannot identify image file '{paths[1]}'): replace "
                                "or delete the file")


# --- build_data: refusals and what a bundle holds ---------------------------------------------------------------


@pytest.mark.parametrize(("arguments", "message"), [
    ({"batch_size": 0}, "trainer.batch_size=0 is not allowed: must be a whole number >= 1"),
    ({"batch_size": True}, "trainer.batch_size=True is not allowed: must be a whole number >= 1"),
    ({"batch_size": 2.0}, "trainer.batch_size=2.0 is not allowed: must be a whole number >= 1"),
    ({"eval_batch_size": 0}, "trainer.eval_batch_size=0 is not allowed: must be a whole number >= 1"),
    ({"image_size": -32}, "dataset.image_size=-32 is not allowed: must be a whole number >= 1"),
    ({"train_subset": 0}, "dataset.train_subset=0 is not allowed: must be a whole number >= 1"),
    ({"train_subset": 2000}, "dataset.train_subset=2000 is larger than the 1437 training examples: lower it, or "
                             "use null for all of them"),
    ({"val_split": -1}, "dataset.val_split=-1 is not allowed: must be a whole number >= 0"),
    ({"val_split": True}, "dataset.val_split=True is not allowed: must be a whole number >= 0"),
    ({"val_split": 1.0}, "dataset.val_split=1.0 is not allowed: must be a whole number >= 0"),
    ({"val_split": 1437}, "dataset.val_split=1437 leaves no training examples (there are 1437): hold out fewer"),
    ({"rank": 2, "world_size": 2}, "rank=2 is not allowed with world_size=2: must be in [0, 2)"),
    ({"rank": -1}, "rank=-1 is not allowed with world_size=1: must be in [0, 1)"),
    ({"batch_size": 719, "world_size": 2}, "trainer.batch_size=719 is larger than the 718 training examples of each "
                                           "process (1437 over 2 processes): lower trainer.batch_size"),
    ({"batch_size": 1438}, "trainer.batch_size=1438 is larger than the 1437 training examples of each process "
                           "(1437 over 1 process): lower trainer.batch_size"),
    ({"batch_size": 4, "drop_last": False}, "dataset.drop_last=false leaves a last batch of 1 example (1437 per "
                                            "process, batch 4), which BatchNorm cannot train on: use "
                                              "dataset.drop_last=true or another batch size"),
])
def test_settings_that_do_not_fit_the_data_are_refused_in_words_that_name_the_key(arguments, message):
    with pytest.raises(ConfigError) as error:
        build_data("digits", "unused", **{"batch_size": 8, **arguments})
    assert str(error.value) == message


def test_the_edges_of_the_data_settings_are_allowed():
    bundle = build_data("digits", "unused", batch_size=1437, train_subset=1437, rank=0, world_size=1)
    assert len(bundle.train) == 1
    assert build_data("digits", "unused", batch_size=1, val_split=1436, drop_last=False).info["num_train"] == 1
    assert len(build_data("digits", "unused", batch_size=106, drop_last=False).train) == 14  # 1437 = 13 * 106 + 59
    assert len(build_data("digits", "unused", batch_size=106).train) == 13


def test_a_digits_bundle_holds_its_splits_its_facts_and_its_eval_batch_size():
    bundle = build_data("digits", "unused", batch_size=100, eval_batch_size=64, seed=3, train_subset=1000,
                        val_split=200, val_seed=5, noise=NoiseSpec("symmetric", 0.5, seed=2), world_size=2, rank=1)
    assert bundle.info == {"dataset": "digits", "num_classes": 10, "image_size": 32, "num_train": 800, "num_val": 200,
                           "num_test": 360, "train_per_rank": 400, "label_noise": bundle.info["label_noise"]}
    assert bundle.info["label_noise"]["kind"] == "symmetric" and bundle.info["label_noise"]["seed"] == 2
    assert (len(bundle.train), len(bundle.test), len(bundle.val)) == (4, 3, 2)  # 400 by 100; 180 and 100 by 64
    assert [len(t) for _, t in bundle.test.iterate(0)] == [64, 64, 52]
    assert [len(t) for _, t in bundle.val.iterate(0)] == [64, 36]
    assert bundle.mean == bundle.std[:0] + bundle.mean and len(set(bundle.mean)) == 1 and bundle.num_classes == 10


def test_the_in_order_view_is_every_training_example_once_in_order_with_the_noisy_labels():
    noise = NoiseSpec("symmetric", 1.0, seed=4)
    bundle = build_data("digits", "unused", batch_size=128, seed=9, noise=noise, augment=NO_AUGMENT, drop_last=False)
    clean = build_data("digits", "unused", batch_size=128, seed=9, augment=NO_AUGMENT)
    batches = list(bundle.train_in_order.iterate(7))
    assert [len(t) for _, t in batches] == [128] * 11 + [29]  # the last batch kept: every example once
    inputs = torch.cat([x for x, _ in batches])
    assert torch.equal(inputs, torch.cat([x for x, _ in clean.train_in_order.iterate(0)]))  # no augmentation, in order
    noisy = torch.cat([t for _, t in batches])
    clean_labels = torch.cat([t for _, t in clean.train_in_order.iterate(0)])
    assert int((noisy != clean_labels).sum()) == bundle.info["label_noise"]["flipped"] > 1000
    trained = torch.cat([t for _, t in bundle.train.iterate(0)])
    assert sorted(trained.tolist()) == sorted(noisy.tolist())  # the labels training sees, in another order


def test_channels_last_and_the_image_size_reach_every_loader():
    bundle = build_data("digits", "unused", batch_size=8, image_size=16, channels_last=True, val_split=10)
    for loader in (bundle.train, bundle.test, bundle.val, bundle.train_in_order):
        inputs, _ = next(loader.iterate(0))
        assert inputs.shape[1:] == (3, 16, 16) and inputs.is_contiguous(memory_format=torch.channels_last)


def test_an_imagefolder_bundle_holds_its_splits_noise_and_the_imagenet_statistics(tmp_path):
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    write_imagefolder(tmp_path, classes=2, per_class=6, size=20)
    bundle = build_data("imagenet", str(tmp_path), batch_size=3, eval_batch_size=5, image_size=16, num_workers=0,
                        seed=1, train_subset=10, val_split=2, val_seed=3, noise=NoiseSpec("symmetric", 1.0, seed=1),
                        drop_last=False, channels_last=True)
    assert bundle.info == {"dataset": "imagenet", "num_classes": 2, "image_size": 16, "num_train": 8, "num_val": 2,
                           "num_test": 12, "train_per_rank": 8, "label_noise": bundle.info["label_noise"]}
    assert bundle.info["label_noise"]["ratio"] == 1.0 and bundle.train_in_order is None
    assert (bundle.mean, bundle.std) == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert [len(t) for _, t in bundle.train.iterate(0)] == [3, 3, 2]  # drop_last=false keeps the last batch
    assert [len(t) for _, t in bundle.test.iterate(0)] == [5, 5, 2] and [len(t) for _, t in bundle.val.iterate(0)] == [2]
    inputs, _ = next(bundle.train.iterate(0))
    assert inputs.shape == (3, 3, 16, 16) and inputs.is_contiguous(memory_format=torch.channels_last)
    kept = build_data("imagenet", str(tmp_path), batch_size=3, image_size=16, num_workers=0, train_subset=10,
                      val_split=2, val_seed=3)
    assert [len(t) for _, t in kept.train.iterate(0)] == [3, 3]  # drop_last is the default
    held = sorted(t for _, labels in kept.val.iterate(0) for t in labels.tolist())
    again = build_data("imagenet", str(tmp_path), batch_size=3, image_size=16, num_workers=0, train_subset=10,
                       val_split=2, val_seed=3, seed=8)
    assert held == sorted(t for _, labels in again.val.iterate(0) for t in labels.tolist())
    assert build_data("imagenet", str(tmp_path), batch_size=3, image_size=16, num_workers=0).val is None
    with pytest.raises(ConfigError, match="leaves a last batch of 1 example"):
        build_data("imagenet", str(tmp_path), batch_size=3, image_size=16, num_workers=0, train_subset=10,
                   drop_last=False)


# --- extracting a CIFAR archive ----------------------------------------------------------------------------------


def _repacked(tmp_path: Path, edit) -> Path:
    """The CIFAR-10 test archive, repacked after ``edit(folder)`` changed its extracted files; in tmp_path/root."""
    source = write_cifar_archive(tmp_path / "source")
    edit(source.parent / "cifar-10-batches-py")
    root = tmp_path / "root"
    root.mkdir()
    archive = root / source.name
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted((source.parent / "cifar-10-batches-py").iterdir()):
            tar.add(path, arcname=f"cifar-10-batches-py/{path.name}")
    return archive


def _extract_into(archive: Path) -> None:
    build_data("cifar10", str(archive.parent), batch_size=8, download=False, md5=md5_of(archive))


def test_extraction_happens_in_a_hidden_staging_folder_inside_the_root_that_is_removed(tmp_path, monkeypatch):
    archive = write_cifar_archive(tmp_path, extract=False)
    staged = []
    real = tarfile.TarFile.extractall

    def spy(self, path, *args, **kwargs):
        staged.append(Path(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", spy)
    _extract_into(archive)
    (staging,) = staged
    assert staging.parent == tmp_path and staging.name.startswith(".cifar-10-batches-py.extracting-")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_an_archive_member_outside_its_folder_is_refused_and_not_written(tmp_path):
    archive = write_cifar_archive(tmp_path / "root", extract=False)
    escape = tmp_path / "escape.txt"
    with tarfile.open(archive, "r:gz") as tar:
        members = [(member, tar.extractfile(member).read() if member.isfile() else None) for member in tar]
    with tarfile.open(archive, "w:gz") as tar:
        for member, content in members:
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
        outside = tarfile.TarInfo("../../escape.txt")
        outside.size = 3
        tar.addfile(outside, io.BytesIO(b"bad"))
    with pytest.raises(DataError) as error:
        _extract_into(archive)
    assert str(error.value).startswith(f"{archive} is truncated or corrupt (")
    assert not escape.exists() and not (tmp_path / "root" / "cifar-10-batches-py").exists()


def test_a_truncated_archive_names_the_decompression_error(tmp_path):
    archive = write_cifar_archive(tmp_path, n_train=400, extract=False)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
    with pytest.raises(DataError) as error:
        _extract_into(archive)
    assert str(error.value) == (f"{archive} is truncated or corrupt (Compressed file ended before the end-of-stream "
                                "marker was reached): delete it to download it again")


def test_an_archive_of_another_folder_or_with_a_missing_batch_is_named_exactly(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    archive = other / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        note = tarfile.TarInfo("something-else/readme.txt")
        tar.addfile(note, io.BytesIO(b""))
    with pytest.raises(DataError) as error:
        _extract_into(archive)
    assert str(error.value) == f"{archive} does not hold cifar-10-batches-py/: it is not the CIFAR-10 archive"

    archive = _repacked(tmp_path, lambda folder: (folder / "test_batch").unlink())
    with pytest.raises(DataError) as error:
        _extract_into(archive)
    assert str(error.value) == (f"{archive} is incomplete: cifar-10-batches-py/test_batch is missing; delete it to "
                                "download it again")
    assert sorted(path.name for path in archive.parent.iterdir()) == ["cifar-10-python.tar.gz"]


def test_a_folder_another_process_extracted_first_is_used(tmp_path, monkeypatch):
    archive = write_cifar_archive(tmp_path, extract=False)
    real = Path.rename

    def lose_the_race(self, target):
        real(self, target)  # the other process's rename, with the same content
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(Path, "rename", lose_the_race)
    _extract_into(archive)
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_1").is_file()


def test_a_rename_that_fails_for_another_reason_is_not_hidden(tmp_path, monkeypatch):
    archive = write_cifar_archive(tmp_path, extract=False)

    def fail(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "rename", fail)
    with pytest.raises(OSError, match="No space left"):
        _extract_into(archive)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


# --- the ImageFolder loader's settings ---------------------------------------------------------------------------


def test_the_imagefolder_transforms_are_timms_random_training_and_fixed_evaluation_ones(tmp_path):
    from fsam.data.imagefolder import imagefolder_transforms

    train, test = imagefolder_transforms(24)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    torch.manual_seed(0)
    random.seed(0)
    crops = [train(image) for _ in range(4)]
    assert all(crop.shape == (3, 24, 24) for crop in crops)
    assert len({crop.sum().item() for crop in crops}) > 1  # random resized crops and flips
    assert test(image).shape == (3, 24, 24) and torch.equal(test(image), test(image))


def test_the_data_loader_pins_memory_only_for_a_gpu_and_keeps_its_workers_between_epochs(tmp_path):
    paths = _png_files(tmp_path, 4)
    assert not _folder_loader(paths).loader.pin_memory and not _folder_loader(paths).loader.persistent_workers
    on_gpu = _folder_loader(paths, device=torch.device("cuda"), num_workers=1)  # built only, never iterated
    assert on_gpu.loader.pin_memory and on_gpu.loader.persistent_workers and on_gpu.loader.num_workers == 1


def test_an_imagefolder_bundle_passes_the_process_the_workers_and_the_device_to_every_loader(tmp_path):
    write_imagefolder(tmp_path, classes=2, per_class=5, size=20)
    bundle = build_data("imagenet", str(tmp_path), batch_size=2, eval_batch_size=3, image_size=16, num_workers=2,
                        rank=1, world_size=2, val_split=4, device="cuda")  # built only: nothing reaches the GPU
    assert bundle.info["train_per_rank"] == 3 and len(bundle.train) == 1  # 6 training images over 2 processes
    assert (bundle.test.batches.block, bundle.val.batches.block) == (slice(5, 10), slice(2, 4))
    for loader in (bundle.train, bundle.test, bundle.val):
        assert loader.loader.num_workers == 2 and loader.device == torch.device("cuda") and loader.loader.pin_memory
    assert bundle.test.batches.train is False and bundle.val.batches.train is False and bundle.train.batches.train


# --- reading CIFAR batches ---------------------------------------------------------------------------------------


class _Python2Pickler(pickle._Pickler):
    """Writes a batch as the official CIFAR archives hold it (pickled by Python 2 under NumPy 1): ``bytes`` as
    Python 2's ``str`` opcodes, and NumPy's array constructor under NumPy 1's module name."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        if getattr(obj, "__module__", None) == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + f"numpy.core.multiarray\n{obj.__name__}\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def _globals_named(path: Path) -> set[str]:
    """The globals a pickle file names (each one a function or class that unpickling looks up and may call)."""
    names, strings = set(), []
    for opcode, argument, _ in pickletools.genops(path.read_bytes()):
        if opcode.name == "GLOBAL":
            names.add(argument.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            names.add(".".join(strings[-2:]))
        elif isinstance(argument, str):
            strings.append(argument)
    return names


def _rewrite(path: Path, content: dict, python2: bool = False) -> None:
    with open(path, "wb") as file:
        (_Python2Pickler(file, protocol=2) if python2 else pickle.Pickler(file, protocol=2)).dump(content)


def _batch(path: Path) -> dict:
    with open(path, "rb") as file:
        return pickle.load(file, encoding="bytes")


def _cifar10(tmp_path: Path) -> Path:
    write_cifar_archive(tmp_path, n_train=10, n_test=4)
    return tmp_path / "cifar-10-batches-py"


def _read(tmp_path: Path, variant: str = "cifar10"):
    return cifar.read_folder(cifar.VARIANTS[variant], tmp_path / cifar.VARIANTS[variant].folder)


def test_batches_pickled_by_python_2_with_byte_string_pixels_are_read(tmp_path):
    folder = _cifar10(tmp_path)
    expected = _read(tmp_path)
    for name in ("data_batch_1", "test_batch"):
        batch = _batch(folder / name)
        assert max(bytes(np.asarray(batch[b"data"]).tobytes())) >= 128  # not ASCII: needs encoding="bytes"
        _rewrite(folder / name, batch, python2=True)
        assert _globals_named(folder / name) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    again = _read(tmp_path)
    assert np.array_equal(again.train_images, expected.train_images) and again.train_images.dtype == np.uint8
    assert np.array_equal(again.test_labels, expected.test_labels)


def test_batches_with_text_keys_are_read_too(tmp_path):
    folder = _cifar10(tmp_path)
    expected = _read(tmp_path)
    batch = _batch(folder / "test_batch")
    _rewrite(folder / "test_batch", {key.decode(): value for key, value in batch.items()})
    assert np.array_equal(_read(tmp_path).test_images, expected.test_images)


def test_integer_pixels_from_0_to_255_are_taken_and_one_outside_is_refused(tmp_path):
    folder = _cifar10(tmp_path)
    batch = _batch(folder / "test_batch")
    pixels = np.asarray(batch[b"data"]).astype(np.int64)
    pixels[0, :2] = (0, 255)
    _rewrite(folder / "test_batch", {**batch, b"data": pixels})
    read = _read(tmp_path)
    assert read.test_images.dtype == np.uint8 and read.test_images[0, 0, 0, :2].tolist() == [0, 255]
    for bad, shown in ((256, "[0, 256]"), (-1, "[-1, 255]")):
        pixels[0, 0] = bad
        _rewrite(folder / "test_batch", {**batch, b"data": pixels})
        with pytest.raises(DataError) as error:
            _read(tmp_path)
        assert str(error.value) == (f"{folder / 'test_batch'} holds int64 pixels in {shown}: CIFAR batches hold "
                                    f"uint8 pixels 0-255; delete {folder} to extract it again from "
                                    "cifar-10-python.tar.gz")


def test_an_empty_training_batch_beside_full_ones_is_read_as_no_images(tmp_path):
    folder = _cifar10(tmp_path)
    _rewrite(folder / "data_batch_5", {b"data": [], b"labels": []})
    read = _read(tmp_path)
    assert read.train_images.shape[1:] == (3, 32, 32) and len(read.train_images) == len(read.train_labels) == 8


def test_an_empty_split_is_named_with_its_files(tmp_path):
    folder = _cifar10(tmp_path)
    for number in range(1, 6):
        _rewrite(folder / f"data_batch_{number}", {b"data": np.zeros((0, 3072), np.uint8), b"labels": []})
    with pytest.raises(DataError) as error:
        _read(tmp_path)
    assert str(error.value) == (f"{folder} holds no training images (data_batch_1, data_batch_2, data_batch_3, "
                                f"data_batch_4, data_batch_5: 0 examples): delete {folder} to extract it again from "
                                "cifar-10-python.tar.gz")


class _Planted:
    """Unpickles to ``call(*arguments)``: what a planted batch would make a plain pickle.load run."""

    def __init__(self, call, *arguments):
        self.call, self.arguments = call, arguments

    def __reduce__(self):
        return self.call, self.arguments


# Calls that would create the marker file if a batch were unpickled without a restriction, and the name the pickle
# gives each (protocol 2 writes the builtins under Python 2's module name).
PLANTED_CALLS = {
    "posix.system": lambda marker: _Planted(os.system, f"touch '{marker}'"),
    "io.open": lambda marker: _Planted(open, str(marker), "w"),
    "__builtin__.eval": lambda marker: _Planted(eval, f"open({str(marker)!r}, 'w')"),
}


@pytest.mark.parametrize("planted", list(PLANTED_CALLS))
def test_a_batch_that_would_run_code_is_refused_unread(tmp_path, planted):
    folder = _cifar10(tmp_path)
    marker = tmp_path / "the planted code ran"
    _rewrite(folder / "data_batch_2", {**_batch(folder / "data_batch_2"), b"data": PLANTED_CALLS[planted](marker)})
    with pytest.raises(DataError) as error:
        _read(tmp_path)
    assert str(error.value) == (f"{folder / 'data_batch_2'} is not a readable CIFAR-10 batch (it names {planted}, which "
                                "no CIFAR batch does: not unpickled, as that would run it): delete "
                                f"{folder} to extract it again from cifar-10-python.tar.gz")
    assert not marker.exists()


def test_a_batch_that_is_not_readable_is_named_with_the_reason(tmp_path):
    folder = _cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"")
    with pytest.raises(DataError) as error:
        _read(tmp_path)
    assert str(error.value) == (f"{folder / 'test_batch'} is not a readable CIFAR-10 batch (Ran out of input): "
                                f"delete {folder} to extract it again from cifar-10-python.tar.gz")


@pytest.mark.parametrize(("variant", "batch_name", "key", "shown"), [
    ("cifar10", "test_batch", b"labels", "labels"),
    ("cifar100", "train", b"fine_labels", "labels"),
    ("cifar100", "train", b"coarse_labels", "coarse"),
])
def test_labels_that_do_not_match_the_images_in_number_are_refused(tmp_path, variant, batch_name, key, shown):
    write_cifar_archive(tmp_path, variant, n_train=10, n_test=4)
    folder = tmp_path / cifar.VARIANTS[variant].folder
    batch = _batch(folder / batch_name)
    images = len(batch[b"data"])
    _rewrite(folder / batch_name, {**batch, key: list(batch[key])[:-1]})
    with pytest.raises(DataError) as error:
        _read(tmp_path, variant)
    assert str(error.value) == (f"{folder / batch_name} holds {images} images but {images - 1} {shown} labels: "
                                f"delete {folder} to extract it again from {cifar.VARIANTS[variant].archive}")


@pytest.mark.parametrize(("key", "bound"), [(b"fine_labels", 100), (b"coarse_labels", 20)])
def test_cifar100_labels_out_of_range_are_named_with_the_file_and_the_fix(tmp_path, key, bound):
    write_cifar_archive(tmp_path, "cifar100", n_train=10, n_test=4)
    folder = tmp_path / "cifar-100-python"
    batch = _batch(folder / "train")
    _rewrite(folder / "train", {**batch, key: [bound] + list(batch[key])[1:]})
    with pytest.raises(DataError) as error:
        _read(tmp_path, "cifar100")
    assert str(error.value) == (f"{folder / 'train'} holds the label {bound} in {key.decode()!r}: CIFAR labels are "
                                f"whole numbers in [0, {bound}); delete {folder} to extract it again from "
                                "cifar-100-python.tar.gz")


def test_the_cifar10_confusion_map_is_the_published_one():
    from fsam.data.noise import cifar10_class_map

    # truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog (Patrini et al., 2017)
    assert cifar10_class_map().tolist() == [0, 1, 0, 5, 7, 3, 6, 7, 8, 1]


# --- scanning an ImageFolder -------------------------------------------------------------------------------------


def test_classes_come_from_train_so_a_val_split_without_one_keeps_the_numbering(tmp_path):
    from fsam.data.imagefolder import scan_imagefolder

    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("ant", "cat"))):
        for name in classes:
            _png_files(tmp_path / split / name, 1)
    (tmp_path / "train" / "bee" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "bee" / "folder.png").mkdir()
    splits = scan_imagefolder(tmp_path)
    assert splits.classes == ["ant", "bee", "cat"]
    assert splits.train_labels.tolist() == [0, 1, 2] and splits.test_labels.tolist() == [0, 2]
    assert splits.train_labels.dtype == np.int64
    _png_files(tmp_path / "val" / "dog", 1)
    with pytest.raises(DataError) as error:
        scan_imagefolder(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'val' / 'dog'} is a class that {tmp_path / 'train'} does not have: the "
                                "val classes must be train's")


# --- digits, the quick start's data set --------------------------------------------------------------------------


def test_digits_are_8x8_counts_scaled_to_0_255_as_4x4_blocks_in_three_equal_channels():
    from fsam.data.digits import load_digits

    digits = load_digits()
    images = digits.train_images
    assert images.dtype == np.uint8 and images.shape == (1437, 3, 32, 32) and digits.test_images.shape[0] == 360
    assert sorted(np.unique(images).tolist()) == [round(v * 255 / 16) for v in range(17)]  # 0, 16, ..., 143, ..., 255
    assert (images == images[:, :1]).all()  # grey: three equal channels
    blocks = images[:, 0].reshape(1437, 8, 4, 8, 4)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # every 8x8 value as a 4x4 block
    pixels = images[:, 0] / 255.0
    assert (digits.mean, digits.std) == (pytest.approx(pixels.mean()), pytest.approx(pixels.std()))
    assert (digits.mean, digits.std) == (pytest.approx(0.3054337, abs=1e-7), pytest.approx(0.3759572, abs=1e-7))


# --- the augmentation's random stream ----------------------------------------------------------------------------


def test_the_augmentation_draws_of_a_seed_are_the_ones_published_records_were_made_with():
    """A change to what is drawn, or in which order, changes every augmented batch of every seed: a resumed or
    repeated run would no longer be the run it claims to be."""
    draws = draw_augmentation(AugmentSpec(), 5, 32, 32, torch.Generator().manual_seed(7))
    assert draws.tolist() == [[0, 4, 7, 2, 4], [6, 8, 5, 4, 8], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1],
                              [4, 16, 31, 7, 12], [0, 11, 23, 26, 6]]


@pytest.mark.parametrize("size", [5, 16])
def test_the_cutout_square_starts_half_its_size_before_its_centre(size):
    inputs = torch.ones(3, 1, 32, 32)
    draws = torch.tensor([[0] * 3, [0] * 3, [0] * 3, [1, 1, 0], [10, 1, 20], [20, 30, 5]])
    spec = AugmentSpec(crop=False, flip=False, normalize=False, cutout_size=size)
    out = augment(torch.full((3, 1, 32, 32), 255, dtype=torch.uint8), draws, spec, torch.zeros(1), torch.ones(1))
    expected = inputs.clone()
    expected[0, :, 10 - size // 2: 10 - size // 2 + size, 20 - size // 2: 20 - size // 2 + size] = 0
    expected[1, :, : 1 - size // 2 + size, 30 - size // 2:] = 0  # clipped at the top and right borders
    assert torch.equal(out, expected)


# --- CIFAR under torch.distributed -------------------------------------------------------------------------------


class _FakeGroup:
    """torch.distributed as an initialised process group would answer, recording the barriers."""

    def __init__(self, monkeypatch):
        import torch.distributed as dist

        self.events: list[str] = []
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "barrier", lambda: self.events.append("barrier"))

    def prepare(self, download: bool) -> Path:
        self.events.append(f"prepare(download={download})")
        return Path("folder")


@pytest.mark.parametrize(("rank", "world_size", "expected"), [
    (0, 2, ["prepare(download=True)", "barrier"]),
    (1, 2, ["barrier", "prepare(download=False)"]),
    (3, 4, ["barrier", "prepare(download=False)"]),
    (0, 1, ["prepare(download=True)"]),
])
def test_rank_zero_prepares_the_data_first_and_the_others_wait_and_never_download(monkeypatch, rank, world_size,
                                                                                   expected):
    group = _FakeGroup(monkeypatch)
    assert cifar._rank_zero_first(group.prepare, True, rank, world_size) == Path("folder")
    assert group.events == expected


def test_rank_zero_releases_the_others_even_when_its_preparation_fails(monkeypatch):
    group = _FakeGroup(monkeypatch)

    def fail(download):
        raise DataError("no data")

    with pytest.raises(DataError):
        cifar._rank_zero_first(fail, True, 0, 2)
    assert group.events == ["barrier"]


def test_load_cifar_downloads_by_default_as_the_only_process_and_passes_its_rank(tmp_path, monkeypatch):
    group = _FakeGroup(monkeypatch)
    asked = []
    monkeypatch.setattr(cifar, "_download", lambda variant, url, md5, root: asked.append(url) or (_ for _ in ()).throw(
        DataError("offline")))
    with pytest.raises(DataError, match="offline"):
        cifar.load_cifar("cifar10", tmp_path)
    assert asked == [cifar.VARIANTS["cifar10"].url] and group.events == []  # one process: no barrier
    with pytest.raises(DataError, match="offline"):
        cifar.load_cifar("cifar10", tmp_path, rank=0, world_size=2)
    assert group.events == ["barrier"]


def test_an_archive_that_fails_its_checksum_says_to_delete_it(tmp_path):
    archive = write_cifar_archive(tmp_path, extract=False)
    with pytest.raises(DataError) as error:
        build_data("cifar10", str(tmp_path), batch_size=8, download=False, md5="0" * 32)
    assert str(error.value) == (f"{archive} does not match its md5 checksum (expected {'0' * 32}, got "
                                f"{md5_of(archive)}): it is truncated or corrupt; delete it to download it again, or "
                                "set dataset.md5= if it is a different archive on purpose")


@pytest.mark.parametrize(("labels", "shown"), [
    (np.array([3.0, 2.5, 1.0]), "3.0"),  # a float array: its first value, as a plain number
    (np.array([[1.0], [2.5], [0.0]]), "1.0"),  # a column: flattened first
    ([2**70, 1, 2], str(2**70)),  # whole numbers too large for int64
    ([np.int64(1), np.float64(2.5), 0], "2.5"),  # numpy scalars in a list: as plain numbers
])
def test_the_first_label_that_is_not_a_class_number_is_named_as_written(tmp_path, labels, shown):
    folder = _cifar10(tmp_path)
    batch = _batch(folder / "test_batch")
    _rewrite(folder / "test_batch", {**batch, b"data": np.asarray(batch[b"data"])[:3], b"labels": labels})
    with pytest.raises(DataError) as error:
        _read(tmp_path)
    assert str(error.value).startswith(f"{folder / 'test_batch'} holds the label {shown} in 'labels': CIFAR labels are")


def test_labels_stored_as_a_column_are_read_as_one_label_per_image(tmp_path):
    folder = _cifar10(tmp_path)
    batch = _batch(folder / "test_batch")
    expected = list(batch[b"labels"])
    _rewrite(folder / "test_batch", {**batch, b"labels": np.asarray(expected, dtype=np.int32)[:, None]})
    read = _read(tmp_path)
    assert read.test_labels.dtype == np.int64 and read.test_labels.tolist() == expected


def test_seeds_and_epoch_orders_are_the_ones_published_records_were_made_with():
    """Every shuffle, noisy label and augmentation draws from these: a change would silently make a resumed or
    repeated run another run."""
    assert derive_seed(1, 2, 3) == 6498626229777268288 and derive_seed(0) == 7896617691693857887
    from fsam.data.loaders import epoch_order

    assert epoch_order(10, 1, 0)[0].tolist() == [6, 9, 4, 1, 3, 5, 0, 2, 8, 7]


# --- the device loader built directly ----------------------------------------------------------------------------


def _device_loader(train: bool, count: int = 11, **kwargs) -> DeviceLoader:
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 8, 8).clone()
    images[:, :, :, :4] += 100  # left half brighter: a flip would show
    return DeviceLoader(images, torch.arange(count), batch_size=2, augment_spec=kwargs.pop("augment_spec", AugmentSpec()),
                        mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25), seed=4, train=train, **kwargs)


def test_a_device_loader_by_default_is_the_only_process_keeps_the_size_and_drops_the_last_training_batch():
    train = _device_loader(train=True)
    assert len(train) == 5 and sum(len(t) for _, t in train.iterate(0)) == 10
    inputs, _ = next(train.iterate(0))
    assert inputs.shape == (2, 3, 8, 8) and inputs.is_contiguous()
    assert len(_device_loader(train=True, drop_last=False)) == 6


def test_the_test_split_of_a_device_loader_is_only_normalised_whatever_the_recipe_says():
    test = _device_loader(train=False, augment_spec=AugmentSpec(cutout_prob=1.0))
    inputs = torch.cat([x for x, _ in test.iterate(0)])
    images = _device_loader(train=False).images.float() / 255.0
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.5, 0.25]).view(1, 3, 1, 1)
    torch.testing.assert_close(inputs, (images - mean) / std, rtol=0, atol=1e-6)


def test_training_shards_of_a_device_loader_are_equal_blocks_of_the_epochs_permutation():
    ranks = [_device_loader(train=True, rank=rank, world_size=2) for rank in (0, 1)]
    assert [len(loader) for loader in ranks] == [2, 2]  # 5 each; the 11th example sits the epoch out
    from fsam.data.loaders import epoch_order

    order = epoch_order(11, 4, 0)[0].tolist()
    assert [[t for _, ts in loader.iterate(0) for t in ts.tolist()] for loader in ranks] == [order[0:4], order[5:9]]


# --- augmentation switches against the draws ---------------------------------------------------------------------


def _draw_rows(batch: int, **rows: list[int]) -> torch.Tensor:
    names = ["offset_y", "offset_x", "flip", "cutout", "centre_y", "centre_x"]
    return torch.tensor([rows.get(name, [0] * batch) for name in names])


def _plain(images: torch.Tensor, draws: torch.Tensor, **switches) -> torch.Tensor:
    spec = AugmentSpec(normalize=False, **switches)
    return augment(images, draws, spec, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))


def test_flip_without_crop_uses_the_drawn_flips_and_never_shifts():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    draws = draw_augmentation(AugmentSpec(crop=False, cutout=False), 6, 8, 8, torch.Generator().manual_seed(1))
    out = _plain(images, draws, crop=False, cutout=False)
    for image, result, flipped in zip(images.float() / 255.0, out, draws[2].tolist()):
        assert torch.equal(result, image.flip(-1) if flipped else image)
    assert 0 < sum(draws[2].tolist()) < 6


def test_parts_switched_off_are_skipped_whatever_the_draws_say():
    images = torch.randint(1, 256, (2, 3, 8, 8), dtype=torch.uint8)
    draws = _draw_rows(2, offset_y=[0, 8], offset_x=[8, 0], flip=[1, 1], cutout=[1, 1], centre_y=[4, 4],
                       centre_x=[4, 4])
    assert torch.equal(_plain(images, draws, crop=False, flip=False, cutout=False), images.float() / 255.0)
    centred = _draw_rows(2, offset_y=[4, 4], offset_x=[4, 4], flip=[1, 1], cutout=[1, 1])  # crops that do not shift
    assert torch.equal(_plain(images, centred, flip=False, cutout=False), images.float() / 255.0)


def test_a_cutout_of_one_pixel_zeroes_exactly_that_pixel():
    images = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    out = _plain(images, _draw_rows(1, cutout=[1], centre_y=[2], centre_x=[5]), crop=False, flip=False,
                 cutout_size=1)
    assert (out == 0).nonzero().tolist() == [[0, channel, 2, 5] for channel in range(3)]


def test_a_smaller_image_size_averages_each_2x2_block_half_pixel_centred():
    """Bilinear with half-pixel centres (align_corners=False) at an exact factor of two is the 2x2 mean; nearest
    neighbour or corner-aligned resizing would keep the checkerboard's extremes."""
    count = 4
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 255).to(torch.uint8)
    images = board.expand(count, 3, 8, 8).clone()
    loader = DeviceLoader(images, torch.arange(count), batch_size=count, augment_spec=NO_AUGMENT, mean=(0.0,) * 3,
                          std=(1.0,) * 3, seed=0, train=False, image_size=4)
    inputs, _ = next(loader.iterate(0))
    torch.testing.assert_close(inputs, torch.full((count, 3, 4, 4), 0.5), rtol=0, atol=1e-6)


# --- label noise and the validation split, as published -----------------------------------------------------------


def test_no_noise_returns_the_labels_and_an_empty_record_even_with_a_ratio_set():
    labels = torch.arange(20) % 10
    for spec in (NoiseSpec(), NoiseSpec("none", 0.4, seed=2), NoiseSpec("symmetric", 0.0)):
        noisy, record = corrupt_labels(labels, 10, spec, None)
        assert torch.equal(noisy, labels) and noisy is not labels
        assert record == {"kind": spec.kind, "ratio": spec.ratio, "seed": spec.seed, "selected": 0, "flipped": 0}


def test_asymmetric_noise_without_a_class_map_is_refused_in_words():
    with pytest.raises(ConfigError) as error:
        corrupt_labels(torch.arange(10), 10, NoiseSpec("asymmetric", 0.2), None)
    assert str(error.value) == ("dataset.noise.kind=asymmetric needs a class map, and this data set has none: use "
                                "dataset.noise.kind=symmetric or none")


def test_symmetric_noise_draws_every_class_including_the_first():
    noisy, record = corrupt_labels(torch.full((400,), 5), 10, NoiseSpec("symmetric", 1.0, seed=1), None)
    assert set(noisy.tolist()) == set(range(10)) and record["selected"] == 400


def test_noisy_labels_and_the_validation_split_of_a_seed_are_the_ones_published_records_were_made_with():
    noisy, record = corrupt_labels(torch.arange(12) % 4, 4, NoiseSpec("symmetric", 0.5, seed=3), None)
    assert noisy.tolist() == [0, 1, 3, 0, 1, 0, 2, 0, 0, 0, 2, 3]
    assert record == {"kind": "symmetric", "ratio": 0.5, "seed": 3, "selected": 6, "flipped": 6}
    from fsam.data.factory import _hold_out

    (kept, _), (held, _) = _hold_out(np.arange(10), np.arange(10), 3, 2)
    assert held.tolist() == [0, 4, 5] and kept.tolist() == [1, 2, 3, 6, 7, 8, 9]


def test_a_part_switched_off_draws_its_neutral_value_and_the_others_keep_their_numbers():
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    full = draw_augmentation(AugmentSpec(), 50, 32, 32, generator())
    off = {
        "crop": (AugmentSpec(crop=False), [0, 1], 4),
        "flip": (AugmentSpec(flip=False), [2], 0),
        "cutout": (AugmentSpec(cutout=False), [3], 0),
        "cutout_size": (AugmentSpec(cutout_size=0), [3], 0),
    }
    for name, (spec, rows, neutral) in off.items():
        draws = draw_augmentation(spec, 50, 32, 32, generator())
        assert (draws[rows] == neutral).all(), name
        others = [row for row in range(6) if row not in rows]
        assert torch.equal(draws[others], full[others]), name
    assert full[3].any() and full[2].any() and (full[0] != 4).any()


def test_build_data_defaults_are_seed_0_validation_seed_0_two_workers_and_standard_layout(tmp_path):
    default = build_data("digits", "unused", batch_size=64, val_split=20)
    explicit = build_data("digits", "unused", batch_size=64, val_split=20, seed=0, val_seed=0)
    assert torch.equal(next(default.train.iterate(0))[0], next(explicit.train.iterate(0))[0])
    assert torch.equal(next(default.val.iterate(0))[1], next(explicit.val.iterate(0))[1])
    assert next(default.train.iterate(0))[0].is_contiguous()
    assert build_data("digits", "unused", batch_size=64).val is None
    write_imagefolder(tmp_path, classes=2, per_class=2, size=20)
    assert build_data("imagenet", str(tmp_path), batch_size=2, image_size=16).train.loader.num_workers == 2


def test_pixels_that_are_not_numbers_are_named_by_their_type(tmp_path):
    folder = _cifar10(tmp_path)
    batch = _batch(folder / "test_batch")
    _rewrite(folder / "test_batch", {**batch, b"data": np.array([["a"] * 3072] * 4)})
    with pytest.raises(DataError) as error:
        _read(tmp_path)
    assert str(error.value).startswith(f"{folder / 'test_batch'} holds <U1 pixels: CIFAR batches hold uint8 pixels")


@pytest.mark.parametrize(("rank", "expected"), [
    (0, ["prepare(download=False)", "barrier"]),
    (1, ["barrier", "prepare(download=False)"]),
])
def test_build_data_under_torch_distributed_lets_rank_zero_prepare_cifar_first(tmp_path, monkeypatch, rank, expected):
    write_cifar_archive(tmp_path, n_train=16, n_test=8)
    group = _FakeGroup(monkeypatch)
    real = cifar.prepare_folder

    def prepare(variant, root, *, download, url, md5):
        group.events.append(f"prepare(download={download})")
        return real(variant, root, download=download, url=url, md5=md5)

    monkeypatch.setattr(cifar, "prepare_folder", prepare)
    build_data("cifar10", str(tmp_path), batch_size=4, download=False, rank=rank, world_size=2)
    assert group.events == expected


def test_build_data_with_download_off_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "_download", lambda *args: pytest.fail("downloaded although download=False"))
    with pytest.raises(DataError) as error:
        build_data("cifar10", str(tmp_path), batch_size=4, download=False)
    assert str(error.value).startswith(f"CIFAR-10 not found: {tmp_path} holds neither cifar-10-batches-py/ nor")
