"""The DataModule: the dataset table, where files are found, and both loader paths.

Files are read through torchvision's own dataset classes. The training data then either
stays there (``loader: torchvision``: DataLoader + PIL transforms) or becomes one uint8
tensor on the training device that is augmented a whole batch at a time
(``loader: device``, the default: see ``DeviceLoader``).
"""

from __future__ import annotations

import gzip
import itertools
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
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
    """(uint8 N x C x H x W images, int64 labels) of a torchvision dataset or a Subset of one.

    Subsets may be nested; only the selected images are copied.
    """
    indices = None
    while isinstance(dataset, Subset):
        outer = torch.as_tensor(dataset.indices, dtype=torch.long)
        indices = outer if indices is None else outer[indices]
        dataset = dataset.dataset
    images = torch.as_tensor(dataset.data)
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), labels


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class _Resumable:
    """Lightning's ``_Stateful`` loader protocol, which its fit loop saves in every checkpoint
    and loads back when a fit resumes mid-epoch. The epoch's plan depends only on (seed,
    epoch), so the epoch and the batches already yielded in it are the whole position."""

    _epoch, _batches, _resume = 0, 0, None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def _begin(self, epoch: int) -> int:
        """Start ``epoch``; returns the batches to skip: those a loaded state of this same
        epoch had yielded (a state of another epoch is stale and dropped)."""
        resume, self._resume = self._resume, None
        self._epoch = epoch
        self._batches = resume[1] if resume is not None and resume[0] == epoch else 0
        return self._batches


class DeviceLoader(_Resumable):
    """The whole split as one uint8 tensor on the device, augmented a batch at a time.

    Random crop with zero padding + horizontal flip, batched without per-image Python work
    and with the same distribution as torchvision's RandomCrop(padding) +
    RandomHorizontalFlip(0.5): for augmented training the split is kept zero-padded, and
    once more mirrored (``_pad_and_mirror``), so every output row of every crop -- flipped
    or not -- is one contiguous run of W bytes of that store. A batch is then a single
    ``index_select`` of those runs from an overlapping-window view of it (``_crop``),
    followed by ToTensor + Normalize's affine map in place. Memory: (H+2p)(W+2p)/(HW) x 2
    times the split's uint8 size (3.1x for CIFAR: 480 MB for its 50,000 training images).

    Each epoch draws, from a generator seeded by (seed, epoch), a permutation of the split
    and one (dy, dx, flip) per position of it, so a resumed run sees the same order and
    augmentation. Under DDP every rank draws the same plan; with ``batch_size`` b per rank,
    rank r's batch k is positions r, r + N, ... of the plan's k-th global batch of N x b
    positions, so the N ranks' batch k together are exactly a 1-rank run's batch k of size
    N x b (the last ``len % N`` positions are dropped to keep the ranks equal). Evaluation
    is in order; under DDP rank r takes images r, r + N, ...: each image on one rank only.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 mean, std, train: bool, augment: bool, seed: int, device: torch.device,
                 epoch_fn=lambda: 0, rank: int = 0, world_size: int = 1, padding: int = 4):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise LTHError(f"DeviceLoader needs uint8 N x C x H x W images, got "
                           f"{images.dtype} of shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise LTHError(f"{len(images)} images but {len(labels)} labels")
        if not 0 <= rank < world_size:
            raise LTHError(f"rank {rank} outside world size {world_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.long)
        self.batch_size, self.train, self.augment = batch_size, train, augment and train
        self.seed, self.epoch_fn, self.padding = seed, epoch_fn, padding
        self.rank, self.world_size = rank, world_size
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, dtype=torch.float64).view(shape)
        std = torch.tensor(std, dtype=torch.float64).view(shape)
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift
        self.scale = (1 / (255 * std)).float().to(self.device)
        self.shift = (-mean / std).float().to(self.device)
        self._store = self._pad_and_mirror(self.images) if self.augment else None

    def __len__(self) -> int:
        count = len(self.labels)
        mine = count // self.world_size if self.train else len(range(self.rank, count,
                                                                       self.world_size))
        return -(-mine // self.batch_size)

    # -- augmentation ---------------------------------------------------------------------
    def _pad_and_mirror(self, images: torch.Tensor) -> torch.Tensor:
        """2N x C x (H+2p) x (W+2p): the zero-padded images, then the same mirrored."""
        count, channels, height, width = images.shape
        pad = self.padding
        store = images.new_zeros(2 * count, channels, height + 2 * pad, width + 2 * pad)
        store[:count, :, pad:pad + height, pad:pad + width] = images
        store[count:, :, pad:pad + height, pad:pad + width] = images.flip(-1)
        return store

    def _starts(self, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                flip: torch.Tensor, count: int, shape) -> torch.Tensor:
        """Per image: the flat position in the store of its crop's first byte.

        Mirroring after the crop at left offset dx is cropping the mirrored padded image at
        left offset 2p - dx."""
        channels, height, width = shape
        pad = self.padding
        flip = flip.long()
        image = index + count * flip
        left = dx + flip * (2 * pad - 2 * dx)
        return (image * (channels * (height + 2 * pad)) + dy) * (width + 2 * pad) + left

    def _crop(self, store: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """The H x W crops (rows of W bytes, one per channel and output row) at ``starts``."""
        _, channels, padded_h, padded_w = store.shape
        height, width = padded_h - 2 * self.padding, padded_w - 2 * self.padding
        windows = store.view(-1).unfold(0, width, 1)  # every run of W bytes, no copy
        rows = (torch.arange(channels, device=store.device)[:, None] * padded_h
                + torch.arange(height, device=store.device)) * padded_w  # (C, H)
        index = (starts[:, None] + rows.view(1, -1)).view(-1)
        return windows.index_select(0, index).view(len(starts), channels, height, width)

    def augment_batch(self, images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                      flip: torch.Tensor) -> torch.Tensor:
        """Crop each uint8 image of the zero-padded batch at (top dy, left dx), then mirror
        it where ``flip``: torchvision's pad(p) + crop(dy, dx, H, W) + hflip, batched.
        ``dy``, ``dx`` in [0, 2p] and ``flip`` (bool) are one entry per image. The loader
        runs the same ``_pad_and_mirror`` / ``_starts`` / ``_crop``, once for the split."""
        count = len(images)
        index = torch.arange(count, device=images.device)
        starts = self._starts(index, dy.to(images.device), dx.to(images.device),
                              flip.to(images.device), count, images.shape[1:])
        return self._crop(self._pad_and_mirror(images), starts)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32: ToTensor + Normalize, (x / 255 - mean) / std, as one affine map
        (equal to torchvision's to a few float32 ulps)."""
        return images.float().mul_(self.scale).add_(self.shift)

    # -- batches --------------------------------------------------------------------------
    def _plan(self, epoch: int):
        """This rank's (image indices, crop starts or None) for the epoch; None indices:
        every image, in order."""
        count = len(self.labels)
        if not self.train:
            return (None if self.world_size == 1 else
                    torch.arange(self.rank, count, self.world_size)), None
        mine = slice(self.rank, count // self.world_size * self.world_size, self.world_size)
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(count, generator=generator)
        if not self.augment:
            return order[mine], None
        side = 2 * self.padding + 1
        dy = torch.randint(0, side, (count,), generator=generator)
        dx = torch.randint(0, side, (count,), generator=generator)
        flip = torch.rand(count, generator=generator) < 0.5
        starts = self._starts(order, dy, dx, flip, count, self.images.shape[1:])
        return order[mine], starts[mine]

    def __iter__(self):
        epoch = self.epoch_fn()
        skip = self._begin(epoch)
        indices, starts = self._plan(epoch)
        labels = self.labels
        if indices is not None:
            indices = indices.to(self.device)
            labels = labels.index_select(0, indices)
        if starts is not None:
            starts = starts.to(self.device)
        for begin in range(skip * self.batch_size, len(labels), self.batch_size):
            batch = slice(begin, begin + self.batch_size)
            if starts is not None:
                images = self._crop(self._store, starts[batch])
            elif indices is not None:
                images = self.images.index_select(0, indices[batch])
            else:
                images = self.images[batch]
            self._batches += 1
            yield self.normalize(images), labels[batch]


class _SeededItems(Dataset):
    """A training split whose random transforms draw, for each image, from that image's own
    seed for (seed, epoch): the same draws whatever worker, rank, batch or resume point
    loads it. The global CPU generator is restored after each image."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        self.item_seeds = torch.randint(2**62, (len(self.dataset),), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        rng = torch.default_generator
        state = rng.get_state()
        rng.manual_seed(self.item_seeds[index])
        try:
            return self.dataset[index]
        finally:
            rng.set_state(state)


class _SkippingSampler(DistributedSampler):
    """A DistributedSampler (so Lightning keeps it rather than injecting its own) that can
    start ``skip`` positions into its epoch."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


class _ShardSampler(DistributedSampler):
    """Rank r's images r, r + N, ... of an evaluation split, each image on exactly one rank
    (DistributedSampler itself pads the shards to equal length with repeats)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _EpochDataLoader(_Resumable, DataLoader):
    """The torchvision training loader: each epoch depends only on (seed, epoch), not on the
    epochs this process iterated before. At each iterator it reads the epoch from
    ``epoch_fn`` (the Trainer's: its own ``set_epoch`` call comes after the first iterator
    of a fit) and seeds the sampler's order, the per-image draws and the workers' base
    seeds from it; workers are not persistent, so they start from those seeds."""

    def __init__(self, dataset: _SeededItems, batch_size: int, sampler: _SkippingSampler,
                 num_workers: int, epoch_fn):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler,
                         num_workers=num_workers, generator=torch.Generator())
        self.epoch_fn = epoch_fn

    def __iter__(self):
        epoch = self.epoch_fn()
        self.sampler.skip = self._begin(epoch) * self.batch_size
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        self.generator.manual_seed(_epoch_seed(self.dataset.seed, epoch))
        for batch in super().__iter__():
            self._batches += 1
            yield batch


class LTHDataModule(L.LightningDataModule):
    """CIFAR-10/100, Fashion-MNIST and MNIST with the paper's augmentation; ImageNet (an
    ImageFolder, ``loader: torchvision`` only) with RandomResizedCrop + flip, Resize + CenterCrop.

    Validation uses the test split by default (the paper reports test accuracy);
    ``val_split`` > 0 holds out that many training images (or that fraction) instead.
    ``ddp_batch``: under N ranks, ``global`` splits ``batch_size`` over the ranks (the
    global batch, and with it the experiment, stays that of one device); ``per_rank`` gives
    each rank ``batch_size`` (global batch N x batch_size). ``order_seed``, set by the
    caller before a fit, seeds the training order and augmentation over ``seed``.
    """

    def __init__(self, dataset: str = "cifar10", data_dir: str = "data", batch_size: int = 128,
                 eval_batch_size: int = 1024, loader: str = "device", num_workers: int = 2,
                 normalization: str = "authors", augment: bool = True,
                 val_split: float = 0, download: bool = True, seed: int | None = None,
                 ddp_batch: str = "global"):
        super().__init__()
        self.info = dataset_info(dataset)
        if loader not in LOADERS:
            raise LTHError(f"unknown data.loader {loader!r}; valid: {', '.join(LOADERS)}")
        if normalization not in NORMALIZATIONS:
            raise LTHError(f"unknown data.normalization {normalization!r}; valid: "
                           f"{', '.join(NORMALIZATIONS)}")
        if batch_size < 1 or eval_batch_size < 1:
            raise LTHError(f"batch sizes must be >= 1, got {batch_size}, {eval_batch_size}")
        if ddp_batch not in DDP_BATCHES:
            raise LTHError(f"unknown data.ddp_batch {ddp_batch!r}; valid: "
                           f"{', '.join(DDP_BATCHES)}")
        if num_workers < 0:
            raise LTHError(f"data.num_workers must be >= 0 (0: load in the main process), got "
                           f"{num_workers}")
        if not val_split >= 0:
            raise LTHError(f"data.val_split must be >= 0 (a count or a fraction), got {val_split}")
        if loader == "device" and self.info.torchvision_class is datasets.ImageFolder:
            raise LTHError(f"data.loader=device is not allowed for {dataset!r}: it holds a "
                           f"whole split in device memory; use data.loader=torchvision")
        check_data_dir(data_dir)  # here, before a Trainer makes any log folder
        self.dataset, self.data_dir, self.download = dataset, data_dir, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.loader, self.num_workers, self.val_split = loader, num_workers, val_split
        self.augment = augment and self.info.augment
        self.mean, self.std = (self.info.authors_stats if normalization == "authors"
                               else self.info.stats)
        self._seed, self.ddp_batch = seed, ddp_batch
        self.order_seed: int | None = None
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
        """The training order and augmentation seed: ``order_seed``, else the configured
        one, else the run's global seed."""
        for seed in (self.order_seed, self._seed):
            if seed is not None:
                return seed
        return torch.initial_seed() % 2**31

    def _transform(self, train: bool):
        steps = []
        if self.info.torchvision_class is datasets.ImageFolder:  # the standard ImageNet recipe
            size = self.info.image_size
            steps += ([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
                      if train and self.augment else
                      [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)])
        elif train and self.augment:
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

    def _train_batch_size(self, world_size: int) -> int:
        if self.ddp_batch == "per_rank":
            return self.batch_size
        if self.batch_size % world_size:
            raise LTHError(f"data.batch_size={self.batch_size} does not split over {world_size} "
                           f"ranks (data.ddp_batch=global keeps it the global batch); use a "
                           f"multiple of {world_size} or data.ddp_batch=per_rank")
        return self.batch_size // world_size

    def build_loader(self, split: str, rank: int = 0, world_size: int = 1,
                     device: torch.device | str = "cpu", epoch_fn=lambda: 0):
        """The ``split`` loader of rank ``rank`` out of ``world_size``; ``epoch_fn`` gives the
        epoch at each iterator. The ``*_dataloader`` hooks pass the Trainer's values."""
        train = split == "train"
        dataset = self.splits[split]
        if len(dataset) < world_size:
            raise LTHError(f"the {split} split has {len(dataset)} images, fewer than the "
                           f"{world_size} ranks")
        batch_size = self._train_batch_size(world_size) if train else self.eval_batch_size
        if self.loader == "torchvision":
            if not train:
                return DataLoader(dataset, batch_size,
                                  sampler=_ShardSampler(dataset, rank, world_size),
                                  num_workers=self.num_workers,
                                  persistent_workers=self.num_workers > 0)
            items = _SeededItems(dataset, self.seed)
            sampler = _SkippingSampler(items, world_size, rank, shuffle=True, seed=self.seed,
                                       drop_last=True)
            return _EpochDataLoader(items, batch_size, sampler, self.num_workers, epoch_fn)
        images, labels = images_as_tensor(dataset)
        return DeviceLoader(images, labels, batch_size, self.mean, self.std, train=train,
                            augment=self.augment, seed=self.seed, device=torch.device(device),
                            epoch_fn=epoch_fn, rank=rank, world_size=world_size)

    def _dataloader(self, split: str):
        trainer = self.trainer
        if trainer is None:
            return self.build_loader(split)
        return self.build_loader(split, trainer.global_rank, trainer.world_size,
                                 trainer.strategy.root_device, lambda: trainer.current_epoch)

    def _plain_batches(self, dataset: Dataset, device):
        """``dataset`` in order, unaugmented: one tensor on ``device``, or for image folders
        a DataLoader reading the files (too big for device memory; callers move each batch)."""
        if self.info.torchvision_class is datasets.ImageFolder:
            return DataLoader(dataset, self.eval_batch_size, num_workers=self.num_workers)
        images, labels = images_as_tensor(dataset)
        return DeviceLoader(images, labels, self.eval_batch_size, self.mean, self.std,
                            train=False, augment=False, seed=0, device=torch.device(device))

    def unaugmented_train_batches(self, device: torch.device | str = "cpu"):
        """Training images in a fixed order without augmentation: for matching and BN resets."""
        self.setup()
        train = self.splits["train"]
        if self.info.torchvision_class is datasets.ImageFolder:  # the eval transform instead
            plain = load_split(self.dataset, self.data_dir, True, False, self._transform(False))
            train = Subset(plain, train.indices) if isinstance(train, Subset) else plain
        return self._plain_batches(train, device)

    def test_batches(self, device: torch.device | str = "cpu"):
        """The test split as plain batches, for evaluations outside a Trainer."""
        self.setup()
        return self._plain_batches(self.splits["test"], device)

    def train_dataloader(self):
        return self._dataloader("train")

    def val_dataloader(self):
        return self._dataloader("val")

    def test_dataloader(self):
        return self._dataloader("test")
