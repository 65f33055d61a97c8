"""Model FLOPs of one training step, and the cards' peaks: what model-FLOP utilisation needs.

**FLOPs** are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the net itself, run
on the meta device at the real batch shape (no memory, no arithmetic: exact at any batch,
and for ResNet20x16 in a fraction of a second). One training step = the forward and the
``loss.backward()`` of a cross-entropy loss, net in train mode. FlopCounterMode counts the
matrix products only (convolutions, ``mm``/``addmm``/``bmm``, attention), 2 FLOPs per
multiply-add, and in the backward only the gradients autograd really computes (the first
layer's input gradient is not: the images need none). BatchNorm, ReLU, pooling, the loss and
the optimizer step are not counted: that is the usual convention for MFU (the work a
tensor-core peak can be set against), so MFU is a lower bound on the card's busy share.

**Peaks** (``PEAKS``): dense tensor-core TFLOP/s per dtype from NVIDIA's datasheets, keyed
by the name ``torch.cuda.get_device_name()`` returns. The datasheets print the 2:4-sparse
figure with a footnote for bf16 and tf32; the dense figure used here is half of it. A card
not in the table (or a CPU) has no peak: ``mfu`` gives None and the bench says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_lth.models import build_model


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step of one batch (forward, then backward)."""

    batch_size: int
    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @property
    def per_image(self) -> float:
        return self.total / self.batch_size


def train_step_flops(net: nn.Module, images: torch.Tensor) -> StepFlops:
    """Count one step of ``net`` on ``images`` (any device, meta included): forward and the
    backward of a cross-entropy loss over its outputs, net in train mode. The net's
    gradients are left set (on meta they hold nothing)."""
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    counter = FlopCounterMode(display=False)
    net.train()
    with counter:
        logits = net(images)
        forward = counter.get_total_flops()
        F.cross_entropy(logits, labels).backward()
    return StepFlops(images.shape[0], forward, counter.get_total_flops() - forward)


def model_step_flops(arch: str, width: int, batch_size: int, num_classes: int = 10,
                     in_channels: int = 3, image_size: int = 32) -> StepFlops:
    """One training step of the registered model built as ``fit`` builds it, counted on the
    meta device at the real batch."""
    with torch.device("meta"):
        net = build_model(arch, width, num_classes, in_channels, image_size)
    images = torch.empty(batch_size, in_channels, image_size, image_size, device="meta")
    return train_step_flops(net, images)


# Dense TFLOP/s (no sparsity) per dtype: "bf16", "fp16" and "tf32" on the tensor cores,
# "fp32" on the CUDA cores. Keys: torch.cuda.get_device_name() exactly.
_H100_SXM = {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}
#   NVIDIA H100 Tensor Core GPU datasheet, "H100 SXM" column: BF16 Tensor Core 1,979 TFLOPS*,
#   FP16 the same, TF32 Tensor Core 989 TFLOPS*, FP32 67 TFLOPS (* with sparsity; dense is
#   half),
#   https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
_H100_PCIE = {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}
#   the same datasheet, "H100 PCIe" column: BF16 1,513 TFLOPS*, TF32 756 TFLOPS*, FP32 51 TFLOPS
_H200_SXM = {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}
#   NVIDIA H200 product page / datasheet, "H200 SXM" column: BF16 Tensor Core 1,979 TFLOPS*,
#   TF32 Tensor Core 989 TFLOPS*, FP32 67 TFLOPS (the H100 SXM's GH100 compute, more memory),
#   https://www.nvidia.com/en-us/data-center/h200/
_A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}
#   NVIDIA A100 Tensor Core GPU datasheet (40GB and 80GB, PCIe and SXM alike): BF16 Tensor
#   Core 312 TFLOPS (624 with sparsity), TF32 Tensor Core 156 TFLOPS (312 with sparsity),
#   FP32 19.5 TFLOPS, https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
#   nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
PEAKS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,  # what an H100 SXM5 reports
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H200": _H200_SXM,  # what an H200 SXM reports (the NVL card, not listed, is slower)
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
}

# the dtype whose peak a Lightning precision's matrix products run at
PRECISION_DTYPE = {"bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16",
                   "16-true": "fp16", "32-true": "tf32"}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The card's dense peak TFLOP/s for a Lightning precision; None for a card not in
    ``PEAKS`` (a CPU's name included). ``32-true`` counts as TF32: cuDNN's convolutions,
    which are nearly all of these nets' FLOPs, use TF32 by default."""
    if precision not in PRECISION_DTYPE:
        raise ValueError(f"precision {precision!r}: known ones are "
                         f"{', '.join(PRECISION_DTYPE)}")
    peaks = PEAKS.get(device_name.strip())
    return None if peaks is None else peaks[PRECISION_DTYPE[precision]]


def mfu(images_per_s: float, flops_per_image: float, peak: float | None) -> float | None:
    """Model-FLOP utilisation: achieved model FLOP/s over the peak (TFLOP/s); None without
    a peak."""
    return None if peak is None else images_per_s * flops_per_image / (peak * 1e12)
