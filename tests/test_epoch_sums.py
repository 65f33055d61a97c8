"""``EpochSums``: the epoch loss and accuracy the module logs, the same to the bit as the
torchmetrics objects they replaced (the study's records and CSVs must not move)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_lth.training.epoch_sums import EpochSums


@pytest.mark.quick
def test_epoch_values_equal_torchmetrics_to_the_bit_then_start_again():
    generator = torch.Generator().manual_seed(0)
    sums = EpochSums()
    mean_loss, accuracy = MeanMetric(nan_strategy="disable"), MulticlassAccuracy(10, average="micro")
    # odd batch sizes: a loss summed over the expanded batch mean rounds differently
    for size in (128, 96, 37, 128, 1, 250) * 20:
        # as in a training step: the logits and the loss carry autograd history
        logits = (torch.randn(size, 10, generator=generator) * 3).requires_grad_()
        labels = torch.randint(0, 10, (size,), generator=generator)
        loss = F.cross_entropy(logits, labels)
        sums.update(logits, labels, loss)
        mean_loss.update(loss.detach().expand(size))
        accuracy.update(logits.detach(), labels)
    values = sums.compute()
    loss, acc = values["loss"], values["acc"]
    assert set(values) == {"acc", "loss"}  # no top-5 unless asked for
    assert not any(state.requires_grad for state in (sums.loss, sums.hits, sums.images))
    kept = sums.loss
    sums.reset()
    assert loss.dtype == acc.dtype == torch.float32
    assert torch.equal(loss, mean_loss.compute()) and torch.equal(acc, accuracy.compute())
    assert sums.loss is kept and float(kept) == 0  # zeroed in place (a CUDA graph holds it)
    assert sums.compute() is None  # an epoch without batches logs nothing


@pytest.mark.quick
def test_top5_equals_torchmetrics_top_k_accuracy():
    generator = torch.Generator().manual_seed(1)
    sums, top5 = EpochSums(top5=True), MulticlassAccuracy(100, top_k=5, average="micro")
    for size in (64, 37, 1):
        logits = torch.randn(size, 100, generator=generator)
        labels = torch.randint(0, 100, (size,), generator=generator)
        sums.update(logits, labels, F.cross_entropy(logits, labels))
        top5.update(logits, labels)
    assert torch.equal(sums.compute()["acc_top5"], top5.compute())
