"""Bring your own model: any importable nn.Module through model.arch + model.arch_kwargs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torchvision
import yaml
from conftest import write_cifar_dataset
from torch import nn

from lightning_lth.cli import main
from lightning_lth.errors import LTHError
from lightning_lth.experiment.plan import prunable_count
from lightning_lth.experiment.stages import prunable_names
from lightning_lth.models import build_model
from lightning_lth.sparsity import imp
from lightning_lth.sparsity.imp import PruneSettings
from lightning_lth.sparsity.mask import Mask

RESNET18 = {"arch": "torchvision.models.resnet18", "arch_kwargs": {"num_classes": 10}}


class SmallCNN(nn.Module):
    """A user's class: declares num_classes and in_channels, knows nothing of width."""

    def __init__(self, num_classes: int, in_channels: int, hidden: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.quick
def test_user_class_gets_only_the_arguments_it_declares():
    net = build_model(f"{__name__}.SmallCNN", 1, 7, 3, 32, {"hidden": 5})
    assert net.head.out_features == 7 and net.features[0].in_channels == 3
    assert net.features[0].out_channels == 5
    resnet = build_model(RESNET18["arch"], 1, 10, 3, 32, RESNET18["arch_kwargs"])
    assert isinstance(resnet, torchvision.models.ResNet) and resnet.fc.out_features == 10
    assert type(build_model("resnet20", 1, 10, 3, 32)).__name__ == "ResNet20"  # registry


@pytest.mark.quick
@pytest.mark.parametrize("arch, kwargs, width, message", [
    ("nosuchpackage.Net", {}, 1, "'nosuchpackage.Net' does not import"),
    ("torch.nn.NoSuchNet", {}, 1, "'torch.nn.NoSuchNet' does not import"),
    ("torch.Tensor", {}, 1, "is not an nn.Module class"),
    ("os.getcwd", {}, 1, "returned str, not an nn.Module"),
    ("resnet99", {}, 1, "unknown model 'resnet99'"),
    ("torch.nn.Linear", {}, 1, "cannot be built with model.arch_kwargs []"),
    (f"{__name__}.SmallCNN", {}, 2, "model.width=2 but"),
    (RESNET18["arch"], {"num_classes": 100}, 1, "num_classes=100 but the dataset has 10"),
])
def test_bad_arch_is_one_line_error(arch, kwargs, width, message):
    with pytest.raises(LTHError) as error:
        build_model(arch, width, 10, 3, 32, kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_prunable_sets_skip_paths_by_graph_role_only_for_models_without_a_spec():
    for name, shape in (("resnet20", (3, 32)), ("vgg11", (3, 32)), ("mlp", (1, 28))):
        net = build_model(name, 1, 10, *shape)
        assert prunable_names(net, PruneSettings()) == imp.prunable_names(net)  # not traced
    resnet20 = imp.prunable_names(build_model("resnet20", 1, 10, 3, 32))
    assert len(resnet20) == 19 + 1 and not any("shortcut" in name for name in resnet20)
    resnet18 = torchvision.models.resnet18(num_classes=10)
    names = prunable_names(resnet18, PruneSettings())  # traced: downsample convs left out
    assert not any("downsample" in name for name in names) and "fc.weight" in names
    assert len(names) == 1 + 16 + 1  # the stem, 8 blocks x 2 convs, the classifier
    model = {"width": 1, "num_classes": 10, "in_channels": 3, "image_size": 32, **RESNET18}
    assert prunable_count(model, PruneSettings()) == sum(
        p.numel() for n, p in resnet18.named_parameters() if n in names)  # on meta, the same


def resnet18_config(tmp_path: Path) -> Path:
    data_dir = write_cifar_dataset(tmp_path / "data", "cifar10", n_train=8, n_test=4)
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "deterministic": True,
                    "enable_model_summary": False},
        "model": {**RESNET18, "lr": 0.01},
        "data": {"dataset": "cifar10", "data_dir": str(data_dir), "batch_size": 4,
                 "eval_batch_size": 4, "download": False},
        "study": {"store": str(tmp_path / "store"), "sparsities": [0.5],
                  "rewind_epochs": [0, 1], "prune": {"epochs_per_round": 1, "fraction": 0.5},
                  "match": {"interpolation_points": 11}, "wandb_mode": "disabled"},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow  # a whole study of an 11M-parameter net on the CPU
def test_torchvision_resnet18_study_on_cifar(tmp_path, allow_unverified_cifar, capsys):
    """plan, then the whole study (T = 2, S = 0.5, k in {0, 1}) of a torchvision ResNet18
    with its default stem on 32 x 32 synthetic CIFAR-10: spec derived from its graph."""
    config = resnet18_config(tmp_path)
    started = time.time()
    assert main(["plan", "--config", str(config)]) == 0
    assert "arm permuted S=0.5 k=1" in capsys.readouterr().out
    assert main(["experiment", "--config", str(config)]) == 0
    rows = [json.loads(line) for line in
            (tmp_path / "store" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["rewind_epoch"]) for r in rows) == sorted(
        (arm, k) for arm in ("lth", "naive", "permuted") for k in (0, 1))
    assert {r["model"] for r in rows} == {RESNET18["arch"]}
    masks = [Mask.load(path) for path in (tmp_path / "store" / "arm").glob("*/mask.pt")]
    assert len(masks) == 6 and {round(mask.sparsity(), 3) for mask in masks} == {0.5}
    for mask in masks:  # the downsample convs are on the skip paths: never pruned
        assert len(mask.tensors) == 18 and not any("downsample" in n for n in mask.tensors)
    print(f"resnet18 study: {time.time() - started:.1f} s")
