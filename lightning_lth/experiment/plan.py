"""The plan: one study's stages, from its resolved config alone, without training.

    dense A, dense B      T epochs each, saving the rewind and matching snapshots the study
                          asks for; B only up to the last epoch the study reads of it when
                          that is < T (a snapshot stage "dense B to epoch j", see below)
    snapshot              a rewind epoch that a finished dense net did not save
    imp                   one stage per IMP round; each reads the round before it
    match                 pi between A and B at one epoch pair, by one method, and the
                          interpolation; one stage per study.match.epochs x methods
    arm                   arm registry entry x sparsity x k, T - k epochs; an arm that
                          needs a pi (``needs_match``: the permuted arm) once per match stage
                          (``permuted@b1``, ``permuted[weight]``)

With ``study.replicates`` R > 1, replicate r = 1..R-1 adds its own dense B_r (seed:
``b_seed``), its match stages from A to B_r and every arm again ("dense B r1", "match r1",
"arm naive S=0.9 k=2 r1"); dense A and the IMP chain stay one. Replicate 0 is the study
without replicates, stage for stage (docs/replicates.md).

Every input is checked here, before any stage starts: a refused study leaves nothing behind.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lightning_lth import numerics
from lightning_lth.data import dataset_info
from lightning_lth.errors import LTHError
from lightning_lth.experiment import keys
from lightning_lth.experiment.config import (
    SEED_MAX,
    MatchSettings,
    OnlyCells,
    ResumeSettings,
    SparseSettings,
    Study,
)
from lightning_lth.experiment.stages import (
    ARMS,
    ArmGroup,
    ArmStage,
    DenseStage,
    ImpRound,
    MatchStage,
    SnapshotStage,
    Stage,
    WeightsRef,
    fusable,
    prunable_names,
)
from lightning_lth.experiment.tracking import wandb_mode
from lightning_lth.io import file_sha256
from lightning_lth.models import build_model, check_forward
from lightning_lth.sparsity import imp
from lightning_lth.sparsity.imp import PruneSettings
from lightning_lth.symmetry.matching import METHODS as MATCH_METHODS
from lightning_lth.symmetry.trace import get_spec
from lightning_lth.training.callbacks import check_rewind_epochs

SECTIONS = {"prune": PruneSettings, "match": MatchSettings, "sparse": SparseSettings,
            "only": OnlyCells, "resume": ResumeSettings}


def study_settings(config: dict) -> Study:
    section = dict(config["study"])
    return Study(**{**section, **{name: kind(**section[name]) for name, kind in SECTIONS.items()
                                  if name in section}})


def plain(value):
    """``value`` with the parser's range types (``PositiveInt`` ... subclasses of int and
    float) as plain numbers: they reach checkpoints, whose weights-only load refuses them."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    if isinstance(value, int) and not isinstance(value, bool) and type(value) is not int:
        return int(value)
    if isinstance(value, float) and type(value) is not float:
        return float(value)
    return value


def resolve(config: dict) -> dict:
    """The config as the study uses it: plain values, and the model's shapes from the
    dataset (the CLI links them only when it instantiates the classes)."""
    config = plain(config)
    info = dataset_info(config["data"]["dataset"])
    model = dict(config["model"], num_classes=info.num_classes, in_channels=info.in_channels,
                 image_size=info.image_size)
    return {**config, "model": model}


# Dense B_r's seed for r >= 1 is r strides above B's (``b_seed``): distinct for every
# (seed, r) of a grid whose seeds span less than a stride, and far above any A seed people
# pick (docs/replicates.md).
REPLICATE_SEED_STRIDE = 2**24


def b_seed(seed: int, offset: int, replicate: int) -> int:
    """Dense B_r's seed: r = 0 is the paper's B, ``seed_everything + study.seed_b_offset``."""
    return seed + offset + replicate * REPLICATE_SEED_STRIDE


def replicate_tag(replicate: int, sep: str = " r") -> str:
    """How a stage of replicate r >= 1 is told apart in names (" r1") and labels ("-rep1");
    replicate 0's are the names and labels of a study without replicates."""
    return f"{sep}{replicate}" if replicate else ""


def in_order(stages: list[Stage]) -> list[Stage]:
    """``stages`` and everything they read, each once, after the stages it reads."""
    ordered: dict[str, Stage] = {}

    def visit(stage: Stage) -> None:
        if stage.key in ordered:
            return
        for needed in stage.reads():
            visit(needed)
        ordered[stage.key] = stage

    for stage in stages:
        visit(stage)
    return list(ordered.values())


@dataclass
class Replicate:
    """Replicate r's own stages: dense B_r and the match stages from A to it (pi_r)."""

    index: int  # r
    dense_b: DenseStage
    b_until: int  # the epoch B_r trains to: T, or the last one the study reads of it
    matches: list[MatchStage]

    @property
    def b_epochs_saved(self) -> int:
        """B_r's epochs this study does not train, against training it to T."""
        return self.dense_b.epochs - self.b_until

    @property
    def final_match(self) -> MatchStage | None:
        """Both nets at T by the first method: the paper's pi (records' barrier_* fields)."""
        return next((m for m in self.matches if m.suffix == ""), None)


@dataclass
class Plan:
    dense_a: DenseStage
    rounds: list[ImpRound]
    targets: dict[float, ImpRound]  # the round that lands on each target sparsity
    replicates: list[Replicate]  # those the study runs: all, or study.only.replicate's
    arms: list[ArmStage] = field(default_factory=list)

    @property
    def stages(self) -> list[Stage]:
        """Every stage once, each after the stages it reads (a truncated B: through them)."""
        full_bs = [rep.dense_b for rep in self.replicates if rep.b_epochs_saved == 0]
        return in_order([self.dense_a, *full_bs, *self.rounds, *self.matches, *self.arms])

    @property
    def matches(self) -> list[MatchStage]:
        return [matching for rep in self.replicates for matching in rep.matches]

    def replicate(self, index: int) -> Replicate:
        return next(rep for rep in self.replicates if rep.index == index)

    # The first planned replicate's (0, or study.only.replicate's): what a study without
    # replicates has.
    @property
    def dense_b(self) -> DenseStage:
        return self.replicates[0].dense_b

    @property
    def b_until(self) -> int:
        return self.replicates[0].b_until

    @property
    def b_epochs_saved(self) -> int:
        return self.replicates[0].b_epochs_saved

    @property
    def final_match(self) -> MatchStage | None:
        return self.replicates[0].final_match

    @property
    def epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)

    def arm_groups(self, size: int) -> list[ArmGroup]:
        """The arms in groups that can train fused (one data order, one schedule: every arm
        of one k and replicate), in plan order, each of at most ``size`` (1: every arm alone)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise LTHError(f"study.fuse must be an integer >= 1 (1: arms alone), got {size!r}")
        by_order: dict[tuple, list[ArmStage]] = {}
        for arm in self.arms:
            by_order.setdefault(fusable(arm), []).append(arm)
        return [ArmGroup(tuple(arms[start:start + size])) for arms in by_order.values()
                for start in range(0, len(arms), size)]


def match_pairs(entries: list | None, epochs: int) -> list[tuple[int, int]]:
    """study.match.epochs as (A's epoch, B's epoch) pairs: j is (T, j), [i, j] is (i, j)."""
    pairs = []
    for entry in [epochs] if entries is None else entries:
        if isinstance(entry, int) and not isinstance(entry, bool):
            pair = (epochs, entry)
        elif (isinstance(entry, (list, tuple)) and len(entry) == 2
              and all(isinstance(e, int) and not isinstance(e, bool) for e in entry)):
            pair = (entry[0], entry[1])
        else:
            raise LTHError(f"study.match.epochs entry {entry!r} is neither an epoch j (B at j, "
                           f"A at T) nor a pair [i, j] (A at i, B at j)")
        if not all(0 <= e <= epochs for e in pair):
            raise LTHError(f"study.match.epochs entry {entry!r}: matching epochs must be in "
                           f"0..trainer.max_epochs={epochs}")
        if pair in pairs:
            raise LTHError(f"study.match.epochs names the epoch pair (A {pair[0]}, B "
                           f"{pair[1]}) twice")
        pairs.append(pair)
    return pairs


def match_suffix(method: str, pair: tuple[int, int], epochs: int) -> str:
    """How a permuted arm's label tells its pi from the paper's (activation, both at T):
    ``@b{j}`` (A at T), ``@a{i}b{j}``, then ``[method]``; empty for the paper's own."""
    a, b = pair
    where = "" if pair == (epochs, epochs) else f"@b{b}" if a == epochs else f"@a{a}b{b}"
    return where + ("" if method == next(iter(MATCH_METHODS)) else f"[{method}]")


def _check_study(config: dict, study: Study, epochs: int) -> None:
    seed = config.get("seed_everything")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LTHError(f"seed_everything must be an integer for a study (it names the "
                       f"stages), got {seed!r}")
    if epochs < 1:
        raise LTHError(f"trainer.max_epochs must be >= 1 for a study, got {epochs}")
    for name in ("init_weights", "mask", "schedule_epochs"):
        if config["model"].get(name) is not None:
            raise LTHError(f"model.{name} is for `fit`; a study sets it per stage (use "
                           f"study.weights_a / study.weights_b / study.mask for your files)")
    for name in ("optimizer", "lr_scheduler"):
        if config.get(name) is not None:
            raise LTHError(f"--{name} is for `fit`; a study's optimisers are the paper's "
                           f"(model.lr, study.prune.*, study.sparse.*)")
    only = study.only
    for arm in study.arms + ([only.arm] if only.arm else []):
        if arm not in ARMS:
            raise LTHError(f"unknown arm {arm!r}; valid arms: {', '.join(ARMS)}")
    methods = study.match.methods
    if not methods:
        raise LTHError("study.match.methods is empty; give at least one of "
                       f"{', '.join(MATCH_METHODS)}")
    for method in methods:
        if method not in MATCH_METHODS:
            raise LTHError(f"unknown matching method {method!r}; valid: "
                           f"{', '.join(MATCH_METHODS)}")
    if len(set(methods)) != len(methods):
        raise LTHError(f"study.match.methods lists a method twice: {methods}")
    pairs = match_pairs(study.match.epochs, epochs)
    if only.match_method is not None and only.match_method not in methods:
        raise LTHError(f"matching method {only.match_method!r} is not among "
                       f"study.match.methods {methods}")
    if only.match_epoch is not None and match_pairs([only.match_epoch], epochs)[0] not in pairs:
        raise LTHError(f"matching epoch {only.match_epoch!r} is not among study.match.epochs "
                       f"{study.match.epochs if study.match.epochs is not None else [epochs]}")
    for role, path in (("A", study.weights_a), ("B", study.weights_b)):
        index = 0 if role == "A" else 1
        if path is not None and any(pair[index] != epochs for pair in pairs):
            raise LTHError(f"study.weights_{role.lower()} is a trained net: matching at an "
                           f"epoch of {role} before T={epochs} needs the study's own dense "
                           f"{role} (study.match.epochs {study.match.epochs})")
    wandb_mode(study.wandb_mode)
    last = study.replicates - 1
    nets = [("A", seed), ("B", b_seed(seed, study.seed_b_offset, 0))]
    if last:  # B_r's seeds grow with r: the last one is the largest
        nets.append((f"B r{last}", b_seed(seed, study.seed_b_offset, last)))
    for role, net_seed in nets:
        if not 0 <= net_seed <= SEED_MAX:
            replicates = f", study.replicates={study.replicates}" if last else ""
            raise LTHError(f"dense {role}'s seed {net_seed} (seed_everything={seed}, "
                           f"study.seed_b_offset={study.seed_b_offset}{replicates}) is not "
                           f"allowed: seeds must be in 0..{SEED_MAX}")
    if only.replicate is not None and not 0 <= only.replicate <= last:
        allowed = f"0..{last}" if last else "0 only"
        raise LTHError(f"study.only.replicate={only.replicate} is not among the study's "
                       f"replicates ({allowed}: study.replicates={study.replicates})")
    if study.weights_b is not None and last:
        raise LTHError(f"study.weights_b is one trained B; study.replicates={study.replicates} "
                       f"trains a dense B of its own per replicate: leave one of them out")
    if not str(study.store).strip():
        raise LTHError("study.store is empty; give the stage store's folder (default: store)")
    store = Path(study.store)
    if store.exists() and not store.is_dir():
        raise LTHError(f"study.store {study.store} is a file; give a folder (new or a store)")
    if study.seed_b_offset == 0:
        raise LTHError("study.seed_b_offset=0 makes dense B the same net as dense A; give "
                       "any other integer (default 1000)")
    imp.check_targets(study.sparsities)
    if not study.rewind_epochs:
        raise LTHError("study.rewind_epochs is empty; give at least one rewind epoch k in "
                       f"0..{epochs - 1} (the arms train from epoch k)")
    if len(check_rewind_epochs(study.rewind_epochs, epochs)) != len(study.rewind_epochs):
        raise LTHError(f"study.rewind_epochs lists an epoch twice: {study.rewind_epochs}")
    for k in study.rewind_epochs:
        if k >= epochs:
            raise LTHError(f"rewind epoch {k} leaves no sparse training: k must be < "
                           f"trainer.max_epochs={epochs}")
    if only.sparsity is not None and not any(
            math.isclose(only.sparsity, s) for s in study.sparsities):
        raise LTHError(f"sparsity {only.sparsity} is not among the IMP chain's targets "
                       f"{study.sparsities}")
    if only.rewind_epoch is not None and only.rewind_epoch not in study.rewind_epochs:
        raise LTHError(f"rewind epoch {only.rewind_epoch} is not among the saved "
                       f"snapshots {study.rewind_epochs} (study.rewind_epochs)")
    for name in ("weights_a", "weights_b", "mask"):
        path = getattr(study, name)
        if path is not None and not Path(path).is_file():
            raise LTHError(f"study.{name} not found: {path}")


def prunable_count(model: dict, prune: PruneSettings) -> int:
    """How many weights IMP prunes: from the model's shapes alone (a meta-device model)."""
    with torch.device("meta"):
        net = build_model(model["arch"], model["width"], model["num_classes"],
                          model["in_channels"], model["image_size"], model.get("arch_kwargs"))
    names = set(prunable_names(net, prune))
    return sum(p.numel() for name, p in net.named_parameters() if name in names)


MODEL_SHAPE = ("arch", "width", "num_classes", "in_channels", "image_size", "arch_kwargs")
_passed_models: set[tuple[str, bool]] = set()  # (model, matching) that passed, this process


def preflight(model: dict, matching: bool) -> None:
    """Refuse, before any stage, a model the stages could not use: it must build for the
    data's shape and turn an example batch into one score per class; where the study
    matches, its permutation spec must derive (and pass its check) as the match stage derives
    it. On the CPU, two zero images, torch's random state left as it was; once per model in
    a process (a grid plans many cells of one model)."""
    key = (json.dumps({name: model.get(name) for name in MODEL_SHAPE}, sort_keys=True,
                      default=str), matching)
    if key in _passed_models:
        return
    with torch.random.fork_rng(devices=[]):
        net = build_model(*(model[name] for name in MODEL_SHAPE[:5]), model.get("arch_kwargs"))
        example = check_forward(net, model["arch"], model["num_classes"],
                                model["in_channels"], model["image_size"])
        if matching:
            get_spec(net, example)
    _passed_models.add(key)


def _file_ref(path: str) -> WeightsRef:
    return WeightsRef(f"file:{file_sha256(path)}", None, str(path))


def build_plan(config: dict, saved_epochs: Callable[[str], list[int] | None],
               with_arms: bool = True, matching: bool = True) -> Plan:
    """The stages of the study. ``saved_epochs(dense key)``: the rewind epochs a finished
    dense stage holds (None: not finished, it will save what the study asks for).
    ``matching``: the command runs match stages (all but `prune`), so the model's
    permutation spec is checked first."""
    config = resolve(config)
    study = study_settings(config)
    epochs = int(config["trainer"].get("max_epochs") or 0)
    _check_study(config, study, epochs)
    preflight(config["model"], matching)
    model, seed = config["model"], config["seed_everything"]
    label = f"{model['arch']}-w{model['width']}-{config['data']['dataset']}"

    def keyed(stage: Stage, view: dict = config) -> Stage:
        inputs = keys.key_inputs(stage.kind, stage.identity(), view,
                                 numerics.versions(stage.components, model["arch"]))
        return replace(stage, key=keys.stage_key(stage.label, inputs), key_inputs=inputs)

    pairs = match_pairs(study.match.epochs, epochs)
    uses_b = any(ARMS[name].init == "B" for name in study.arms)
    reads = {"A": {i for i, _ in pairs} | set(study.rewind_epochs),
             "B": {j for _, j in pairs} | (set(study.rewind_epochs) if uses_b else set())}

    def dense(role: str, net_seed: int, replicate: int = 0) -> DenseStage:
        return keyed(DenseStage(
            name=f"dense {role}{replicate_tag(replicate)}", label=f"{label}-seed{net_seed}",
            role=role, seed=net_seed, epochs=epochs,
            save_epochs=tuple(sorted(e for e in reads[role] if e < epochs))))

    def snapshot(net: DenseStage, k: int, given: str | None = None,
                 truncated: SnapshotStage | None = None, replicate: int = 0) -> WeightsRef:
        """``net``'s weights after k epochs (k = T: its final weights): the user's file
        ``given``, or a truncated run's snapshot, or the dense stage's, or a snapshot stage."""
        if given:
            return _file_ref(given)
        if truncated is not None:
            return truncated.weights(k)
        if k == epochs:
            return net.weights(None)
        saved = saved_epochs(net.key)
        if saved is None or k in saved:
            return net.weights(k)
        return keyed(SnapshotStage(name=f"snapshot {net.role} k={k}{replicate_tag(replicate)}",
                                   label=f"{net.label}-k{k}", dense=net, epoch=k,
                                   epochs=k)).weights()

    dense_a = dense("A", seed)
    prunable = prunable_count(model, study.prune)
    schedule = imp.imp_schedule(prunable, study.sparsities, study.prune.fraction,
                                study.prune.chain)
    rounds: list[ImpRound] = []
    targets: dict[float, ImpRound] = {}
    last_in_chain: dict[int, ImpRound] = {}
    for rnd in schedule:
        previous = last_in_chain.get(rnd.chain) if rnd.step > 1 else None
        stage = keyed(ImpRound(
            name=f"imp round {rnd.step} S={rnd.zeros / prunable:.4f}",
            label=f"{label}-seed{seed}-r{rnd.step}", seed=seed, step=rnd.step, zeros=rnd.zeros,
            prunable=prunable, previous=previous,
            dense=snapshot(dense_a, epochs, study.weights_a),
            epochs=study.prune.epochs_per_round if rnd.step > 0 else 0))
        rounds.append(stage)
        last_in_chain[rnd.chain] = stage
        if rnd.target is not None:
            targets[rnd.target] = stage

    mask = _file_ref(study.mask) if study.mask else None
    replicates: list[Replicate] = []
    b_snapshots: dict[int, Callable[[int], WeightsRef]] = {}  # r -> B_r after k epochs
    only = study.only
    for r in range(study.replicates):
        if only.replicate is not None and r != only.replicate:
            continue
        net_b = dense("B", b_seed(seed, study.seed_b_offset, r), r)
        # B_r trains only as far as the study reads it, unless the store has it trained to T.
        b_until = max(reads["B"]) if saved_epochs(net_b.key) is None else epochs
        truncated = None if b_until == epochs else keyed(SnapshotStage(
            name=f"dense B to epoch {b_until}{replicate_tag(r)}",
            label=f"{net_b.label}-to{b_until}", dense=net_b, epoch=b_until, epochs=b_until,
            save_epochs=net_b.save_epochs, continuable=True))
        b_snapshots[r] = functools.partial(snapshot, net_b, given=study.weights_b,
                                           truncated=truncated, replicate=r)
        matches = []
        for pair in pairs:
            for method in study.match.methods:
                suffix = match_suffix(method, pair, epochs)
                matches.append(keyed(MatchStage(
                    name=f"match{suffix}{replicate_tag(r)}",
                    label=f"{label}-seed{seed}{suffix}{replicate_tag(r, '-rep')}",
                    a=snapshot(dense_a, pair[0], study.weights_a), b=b_snapshots[r](pair[1]),
                    mask=mask, method=method, a_epoch=pair[0], b_epoch=pair[1],
                    suffix=suffix), keys.match_view(config, method)))
        replicates.append(Replicate(r, net_b, b_until, matches))
    plan = Plan(dense_a, rounds, targets, replicates)
    if not with_arms:
        return plan
    if study.weights_a or study.weights_b:
        raise LTHError("study.weights_a / study.weights_b are inputs of `prune` and `match`; "
                       "`experiment` trains its own dense nets, with their rewind snapshots")

    for rep in replicates:
        r = rep.index
        chosen = [m for m in rep.matches
                  if (only.match_method is None or m.method == only.match_method)
                  and (only.match_epoch is None
                       or (m.a_epoch, m.b_epoch) == match_pairs([only.match_epoch], epochs)[0])]
        for sparsity in study.sparsities:
            if only.sparsity is not None and not math.isclose(sparsity, only.sparsity):
                continue
            for k in study.rewind_epochs:
                if only.rewind_epoch is not None and k != only.rewind_epoch:
                    continue
                for name in study.arms:
                    if only.arm is not None and name != only.arm:
                        continue
                    arm = ARMS[name]
                    init = snapshot(dense_a, k) if arm.init == "A" else b_snapshots[r](k)
                    for matching in chosen if arm.needs_match else [None]:
                        shown = name + (matching.suffix if matching else "")
                        plan.arms.append(keyed(ArmStage(
                            name=f"arm {shown} S={sparsity} k={k}{replicate_tag(r)}",
                            label=f"{label}-seed{seed}-{shown}-s{sparsity}-k{k}"
                                  f"{replicate_tag(r, '-rep')}",
                            arm=arm, seed=seed, sparsity=sparsity, rewind_epoch=k, init=init,
                            round=targets[sparsity], matching=matching, epochs=epochs - k,
                            replicate=r)))
    return plan
