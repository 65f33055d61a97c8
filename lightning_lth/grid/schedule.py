"""Seconds per stage, the longest-critical-path-first schedule, and a simulator of both ways
to run a grid: the stage-graph schedule and W&B grid order (N agents, each taking the next
cell and running its stages in order, waiting on a stage's lock while another agent
computes it).

Costs: a stage takes ``epochs x seconds per epoch`` of its (model, width) on the grid's
device, plus its kind's fixed seconds (matching trains nothing, yet takes time), plus the
per-job overhead (process start, config, data). Seconds per epoch are configured (a YAML
file: ``{device: {arch: {width: seconds}}}``) or measured from the store's events.log
(finished stages' times over their epochs); an untimed width is scaled from a timed width of
the same model by its prunable weights (an epoch's work grows with the weights), and a model
with nothing timed counts 1 s per epoch per width-1 net, which ``describe`` says. Seconds
measured per stage kind and model (``bench/grid_cost.py``: a masked round's epoch, a fused
member's, a match's seconds at each width) win over those, scaled to untimed widths alike.

A fused arm group trains its members side by side: its epochs are its members' epochs summed,
each costing ``fused_epoch_cost`` times an epoch trained alone (``FUSED_EPOCH_COST``, per
device type, measured: on CPU 12 demo-MLP arms fused took 0.97 times their time one after
another at the default 2 torch threads, 1.11 at one (docs/benchmarks/fused_arms_cpu_2026-12.md);
on an H100 a group of 12 ResNet20x1 trained 3.99x the images per second of one net
(docs/benchmarks/fused_arms_h100_2026-11.md); ``--fused_epoch_cost`` overrides it). A
group's measured time is its members' shared wall time.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lightning_lth.errors import LTHError
from lightning_lth.experiment.store import stage_times
from lightning_lth.grid.stage_graph import GridGraph, Node
from lightning_lth.io import load_yaml

# A fused member's epoch over an alone epoch, per device type (module docstring; measured in
# docs/benchmarks/fused_arms_cpu_2026-12.md and docs/benchmarks/fused_arms_h100_2026-11.md).
FUSED_EPOCH_COST = {"cpu": 0.97, "cuda": 1 / 3.99}


@dataclass
class Costs:
    epoch_seconds: dict[tuple[str, int], float] = field(default_factory=dict)
    kind_seconds: dict[str, float] = field(default_factory=dict)  # fixed, per stage kind
    stage_seconds: dict[str, float] = field(default_factory=dict)  # a stage's own time
    overhead_s: float = 0.0
    untimed: set[str] = field(default_factory=set)  # models with no time at all
    every_epoch_s: float | None = None  # one price for every epoch of every model
    fused_epoch_cost: float = FUSED_EPOCH_COST["cpu"]  # a fused member's / an alone epoch
    # Measured per stage kind and model, {kind: {(arch, width): seconds}}, winning over the
    # flat values above: a kind's own seconds per epoch (a masked round's; for ``fused``, a
    # member's epoch, fused_epoch_cost not applied) and a kind's fixed seconds (a match's,
    # which grows with the width). An untimed width is scaled as in epoch_seconds.
    kind_epoch_seconds: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)
    model_kind_seconds: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)

    def per_epoch(self, node: Node, widths: dict[tuple[str, int], int]) -> float:
        if self.every_epoch_s is not None:
            return self.every_epoch_s
        seconds = scaled(self.epoch_seconds, node, widths)
        if seconds is None:
            self.untimed.add(node.arch)
            return node.weights / widths.get((node.arch, 1), node.weights)
        return seconds

    def seconds(self, graph: GridGraph) -> dict[str, float]:
        """Each unit's estimated seconds (0 for one already done)."""
        widths = {(n.arch, n.width): n.weights for n in graph.nodes.values()}
        out = {}
        for key, node in graph.nodes.items():
            if node.done:
                out[key] = 0.0
            elif all(stage in self.stage_seconds for stage in node.stages):
                times = [self.stage_seconds[s] for s in node.stages]  # a group's: one wall
                out[key] = (max(times) if node.fused else sum(times)) + self.overhead_s
            else:
                own = scaled(self.kind_epoch_seconds.get(node.kind, {}), node, widths)
                if own is None:
                    factor = self.fused_epoch_cost if node.fused else 1.0
                    own = factor * self.per_epoch(node, widths)
                fixed = scaled(self.model_kind_seconds.get(node.kind, {}), node, widths)
                if fixed is None:
                    fixed = self.kind_seconds.get(node.kind, 0.0)
                out[key] = node.epochs * own + fixed + self.overhead_s
        return out


def scaled(table: dict[tuple[str, int], float], node: Node,
           widths: dict[tuple[str, int], int]) -> float | None:
    """``table``'s seconds for the node's (arch, width); an untimed width: the nearest timed
    width's, scaled by the prunable weights (an epoch's work grows with them); None when the
    arch has nothing in ``table``."""
    own = table.get((node.arch, node.width))
    if own is not None:
        return own
    timed = [(width, seconds) for (arch, width), seconds in table.items() if arch == node.arch]
    if not timed:
        return None
    width, seconds = min(timed, key=lambda item: abs(item[0] - node.width))
    return seconds * node.weights / widths.get((node.arch, width), node.weights)


def epochs_only(fused_epoch_cost: float = FUSED_EPOCH_COST["cpu"]) -> Costs:
    """Every epoch costs 1 (a fused member's, ``fused_epoch_cost``) and nothing else costs
    anything: makespans in epochs."""
    return Costs(every_epoch_s=1.0, fused_epoch_cost=fused_epoch_cost)


def load_costs(path: str | Path, device: str) -> dict[tuple[str, int], float]:
    table = load_yaml(path, "--epoch_seconds file") or {}
    shape = "expected YAML {device: {arch: {width: seconds per epoch}}}"
    if not isinstance(table, dict):
        raise LTHError(f"--epoch_seconds {path}: {shape}, got a {type(table).__name__}")
    if device not in table:
        raise LTHError(f"{path} has no seconds per epoch for device {device!r}; it has: "
                       f"{', '.join(map(str, table)) or 'none'}")
    try:
        costs = {(str(arch), int(width)): float(seconds)
                 for arch, widths in table[device].items() for width, seconds in widths.items()}
    except (AttributeError, TypeError, ValueError):
        raise LTHError(f"--epoch_seconds {path}: {shape}; its {device!r} entry is "
                       f"{table[device]!r}") from None
    for (arch, width), seconds in costs.items():
        if not seconds > 0:
            raise LTHError(f"--epoch_seconds {path}: {device} {arch} width {width}: "
                           f"{seconds} seconds per epoch; it must be > 0")
    return costs


def measured_costs(graph: GridGraph, configured: dict[tuple[str, int], float] | None = None,
                   overhead_s: float = 0.0,
                   fused_epoch_cost: float = FUSED_EPOCH_COST["cpu"]) -> Costs:
    """Seconds per epoch and per zero-epoch kind from the store's timed stages that ran alone
    (configured values win), and each finished stage's own time."""
    times = stage_times(graph.store)
    by_key = {node.stages[0]: node for node in graph.nodes.values() if len(node.stages) == 1}
    spent: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    fixed: dict[str, list[float]] = defaultdict(list)
    for (kind, key), seconds in stage_times(graph.store, alone=True).items():
        node = by_key.get(key)
        if node is None:
            continue
        if node.epochs:
            spent[node.arch, node.width][0] += seconds
            spent[node.arch, node.width][1] += node.epochs
        else:
            fixed[kind].append(seconds)
    epoch_seconds = {model: total / epochs for model, (total, epochs) in spent.items()}
    epoch_seconds.update(configured or {})
    return Costs(epoch_seconds, {kind: sum(v) / len(v) for kind, v in fixed.items()},
                 {key: seconds for (_, key), seconds in times.items()}, overhead_s,
                 fused_epoch_cost=fused_epoch_cost)


def bottom_levels(graph: GridGraph, seconds: dict[str, float]) -> dict[str, float]:
    """Each unit's longest path to the end of the grid, itself included: its priority."""
    after = graph.dependents()
    level: dict[str, float] = {}
    for key in reversed(list(graph.nodes)):
        level[key] = seconds[key] + max((level[d] for d in after[key]), default=0.0)
    return level


@dataclass(frozen=True)
class Slot:
    key: str
    worker: int
    start: float
    end: float


class ReadyQueue:
    """Units whose inputs are done, highest priority first (ties: grid order)."""

    def __init__(self, graph: GridGraph, priority: dict[str, float]):
        self.priority = priority
        self.order = {key: i for i, key in enumerate(graph.nodes)}
        self.after = graph.dependents()
        todo = set(graph.todo())
        self.waiting = {key: sum(1 for need in graph.nodes[key].needs if need in todo)
                        for key in todo}
        self.heap: list[tuple[float, int, str]] = []
        for key, count in self.waiting.items():
            if count == 0:
                self._push(key)

    def _push(self, key: str) -> None:
        heapq.heappush(self.heap, (-self.priority[key], self.order[key], key))

    def __bool__(self) -> bool:
        return bool(self.heap)

    def pop(self) -> str:
        return heapq.heappop(self.heap)[2]

    def again(self, key: str) -> None:
        """A failed unit, retried before anything else (its dependents are waiting)."""
        heapq.heappush(self.heap, (float("-inf"), -1, key))

    def finished(self, key: str) -> None:
        for dependent in self.after[key]:
            if dependent in self.waiting:
                self.waiting[dependent] -= 1
                if self.waiting[dependent] == 0:
                    self._push(dependent)


def schedule(graph: GridGraph, seconds: dict[str, float], workers: int) -> list[Slot]:
    """List scheduling, longest critical path first: whenever a worker is free it takes the
    ready unit with the longest path to the end of the grid."""
    ready = ReadyQueue(graph, bottom_levels(graph, seconds))
    free = list(range(workers))
    running: list[tuple[float, int, str]] = []
    slots, now = [], 0.0
    while ready or running:
        while free and ready:
            key = ready.pop()
            worker = heapq.heappop(free)
            slots.append(Slot(key, worker, now, now + seconds[key]))
            heapq.heappush(running, (now + seconds[key], worker, key))
        now, worker, key = heapq.heappop(running)
        heapq.heappush(free, worker)
        ready.finished(key)
    return slots


def priority_order(graph: GridGraph, seconds: dict[str, float]) -> list[str]:
    """Every unit left, each after the units it needs, longest critical path first: the
    order a cluster's queue receives them in."""
    ready = ReadyQueue(graph, bottom_levels(graph, seconds))
    order = []
    while ready:
        order.append(ready.pop())
        ready.finished(order[-1])
    return order


def wandb_order(graph: GridGraph, seconds: dict[str, float], agents: int,
                cell_overhead_s: float = 0.0) -> list[Slot]:
    """W&B grid order: each free agent takes the next cell and walks its stages; a stage
    another agent is computing is waited for (its lock), a finished one is skipped."""
    done_at = {key: 0.0 for key, node in graph.nodes.items() if node.done}
    cells = iter(graph.cells)
    walk: dict[int, list[str]] = {}
    events = [(0.0, agent) for agent in range(agents)]
    slots = []
    while events:
        now, agent = heapq.heappop(events)
        if not walk.get(agent):
            cell = next(cells, None)
            if cell is None:
                continue
            walk[agent] = list(cell.units)
            now += cell_overhead_s
        key = walk[agent].pop(0)
        if key in done_at:  # finished, or being computed: its lock releases at done_at
            heapq.heappush(events, (max(now, done_at[key]), agent))
            continue
        done_at[key] = now + seconds[key]
        slots.append(Slot(key, agent, now, done_at[key]))
        heapq.heappush(events, (done_at[key], agent))
    return slots


def makespan(slots: list[Slot]) -> float:
    return max((slot.end for slot in slots), default=0.0)


def lower_bound(graph: GridGraph, seconds: dict[str, float], workers: int) -> float:
    """No schedule beats the longest chain, nor the total work spread over every worker."""
    critical = max(bottom_levels(graph, seconds).values(), default=0.0)
    return max(critical, sum(seconds.values()) / workers)
