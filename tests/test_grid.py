"""The grid: its stage graph, its schedule and the simulator, local runs through submitit
(real worker processes, a real SIGKILL), and the sbatch scripts submitit would submit."""

from __future__ import annotations

import json
import math
import os
import shlex
import stat
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli
from helpers import rows_without_timing, tiny_config

from lightning_lth.cli import main
from lightning_lth.experiment.runner import Runner
from lightning_lth.grid import schedule
from lightning_lth.grid.command import dry_run
from lightning_lth.grid.launch import grid_name, submit_slurm
from lightning_lth.grid.stage_graph import Cell, GridGraph, GridSpec, Node, build_graph, from_sweep
from lightning_lth.parsing import make_cli
from lightning_lth.training.failpoints import KillSwitch

SWEEPS = REPO / "sweeps"
NO_WANDB = ("--study.wandb_mode=disabled", "--trainer.logger=false")


def stage_counts(sweep: dict) -> int:
    """Unique stages by hand: per (width, seed) dense A and B, one shared IMP chain (20 % of
    the live weights per round: the rounds to the highest target), the matching, and each
    (sparsity, k, arm) cell's arm; with study.only.match_epoch one matching and one permuted
    arm per matching epoch (the lth and naive cells repeat per epoch: one arm each)."""
    values = {name: spec["values"] for name, spec in sweep["parameters"].items()}
    rounds = math.ceil(math.log(1 - max(values["study.only.sparsity"])) / math.log(0.8))
    matches = len(values.get("study.only.match_epoch", [None]))
    kinds = len(values["study.only.arm"]) - 1 + matches  # permuted once per matching epoch
    arms = math.prod(len(values[f"study.only.{n}"]) for n in ("sparsity", "rewind_epoch"))
    per_net = len(values["seed_everything"]) * len(values["model.width"])
    return per_net * (2 + rounds + matches + arms * kinds)


@pytest.mark.parametrize("name", [
    # the ResNet20 grids' 1,296 cells over widths to 16 take over half a minute each
    pytest.param(stem, marks=pytest.mark.slow) if stem.startswith("resnet20") else stem
    for stem in sorted(p.stem for p in SWEEPS.glob("*.yaml") if not p.stem.endswith("_shared"))])
def test_the_graph_of_each_sweep_file_holds_each_stage_once(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    graph = build_graph(from_sweep(SWEEPS / f"{name}.yaml", [f"--study.store={tmp_path}",
                                                             *NO_WANDB]))
    assert len(graph.cells) == math.prod(len(p["values"]) for p in sweep["parameters"].values())
    assert len(graph.nodes) == stage_counts(sweep)
    kinds = [node.kind for node in graph.nodes.values()]
    # one cell, one arm (its last unit); cells that differ only in the matching epoch of a
    # non-permuted arm share it
    assert kinds.count("arm") == len({cell.units[-1] for cell in graph.cells})
    seen = set()
    for node in graph.nodes.values():  # each after what it reads
        assert set(node.needs) <= seen
        seen.add(node.key)
    # phase 1 of the W&B sweeps computes exactly the stages the cells share
    shared = build_graph(from_sweep(SWEEPS / f"{name}_shared.yaml",
                                    [f"--study.store={tmp_path}", *NO_WANDB]))
    assert set(shared.nodes) == {key for key, node in graph.nodes.items() if node.kind != "arm"}


def test_dry_run_prints_every_stage_and_the_makespans(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["grid", "--sweep", "sweeps/demo_fmnist.yaml", "--workers", "2", "--dry-run",
                 f"--study.store={tmp_path}", *NO_WANDB]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.split()[:1] and line.split()[0].isdigit()]
    demo = yaml.safe_load((SWEEPS / "demo_fmnist.yaml").read_text())
    assert len(rows) == stage_counts(demo) == len({row.split()[-1] for row in rows})
    assert any(line.startswith("estimated makespan:") and "W&B grid order" in line
               for line in out)
    assert not (tmp_path / "events.log").exists()  # nothing ran


def cell_plan(argv: list[str]) -> list:
    return Runner(make_cli(argv, run=False, command="experiment")).plan().stages


def test_the_graph_is_the_union_of_the_cells_plans(tmp_path):
    config = tiny_config(tmp_path)
    spec = GridSpec(("--config", str(config)),
                    {"seed_everything": [0, 1], "study.only.sparsity": [0.5, 0.8],
                     "study.only.rewind_epoch": [1], "study.only.arm": ["lth", "permuted"]})
    graph = build_graph(spec)
    union: dict[str, set[str]] = {}
    for cell in graph.cells:
        stages = cell_plan(spec.argv(cell.params))  # each cell parsed and planned alone
        assert list(cell.units) == [stage.key for stage in stages]  # as its agent walks them
        match = next(stage.key for stage in stages if stage.kind == "match")
        for stage in stages:  # and an arm's record reads the matching
            union[stage.key] = {read.key for read in stage.reads()} | (
                {match} if stage.kind == "arm" else set())
    assert {key: set(node.needs) for key, node in graph.nodes.items()} == union


def hand_graph() -> GridGraph:
    """Two seeds; per seed: dense a (2) and b (2), IMP r (3) on a, match m (1) on a and b,
    two arms (1 each) on r and m; four cells, two per seed."""
    nodes, cells = {}, []
    for seed in ("", "2"):
        def add(name, epochs, *needs, seed=seed):
            nodes[name + seed] = Node(
                key=name + seed, stages=(name + seed,), kind=name, name=name + seed,
                epochs=epochs, needs=tuple(n + seed for n in needs), argv=(), arch="mlp",
                width=1, weights=1, done=False)
        add("a", 2), add("b", 2), add("r", 3, "a"), add("m", 1, "a", "b")
        add("x", 1, "r", "m"), add("y", 1, "r", "m")
        cells += [Cell({}, tuple(k + seed for k in ("a", "b", "r", "m", arm))) for arm in "xy"]
    return GridGraph(nodes, cells, Path("unused"))


@pytest.mark.quick
def test_schedule_and_simulator_match_a_hand_computed_graph():
    graph = hand_graph()
    seconds = schedule.epochs_only().seconds(graph)
    assert schedule.bottom_levels(graph, seconds)["a"] == 2 + 3 + 1
    # By hand, 2 workers, longest path first (ties: grid order): a | a2 at 0, b | r at 2,
    # b2 at 4, r2 at 5, m at 6, m2 at 7, x | y at 8, x2 | y2 at 9: done at 10.
    slots = schedule.schedule(graph, seconds, 2)
    assert {s.key: s.start for s in slots} == {
        "a": 0, "a2": 0, "b": 2, "r": 2, "b2": 4, "r2": 5, "m": 6, "m2": 7, "x": 8, "y": 8,
        "x2": 9, "y2": 9}
    assert schedule.makespan(slots) == 10 == schedule.lower_bound(graph, seconds, 2)
    # W&B order: both agents take a seed-1 cell; one computes a, b, r, m while the other
    # waits on each lock, then each trains its arm (done at 9); the same again for seed 2.
    wandb = schedule.wandb_order(graph, seconds, 2)
    assert schedule.makespan(wandb) == 18
    assert [(s.key, s.start) for s in wandb if s.worker == 1] == [("y", 8), ("y2", 17)]


@pytest.mark.quick
def test_costs_per_kind_and_model_win_and_scale_to_untimed_widths():
    """Measured seconds per (kind, model) beat the flat ones; an untimed width is scaled by
    its weights from the nearest timed one; without them the flat values hold as before."""
    def node(key, kind, epochs, width):
        return Node(key=key, stages=(key,), kind=kind, name=key, epochs=epochs, needs=(),
                    argv=(), arch="net", width=width, weights=100 * width ** 2, done=False)

    graph = GridGraph({n.key: n for n in (
        node("d1", "dense", 10, 1), node("d4", "dense", 10, 4), node("i1", "imp", 5, 1),
        node("i4", "imp", 5, 4), node("f1", "fused", 24, 1), node("f4", "fused", 24, 4),
        node("m1", "match", 0, 1), node("m4", "match", 0, 4), node("s4", "snapshot", 3, 4))},
        [], Path("unused"))
    flat = {"epoch_seconds": {("net", 1): 2.0}, "kind_seconds": {"match": 7.0},
            "fused_epoch_cost": 0.5, "overhead_s": 1.0}
    costs = schedule.Costs(**flat, kind_epoch_seconds={"imp": {("net", 1): 3.0},
                                                       "fused": {("net", 4): 16.0}},
                           model_kind_seconds={"match": {("net", 1): 4.0}})
    assert costs.seconds(graph) == {
        "d1": 10 * 2 + 1, "d4": 10 * 2 * 16 + 1, "i1": 5 * 3 + 1, "i4": 5 * 3 * 16 + 1,
        "f1": 24 * 1 + 1, "f4": 24 * 16 + 1,  # a member's seconds: no fused_epoch_cost on top
        "m1": 4 + 1, "m4": 4 * 16 + 1, "s4": 3 * 2 * 16 + 1}  # snapshot: no own table
    assert schedule.Costs(**flat).seconds(graph) == {
        "d1": 21, "d4": 321, "i1": 11, "i4": 161, "f1": 24 * 0.5 * 2 + 1,
        "f4": 24 * 0.5 * 32 + 1, "m1": 8, "m4": 8, "s4": 97}
    assert not costs.untimed


@pytest.mark.parametrize("fuse", [1, 2])
def test_slurm_jobs_are_submitted_with_dependencies_and_resources(tmp_path, monkeypatch, fuse):
    """submitit's SlurmExecutor looks for `srun` and calls `sbatch <script>`: stand-ins on
    PATH; sbatch keeps each script and answers as sbatch does. Fused: one job per group."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir(), kept.mkdir()
    for name, body in (("srun", "exit 1"), ("sbatch", f"n=$(ls {kept} | wc -l); n=$((n + 100))"
                                            f"\ncp \"$1\" {kept}/$n.sh\n"
                                            f"echo \"Submitted batch job $n\"")):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = tiny_config(tmp_path, fuse=fuse)
    spec = GridSpec(("--config", str(config)), {"study.only.arm": ["lth", "permuted"]})
    graph = build_graph(spec)
    assert sum(node.fused for node in graph.nodes.values()) == (4 if fuse > 1 else 0)
    seconds = schedule.epochs_only().seconds(graph)
    order = schedule.priority_order(graph, seconds)
    jobs = submit_slurm(graph, spec, order, seconds, tmp_path / "jobs",
                        {"partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8},
                        say=lambda line: None)
    scripts = {int(p.stem): p.read_text() for p in kept.glob("*.sh")}
    assert len(scripts) == len(graph.nodes) + 1  # and the records job
    by_id = {int(job): key for key, job in jobs.items()}
    for job_id, text in scripts.items():
        flags = dict(line[len("#SBATCH --"):].partition("=")[::2] for line in text.splitlines()
                     if line.startswith("#SBATCH --"))
        key = by_id[job_id]
        needs = (graph.nodes[key].needs if key != "records" else list(graph.nodes))
        after = sorted(int(jobs[n]) for n in needs)
        if after:
            kind, _, ids = flags["dependency"].partition(":")
            assert kind == "afterok" and sorted(map(int, ids.split(":"))) == after
            assert flags["kill-on-invalid-dep"] == "yes"
            assert all(a < job_id for a in after)  # submitted after what it needs
        else:
            assert "dependency" not in flags
        # one name for the grid's jobs (scancel --name), the stage in the comment
        assert flags["job-name"] == grid_name(graph)
        assert shlex.split(flags["comment"]) == [graph.nodes[key].name if key != "records"
                                                 else "records"]
        assert flags["partition"] == "gpu" and flags["cpus-per-task"] == "8"
        assert flags.get("gpus-per-node") == (None if key == "records" else "1")
        assert int(flags["time"]) >= 10 and flags["signal"].startswith("USR2@")
        assert "submitit.core._submit" in text  # the pickled job runs through submitit


def test_two_local_workers_survive_a_killed_worker_and_equal_the_serial_run(tmp_path):
    """Two CPU workers (one torch thread each) run a small grid while dense B's worker is
    SIGKILLed after its first epoch: the driver retries it, the store resumes it, every stage
    is computed once, and the records equal a serial `experiment` run's. The grid is launched
    from a process that runs a W&B service (WANDB_SERVICE set): each worker starts its own
    (sharing it, the killed worker's run stayed "in use" and its retry was refused)."""
    config = tiny_config(tmp_path, sparsities=[0.2])
    cells = ("--study.only.rewind_epoch=1",)
    serial_store, grid_store = tmp_path / "serial", tmp_path / "grid"
    serial = run_cli("experiment", "--config", config, f"--study.store={serial_store}",
                     "--study.arms=[lth,permuted]", *cells, cwd=tmp_path)  # the same 2 arms
    assert serial.returncode == 0, serial.stderr[-2000:]
    grid = run_cli("grid", "--config", str(config), "--vary", "study.only.arm=[lth,permuted]",
                   "--workers", "2", "--threads", "1", f"--study.store={grid_store}", *cells,
                   cwd=tmp_path, env={KillSwitch.ENV: "dense B@1:end",
                                      "WANDB_SERVICE": "the-launching-process-service"})
    assert grid.returncode == 0, grid.stderr[-3000:]
    assert "failed (the worker died (killed?))" in grid.stdout
    log = [json.loads(line) for line in (grid_store / "events.log").read_text().splitlines()]
    computed = [e["key"] for e in log if e["event"] == "compute"]
    assert len(computed) == len(set(computed)) == 6  # A, B, one IMP round, match, 2 arms
    (resumed,) = [e for e in log if e["event"] == "resume"]
    assert resumed["key"].startswith("mlp-w1-fashion_mnist-seed1000")  # dense B
    (killed,) = [e["pid"] for e in log if e["key"] == resumed["key"] and e["event"] == "compute"]
    assert killed != resumed["pid"]  # resumed by the worker that replaced the killed one
    assert len({e["pid"] for e in log}) == 3  # two workers, one replacement
    rows = [json.loads(line) for line in (grid_store / "results.jsonl").read_text().splitlines()]
    alone = [json.loads(line)
             for line in (serial_store / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows_without_timing(rows) == rows_without_timing(alone)
    assert {row["num_threads"] for row in rows} == {1}
    spec = GridSpec(("--config", str(config)), {"study.only.arm": ["lth", "permuted"]},
                    (f"--study.store={grid_store}", *cells))
    assert build_graph(spec).todo() == []  # a second invocation has nothing left to run


def test_a_fused_grid_has_one_unit_per_group_across_cells(tmp_path, capsys):
    """Cells one per arm (lth, permuted) over S = 0.5, 0.8 and k = 0, 1, study.fuse=3: per k
    the 4 selected arms form a group of 3 (spanning both cells) and one arm alone; the
    simulator and the dry run schedule the groups as units."""
    config = tiny_config(tmp_path, fuse=3)
    spec = GridSpec(("--config", str(config)), {"study.only.arm": ["lth", "permuted"]})
    graph = build_graph(spec)
    plan = graph.runners[0].plan()
    arms = {arm.key: arm for arm in plan.arms if arm.arm.name in ("lth", "permuted")}
    fused = [node for node in graph.nodes.values() if node.fused]
    alone = [node for node in graph.nodes.values() if node.kind == "arm"]
    assert len(fused) == 2 and len(alone) == 2
    covered = [key for node in fused + alone for key in node.stages]
    assert sorted(covered) == sorted(arms)  # every selected arm in exactly one unit
    for node in fused:
        members = [arms[key] for key in node.stages]
        assert len({arm.rewind_epoch for arm in members}) == 1  # one data order per group
        assert {arm.arm.name for arm in members} == {"lth", "permuted"}  # spans both cells
        assert node.epochs == sum(arm.epochs for arm in members)
        assert set(node.needs) == {read.key for arm in members for read in arm.reads()} | {
            plan.final_match.key}  # what its members read, and the matching
    for cell in graph.cells:  # each cell walks the groups holding its arms
        mine = {key for key, arm in arms.items() if arm.arm.name == cell.params["study.only.arm"]}
        walked = {key for unit in cell.units for key in graph.nodes[unit].stages}
        assert mine <= walked and {n.key for n in fused} <= set(cell.units)
    seconds = schedule.epochs_only().seconds(graph)
    for node in fused:
        assert seconds[node.key] == pytest.approx(node.epochs * schedule.FUSED_EPOCH_COST["cpu"])
    slots = schedule.schedule(graph, seconds, 2)
    assert sorted(s.key for s in slots) == sorted(graph.nodes)
    assert sorted(s.key for s in schedule.wandb_order(graph, seconds, 2)) == sorted(graph.nodes)
    dry_run(graph, seconds, 2, schedule.epochs_only())
    out = capsys.readouterr().out
    assert sum(f"fused 3 arms k={k}" in out for k in (0, 1)) == 2
    assert f"{len(graph.nodes)} units (2 fused arm groups)" in out
    # a fused member's time is its group's: it times no epoch of the model; alone, it does
    lone = alone[0]
    graph.store.mkdir(parents=True, exist_ok=True)
    for group, rate in (({"group": "g", "fused": 3}, None), ({}, 100.0 / lone.epochs)):
        log = [{"time": 0.0, "event": "compute", "stage": "arm", "key": lone.key, **group},
               {"time": 100.0, "event": "done", "stage": "arm", "key": lone.key}]
        (graph.store / "events.log").write_text("".join(json.dumps(e) + "\n" for e in log))
        costs = schedule.measured_costs(graph)
        assert costs.epoch_seconds.get((lone.arch, lone.width)) == rate
        assert costs.stage_seconds == {lone.key: 100.0}


@pytest.mark.slow  # ~38 s: the killed-worker run covers the local driver by default
def test_two_local_workers_train_a_fused_group_once_equal_to_the_serial_run(tmp_path):
    """A fused group of 2 arms, one per cell, run by 2 CPU workers: its members are computed
    once, together (events.log: one group, one process), and the records equal a serial
    fused `experiment`'s."""
    config = tiny_config(tmp_path, sparsities=[0.2], fuse=2)
    cells = ("--study.only.rewind_epoch=1",)
    serial_store, grid_store = tmp_path / "serial", tmp_path / "grid"
    serial = run_cli("experiment", "--config", config, f"--study.store={serial_store}",
                     "--study.arms=[lth,permuted]", *cells, cwd=tmp_path)
    assert serial.returncode == 0, serial.stderr[-2000:]
    grid = run_cli("grid", "--config", str(config), "--vary", "study.only.arm=[lth,permuted]",
                   "--workers", "2", "--threads", "1", f"--study.store={grid_store}", *cells,
                   cwd=tmp_path)
    assert grid.returncode == 0, grid.stderr[-3000:]
    log = [json.loads(line) for line in (grid_store / "events.log").read_text().splitlines()]
    computed = [e for e in log if e["event"] == "compute"]
    keys = [e["key"] for e in computed]
    assert len(keys) == len(set(keys)) == 6  # A, B, one IMP round, match, 2 arms
    arms = [e for e in computed if e["stage"] == "arm"]
    assert [e["fused"] for e in arms] == [2, 2]
    assert len({e["group"] for e in arms}) == 1 and len({e["pid"] for e in arms}) == 1
    rows = [json.loads(line) for line in (grid_store / "results.jsonl").read_text().splitlines()]
    alone = [json.loads(line)
             for line in (serial_store / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows_without_timing(rows) == rows_without_timing(alone)
    assert {row["fused"] for row in rows} == {2}
