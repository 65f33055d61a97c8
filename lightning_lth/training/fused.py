"""Fused arms: a group of sparse nets of one architecture trained side by side as one model.

Arms that rewind to the same k see the same batches (one data order) and follow the same
schedule (T - k epochs, the same SGD settings), so a group of them can run as one stacked
model that sees each batch once: fewer, larger kernels and one Lightning step for the group.

Mechanism: ``torch.func`` -- the members' parameters and buffers stacked along a new first
dimension (``stack_module_state``), one forward as ``vmap`` of ``functional_call`` over a
stateless copy of the net. Chosen over hand-written grouped convolutions / batched matmuls
because it fuses any ``nn.Module`` the project can build (MLP, ResNet with BatchNorm, VGG, a
user's model) without a per-model rewrite, and its batching rules already lower a vmapped
convolution to a grouped one and a vmapped linear layer to a batched matmul (the measured
costs: docs/fused_and_cuda_graphs.md). One exception: the project's ``MLP`` runs as one
``baddbmm`` per layer on the stacked weights, activations kept members x features x batch so
that each weight is used as it is stored (``_linear_chain``): on a CPU, 12 demo MLPs' forward
and backward ran 0.84-0.91x as fast as the 12 nets one after another under vmap, 1.06-1.18x
this way (bench/bench_fused_matmul.py). BatchNorm buffers are stacked too and updated in place
under ``vmap``, so each member keeps its own running statistics. A model ``vmap``
cannot run (data-dependent control flow, BatchNorm with ``momentum=None``, random layers)
is refused when the group is built, before any training.

Per member the math is the alone run's: the loss is the sum of the members' mean losses, so
each member's gradient is its own loss's; SGD with momentum and weight decay acts element by
element, so one optimizer over the stacked tensors is each member's own optimizer (its
momentum buffer is its slice); the cosine schedule is shared because the members share T - k.
Masks are stacked bool tensors, held as 0.0/1.0 in the weights' dtype while fitting: the
gradients are masked in place once accumulated and the weights re-masked after every
optimizer step, by ``LTHModule``'s own code (``hold_masks``). Only the kernels differ (a batched matmul
instead of a matmul), so members equal their alone runs to float tolerance, not bit for bit.

Mixed precision (bf16-mixed) computes what autocast computes for a net alone, where vmap's
rules would not: they run above autocast, so on a CPU a vmapped convolution (and a linear
layer on a batched input) reached kernels autocast does not cast and stayed float32 where the
alone run is bf16, and vmap's BatchNorm rule needs one dtype (a bf16 input with float32
statistics fails: "expected scalar type BFloat16 but found Float", on CUDA "Expected
running_mean to have type BFloat16"). So the stateless copy casts a convolution's and a linear
layer's operands to the autocast dtype, and normalises a low-precision input's float32 copy
and rounds the output back -- what the alone run's mixed BatchNorm kernel does (float32
statistics and arithmetic, output in the input's dtype). Parameters, BatchNorm statistics and
optimizer state stay float32; outside autocast nothing changes. ``model.channels_last``: the
members' 4-d weights are channels_last (each net's, stacked as they are: members x out x kh x
kw x in in memory) and so are the images, and vmap's convolution rule keeps the grouped
convolution's activations channels_last (batch x h x w x members * channels).
``model.compile`` compiles the group's vmapped forward as one function; ``model.cuda_graphs``
makes the group's step one ``GraphedStep``, as one net's (``module.GraphedTraining``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from lightning_lth.errors import LTHError
from lightning_lth.models.mlp import MLP
from lightning_lth.training.epoch_sums import TOP5_MIN_CLASSES, top5_correct
from lightning_lth.training.lean import LeanModule
from lightning_lth.training.module import (
    GraphedTraining,
    LTHModule,
    float_mask_pairs,
    hold_masks,
)
from lightning_lth.training.outputs import KeptOutputs

# The hyperparameters members must share to train as one model.
SHARED = ("arch", "width", "num_classes", "in_channels", "image_size", "arch_kwargs", "lr",
          "momentum", "weight_decay", "schedule", "schedule_epochs", "channels_last",
          "cuda_graphs", "compile")
SPLITS = ("train", "val", "test")
# The precisions a fused group trains in (it honours every model.* switch).
FUSED_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def unfusable(precision, gradient_clip_val=None, gradient_clip_algorithm=None) -> list[str]:
    """The trainer settings a fused group refuses (it honours every ``model.*`` switch):
    ``trainer.precision`` other than float32/64 and bf16-mixed (16-mixed and the half
    *-true ones are not checked against alone runs, and 16-mixed's loss scaler steps on the
    CPU), and gradient clipping by norm (Lightning's default algorithm): the norm would be
    the whole group's, not each member's own. Clipping by value acts element by element."""
    refused = [] if str(precision) in FUSED_PRECISIONS else [f"trainer.precision={precision}"]
    algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)
                    or "norm").lower()  # Lightning's enum, or the config's string
    if gradient_clip_val and algorithm == "norm":
        refused.append(f"trainer.gradient_clip_val={gradient_clip_val} with "
                       f"gradient_clip_algorithm=norm")
    return refused


def _linear_chain(net: nn.Module) -> list[tuple[str, str]] | None:
    """For the project's ``MLP`` (that class exactly: a subclass may change its forward), its
    linear layers' (weight, bias) names in order: flatten, then linear layers with biases and
    a ReLU between each two. None for any other net (the group runs it under vmap)."""
    if type(net) is not MLP:
        return None
    names = [f"layers.{index}" for index in range(len(net.layers))] + ["classifier"]
    layers = [*net.layers, net.classifier]
    if not (all(isinstance(layer, nn.Linear) and layer.bias is not None
                for layer in layers[0::2])
            and all(isinstance(layer, nn.ReLU) for layer in layers[1::2])
            and len(layers) % 2 == 1):
        return None
    return [(f"{name}.weight", f"{name}.bias") for name in names[0::2]]


def _slot(name: str) -> str:
    """A dotted parameter name as a registrable attribute name."""
    return name.replace(".", ":")


def _as_autocast_would(template: nn.Module) -> None:
    """Under autocast, the stateless copy's convolutions, linear layers and BatchNorms compute
    what autocast computes for one net (see the module's docstring); outside autocast each
    runs its own forward."""
    for module in template.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and hasattr(module, "_conv_forward"):
            module._conv_forward = _autocast_conv(module._conv_forward)
        elif isinstance(module, nn.Linear):
            module.forward = _autocast_linear(module)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = _in_float32(module.forward)


def _autocast_dtype(images: torch.Tensor) -> torch.dtype | None:
    kind = images.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _cast(dtype: torch.dtype, *tensors):
    """Autocast's own cast: each floating tensor but a float64 one to ``dtype``."""
    return tuple(t.to(dtype) if t is not None and t.dtype in (torch.float32, *LOW_PRECISION)
                 else t for t in tensors)


def _autocast_conv(conv_forward):
    def forward(images, weight, bias):
        dtype = _autocast_dtype(images)
        if dtype is not None:
            images, weight, bias = _cast(dtype, images, weight, bias)
        return conv_forward(images, weight, bias)
    return forward


def _autocast_linear(linear: nn.Linear):
    own = linear.forward

    def forward(images):
        dtype = _autocast_dtype(images)
        if dtype is None:
            return own(images)
        return F.linear(*_cast(dtype, images, linear.weight, linear.bias))
    return forward


def _in_float32(forward):
    def run(images):
        if images.dtype in LOW_PRECISION:
            return forward(images.float()).to(images.dtype)
        return forward(images)
    return run


class FusedArms(GraphedTraining, LeanModule):
    """``len(members)`` nets as one stacked model; ``members`` are ready ``LTHModule``s (their
    snapshot's weights loaded, their mask set). ``member_state(i)`` gives member i's net's
    state dict; ``metrics(split)`` each member's accuracy and mean loss over the split (and
    test top-5 accuracy, as ``LTHModule`` logs it); ``kept_outputs``, where set, each
    member's test outputs (probabilities members x images x classes)."""

    def __init__(self, members: Sequence[LTHModule], example: torch.Tensor):
        super().__init__()
        if len(members) < 2:
            raise LTHError(f"a fused group needs at least 2 members, got {len(members)}")
        first = members[0].hparams
        for member in members[1:]:
            differ = [name for name in SHARED if member.hparams.get(name) != first.get(name)]
            if differ:
                raise LTHError(f"arms differ in {', '.join(differ)}: they cannot train as one "
                               f"fused group")
        masks = [member.mask for member in members]
        if any(mask is None for mask in masks) or len({tuple(sorted(m.tensors)) for m in masks}) > 1:
            raise LTHError("fused arms need one mask each, over the same parameters")
        self.hparams.update({name: first.get(name) for name in SHARED})
        self.size = len(members)
        # The stateless copy functional_call runs (meta: no memory); not a submodule, so it
        # is neither in the state dict nor moved between devices.
        object.__setattr__(self, "_template", copy.deepcopy(members[0].net).to("meta"))
        self._template._compiled_call_impl = None  # model.compile: the group compiles its own
        _as_autocast_would(self._template)
        params, buffers = stack_module_state([member.net for member in members])
        self.names = list(params)
        self.buffer_names = list(buffers)
        self.stacked = nn.Module()
        for name, value in params.items():
            self.stacked.register_parameter(_slot(name), nn.Parameter(value.detach().clone()))
        for name, value in buffers.items():
            self.stacked.register_buffer(_slot(name), value.clone())
        self.mask_names = sorted(masks[0].tensors)
        self.masks = nn.Module()  # fixed inputs, not state: rebuilt from the files on resume
        for name in self.mask_names:
            self.masks.register_buffer(_slot(name), torch.stack([m.tensors[name] for m in masks]),
                                       persistent=False)
        self.member_masks = masks
        # per member: correct, loss sum, images, top-5 correct (test only, >= 100 classes)
        self._sums = {split: torch.zeros(self.size, 4, dtype=torch.float64) for split in SPLITS}
        self._top5 = first.get("num_classes") >= TOP5_MIN_CLASSES
        self.kept_outputs: KeptOutputs | None = None
        self._hooks: list = []
        self._check_fusable(example)
        # the group's forward; model.compile compiles it as one (vmap and all)
        self._chain = _linear_chain(members[0].net)
        grouped = self._chained if self._chain else vmap(self._member, in_dims=(0, 0, None))
        object.__setattr__(self, "_grouped",
                           torch.compile(grouped) if self.hparams.compile else grouped)

    # -- the stacked model ----------------------------------------------------------------
    def _stacked_params(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self.stacked, _slot(name)) for name in self.names}

    def _stacked_buffers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self.stacked, _slot(name)) for name in self.buffer_names}

    def _member(self, params, buffers, images):
        return functional_call(self._template, (params, buffers), (images,))

    def _chained(self, params, buffers, images):
        """A linear net's group (``_linear_chain``): per layer one ``baddbmm`` of the stacked
        weights (members x out x in, as stored) with the activations, members x features x
        batch; ReLU between layers. Under autocast baddbmm runs in its dtype, as each alone
        run's linear layer does. Logits: members x batch x classes (a transposed view)."""
        hidden = images.flatten(1).t().expand(self.size, -1, -1)
        for index, (weight, bias) in enumerate(self._chain):
            hidden = torch.baddbmm(params[bias].unsqueeze(2), params[weight], hidden)
            if index < len(self._chain) - 1:
                hidden = torch.relu(hidden)
        return hidden.transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Every member's logits for one batch: members x batch x classes."""
        if self._template.training != self.training:  # BatchNorm's mode, as this module's:
            self._template.train(self.training)  # Lightning sets .training, not train()
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._grouped(self._stacked_params(), self._stacked_buffers(), images)

    def _check_fusable(self, example: torch.Tensor) -> None:
        """One forward and backward on the example batch with copies of the buffers."""
        params = {name: value.detach().clone().requires_grad_()
                  for name, value in self._stacked_params().items()}
        buffers = {name: value.clone() for name, value in self._stacked_buffers().items()}
        images = torch.cat([example, example])  # BatchNorm needs more than one image
        try:
            self._template.train()
            logits = vmap(self._member, in_dims=(0, 0, None))(params, buffers, images)
            logits.sum().backward()
        except Exception as error:  # whatever vmap refuses: name it, and the way out
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise LTHError(f"model {self.hparams.arch!r} cannot be fused with torch.func.vmap "
                           f"({type(error).__name__}: {first[:200]}); set study.fuse=1") from None
        if logits.shape[:2] != (self.size, len(images)):
            raise LTHError(f"model {self.hparams.arch!r} cannot be fused: vmap gave logits of "
                           f"shape {tuple(logits.shape)}; set study.fuse=1")

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s net as a state dict (the keys of ``net.state_dict()``), on CPU."""
        state = {name: getattr(self.stacked, _slot(name))[index].detach().cpu().clone()
                 for name in self.names + self.buffer_names}
        return {name: state[name] for name in self._template.state_dict()}

    # -- the fixed masks ------------------------------------------------------------------
    def _mask_pairs(self):
        """(stacked parameter, its stacked mask as 0.0/1.0 in the parameter's dtype)."""
        return float_mask_pairs((getattr(self.stacked, _slot(name)),
                                 getattr(self.masks, _slot(name))) for name in self.mask_names)

    def on_fit_start(self) -> None:
        for handle in self._hooks:  # left by a fit that raised
            handle.remove()
        self._hooks.clear()
        self._say_if_eager()
        self._hooks += hold_masks(self._mask_pairs(), self.trainer.optimizers)

    def on_train_start(self) -> None:
        self._start_graph(lambda images, labels: self._step((images, labels), "train"))

    def on_fit_end(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._graphed = None

    # -- steps and per-member metrics -------------------------------------------------------
    def _step(self, batch, split: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)  # members x batch x classes
        losses = F.cross_entropy(logits.transpose(1, 2), labels.expand(self.size, -1),
                                 reduction="none").mean(dim=1)
        with torch.no_grad():
            correct = (logits.argmax(dim=2) == labels).sum(dim=1)
            count = torch.full_like(losses, len(labels))
            top5 = (top5_correct(logits, labels).sum(dim=1) if split == "test" and self._top5
                    else torch.zeros_like(correct))
            step = torch.stack([correct.to(losses.dtype), losses * len(labels), count,
                                top5.to(losses.dtype)], dim=1)
            sums = self._sums[split]
            if sums.device != step.device:
                sums = self._sums[split] = sums.to(step.device)
            sums.add_(step)
            if split == "test" and self.kept_outputs is not None:
                self.kept_outputs.add(logits, labels)
        return losses.sum()  # each member's gradient is its own mean loss's

    def _reset(self, split: str) -> None:
        """Zero the split's sums, in place where they are on the device: a CUDA graph holds
        the training sums."""
        sums = self._sums[split]
        if sums.device == self.device:
            sums.zero_()
        else:
            self._sums[split] = torch.zeros(self.size, 4, dtype=torch.float64,
                                            device=self.device)

    def metrics(self, split: str) -> list[dict[str, float]]:
        """Each member's ``<split>/acc`` and ``<split>/loss`` (mean per image) so far, and
        ``test/acc_top5`` for a dataset of ``TOP5_MIN_CLASSES`` classes or more."""
        sums = self._sums[split].cpu()
        top5 = split == "test" and self._top5
        return [{f"{split}/acc": float(correct / count), f"{split}/loss": float(loss / count),
                 **({f"{split}/acc_top5": float(hits / count)} if top5 else {})}
                for correct, loss, count, hits in sums.tolist()] if sums[0, 2] > 0 else \
            [{} for _ in range(self.size)]

    def on_train_epoch_start(self) -> None:
        self._reset("train")

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def on_test_epoch_end(self) -> None:
        if self.kept_outputs is not None:
            self.kept_outputs.gather(self)

    def training_step(self, batch, batch_idx):
        if self._graphed is None:
            return self._step(batch, "train")
        self._graphed_step(batch, batch_idx)
        return None

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        """``LTHModule``'s optimizer and schedule, over the stacked tensors."""
        return LTHModule.configure_optimizers(self)

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise LTHError("fused arms train in one process; set study.fuse=1 under DDP")
        trainer = self.trainer
        refused = unfusable(trainer.precision, trainer.gradient_clip_val,
                            trainer.gradient_clip_algorithm)
        if refused:
            raise LTHError(f"fused arms do not support {' and '.join(refused)} (allowed: "
                           f"trainer.precision in {', '.join(FUSED_PRECISIONS)}, gradient "
                           f"clipping by value only); set study.fuse=1")


class MemberLogs(L.Callback):
    """Each member's epoch metrics into its own loggers (the CSV an arm trained alone writes:
    ``lr``, ``sparsity``, ``train/*`` and ``val/*`` per epoch). Put it before ``ResumePoints``:
    an epoch's rows are written before its resume checkpoint."""

    def __init__(self, loggers: Sequence[Logger]):
        self.loggers = list(loggers)

    def on_train_start(self, trainer, pl_module):
        self.on_train_epoch_start(trainer, pl_module)  # a fit resumed mid-epoch skips that hook
        if trainer.ckpt_path is None:
            for logger, mask in zip(self.loggers, pl_module.member_masks, strict=True):
                logger.log_metrics({"sparsity/global": mask.sparsity(), **{
                    f"sparsity/{name}": value for name, value in mask.layer_sparsity().items()}},
                    step=0)

    def on_train_epoch_start(self, trainer, pl_module):
        # the epoch's, as LTHModule logs (a device tensor in a CUDA-graphed fit)
        self.lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        rows = zip(pl_module.metrics("train"), pl_module.metrics("val"), pl_module.member_masks,
                   strict=True)
        for logger, (train, val, mask) in zip(self.loggers, rows, strict=True):
            train = {name.replace("train/loss", "train/loss_epoch"): value  # LTHModule's names
                     for name, value in train.items()}
            logger.log_metrics({"epoch": trainer.current_epoch, "lr": self.lr,
                                "sparsity": mask.sparsity(), **train, **val},
                               step=trainer.global_step - 1)
            logger.save()
