"""The DataModule: the dataset table, where files are found, and both loader paths.

Files are read through torchvision's own dataset classes. The training data then either
stays there (``loader: torchvision``: DataLoader + PIL transforms) or becomes one uint8
tensor on the training device that is augmented a whole batch at a time
(``loader: device``, the default: see ``DeviceLoader``).
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from lightning_lth.errors import LTHError

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class DatasetInfo:
    torchvision_class: type
    num_classes: int
    in_channels: int
    image_size: int
    stats: tuple  # (mean, std) of the dataset itself
    authors_stats: tuple  # what the authors' code normalises with
    augment: bool  # RandomCrop(pad 4) + horizontal flip on the train split
    folder: str  # where torchvision looks below data_dir
    files: str  # what a user must put there
    system_dirs: tuple[str, ...] = ()


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
    "mnist": DatasetInfo(
        datasets.MNIST, 10, 1, 28, ((0.1307,), (0.3081,)), ((0.1307,), (0.3081,)), False,
        "MNIST/raw",
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (or the same with .gz)",
        ("/usr/share/datasets/mnist",)),
}
NORMALIZATIONS = ("authors", "dataset")
LOADERS = ("device", "torchvision")


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
                with gzip.open(source, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, target)
                break


def load_split(name: str, data_dir: str | Path, train: bool, download: bool,
               transform=None) -> Dataset:
    """One split through torchvision's dataset class; one clear error when files are missing."""
    info = dataset_info(name)
    root = Path(data_dir)
    if info.torchvision_class in (datasets.MNIST, datasets.FashionMNIST):
        _stage_idx_files(info, root)
    try:
        return info.torchvision_class(str(root), train=train, download=False, transform=transform)
    except RuntimeError:
        if not download:
            raise LTHError(f"dataset {name!r} not found under {root.resolve()}: put "
                           f"{info.files} in {root.resolve() / info.folder} (or set "
                           f"data.download=true)") from None
    try:
        return info.torchvision_class(str(root), train=train, download=True, transform=transform)
    except Exception as exc:
        raise LTHError(f"dataset {name!r} not found under {root.resolve()} and the download "
                       f"failed ({type(exc).__name__}); put {info.files} in "
                       f"{root.resolve() / info.folder}") from None


def images_as_tensor(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N x C x H x W images, int64 labels) of a torchvision dataset or a Subset of one."""
    indices = None
    if isinstance(dataset, Subset):
        dataset, indices = dataset.dataset, torch.as_tensor(dataset.indices)
    images = torch.as_tensor(dataset.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return images.contiguous(), labels


class DeviceLoader:
    """The whole split as one uint8 tensor on the device, augmented a batch at a time.

    Random crop with zero padding is a batched gather of shifted windows and the flip a
    batched ``where``: the same distribution as torchvision's RandomCrop(padding) +
    RandomHorizontalFlip(0.5), without per-image Python work. Each epoch draws a fresh
    permutation from a generator seeded by (seed, epoch), so a resumed run sees the same
    order; under DDP each rank takes a distinct, equally long slice of it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 mean, std, train: bool, augment: bool, seed: int, device: torch.device,
                 epoch_fn=lambda: 0, rank: int = 0, world_size: int = 1, padding: int = 4):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.train, self.augment = batch_size, train, augment and train
        self.seed, self.epoch_fn, self.padding = seed, epoch_fn, padding
        self.rank, self.world_size = rank, world_size
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=device).view(shape) * 255
        self.std = torch.tensor(std, device=device).view(shape) * 255

    def _indices(self, generator: torch.Generator) -> torch.Tensor:
        count = len(self.labels)
        if not self.train:
            order = torch.arange(count)
        else:
            order = torch.randperm(count, generator=generator)
        per_rank = count // self.world_size if self.world_size > 1 else count
        return order[self.rank::self.world_size][:per_rank]

    def __len__(self) -> int:
        count = len(self.labels) // self.world_size if self.world_size > 1 else len(self.labels)
        return -(-count // self.batch_size)

    def augment_batch(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop (zero padding) + horizontal flip of a uint8 batch, drawn from the generator."""
        batch, _, height, width = images.shape
        pad = self.padding
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(images.device)
        flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
        rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
        cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
        batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
        channel_index = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        return padded[batch_index, channel_index, rows, cols]

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_fn())
        indices = self._indices(generator).to(self.images.device)
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start:start + self.batch_size]
            images = self.images[chunk]
            if self.augment:
                images = self.augment_batch(images, generator)
            yield (images.float() - self.mean) / self.std, self.labels[chunk]


class LTHDataModule(L.LightningDataModule):
    """CIFAR-10/100, Fashion-MNIST and MNIST with the paper's augmentation.

    Validation uses the test split by default (the paper reports test accuracy);
    ``val_split`` > 0 holds out that many training images (or that fraction) instead.
    """

    def __init__(self, dataset: str = "cifar10", data_dir: str = "data", batch_size: int = 128,
                 eval_batch_size: int = 1024, loader: str = "device", num_workers: int = 2,
                 normalization: str = "authors", augment: bool = True,
                 val_split: float = 0, download: bool = True, seed: int | None = None):
        super().__init__()
        self.info = dataset_info(dataset)
        if loader not in LOADERS:
            raise LTHError(f"unknown data.loader {loader!r}; valid: {', '.join(LOADERS)}")
        if normalization not in NORMALIZATIONS:
            raise LTHError(f"unknown data.normalization {normalization!r}; valid: "
                           f"{', '.join(NORMALIZATIONS)}")
        if batch_size < 1 or eval_batch_size < 1:
            raise LTHError(f"batch sizes must be >= 1, got {batch_size}, {eval_batch_size}")
        if val_split < 0:
            raise LTHError(f"data.val_split must be >= 0 (a count or a fraction), got {val_split}")
        self.dataset, self.data_dir, self.download = dataset, data_dir, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.loader, self.num_workers, self.val_split = loader, num_workers, val_split
        self.augment = augment and self.info.augment
        self.mean, self.std = (self.info.authors_stats if normalization == "authors"
                               else self.info.stats)
        self._seed = seed
        self.splits: dict[str, Dataset] = {}

    # Shapes the model needs, linked into the model's config by the CLI.
    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_channels(self) -> int:
        return self.info.in_channels

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def seed(self) -> int:
        """The data-order seed: the configured one, else the run's global seed."""
        return self._seed if self._seed is not None else torch.initial_seed() % 2**31

    def _transform(self, train: bool):
        steps = []
        if train and self.augment:
            steps += [transforms.RandomCrop(self.info.image_size, padding=4),
                      transforms.RandomHorizontalFlip()]
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train = load_split(self.dataset, self.data_dir, True, self.download, self._transform(True))
        test = load_split(self.dataset, self.data_dir, False, self.download, self._transform(False))
        self.splits = {"train": train, "val": test, "test": test}
        if self.val_split:
            count = len(train)
            held = int(self.val_split if self.val_split >= 1 else round(self.val_split * count))
            if not 0 < held < count:
                raise LTHError(f"data.val_split={self.val_split} leaves no training or no "
                               f"validation images out of {count}")
            order = torch.randperm(count, generator=torch.Generator().manual_seed(0)).tolist()
            plain = load_split(self.dataset, self.data_dir, True, False, self._transform(False))
            self.splits["train"] = Subset(train, order[held:])
            self.splits["val"] = Subset(plain, order[:held])

    def _dataloader(self, split: str):
        train = split == "train"
        dataset = self.splits[split]
        if self.loader == "torchvision":
            generator = torch.Generator().manual_seed(self.seed) if train else None
            return DataLoader(dataset, batch_size=self.batch_size if train else
                              self.eval_batch_size, shuffle=train, generator=generator,
                              num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)
        trainer = self.trainer
        images, labels = images_as_tensor(dataset)
        return DeviceLoader(
            images, labels, self.batch_size if train else self.eval_batch_size, self.mean,
            self.std, train=train, augment=self.augment, seed=self.seed,
            device=trainer.strategy.root_device if trainer else torch.device("cpu"),
            epoch_fn=(lambda: trainer.current_epoch) if trainer else (lambda: 0),
            rank=trainer.global_rank if train and trainer else 0,
            world_size=trainer.world_size if train and trainer else 1)

    def train_dataloader(self):
        return self._dataloader("train")

    def val_dataloader(self):
        return self._dataloader("val")

    def test_dataloader(self):
        return self._dataloader("test")
