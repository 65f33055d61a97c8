"""Grid makespans: W&B grid order (N agents, each cell's stages in order, waiting on locks)
against the stage-graph schedule (longest critical path first), and the lower bound
max(critical path, total / N), on the paper's ResNet20 CIFAR-10 sweep (sweeps/*.yaml, the
real epoch counts; no training, no data). Goal: schedule <= 1.1 x the lower bound.

Two costs: every epoch 1 (makespans in epochs, as the issue asks), and a width-w epoch
costing its prunable weights over width 1's (an epoch's work grows with the weights; an
estimate, not a measurement).

``--validate GRID_STORE [--serial SERIAL_STORE] GRID_ARGS...``: the simulator against a
measured run: each stage's time from a store's events.log, scheduled on ``--workers`` as the
grid did, against the grid run's span (first compute to last done in its events.log).

The numbers and their provenance go to ``bench/results/grid_<time>.json``
(``grid_validate_<time>.json`` with ``--validate``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import write_result

from lightning_lth.experiment.store import stage_times
from lightning_lth.grid import schedule
from lightning_lth.grid.command import grid_spec, parser
from lightning_lth.grid.stage_graph import build_graph, from_sweep

NO_LOGS = ["--trainer.logger=false", "--study.wandb_mode=disabled", "--trainer.accelerator=cpu"]


def paper_grid(sweep: str) -> dict:
    with tempfile.TemporaryDirectory() as empty:
        graph = build_graph(from_sweep(sweep, [f"--study.store={empty}", *NO_LOGS]))
    per_width = schedule.Costs(epoch_seconds={
        (node.arch, node.width): node.weights / min(
            n.weights for n in graph.nodes.values() if n.arch == node.arch)
        for node in graph.nodes.values()})
    print(f"{sweep}: {len(graph.cells)} cells, {len(graph.nodes)} unique stages")
    numbers: dict = {"sweep": sweep, "cells": len(graph.cells), "stages": len(graph.nodes)}
    for label, costs in (("epochs", schedule.epochs_only()),
                         ("width-1 epochs, a width-w epoch ~ its weights", per_width)):
        seconds = costs.seconds(graph)
        print(f"  makespan in {label}; total {sum(seconds.values()):.0f}")
        rows = numbers[label] = {"total": sum(seconds.values())}
        print(f"  {'N':>4} {'W&B order':>12} {'schedule':>12} {'lower bound':>12} "
              f"{'sched/bound':>12} {'W&B/sched':>10}")
        for workers in (8, 32):
            wandb = schedule.makespan(schedule.wandb_order(graph, seconds, workers))
            ours = schedule.makespan(schedule.schedule(graph, seconds, workers))
            bound = schedule.lower_bound(graph, seconds, workers)
            print(f"  {workers:>4} {wandb:>12.0f} {ours:>12.0f} {bound:>12.0f} "
                  f"{ours / bound:>12.3f} {wandb / ours:>10.2f}")
            rows[f"N={workers}"] = {"wandb_order": wandb, "schedule": ours, "lower_bound": bound,
                                    "schedule_over_bound": ours / bound,
                                    "wandb_over_schedule": wandb / ours}
    return numbers


def span(store: Path) -> float:
    events = [json.loads(line) for line in (store / "events.log").read_text().splitlines()]
    return (max(e["time"] for e in events if e["event"] == "done")
            - min(e["time"] for e in events if e["event"] == "compute"))


def validate(ran: Path, serial: Path | None, grid_args: list[str]) -> dict:
    """Simulate the grid's schedule with each stage's time from a store, against the grid
    run's measured span: with the run's own stage times (the simulator), and with a serial
    run's (what running two workers at once cost each stage on this machine)."""
    args, overrides = parser().parse_known_args(grid_args)
    with tempfile.TemporaryDirectory() as empty:
        graph = build_graph(grid_spec(args, [*overrides, f"--study.store={empty}"]))
    workers, actual = args.workers or 1, span(ran)
    print(f"{workers} workers, measured span (first compute to last done): {actual:.1f} s")
    numbers: dict = {"workers": workers, "grid_store": str(ran), "measured_span_s": actual}
    for label, store in (("the grid run's own stage times", ran), ("serial stage times", serial)):
        if store is None:
            continue
        measured = {key: seconds for (_, key), seconds in stage_times(store).items()}
        missing = [key for node in graph.nodes.values() for key in node.stages
                   if key not in measured]
        if missing:
            sys.exit(f"{store} has no time for {len(missing)} stage(s), e.g. {missing[0]}")
        seconds = schedule.Costs(stage_seconds=measured).seconds(graph)
        ours = schedule.makespan(schedule.schedule(graph, seconds, workers))
        wandb = schedule.makespan(schedule.wandb_order(graph, seconds, workers))
        print(f"  with {label} (total {sum(seconds.values()):.1f} s): simulated schedule "
              f"{ours:.1f} s (measured / simulated {actual / ours:.3f}); W&B order {wandb:.1f} s")
        numbers[label] = {"store": str(store), "total_s": sum(seconds.values()),
                          "simulated_schedule_s": ours, "measured_over_simulated": actual / ours,
                          "simulated_wandb_order_s": wandb}
    return numbers


def main() -> None:
    bench = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--sweep", default="sweeps/resnet20_cifar10.yaml")
    bench.add_argument("--validate", metavar="GRID_STORE", type=Path,
                       help="a grid run's store; the grid's own arguments follow")
    bench.add_argument("--serial", metavar="SERIAL_STORE", type=Path,
                       help="with --validate: a serial run's store of the same grid")
    args, grid_args = bench.parse_known_args()
    if args.validate:
        write_result("grid_validate", validate(args.validate, args.serial, grid_args))
    else:
        write_result("grid", paper_grid(args.sweep))


if __name__ == "__main__":
    main()
