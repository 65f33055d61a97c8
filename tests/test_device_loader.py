"""DeviceLoader: order, DDP sharding, resuming, augmentation statistics, equality with
torchvision.

Small random uint8 tensors built here, no files. Labels are the image indices, so every
batch says which images it holds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_interleaves
from helpers import DEVICES
from PIL import Image
from torch.utils.data import Subset
from torchvision import transforms
from torchvision.transforms import functional as TF

from lightning_lth.data import DeviceLoader, images_as_tensor
from lightning_lth.errors import LTHError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# normalize() is (x/255 - mean)/std as one multiply-add; torchvision computes it in three
# steps. Values are within +-3, where a float32 ulp is 2.4e-7: allow a few ulps.
NORM_ATOL = 1e-6


def random_images(count, channels=3, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8,
                         generator=generator)


def make_loader(images, batch_size=64, train=True, augment=True, seed=0, epoch=0, rank=0,
                world_size=1, mean=None, std=None, device="cpu"):
    channels = images.shape[1]
    return DeviceLoader(images, torch.arange(len(images)), batch_size,
                        mean or MEAN[:channels], std or STD[:channels], train=train,
                        augment=augment, seed=seed, device=torch.device(device),
                        epoch_fn=lambda: epoch, rank=rank, world_size=world_size)


def indices_seen(loader):
    return torch.cat([labels.cpu() for _, labels in loader])


def torchvision_reference(image, dy, dx, flip, mean, std):
    """torchvision's own path on a PIL image: pad(4) + crop + hflip, then ToTensor + Normalize."""
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    size = image.shape[-1]
    pil = TF.crop(TF.pad(pil, 4), dy, dx, size, size)
    if flip:
        pil = TF.hflip(pil)
    crop = torch.as_tensor(np.array(pil)).reshape(size, size, -1).permute(2, 0, 1)
    normalized = transforms.Normalize(mean, std)(transforms.ToTensor()(pil))
    return crop, normalized


# -- order and sharding ----------------------------------------------------------------------
@pytest.mark.parametrize("augment", [True, False])
def test_every_training_image_once_per_epoch(augment):
    images = random_images(1000, size=8)
    loader = make_loader(images, batch_size=64, augment=augment)
    batches = list(loader)
    assert len(batches) == len(loader) == 16  # 15 full batches + one of 40
    assert [len(y) for _, y in batches] == [64] * 15 + [40]
    seen = indices_seen(loader)
    assert torch.equal(seen.sort().values, torch.arange(1000))
    assert not torch.equal(seen, torch.arange(1000))  # shuffled
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (len(y), 3, 8, 8)
        assert y.dtype == torch.long


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards_are_disjoint_equal_and_cover(world_size):
    count = 1001
    images = random_images(count, size=8)
    shards = []
    for rank in range(world_size):
        loader = make_loader(images, batch_size=50, epoch=3, rank=rank, world_size=world_size)
        seen = indices_seen(loader)
        assert len(seen) == count // world_size
        assert len(loader) == -(-(count // world_size) // 50)
        shards.append(seen)
    union = torch.cat(shards)
    assert len(set(union.tolist())) == len(union)  # disjoint, and no repeats within a rank
    assert len(union) >= count - (world_size - 1)
    assert set(union.tolist()) <= set(range(count))


@pytest.mark.quick
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("augment", [True, False])
def test_ddp_ranks_together_make_the_one_rank_batches(world_size, augment):
    """Rank r's batch k is positions r, r + N, ... of a 1-rank run's batch k of N x the
    per-rank size, crops and flips included; the last batch loses its len % N tail."""
    images = random_images(205, size=8)
    whole = list(make_loader(images, batch_size=16 * world_size, augment=augment, epoch=2))
    ranks = [list(make_loader(images, batch_size=16, augment=augment, epoch=2, rank=rank,
                              world_size=world_size)) for rank in range(world_size)]
    assert_interleaves(whole, ranks)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_eval_shards_hold_every_image_once(world_size):
    images = random_images(101, size=8)
    whole = torch.cat([x for x, _ in make_loader(images, batch_size=16, train=False)])
    seen = []
    for rank in range(world_size):
        loader = make_loader(images, batch_size=16, train=False, rank=rank,
                             world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        labels = torch.cat([y for _, y in batches])
        assert torch.equal(labels, torch.arange(rank, 101, world_size))
        assert torch.equal(torch.cat([x for x, _ in batches]), whole[labels])
        seen.append(labels)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(101))


@pytest.mark.parametrize("world_size", [1, 2])
def test_state_dict_resumes_at_the_next_batch(world_size):
    images = random_images(300, size=8)

    def loader(epoch):
        return make_loader(images, batch_size=32, epoch=epoch, rank=world_size - 1,
                           world_size=world_size)

    first = loader(epoch=3)
    assert first.state_dict() == {"epoch": 0, "batches": 0}
    batches = iter(first)
    for _ in range(3):
        next(batches)
    state = first.state_dict()
    assert state == {"epoch": 3, "batches": 3}
    resumed = loader(epoch=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(first) - 3
    for (xa, ya), (xb, yb) in zip(batches, rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert resumed.state_dict() == {"epoch": 3, "batches": len(first)}
    assert len(list(resumed)) == len(first)  # the loaded state is used once
    other = loader(epoch=4)  # a state of another epoch is stale: the epoch starts over
    other.load_state_dict(state)
    assert len(list(other)) == len(first)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_ranks_draw_different_augmentations(world_size):
    # All images equal: any two ranks' batches differ only through their crop/flip draws.
    images = random_images(1, size=8).repeat(300, 1, 1, 1)
    outputs = [torch.cat([x for x, _ in make_loader(images, rank=rank, world_size=world_size)])
               for rank in range(world_size)]
    for other in outputs[1:]:
        assert not torch.equal(outputs[0], other)


def test_epoch_and_seed_change_the_order_and_are_reproducible():
    images = random_images(500, size=8)

    def run(seed, epoch):
        return list(make_loader(images, seed=seed, epoch=epoch))

    first, again = run(seed=7, epoch=2), run(seed=7, epoch=2)
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    order = torch.cat([y for _, y in first])
    assert not torch.equal(order, torch.cat([y for _, y in run(seed=7, epoch=3)]))
    assert not torch.equal(order, torch.cat([y for _, y in run(seed=8, epoch=2)]))


def test_epoch_fn_is_read_at_each_iteration():
    images = random_images(200, size=8)
    epoch = [0]
    loader = DeviceLoader(images, torch.arange(200), 64, MEAN, STD, train=True, augment=True,
                          seed=0, device=torch.device("cpu"), epoch_fn=lambda: epoch[0])
    first = indices_seen(loader)
    epoch[0] = 1
    assert not torch.equal(first, indices_seen(loader))
    epoch[0] = 0
    assert torch.equal(first, indices_seen(loader))


# -- augmentation --------------------------------------------------------------------------
def test_crop_offsets_uniform_and_flip_rate_half():
    """A marker pair (200 then 100, left to right) planted at the centre of every image
    says where each crop was taken (its position) and whether it was mirrored (its order)."""
    count, size, row, col = 4500, 16, 8, 7
    images = torch.zeros(count, 1, size, size, dtype=torch.uint8)
    images[:, 0, row, col], images[:, 0, row, col + 1] = 200, 100
    loader = make_loader(images, batch_size=512, mean=(0.0,), std=(1.0,))
    outputs = torch.cat([x for x, _ in loader])
    pixels = (outputs[:, 0] * 255).round().long()
    flat = pixels.flatten(1)
    first = (flat == 200).float().argmax(1)
    second = (flat == 100).float().argmax(1)
    assert ((flat == 200).sum(1) == 1).all() and ((flat == 100).sum(1) == 1).all()
    assert ((flat > 0).sum(1) == 2).all()  # nothing else moved in
    out_row, out_col = first // size, first % size
    flip = (second % size) < out_col
    dy = row + 4 - out_row  # the marker sits at row + 4 - dy in the crop
    dx = torch.where(flip, col + 4 - (size - 1 - out_col), col + 4 - out_col)
    assert torch.equal(second // size, out_row)
    assert torch.equal((second % size - out_col).abs(), torch.ones_like(out_col))

    def chi_square(values, bins):
        observed = torch.bincount(values, minlength=bins).double()
        assert len(observed) == bins
        expected = len(values) / bins
        return ((observed - expected) ** 2 / expected).sum().item()

    # 99.99% quantiles: chi2(8) 31.8, chi2(80) 137 (the seed is fixed: not flaky either way)
    assert chi_square(dy, 9) < 31.8
    assert chi_square(dx, 9) < 31.8
    assert chi_square(dy * 9 + dx, 81) < 137
    # flip ~ Bernoulli(0.5): sd of the rate 0.0075 over 4500 images; allow 4 sd
    assert abs(flip.float().mean().item() - 0.5) < 0.03
    for offset in range(9):  # flip independent of the offset
        assert abs(flip[dx == offset].float().mean().item() - 0.5) < 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28)])
def test_augment_batch_equals_torchvision(channels, size, device):
    """Every (dy, dx, flip) case once: pad(4) + crop + hflip + ToTensor + Normalize."""
    cases = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)]
    images = random_images(len(cases), channels, size, seed=1)
    dy, dx, flip = (torch.tensor(column) for column in zip(*cases, strict=True))
    loader = make_loader(images, device=device)
    crops = loader.augment_batch(images.to(device), dy, dx, flip)
    normalized = loader.normalize(crops).cpu()
    crops = crops.cpu()
    for index, (top, left, mirror) in enumerate(cases):
        crop, expected = torchvision_reference(images[index], top, left, mirror,
                                               MEAN[:channels], STD[:channels])
        assert torch.equal(crops[index], crop), (top, left, mirror)
        torch.testing.assert_close(normalized[index], expected, rtol=0, atol=NORM_ATOL)


def test_training_batches_are_augment_batch_crops():
    """The loader's batches (its whole-split store) are crops of augment_batch's."""
    images = random_images(60, size=12, seed=2)
    loader = make_loader(images, batch_size=16, epoch=5)
    cases = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)]
    dy, dx, flip = (torch.tensor(column) for column in zip(*cases, strict=True))
    every = loader.normalize(loader.augment_batch(  # image i's crops: rows i*162 ...
        images.repeat_interleave(len(cases), 0), dy.repeat(60), dx.repeat(60), flip.repeat(60)))
    every = every.view(60, len(cases), -1)
    seen = 0
    for x, labels in loader:
        for image, label in zip(x, labels, strict=True):
            assert (every[label] == image.flatten()).all(1).any(), int(label)
            seen += 1
    assert seen == 60


# -- evaluation ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_eval_loader_in_order_unaugmented_and_normalized(device):
    images = random_images(150, seed=3)
    loader = make_loader(images, batch_size=64, train=False, augment=True, epoch=4,
                         device=device)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert torch.equal(torch.cat([y for _, y in batches]).cpu(), torch.arange(150))
    outputs = torch.cat([x for x, _ in batches]).cpu()
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    for index in range(0, 150, 7):
        pil = Image.fromarray(images[index].permute(1, 2, 0).numpy())
        torch.testing.assert_close(outputs[index], normalize(pil), rtol=0, atol=NORM_ATOL)
    again = torch.cat([x for x, _ in make_loader(images, train=False, epoch=9, device=device)])
    assert torch.equal(outputs, again.cpu())


def test_training_without_augmentation_is_shuffled_but_unchanged():
    images = random_images(100, size=8)
    loader = make_loader(images, augment=False, mean=(0.0,) * 3, std=(1.0,) * 3)
    for x, labels in loader:
        assert torch.equal((x * 255).round().to(torch.uint8), images[labels])


# -- inputs ------------------------------------------------------------------------------------
@pytest.mark.quick
def test_rejects_bad_inputs():
    with pytest.raises(LTHError, match="uint8"):
        make_loader(random_images(4).float())
    with pytest.raises(LTHError, match="labels"):
        DeviceLoader(random_images(4), torch.arange(3), 2, MEAN, STD, True, True, 0, "cpu")
    with pytest.raises(LTHError, match="rank"):
        make_loader(random_images(4), rank=2, world_size=2)


class FakeDataset:
    def __init__(self, data, targets):
        self.data, self.targets = data, targets

    def __len__(self):
        return len(self.targets)


def test_images_as_tensor_hwc_numpy_and_nested_subsets():
    data = np.random.default_rng(0).integers(0, 256, (20, 5, 6, 3), dtype=np.uint8)
    dataset = FakeDataset(data, list(range(100, 120)))
    images, labels = images_as_tensor(dataset)
    assert images.shape == (20, 3, 5, 6) and images.is_contiguous()
    assert torch.equal(images, torch.as_tensor(data).permute(0, 3, 1, 2))
    inner = Subset(dataset, [3, 5, 7, 9, 11])
    images, labels = images_as_tensor(Subset(inner, [4, 0, 2]))
    assert labels.tolist() == [111, 103, 107]
    assert torch.equal(images, torch.as_tensor(data[[11, 3, 7]]).permute(0, 3, 1, 2))


def test_images_as_tensor_grayscale_tensor():
    data = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    images, labels = images_as_tensor(FakeDataset(data, torch.arange(10)))
    assert images.shape == (10, 1, 28, 28) and labels.dtype == torch.long
    assert torch.equal(images[:, 0], data)
