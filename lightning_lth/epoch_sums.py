"""A split's epoch loss and accuracy from running sums on the device.

Per batch, a few in-place tensor operations and nothing that a CUDA graph cannot capture;
per epoch, one reduction over the ranks and one read. The torchmetrics objects they replace
cost about 1 ms of Python a training step on a CPU (README, "Per-step overhead").

The values are those torchmetrics' ``MeanMetric`` and micro ``MulticlassAccuracy`` gave, to
the bit: the loss sum is float32 and adds the batch mean once per image, as a contiguous
tensor (``MeanMetric`` sums ``value * ones``; a sum over the expanded tensor rounds
differently), and the quotients are those of float32 division (see ``take``).
"""

from __future__ import annotations

import torch


class EpochSums:
    """(sum of per-image losses, correct predictions, images) since the last ``take``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, images

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """One batch: ``loss`` is its mean loss per image (only tensor operations, in place)."""
        with torch.no_grad():
            images = labels.numel()
            self.loss += loss.detach().float().expand(images).contiguous().sum()
            correct = (logits.detach().argmax(1) == labels).sum()
            self.counts += torch.stack((correct, torch.full_like(correct, images)))

    def take(self, strategy) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean loss per image, accuracy) over every rank's images since the last call, as
        float32 tensors, or None where no rank saw an image; then zeroed in place (a CUDA
        graph holds these tensors). A collective under DDP: every rank calls it.

        The quotients are float64 divisions rounded to float32: the same as float32's own
        division wherever the counts are exact in float32 (below 2**24 images; a float64
        quotient rounded once more to float32 is correctly rounded, 53 >= 2 * 24 + 2 bits),
        and exact counts beyond."""
        packed = torch.cat((self.loss.double().view(1), self.counts.double()))
        loss, correct, images = strategy.reduce(packed, reduce_op="sum").tolist()
        self.loss.zero_()
        self.counts.zero_()
        if not images:
            return None
        return (torch.tensor(loss / images, dtype=torch.float32),
                torch.tensor(correct / images, dtype=torch.float32))
