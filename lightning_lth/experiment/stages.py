"""One class per stage kind: its identity, the stages it reads, its outputs and its compute.

A stage's key (``keys.stage_key``) hashes its kind, its ``identity()``, the config leaves
its kind depends on and the numerics versions of the code its compute runs (its
``components`` row of ``numerics.DEPENDS``); the identity names the keys of whatever it reads,
so a stage's key changes whenever anything upstream does. ``compute(ctx, work, resume)`` writes the outputs
into ``work`` (the store seals them) and continues from the Lightning checkpoint ``resume``
when there is one. ``ctx`` is the runner, seen through ``StageContext``: data, modules,
trainers, the store and W&B.

Each stage class is the one source of truth for its outputs' file names (its upper-case class
attributes, which every reader uses), its line in the plan's table (``what``) and the row
(``plan_row``). The arms are a registry (``ARMS``): an entry carries its label and colour for
the report and the function that makes its mask, so an arm is one entry and one function.

Data order: each training stage draws its batches from its own identity (``order``): dense
nets from their seed, an IMP round from (seed, round, pruned count), an arm from (seed, k),
and an arm of replicate r >= 1 from (seed, k, r). All arms of one replicate that rewind to
the same k therefore share one data order (a paired comparison, distinct from dense A's and
B's), and each replicate's LTH arm, from the same snapshot with the same mask, sees another.

Kept test outputs: a dense net at T, an arm and the IMP round at each of the study's target
sparsities write ``OUTPUTS`` (``training/outputs.py``: each test image's softmax
probabilities in float16, and its label) from the test pass they run anyway, unless
``study.keep_outputs`` is off; ``WEIGHTS`` is the net they are of.
"""

from __future__ import annotations

import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_lth.data import LTHDataModule
from lightning_lth.distributed import DistContext
from lightning_lth.errors import LTHError
from lightning_lth.experiment.config import Study
from lightning_lth.experiment.keys import digest
from lightning_lth.experiment.results import Record
from lightning_lth.experiment.store import CHECKPOINTS, SETTINGS, Store
from lightning_lth.experiment.tracking import Tracking
from lightning_lth.io import load_json, load_tensors, save_json, save_tensors
from lightning_lth.models import example_input
from lightning_lth.report.plots import plot_interpolation
from lightning_lth.sparsity import imp
from lightning_lth.sparsity.imp import PruneSettings
from lightning_lth.sparsity.mask import Mask
from lightning_lth.symmetry.connectivity import compare_naive_matched
from lightning_lth.symmetry.matching import activation_correlations, match, matched_correlation
from lightning_lth.symmetry.spec import apply_permutation
from lightning_lth.symmetry.trace import get_spec, skip_path_convs
from lightning_lth.training.callbacks import ResumePoints, RewindSnapshots, snapshot_name
from lightning_lth.training.fused import FusedArms, MemberLogs
from lightning_lth.training.module import LTHModule
from lightning_lth.training.outputs import KeptOutputs


@runtime_checkable
class StageContext(Protocol):
    """What a stage may ask of the runner that computes it (``runner.Runner`` is one)."""

    config: dict  # the resolved config
    study: Study
    epochs: int  # T, the dense schedule's length
    datamodule: LTHDataModule
    dist: DistContext
    store: Store
    tracking: Tracking

    def module(self, **overrides) -> LTHModule: ...
    def order_seed(self, *identity) -> int: ...
    def trainer(self, stage: Stage, work: Path, max_epochs: int, callbacks=(),
                wandb_config: dict | None = None) -> L.Trainer: ...
    def group_trainer(self, group: ArmGroup, work: Path, max_epochs: int,
                      callbacks=()) -> L.Trainer: ...
    def fit(self, trainer: L.Trainer, module: L.LightningModule, stage: Stage, resume: str | None): ...
    def test(self, trainer: L.Trainer, module: LTHModule, stage: Stage | None = None,
             work: Path | None = None) -> dict: ...
    def keeps_outputs(self, stage: Stage) -> bool: ...
    def save_outputs(self, stage: Stage, work: Path, outputs: dict) -> None: ...
    def device(self) -> torch.device: ...
    def run(self, stage: Stage) -> Path: ...
    def weights(self, ref: WeightsRef) -> Path: ...
    def record(self, arm: ArmStage, result: dict) -> Record: ...


# An arm's mask from IMP's mask (found on A), for the module it trains.
MaskMaker = Callable[[Mask, "ArmStage", StageContext, torch.nn.Module], Mask]


def imp_mask(mask: Mask, arm: ArmStage, ctx: StageContext, net: torch.nn.Module) -> Mask:
    """IMP's mask as it is."""
    return mask


def permuted_mask(mask: Mask, arm: ArmStage, ctx: StageContext, net: torch.nn.Module) -> Mask:
    """IMP's mask permuted into B's basin by the arm's match stage's pi."""
    perm = load_perm(ctx.run(arm.matching) / MatchStage.PERM)
    return apply_permutation(mask, get_spec(net, _example(ctx)), perm)


@dataclass(frozen=True)
class ArmSpec:
    """One arm of the comparison: whose rewind snapshot it trains, with which mask, and how
    the report shows it."""

    name: str
    init: str  # "A" or "B": the dense net whose epoch-k snapshot the arm trains from
    label: str  # in the report's tables and legends
    colour: str  # a matplotlib colour, in the report's figures
    make_mask: MaskMaker
    mask_what: str  # the mask in words, for the plan's table
    needs_match: bool = False  # one arm per match stage, reading its pi
    components: str = "arm"  # its row of numerics.DEPENDS


ARMS = {arm.name: arm for arm in (
    ArmSpec("lth", init="A", label="LTH", colour="tab:green", make_mask=imp_mask,
            mask_what="A's IMP mask"),
    ArmSpec("naive", init="B", label="naive", colour="tab:red", make_mask=imp_mask,
            mask_what="A's IMP mask"),
    # it permutes the mask by pi, so the matching code's version is in its key
    ArmSpec("permuted", init="B", label="permuted", colour="tab:blue",
            make_mask=permuted_mask, mask_what="A's IMP mask permuted into B",
            needs_match=True, components="arm permuted"),
)}


@dataclass(frozen=True)
class WeightsRef:
    """Weights a stage reads: a file of another stage, or a file the user gave."""

    ident: str  # what keys see: "<dense key>@<epoch>" or "file:<sha256>"
    stage: Stage | None  # the stage that writes it; None for a user's file
    path: str  # inside that stage's folder, or the user's file


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in net.state_dict().items()}


TEST_OUTPUTS = "test_outputs.pt"  # every kind's OUTPUTS (see the module docstring)
TEST_METRICS = {"test/acc": "test_acc", "test/loss": "test_loss",
                "test/acc_top5": "test_acc_top5"}  # logged name -> metrics.json's


def test_metrics(logged: dict) -> dict[str, float]:
    """A test pass's logged values under the names stage metrics and records use (top-5
    only where logged: datasets of 100 classes or more)."""
    return {name: float(logged[key]) for key, name in TEST_METRICS.items() if key in logged}


@dataclass(frozen=True, kw_only=True)
class Stage(ABC):
    kind: ClassVar[str] = ""
    LOGS: ClassVar[str] = "logs"  # the CSV logger's folder (Lightning writes metrics.csv there)
    IN_SWEEP: ClassVar[bool] = False  # logs into a `wandb agent`'s run (a sweep's cell)
    name: str  # readable and stable: "dense A", "imp round 3", "arm permuted S=0.9 k=2"
    label: str  # the readable part of the key
    key: str = ""  # set by the plan
    epochs: int = 0  # training epochs
    # what the key hashes (keys.key_inputs), set with it; settings.json keeps it
    key_inputs: dict | None = field(default=None, compare=False, repr=False)

    @abstractmethod
    def identity(self) -> dict:
        """What tells this stage from others of its kind, besides the config."""

    @property
    def components(self) -> str:
        """Its row of ``numerics.DEPENDS``: the components whose code its compute runs."""
        return self.kind

    def reads(self) -> tuple[Stage, ...]:
        return ()

    @property
    def shown(self) -> str:
        """Its name in W&B runs (and an arm's in records and reports)."""
        return self.kind

    @abstractmethod
    def what(self) -> str:
        """One line on what it computes, for the plan's table."""

    def plan_row(self, status: str, time: str, run: str) -> tuple[str, ...]:
        """Its row of the plan's table (``progress.plan_table``'s columns)."""
        return (self.name, self.what(), status, str(self.epochs), time, run)

    def order(self) -> tuple:
        """The identity its training data order is drawn from (see the module docstring)."""
        return ()

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "key": self.key, "epochs": self.epochs,
                "identity": self.identity(), "key_inputs": self.key_inputs}

    @abstractmethod
    def compute(self, ctx: StageContext, work: Path, resume: str | None) -> None:
        """Write the outputs into ``work``, continuing from ``resume`` when given."""


def _example(ctx: StageContext, device=None) -> torch.Tensor:
    """The batch a model without a hand-written spec is traced with: the data's shapes."""
    model = ctx.config["model"]
    return example_input(model["in_channels"], model["image_size"], device)


def _train_dense(ctx: StageContext, stage: Stage, seed: int, work: Path, resume: str | None,
                 until: int, save_epochs, final: bool) -> tuple[L.Trainer, L.LightningModule]:
    """Dense training from the seed's init along the T-epoch schedule, up to ``until``."""
    L.seed_everything(seed, workers=True)
    module = ctx.module(schedule_epochs=ctx.epochs)
    snapshots = RewindSnapshots(save_epochs, dirpath=str(work / DenseStage.REWIND),
                                save_final=final)
    trainer = ctx.trainer(stage, work, until, [snapshots], {"seed": seed})
    ctx.fit(trainer, module, stage, resume)
    return trainer, module


@dataclass(frozen=True, kw_only=True)
class DenseStage(Stage):
    """A dense net (A or B) trained T epochs, with its rewind snapshots."""

    kind: ClassVar[str] = "dense"
    METRICS: ClassVar[str] = "metrics.json"  # test accuracy and loss, the saved epochs
    REWIND: ClassVar[str] = "rewind"  # the snapshots' folder (RewindSnapshots' files)
    WEIGHTS: ClassVar[str] = f"{REWIND}/{RewindSnapshots.FINAL}"  # the net at T
    OUTPUTS: ClassVar[str] = TEST_OUTPUTS
    role: str  # "A" or "B", for people; the seed is what distinguishes them
    seed: int
    save_epochs: tuple[int, ...]  # not in the key: a later epoch is its own snapshot stage

    def identity(self) -> dict:
        return {"seed": self.seed}

    def order(self) -> tuple:
        return ("dense", self.seed)

    def what(self) -> str:
        saves = ",".join(map(str, self.save_epochs))
        return f"net {self.role} from seed {self.seed}, snapshots at k={saves}"

    def compute(self, ctx: StageContext, work, resume):
        if resume is None:
            resume = self._continue_truncated(ctx, work)
        trainer, module = _train_dense(ctx, self, self.seed, work, resume, self.epochs,
                                       self.save_epochs, final=True)
        metrics = ctx.test(trainer, module, self, work)
        if ctx.dist.is_writer:
            save_json({**metrics, "saved_epochs": list(self.save_epochs),
                       "order_seed": ctx.order_seed(*self.order())}, work / self.METRICS)

    def _continue_truncated(self, ctx: StageContext, work: Path) -> str | None:
        """The furthest finished truncated run of this net in the store (a continuable
        snapshot stage) that saved every snapshot this run saves up to its epoch: its
        snapshots and checkpoint are copied here and training resumes from them."""
        start = None
        if ctx.dist.is_writer:
            for folder in ctx.store.finished(SnapshotStage.kind):
                identity = load_json(folder / SETTINGS)["identity"]
                reached, saved = identity["epoch"], identity.get("saves", [identity["epoch"]])
                wanted = {e for e in self.save_epochs if e <= reached}
                if (identity["dense"] == self.key and identity.get("continuable")
                        and wanted <= set(saved) and (start is None or reached > start[0])
                        and ctx.store.intact(folder)):
                    start = (reached, folder, wanted)
            if start is not None:
                reached, folder, wanted = start
                (work / self.REWIND).mkdir(parents=True, exist_ok=True)
                for epoch in wanted:
                    shutil.copyfile(folder / self.REWIND / snapshot_name(epoch),
                                    work / self.REWIND / snapshot_name(epoch))
                checkpoint = work / CHECKPOINTS / ResumePoints.FILE
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / SnapshotStage.CONTINUE, checkpoint)
                ctx.store.log_event("continue", self, source=folder.name, epoch=reached)
                start = str(checkpoint)
        return ctx.dist.broadcast(start)  # every rank resumes from rank 0's copy

    def weights(self, epoch: int | None) -> WeightsRef:
        """Epoch k's snapshot (None: the final weights)."""
        path = self.WEIGHTS if epoch is None else f"{self.REWIND}/{snapshot_name(epoch)}"
        return WeightsRef(f"{self.key}@{'final' if epoch is None else epoch}", self, path)


@dataclass(frozen=True, kw_only=True)
class SnapshotStage(Stage):
    """A dense net run again (or only) up to ``epoch``: a rewind snapshot a finished dense
    net did not save, or a dense B trained only as far as the study reads it.

    Same seed, data order and T-epoch schedule, so each snapshot is the one the dense run
    would have saved (bit for bit on CPU with ``deterministic``). A ``continuable`` one keeps
    its last Lightning checkpoint, so the dense stage, when a later study needs the net at T,
    resumes from it instead of training again (``DenseStage._continue_truncated``)."""

    kind: ClassVar[str] = "snapshot"
    CONTINUE: ClassVar[str] = "continue.ckpt"  # a continuable one's last checkpoint
    dense: DenseStage
    epoch: int
    save_epochs: tuple[int, ...] = ()  # besides ``epoch``
    continuable: bool = False

    @property
    def saves(self) -> list[int]:
        return sorted({*self.save_epochs, self.epoch})

    def identity(self) -> dict:
        more = {"saves": self.saves} if self.saves != [self.epoch] else {}
        return {"dense": self.dense.key, "epoch": self.epoch, **more,
                **({"continuable": True} if self.continuable else {})}

    def order(self) -> tuple:
        return self.dense.order()

    def what(self) -> str:
        if self.continuable:
            return (f"dense {self.dense.role} only up to epoch {self.epoch} of "
                    f"{self.dense.epochs}, snapshots at k={','.join(map(str, self.saves))}")
        return f"dense {self.dense.role} again up to its epoch-{self.epoch} snapshot"

    def compute(self, ctx: StageContext, work, resume):
        _train_dense(ctx, self, self.dense.seed, work, resume, self.epoch, self.saves,
                     final=False)
        if self.continuable and ctx.dist.is_writer:
            shutil.copyfile(work / CHECKPOINTS / ResumePoints.FILE, work / self.CONTINUE)

    def weights(self, epoch: int | None = None) -> WeightsRef:
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self.saves:
            raise RuntimeError(f"{self.name} does not save epoch {epoch}")
        return WeightsRef(f"{self.dense.key}@{epoch}", self,
                          f"{DenseStage.REWIND}/{snapshot_name(epoch)}")


def prunable_names(net: torch.nn.Module, prune: PruneSettings) -> list[str]:
    """The weights IMP prunes under ``prune``'s patterns. A model without a hand-written
    ``permutation_spec()`` (one brought as a dotted path, whose graph is traced for its spec
    anyway) also leaves out the convs its torch.fx graph shows alone on a residual skip path
    (``symmetry.trace.skip_path_convs``, e.g. torchvision's ``layer2.0.downsample.0``): the
    authors' shortcut rule for models whose names the default patterns do not know. The
    built-ins keep their name patterns (``*shortcut*``) and are never traced. Here, not in
    ``sparsity``, because it needs both IMP and the graph (sparsity sits below symmetry)."""
    skip_paths = () if hasattr(net, "permutation_spec") else skip_path_convs(net)
    return imp.prunable_names(net, prune.include, prune.exclude, skip_paths)


@dataclass(frozen=True, kw_only=True)
class ImpRound(Stage):
    """One IMP round: prune to ``zeros`` weights from the previous round (or dense A), then
    train ``epochs`` epochs with the mask fixed. Step 0: dense A and an all-True mask."""

    kind: ClassVar[str] = "imp"
    MASK: ClassVar[str] = "mask.pt"
    WEIGHTS: ClassVar[str] = "weights.pt"  # after the round's training
    METRICS: ClassVar[str] = "metrics.json"  # test accuracy and loss, the sparsity
    OUTPUTS: ClassVar[str] = TEST_OUTPUTS  # a target round's only (Runner.keeps_outputs)
    seed: int
    step: int  # rounds so far in its chain
    zeros: int
    prunable: int
    previous: ImpRound | None
    dense: WeightsRef  # dense A's final weights: a chain's start

    def identity(self) -> dict:
        return {"seed": self.seed, "step": self.step, "zeros": self.zeros,
                "after": self.previous.key if self.previous else self.dense.ident}

    def reads(self):
        return (self.previous,) if self.previous else tuple(filter(None, [self.dense.stage]))

    def order(self) -> tuple:
        return ("imp", self.seed, self.step, self.zeros)

    def what(self) -> str:
        if self.step == 0:
            return "round 0: dense A with every weight kept"
        return f"prune to {self.zeros}/{self.prunable} zeros, then train with the mask"

    def compute(self, ctx: StageContext, work, resume):
        prune = ctx.study.prune
        if self.previous:
            folder = ctx.run(self.previous)
            start, mask = str(folder / self.WEIGHTS), Mask.load(folder / self.MASK)
        else:
            start, mask = str(ctx.weights(self.dense)), None
        L.seed_everything(ctx.order_seed(*self.order()))
        module = ctx.module(lr=prune.lr, momentum=prune.momentum,
                            weight_decay=prune.weight_decay, init_weights=start,
                            schedule_epochs=max(self.epochs, 1))
        names = prunable_names(module.net, prune)
        if self.step == 0:
            mask = imp.full_mask(module.net, names)
        else:
            mask = imp.prune_global_l1(module.net, names, mask,
                                       self.zeros - (mask.zeros if mask else 0))
        if mask.zeros != self.zeros:
            raise RuntimeError(f"IMP {self.name}: pruned {mask.zeros} weights, planned "
                               f"{self.zeros}")
        hp = ctx.config["model"]
        # A round is shared by every chain with its history: nothing chain-specific here.
        mask.meta = {"model": hp["arch"], "width": hp["width"], "round": self.step}
        module.mask = mask
        trainer = ctx.trainer(self, work, self.epochs, (), {"round": self.step})
        if self.epochs > 0:
            ctx.fit(trainer, module, self, resume)
            imp.check_masked_zero(module.net, mask, self.name)
        metrics = {"step": self.step, "zeros": self.zeros, "prunable": self.prunable,
                   "sparsity": self.zeros / self.prunable, "epochs": self.epochs,
                   **ctx.test(trainer, module, self, work)}
        if ctx.dist.is_writer:
            mask.save(work / self.MASK)
            save_tensors({"state_dict": _state(module.net), "epoch": self.step * self.epochs,
                          "meta": dict(mask.meta)}, work / self.WEIGHTS)
            save_json(metrics, work / self.METRICS)
            ctx.tracking.summary(trainer, {f"imp/{key}": value for key, value in metrics.items()})


@dataclass(frozen=True, kw_only=True)
class MatchStage(Stage):
    """pi aligning A to B at one pair of epochs by one method, the interpolation before and
    after it, how good pi is, and optionally a mask permuted by it (`match`'s --study.mask).

    The method is keyed as the config leaf ``study.match.method`` (``keys.match_view``), the
    epochs through the weights it reads."""

    kind: ClassVar[str] = "match"
    PERM: ClassVar[str] = "perm.pt"
    A_PERMUTED: ClassVar[str] = "weights_a_permuted.pt"  # A's weights moved into B's basin
    CONNECTIVITY: ClassVar[str] = "connectivity.json"  # the interpolation curves
    QUALITY: ClassVar[str] = "quality.json"  # the epochs, A's and B's accuracy, correlations
    FIGURE: ClassVar[str] = "interpolation.png"
    MASK_PERMUTED: ClassVar[str] = "mask_permuted.pt"  # with a given mask only
    a: WeightsRef
    b: WeightsRef
    mask: WeightsRef | None = None
    method: str
    a_epoch: int
    b_epoch: int
    suffix: str  # the permuted arm's label after "permuted" (plan.match_suffix)

    def identity(self) -> dict:
        return {"a": self.a.ident, "b": self.b.ident,
                "mask": self.mask.ident if self.mask else None}

    def reads(self):
        return tuple(ref.stage for ref in (self.a, self.b) if ref.stage)

    def what(self) -> str:
        return (f"pi ({self.method}) from A at epoch {self.a_epoch} to B at epoch "
                f"{self.b_epoch}; interpolation before/after, barriers")

    def compute(self, ctx: StageContext, work, resume):
        settings = ctx.study.match
        weights_a, weights_b = ctx.weights(self.a), ctx.weights(self.b)
        device = ctx.device()
        net_a = ctx.module(init_weights=str(weights_a)).net.to(device)
        net_b = ctx.module(init_weights=str(weights_b)).net.to(device)
        train = ctx.datamodule.unaugmented_train_batches(device)
        spec = get_spec(net_a, _example(ctx, device))
        correlations = activation_correlations(net_a, net_b, spec, train,
                                               settings.num_batches, context=ctx.dist,
                                               cuda_graphs=settings.cuda_graphs)
        perm = match(net_a, net_b, spec, method=self.method, batches=train,
                     num_batches=settings.num_batches, seed=settings.seed, context=ctx.dist,
                     correlations=correlations)
        ctx.dist.ranks_agree("the permutation", perm)
        state_a, state_b = _state(net_a), _state(net_b)
        curves = compare_naive_matched(
            net_a, state_a, state_b, perm, ctx.datamodule.test_batches(device), train,
            spec=spec, repair=settings.repair, num_alphas=settings.interpolation_points,
            bn_batches=settings.bn_reset_batches)
        if not ctx.dist.is_writer:
            return
        save_tensors({"perm": perm, "meta": {"method": self.method}}, work / self.PERM)
        save_tensors({"state_dict": apply_permutation(state_a, spec, perm), "epoch": None,
                      "meta": {"permuted_to": self.b.ident}}, work / self.A_PERMUTED)
        save_json(curves, work / self.CONNECTIVITY)
        # the end points of the naive curve are A and B themselves, at the matched epochs
        save_json({"method": self.method, "epoch_a": self.a_epoch, "epoch_b": self.b_epoch,
                   "acc_a": curves["naive"]["acc"][0], "acc_b": curves["naive"]["acc"][-1],
                   "correlation": matched_correlation(correlations, perm)},
                  work / self.QUALITY)
        plot_interpolation(curves, work / self.FIGURE, title=self.label)
        if self.mask is not None:
            apply_permutation(Mask.load(self.mask.path), spec, perm).save(
                work / self.MASK_PERMUTED)
        ctx.tracking.log_connectivity(self, curves, work / self.FIGURE, self.method)


def load_perm(path: Path) -> dict[str, torch.Tensor]:
    data = load_tensors(path, what="permutation file")
    if not isinstance(data, dict) or not isinstance(data.get("perm"), dict):
        raise LTHError(f"permutation file {path} holds no 'perm'")
    return data["perm"]


@dataclass(frozen=True, kw_only=True)
class ArmStage(Stage):
    """One arm: sparse training from a rewind snapshot with a fixed mask, T - k epochs."""

    kind: ClassVar[str] = "arm"
    MASK: ClassVar[str] = "mask.pt"  # the mask it trained with
    WEIGHTS: ClassVar[str] = "final.pt"  # after its T - k epochs
    RESULT: ClassVar[str] = "result.json"  # what its record is made from
    OUTPUTS: ClassVar[str] = TEST_OUTPUTS
    IN_SWEEP: ClassVar[bool] = True
    arm: ArmSpec
    seed: int
    sparsity: float
    rewind_epoch: int
    init: WeightsRef
    round: ImpRound  # the IMP round that landed on ``sparsity``: its mask
    matching: MatchStage | None  # pi, for an arm that needs a match stage
    replicate: int = 0  # r: its B_r (arms from B) and its data order; 0: the paper's arm

    def identity(self) -> dict:
        # r = 0 is in no identity: the keys of a study without replicates
        return {"arm": self.arm.name, "seed": self.seed, "sparsity": self.sparsity,
                "rewind_epoch": self.rewind_epoch, "init": self.init.ident,
                "mask": self.round.key,
                "matching": self.matching.key if self.matching else None,
                **({"replicate": self.replicate} if self.replicate else {})}

    def reads(self):
        return tuple(s for s in (self.init.stage, self.round, self.matching) if s)

    def stage_keys(self) -> dict[str, str]:
        """The keys of the dense nets and the IMP round this arm reads, where the report
        finds their kept outputs: ``imp`` (its mask's round), ``dense_a`` (the net that
        round's chain starts from) and, for an arm trained from a B, ``dense_b`` (the net
        its snapshot is of; LTH reads no B). A snapshot stage's net is its dense stage."""
        def dense(ref: WeightsRef) -> str:
            return (ref.stage.dense if isinstance(ref.stage, SnapshotStage) else ref.stage).key

        start = self.round
        while start.previous is not None:
            start = start.previous
        keys = {"dense_a": dense(start.dense), "imp": self.round.key}
        return keys | ({"dense_b": dense(self.init)} if self.arm.init == "B" else {})

    @property
    def components(self) -> str:
        return self.arm.components

    @property
    def shown(self) -> str:
        """The arm's name in records and reports: a permuted arm's with its match suffix."""
        return self.arm.name + (self.matching.suffix if self.matching else "")

    def order(self) -> tuple:
        more = (self.replicate,) if self.replicate else ()
        return ("arm", self.seed, self.rewind_epoch, *more)

    def what(self) -> str:
        init = f"B_{self.replicate}" if self.arm.init == "B" and self.replicate else self.arm.init
        return f"{init}'s epoch-{self.rewind_epoch} weights, {self.arm.mask_what}"

    def wandb_config(self, ctx: StageContext) -> dict:
        hp = ctx.config["model"]
        return {"method": self.shown, "sparsity": self.sparsity,
                "rewind_epoch": self.rewind_epoch, "seed": self.seed, "width": hp["width"],
                "model": hp["arch"], "dataset": ctx.config["data"]["dataset"],
                "replicate": self.replicate}

    def member(self, ctx: StageContext) -> LTHModule:
        """The module this arm trains: its rewind snapshot, its arm's mask."""
        sparse = ctx.study.sparse
        module = ctx.module(lr=sparse.lr, momentum=sparse.momentum,
                            weight_decay=sparse.weight_decay,
                            init_weights=str(ctx.weights(self.init)),
                            schedule_epochs=self.epochs)
        mask = self.arm.make_mask(Mask.load(ctx.run(self.round) / ImpRound.MASK), self, ctx,
                                  module.net)
        hp = ctx.config["model"]
        mask.check_fits(module.net, hp["arch"], hp["width"])
        ctx.dist.ranks_agree(f"the {self.arm.name} mask", mask.tensors)
        module.mask = mask
        return module

    def save(self, ctx: StageContext, work: Path, state: dict, mask: Mask, metrics: dict, wall_time_s: float,
             fused: int, trainer: L.Trainer | None) -> None:
        """The arm's outputs; ``fused``: the size of the group it trained in (1: alone)."""
        if not ctx.dist.is_writer:
            return
        mask.save(work / self.MASK)
        save_tensors({"state_dict": state, "epoch": ctx.epochs,
                      "meta": {"arm": self.arm.name}}, work / self.WEIGHTS)
        save_json({**metrics, "wall_time_s": wall_time_s,
                   "num_threads": torch.get_num_threads(), "device": str(ctx.device()),
                   "order_seed": ctx.order_seed(*self.order()), "fused": fused,
                   # val/acc in logs/ is test accuracy only when this is 0
                   "val_split": ctx.datamodule.val_split},
                  work / self.RESULT)
        record = ctx.record(self, load_json(work / self.RESULT)).to_dict()
        if trainer is not None:
            ctx.tracking.summary(trainer, record)
        else:  # a fused group's member: its run from its CSV log, now that it has one
            ctx.tracking.replay(self, self.wandb_config(ctx), work / self.LOGS / "metrics.csv",
                                record)

    def compute(self, ctx: StageContext, work, resume):
        started = time.time()
        L.seed_everything(ctx.order_seed(*self.order()))
        module = self.member(ctx)
        trainer = ctx.trainer(self, work, self.epochs, (), self.wandb_config(ctx))
        ctx.fit(trainer, module, self, resume)
        metrics = ctx.test(trainer, module, self, work)
        self.save(ctx, work, _state(module.net), module.mask, metrics, time.time() - started,
                  fused=1, trainer=trainer)


def fusable(arm: ArmStage) -> tuple:
    """What arms must share to train as one fused group: their data order and schedule."""
    return (arm.order(), arm.epochs)


@dataclass(frozen=True)
class ArmGroup:
    """Arms trained side by side as one stacked model (``lightning_lth.training.fused``): one data
    order, one schedule. Not a stage of the store: each member is its own stage, and the
    group's resume checkpoint lives in ``<store>/fused/<key>.partial`` (``key``: from the
    members' keys, so only the same members resume it)."""

    members: tuple[ArmStage, ...]

    @property
    def key(self) -> str:
        return digest(sorted(arm.key for arm in self.members))

    @property
    def name(self) -> str:
        first = self.members[0]
        return (f"fused {len(self.members)} arms k={first.rewind_epoch}"
                + (f" r{first.replicate}" if first.replicate else ""))

    def compute(self, ctx: StageContext, works: dict[str, Path], group_work: Path, resume: str | None):
        """Train every member at once; write each member's outputs into ``works[key]``."""
        started = time.time()
        first = self.members[0]
        L.seed_everything(ctx.order_seed(*first.order()))
        modules = [arm.member(ctx) for arm in self.members]
        fused = FusedArms(modules, _example(ctx, torch.device("cpu")))
        logs = MemberLogs([CSVLogger(works[arm.key], name=arm.LOGS, version="")
                           for arm in self.members])
        trainer = ctx.group_trainer(self, group_work, first.epochs, [logs])
        ctx.fit(trainer, fused, first, resume)
        kept = [ctx.keeps_outputs(arm) for arm in self.members]
        fused.kept_outputs = KeptOutputs(images_dim=1) if any(kept) else None
        trainer.test(fused, ctx.datamodule, verbose=False)
        share = (time.time() - started) / len(self.members)
        for index, (arm, module) in enumerate(zip(self.members, modules, strict=True)):
            metrics = test_metrics(fused.metrics("test")[index])
            if kept[index]:  # the member's own rows, as a file of their own (not a view)
                outputs = fused.kept_outputs.result
                ctx.save_outputs(arm, works[arm.key], {"probs": outputs["probs"][index].clone(),
                                                       "targets": outputs["targets"]})
            arm.save(ctx, works[arm.key], fused.member_state(index), module.mask, metrics,
                     share, fused=len(self.members), trainer=None)
