"""The stage graph of a grid: every stage of every cell, each once, with what it reads.

A grid is a sweep file (``sweeps/*.yaml``, the file the W&B agents use) or a config plus
values to vary. Each cell is one ``experiment`` run; its plan (``build_plan``) lists its
stages under keys that identical stages of other cells share, so the union of the cells'
plans is the grid's graph. Cells that differ only in ``study.only.*`` (which only selects
arms, and is in no key) share one parsed config and one plan: a 972-cell grid parses 9
configs, not 972. A cell's shared stages are dense A and the IMP chain, and dense B_r
with its matching for each replicate r the cell selects (``study.only.replicate``: one;
else all): dense A and the chain are one node for every replicate's cells.

Besides what each stage reads, every stage past the shared ones waits for its replicate's
matching, as in ``experiment``, which runs all of them before any arm: an arm's record reads
both dense nets and the matching of its replicate (``Runner.record``).

A node is one *schedulable unit*: one job runs its stages in order. ``units`` makes one unit
per stage, except a fused arm group (``study.fuse`` > 1, or the device's default: see
``Runner.fuse_size``), which is one unit whose job trains its members side by side
(``Runner.run_group``). Groups are formed as ``experiment`` forms them (``Plan.arm_groups``),
over the arms that the cells of one parsed config select together: a group may span cells
(e.g. one cell per arm), since those cells share the plan and a group is only a way of
computing those stages; it never spans parsed configs. The fuse size is decided where the
graph is built (the driver): give ``study.fuse`` when the jobs run on another device type.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from lightning_lth.errors import LTHError
from lightning_lth.experiment.plan import Plan, Replicate, in_order, match_pairs
from lightning_lth.experiment.stages import ArmGroup, ArmStage, Stage
from lightning_lth.io import load_yaml

ONLY = "study.only."
ONLY_FIELDS = ("sparsity", "rewind_epoch", "arm", "match_epoch", "match_method", "replicate")
COMMAND = "experiment"
FUSED = "fused"  # the kind of a fused arm group's unit


@dataclass(frozen=True)
class GridSpec:
    """Cells = the product of ``parameters`` (in order); each cell's arguments are ``base``,
    then ``--name=value`` per parameter, then ``overrides`` (for every cell)."""

    base: tuple[str, ...]
    parameters: dict[str, list]
    overrides: tuple[str, ...] = ()

    def cells(self) -> list[dict]:
        names = list(self.parameters)
        return [dict(zip(names, values, strict=True))
                for values in itertools.product(*self.parameters.values())]

    def argv(self, params: dict) -> list[str]:
        return [*self.base, *(f"--{name}={argument(value)}" for name, value in params.items()),
                *self.overrides]


def argument(value) -> str:
    """A value as the command line takes it (W&B's ``${args}`` writes ``--name=value``)."""
    return value if isinstance(value, str) else json.dumps(value)


def from_sweep(path: str | Path, overrides: Sequence[str] = ()) -> GridSpec:
    """The grid of a W&B grid sweep file whose command runs ``experiment``."""
    sweep = load_yaml(path, "sweep file")
    if not isinstance(sweep, dict) or sweep.get("method") != "grid":
        raise LTHError(f"{path}: a grid needs a W&B sweep file with method: grid")
    command = [str(part) for part in sweep.get("command", [])]
    if COMMAND not in command or "${args}" not in command:
        raise LTHError(f"{path}: the sweep's command must run `{COMMAND}` with ${{args}}, got "
                       f"{command}")
    base = [part for part in command[command.index(COMMAND) + 1:] if not part.startswith("${")]
    parameters = {}
    if not isinstance(sweep.get("parameters", {}), dict):
        raise LTHError(f"{path}: the sweep's parameters must be a mapping of NAME to "
                       f"{{values: [...]}} or {{value: ...}}")
    for name, spec in sweep.get("parameters", {}).items():
        if isinstance(spec, dict) and isinstance(spec.get("values"), list):
            parameters[name] = list(spec["values"])
        elif isinstance(spec, dict) and "value" in spec:
            parameters[name] = [spec["value"]]
        else:
            raise LTHError(f"{path}: parameter {name} needs `values` (a list) or `value` for "
                           f"a grid")
    return GridSpec(tuple(base), parameters, tuple(overrides))


@dataclass(frozen=True)
class Node:
    """One schedulable unit: its stages' keys (run in this order by one job), the units it
    reads, its training epochs and what its cost depends on."""

    key: str
    stages: tuple[str, ...]
    kind: str
    name: str
    epochs: int
    needs: tuple[str, ...]
    argv: tuple[str, ...]  # a cell config whose plan holds these stages (for the job)
    arch: str
    width: int
    weights: int  # prunable weights of the model: how an untimed width's cost is scaled
    done: bool  # finished in the store when the graph was built

    @property
    def fused(self) -> bool:
        """A fused arm group: its job trains its stages side by side, not in order."""
        return self.kind == FUSED


@dataclass
class Cell:
    params: dict
    units: tuple[str, ...]  # in the order `experiment` for this cell walks them


@dataclass
class GridGraph:
    nodes: dict[str, Node]  # each after the nodes it needs
    cells: list[Cell]
    store: Path
    runners: list = field(default_factory=list)  # one per parsed config: their plans' records

    def dependents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {key: [] for key in self.nodes}
        for node in self.nodes.values():
            for need in node.needs:
                out[need].append(node.key)
        return out

    def todo(self) -> list[str]:
        return [key for key, node in self.nodes.items() if not node.done]


def units(stages: Sequence[Stage], groups: Sequence[ArmGroup] = ()) -> list[tuple[Stage, ...]]:
    """The schedulable units of a plan's stages, in order: one stage each, except each fused
    group of ``groups`` (2 or more arms), one unit at its first member's place."""
    group_of = {arm.key: group for group in groups for arm in group.members}
    out, placed = [], set()
    for stage in stages:
        group = group_of.get(stage.key)
        if group is None:
            out.append((stage,))
        elif group.key not in placed:
            placed.add(group.key)
            out.append(group.members)
    return out


def selects(arm: ArmStage, params: dict) -> bool:
    """Whether a cell's ``study.only.*`` values select this arm (as ``build_plan`` does)."""
    only = {name[len(ONLY):]: value for name, value in params.items() if name.startswith(ONLY)}
    unknown = set(only) - set(ONLY_FIELDS)
    if unknown:
        raise LTHError(f"unknown grid parameter(s) {', '.join(ONLY + n for n in unknown)}; "
                       f"valid: {', '.join(ONLY + n for n in ONLY_FIELDS)}")
    matching, epochs = arm.matching, arm.rewind_epoch + arm.epochs
    return ((only.get("sparsity") is None or math.isclose(arm.sparsity, only["sparsity"]))
            and only.get("replicate") in (None, arm.replicate)
            and (only.get("rewind_epoch") is None or arm.rewind_epoch == only["rewind_epoch"])
            and (only.get("arm") is None or arm.arm.name == only["arm"])
            and (matching is None or only.get("match_method") in (None, matching.method))
            and (matching is None or only.get("match_epoch") is None
                 or match_pairs([only["match_epoch"]], epochs)[0]
                 == (matching.a_epoch, matching.b_epoch)))


def cell_shared(plan: Plan, replicates: Sequence[Replicate]) -> list[Stage]:
    """The stages a cell runs before its arms: dense A, the IMP chain, and for each of
    ``replicates`` its B (when trained to T; else its matches read the truncated run) and
    its matching."""
    full_bs = [rep.dense_b for rep in replicates if rep.b_epochs_saved == 0]
    return [plan.dense_a, *full_bs, *plan.rounds,
            *(matching for rep in replicates for matching in rep.matches)]


def build_graph(spec: GridSpec) -> GridGraph:
    """Parse each distinct config once (as ``experiment`` would), plan it, and merge."""
    from lightning_lth.experiment.progress import quiet_lightning
    from lightning_lth.experiment.runner import Runner
    from lightning_lth.parsing import make_cli

    groups: dict[tuple, list[dict]] = {}
    for params in spec.cells():
        shared = tuple((n, json.dumps(v)) for n, v in params.items() if not n.startswith(ONLY))
        groups.setdefault(shared, []).append(params)
    nodes: dict[str, Node] = {}
    cells: list[Cell] = []
    runners = []
    stores = set()
    for members in groups.values():
        shared = {n: v for n, v in members[0].items() if not n.startswith(ONLY)}
        argv = tuple(spec.argv(shared))
        with quiet_lightning():
            runner = Runner(make_cli(list(argv), run=False, command=COMMAND))
            plan = runner.plan()
        runners.append(runner)
        stores.add(runner.store.root.resolve())
        model = runner.config["model"]
        walks = []
        for params in members:
            wanted = params.get(ONLY + "replicate")
            shared_stages = cell_shared(plan, [rep for rep in plan.replicates
                                               if wanted in (None, rep.index)])
            arms = [arm for arm in plan.arms if selects(arm, params)]
            if plan.arms and not arms:  # (a study without arms is a sweep's phase 1)
                raise LTHError(f"grid cell {params} selects no arm of its study "
                               f"(sparsities {runner.study.sparsities}, rewind epochs "
                               f"{runner.study.rewind_epochs}, arms {runner.study.arms})")
            walks.append((params, in_order([*shared_stages, *arms])))  # as `experiment` does
        shared_keys = {stage.key for stage in in_order(cell_shared(plan, plan.replicates))}
        selected = {stage.key for _, walk in walks for stage in walk}
        chosen = replace(plan, arms=[arm for arm in plan.arms if arm.key in selected])
        groups = [group for group in chosen.arm_groups(runner.fuse_size())
                  if len(group.members) > 1]
        unit_of: dict[str, str] = {}
        for unit in units([stage for stage in plan.stages if stage.key in selected], groups):
            head = ArmGroup(unit) if len(unit) > 1 else unit[0]
            for stage in unit:
                unit_of[stage.key] = head.key
            if head.key in nodes:
                continue
            inside = {stage.key for stage in unit}
            needs = {unit_of[read.key] for stage in unit for read in stage.reads()
                     if read.key not in inside}
            if not inside & shared_keys:  # see the module docstring
                first = unit[0]  # an arm (a group: of one replicate), or a snapshot stage
                owner = plan.replicate(first.replicate) if isinstance(first, ArmStage) \
                    else plan.replicates[0]
                final = owner.final_match
                if final is not None and final.key in unit_of:
                    needs.add(unit_of[final.key])
            nodes[head.key] = Node(
                key=head.key, stages=tuple(s.key for s in unit),
                kind=FUSED if len(unit) > 1 else head.kind,
                name=head.name, epochs=sum(s.epochs for s in unit), needs=tuple(sorted(needs)),
                argv=argv, arch=model["arch"], width=int(model["width"]),
                weights=plan.rounds[0].prunable,
                done=all(runner.store.status(s) == "done" for s in unit))
        cells += [Cell(params, tuple(dict.fromkeys(unit_of[s.key] for s in walk)))
                  for params, walk in walks]
    if len(stores) != 1:
        raise LTHError(f"a grid writes one store; its cells name {len(stores)}: "
                       f"{', '.join(map(str, sorted(stores)))} (study.store)")
    return GridGraph(nodes, cells, stores.pop(), runners)
