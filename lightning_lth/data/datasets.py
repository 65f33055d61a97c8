"""The dataset table: each dataset's keyword row (``DatasetInfo``), where its files are
found, and loading a split through torchvision's own dataset classes."""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets

from lightning_lth.errors import LTHError

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))


@dataclass(frozen=True)
class DatasetInfo:
    torchvision_class: type
    num_classes: int
    in_channels: int
    image_size: int
    stats: tuple  # (mean, std) of the dataset itself
    authors_stats: tuple  # what the authors' code normalises with
    augment: bool  # RandomCrop(pad 4) on the train split, + horizontal flip where ``flip``
    folder: str  # where torchvision looks below data_dir
    files: str  # what a user must put there
    system_dirs: tuple[str, ...] = ()
    flip: bool = True  # SVHN: False, a mirrored digit is not that digit (a mirrored 3 is no 3)


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        datasets.CIFAR10, 10, 3, 32,
        ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), IMAGENET_STATS, True,
        "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta"),
    "cifar100": DatasetInfo(
        datasets.CIFAR100, 100, 3, 32,
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), True,
        "cifar-100-python", "train, test, meta"),
    "fashion_mnist": DatasetInfo(
        datasets.FashionMNIST, 10, 1, 28, ((0.2860,), (0.3530,)), ((0.2860,), (0.3530,)),
        False, "FashionMNIST/raw",
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (or the same with .gz)",
        ("/usr/share/datasets/fashion-mnist",)),
    # ImageFolder layout: <data_dir>/train/<class>/*.JPEG and <data_dir>/val/<class>/*.JPEG
    "imagenet": DatasetInfo(
        datasets.ImageFolder, 1000, 3, 224, IMAGENET_STATS, IMAGENET_STATS, True, ".",
        "train/<class>/<image> and val/<class>/<image> (torchvision's ImageFolder layout)"),
    "mnist": DatasetInfo(
        datasets.MNIST, 10, 1, 28, ((0.1307,), (0.3081,)), ((0.1307,), (0.3081,)), False,
        "MNIST/raw",
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (or the same with .gz)",
        ("/usr/share/datasets/mnist",)),
    # The train-split mean/std commonly cited for SVHN, which the authors' released
    # loaders.py also normalises with (not recomputed here); crop without flip, as there.
    "svhn": DatasetInfo(
        datasets.SVHN, 10, 3, 32, SVHN_STATS, SVHN_STATS, True, ".",
        "train_32x32.mat, test_32x32.mat", flip=False),
}
NORMALIZATIONS = ("authors", "dataset")
LOADERS = ("device", "torchvision")
DDP_BATCHES = ("global", "per_rank")


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise LTHError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def _stage_idx_files(info: DatasetInfo, root: Path) -> None:
    """torchvision's MNIST classes read unpacked IDX files from <root>/<Name>/raw.

    Gzipped files there, in ``root`` itself, or in a system location (Debian's
    dataset-fashion-mnist) are unpacked into that folder; nothing is downloaded.
    """
    raw = root / info.folder
    names = [resource[0].rsplit("/", 1)[-1] for resource in info.torchvision_class.resources]
    for name in names:  # e.g. train-images-idx3-ubyte.gz
        target = raw / name[: -len(".gz")]
        if target.is_file():
            continue
        for folder in (raw, root, *map(Path, info.system_dirs)):
            source = folder / name
            if source.is_file():
                raw.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(f".{os.getpid()}.tmp")
                try:
                    with gzip.open(source, "rb") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except (OSError, EOFError, zlib.error) as exc:
                    tmp.unlink(missing_ok=True)
                    raise LTHError(f"{source} is not a readable gzip file ({exc}); replace it "
                                   f"with a good copy of {name}") from None
                os.replace(tmp, target)
                break


def check_data_dir(data_dir: str | Path) -> Path:
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise LTHError(f"data.data_dir {root.resolve()} is a file, not a folder")
    return root


def load_split(name: str, data_dir: str | Path, train: bool, download: bool,
               transform=None) -> Dataset:
    """One split through torchvision's dataset class; one clear error when files are missing."""
    info = dataset_info(name)
    root = check_data_dir(data_dir)
    if info.torchvision_class is datasets.ImageFolder:  # nothing to download
        folder = root / ("train" if train else "val")
        try:
            return datasets.ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, OSError) as error:
            raise LTHError(f"dataset {name!r} not readable under {folder.resolve()} ({error}); "
                           f"put {info.files} in {root.resolve()}") from None
    if info.torchvision_class in (datasets.MNIST, datasets.FashionMNIST):
        _stage_idx_files(info, root)
    # SVHN names its splits; the others take train=True/False
    split = ({"split": "train" if train else "test"} if info.torchvision_class is datasets.SVHN
             else {"train": train})
    try:
        return info.torchvision_class(str(root), **split, download=False, transform=transform)
    except RuntimeError:
        if not download:
            raise LTHError(f"dataset {name!r} not found under {root.resolve()}: put "
                           f"{info.files} in {root.resolve() / info.folder} (or set "
                           f"data.download=true)") from None
    try:
        return info.torchvision_class(str(root), **split, download=True, transform=transform)
    except Exception as exc:
        raise LTHError(f"dataset {name!r} not found under {root.resolve()} and the download "
                       f"failed ({type(exc).__name__}); put {info.files} in "
                       f"{root.resolve() / info.folder}") from None


def images_as_tensor(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N x C x H x W images, int64 labels) of a torchvision dataset or a Subset of one.

    Subsets may be nested; only the selected images are copied. torchvision holds MNIST as
    N x H x W, CIFAR as N x H x W x C, SVHN as N x C x H x W (labels in ``labels``).
    """
    indices = None
    while isinstance(dataset, Subset):
        outer = torch.as_tensor(dataset.indices, dtype=torch.long)
        indices = outer if indices is None else outer[indices]
        dataset = dataset.dataset
    svhn = isinstance(dataset, datasets.SVHN)
    images = torch.as_tensor(dataset.data)
    labels = torch.as_tensor(dataset.labels if svhn else dataset.targets, dtype=torch.long)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    if not svhn:
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), labels
