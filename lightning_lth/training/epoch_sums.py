"""A split's epoch loss and accuracy (and top-5 accuracy, for datasets of 100 classes or
more) from running sums on the device, as a torchmetrics ``Metric`` (its states are summed
over the ranks under DDP when ``compute`` runs).

Per batch, a few in-place tensor operations and nothing that a CUDA graph cannot capture;
per epoch, one reduction over the ranks and one read. The ``MeanMetric`` and
``MulticlassAccuracy`` updates it replaces cost about 1 ms of Python a training step on a
CPU (docs/performance.md, "Where the time goes").

The values are those ``MeanMetric`` and micro ``MulticlassAccuracy`` gave, to the bit: the
loss sum is float32 and adds the batch mean once per image, as a contiguous tensor
(``MeanMetric`` sums ``value * ones``; a sum over the expanded tensor rounds differently),
and the quotients are those of float32 division (see ``compute``). Top-5 is a third count:
a sum of exact integers like the others, so its DDP reduction is exact too.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

# Top-5 accuracy is recorded for datasets with at least this many classes (CIFAR-100,
# ImageNet), as the published paper reports it; below, top-5 of 10 classes says little.
TOP5_MIN_CLASSES = 100


def top5_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each image's label is among its 5 largest logits (``logits``: ... x images x
    classes, ``labels``: images). The top-1 hit (argmax) counts too, so top-5 >= top-1 even
    where more than 5 logits tie."""
    top1 = logits.argmax(-1) == labels
    return top1 | (logits.topk(5, dim=-1).indices == labels.unsqueeze(-1)).any(-1)


class EpochSums(Metric):
    """(sum of per-image losses, correct predictions[, top-5 correct], images) since the last
    ``reset``; ``top5``: count top-5 hits too."""

    full_state_update = False

    def __init__(self, top5: bool = False):
        super().__init__()
        self.top5 = top5
        self.add_state("loss", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("hits", torch.zeros(2 if top5 else 1, dtype=torch.int64),
                       dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """One batch: ``loss`` is its mean loss per image. Only in-place tensor operations, as
        few as give these sums: each adds several microseconds of Python to every step
        (torchmetrics runs ``update`` without autograd, so nothing is detached). ``add_``,
        not ``+=``: the latter also assigns the attribute, through ``nn.Module.__setattr__``
        (~4 us a time)."""
        images = labels.numel()
        if loss.dtype != torch.float32:
            loss = loss.float()
        self.loss.add_(loss.expand(images).contiguous().sum())
        top1 = (logits.argmax(1) == labels).sum()
        self.hits.add_(torch.stack((top1, top5_correct(logits, labels).sum())) if self.top5
                       else top1)
        self.images.add_(images)

    def replayed(self) -> None:
        """A CUDA graph replay ran ``update``'s kernels without its Python: count it."""
        self._update_count += 1

    def compute(self) -> dict[str, torch.Tensor] | None:
        """{"acc": accuracy, "loss": mean loss per image[, "acc_top5"]} as float32 tensors,
        or None where no rank saw an image. The quotients are float64 divisions rounded to
        float32: the same as float32's own division wherever the counts are exact in float32
        (below 2**24 images; a float64 quotient rounded once more to float32 is correctly
        rounded, 53 >= 2 * 24 + 2 bits), and exact counts beyond."""
        loss, *hits, images = torch.cat((self.loss.double().view(1), self.hits.double(),
                                         self.images.double().view(1))).tolist()
        if not images:
            return None
        values = {"acc": hits[0], "loss": loss, **({"acc_top5": hits[1]} if self.top5 else {})}
        return {name: torch.tensor(value / images, dtype=torch.float32)
                for name, value in values.items()}

    def reset(self) -> None:
        """Zero the sums in place: a CUDA graph holds these very tensors (torchmetrics' own
        reset would replace them)."""
        states = {name: getattr(self, name) for name in self._defaults}
        super().reset()
        for name, tensor in states.items():
            setattr(self, name, tensor.zero_())
