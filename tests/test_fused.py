"""Fused arms (lightning_lth/training/fused.py): members equal their alone runs (float32,
bf16-mixed, channels_last, compiled, CUDA-graphed), masks stay exact, and a fused group is
stored and resumed as one stage per arm."""

from __future__ import annotations

import copy
import shutil
import warnings
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
from lightning_lth.experiment import runner as runner_file
from lightning_lth.experiment.runner import Runner
from lightning_lth.models import example_input
from lightning_lth.models.mlp import MLP
from lightning_lth.parsing import make_cli
from lightning_lth.sparsity.mask import Mask
from lightning_lth.training import module as module_file
from lightning_lth.training.fused import FusedArms, unfusable
from lightning_lth.training.module import LTHModule

# After 2 epochs (8 SGD steps): the batched matmul differs from the matmul in the last bits
# only (measured: at most 3e-8 on the tiny study's weights).
WEIGHT_TOLERANCE = 1e-5
# On CUDA, with TF32 off: float32 kernels that differ from the alone run's (a grouped
# convolution, a batched matmul) and atomics whose order varies from run to run.
CUDA_WEIGHT_TOLERANCE = 1e-4
# bf16-mixed, after 8 steps: bf16 keeps 8 significant bits, and the group's kernels round
# differently from the alone run's (vmap's linear rule adds the bias to the bf16-rounded
# product, a second rounding that addmm does not do; a grouped convolution), so about half
# the logits differ by one bf16 step after the first step and the runs then drift apart at
# bf16's noise level: measured 3.3e-4 (MLP) and 4.6e-4 (conv+BN) on weights, 2.4e-4 on
# BatchNorm statistics, the size by which bf16 and float32 training of these nets differ
# (2.7e-4 to 1.1e-3). A wrong member, mask or statistic is off by far more; the float32
# convolutions vmap fell back to are caught by test_bf16_mixed_group_... (dtypes).
BF16_TOLERANCE = 2e-3


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


def trainer(device: str = "cpu", callbacks=(), steps: int = -1, precision="32-true",
            options: dict | None = None) -> L.Trainer:
    """A quiet Trainer; ``options``: further Trainer arguments."""
    return L.Trainer(max_epochs=2, max_steps=steps, accelerator=device, devices=1,
                     precision=precision, deterministic=device == "cpu", logger=False,
                     enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks), **(options or {}))


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


def members_vs_alone(tmp_path, model: dict, device: str, steps: int, precision="32-true",
                     options: dict | None = None, **switches
                     ) -> tuple[dict[str, float], FusedArms, MaskChecks]:
    """3 members trained ``steps`` steps and tested as a fused group and each alone, in
    ``precision`` with the ``model.*`` ``switches`` (and the Trainer ``options``): the
    largest difference per kind --
    "weights" (parameters), "stats" (BatchNorm's float buffers), "acc" and "loss" (test)
    -- after checking what must be exact (the mask, BatchNorm's step counts)."""
    data = LTHDataModule("fashion_mnist", str(write_idx_dataset(tmp_path / "data")),
                         batch_size=64, download=False)
    data.order_seed = 11  # one data order for all, as arms at one k
    group = members({**model, **switches}, 3)
    alone = copy.deepcopy(group)
    checks = MaskChecks()
    fused = FusedArms(group, example_input(1, 28))
    trained = trainer(device, [checks], steps, precision, options)
    trained.fit(fused, data)
    trained.test(fused, data, verbose=False)
    assert checks.steps == steps
    worst = dict.fromkeys(("weights", "stats", "acc", "loss"), 0.0)
    for index, module in enumerate(alone):
        run = trainer(device, steps=steps, precision=precision, options=options)
        run.fit(module, data)
        (tested,) = run.test(module, data, verbose=False)
        expected, got = module.net.state_dict(), fused.member_state(index)
        params = dict(module.net.named_parameters())
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key].dtype == value.dtype, key  # float32 statistics, under autocast too
            if value.dtype == torch.long:  # BatchNorm's num_batches_tracked
                assert torch.equal(got[key], value.cpu()), key
            else:
                kind = "weights" if key in params else "stats"
                gap = (got[key] - value.cpu()).abs().max().item()
                worst[kind] = max(worst[kind], gap)
        for param_name, keep in module.mask.tensors.items():
            assert torch.all(got[param_name][~keep] == 0)  # exactly, not to tolerance
        metrics = fused.metrics("test")[index]
        worst["acc"] = max(worst["acc"], abs(metrics["test/acc"] - tested["test/acc"]))
        worst["loss"] = max(worst["loss"], abs(metrics["test/loss"] - tested["test/loss"]))
    return worst, fused, checks


@pytest.mark.quick
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_members_equal_their_alone_runs(tmp_path, name, device, no_tf32):
    worst, _, _ = members_vs_alone(tmp_path, MODELS[name], device, STEPS[name])
    tolerance = WEIGHT_TOLERANCE if device == "cpu" else CUDA_WEIGHT_TOLERANCE
    assert max(worst["weights"], worst["stats"]) <= tolerance, worst
    # 128 test images: the accuracy may differ by at most one image near a tie
    assert worst["acc"] <= 1 / 128 and worst["loss"] <= 1e-4, worst


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mlp", "conv+bn"])
def test_bf16_mixed_members_equal_their_alone_runs(tmp_path, name, device, no_tf32):
    """Both in bf16-mixed: masks exact after every step, statistics float32 (checked by
    ``members_vs_alone``), the rest to bf16 tolerance."""
    worst, _, _ = members_vs_alone(tmp_path, MODELS[name], device, 8, "bf16-mixed")
    assert max(worst["weights"], worst["stats"]) <= BF16_TOLERANCE, worst
    assert worst["acc"] <= 2 / 128 and worst["loss"] <= 1e-3, worst


@pytest.mark.quick
def test_bf16_mixed_group_convolves_in_bf16_and_normalises_in_float32():
    """Under CPU autocast vmap convolved in float32 (its rule calls an op CPU autocast does
    not list) and failed in BatchNorm on a bf16 input; now each layer runs as autocast runs
    it for one net: convolutions and linear layers in bf16, BatchNorm on float32 with its
    output in bf16 and its statistics float32; and the logits are the alone nets' to bf16
    rounding. Outside autocast the group is float32 throughout."""
    group = members(MODELS["conv+bn"], 3)
    fused = FusedArms(group, example_input(1, 28)).train()
    outputs = {}
    for name, layer in fused._template.named_modules():
        if name and not list(layer.children()):
            layer.register_forward_hook(
                lambda layer, args, out, name=name: outputs.__setitem__(name, out.dtype))
    images = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fused(images)
        alone = torch.stack([module.train()(images) for module in group])
    assert logits.dtype == alone.dtype == torch.bfloat16
    assert outputs == {"features.0": torch.bfloat16, "features.1": torch.bfloat16,
                       "features.2": torch.bfloat16, "features.3": torch.bfloat16,
                       "features.4": torch.bfloat16, "head": torch.bfloat16}
    assert all(buffer.dtype in (torch.float32, torch.long)
               for buffer in fused._stacked_buffers().values())
    # one bf16 step (2**-8 relative below 1) where the kernels round apart, no more
    torch.testing.assert_close(logits.float(), alone.float(), rtol=2**-7, atol=2**-8)
    fused(images)
    assert set(outputs.values()) == {torch.float32}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_channels_last_members_equal_their_alone_runs(tmp_path, precision):
    """model.channels_last: each member's stacked convolution weight is channels_last (as its
    net's, stacked as it is) and the group trains as the alone channels_last nets do."""
    worst, fused, _ = members_vs_alone(tmp_path, MODELS["conv+bn"], "cpu", 8, precision,
                                       channels_last=True)
    conv = fused._stacked_params()["features.0.weight"]
    assert conv[0].is_contiguous(memory_format=torch.channels_last)
    tolerance = WEIGHT_TOLERANCE if precision == "32-true" else BF16_TOLERANCE
    assert max(worst["weights"], worst["stats"]) <= tolerance, worst
    assert worst["acc"] <= 2 / 128, worst


class GroupGraphSeen(L.Callback):
    """Whether the group's step had been captured by the last training batch."""

    captured = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.captured = pl_module._graphed is not None and pl_module._graphed.graph is not None


def fit_group(tmp_path, device: str, cuda_graphs: bool, precision="32-true"):
    """(fused group, its trainer, graph seen) after 2 epochs of a masked conv+BN group: batch
    48 over 256 images, 5 full batches and one of 16 (eager in a graphed run)."""
    data = LTHDataModule("fashion_mnist", str(write_idx_dataset(tmp_path / "data")),
                         batch_size=48, download=False)
    data.order_seed = 11
    fused = FusedArms(members({**MODELS["conv+bn"], "cuda_graphs": cuda_graphs}, 3),
                      example_input(1, 28))
    seen, checks = GroupGraphSeen(), MaskChecks()
    trained = trainer(device, [seen, checks], precision=precision)
    trained.fit(fused, data)
    assert checks.steps == trained.global_step == 12
    return fused, trained, seen


def test_cuda_graphs_of_a_fused_group_fall_back_on_cpu_same_numbers_said_once(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(module_file, "_told_no_cuda", set())  # as in a fresh process
    eager, _, _ = fit_group(tmp_path / "eager", "cpu", cuda_graphs=False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        graphed, _, seen = fit_group(tmp_path / "graphed", "cpu", cuda_graphs=True)
        again, _, _ = fit_group(tmp_path / "again", "cpu", cuda_graphs=True)
    fallback = [w for w in said if "model.cuda_graphs" in str(w.message)]
    assert len(fallback) == 1 and "eagerly" in str(fallback[0].message)
    assert graphed.automatic_optimization and not seen.captured
    for group in (graphed, again):
        assert group.metrics("train") == eager.metrics("train")
        for name, value in eager.state_dict().items():
            assert torch.equal(group.state_dict()[name], value), name


@pytest.mark.requires_cuda("the fused group's CUDA graph is captured on a GPU only")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_graphed_fused_step_matches_the_eager_fused_step(tmp_path, precision, no_tf32):
    """Forward, backward, mask hooks and fused SGD with a device learning rate as one graph,
    the per-member epoch sums included; the odd last batch eager."""
    eager, eager_trainer, eager_seen = fit_group(tmp_path / "eager", "cuda", False, precision)
    graphed, trainer_, seen = fit_group(tmp_path / "graphed", "cuda", True, precision)
    assert seen.captured and not eager_seen.captured and not graphed.automatic_optimization
    lr = trainer_.optimizers[0].param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.device.type == "cuda"
    assert float(lr) == pytest.approx(eager_trainer.optimizers[0].param_groups[0]["lr"])
    tolerance = CUDA_WEIGHT_TOLERANCE if precision == "32-true" else BF16_TOLERANCE
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(graphed.state_dict()[name], value, rtol=0, atol=tolerance,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for ours, theirs in zip(graphed.metrics("train"), eager.metrics("train"), strict=True):
        assert ours.keys() == theirs.keys() == {"train/acc", "train/loss"}
        assert ours["train/acc"] == pytest.approx(theirs["train/acc"], abs=2 / 256)
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], abs=1e-3)


@pytest.mark.slow  # torch.compile of a group and of each net alone: about a minute on 2 cores
@pytest.mark.parametrize("device", DEVICES)
def test_fast_yaml_settings_fused_members_equal_their_alone_runs(tmp_path, device, no_tf32):
    """configs/trainer/fast.yaml's settings -- bf16-mixed, channels_last, torch.compile and
    (on CUDA; eager on a CPU) CUDA graphs -- for a conv+BN group and for its nets alone: the
    group's forward is compiled as one, vmap and all."""
    if device == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile's CPU backend (inductor) needs a C++ compiler; none found")
    torch._dynamo.reset()
    worst, fused, _ = members_vs_alone(tmp_path, MODELS["conv+bn"], device, 8, "bf16-mixed",
                                       channels_last=True, compile=True, cuda_graphs=True)
    assert hasattr(fused._grouped, "_torchdynamo_orig_callable")  # torch.compile's wrapper
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert max(worst["weights"], worst["stats"]) <= BF16_TOLERANCE, worst
    assert worst["acc"] <= 2 / 128 and worst["loss"] <= 1e-3, worst


class SubclassedMLP(MLP):
    """An MLP whose forward is its own: the group must not assume the MLP's."""

    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_mlp_group_runs_as_batched_matmuls_equal_to_the_nets_alone(precision):
    """The project's MLP fuses as one baddbmm per layer (``_linear_chain``): each member's
    logits and gradients equal its net's alone, under autocast too (float32: 1e-5 of the
    largest value; bf16, 8 significant bits, where kernels may round differently: 2 units of
    its last place, 2**-7; on this CPU they are equal). Any other net, a subclass of the MLP
    included, runs under vmap."""
    nets = members(MODELS["mlp"], 3)
    alone = copy.deepcopy(nets)
    group = FusedArms(nets, example_input(1, 28))
    assert group._chain == [("layers.0.weight", "layers.0.bias"),  # hidden [32, 32]
                            ("layers.2.weight", "layers.2.bias"),
                            ("classifier.weight", "classifier.bias")]
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    bf16 = precision == "bf16-mixed"
    tolerance = 2 ** -7 if bf16 else WEIGHT_TOLERANCE
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = group(images)
    assert logits.shape == (3, 16, 10) and logits.dtype == (torch.bfloat16 if bf16 else
                                                            torch.float32)
    (logits.float() ** 2).sum().backward()
    for index, module in enumerate(alone):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            own = module.net(images)
        (own.float() ** 2).sum().backward()
        torch.testing.assert_close(logits[index].float(), own.float(), rtol=0,
                                   atol=tolerance * float(own.abs().max()))
        stacked = group._stacked_params()
        for name, param in module.net.named_parameters():
            grad = stacked[name].grad[index]
            torch.testing.assert_close(grad, param.grad, rtol=0,
                                       atol=tolerance * float(param.grad.abs().max()),
                                       msg=lambda m, name=name: f"{name}: {m}")
    subclassed = members(MODELS["mlp"], 2)
    for module in subclassed:
        module.net.__class__ = SubclassedMLP
    assert FusedArms(subclassed, example_input(1, 28))._chain is None
    assert FusedArms(members(MODELS["conv+bn"], 2), example_input(1, 28))._chain is None


@pytest.mark.quick
def test_a_model_vmap_cannot_run_is_refused_before_training():
    group = [LTHModule(arch=f"{__name__}.DataDependent", num_classes=10, in_channels=1,
                       image_size=28) for _ in range(2)]
    for module in group:
        module.mask = Mask({"head.weight": torch.ones(10, 784, dtype=torch.bool)})
    with pytest.raises(LTHError, match="cannot be fused with torch.func.vmap.*study.fuse=1"):
        FusedArms(group, example_input(1, 28))


def test_16_mixed_is_refused_before_any_stage_and_fast_settings_fuse_only_when_asked(
        tmp_path, capsys, monkeypatch):
    config = tiny_config(tmp_path)
    assert main(["experiment", "--config", str(config), "--study.fuse=6",
                 "--trainer.precision=16-mixed"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "study.fuse=6 does not support trainer.precision=16-mixed; set study.fuse=1")
    assert not list((tmp_path / "store").rglob("*.pt"))  # nothing was trained
    fast = yaml.safe_load((REPO / "configs" / "trainer" / "fast.yaml").read_text())
    assert unfusable(fast["trainer"]["precision"]) == unfusable(32) == []
    assert unfusable("bf16-true") == ["trainer.precision=bf16-true"]
    # The default on a device whose FUSE_DEFAULT fuses (CUDA's 12; here the CPU's, set to 4):
    # fp32 fuses, fast.yaml's settings (not measured fused yet) train alone unless asked.
    monkeypatch.setitem(runner_file.FUSE_DEFAULT, "cpu", 4)
    fast_settings = [f"--{name}={value}" for section in ("trainer", "model")
                     for name, value in ((f"{section}.{key}", str(value).lower())
                                         for key, value in fast[section].items())]
    assert len(fast_settings) == 4  # precision, channels_last, compile, cuda_graphs

    def fuse_size(*overrides):
        return Runner(make_cli(["--config", str(config), "--study.fuse=null", *overrides],
                               run=False, command="experiment")).fuse_size()

    assert fuse_size() == 4
    assert fuse_size(*fast_settings) == 1
    assert fuse_size("--model.compile=true") == fuse_size("--model.channels_last=true") == 1
    assert fuse_size(*fast_settings, "--study.fuse=6") == 6
    with pytest.raises(LTHError, match="^study.fuse=6 does not support "
                                       "trainer.precision=16-mixed; set study.fuse=1$"):
        fuse_size("--trainer.precision=16-mixed", "--study.fuse=6")


def test_clipping_by_value_fuses_and_by_norm_is_refused_before_training(tmp_path,
                                                                        monkeypatch):
    """Clipping by value acts element by element: members equal their alone runs. Clipping
    by norm (Lightning's default) would clip by the whole group's norm, not each member's:
    the group refuses it, and so does the runner before any stage (unset study.fuse: 1)."""
    clip_value = {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"}
    worst, _, _ = members_vs_alone(tmp_path, MODELS["mlp"], "cpu", 6, options=clip_value)
    assert worst["weights"] <= WEIGHT_TOLERANCE, worst
    group = FusedArms(members(MODELS["mlp"], 2), example_input(1, 28))
    data = LTHDataModule("fashion_mnist", str(write_idx_dataset(tmp_path / "data")),
                         batch_size=64, download=False)
    with pytest.raises(LTHError, match=r"^fused arms do not support trainer.gradient_clip_val"
                                       r"=0.5 with gradient_clip_algorithm=norm \(allowed"):
        trainer("cpu", steps=1, options={"gradient_clip_val": 0.5}).fit(group, data)
    assert unfusable(32, 0.5, "value") == [] == unfusable(32, None, None)
    config = tiny_config(tmp_path)
    monkeypatch.setitem(runner_file.FUSE_DEFAULT, "cpu", 4)

    def fuse_size(*overrides):
        return Runner(make_cli(["--config", str(config), *overrides], run=False,
                               command="experiment")).fuse_size()

    clip = "--trainer.gradient_clip_val=0.5"
    assert fuse_size("--study.fuse=null") == 4
    assert fuse_size("--study.fuse=null", clip) == 1
    assert fuse_size("--study.fuse=null", clip, "--trainer.gradient_clip_algorithm=value") == 4
    with pytest.raises(LTHError, match="^study.fuse=6 does not support trainer.gradient_clip_"
                                       "val=0.5 with gradient_clip_algorithm=norm; set "
                                       "study.fuse=1$"):
        fuse_size("--study.fuse=6", clip)


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

