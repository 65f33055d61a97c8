"""The LightningModule: the net (registered or a dotted path), SGD + cosine, metrics, a fixed mask.

With a mask, sparse training keeps every pruned weight exactly 0.0: the weights are zeroed
when fit starts, a gradient hook zeroes their gradients, and a hook after every optimizer
step re-masks the weights (momentum and weight decay cannot revive them). The mask is one
bool tensor per pruned parameter; no second copy of the weights is kept.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_lth.errors import LTHError
from lightning_lth.io import load_tensors
from lightning_lth.models import build_model
from lightning_lth.sparsity.mask import Mask

SCHEDULES = ("cosine", "constant")


def load_snapshot(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a rewind snapshot or final-weights file."""
    data = load_tensors(path, what="snapshot")
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise LTHError(f"snapshot {path} holds no 'state_dict'; expected a file written by "
                       f"lightning_lth (rewind/epoch_<k>.pt or final.pt)")
    return data["state_dict"]


def load_weights(net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise LTHError(f"weights in {source} do not fit the model: {first[0].strip()}") from None


def _split_metrics(num_classes: int) -> nn.ModuleDict:
    """``<split>_acc`` and ``<split>_loss`` (the mean loss per image) for train, val and test:
    metric objects, so under DDP their epoch values combine every rank's images exactly."""
    return nn.ModuleDict({f"{split}_{name}": metric for split in ("train", "val", "test")
                          for name, metric in (
                              ("acc", MulticlassAccuracy(num_classes, average="micro")),
                              ("loss", MeanMetric(nan_strategy="disable")))})


class LTHModule(L.LightningModule):
    def __init__(self, arch: str = "resnet20", width: int = 1, num_classes: int = 10,
                 in_channels: int = 3, image_size: int = 32, arch_kwargs: dict | None = None,
                 lr: float = 0.08, momentum: float = 0.9, weight_decay: float = 5e-4,
                 schedule: str = "cosine", init_weights: str | None = None,
                 mask: str | None = None, channels_last: bool = False, compile: bool = False,
                 schedule_epochs: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        if schedule not in SCHEDULES:
            raise LTHError(f"unknown model.schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if lr <= 0:
            raise LTHError(f"model.lr must be > 0, got {lr}")
        if schedule_epochs is not None and (isinstance(schedule_epochs, bool)
                                            or not isinstance(schedule_epochs, int)
                                            or schedule_epochs < 1):
            raise LTHError(f"model.schedule_epochs must be an integer >= 1 or null, got "
                           f"{schedule_epochs!r}")
        self.net = build_model(arch, width, num_classes, in_channels, image_size, arch_kwargs)
        if init_weights:
            load_weights(self.net, load_snapshot(init_weights), init_weights)
        self.mask = Mask.load(mask) if mask else None
        if self.mask is not None:
            self.mask.check_fits(self.net, arch, width)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()
        self.metrics = _split_metrics(num_classes)
        self._hooks: list = []

    def forward(self, x):
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    # -- the fixed mask -------------------------------------------------------------------
    def _mask_pairs(self):
        params = dict(self.net.named_parameters())
        return [(params[name], keep.to(params[name].device)) for name, keep in
                self.mask.tensors.items()]

    def on_fit_start(self) -> None:
        for handle in self._hooks:  # left by a fit that raised: it never reached on_fit_end
            handle.remove()
        self._hooks.clear()
        if self.mask is None:
            return
        self.mask.check_fits(self.net, self.hparams.arch, self.hparams.width)
        pairs = self._mask_pairs()
        with torch.no_grad():
            for param, keep in pairs:
                param.mul_(keep)
        for param, keep in pairs:
            self._hooks.append(param.register_hook(lambda grad, keep=keep: grad * keep))
        for optimizer in self.trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(
                lambda *_: self._remask(pairs)))
        sparsity = {"sparsity/global": self.mask.sparsity()}
        sparsity.update({f"sparsity/{name}": value
                         for name, value in self.mask.layer_sparsity().items()})
        rank_zero_info(f"fixed mask: global sparsity {sparsity['sparsity/global']:.4f} over "
                       f"{len(pairs)} tensors")
        for logger in self.loggers:
            logger.log_metrics(sparsity, step=0)

    @staticmethod
    @torch.no_grad()
    def _remask(pairs) -> None:
        for param, keep in pairs:
            param.mul_(keep)

    def on_fit_end(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- steps ----------------------------------------------------------------------------
    def _step(self, batch, split: str):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy, mean_loss = self.metrics[f"{split}_acc"], self.metrics[f"{split}_loss"]
        accuracy.update(logits, labels)
        # The batch mean once per image: weighted by the batch size. A forward call, not
        # update: it also holds this batch's value, which the per-step train log reads.
        mean_loss(loss.detach().expand(len(labels)))
        on_step = split == "train"
        self.log(f"{split}/loss", mean_loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        # Once per epoch, not per step: per-step Python work is what slows a fast GPU.
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if self.mask is not None:
            self.log("sparsity", self.mask.sparsity(), prog_bar=True)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                                    weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return optimizer
        # Cosine to 0 over schedule_epochs (default: this fit's max_epochs), stepped once per
        # epoch. A study sets it explicitly: a net trained only part of the way keeps the
        # schedule of the full run, so its snapshots are the full run's.
        epochs = hp.get("schedule_epochs") or self.trainer.max_epochs
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
