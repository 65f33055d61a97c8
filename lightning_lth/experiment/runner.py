"""The runner: walks a plan over the store, giving each stage its data, modules and trainers.

``run_command`` is what ``prune``, ``match``, ``experiment`` and ``plan`` call. The runner is
the stages' ``ctx``: one datamodule (the split is loaded once), modules built from the
config's ``model`` section, trainers from its ``trainer`` section with the study's own
loggers and resume points, the store and W&B.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import TorchCheckpointIO

from lightning_lth.distributed import DistContext
from lightning_lth.errors import LTHError
from lightning_lth.experiment import keys
from lightning_lth.experiment.plan import (
    Plan,
    Replicate,
    build_plan,
    in_order,
    resolve,
    study_settings,
)
from lightning_lth.experiment.progress import EpochClock, StudyProgress, plan_table, watch
from lightning_lth.experiment.results import RESULTS_FILE, Record, append_record
from lightning_lth.experiment.stages import (
    ArmGroup,
    ArmStage,
    DenseStage,
    ImpRound,
    MatchStage,
    Stage,
    WeightsRef,
    load_perm,
    test_metrics,
)
from lightning_lth.experiment.store import CHECKPOINTS, Store, stage_times
from lightning_lth.experiment.tracking import Tracking
from lightning_lth.io import load_json, save_tensors, write_atomic
from lightning_lth.sparsity.mask import Mask
from lightning_lth.symmetry.matching import perm_agreement
from lightning_lth.training.callbacks import ResumePoints, RewindSnapshots, check_rewind_epochs
from lightning_lth.training.failpoints import KillSwitch
from lightning_lth.training.fused import unfusable
from lightning_lth.training.lean import profiler_or_quiet
from lightning_lth.training.module import LTHModule, load_snapshot, load_weights
from lightning_lth.training.outputs import KeptOutputs

# study.fuse when it is not set, per training device type: the group size (1: arms train
# one after another). Measured: on CPU the fused group of 12 demo-MLP arms took 0.97x the
# time of the arms one after another at 2 torch threads and 1.11x at 1 (a 3 % gain against an
# 11 % loss: not worth a default; docs/benchmarks/fused_arms_cpu_2026-12.md); on an
# H100 a group of 12 ResNet20x1 trained 3.99x the images/s of one net, and whole arm stages
# ran 3.70x (ResNet20x1) and 6.18x (the demo MLP) faster
# (docs/benchmarks/fused_arms_h100_2026-11.md). Where the config asks for what a fused group
# does not honour (``fused.unfusable``), the default is 1; likewise where it asks for what the
# defaults were not measured with (``FUSE_MEASURED``: float32, NCHW, eager, uncompiled -- not
# configs/trainer/fast.yaml's bf16, channels_last, compile and CUDA graph), until a GPU
# measures it (bench/gpu_suite.py, section 3). An explicit study.fuse > 1 trains those fused.
FUSE_DEFAULT = {"cpu": 1, "cuda": 12}
FUSE_MEASURED = {"precisions": ("32-true", "32", "64-true", "64"),
                 "off": ("channels_last", "cuda_graphs", "compile")}

# Trainer arguments the runner sets itself for every stage.
RUNNER_SETS = ("logger", "callbacks", "max_epochs", "default_root_dir", "enable_checkpointing",
               "enable_progress_bar", "enable_model_summary", "plugins")


def _is_rewind_snapshots(class_path: str) -> bool:
    """Whether a config's callback class path names RewindSnapshots (or a subclass)."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(found, type) and issubclass(found, RewindSnapshots)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written through a temporary file + rename: kill -9 safe."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        write_atomic(Path(path), lambda handle: torch.save(checkpoint, handle))


class Runner:
    def __init__(self, cli, dist: DistContext | None = None):
        self.config = resolve(cli.config.as_dict())
        self.study = study_settings(self.config)
        self.datamodule = cli.datamodule
        self.dist = dist or DistContext()
        trainer_args = dict(vars(cli.config_init.trainer))
        self.fit_callbacks = list(trainer_args.get("callbacks") or [])
        self.trainer_args = {k: v for k, v in trainer_args.items() if k not in RUNNER_SETS}
        self.trainer_args["profiler"] = profiler_or_quiet(trainer_args.get("profiler"))
        self.plugins = list(trainer_args.get("plugins") or [])
        self.show_steps = trainer_args.get("enable_progress_bar") is not False
        self.view = StudyProgress("", [])  # `watch` sets the command's view
        self.summary = bool(trainer_args.get("enable_model_summary"))
        self.epochs = int(self.config["trainer"]["max_epochs"] or 0)
        self.store = Store(self.study.store, self.dist)
        self._plan: Plan | None = None
        model = self.config["model"]
        self.tracking = Tracking(self.study.wandb_project, self.study.wandb_mode,
                                 Path(self.study.store) / "wandb", model["arch"],
                                 model["width"], self.config["data"]["dataset"])

    # -- the plan ---------------------------------------------------------------------------
    def plan(self, with_arms: bool = True, matching: bool = True) -> Plan:
        self._plan = build_plan(self.config, self._saved_epochs, with_arms, matching)
        self._check_callbacks()
        self._check_files(self._plan)
        return self._plan

    def _check_callbacks(self) -> None:
        """A study sets each stage's callbacks itself: a config's RewindSnapshots (for `fit`)
        is accepted only where it asks for the snapshots the study saves anyway, and any
        other callback the config names is refused (the stages would ignore it without a
        word). What Lightning adds to the list itself (checkpointing, the config saver) is
        not the user's."""
        named = self.config["trainer"].get("callbacks") or []
        for entry in named if isinstance(named, list) else [named]:
            path = entry.get("class_path", "") if isinstance(entry, dict) else str(entry)
            if not _is_rewind_snapshots(path):
                name = path.rpartition(".")[2] or repr(entry)
                raise LTHError(f"trainer.callbacks has {name}, "
                               f"which a study would ignore: its stages run their own "
                               f"callbacks (snapshots, resume points, progress); drop it for "
                               f"study commands (it is for `fit`; RewindSnapshots is "
                               f"accepted)")
        wanted = sorted(set(self.study.rewind_epochs))
        for callback in self.fit_callbacks:
            if not isinstance(callback, RewindSnapshots):
                continue
            epochs = check_rewind_epochs(callback.epochs, self.epochs)
            if epochs != wanted:
                raise LTHError(f"trainer.callbacks has RewindSnapshots(epochs={epochs}), but a "
                               f"study saves its own snapshots, study.rewind_epochs={wanted}: "
                               f"set the two equal or drop the callback")

    def _saved_epochs(self, key: str) -> list[int] | None:
        metrics = self.store.root / DenseStage.kind / key / DenseStage.METRICS
        return load_json(metrics)["saved_epochs"] if metrics.is_file() else None

    def _check_files(self, plan: Plan) -> None:
        """A user's weights or mask that do not fit the model fail here, before any stage."""
        matching = plan.matches[0]  # every match stage reads the same files
        for ref in (matching.a, matching.b):
            if ref.stage is None:
                load_weights(self.module().net, load_snapshot(ref.path), ref.path)
        if matching.mask is not None:
            model = self.config["model"]
            Mask.load(matching.mask.path).check_fits(self.module().net, model["arch"],
                                                     model["width"])

    def load_data(self, stages: list[Stage]) -> None:
        """Load the splits (the datamodule keeps them) before the first stage that is not
        done starts, so missing data or a data.val_split too big for it is refused before
        the store holds anything of it; a store with every stage done reads no data."""
        if any(self.store.status(stage) != "done" for stage in stages):
            self.datamodule.setup("fit")

    # -- what stages use --------------------------------------------------------------------
    def module(self, **overrides) -> LTHModule:
        return LTHModule(**{**self.config["model"], **overrides})

    def order_seed(self, *identity) -> int:
        return keys.order_seed(*identity, self.config["data"].get("seed"))

    def trainer(self, stage: Stage, work: Path, max_epochs: int, callbacks=(),
                wandb_config: dict | None = None) -> L.Trainer:
        loggers = [CSVLogger(work, name=stage.LOGS, version="")]
        wandb = self.tracking.logger(stage, stage.shown, wandb_config or {})
        loggers += [wandb] if wandb is not None else []
        return self._trainer([stage], work, max_epochs, callbacks, loggers)

    def group_trainer(self, group: ArmGroup, work: Path, max_epochs: int,
                      callbacks=()) -> L.Trainer:
        """A fused group's trainer: its members log through ``callbacks`` (``MemberLogs``)."""
        return self._trainer(list(group.members), work, max_epochs, callbacks, False)

    def _trainer(self, stages: list[Stage], work: Path, max_epochs: int, callbacks,
                 loggers) -> L.Trainer:
        resume = self.study.resume
        callbacks = [*callbacks, ResumePoints(work / CHECKPOINTS, resume.every_n_steps,
                                              resume.every_minutes)]
        kills = [KillSwitch.for_stage(stage.name) for stage in stages]
        callbacks += [kill for kill in kills if kill is not None]
        # the study's view shows the steps
        callbacks += [EpochClock(self.view, stage) for stage in stages]
        return L.Trainer(**self.trainer_args, max_epochs=max_epochs, logger=loggers,
                         callbacks=callbacks, default_root_dir=work, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=self.summary,
                         plugins=[*self.plugins, AtomicCheckpointIO()])

    def fit(self, trainer: L.Trainer, module: LTHModule, stage: Stage, resume: str | None):
        """Train with the stage's own data order."""
        self.datamodule.order_seed = self.order_seed(*stage.order())
        trainer.fit(module, self.datamodule, ckpt_path=resume)

    def test(self, trainer: L.Trainer, module: LTHModule, stage: Stage | None = None,
             work: Path | None = None) -> dict:
        """The test metrics (``stages.test_metrics``); where ``stage`` keeps its outputs
        (``keeps_outputs``), they are collected in the same pass and saved into ``work``."""
        keep = stage is not None and self.keeps_outputs(stage)
        module.kept_outputs = KeptOutputs() if keep else None
        metrics = test_metrics(trainer.test(module, self.datamodule, verbose=False)[0])
        if keep:
            self.save_outputs(stage, work, module.kept_outputs.result)
        module.kept_outputs = None
        return metrics

    def keeps_outputs(self, stage: Stage) -> bool:
        """Whether ``stage`` keeps its test outputs: with ``study.keep_outputs``, a dense
        net at T, every arm and the IMP round at each target sparsity (the IMP solutions the
        diversity groups compare; the rounds between are in no group)."""
        if not self.study.keep_outputs or not hasattr(stage, "OUTPUTS"):
            return False
        return not isinstance(stage, ImpRound) or stage.key in {
            target.key for target in self._plan.targets.values()}

    def save_outputs(self, stage: Stage, work: Path, outputs: dict) -> None:
        """A stage's kept test outputs into its folder (rank 0; every rank gathered them)."""
        if self.dist.is_writer:
            save_tensors(outputs, work / stage.OUTPUTS)

    def device(self) -> torch.device:
        accelerator = str(self.config["trainer"].get("accelerator", "auto"))
        if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def run(self, stage: Stage) -> Path:
        """The stage's finished folder; the stages it reads are run first."""
        for needed in stage.reads():
            self.run(needed)
        computed = False

        def compute(work: Path, resume: str | None) -> None:
            nonlocal computed
            computed = True
            self.view.started(stage, resume)
            try:
                stage.compute(self, work, resume)
            finally:  # this stage's W&B run, and only it: a stage reads others before it starts
                self.tracking.finish()

        folder = self.store.run(stage, compute)
        if computed:
            self.view.finished(stage)
        return folder

    def run_group(self, group: ArmGroup) -> None:
        """Train the group's unfinished members as one fused model (``Store.run_group``)."""
        for member in group.members:
            for needed in member.reads():
                self.run(needed)
        views = []

        def compute(pending, works, group_work, resume):
            for member in pending:
                self.view.started(member, resume)
            views.extend(pending)
            ArmGroup(tuple(pending)).compute(self, works, group_work, resume)

        self.store.run_group(list(group.members), lambda pending: ArmGroup(tuple(pending)).key,
                             compute)
        for member in views:
            self.view.finished(member)

    def fuse_size(self) -> int:
        """How many arms train as one fused group: ``study.fuse``, else the default of the
        training device's type (``FUSE_DEFAULT``); 1 under DDP (fused groups are one process),
        where the config asks for what fused groups do not honour, and (unset only) for
        settings the default was not measured with (``FUSE_MEASURED``)."""
        multi = _processes(self.trainer_args) > 1
        model = self.config["model"]
        trainer = self.config["trainer"]
        precision = trainer.get("precision") or "32-true"
        refused = unfusable(precision, trainer.get("gradient_clip_val"),
                            trainer.get("gradient_clip_algorithm"))
        if self.study.fuse is None:
            unmeasured = str(precision) not in FUSE_MEASURED["precisions"] or any(
                model.get(name) for name in FUSE_MEASURED["off"])
            return 1 if multi or refused or unmeasured else FUSE_DEFAULT[self.device().type]
        if multi and self.study.fuse > 1:
            raise LTHError(f"study.fuse={self.study.fuse} trains a group in one process; under "
                           f"DDP set study.fuse=1")
        if refused and self.study.fuse > 1:  # before any stage runs
            raise LTHError(f"study.fuse={self.study.fuse} does not support "
                           f"{' and '.join(refused)}; set study.fuse=1")
        return self.study.fuse

    def weights(self, ref: WeightsRef) -> Path:
        return self.run(ref.stage) / ref.path if ref.stage else Path(ref.path)

    # -- results ----------------------------------------------------------------------------
    def record(self, arm: ArmStage, result: dict) -> Record:
        """The arm's record: its result, plus what it came from (dense, IMP, matching).

        Only reads finished stages (``experiment`` runs every stage of the plan before its
        arms): rank 0 calls it alone, so it must not start one."""
        plan = self._plan
        replicate = plan.replicate(arm.replicate)  # its B_r and pi_r
        model = self.config["model"]
        final = replicate.final_match
        curves = self._curves(final)
        repair = (curves or {}).get("curves", {}).get("repair")  # None: REPAIR not computed
        reached = {"a": True, "b": replicate.b_epochs_saved == 0}
        dense = {role: load_json(self.store.path(stage) / DenseStage.METRICS)["test_acc"]
                 if reached[role] else None
                 for role, stage in (("a", plan.dense_a), ("b", replicate.dense_b))}
        pruned = load_json(self.store.path(arm.round) / ImpRound.METRICS)["test_acc"]
        shown = final or arm.matching
        return Record(
            model=model["arch"], dataset=self.config["data"]["dataset"], width=model["width"],
            seed=arm.seed, method=arm.shown, sparsity=arm.sparsity,
            rewind_epoch=arm.rewind_epoch, test_acc=result["test_acc"],
            test_acc_top5=result.get("test_acc_top5"), stages=arm.stage_keys(),
            test_loss=result["test_loss"], dense_acc_a=dense["a"], dense_acc_b=dense["b"],
            pruned_acc_a=pruned,
            **{f"barrier_{name}": value for name, value in self._barriers(curves).items()},
            connectivity=str((self.store.path(shown) / MatchStage.CONNECTIVITY).resolve())
            if shown else None,
            wall_time_s=result["wall_time_s"], key=arm.key,
            config_hash=keys.config_hash(self.config), num_threads=result["num_threads"],
            device=result["device"], fused=result.get("fused", 1), replicate=arm.replicate,
            finished_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **({f"barrier_{kind}_{when}_repair": repair[side][f"{kind}_barrier"]
                for kind in ("loss", "error")
                for when, side in (("before", "naive"), ("after", "matched"))} if repair else {}),
            **(self._match_fields(arm.matching, replicate) if arm.matching else {}))

    def _curves(self, matching: MatchStage | None) -> dict | None:
        return load_json(self.store.path(matching) / MatchStage.CONNECTIVITY) if matching else None

    @staticmethod
    def _barriers(curves: dict | None) -> dict:
        """``{loss_before, loss_after, error_before, error_after}``: naive, then matched."""
        return {f"{metric}_{when}": curves[side][f"{metric}_barrier"] if curves else None
                for metric in ("loss", "error")
                for when, side in (("before", "naive"), ("after", "matched"))}

    def _match_fields(self, matching: MatchStage, replicate: Replicate) -> dict:
        """A permuted arm's own pi: where it was found, how good it is, and the nets there."""
        folder = self.store.path(matching)
        quality = load_json(folder / MatchStage.QUALITY)
        final = next((m for m in replicate.matches if m.method == matching.method
                      and (m.a_epoch, m.b_epoch) == (self.epochs, self.epochs)), None)
        agreement = None
        if final is not None and replicate.b_epochs_saved == 0:
            agreement = perm_agreement(load_perm(folder / MatchStage.PERM),
                                       load_perm(self.store.path(final) / MatchStage.PERM))
        return {"match_method": matching.method, "match_epoch_a": matching.a_epoch,
                "match_epoch_b": matching.b_epoch, "acc_b_at_match": quality["acc_b"],
                **{f"barrier_{name}_at_match": value
                   for name, value in self._barriers(self._curves(matching)).items()},
                "pi_correlation": quality["correlation"], "pi_agreement": agreement}

    def experiment(self) -> list[Record]:
        started = time.time()
        plan = self.plan()
        groups = plan.arm_groups(self.fuse_size())  # (a fusion it refuses: before any stage)
        for replicate in plan.replicates:  # each arm's record reads its replicate's paper
            if replicate.final_match:  # match, a fused member's at once (for its W&B run)
                self.run(replicate.final_match)
        for group in groups:
            if len(group.members) > 1:
                self.run_group(group)
        for stage in plan.stages:  # everything else; a finished member is only verified
            self.run(stage)
        self.add_missing_outputs(plan)
        records = []
        for arm in plan.arms:
            record = self.record(arm, load_json(self.run(arm) / ArmStage.RESULT))
            if self.dist.is_writer:
                append_record(Path(self.study.store) / RESULTS_FILE, record)
            records.append(record)
        self.dist.say(f"experiment: {len(records)} arm results in {time.time() - started:.1f} s;"
                      f" results file {Path(self.study.store) / RESULTS_FILE}")
        return records

    def add_missing_outputs(self, plan: Plan) -> None:
        """The test outputs of finished stages stored without them (by older code, or with
        study.keep_outputs off): a test pass of each one's stored weights, no training, the
        file sealed into its manifest (``Store.add_file``)."""
        missing = [index for index, stage in enumerate(plan.stages)
                   if self.keeps_outputs(stage) and not self.store.sealed(stage, stage.OUTPUTS)
                   ] if self.dist.is_writer else None
        for index in self.dist.broadcast(missing):  # every rank runs the test passes
            stage = plan.stages[index]
            module = self.module(init_weights=str(self.store.path(stage) / stage.WEIGHTS))
            module.kept_outputs = KeptOutputs()
            trainer = L.Trainer(**self.trainer_args, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=self.store.root, plugins=self.plugins)
            metrics = test_metrics(trainer.test(module, self.datamodule, verbose=False)[0])
            outputs = module.kept_outputs.result
            self.store.add_file(stage, stage.OUTPUTS,
                                lambda path, outputs=outputs: save_tensors(outputs, path))
            self.dist.say(f"{stage.name}: test outputs added from its stored weights (test "
                          f"accuracy {metrics['test_acc']:.4f})")

    def statuses(self, plan: Plan) -> Callable[[Stage], str]:
        """Each stage's status in the store, a finished one's checksums verified (once)."""
        known = {stage.key: self.store.checked_status(stage) for stage in plan.stages}
        return lambda stage: known[stage.key]

    def describe(self) -> dict:
        """The plan without running anything: stages, keys, status, epochs."""
        plan = self.plan()
        status = self.statuses(plan)
        stages = [{"stage": s.kind, "name": s.name, "key": s.key,
                   "status": status(s), "epochs": s.epochs,
                   **dict(zip(("action", "why"), self.store.action(s, status(s)), strict=True))}
                  for s in plan.stages]
        cells = [{"arm": a.shown, "sparsity": a.sparsity, "rewind_epoch": a.rewind_epoch,
                  "replicate": a.replicate, "key": a.key, "status": status(a),
                  "epochs": a.epochs}
                 for a in plan.arms]
        return {"stages": stages, "cells": cells, "epochs": plan.epochs,
                "b_until": plan.b_until, "b_epochs_saved": plan.b_epochs_saved}


def _processes(trainer_args: dict) -> int:
    """How many processes the trainer settings start (DDP: one per device and node)."""
    devices = trainer_args.get("devices", "auto")
    nodes = int(trainer_args.get("num_nodes") or 1)
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif str(devices).strip().lstrip("-").isdigit():
        count = int(devices)
        count = max(torch.cuda.device_count(), 1) if count == -1 else count
    elif trainer_args.get("accelerator") == "cpu":  # "auto" devices on a CPU: one process
        count = 1
    else:  # "auto": every GPU, or one CPU process
        count = max(torch.cuda.device_count(), 1)
    return count * nodes


def run_command(command: str, cli, as_json: bool = False) -> int:
    runner = Runner(cli)
    if command == "plan":
        if runner.dist.is_writer:
            if as_json:
                print(json.dumps(runner.describe(), indent=2))
            else:
                plan = runner.plan()
                status = runner.statuses(plan)
                print(plan_table(plan.stages, status, stage_times(runner.store.root),
                                 lambda stage: runner.store.action(stage, status(stage))))
                corrupt = [stage.name for stage in plan.stages if status(stage) == "corrupt"]
                if corrupt:
                    print(f"corrupt: {', '.join(corrupt)} failed their checksums; `experiment` "
                          f"moves them aside and computes them again")
                for replicate in plan.replicates:
                    if replicate.b_epochs_saved:
                        print(f"{replicate.dense_b.name} trains to epoch {replicate.b_until} "
                              f"of {runner.epochs} (study.match.epochs): "
                              f"{replicate.b_epochs_saved} epochs saved")
        return 0
    if command == "experiment":
        stages = runner.plan().stages
        runner.load_data(stages)
        with watch(runner, command, stages):
            runner.experiment()
        return 0
    plan = runner.plan(with_arms=False, matching=command == "match")
    runner.load_data(in_order(list(plan.targets.values()) if command == "prune"
                              else plan.matches))
    if command == "prune":
        with watch(runner, command, in_order(list(plan.targets.values()))):
            folders = {target: runner.run(stage) for target, stage in plan.targets.items()}
        for target, folder in folders.items():
            runner.dist.say(f"prune: sparsity {target}: {folder}")
        return 0
    if command == "match":
        with watch(runner, command, in_order(plan.matches)):
            folders = [runner.run(matching) for matching in plan.matches]
        for matching, folder in zip(plan.matches, folders, strict=True):
            runner.dist.say(f"match{matching.suffix}: outputs in {folder}")
        return 0
    raise LTHError(f"unknown command {command!r}")
