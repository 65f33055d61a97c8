"""ImageNet as a torchvision ImageFolder, and the ResNet50 template config (on fake files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from PIL import Image
from torchvision import transforms

from lightning_lth.cli import main
from lightning_lth.data import IMAGENET_STATS, LTHDataModule
from lightning_lth.errors import LTHError

CLASSES = ("n01440764", "n01443537", "n01484850")


def fake_imagenet(root: Path, per_class: int = 2) -> Path:
    """train/ and val/ ImageFolders: ``per_class`` odd-sized PNG and JPEG images per class."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                size = (40 + 13 * index, 30 + 7 * label)  # not square, smaller than 224
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                suffix = ".JPEG" if index % 2 else ".png"
                Image.fromarray(pixels).save(folder / f"{name}_{index}{suffix}")
    return root


def test_imagenet_folders_load_with_the_standard_transforms(tmp_path):
    dm = LTHDataModule("imagenet", str(fake_imagenet(tmp_path / "imagenet")),
                       loader="torchvision", batch_size=2, eval_batch_size=4, num_workers=0)
    dm.setup("fit")
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (1000, 3, 224)
    assert dm.splits["train"].classes == list(CLASSES) and len(dm.splits["val"]) == 6
    train = [type(step) for step in dm.splits["train"].transform.transforms]
    assert train == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip,
                     transforms.ToTensor, transforms.Normalize]
    plain = dm.splits["val"].transform.transforms
    assert [type(step) for step in plain[:2]] == [transforms.Resize, transforms.CenterCrop]
    assert (plain[0].size, plain[1].size) == (256, (224, 224))
    assert (tuple(plain[3].mean), tuple(plain[3].std)) == IMAGENET_STATS
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 224, 224) and images.dtype == torch.float32
    for batches in (dm.test_batches(), dm.unaugmented_train_batches()):
        images, labels = next(iter(batches))
        assert images.shape == (4, 3, 224, 224) and labels.tolist() == [0, 0, 1, 1]


@pytest.mark.quick
def test_imagenet_refuses_the_device_loader_and_names_missing_folders(tmp_path):
    with pytest.raises(LTHError, match="data.loader=device is not allowed for 'imagenet'"):
        LTHDataModule("imagenet", str(tmp_path))
    dm = LTHDataModule("imagenet", str(tmp_path / "none"), loader="torchvision")
    with pytest.raises(LTHError) as error:
        dm.setup("fit")
    assert "train/<class>/<image>" in str(error.value) and "\n" not in str(error.value)


def test_resnet50_imagenet_template_plans(tmp_path, capsys):
    config = yaml.safe_load((REPO / "configs" / "resnet50_imagenet.yaml").read_text())
    assert config["model"]["arch"] == "torchvision.models.resnet50"
    data_dir = fake_imagenet(tmp_path / "imagenet", per_class=1)
    assert main(["plan", "--config", str(REPO / "configs" / "resnet50_imagenet.yaml"),
                 f"--data.data_dir={data_dir}", f"--study.store={tmp_path / 'store'}",
                 "--trainer.logger=false", "--study.wandb_mode=disabled"]) == 0
    out = capsys.readouterr().out
    assert "dense A" in out and "arm permuted S=0.9 k=5" in out
    assert not (tmp_path / "store" / "dense").exists()
