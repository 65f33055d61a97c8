"""Fused arms (lightning_lth/training/fused.py): members equal their alone runs, masks stay exact, and
a fused group is stored and resumed as one stage per arm."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO, class_images, write_idx_dataset
from helpers import (
    DEVICES,
    assert_same,
    events,
    experiment,
    kept_outputs,
    results,
    stage_outputs,
    tiny_config,
)
from torch import nn

from lightning_lth.cli import main
from lightning_lth.data import LTHDataModule
from lightning_lth.errors import LTHError
from lightning_lth.models import example_input
from lightning_lth.sparsity.mask import Mask
from lightning_lth.training.fused import FusedArms, unfusable
from lightning_lth.training.module import LTHModule

# After 2 epochs (8 SGD steps): the batched matmul differs from the matmul in the last bits
# only (measured: at most 3e-8 on the tiny study's weights).
WEIGHT_TOLERANCE = 1e-5
# On CUDA, with TF32 off: float32 kernels that differ from the alone run's (a grouped
# convolution, a batched matmul) and atomics whose order varies from run to run.
CUDA_WEIGHT_TOLERANCE = 1e-4


class SmallBNNet(nn.Module):
    """Convolution + BatchNorm: each member must keep its own running statistics."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 4, 3, stride=2), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class DataDependent(nn.Module):
    """Python control flow on a weight's value (one per member): vmap cannot run it."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.head = nn.Linear(in_channels * 28 * 28, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(x) if self.head.weight.sum() > 0 else -self.head(x)


MODELS = {"mlp": {"arch": "mlp", "arch_kwargs": {"hidden": [32, 32]}},
          "conv+bn": {"arch": f"{__name__}.SmallBNNet", "arch_kwargs": {}},
          "resnet20": {"arch": "resnet20", "arch_kwargs": {}}}


def members(model: dict, count: int) -> list[LTHModule]:
    """``count`` nets, each its own init and its own random mask over every weight matrix."""
    nets = []
    for seed in range(count):
        torch.manual_seed(seed)
        module = LTHModule(**model, num_classes=10, in_channels=1, image_size=28, lr=0.05,
                           schedule_epochs=2)
        keep = {name: torch.rand(p.shape) < 0.5 for name, p in module.net.named_parameters()
                if name.endswith("weight") and p.ndim > 1}
        module.mask = Mask(keep)
        nets.append(module)
    return nets


class MaskChecks(L.Callback):
    """After every optimizer step, every pruned weight of every member is exactly 0.0."""

    steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for param, keep in pl_module._mask_pairs():
            assert keep.dtype == param.dtype  # the in-place float multiply, not a bool one
            assert torch.all(param[keep == 0] == 0)
        self.steps += 1


def trainer(device: str = "cpu", callbacks=(), steps: int = -1) -> L.Trainer:
    return L.Trainer(max_epochs=2, max_steps=steps, accelerator=device, devices=1,
                     deterministic=device == "cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks))


@pytest.fixture
def no_tf32():
    """float32 convolutions and matmuls as float32 on CUDA (cuDNN uses TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# Optimizer steps per case. ResNet20 on these 28 x 28 images is chaotic: scaling its weights
# by 1 + 1e-7 noise moves conv1 by 4e-5 after one step and 5e-4 after two (measured), so
# last-bit kernel differences cannot be told from a bug after 8 steps. After one step (the
# forward, BatchNorm's statistics, the backward, the mask, the SGD step) it is within 2e-7;
# momentum over steps is the same optimizer code as the other models'.
STEPS = {"mlp": 8, "conv+bn": 8, "resnet20": 1}


@pytest.mark.quick
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_members_equal_their_alone_runs(tmp_path, name, device, no_tf32):
    data = LTHDataModule("fashion_mnist", str(write_idx_dataset(tmp_path / "data")),
                         batch_size=64, download=False)
    data.order_seed = 11  # one data order for all, as arms at one k
    group = members(MODELS[name], 3)
    alone = copy.deepcopy(group)
    checks = MaskChecks()
    fused = FusedArms(group, example_input(1, 28))
    trained = trainer(device, [checks], STEPS[name])
    trained.fit(fused, data)
    trained.test(fused, data, verbose=False)
    assert checks.steps == STEPS[name]  # 2 epochs: 256 images, batch 64
    tolerance = WEIGHT_TOLERANCE if device == "cpu" else CUDA_WEIGHT_TOLERANCE
    for index, module in enumerate(alone):
        run = trainer(device, steps=STEPS[name])
        run.fit(module, data)
        (tested,) = run.test(module, data, verbose=False)
        expected, got = module.net.state_dict(), fused.member_state(index)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if value.dtype == torch.long:  # BatchNorm's num_batches_tracked
                assert torch.equal(got[key], value.cpu()), key
            else:
                torch.testing.assert_close(got[key], value.cpu(), atol=tolerance, rtol=0,
                                           msg=lambda m, key=key: f"{key}: {m}")
        for param_name, keep in module.mask.tensors.items():
            assert torch.all(got[param_name][~keep] == 0)  # exactly, not to tolerance
        metrics = fused.metrics("test")[index]
        # 128 test images: the accuracy may differ by at most one image near a tie
        assert abs(metrics["test/acc"] - tested["test/acc"]) <= 1 / 128
        assert abs(metrics["test/loss"] - tested["test/loss"]) <= 1e-4


@pytest.mark.quick
def test_a_model_vmap_cannot_run_is_refused_before_training():
    group = [LTHModule(arch=f"{__name__}.DataDependent", num_classes=10, in_channels=1,
                       image_size=28) for _ in range(2)]
    for module in group:
        module.mask = Mask({"head.weight": torch.ones(10, 784, dtype=torch.bool)})
    with pytest.raises(LTHError, match="cannot be fused with torch.func.vmap.*study.fuse=1"):
        FusedArms(group, example_input(1, 28))


@pytest.mark.quick
@pytest.mark.parametrize("switch", ["compile", "channels_last", "cuda_graphs"])
def test_model_switches_fused_arms_do_not_honour_are_refused(switch):
    group = members(MODELS["mlp"], 2)
    for module in group:
        module.hparams[switch] = True
    with pytest.raises(LTHError, match=f"^model.{switch} not supported with fused arms; set "
                                       f"study.fuse=1 or model.{switch}=false$"):
        FusedArms(group, example_input(1, 28))


def test_mixed_precision_is_refused_before_any_stage_and_fast_yaml_trains_alone(tmp_path,
                                                                                 capsys):
    config = tiny_config(tmp_path)
    assert main(["experiment", "--config", str(config), "--study.fuse=6",
                 "--trainer.precision=bf16-mixed"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "study.fuse=6 does not support trainer.precision=bf16-mixed; set study.fuse=1")
    assert not list((tmp_path / "store").rglob("*.pt"))  # nothing was trained
    fast = yaml.safe_load((REPO / "configs" / "trainer" / "fast.yaml").read_text())
    # so the default (study.fuse unset) trains its arms one after another, graphed
    assert unfusable(fast["model"], fast["trainer"]["precision"]) == [
        "model.compile", "model.channels_last", "model.cuda_graphs",
        "trainer.precision=bf16-mixed"]
    assert unfusable({"compile": False}, 32) == unfusable({}, "32-true") == []


@pytest.fixture(scope="module")
def fused_study(tmp_path_factory) -> Path:
    """The tiny study with its arms fused (6 arms per k), run once."""
    folder = tmp_path_factory.mktemp("fused")
    tiny_config(folder)
    done = experiment(folder, "--study.fuse=6")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "store"


def arms_removed(folder: Path, store: Path) -> Path:
    """``folder`` holding the study's config and a copy of ``store`` without its arms: what
    a rerun needs to train only the arms again."""
    folder.mkdir()
    tiny_config(folder)
    skip = shutil.ignore_patterns("arm", "fused", "events.log", "results.jsonl*")
    shutil.copytree(store, folder / "store", ignore=skip)
    return folder / "store"


def test_fused_study_stores_one_stage_per_arm_equal_to_the_alone_study(tmp_path, fused_study):
    rows = results(fused_study)
    assert len(rows) == 12 and {row["fused"] for row in rows} == {6}
    computed = [e for e in events(fused_study) if e["stage"] == "arm"]
    assert len(computed) == 12 and len({e["group"] for e in computed}) == 2  # one per k
    assert all((fused_study / "arm" / row["key"] / "logs" / "metrics.csv").is_file()
               for row in rows)
    assert not list((fused_study / "fused").iterdir())  # group checkpoints are gone

    store = arms_removed(tmp_path / "alone", fused_study)
    done = experiment(tmp_path / "alone", "--study.fuse=1")
    assert done.returncode == 0, done.stderr[-3000:]
    alone = {row["key"]: row for row in results(store)}
    assert alone.keys() == {row["key"] for row in rows}  # fusion is not in the keys
    for row in rows:
        assert alone[row["key"]]["fused"] == 1
        assert abs(alone[row["key"]]["test_acc"] - row["test_acc"]) <= 1 / 128
        final = torch.load(fused_study / "arm" / row["key"] / "final.pt", weights_only=True)
        expected = torch.load(store / "arm" / row["key"] / "final.pt", weights_only=True)
        for key, value in expected["state_dict"].items():
            torch.testing.assert_close(final["state_dict"][key], value,
                                       atol=WEIGHT_TOLERANCE, rtol=0)
    # Each member keeps its own test outputs, its alone run's to two float16 steps (2**-11
    # each below 1): probabilities that differ in the last float32 bits may round apart,
    # and a tied top class is rounded up one step (training/outputs.py).
    labels = class_images(128, 10, (28, 28), 0)[1]
    fused_kept, alone_kept = kept_outputs(fused_study, labels), kept_outputs(store, labels)
    for row in rows:
        ours, theirs = (found[folder / "arm" / row["key"]] for found, folder in (
            (fused_kept, fused_study), (alone_kept, store)))
        torch.testing.assert_close(ours["probs"], theirs["probs"], atol=2**-10, rtol=0)


def test_kill_a_fused_group_then_rerun_equals_an_uninterrupted_run(tmp_path, fused_study):
    """A member finished before (here: copied from the reference) is not retrained; the rest
    of its k train as a group of 5, then the k = 1 group is killed mid-epoch and resumed."""
    store = arms_removed(tmp_path / "killed", fused_study)
    finished = results(fused_study)[0]
    shutil.copytree(fused_study / "arm" / finished["key"], store / "arm" / finished["key"])
    killed = experiment(tmp_path / "killed", "--study.fuse=6", "--study.resume.every_n_steps=1",
                        kill_at="arm permuted S=0.5 k=1@0:2")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert list(store.glob("fused/*.partial/checkpoints/last.ckpt"))
    rerun = experiment(tmp_path / "killed", "--study.fuse=6")
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    arms = [e for e in events(store) if e["stage"] == "arm"]
    assert finished["key"] not in {e["key"] for e in arms}
    resumed = [e for e in events(store, "resume") if e["stage"] == "arm"]
    assert len(resumed) == 6 and {e["global_step"] for e in resumed} == {3}
    assert not list(store.glob("*/*.partial")) and not list(store.rglob("*.tmp"))
    ours = {row["key"]: row for row in results(store)}
    k = {row["key"]: row["rewind_epoch"] for row in results(fused_study)}
    group_of_five = {key for key, epoch in k.items()
                     if epoch == finished["rewind_epoch"] and key != finished["key"]}
    outputs, reference = stage_outputs(store), stage_outputs(fused_study)
    assert outputs.keys() == reference.keys()
    for path, value in reference.items():
        if path.split("/")[1] not in group_of_five:  # the killed group: exactly the same
            assert_same(outputs[path], value, path)
        elif path.endswith("final.pt"):  # another group size: float tolerance
            for key, tensor in value["state_dict"].items():
                torch.testing.assert_close(outputs[path]["state_dict"][key], tensor,
                                           atol=WEIGHT_TOLERANCE, rtol=0)
    sizes = {key: 5 if key in group_of_five else 6 for key in k}  # the copied one: 6
    assert {key: row["fused"] for key, row in ours.items()} == sizes
