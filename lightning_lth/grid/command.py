"""``python -m lightning_lth grid``: a whole grid of studies as one stage graph.

Its own options are below; every other argument goes to each cell's config, as on the
``experiment`` command line (e.g. ``--study.store=/shared/store``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from lightning_lth.errors import LTHError
from lightning_lth.grid import schedule as plan_time
from lightning_lth.grid.launch import Worker, run_local, submit_slurm, write_records
from lightning_lth.grid.stage_graph import GridGraph, GridSpec, build_graph, from_sweep


class _Parser(argparse.ArgumentParser):
    """An argument error is the CLI's one line (``error: ...``, exit 2), not a usage block."""

    def error(self, message: str):
        raise LTHError(f"grid: {message} (`{self.prog} --help` lists the options)")


def parser() -> argparse.ArgumentParser:
    from lightning_lth.parsing import help_kwargs

    kwargs = help_kwargs("grid")
    out = _Parser(prog=kwargs["prog"], description=kwargs["description"],
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    source = out.add_mutually_exclusive_group(required=True)
    source.add_argument("--sweep", help="a W&B grid sweep file (sweeps/*.yaml)")
    source.add_argument("--config", help="a study config; vary it with --vary")
    out.add_argument("--vary", action="append", default=[], metavar="NAME=[V1,V2]",
                     help="with --config: a config key and its values (YAML list); repeatable")
    out.add_argument("--executor", choices=("local", "slurm"), default="local")
    out.add_argument("--dry_run", "--dry-run", action="store_true",
                     help="print the schedule and the estimated makespan; run nothing")
    out.add_argument("--workers", type=int, default=None,
                     help="local workers (default: one per visible GPU, else 1)")
    out.add_argument("--gpus", default=None,
                     help="GPU ids for the local workers, e.g. 0,1,2,3 (default: all visible)")
    out.add_argument("--threads", type=int, default=None,
                     help="torch threads per CPU worker (default: cores / workers)")
    out.add_argument("--epoch_seconds", default=None,
                     help="YAML {device: {arch: {width: seconds per epoch}}}; default: "
                          "measured from the store")
    out.add_argument("--device", default=None,
                     help="the device name in --epoch_seconds (default: cpu, or the GPU's)")
    measured = ", ".join(f"{kind} {cost:.2f}" for kind, cost in
                         plan_time.FUSED_EPOCH_COST.items())
    out.add_argument("--fused_epoch_cost", type=float, default=None,
                     help="a fused arm group member's epoch over an epoch trained alone "
                          f"(default, measured, by the workers' device type: {measured})")
    out.add_argument("--overhead_s", type=float, default=0.0,
                     help="seconds each job spends before training (process, config, data)")
    out.add_argument("--timeout_min", type=float, default=1440.0,
                     help="a local job running longer is cancelled and retried")
    out.add_argument("--retries", type=int, default=2, help="tries after a local job fails")
    out.add_argument("--slurm", default="{}",
                     help="submitit SlurmExecutor parameters as YAML, e.g. '{partition: gpu, "
                          "gpus_per_node: 1, cpus_per_task: 8, mem: 32G}'")
    out.add_argument("--jobs_dir", default=None,
                     help="submitit's job folders (default: <store>/grid)")
    return out


def grid_spec(args, overrides: list[str]) -> GridSpec:
    if args.sweep:
        if args.vary:
            raise LTHError("--vary is for --config; a sweep file has its own parameters")
        return from_sweep(args.sweep, overrides)
    parameters = {}
    for item in args.vary:
        name, sep, values = item.partition("=")
        try:
            values = yaml.safe_load(values) if sep else None
        except yaml.YAMLError:
            values = None
        if not name or not isinstance(values, list) or not values:
            raise LTHError(f"--vary {item!r}: expected NAME=[V1,V2,...]")
        parameters[name.removeprefix("--")] = values
    return GridSpec(("--config", args.config), parameters, tuple(overrides))


def workers(args) -> list[Worker]:
    import torch

    if args.gpus is not None:
        try:
            gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
        except ValueError:
            raise LTHError(f"--gpus {args.gpus!r}: expected GPU ids such as 0,1,2,3") from None
    else:
        gpus = list(range(torch.cuda.device_count()))
    count = args.workers if args.workers is not None else max(len(gpus), 1)
    if gpus:
        if count > len(gpus):
            raise LTHError(f"--workers={count} but {len(gpus)} GPU(s) ({gpus}): one worker "
                           f"per GPU")
        return [Worker(gpu, args.threads or 1) for gpu in gpus[:count]]
    threads = args.threads or max(1, (os.cpu_count() or 1) // count)
    return [Worker(None, threads) for _ in range(count)]


def device_name(args, pool: list[Worker]) -> str:
    if args.device:
        return args.device
    if pool[0].gpu is None:
        return "cpu"
    import torch

    return torch.cuda.get_device_name(pool[0].gpu)


def device_type(graph: GridGraph, pool: list[Worker]) -> str:
    """Where the jobs train: the local workers' device, else the one the study's fuse size
    was decided for (the driver's, as ``Runner.fuse_size``)."""
    if pool:
        return "cpu" if pool[0].gpu is None else "cuda"
    return graph.runners[0].device().type if graph.runners else "cpu"


def dry_run(graph: GridGraph, seconds: dict[str, float], count: int,
            costs: plan_time.Costs) -> None:
    slots = plan_time.schedule(graph, seconds, count)
    print(f"{'start':>10} {'end':>10} {'worker':>6}  {'stage':<28} key")
    for slot in sorted(slots, key=lambda s: (s.start, s.worker)):
        node = graph.nodes[slot.key]
        print(f"{slot.start:10.0f} {slot.end:10.0f} {slot.worker:6d}  {node.name:<28} "
              f"{slot.key}")
    summary(graph, seconds, count, costs)


def summary(graph: GridGraph, seconds: dict[str, float], count: int,
            costs: plan_time.Costs) -> None:
    ours = plan_time.makespan(plan_time.schedule(graph, seconds, count))
    wandb = plan_time.makespan(plan_time.wandb_order(graph, seconds, count))
    bound = plan_time.lower_bound(graph, seconds, count)
    todo = graph.todo()
    stages = sum(len(node.stages) for node in graph.nodes.values())
    fused = sum(node.fused for node in graph.nodes.values())
    print(f"grid: {len(graph.cells)} cells, {stages} unique stages in {len(graph.nodes)} units "
          f"({fused} fused arm groups), {len(todo)} units to run "
          f"({sum(graph.nodes[k].epochs for k in todo)} epochs) on {count} worker(s); "
          f"store {graph.store}")
    print(f"estimated makespan: {ours:.0f} s with this schedule; {wandb:.0f} s in W&B grid "
          f"order with {count} agents; lower bound {bound:.0f} s")
    if costs.untimed:
        print(f"note: nothing timed for {', '.join(sorted(costs.untimed))} on this device: "
              f"those seconds are 1 per epoch of a width-1 net (run a stage, or give "
              f"--epoch_seconds)")


def check_ranges(args) -> dict:
    """The numeric options' ranges, and --slurm as a mapping: before the grid is built.
    Returns the SLURM parameters."""
    for name, value, allowed in (("workers", args.workers, 1), ("threads", args.threads, 1),
                                 ("retries", args.retries, 0)):
        if value is not None and value < allowed:
            raise LTHError(f"--{name}={value} is not allowed: it must be >= {allowed}")
    if not args.timeout_min > 0:
        raise LTHError(f"--timeout_min={args.timeout_min} is not allowed: it must be > 0")
    if not args.overhead_s >= 0:
        raise LTHError(f"--overhead_s={args.overhead_s} is not allowed: it must be >= 0")
    if args.fused_epoch_cost is not None and not args.fused_epoch_cost > 0:
        raise LTHError(f"--fused_epoch_cost must be > 0, got {args.fused_epoch_cost}")
    try:
        slurm = yaml.safe_load(args.slurm) or {}
    except yaml.YAMLError:
        slurm = None
    if not isinstance(slurm, dict):
        raise LTHError(f"--slurm {args.slurm!r}: expected YAML parameters such as "
                       f"'{{partition: gpu, gpus_per_node: 1}}'")
    return slurm


def main(argv: list[str]) -> int:
    args, overrides = parser().parse_known_args(argv)
    slurm = check_ranges(args)
    spec = grid_spec(args, overrides)
    graph = build_graph(spec)
    pool = workers(args) if args.executor == "local" else []
    configured = (plan_time.load_costs(args.epoch_seconds, device_name(args, pool))
                  if args.epoch_seconds else None)
    fused_cost = args.fused_epoch_cost
    if fused_cost is None:
        fused_cost = plan_time.FUSED_EPOCH_COST[device_type(graph, pool)]
    costs = plan_time.measured_costs(graph, configured, args.overhead_s, fused_cost)
    seconds = costs.seconds(graph)
    count = len(pool) or 1
    if args.dry_run:
        dry_run(graph, seconds, count, costs)
        return 0
    folder = Path(args.jobs_dir or graph.store / "grid")
    if args.executor == "slurm":
        submit_slurm(graph, spec, plan_time.priority_order(graph, seconds), seconds, folder,
                     slurm)
        return 0
    summary(graph, seconds, count, costs)
    outcome = run_local(graph, seconds, pool, folder, args.retries, args.timeout_min * 60)
    written = write_records(graph)
    print(f"grid: finished in {outcome.wall_s:.1f} s; {len(outcome.slots)} units run, "
          f"{sum(outcome.retries.values())} retried; {written} new record(s) in "
          f"{graph.store / 'results.jsonl'}")
    return 0
