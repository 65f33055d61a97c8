"""A test pass's output distribution, kept: each image's softmax probabilities (float16) and
its label, in the test set's own order, for the diversity metrics (ensembles, disagreement,
KL / JS), which need every model's outputs on the same images.

Probabilities, not logits: the metrics average and compare distributions, and a softmax
in float16 loses less than logits would (its values are in [0, 1], where float16 holds
about 3 decimal digits). The softmax is taken in float32 and rounded to nearest, except
where the net's top class (the logits' argmax, what its recorded accuracy counts) ties with
another after rounding (near-uniform outputs of a weak net): its probability is rounded up
one float16 step instead, so the argmax of the kept probabilities is the net's prediction.

Collected during the test pass a stage runs anyway (no second pass over the data). Under
DDP each rank evaluates images r, r + N, r + 2N, ... of the test set, each image on exactly
one rank (``data.device_loader``'s evaluation order and ``_ShardSampler``: no padded
repeats); ``gather`` puts the ranks' rows back into the test set's order on every rank.
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_lth.errors import LTHError


def interleave(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The test set's rows from ``rows`` [ranks, m, ...], rank r's row i being image
    r + i * ranks, ``counts[r]`` of them real (the rest pad the ranks to equal length)."""
    ranks, total = len(counts), sum(counts)
    if counts != [len(range(rank, total, ranks)) for rank in range(ranks)]:
        raise LTHError(f"test outputs: ranks hold {counts} images, not the shards r, r + N, "
                       f"... of {total} images the evaluation loaders give")
    return rows.transpose(0, 1).reshape(-1, *rows.shape[2:])[:total]


class KeptOutputs:
    """The probabilities and labels of one test pass. ``images_dim``: the logits' images
    dimension (0 for a net; 1 for a fused group's members x images x classes)."""

    def __init__(self, images_dim: int = 0):
        self.images_dim = images_dim
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.result: dict[str, torch.Tensor] | None = None  # set by ``gather``

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One test batch (kept on its device until ``gather``)."""
        with torch.no_grad():
            logits = logits.detach()
            probs = torch.softmax(logits.float(), dim=-1).half()
            top = logits.argmax(-1, keepdim=True)
            kept = probs.gather(-1, top)
            lost = probs.argmax(-1, keepdim=True) != top  # a tie, broken to another class
            up = torch.nextafter(kept, torch.full_like(kept, float("inf")))
            self.probs.append(probs.scatter_(-1, top, torch.where(lost, up, kept)))
            self.targets.append(labels.detach().to(torch.int64))

    def gather(self, module: L.LightningModule) -> None:
        """Every rank's rows in the test set's order, on the CPU, into ``result``
        (``{"probs": float16 [..., N, C], "targets": int64 [N]}``). Every rank calls it."""
        dim = self.images_dim
        probs, targets = torch.cat(self.probs, dim), torch.cat(self.targets)
        self.probs, self.targets = [], []
        if module.trainer.world_size > 1:
            counts = module.all_gather(torch.tensor(len(targets), device=targets.device))
            counts = [int(count) for count in counts]
            pad = max(counts) - len(targets)  # all_gather needs equal shapes
            probs = torch.cat([probs.movedim(dim, 0), probs.new_zeros(pad, *probs.movedim(
                dim, 0).shape[1:])])
            targets = torch.cat([targets, targets.new_zeros(pad)])
            probs = interleave(module.all_gather(probs), counts).movedim(0, dim)
            targets = interleave(module.all_gather(targets), counts)
        self.result = {"probs": probs.cpu(), "targets": targets.cpu()}
