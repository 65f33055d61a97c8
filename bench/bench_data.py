"""Augmented training images per second: DeviceLoader vs torchvision DataLoader + PIL.

Both pipelines produce the same thing -- RandomCrop(32, padding=4) + RandomHorizontalFlip +
ToTensor + Normalize of batches of 128, on the device -- from the same synthetic
CIFAR-shaped uint8 images. The torchvision side is a real ``torchvision.datasets.CIFAR10``
(its own ``__getitem__`` and PIL transform path, only the file reading skipped) behind a
DataLoader with one worker per CPU core; its batches are copied to the device as training
would. Both are measured in the same run, rounds interleaved (``common.interleaved``), best
of ``--rounds``; the ratio is DeviceLoader / torchvision (goal: >= 10 on CPU). The numbers
and their provenance go to ``bench/results/data_<time>.json``.

    python bench/bench_data.py [--device cuda] [--images 50000] [--batches 200]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from common import interleaved, spread, timed, write_result
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.datasets.vision import VisionDataset

from lightning_lth.data import DATASETS, DeviceLoader, images_as_tensor

MEAN, STD = DATASETS["cifar10"].authors_stats
SETUP_SECONDS: list[float] = []  # DeviceLoader construction, once per fit: not in the rates


class SyntheticCIFAR10(datasets.CIFAR10):
    """CIFAR10 whose ``data`` (N x 32 x 32 x 3 uint8) and ``targets`` are given, not read."""

    def __init__(self, data: np.ndarray, targets: list[int], transform=None):
        VisionDataset.__init__(self, root="", transform=transform)
        self.train, self.data, self.targets = True, data, targets


def synthetic_cifar(count: int, seed: int = 0) -> SyntheticCIFAR10:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    targets = rng.integers(0, 10, size=count).tolist()
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    return SyntheticCIFAR10(data, targets, transform)


def time_batches(batches, count: int, device: torch.device) -> float:
    """Images per second over the first ``count`` batches of an iterator."""

    def take() -> int:
        images = 0
        for index, (x, y) in enumerate(batches):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            images += len(x)
            if index + 1 == count:
                break
        return images

    seconds, images = timed(take, device)
    return images / seconds


def bench_device(dataset, device, batch_size: int, count: int) -> float:
    epoch = [0]

    def build() -> DeviceLoader:
        images, labels = images_as_tensor(dataset)
        return DeviceLoader(images, labels, batch_size, MEAN, STD, train=True, augment=True,
                            seed=0, device=device, epoch_fn=lambda: epoch[0])

    seconds, loader = timed(build, device)
    SETUP_SECONDS.append(seconds)
    time_batches(loader, 5, device)  # warm-up: tables, allocator, first touch of the data
    best = 0.0
    for _ in range(2):
        epoch[0] += 1
        best = max(best, time_batches(loader, min(count, len(loader)), device))
    return best


def bench_torchvision(dataset, device, batch_size: int, count: int, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    batches = iter(loader)
    for _ in range(max(2 * workers, 2)):  # warm-up: workers started and busy
        next(batches)
    return time_batches(batches, min(count, len(loader) - max(2 * workers, 2)), device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batches", type=int, default=200, help="timed batches per pipeline")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="torchvision DataLoader workers (default: CPU cores)")
    parser.add_argument("--rounds", type=int, default=2, help="best of this many per side")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads of this process (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset = synthetic_cifar(args.images)
    print(f"device {device}, {args.images} images 32x32x3, batch {args.batch_size}, "
          f"{args.batches} timed batches, torchvision workers {args.workers}, "
          f"torch threads {torch.get_num_threads()}")
    rates = interleaved(
        {"DeviceLoader": lambda: bench_device(dataset, device, args.batch_size, args.batches),
         "torchvision": lambda: bench_torchvision(dataset, device, args.batch_size,
                                                  args.batches, args.workers)}, args.rounds)
    ours, theirs = max(rates["DeviceLoader"]), max(rates["torchvision"])
    ratio = ours / theirs
    print(f"DeviceLoader            {ours:12,.0f} img/s   (+ {min(SETUP_SECONDS):.2f} s once, "
          f"to copy, pad and mirror the split on the device)")
    print(f"torchvision DataLoader  {theirs:12,.0f} img/s")
    print(f"ratio {ratio:.1f}x (goal >= 10 on CPU): {'met' if ratio >= 10 else 'NOT met'}")
    write_result("data", {
        "images": args.images, "batch_size": args.batch_size, "timed_batches": args.batches,
        "workers": args.workers, "rounds": args.rounds,
        "device_loader_img_per_s": spread(rates["DeviceLoader"]),
        "torchvision_img_per_s": spread(rates["torchvision"]),
        "device_loader_setup_s": min(SETUP_SECONDS),
        "ratio_best_device_loader_over_best_torchvision": ratio, "goal": ">= 10 on CPU"},
        device=device)

if __name__ == "__main__":
    main()
