"""`grid --executor slurm` on a real single-node SLURM cluster with accounting
(``slurm_cluster``): the jobs, their ``afterok`` chains, a requeue and a failure, and the job
states submitit reads from ``sacct``. Skipped where SLURM or root is missing (the reason says
which); `.ci/run` installs the packages and runs them (`make test-slurm`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import slurm_cluster
import submitit
from conftest import run_cli
from helpers import assert_same, rows_without_timing, stage_outputs, tiny_config

from lightning_lth.grid.launch import ACTIVE, RECORDS, SUBMITTED
from lightning_lth.grid.stage_graph import GridSpec, build_graph
from lightning_lth.training.failpoints import KillSwitch

pytestmark = pytest.mark.slow  # minutes: jobs start Python, Lightning and torch each
CELLS = ("--study.only.rewind_epoch=1",)  # A, B, one IMP round, the match, lth and permuted
ARMS = ("--vary", "study.only.arm=[lth,permuted]")
RESOURCES = ("--slurm", "{cpus_per_task: 1, mem: 1G}")  # the README's form of memory
WAIT_S = 600


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_cluster.missing()
    if reason:
        pytest.skip(reason)
    cluster = slurm_cluster.start_cluster()
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]  # submitit's sacct calls here
    try:
        yield cluster
    finally:
        if before is None:
            os.environ.pop("SLURM_CONF")
        else:
            os.environ["SLURM_CONF"] = before
        cluster.stop()


def grid(cluster, config: Path, store: Path, env: dict | None = None):
    done = run_cli("grid", "--config", config, *ARMS, "--executor", "slurm", *RESOURCES,
                   f"--study.store={store}", *CELLS, cwd=config.parent,
                   env={"SLURM_CONF": cluster.env["SLURM_CONF"], **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def spec(config: Path, store: Path) -> GridSpec:
    return GridSpec(("--config", str(config)), {"study.only.arm": ["lth", "permuted"]},
                    (f"--study.store={store}", *CELLS))


def submitted(store: Path) -> dict[str, tuple[str, submitit.SlurmJob]]:
    """The grid's last submission: unit key -> (stage name, its job as submitit sees it)."""
    entries = json.loads((store / "grid" / SUBMITTED).read_text())
    return {key: (entry["name"], submitit.SlurmJob(store / "grid", entry["job"]))
            for key, entry in entries.items()}


def state(job: submitit.SlurmJob, mode: str = "force") -> str:
    """The job's state as submitit reads it from sacct ("CANCELLED by 0": "CANCELLED")."""
    return job.watcher.get_state(job.job_id, mode=mode).split()[0]


def wait_until_settled(cluster, jobs) -> dict[str, str]:
    """Every job finished, as submitit reads it from sacct: key -> its final state. A job
    sacct does not list yet (UNKNOWN: accounting lags submission) is not settled."""
    deadline = time.monotonic() + WAIT_S
    while True:
        submitit.SlurmJob.watcher.update()  # one sacct call for every job
        states = {key: state(job, "cache") for key, (_, job) in jobs.items()}
        if not (ACTIVE | {"UNKNOWN"}) & set(states.values()):
            return states
        if time.monotonic() > deadline:
            logs = "\n".join(job.stderr() or "" for _, job in jobs.values())[-3000:]
            pytest.fail(f"jobs still active after {WAIT_S} s: {states}\n"
                        f"{cluster.run('squeue', check=False).stdout}\n{logs}")
        time.sleep(1)


def wait_for(what: str, ready, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s} s for {what}")
        time.sleep(0.5)


def sacct(cluster, job_id: str, *fields: str, duplicates: bool = False) -> list[list[str]]:
    """One row per record of the job itself (``-X``: not its steps)."""
    out = cluster.run("sacct", "-X", "-n", "--parsable2", "-j", job_id,
                      "-o", ",".join(fields), *(["-D"] if duplicates else [])).stdout
    return [line.split("|") for line in out.splitlines()]


def events(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "events.log").read_text().splitlines()]


def records(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "results.jsonl").read_text().splitlines()]


def test_a_grid_runs_its_afterok_chain_on_slurm_and_a_requeued_stage_resumes_to_the_serial_run(
        cluster, tmp_path):
    """Dense B's job hangs after its epoch-1 checkpoint; a rerun of the grid then keeps the
    queued jobs; `scontrol requeue` runs B's job again, it resumes from that
    checkpoint, and every job completes after the jobs it reads. Records and every stored
    tensor equal a serial `experiment`'s."""
    config = tiny_config(tmp_path, sparsities=[0.2])
    serial_store, grid_store = tmp_path / "serial", tmp_path / "grid"
    serial = run_cli("experiment", "--config", config, f"--study.store={serial_store}",
                     "--study.arms=[lth,permuted]", *CELLS, cwd=tmp_path)
    assert serial.returncode == 0, serial.stderr[-2000:]

    out = grid(cluster, config, grid_store, {KillSwitch.ENV: "dense B@1:end:HANG"}).stdout
    jobs = submitted(grid_store)
    assert len(jobs) == 7  # 6 stages and the records job
    (name,) = {line.split(" jobs named ")[1].split(",")[0] for line in out.splitlines()
               if " jobs named " in line}
    listed = cluster.run("squeue", "-h", f"--name={name}", "-o", "%i %k").stdout.splitlines()
    assert sorted(listed) == sorted(f"{job.job_id} {stage}" for stage, job in jobs.values())

    (dense_b,) = [key for key, (stage, _) in jobs.items() if stage == "dense B"]
    point = grid_store / "dense" / f"{dense_b}.partial" / "checkpoints" / "last.json"
    wait_for("dense B's epoch-1 checkpoint",
             lambda: point.is_file() and json.loads(point.read_text())["epoch"] == 1)
    job_b = jobs[dense_b][1]
    assert state(job_b) == "RUNNING"
    again = grid(cluster, config, grid_store).stdout.splitlines()  # while B's job hangs
    assert not [line for line in again if line.startswith("submitted")]  # nothing twice
    assert f"dense B ({dense_b}) is still queued as job {job_b.job_id}" in again
    kept = {key: job.job_id for key, (_, job) in submitted(grid_store).items()}
    assert {dense_b, RECORDS} <= kept.keys()  # and what was not done by then
    assert kept == {key: jobs[key][1].job_id for key in kept}
    cluster.run("scontrol", "requeue", job_b.job_id)
    wait_for("dense B's job pending again", lambda: cluster.run(
        "squeue", "-h", "-j", job_b.job_id, "-o", "%T").stdout.strip() == "PENDING", 120)
    cluster.run("scontrol", "update", f"jobid={job_b.job_id}", "StartTime=now")

    states = wait_until_settled(cluster, jobs)
    assert set(states.values()) == {"COMPLETED"}, states  # submitit's view, from sacct
    assert jobs[RECORDS][1].result() == 2  # the records job's return value: records written
    assert [row[0] for row in sacct(cluster, job_b.job_id, "State", duplicates=True)] == [
        "REQUEUED", "COMPLETED"]
    times = {job.job_id: sacct(cluster, job.job_id, "Start", "End")[0]
             for _, job in jobs.values()}
    needs = {key: node.needs for key, node in build_graph(spec(config, grid_store)).nodes.items()}
    needs[RECORDS] = tuple(needs)
    for key, (stage, job) in jobs.items():
        for need in needs[key]:  # afterok: started once what it reads had ended
            assert times[job.job_id][0] >= times[jobs[need][1].job_id][1], (stage, need)

    log = events(grid_store)
    computed = [e["key"] for e in log if e["event"] == "compute"]
    assert len(computed) == len(set(computed)) == 6  # every stage once
    (resumed,) = [e for e in log if e["event"] == "resume"]
    assert resumed["key"] == dense_b and resumed["epoch"] == 1
    assert rows_without_timing(records(grid_store)) == rows_without_timing(records(serial_store))
    grid_outputs, serial_outputs = stage_outputs(grid_store), stage_outputs(serial_store)
    assert grid_outputs.keys() == serial_outputs.keys()
    assert_same(grid_outputs, serial_outputs)  # tensor for tensor


def test_a_failing_stage_cancels_its_dependents_and_a_rerun_submits_only_what_is_not_done(
        cluster, tmp_path):
    """Dense B's job is SIGKILLed after its first epoch: SLURM cancels what reads it (the
    match, both arms, the records job); dense A and its IMP round complete. The rerun says
    so in one line, submits B, the match, the arms and the records job, and finishes."""
    config = tiny_config(tmp_path, sparsities=[0.2])
    store = tmp_path / "grid"
    grid(cluster, config, store, {KillSwitch.ENV: "dense B@0:end"})
    first = submitted(store)
    states = wait_until_settled(cluster, first)
    by_stage = {stage: states[key] for key, (stage, _) in first.items()}
    assert by_stage.pop("dense B") == "FAILED"
    assert by_stage.pop("dense A") == by_stage.pop("imp round 1 S=0.2000") == "COMPLETED", states
    assert set(by_stage.values()) == {"CANCELLED"}, by_stage  # the match, 2 arms, records
    assert not (store / "results.jsonl").exists()

    again = grid(cluster, config, store).stdout.splitlines()
    (failed_b,) = [key for key, (stage, _) in first.items() if stage == "dense B"]
    report = [line for line in again if line.startswith("grid: last submission:")]
    assert report == [f"grid: last submission: 1 failed: dense B (job {first[failed_b][1].job_id}"
                      f" FAILED, log {first[failed_b][1].paths.stderr}); 4 cancelled (a failed "
                      f"input, or scancel); submitting what is not done"]
    second = submitted(store)
    assert sorted(stage for stage, _ in second.values()) == sorted(
        stage for stage, _ in first.values() if stage not in ("dense A", "imp round 1 S=0.2000"))
    at_once = grid(cluster, config, store).stdout.splitlines()  # before accounting may list them
    assert not [line for line in at_once if line.startswith("submitted")], at_once
    kept = {key: job.job_id for key, (_, job) in submitted(store).items()}
    assert kept.items() <= {key: job.job_id for key, (_, job) in second.items()}.items()
    assert RECORDS in kept  # (a unit that finished meanwhile is no longer listed)
    assert set(wait_until_settled(cluster, second).values()) == {"COMPLETED"}
    assert len(records(store)) == 2
    (resumed,) = [e for e in events(store) if e["event"] == "resume"]
    assert resumed["key"] == failed_b and resumed["epoch"] == 0
