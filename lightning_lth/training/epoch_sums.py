"""A split's epoch loss and accuracy from running sums on the device, as a torchmetrics
``Metric`` (its states are summed over the ranks under DDP when ``compute`` runs).

Per batch, a few in-place tensor operations and nothing that a CUDA graph cannot capture;
per epoch, one reduction over the ranks and one read. The ``MeanMetric`` and
``MulticlassAccuracy`` updates it replaces cost about 1 ms of Python a training step on a
CPU (docs/performance.md, "Where the time goes").

The values are those ``MeanMetric`` and micro ``MulticlassAccuracy`` gave, to the bit: the
loss sum is float32 and adds the batch mean once per image, as a contiguous tensor
(``MeanMetric`` sums ``value * ones``; a sum over the expanded tensor rounds differently),
and the quotients are those of float32 division (see ``compute``).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class EpochSums(Metric):
    """(sum of per-image losses, correct predictions, images) since the last ``reset``."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("loss", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(2, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """One batch: ``loss`` is its mean loss per image (only tensor operations, in place)."""
        with torch.no_grad():
            images = labels.numel()
            self.loss += loss.detach().float().expand(images).contiguous().sum()
            correct = (logits.detach().argmax(1) == labels).sum()
            self.counts += torch.stack((correct, torch.full_like(correct, images)))

    def replayed(self) -> None:
        """A CUDA graph replay ran ``update``'s kernels without its Python: count it."""
        self._update_count += 1

    def compute(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean loss per image, accuracy) as float32 tensors, or None where no rank saw an
        image. The quotients are float64 divisions rounded to float32: the same as float32's
        own division wherever the counts are exact in float32 (below 2**24 images; a float64
        quotient rounded once more to float32 is correctly rounded, 53 >= 2 * 24 + 2 bits),
        and exact counts beyond."""
        loss, correct, images = torch.cat((self.loss.double().view(1),
                                           self.counts.double())).tolist()
        if not images:
            return None
        return (torch.tensor(loss / images, dtype=torch.float32),
                torch.tensor(correct / images, dtype=torch.float32))

    def reset(self) -> None:
        """Zero the sums in place: a CUDA graph holds these very tensors (torchmetrics' own
        reset would replace them)."""
        states = {name: getattr(self, name) for name in self._defaults}
        super().reset()
        for name, tensor in states.items():
            setattr(self, name, tensor.zero_())
