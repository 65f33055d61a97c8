"""Appendix A.5 as stages over the store: dense A and B, IMP on A, matching, the three arms.

Each stage is keyed by exactly the settings that determine it (see ``Plan``): dense A/B by
model, data, dense optimisation, T and seed; IMP by dense A and the pruning settings; the
matching by dense A, dense B and the matching settings; an arm by its method, sparsity, k,
the sparse optimisation and the stages it reads. Nothing else goes into a key, so changing
an unrelated setting reuses what exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import netrc
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.plugins import TorchCheckpointIO

from lightning_lth.callbacks import RewindSnapshots, check_rewind_epochs, snapshot_name
from lightning_lth.data import LTHDataModule
from lightning_lth.errors import LTHError
from lightning_lth.experiment.config import ARMS, MATCH_METHODS, Study
from lightning_lth.experiment.store import Stage, Store, append_record, make_stage
from lightning_lth.io import (
    file_sha256,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
    write_atomic,
)
from lightning_lth.module import LTHModule
from lightning_lth.sparsity import imp
from lightning_lth.sparsity.mask import Mask
from lightning_lth.symmetry.connectivity import compare_naive_matched, plot_interpolation
from lightning_lth.symmetry.matching import match
from lightning_lth.symmetry.spec import apply_permutation, get_spec

# Trainer settings that change a stage's numbers (the rest -- loggers, progress bars,
# accelerator -- do not, and stay out of the keys).
RESULT_TRAINER_KEYS = ("precision", "gradient_clip_val", "gradient_clip_algorithm",
                       "accumulate_grad_batches", "limit_train_batches", "limit_val_batches",
                       "limit_test_batches", "devices", "num_nodes")
NOT_PASSED_TO_TRAINER = ("logger", "callbacks", "max_epochs", "default_root_dir",
                         "enable_checkpointing", "plugins")
RESULTS_FILE = "results.jsonl"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written through a temporary file + rename: kill -9 safe."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        write_atomic(Path(path), lambda handle: torch.save(checkpoint, handle))


@dataclass
class Cell:
    arm: str
    sparsity: float
    rewind_epoch: int
    stage: Stage
    epochs: int


@dataclass
class Plan:
    dense_a: Stage
    dense_b: Stage
    imp: Stage
    match: Stage
    cells: list[Cell] = field(default_factory=list)
    imp_rounds: int = 0


class Pipeline:
    """One (model, width, dataset, seed) study, built from the parsed config of a CLI."""

    def __init__(self, cli):
        config = cli.config
        self.study: Study = cli.config_init.study
        self.datamodule: LTHDataModule = cli.datamodule
        accepted = inspect.signature(LTHModule).parameters
        self.model_kwargs = {k: v for k, v in dict(cli.model.hparams).items()
                             if k in accepted and k not in ("init_weights", "mask")}
        self.trainer_config = {k: v for k, v in vars(config.trainer).items()
                               if k not in NOT_PASSED_TO_TRAINER}
        self.epochs = int(config.trainer.max_epochs or 0)
        seed = config.seed_everything
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise LTHError(f"seed_everything must be an integer for a study (it names the "
                           f"stages), got {seed!r}")
        self.seed = seed
        self.store = Store(self.study.store, is_writer=_global_rank() == 0, sync=_barrier)
        self._finished: dict[str, Path] = {}  # stage key -> its verified folder
        self._validate()

    # -- settings and keys ----------------------------------------------------------------
    def _validate(self) -> None:
        study = self.study
        if self.epochs < 1:
            raise LTHError(f"trainer.max_epochs must be >= 1 for a study, got {self.epochs}")
        for arm in study.arms + ([study.only.arm] if study.only.arm else []):
            if arm not in ARMS:
                raise LTHError(f"unknown arm {arm!r}; valid arms: {', '.join(ARMS)}")
        if study.match.method not in MATCH_METHODS:
            raise LTHError(f"unknown matching method {study.match.method!r}; valid: "
                           f"{', '.join(MATCH_METHODS)}")
        imp.check_targets(study.sparsities)  # the chain itself is checked by imp_schedule
        check_rewind_epochs(study.rewind_epochs, self.epochs)
        for k in study.rewind_epochs:
            if k >= self.epochs:
                raise LTHError(f"rewind epoch {k} leaves no sparse training: k must be < "
                               f"trainer.max_epochs={self.epochs}")
        only = study.only
        if only.sparsity is not None and not any(
                math.isclose(only.sparsity, s) for s in study.sparsities):
            raise LTHError(f"sparsity {only.sparsity} is not among the IMP chain's targets "
                           f"{study.sparsities}")
        if only.rewind_epoch is not None and only.rewind_epoch not in study.rewind_epochs:
            raise LTHError(f"rewind epoch {only.rewind_epoch} is not among the saved "
                           f"snapshots {study.rewind_epochs} (study.rewind_epochs)")

    def _common(self) -> dict:
        hp = self.model_kwargs
        dm = self.datamodule
        return {
            "model": {k: hp[k] for k in ("arch", "width", "arch_kwargs", "num_classes",
                                         "in_channels", "image_size")},
            "data": {"dataset": dm.dataset, "batch_size": dm.batch_size, "loader": dm.loader,
                     "augment": dm.augment, "mean": list(dm.mean), "std": list(dm.std),
                     "val_split": dm.val_split},
            "trainer": {k: self.trainer_config.get(k) for k in RESULT_TRAINER_KEYS},
        }

    def _label(self, seed: int) -> str:
        hp = self.model_kwargs
        return f"{hp['arch']}-w{hp['width']}-{self.datamodule.dataset}-seed{seed}"

    def dense_stage(self, seed: int) -> Stage:
        hp = self.model_kwargs
        optim = {k: hp[k] for k in ("lr", "momentum", "weight_decay", "schedule")}
        return make_stage("dense", {**self._common(), "optim": optim, "epochs": self.epochs,
                                    "seed": seed}, self._label(seed))

    def plan(self) -> Plan:
        study = self.study
        seed_b = self.seed + study.seed_b_offset
        dense_a, dense_b = self.dense_stage(self.seed), self.dense_stage(seed_b)
        dense_a_id = self._input_id(study.weights_a, dense_a)
        imp_stage = make_stage("imp", {
            **self._common(), "dense_a": dense_a_id, "targets": list(study.sparsities),
            "prune": dataclasses.asdict(study.prune), "seed": self.seed}, self._label(self.seed))
        match_stage = make_stage("match", {
            "data": self._common()["data"], "dense_a": dense_a_id,
            "dense_b": self._input_id(study.weights_b, dense_b),
            "match": dataclasses.asdict(study.match),
            "mask": file_sha256(study.mask) if study.mask else None}, self._label(self.seed))
        plan = Plan(dense_a, dense_b, imp_stage, match_stage)
        net = LTHModule(**self.model_kwargs).net
        prunable = sum(p.numel() for n, p in net.named_parameters()
                       if n in imp.prunable_names(net, study.prune.include, study.prune.exclude))
        rounds = imp.imp_schedule(prunable, study.sparsities, study.prune.fraction,
                                  study.prune.chain)
        plan.imp_rounds = sum(1 for r in rounds if r.step > 0)  # rounds that train
        only = study.only
        for sparsity in study.sparsities:
            if only.sparsity is not None and not math.isclose(sparsity, only.sparsity):
                continue
            for k in study.rewind_epochs:
                if only.rewind_epoch is not None and k != only.rewind_epoch:
                    continue
                for arm in study.arms:
                    if only.arm is not None and arm != only.arm:
                        continue
                    reads = {"init": (dense_a if arm == "lth" else dense_b).key,
                             "imp": imp_stage.key}
                    if arm == "permuted":
                        reads["match"] = match_stage.key
                    settings = {**self._common(), "arm": arm, "sparsity": sparsity,
                                "rewind_epoch": k, "epochs": self.epochs - k,
                                "sparse": dataclasses.asdict(study.sparse), "reads": reads,
                                "seed": self.seed}
                    label = f"{self._label(self.seed)}-{arm}-s{sparsity}-k{k}"
                    plan.cells.append(Cell(arm, sparsity, k, make_stage("arm", settings, label),
                                           self.epochs - k))
        return plan

    @staticmethod
    def _input_id(path: str | None, stage: Stage) -> str:
        """A stage that reads an explicit file is keyed by the file's checksum."""
        if path is None:
            return stage.key
        if not Path(path).is_file():
            raise LTHError(f"dense checkpoint not found: {path}")
        return f"file:{file_sha256(path)}"

    # -- running stages --------------------------------------------------------------------
    def _trainer(self, workdir: Path, max_epochs: int, stage: Stage, job_type: str,
                 callbacks=(), resumable: bool = True, extra_config: dict | None = None,
                 log_version: str = "", use_wandb: bool = True):
        loggers = [CSVLogger(workdir, name="logs", version=log_version)]
        wandb = self._wandb_logger(stage, job_type, extra_config or {}) if use_wandb else None
        if wandb is not None:
            loggers.append(wandb)
        callbacks = list(callbacks) + [RichProgressBar(leave=True)]
        if resumable:
            callbacks.append(ModelCheckpoint(dirpath=workdir / "checkpoints", save_last=True,
                                             save_top_k=0, every_n_epochs=1))
        return L.Trainer(**self.trainer_config, max_epochs=max_epochs, logger=loggers,
                         callbacks=callbacks, default_root_dir=workdir,
                         enable_checkpointing=resumable, plugins=[AtomicCheckpointIO()])

    def _wandb_logger(self, stage: Stage, job_type: str, extra: dict):
        mode = wandb_mode(self.study.wandb_mode)
        # Under `wandb agent` the arm logs into the agent's run; other stages stay local.
        in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
        if mode == "disabled" or (in_sweep and stage.kind != "arm"):
            return None
        hp = self.model_kwargs
        tags = [job_type, hp["arch"], self.datamodule.dataset, f"w{hp['width']}"]
        group = f"{hp['arch']}-w{hp['width']}-{self.datamodule.dataset}"
        if "sparsity" in extra:
            group += f"-s{extra['sparsity']}-k{extra['rewind_epoch']}"
            tags += [f"s{extra['sparsity']}", f"k{extra['rewind_epoch']}"]
        save_dir = Path(self.study.store) / "wandb"
        save_dir.mkdir(parents=True, exist_ok=True)
        return WandbLogger(project=self.study.wandb_project, name=stage.key,
                           id=None if in_sweep else stage.key,
                           group=group, job_type=job_type, tags=tags, mode=mode,
                           save_dir=str(save_dir), resume="allow",
                           config={"stage": stage.kind, "key": stage.key, **extra,
                                   "settings": stage.settings})

    @staticmethod
    def _resume_from(workdir: Path) -> str | None:
        last = workdir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None

    def _run(self, stage: Stage, compute) -> Path:
        # Each arm reads dense, IMP and matching: verify their checksums once per process.
        if stage.key not in self._finished:
            done = _shared_done(self.store, stage)
            try:
                self._finished[stage.key] = self.store.run(stage, compute, is_done=done)
            finally:
                _finish_wandb()
                _barrier()
        return self._finished[stage.key]

    def _test(self, trainer, module) -> dict:
        metrics = trainer.test(module, self.datamodule, verbose=False)[0]
        return {"test_acc": float(metrics["test/acc"]), "test_loss": float(metrics["test/loss"])}

    def run_dense(self, stage: Stage) -> Path:
        def compute(work: Path) -> None:
            L.seed_everything(stage.settings["seed"], workers=True)
            module = LTHModule(**self.model_kwargs)
            snapshots = RewindSnapshots(self.study.rewind_epochs, dirpath=str(work / "rewind"),
                                        overwrite=True)
            trainer = self._trainer(work, self.epochs, stage, "dense", [snapshots],
                                    extra_config={"seed": stage.settings["seed"]})
            trainer.fit(module, self.datamodule, ckpt_path=self._resume_from(work))
            metrics = self._test(trainer, module)
            if trainer.is_global_zero:
                save_json({**metrics, "rewind_epochs": snapshots.epochs}, work / "metrics.json")

        return self._run(stage, compute)

    def dense_weights(self, which: str, plan: Plan) -> str:
        explicit = self.study.weights_a if which == "a" else self.study.weights_b
        if explicit:
            return explicit
        stage = plan.dense_a if which == "a" else plan.dense_b
        return str(self.run_dense(stage) / "rewind" / "final.pt")

    def run_imp(self, plan: Plan) -> Path:
        stage, prune = plan.imp, self.study.prune
        dense = self.dense_weights("a", plan)

        def compute(work: Path) -> None:
            L.seed_everything(self.seed, workers=True)
            module = LTHModule(**{**self.model_kwargs, "lr": prune.lr, "momentum": prune.momentum,
                                  "weight_decay": prune.weight_decay, "init_weights": dense})

            trainers = []

            def make_trainer(max_epochs: int):
                # One CSV log per round; W&B gets the per-round table below, one step a round
                # (each round's trainer restarts its step count).
                trainers.append(self._trainer(work, max_epochs, stage, "imp", resumable=False,
                                              log_version=f"trainer_{len(trainers)}",
                                              use_wandb=False))
                return trainers[-1]

            meta = {"model": self.model_kwargs["arch"], "width": self.model_kwargs["width"]}
            log = imp.run_imp(module, self.datamodule, make_trainer, self.study.sparsities,
                              prune, work, meta)
            wandb = self._wandb_logger(stage, "imp", {}) if self.store.is_writer else None
            for entry in log if wandb is not None else []:
                wandb.log_metrics({f"imp/{key}": entry[key] for key in
                                   ("sparsity", "zeros", "test_acc", "test_loss")
                                   if entry.get(key) is not None}, step=entry["index"])

        return self._run(stage, compute)

    def _net(self, weights: str) -> torch.nn.Module:
        return LTHModule(**{**self.model_kwargs, "init_weights": weights}).net

    def run_match(self, plan: Plan) -> Path:
        stage, settings = plan.match, self.study.match
        mask = Mask.load(self.study.mask) if self.study.mask else None
        if mask is not None:  # a mask of another model fails here, before any work
            mask.check_fits(LTHModule(**self.model_kwargs).net, self.model_kwargs["arch"],
                            self.model_kwargs["width"])
        weights_a, weights_b = self.dense_weights("a", plan), self.dense_weights("b", plan)

        def compute(work: Path) -> None:
            device = self._device()
            net_a, net_b = self._net(weights_a).to(device), self._net(weights_b).to(device)
            train = self.datamodule.unaugmented_train_batches(device)
            perm = match(net_a, net_b, method=settings.method, batches=train,
                         num_batches=settings.num_batches, seed=settings.seed)
            _check_ranks_agree("the permutation", perm)
            spec = get_spec(net_a)
            state_a = {k: v.detach().cpu() for k, v in net_a.state_dict().items()}
            state_b = {k: v.detach().cpu() for k, v in net_b.state_dict().items()}
            curves = compare_naive_matched(
                net_a, state_a, state_b, perm, self.datamodule.test_batches(device), train,
                spec=spec, num_alphas=settings.interpolation_points,
                bn_batches=settings.bn_reset_batches)
            if not self.store.is_writer:
                return
            save_tensors({"perm": perm, "meta": {"method": settings.method}}, work / "perm.pt")
            save_tensors({"state_dict": apply_permutation(state_a, spec, perm), "epoch": None,
                          "meta": {"permuted_to": weights_b}}, work / "weights_a_permuted.pt")
            save_json(curves, work / "connectivity.json")
            plot_interpolation(curves["naive"], curves["matched"], work / "interpolation.png",
                               title=self._label(self.seed))
            if mask is not None:
                apply_permutation(mask, spec, perm).save(work / "mask_permuted.pt")
            self._log_connectivity(stage, curves, work / "interpolation.png")

        return self._run(stage, compute)

    def _log_connectivity(self, stage: Stage, curves: dict, png: Path) -> None:
        """The interpolation curves (one step per alpha), barriers and plot to W&B."""
        wandb = self._wandb_logger(stage, "match", {"method": self.study.match.method})
        if wandb is None:
            return
        for index, alpha in enumerate(curves["naive"]["alphas"]):
            wandb.log_metrics({f"match/{side}_{metric}": curves[side][metric][index]
                               for side in ("naive", "matched") for metric in ("loss", "acc")}
                              | {"match/alpha": alpha}, step=index)
        wandb.experiment.summary.update(
            {f"match/{side}_{barrier}": curves[side][barrier] for side in ("naive", "matched")
             for barrier in ("loss_barrier", "error_barrier")})
        wandb.log_image("match/interpolation", [str(png)])

    def _device(self) -> torch.device:
        accelerator = str(self.trainer_config.get("accelerator", "auto"))
        if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def run_arm(self, plan: Plan, cell: Cell, imp_dir: Path, match_dir: Path | None) -> Path:
        stage, sparse = cell.stage, self.study.sparse
        source = plan.dense_a if cell.arm == "lth" else plan.dense_b
        init = self.run_dense(source) / "rewind" / snapshot_name(cell.rewind_epoch)
        if not init.is_file():
            raise LTHError(f"rewind epoch {cell.rewind_epoch} was not saved for "
                           f"{source.key} (it has {self._saved_epochs(source)}); "
                           f"use one of those")

        def compute(work: Path) -> None:
            started = time.time()
            L.seed_everything(self.seed, workers=True)
            module = LTHModule(**{**self.model_kwargs, "lr": sparse.lr,
                                  "momentum": sparse.momentum,
                                  "weight_decay": sparse.weight_decay, "init_weights": str(init)})
            mask = Mask.load(imp.mask_path(imp_dir, cell.sparsity))
            if cell.arm == "permuted":
                perm = load_perm(match_dir / "perm.pt")
                mask = apply_permutation(mask, get_spec(module.net), perm)
            mask.check_fits(module.net, self.model_kwargs["arch"], self.model_kwargs["width"])
            _check_ranks_agree(f"the {cell.arm} mask", mask.tensors)
            module.mask = mask
            extra = {"method": cell.arm, "sparsity": cell.sparsity,
                     "rewind_epoch": cell.rewind_epoch, "seed": self.seed,
                     "width": self.model_kwargs["width"], "model": self.model_kwargs["arch"],
                     "dataset": self.datamodule.dataset}
            trainer = self._trainer(work, cell.epochs, stage, cell.arm, extra_config=extra)
            trainer.fit(module, self.datamodule, ckpt_path=self._resume_from(work))
            metrics = self._test(trainer, module)
            if trainer.is_global_zero:
                mask.save(work / "mask.pt")
                save_tensors({"state_dict": {k: v.detach().cpu() for k, v in
                                             module.net.state_dict().items()},
                              "epoch": self.epochs, "meta": {"arm": cell.arm}},
                             work / "final.pt")
                result = {**metrics, "wall_time_s": time.time() - started}
                save_json(result, work / "result.json")
                record = self.record(plan, cell, result, imp_dir, match_dir)
                for logger in trainer.loggers:
                    if isinstance(logger, WandbLogger):
                        logger.experiment.summary.update(record)

        return self._run(stage, compute)

    def _saved_epochs(self, stage: Stage) -> list[int]:
        return load_json(self.store.path(stage) / "metrics.json").get("rewind_epochs", [])

    def record(self, plan: Plan, cell: Cell, result: dict, imp_dir: Path,
               match_dir: Path) -> dict:
        hp = self.model_kwargs
        dense_a = load_json(self.store.path(plan.dense_a) / "metrics.json")
        dense_b = load_json(self.store.path(plan.dense_b) / "metrics.json")
        rounds = load_json(imp_dir / "rounds.json")
        pruned = [r for r in rounds if r.get("target") is not None
                  and math.isclose(r["target"], cell.sparsity)]
        curves = load_json(match_dir / "connectivity.json")
        return {
            "model": hp["arch"], "dataset": self.datamodule.dataset, "width": hp["width"],
            "seed": self.seed, "method": cell.arm, "sparsity": cell.sparsity,
            "rewind_epoch": cell.rewind_epoch, "test_acc": result["test_acc"],
            "test_loss": result["test_loss"], "dense_acc_a": dense_a["test_acc"],
            "dense_acc_b": dense_b["test_acc"],
            "pruned_acc_a": pruned[-1]["test_acc"] if pruned else float("nan"),
            "barrier_loss_before": curves["naive"]["loss_barrier"],
            "barrier_loss_after": curves["matched"]["loss_barrier"],
            "barrier_error_before": curves["naive"]["error_barrier"],
            "barrier_error_after": curves["matched"]["error_barrier"],
            "connectivity": str((match_dir / "connectivity.json").resolve()),
            "wall_time_s": result["wall_time_s"], "key": cell.stage.key,
            "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def run_experiment(self) -> list[dict]:
        plan = self.plan()
        started = time.time()
        self.run_dense(plan.dense_a)
        self.run_dense(plan.dense_b)
        imp_dir = self.run_imp(plan)
        match_dir = self.run_match(plan)
        records = []
        for cell in plan.cells:
            arm_dir = self.run_arm(plan, cell, imp_dir, match_dir)
            record = self.record(plan, cell, load_json(arm_dir / "result.json"), imp_dir,
                                 match_dir)
            if self.store.is_writer:
                append_record(Path(self.study.store) / RESULTS_FILE, record)
            records.append(record)
        _print(f"experiment: {len(records)} arm results in {time.time() - started:.1f} s; "
               f"results file {Path(self.study.store) / RESULTS_FILE}")
        return records

    def describe(self) -> dict:
        """The plan without running anything: stages, their keys and status, epochs."""
        plan = self.plan()
        study, T = self.study, self.epochs
        stages = [(plan.dense_a, T), (plan.dense_b, T),
                  (plan.imp, plan.imp_rounds * study.prune.epochs_per_round), (plan.match, 0)]
        cells = [{"arm": c.arm, "sparsity": c.sparsity, "rewind_epoch": c.rewind_epoch,
                  "key": c.stage.key, "status": self.store.status(c.stage),
                  "epochs": c.epochs} for c in plan.cells]
        return {
            "stages": [{"stage": s.kind, "key": s.key, "status": self.store.status(s),
                        "epochs": epochs} for s, epochs in stages],
            "cells": cells,
            "epochs": sum(e for _, e in stages) + sum(c["epochs"] for c in cells),
        }


def load_perm(path: Path) -> dict[str, torch.Tensor]:
    data = load_tensors(path, what="permutation file")
    if not isinstance(data, dict) or not isinstance(data.get("perm"), dict):
        raise LTHError(f"permutation file {path} holds no 'perm'")
    return data["perm"]


def wandb_mode(setting: str) -> str:
    """auto: online when W&B credentials are present, else offline (never a prompt)."""
    modes = ("auto", "online", "offline", "disabled")
    if setting not in modes:
        raise LTHError(f"unknown study.wandb_mode {setting!r}; valid: {', '.join(modes)}")
    if os.environ.get("WANDB_MODE") in modes[1:]:
        return os.environ["WANDB_MODE"]
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        found = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        found = None
    return "online" if found else "offline"


def _global_rank() -> int:
    """This process's rank; before the process group exists, read from the launcher's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    launcher = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return 0 if all(int(os.environ.get(name, 0)) == 0 for name in launcher) else 1


def _shared_done(store: Store, stage: Stage):
    """Under DDP rank 0 decides whether a stage is finished and every rank follows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    flag = [store.status(stage) == "done" and store.verify(stage)] if dist.get_rank() == 0 \
        else [None]
    dist.broadcast_object_list(flag, src=0)
    return lambda: bool(flag[0])


def _check_ranks_agree(what: str, tensors: dict[str, torch.Tensor]) -> None:
    """Under DDP: every rank must hold the same tensors (masks, pi), else stop loudly."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise LTHError(f"DDP ranks disagree on {what}: {digests}")
    _print(f"ranks agree on {what} ({len(digests)} ranks)")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _finish_wandb() -> None:
    wandb = sys.modules.get("wandb")  # only a run that was started needs finishing
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _print(message: str) -> None:
    if _global_rank() == 0:
        print(message, flush=True)


def run_command(command: str, cli) -> int:
    pipeline = Pipeline(cli)
    if command == "plan":
        if pipeline.store.is_writer:
            print(json.dumps(pipeline.describe(), indent=2))
        return 0
    if command == "experiment":
        pipeline.run_experiment()
        return 0
    plan = pipeline.plan()
    if command == "prune":
        path = pipeline.run_imp(plan)
    else:
        path = pipeline.run_match(plan)
    _print(f"{command}: outputs in {path}")
    return 0
