"""The training loaders, both resumable mid-epoch: ``DeviceLoader`` (the split as one uint8
tensor on the training device, augmented a whole batch at a time; ``loader: device``, the
default) and the torchvision path's seeded DataLoader (``loader: torchvision``)."""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_lth.errors import LTHError


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

    Random crop with zero padding + horizontal flip (``flip=False``: the crop only, as for
    SVHN), batched without per-image Python work and with the same distribution as
    torchvision's RandomCrop(padding) + RandomHorizontalFlip(0.5): for augmented training the
    split is kept zero-padded, and (when flipping) once more mirrored (``_pad_and_mirror``),
    so every output row of every crop -- flipped or not -- is one contiguous run of W bytes
    of that store. A batch is then a single ``index_select`` of those runs from an
    overlapping-window view of it (``_crop``), followed by ToTensor + Normalize's affine map
    in place. Memory: (H+2p)(W+2p)/(HW) x 2 times the split's uint8 size (3.1x for CIFAR:
    480 MB for its 50,000 training images; without the flip, half).

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
                 epoch_fn=lambda: 0, rank: int = 0, world_size: int = 1, padding: int = 4,
                 flip: bool = True):
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
        self.seed, self.epoch_fn, self.padding, self.flip = seed, epoch_fn, padding, flip
        self.rank, self.world_size = rank, world_size
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, dtype=torch.float64).view(shape)
        std = torch.tensor(std, dtype=torch.float64).view(shape)
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift
        self.scale = (1 / (255 * std)).float().to(self.device)
        self.shift = (-mean / std).float().to(self.device)
        self._store = (self._pad_and_mirror(self.images, mirror=flip) if self.augment
                       else None)

    def __len__(self) -> int:
        count = len(self.labels)
        mine = count // self.world_size if self.train else len(range(self.rank, count,
                                                                       self.world_size))
        return -(-mine // self.batch_size)

    # -- augmentation ---------------------------------------------------------------------
    def _pad_and_mirror(self, images: torch.Tensor, mirror: bool = True) -> torch.Tensor:
        """2N x C x (H+2p) x (W+2p): the zero-padded images, then the same mirrored (without
        ``mirror``, for crops that are never flipped: the N padded images only)."""
        count, channels, height, width = images.shape
        pad = self.padding
        store = images.new_zeros((2 if mirror else 1) * count, channels, height + 2 * pad,
                                 width + 2 * pad)
        store[:count, :, pad:pad + height, pad:pad + width] = images
        if mirror:
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
        flip = (torch.rand(count, generator=generator) < 0.5 if self.flip
                else torch.zeros(count, dtype=torch.bool))
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
