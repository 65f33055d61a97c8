"""The LightningModule: the net (registered or a dotted path), SGD + cosine, metrics, a fixed mask.

With a mask, sparse training keeps every pruned weight exactly 0.0: the weights are zeroed
when fit starts, a hook zeroes their gradients as soon as they are accumulated, and a hook
after every optimizer step re-masks the weights (momentum and weight decay cannot revive
them). The mask is one bool tensor per pruned parameter; while fitting, each is held once
more as 0.0/1.0 in the parameter's dtype, since multiplying by a bool tensor converts it at
every call (on a CPU ~50x the multiply itself); the products are the same.

Per-step Python work is kept to the forward, the loss and a few in-place sums
(``EpochSums``: each split's loss and accuracy, logged once per epoch; top-5 accuracy on
the test split of a dataset with ``TOP5_MIN_CLASSES`` classes or more); the training loss
per step is logged only at the steps the loggers write (``trainer.log_every_n_steps``). A
Lightning ``log`` call per step costs more than a small net's whole step. A test pass keeps
its softmax outputs where ``kept_outputs`` is set (``training/outputs.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_lth.errors import LTHError
from lightning_lth.io import load_tensors
from lightning_lth.models import build_model
from lightning_lth.sparsity.mask import Mask
from lightning_lth.training.cuda_graphs import GraphedStep
from lightning_lth.training.epoch_sums import TOP5_MIN_CLASSES, EpochSums
from lightning_lth.training.lean import LeanModule
from lightning_lth.training.outputs import KeptOutputs

SCHEDULES = ("cosine", "constant")
GRAPH_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
_told_no_cuda: set[str] = set()  # devices the CUDA-graph fallback was reported for


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


SPLITS = ("train", "val", "test")


def _grad_masker(keep: torch.Tensor):
    """A post-accumulate-grad hook: the parameter's gradient times ``keep``, in place."""
    def mask_grad(param: torch.Tensor) -> None:
        param.grad.mul_(keep)
    return mask_grad


def float_mask_pairs(pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, its bool mask as 0.0/1.0 in the parameter's dtype and device): an in-place
    float multiply, not a bool one converted at every call."""
    return [(param, keep.to(param.device, param.dtype)) for param, keep in pairs]


@torch.no_grad()
def remask(pairs) -> None:
    """Every parameter times its 0.0/1.0 mask, in place, in one foreach call."""
    if pairs:
        torch._foreach_mul_([param for param, _ in pairs], [keep for _, keep in pairs])


def hold_masks(pairs, optimizers) -> list:
    """Keep the pruned weights of ``pairs`` (from ``float_mask_pairs``) at exactly 0.0 while
    fitting: re-mask now, mask each gradient once accumulated (before DDP reduces or clipping
    reads it), re-mask after every optimizer step. Returns the hook handles to remove."""
    remask(pairs)
    handles = [param.register_post_accumulate_grad_hook(_grad_masker(keep))
               for param, keep in pairs]
    handles += [optimizer.register_step_post_hook(lambda *_: remask(pairs))
                for optimizer in optimizers]
    return handles


class GraphedTraining:
    """``model.cuda_graphs`` for a LightningModule whose ``hparams`` hold it: what one net
    (``LTHModule``) and a fused group of nets (``training/fused.py``) share. On a CUDA device
    the training step is a ``GraphedStep`` that takes the optimizer step itself (manual
    optimisation); elsewhere it says so once and every step runs eagerly."""

    _graphed: GraphedStep | None = None
    _graphs_decided: tuple | None = None  # (trainer, its _graphs_on answer)

    @property
    def automatic_optimization(self) -> bool:
        """False for a CUDA-graphed fit: the graph takes the optimizer step itself. Lightning
        reads it ~7 times a step: decided once per trainer."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return not self._graphs_on()
        if self._graphs_decided is None or self._graphs_decided[0] is not trainer:
            self._graphs_decided = (trainer, self._graphs_on())
        return not self._graphs_decided[1]

    def __getstate__(self) -> dict:
        """Pickled or copied without its trainer, as Lightning drops ``_trainer``."""
        return {**super().__getstate__(), "_graphs_decided": None}

    def _graphs_on(self) -> bool:
        """``model.cuda_graphs`` on a CUDA device (elsewhere the step runs eagerly)."""
        trainer = getattr(self, "_trainer", None)
        if not self.hparams.get("cuda_graphs") or trainer is None or \
                trainer.strategy.root_device.type != "cuda":
            return False
        if trainer.gradient_clip_val or trainer.accumulate_grad_batches != 1:
            raise LTHError(f"model.cuda_graphs captures a plain step: trainer.gradient_clip_val="
                           f"{trainer.gradient_clip_val} and trainer.accumulate_grad_batches="
                           f"{trainer.accumulate_grad_batches} are not allowed with it (allowed: "
                           f"null/0 and 1)")
        if trainer.world_size != 1:
            raise LTHError(f"model.cuda_graphs runs on one device, not under DDP ("
                           f"{trainer.world_size} ranks); set model.cuda_graphs=false")
        if trainer.precision not in GRAPH_PRECISIONS:
            raise LTHError(f"model.cuda_graphs does not capture trainer.precision="
                           f"{trainer.precision} (its loss scaler steps on the CPU); allowed: "
                           f"{', '.join(GRAPH_PRECISIONS)}")
        return True

    def _say_if_eager(self) -> None:
        """At fit start: once per device type, that ``model.cuda_graphs`` runs eagerly here."""
        device = self.trainer.strategy.root_device
        if self.hparams.get("cuda_graphs") and not self._graphs_on() and \
                device.type not in _told_no_cuda:
            _told_no_cuda.add(device.type)
            rank_zero_warn(f"model.cuda_graphs: training on {device.type}, not CUDA: every "
                           f"step runs eagerly (same numbers)")

    def _start_graph(self, loss_fn, replayed=None) -> None:
        """At train start, after a resume has restored the optimizer (the graph must see its
        final state): the ``GraphedStep`` of ``loss_fn`` (see there), where graphs are on."""
        if not self._graphs_on():
            return
        optimizer, device = self.trainer.optimizers[0], self.trainer.strategy.root_device
        for group in optimizer.param_groups:  # a restored learning rate may be a float/on CPU
            if not (torch.is_tensor(group["lr"]) and group["lr"].device == device):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self._graphed = GraphedStep(loss_fn, optimizer, device, replayed)

    def _graphed_step(self, batch, batch_idx) -> torch.Tensor:
        """One training step through the graph, with the bookkeeping Lightning's automatic
        optimisation would do; the batch's loss."""
        optimizer = self.optimizers()
        optimizer._on_before_step()  # Lightning's step count (global_step), as its step() does
        loss = self._graphed(*batch)
        optimizer._on_after_step()
        scheduler = self.lr_schedulers()
        if scheduler is not None and batch_idx + 1 == self.trainer.num_training_batches:
            scheduler.step()  # where Lightning steps an epoch schedule: before the epoch's checkpoint
        return loss


class LTHModule(GraphedTraining, LeanModule):
    def __init__(self, arch: str = "resnet20", width: int = 1, num_classes: int = 10,
                 in_channels: int = 3, image_size: int = 32, arch_kwargs: dict | None = None,
                 lr: float = 0.08, momentum: float = 0.9, weight_decay: float = 5e-4,
                 schedule: str = "cosine", init_weights: str | None = None,
                 mask: str | None = None, channels_last: bool = False, compile: bool = False,
                 schedule_epochs: int | None = None, cuda_graphs: bool = False):
        super().__init__()
        self.save_hyperparameters()
        if schedule not in SCHEDULES:
            raise LTHError(f"unknown model.schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if not lr > 0:  # NaN too
            raise LTHError(f"model.lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise LTHError(f"model.momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise LTHError(f"model.weight_decay must be >= 0, got {weight_decay}")
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
        # each split's epoch loss and accuracy; they move with the module
        # (keyed <split>_sums: a ModuleDict key may not be a Module attribute such as train)
        self.epoch_sums = nn.ModuleDict({f"{split}_sums": EpochSums(
            top5=split == "test" and num_classes >= TOP5_MIN_CLASSES) for split in SPLITS})
        self.kept_outputs: KeptOutputs | None = None  # a study sets it before a test pass
        self._hooks: list = []
        self._graphed: GraphedStep | None = None

    def forward(self, x):
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    # -- the fixed mask -------------------------------------------------------------------
    def _mask_pairs(self):
        """(parameter, its mask as 0.0/1.0 in the parameter's dtype and device)."""
        params = dict(self.net.named_parameters())
        return float_mask_pairs((params[name], keep) for name, keep in self.mask.tensors.items())

    def on_fit_start(self) -> None:
        for handle in self._hooks:  # left by a fit that raised: it never reached on_fit_end
            handle.remove()
        self._hooks.clear()
        self._say_if_eager()
        if self.mask is None:
            return
        self.mask.check_fits(self.net, self.hparams.arch, self.hparams.width)
        pairs = self._mask_pairs()
        self._hooks += hold_masks(pairs, self.trainer.optimizers)
        sparsity = {"sparsity/global": self.mask.sparsity()}
        sparsity.update({f"sparsity/{name}": value
                         for name, value in self.mask.layer_sparsity().items()})
        rank_zero_info(f"fixed mask: global sparsity {sparsity['sparsity/global']:.4f} over "
                       f"{len(pairs)} tensors")
        for logger in self.loggers:
            logger.log_metrics(sparsity, step=0)

    def on_train_start(self) -> None:
        self._start_graph(self._train_loss, self.epoch_sums["train_sums"].replayed)

    def on_fit_end(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._graphed = None

    # -- steps ----------------------------------------------------------------------------
    def _step(self, batch, split: str):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.epoch_sums[f"{split}_sums"].update(logits, labels, loss)
        if split == "test" and self.kept_outputs is not None:
            self.kept_outputs.add(logits, labels)
        if split == "train":
            self._log_step_loss(loss)
        return loss

    def _log_step_loss(self, loss: torch.Tensor) -> None:
        """``train/loss_step`` at the steps the loggers write (Lightning's own test of
        ``log_every_n_steps``); in the progress bar only where a bar is shown: once logged, a
        bar value is read to the host at every later step of the epoch (a GPU sync a step)."""
        if self.trainer._logger_connector.should_update_logs:
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False,
                     prog_bar=self.trainer.progress_bar_callback is not None)

    def _train_loss(self, images, labels) -> torch.Tensor:
        """The graphed step's forward: the batch's loss, added to the epoch's sums."""
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.epoch_sums["train_sums"].update(logits, labels, loss)
        return loss

    def _log_epoch(self, split: str) -> None:
        """The split's epoch values over every rank's images, then its sums zeroed for the
        next epoch; a split that saw no batch logs nothing."""
        sums = self.epoch_sums[f"{split}_sums"]
        # under DDP every rank takes part in the reduction, also one that saw no batch
        if not sums.update_called and self.trainer.world_size == 1:
            return
        values = sums.compute()
        sums.reset()
        if values is None:
            return
        # train/loss also has a per-step column (train/loss_step)
        names = {"loss": "loss_epoch"} if split == "train" else {}
        for name, value in values.items():
            # batch_size=1: each value is logged once, so Lightning's epoch mean is the value.
            self.log(f"{split}/{names.get(name, name)}", value, on_step=False, on_epoch=True,
                     prog_bar=True, batch_size=1)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        if self.kept_outputs is not None:
            self.kept_outputs.gather(self)

    def on_train_epoch_start(self) -> None:
        # Once per epoch, not per step: per-step Python work is what slows a fast GPU.
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if self.mask is not None:
            self.log("sparsity", self.mask.sparsity(), prog_bar=True)

    def training_step(self, batch, batch_idx):
        if self._graphed is None:
            return self._step(batch, "train")
        self._log_step_loss(self._graphed_step(batch, batch_idx).clone())
        return None

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        if not self.automatic_optimization:  # a CUDA graph: it reads the lr from the device
            optimizer = torch.optim.SGD(
                self.parameters(), lr=torch.tensor(float(hp.lr), device=self.device),
                momentum=hp.momentum, weight_decay=hp.weight_decay, fused=True)
        else:
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
