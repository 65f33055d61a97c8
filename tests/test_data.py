"""The DataModule on tiny datasets written in the real on-disk formats, read through the real
torchvision dataset classes, with both loader paths."""

import dataclasses
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from conftest import (
    assert_interleaves,
    class_images,
    write_cifar_dataset,
    write_idx_dataset,
    write_svhn_dataset,
)

from lightning_lth import data as data_module
from lightning_lth.data import DATASETS, LTHDataModule
from lightning_lth.errors import LTHError

SIZES = {"fashion_mnist": (256, 128), "cifar10": (100, 50), "cifar100": (200, 60)}
SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
LOADERS = ("device", "torchvision")


@pytest.fixture
def no_system_dirs(monkeypatch):
    """The machine may have Debian's dataset-fashion-mnist: make the lookup ignore it."""
    for name in ("fashion_mnist", "mnist"):
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], system_dirs=()))


@pytest.fixture
def data_dir(tmp_path, allow_unverified_cifar, no_system_dirs):
    """One data_dir with all three tiny datasets (written once per test: it takes ~0.1 s)."""
    root = tmp_path / "data"
    write_idx_dataset(root, "fashion_mnist", *SIZES["fashion_mnist"])
    write_cifar_dataset(root, "cifar10", *SIZES["cifar10"])
    write_cifar_dataset(root, "cifar100", *SIZES["cifar100"])
    return root


def make_dm(name, root, loader, **kwargs):
    kwargs = {"batch_size": 32, "eval_batch_size": 1000, "num_workers": 0, "download": False,
              "seed": 0, **kwargs}
    dm = LTHDataModule(name, str(root), loader=loader, **kwargs)
    dm.setup("fit")
    return dm


def raw_uint8(dataset) -> torch.Tensor:
    """The split's images as torchvision holds them, as N x C x H x W uint8."""
    images = torch.as_tensor(np.asarray(dataset.data))
    return images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (images.double() / 255 - mean) / std


def all_batches(loader):
    images, labels = zip(*list(loader), strict=True)
    return torch.cat(images), torch.cat(labels)


# -- the files themselves -------------------------------------------------------------------
@pytest.mark.quick
def test_idx_files_have_the_real_header(tmp_path):
    root = write_idx_dataset(tmp_path, "fashion_mnist", n_train=12, n_test=5)
    raw = root / "FashionMNIST" / "raw"
    with gzip.open(raw / "train-images-idx3-ubyte.gz") as handle:
        blob = handle.read()
    assert struct.unpack(">4i", blob[:16]) == (2051, 12, 28, 28)
    assert len(blob) == 16 + 12 * 28 * 28
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as handle:
        blob = handle.read()
    assert struct.unpack(">2i", blob[:8]) == (2049, 5)
    assert len(blob) == 8 + 5 and max(blob[8:]) < 10
    # deterministic from the seed, different across seeds
    again = write_idx_dataset(tmp_path / "again", "fashion_mnist", n_train=12, n_test=5)
    other = write_idx_dataset(tmp_path / "other", "fashion_mnist", n_train=12, n_test=5, seed=1)
    name = "FashionMNIST/raw/train-images-idx3-ubyte.gz"
    read = lambda path: gzip.open(path).read()  # noqa: E731
    assert read(again / name) == read(root / name) != read(other / name)


@pytest.mark.quick
def test_cifar_pickles_look_like_the_real_ones(tmp_path):
    root = write_cifar_dataset(tmp_path, "cifar10", n_train=10, n_test=4)
    folder = root / "cifar-10-batches-py"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                     "data_batch_4", "data_batch_5", "test_batch"]
    with open(folder / "data_batch_1", "rb") as handle:  # the CIFAR site's recipe
        batch = pickle.load(handle, encoding="bytes")
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (2, 3072)
    assert len(batch[b"labels"]) == 2
    with open(folder / "batches.meta", "rb") as handle:
        assert pickle.load(handle, encoding="latin1")["label_names"][0] == "airplane"
    root = write_cifar_dataset(tmp_path, "cifar100", n_train=10, n_test=4)
    with open(root / "cifar-100-python" / "train", "rb") as handle:
        train = pickle.load(handle, encoding="bytes")
    assert train[b"data"].shape == (10, 3072)
    assert len(train[b"fine_labels"]) == len(train[b"coarse_labels"]) == 10


def test_tiny_fmnist_fixture_is_a_data_dir(tiny_fmnist, no_system_dirs):
    dm = LTHDataModule("fashion_mnist", str(tiny_fmnist), download=False, num_workers=0)
    dm.setup("fit")
    assert (len(dm.splits["train"]), len(dm.splits["test"])) == (256, 128)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (128, 1, 28, 28) and labels.shape == (128,)
    assert sorted(set(labels.tolist())) == list(range(10))


# -- reading through torchvision, both loaders ----------------------------------------------
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", list(SIZES))
def test_reads_the_written_data_with_both_loaders(data_dir, name, loader):
    n_train, n_test = SIZES[name]
    dm = make_dm(name, data_dir, loader)
    info = DATASETS[name]
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (
        info.num_classes, info.in_channels, info.image_size)

    # torchvision decoded exactly the pixels and labels we wrote (layout and all)
    test_split = dm.splits["test"]
    written_x, written_y = class_images(n_test, info.num_classes,
                                        (28, 28) if name == "fashion_mnist" else (32, 32, 3), 0)
    assert np.array_equal(np.asarray(test_split.data), written_x)
    assert list(map(int, test_split.targets)) == written_y.tolist()

    # eval batches: in order, float32, normalised as (x/255 - mean)/std with the authors' stats
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (n_test, *SHAPES[name]) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == written_y.tolist()
    expected = normalise(raw_uint8(test_split), *info.authors_stats)
    torch.testing.assert_close(images.double(), expected, atol=1e-5, rtol=0)
    dims = (0, 2, 3)
    torch.testing.assert_close(images.double().mean(dims), expected.mean(dims), atol=1e-5, rtol=0)
    torch.testing.assert_close(images.double().std(dims), expected.std(dims), atol=1e-5, rtol=0)

    # train batches: the right shapes, every training image once per epoch
    loader_ = dm.train_dataloader()
    first_images, first_labels = next(iter(loader_))
    assert first_images.shape == (32, *SHAPES[name]) and first_images.dtype == torch.float32
    assert first_labels.dtype == torch.int64
    train_images, train_labels = all_batches(loader_)
    assert train_images.shape == (n_train, *SHAPES[name])
    assert sorted(train_labels.tolist()) == sorted(map(int, dm.splits["train"].targets))


def to_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo the normalisation; the result must be whole pixel values (checks it too)."""
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    pixels = (images.double() * std + mean) * 255
    assert (pixels - pixels.round()).abs().max() < 1e-3
    assert pixels.min() > -0.5 and pixels.max() < 255.5
    return pixels.round().to(torch.uint8)


PAD = 4
SHIFTS = [(dy, dx) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)]
IDENTITY = SHIFTS.index((PAD, PAD))  # unshifted, not flipped


def crop_flip_view(padded: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` of a zero-padded C x 40 x 40 image: shift ``view % 81``, flipped when
    ``view >= 81``."""
    dy, dx = SHIFTS[view % len(SHIFTS)]
    crop = padded[:, dy:dy + 32, dx:dx + 32]
    return crop.flip(-1) if view >= len(SHIFTS) else crop


def center_patches(padded: torch.Tensor) -> torch.Tensor:
    """N x C x 40 x 40 -> N x 162 x (C*8*8): the central 8 x 8 patch of each of the 162
    crop/flip views (the centre of a flipped view is the flipped centre of the crop)."""
    patches = torch.stack([padded[:, :, dy + 12:dy + 20, dx + 12:dx + 20]
                           for dy, dx in SHIFTS], 1)
    return torch.cat([patches, patches.flip(-1)], 1).flatten(2)


@pytest.mark.parametrize("loader", LOADERS)
def test_cifar_train_augmentation_is_crop_and_flip(data_dir, loader):
    """Each augmented training image is one of the 162 zero-padded RandomCrop(32, padding=4)
    + flip views of a training image of the same label; not all are the plain view, and
    both shifts and flips occur."""
    dm = make_dm("cifar10", data_dir, loader)
    stats = DATASETS["cifar10"].authors_stats
    train_split = dm.splits["train"]
    raw, targets = raw_uint8(train_split), torch.as_tensor(train_split.targets)
    padded = torch.nn.functional.pad(raw, (PAD,) * 4)
    centers = center_patches(padded)
    images, labels = all_batches(dm.train_dataloader())
    assert images.shape == (len(raw), 3, 32, 32) and images.dtype == torch.float32
    pixels = to_uint8(images, *stats)
    views_seen = []
    for image, label in zip(pixels, labels, strict=True):
        sources = torch.nonzero(targets == label).flatten()
        hits = (centers[sources] == image[:, 12:20, 12:20].flatten()).all(-1).nonzero()
        assert len(hits), "an augmented image is no crop/flip of a training image"
        source, view = sources[hits[0, 0]], int(hits[0, 1])
        assert torch.equal(image, crop_flip_view(padded[source], view))
        views_seen.append(view)
    assert views_seen.count(IDENTITY) < len(raw) // 4
    assert any(v >= len(SHIFTS) for v in views_seen) and any(v < len(SHIFTS) for v in views_seen)
    assert len({SHIFTS[v % len(SHIFTS)] for v in views_seen}) > 10

    # augment=False: the training images themselves
    plain = make_dm("cifar10", data_dir, loader, augment=False)
    images, _ = all_batches(plain.train_dataloader())
    originals = {x.numpy().tobytes() for x in raw}
    assert all(x.numpy().tobytes() in originals for x in to_uint8(images, *stats))


def test_svhn_mat_files_look_like_the_real_ones(tmp_path):
    from scipy.io import loadmat, whosmat

    root = write_svhn_dataset(tmp_path, n_train=12, n_test=5)
    path = root / "train_32x32.mat"
    assert path.read_bytes()[:10] == b"MATLAB 5.0"  # the real files' header text
    assert dict((name, shape) for name, shape, _ in whosmat(path)) == {
        "X": (32, 32, 3, 12), "y": (12, 1)}
    mat = loadmat(path)
    assert mat["X"].dtype == np.uint8 and mat["y"].dtype == np.uint8
    assert set(mat["y"].ravel()) == set(range(1, 11))  # 10 stands for the digit 0


@pytest.mark.parametrize("loader", LOADERS)
def test_svhn_reads_through_torchvision_crops_and_never_flips(tmp_path, allow_unverified_svhn,
                                                               loader):
    """torchvision's SVHN reads the .mat files (label 10 -> digit 0, N x C x H x W); eval
    batches are normalised with SVHN's statistics; each augmented training image is one of
    the 81 zero-padded RandomCrop(32, padding=4) shifts of a same-label image, never mirrored."""
    n_train, n_test = 60, 20
    root = write_svhn_dataset(tmp_path, n_train, n_test)
    dm = make_dm("svhn", root, loader)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    written_x, digits = class_images(n_test, 10, (32, 32, 3), 0)
    test_split = dm.splits["test"]
    assert np.array_equal(test_split.data, written_x.transpose(0, 3, 1, 2))
    assert test_split.labels.tolist() == digits.tolist() and 0 in digits
    images, labels = next(iter(dm.test_dataloader()))
    assert labels.tolist() == digits.tolist()
    stats = DATASETS["svhn"].authors_stats
    assert stats == DATASETS["svhn"].stats == ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
    expected = normalise(torch.as_tensor(written_x).permute(0, 3, 1, 2), *stats)
    torch.testing.assert_close(images.double(), expected, atol=1e-5, rtol=0)

    train_split = dm.splits["train"]
    raw, targets = torch.as_tensor(train_split.data), torch.as_tensor(train_split.labels)
    padded = torch.nn.functional.pad(raw, (PAD,) * 4)
    centers = center_patches(padded)
    images, labels = all_batches(dm.train_dataloader())
    assert images.shape == (n_train, 3, 32, 32)
    shifts = []
    for image, label in zip(to_uint8(images, *stats), labels, strict=True):
        sources = torch.nonzero(targets == label).flatten()
        hits = (centers[sources] == image[:, 12:20, 12:20].flatten()).all(-1).nonzero()
        assert len(hits), "an augmented image is no crop/flip of a training image"
        source, view = sources[hits[0, 0]], int(hits[0, 1])
        assert view < len(SHIFTS), "a training image was mirrored"
        assert torch.equal(image, crop_flip_view(padded[source], view))
        shifts.append(view)
    assert shifts.count(IDENTITY) < n_train // 4 and len(set(shifts)) > 10


@pytest.mark.parametrize("loader", LOADERS)
def test_cifar100_train_batches_are_augmented_too(data_dir, loader):
    dm = make_dm("cifar100", data_dir, loader)
    images, labels = all_batches(dm.train_dataloader())
    assert images.shape == (SIZES["cifar100"][0], 3, 32, 32)
    pixels = to_uint8(images, *DATASETS["cifar100"].authors_stats)
    originals = {x.numpy().tobytes() for x in raw_uint8(dm.splits["train"])}
    changed = sum(x.numpy().tobytes() not in originals for x in pixels)
    assert changed > len(pixels) // 2
    assert labels.max() < 100


@pytest.mark.parametrize("loader", LOADERS)
def test_dataset_normalisation_option(data_dir, loader):
    dm = make_dm("cifar10", data_dir, loader, normalization="dataset")
    images, _ = next(iter(dm.val_dataloader()))
    expected = normalise(raw_uint8(dm.splits["val"]), *DATASETS["cifar10"].stats)
    torch.testing.assert_close(images.double(), expected, atol=1e-5, rtol=0)
    # the authors normalise CIFAR-10 with ImageNet's statistics
    assert DATASETS["cifar10"].authors_stats == data_module.IMAGENET_STATS


@pytest.mark.parametrize("loader", LOADERS)
def test_fashion_mnist_is_not_augmented(data_dir, loader):
    dm = make_dm("fashion_mnist", data_dir, loader)
    images, labels = all_batches(dm.train_dataloader())
    pixels = to_uint8(images, *DATASETS["fashion_mnist"].authors_stats)
    raw, targets = raw_uint8(dm.splits["train"]), dm.splits["train"].targets
    originals = {x.numpy().tobytes(): int(y) for x, y in zip(raw, targets, strict=True)}
    seen = [originals[x.numpy().tobytes()] for x in pixels]  # KeyError: not an original
    assert seen == labels.tolist()
    assert len({x.numpy().tobytes() for x in pixels}) == len(raw)  # each exactly once


# -- splits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", LOADERS)
def test_validation_is_the_test_split_by_default(data_dir, loader):
    dm = make_dm("fashion_mnist", data_dir, loader)
    n_train, n_test = SIZES["fashion_mnist"]
    assert dm.splits["val"] is dm.splits["test"]
    assert len(dm.splits["train"]) == n_train and len(dm.splits["val"]) == n_test
    val = all_batches(dm.val_dataloader())
    test = all_batches(dm.test_dataloader())
    assert torch.equal(val[0], test[0]) and torch.equal(val[1], test[1])


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("val_split, held", [(40, 40), (0.25, 25)])
def test_val_split_holds_out_training_images(data_dir, loader, val_split, held):
    n_train, n_test = SIZES["cifar10"]
    dm = make_dm("cifar10", data_dir, loader, val_split=val_split)
    train, val, test = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    assert (len(train), len(val), len(test)) == (n_train - held, held, n_test)
    assert sorted(train.indices + val.indices) == list(range(n_train))  # disjoint, complete
    val_images, val_labels = all_batches(dm.val_dataloader())
    assert val_images.shape == (held, 3, 32, 32)
    assert len(all_batches(dm.train_dataloader())[1]) == n_train - held
    # the held-out images are training images, unaugmented
    raw = raw_uint8(train.dataset)[torch.as_tensor(val.indices)]
    expected = normalise(raw, *DATASETS["cifar10"].authors_stats)
    torch.testing.assert_close(val_images.double(), expected, atol=1e-5, rtol=0)
    assert val_labels.tolist() == [int(train.dataset.targets[i]) for i in val.indices]
    # the same split every time
    again = make_dm("cifar10", data_dir, loader, val_split=val_split)
    assert again.splits["val"].indices == val.indices


@pytest.mark.parametrize("val_split", [100, 0.999, 500])
def test_val_split_that_leaves_nothing_is_an_error(data_dir, val_split):
    with pytest.raises(LTHError, match="val_split"):
        make_dm("cifar10", data_dir, "device", val_split=val_split)


# -- where files are found ------------------------------------------------------------------
def test_fashion_mnist_found_in_a_system_dir(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    write_idx_dataset(tmp_path, "fashion_mnist", 64, 32, seed=3, folder=system)
    before = {p.name: p.read_bytes() for p in system.iterdir()}
    monkeypatch.setitem(DATASETS, "fashion_mnist", dataclasses.replace(
        DATASETS["fashion_mnist"], system_dirs=(str(tmp_path / "absent"), str(system))))
    data_dir = tmp_path / "empty-data-dir"
    dm = make_dm("fashion_mnist", data_dir, "device")
    assert len(dm.splits["train"]) == 64 and len(dm.splits["test"]) == 32
    written_x, _ = class_images(32, 10, (28, 28), 3)
    assert np.array_equal(np.asarray(dm.splits["test"].data), written_x)
    # unpacked into data_dir for torchvision; the system dir is left as it was
    raw = data_dir / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(n[:-3] for n in before)
    assert {p.name: p.read_bytes() for p in system.iterdir()} == before

    # files in data_dir win over the system dir, gz at the top of data_dir too
    top = tmp_path / "top"
    write_idx_dataset(top, "fashion_mnist", 48, 16, seed=4, folder=top)
    dm = make_dm("fashion_mnist", top, "torchvision")
    assert len(dm.splits["train"]) == 48 and len(dm.splits["test"]) == 16


def test_mnist_reads_its_own_folder(tmp_path, no_system_dirs):
    root = write_idx_dataset(tmp_path, "mnist", 64, 32)
    dm = make_dm("mnist", root, "device")
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape == (32, 1, 28, 28)
    expected = normalise(raw_uint8(dm.splits["val"]), *DATASETS["mnist"].stats)
    torch.testing.assert_close(images.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, folder, files", [
    ("cifar10", "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta"),
    ("cifar100", "cifar-100-python", "train, test, meta"),
    ("fashion_mnist", "FashionMNIST/raw", "train-images-idx3-ubyte"),
    ("mnist", "MNIST/raw", "t10k-labels-idx1-ubyte"),
    ("svhn", "", "train_32x32.mat, test_32x32.mat"),
])
def test_missing_data_without_download_names_what_goes_where(tmp_path, no_system_dirs, name,
                                                              folder, files):
    data_dir = tmp_path / "nothing-here"
    dm = LTHDataModule(name, str(data_dir), download=False)
    with pytest.raises(LTHError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message
    assert repr(name) in message
    assert str(data_dir.resolve() / folder) in message
    assert files in message and "download" in message


@pytest.mark.quick
@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_corrupt_gz_is_one_clear_error_and_leaves_no_litter(tmp_path, no_system_dirs, damage):
    root = write_idx_dataset(tmp_path, "fashion_mnist", 16, 8)
    raw = root / "FashionMNIST" / "raw"
    bad = raw / "train-images-idx3-ubyte.gz"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"garbage" * 50)
    with pytest.raises(LTHError) as info:
        LTHDataModule("fashion_mnist", str(root), download=False).setup("fit")
    assert str(bad) in str(info.value) and "gzip" in str(info.value)
    assert not list(raw.glob("*.tmp"))
    assert not (raw / "train-images-idx3-ubyte").exists()


def test_partial_cifar_is_reported_missing(tmp_path, allow_unverified_cifar):
    root = write_cifar_dataset(tmp_path, "cifar10", 20, 10)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(LTHError, match="data_batch_1..5"):
        LTHDataModule("cifar10", str(root), download=False).setup("fit")


@pytest.mark.quick
def test_unknown_dataset_lists_valid_ones():
    with pytest.raises(LTHError) as info:
        LTHDataModule("stl10")
    message = str(info.value)
    assert "'stl10'" in message
    for name in ("cifar10", "cifar100", "fashion_mnist", "mnist", "imagenet", "svhn"):
        assert name in message


@pytest.mark.parametrize("kwargs, bad", [
    ({"loader": "dali"}, "'dali'"),
    ({"normalization": "imagenet"}, "'imagenet'"),
    ({"batch_size": 0}, "0"),
    ({"val_split": -1}, "-1"),
])
def test_bad_datamodule_options(kwargs, bad):
    with pytest.raises(LTHError) as info:
        LTHDataModule("cifar10", **kwargs)
    assert bad in str(info.value)


# -- order seed, DDP partition, per-epoch determinism -----------------------------------------
@pytest.mark.parametrize("loader", LOADERS)
def test_ddp_global_batch_ranks_make_the_one_rank_batches(data_dir, loader):
    dm = make_dm("cifar10", data_dir, loader, val_split=1)  # 99 augmented training images
    assert dm.ddp_batch == "global"
    ranks = [dm.build_loader("train", rank, 2) for rank in range(2)]
    assert next(iter(ranks[0]))[1].shape == (16,)
    assert_interleaves(dm.build_loader("train"), ranks)
    with pytest.raises(LTHError) as info:
        dm.build_loader("train", 0, 3)
    assert "32" in str(info.value) and "3 ranks" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_ddp_per_rank_batch_is_each_ranks(data_dir, loader):
    dm = make_dm("cifar10", data_dir, loader, val_split=1, ddp_batch="per_rank")
    ranks = [dm.build_loader("train", rank, 3) for rank in range(3)]
    assert next(iter(ranks[0]))[1].shape == (32,)
    assert_interleaves(make_dm("cifar10", data_dir, loader, val_split=1,
                        batch_size=96).build_loader("train"), ranks)


def test_unknown_ddp_batch_names_the_valid_ones():
    with pytest.raises(LTHError) as info:
        LTHDataModule("cifar10", ddp_batch="local")
    assert "'local'" in str(info.value) and "global, per_rank" in str(info.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_ddp_eval_shards_hold_every_image_once(data_dir, loader):
    dm = make_dm("fashion_mnist", data_dir, loader, eval_batch_size=16)
    whole = all_batches(dm.build_loader("test"))
    seen = 0
    for rank in range(3):  # 128 test images: 43, 43, 42
        images, labels = all_batches(dm.build_loader("test", rank, 3))
        assert torch.equal(images, whole[0][rank::3]) and torch.equal(labels, whole[1][rank::3])
        seen += len(labels)
    assert seen == len(whole[1]) == SIZES["fashion_mnist"][1]


@pytest.mark.parametrize("loader", LOADERS)
def test_order_seed_over_configured_seed_over_global_seed(data_dir, loader):
    def order(seed=None, order_seed=None):
        dm = make_dm("cifar10", data_dir, loader, seed=seed)
        dm.order_seed = order_seed
        return all_batches(dm.build_loader("train"))

    torch.manual_seed(11)
    default = order()
    assert all(torch.equal(a, b) for a, b in zip(default, order(seed=11), strict=True))
    chosen = order(seed=11, order_seed=3)
    assert all(torch.equal(a, b) for a, b in zip(chosen, order(seed=3), strict=True))
    assert not torch.equal(chosen[0], default[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_torchvision_epoch_depends_only_on_seed_and_epoch(data_dir, workers):
    """Epoch 2 of a fresh loader is epoch 2 after epochs 0 and 1, with or without worker
    processes; the global RNG is left as it was."""
    dm = make_dm("cifar10", data_dir, "torchvision")
    epoch = [0]
    loader = dm.build_loader("train", epoch_fn=lambda: epoch[0])
    first = all_batches(loader)
    epoch[0] = 1
    all_batches(loader)
    epoch[0] = 2
    before = torch.get_rng_state()
    late = all_batches(loader)
    assert torch.equal(torch.get_rng_state(), before)
    worked = make_dm("cifar10", data_dir, "torchvision", num_workers=workers)
    fresh = all_batches(worked.build_loader("train", epoch_fn=lambda: 2))
    assert torch.equal(late[0], fresh[0]) and torch.equal(late[1], fresh[1])
    assert not torch.equal(first[0], late[0])


def test_data_dir_that_is_a_file_is_one_clear_error(tmp_path):
    path = tmp_path / "data.tar"
    path.write_bytes(b"not a folder")
    with pytest.raises(LTHError) as info:
        LTHDataModule("fashion_mnist", str(path), download=False).setup("fit")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
