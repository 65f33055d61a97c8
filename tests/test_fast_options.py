"""Fast training options: mixed precision, channels_last, torch.compile.

Each is a tiny real ``Trainer.fit`` of LTHModule on an easy separable task (4 classes: which
quadrant of an 8x8 image is brighter, under uniform noise; the DeviceLoader feeds it) and
must reach fp32's validation accuracy within ``TOLERANCE`` (and at least ``FLOOR``).
ResNet8 (ResNet20's stages with one block each) covers conv + BN; the compile test in the
default suite uses a one-hidden-layer MLP, since compiling a conv net on a 2-core CPU
takes ~45 s (that one is marked slow).
"""

from __future__ import annotations

import functools
import logging
import shutil
import warnings

import lightning as L
import pytest
import torch
from helpers import DEVICES

from lightning_lth.data import DeviceLoader
from lightning_lth.training.module import LTHModule

# 256 validation images: 0.05 is 13 of them. fp32 reaches ~0.98 here.
TOLERANCE, FLOOR = 0.05, 0.9
ARCHS = {"resnet8": ("resnet20", {"blocks_per_stage": 1}), "mlp": ("mlp", {"hidden": (32,)})}


def quadrant_task(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (count,), generator=generator)
    images = torch.randint(0, 160, (count, 3, 8, 8), generator=generator)
    for label in range(4):
        rows, cols = slice(label // 2 * 4, label // 2 * 4 + 4), slice(label % 2 * 4, label % 2 * 4 + 4)
        images[labels == label, :, rows, cols] += 60
    return images.to(torch.uint8), labels


def fit(device: str = "cpu", precision: str = "32-true", arch: str = "resnet8",
        channels_last: bool = False, compile: bool = False, epochs: int = 3):
    """(validation accuracy, module, trainer) after a tiny fit."""
    L.seed_everything(0, verbose=False)
    name, kwargs = ARCHS[arch]
    stats = ((0.5,) * 3, (0.25,) * 3)
    train = DeviceLoader(*quadrant_task(256, 0), 64, *stats, train=True, augment=False,
                         seed=0, device=torch.device(device))
    val = DeviceLoader(*quadrant_task(256, 1), 256, *stats, train=False, augment=False,
                       seed=0, device=torch.device(device))
    module = LTHModule(arch=name, arch_kwargs=kwargs, num_classes=4, in_channels=3,
                       image_size=8, lr=0.05, channels_last=channels_last, compile=compile)
    trainer = L.Trainer(max_epochs=epochs, precision=precision, accelerator=device, devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val)
    return trainer.callback_metrics["val/acc"].item(), module, trainer


@functools.cache
def fp32_accuracy(device: str, arch: str) -> float:
    accuracy = fit(device, arch=arch)[0]
    assert accuracy >= FLOOR, f"fp32 baseline only reached {accuracy:.3f}"
    return accuracy


def check_close_to_fp32(accuracy: float, device: str, arch: str) -> None:
    baseline = fp32_accuracy(device, arch)
    assert accuracy >= FLOOR
    assert abs(accuracy - baseline) <= TOLERANCE, (accuracy, baseline)


@pytest.mark.quick
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("precision", "channels_last"),
                         [("bf16-mixed", False), ("32-true", True), ("bf16-mixed", True)])
def test_precision_and_channels_last_match_fp32(device, precision, channels_last):
    if device == "cuda" and precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    accuracy, module, trainer = fit(device, precision, channels_last=channels_last)
    assert trainer.precision == precision
    weight = module.net.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    check_close_to_fp32(accuracy, device, "resnet8")


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_mixed_matches_fp32(device):
    if device == "cpu":
        pytest.skip("Lightning has no fp16 AMP on CPU: Trainer(accelerator='cpu', "
                    "precision='16-mixed') silently runs bf16-mixed instead (tested above)")
    accuracy, _, trainer = fit(device, "16-mixed")
    assert trainer.precision == "16-mixed"
    check_close_to_fp32(accuracy, device, "resnet8")


def compile_unavailable() -> str | None:
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python/platform"
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "torch.compile's CPU backend (inductor) needs a C++ compiler; none found"
    return None


def _check_compile(device: str, arch: str, channels_last: bool = False) -> None:
    reason = compile_unavailable() if device == "cpu" else None
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    accuracy, module, _ = fit(device, arch=arch, channels_last=channels_last, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    check_close_to_fp32(accuracy, device, arch)


@pytest.mark.slow  # torch.compile's first compile takes half a minute on 2 cores
@pytest.mark.parametrize("device", DEVICES)
def test_compile_matches_fp32(device):
    """Tiny MLP: compiling it on CPU takes ~10 s."""
    _check_compile(device, "mlp")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_conv_net_channels_last_matches_fp32(device):
    """ResNet8 (conv + BN, train and eval graphs), channels_last: ~45 s on a 2-core CPU."""
    _check_compile(device, "resnet8", channels_last=True)
