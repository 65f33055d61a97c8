"""The DataModule: the paper's splits and augmentation over either loader path.

Files are read through torchvision's own dataset classes (``data/datasets.py``). The
training data then either stays there (``loader: torchvision``: DataLoader + PIL
transforms) or becomes one uint8 tensor on the training device that is augmented a whole
batch at a time (``loader: device``, the default: ``data/device_loader.py``).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from lightning_lth.data.datasets import (
    DDP_BATCHES,
    LOADERS,
    NORMALIZATIONS,
    check_data_dir,
    dataset_info,
    images_as_tensor,
    load_split,
)
from lightning_lth.data.device_loader import (
    DeviceLoader,
    _EpochDataLoader,
    _SeededItems,
    _ShardSampler,
    _SkippingSampler,
)
from lightning_lth.errors import LTHError


class LTHDataModule(L.LightningDataModule):
    """CIFAR-10/100, SVHN, Fashion-MNIST and MNIST with the paper's augmentation (SVHN's as the
    authors' code: crop, no flip); ImageNet (an
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
            steps += [transforms.RandomCrop(self.info.image_size, padding=4)]
            steps += [transforms.RandomHorizontalFlip()] if self.info.flip else []
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
                            epoch_fn=epoch_fn, rank=rank, world_size=world_size,
                            flip=self.info.flip)

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
