"""Running a grid's graph: one submitit job per unit, on local workers or on SLURM.

A job (``UnitJob``) parses its cell's config as ``experiment`` would and runs the unit's
stages over the store: a retried, requeued or duplicated job resumes from the stage's
checkpoint or finds it done, so every stage is computed once. Records are appended once all
arms are done (``write_records``), exactly as ``experiment`` appends them.

Local (``run_local``): submitit's LocalExecutor starts every submitted job at once, so the
driver submits one job per free worker, highest priority first (``ReadyQueue``), and sets
each job's devices itself: ``CUDA_VISIBLE_DEVICES`` (one GPU per worker, or none on CPU) and
``OMP_NUM_THREADS``. It also enforces the timeout (submitit's local default is 2 minutes): a
job past it is cancelled and retried, as is a job that dies without a result.

SLURM (``submit_slurm``): every unit left is submitted at once, in schedule order, with
``afterok`` dependencies on the jobs of the units it reads; SLURM holds each job until its
inputs are done, and cancels it if one of them fails (``--kill-on-invalid-dep``). Jobs are
checkpointable: on preemption or timeout submitit requeues them and the store resumes the
stage. A last job writes the records. Every job of one grid has the same name
(``grid_name``), so ``scancel --name`` cancels them all; the stage is the job's comment. The
jobs folder keeps the last submission's job ids (``SUBMITTED``): a rerun says in one line
which of them failed or were cancelled (their states from ``sacct``, through submitit; from
``squeue`` for a job accounting does not list yet), and waits on those still pending or running instead of submitting their units twice.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit

from lightning_lth.errors import LTHError
from lightning_lth.grid.schedule import ReadyQueue, Slot, bottom_levels
from lightning_lth.grid.stage_graph import GridGraph, GridSpec, build_graph
from lightning_lth.io import load_json, save_json

# Each job starts its own W&B service: one inherited from the process that launched the grid
# (wandb exports WANDB_SERVICE where it starts one) would be shared by every job, where a
# killed job's run stays "in use" and its retry is refused (and on SLURM it is another node's).
OWN_WANDB_SERVICE = "unset WANDB_SERVICE"


def _runner(argv):
    from lightning_lth.experiment.runner import Runner
    from lightning_lth.parsing import make_cli

    return Runner(make_cli(list(argv), run=False, command="experiment"))


def run_unit(runner, stages: tuple[str, ...], fused: bool = False) -> None:
    """Run these stages (keys) of the runner's plan, in order, over its store; ``fused``: they
    are a fused arm group, trained side by side first (``Runner.run_group``; a member it
    leaves out, e.g. one resuming its own checkpoint, runs alone after)."""
    from lightning_lth.experiment.progress import watch
    from lightning_lth.experiment.stages import ArmGroup

    plan = {stage.key: stage for stage in runner.plan().stages}
    missing = [key for key in stages if key not in plan]
    if missing:
        raise LTHError(f"stage(s) {', '.join(missing)} are not in the plan of this cell: the "
                       f"config changed since the grid was built; run the grid again")
    with watch(runner, "grid", [plan[key] for key in stages]):
        if fused:
            runner.run_group(ArmGroup(tuple(plan[key] for key in stages)))
        for key in stages:
            runner.run(plan[key])


def _check_devices(devices: dict[str, str]) -> None:
    for name, value in devices.items():  # what the driver asked for, or refuse
        if os.environ.get(name) != value:
            raise LTHError(f"worker environment {name}={os.environ.get(name)!r}, the driver "
                           f"set {value!r}")


class UnitJob(submitit.helpers.Checkpointable):
    """A SLURM job: one unit, its stages from the plan of ``argv``. Requeued on preemption
    or timeout (submitit), the store resumes the stage."""

    def __init__(self, argv: tuple[str, ...], stages: tuple[str, ...], fused: bool = False):
        self.argv, self.stages, self.fused = argv, stages, fused

    def __call__(self) -> tuple[str, ...]:
        from lightning_lth.experiment.progress import quiet_lightning, silence_known_noise

        silence_known_noise()
        with quiet_lightning():
            run_unit(_runner(self.argv), self.stages, self.fused)
        return self.stages


class LocalWorker:
    """A local worker process: runs the units the driver hands it (``task-<n>.json`` in its
    folder, answered by ``done-<n>.json``) until told to stop or the driver is gone. One
    process per worker, not per unit: the imports, the parsed config and the loaded data
    serve every unit of that config."""

    def __init__(self, folder: Path, driver_pid: int, devices: dict[str, str],
                 poll_s: float = 0.05):
        self.folder, self.driver_pid = folder, driver_pid
        self.devices, self.poll_s = devices, poll_s

    def _driver_alive(self) -> bool:
        try:
            os.kill(self.driver_pid, 0)
        except ProcessLookupError:
            return False
        return True

    def __call__(self) -> int:
        from lightning_lth.experiment.progress import quiet_lightning, silence_known_noise

        _check_devices(self.devices)
        silence_known_noise()
        runners: dict[tuple[str, ...], object] = {}
        count = 0
        while self._driver_alive():
            task = self.folder / f"task-{count}.json"
            if not task.is_file():
                time.sleep(self.poll_s)
                continue
            unit = load_json(task)
            if unit.get("stop"):
                break
            argv = tuple(unit["argv"])
            try:
                with quiet_lightning():
                    if argv not in runners:
                        runners[argv] = _runner(argv)
                    run_unit(runners[argv], tuple(unit["stages"]), unit["fused"])
                answer = {"ok": True}
            except Exception as error:  # reported to the driver, which retries the unit
                traceback.print_exc()
                runners.pop(argv, None)
                answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            save_json(answer, self.folder / f"done-{count}.json")
            count += 1
        return count


class RecordsJob(submitit.helpers.Checkpointable):
    """The grid's last SLURM job: every arm's record, once all are done."""

    def __init__(self, spec: GridSpec):
        self.spec = spec

    def __call__(self) -> int:
        return write_records(build_graph(self.spec))


def write_records(graph: GridGraph) -> int:
    """Append each selected arm's record to <store>/results.jsonl (once per key)."""
    from lightning_lth.experiment.results import RESULTS_FILE, append_record

    wanted = {stage for cell in graph.cells for unit in cell.units
              for stage in graph.nodes[unit].stages}
    written = 0
    for runner in graph.runners:
        for arm in runner.plan().arms:
            if arm.key not in wanted:
                continue
            if runner.store.status(arm) != "done":
                raise LTHError(f"arm {arm.key} is not done: its record cannot be written")
            result = load_json(runner.store.path(arm) / arm.RESULT)
            written += append_record(runner.store.root / RESULTS_FILE,
                                     runner.record(arm, result))
    return written


WORKER_LIFETIME_MIN = 60 * 24 * 30  # submitit's limit on a local worker: the whole grid


@dataclass(frozen=True)
class Worker:
    """One local worker slot: its GPU (None on CPU) and its torch threads."""

    gpu: int | None
    threads: int

    def devices(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": "" if self.gpu is None else str(self.gpu),
                "OMP_NUM_THREADS": str(self.threads)}


@dataclass
class Outcome:
    slots: list[Slot]  # what ran where, in seconds since the start
    retries: dict[str, int]
    wall_s: float


@dataclass
class _Slot:
    """The driver's view of one worker: its process (a submitit job), its folder, the
    number of its next task, and the unit it runs (key, start time)."""

    job: submitit.Job
    folder: Path
    count: int = 0
    unit: tuple[str, float] | None = None


def run_local(graph: GridGraph, seconds: dict[str, float], workers: list[Worker],
              folder: Path, retries: int = 2, timeout_s: float = 86400.0,
              poll_s: float = 0.1, say: Callable[[str], None] = print) -> Outcome:
    """Run every unit left on ``workers``, longest critical path first. A unit that fails,
    times out or whose worker dies is retried (its stage resumes) up to ``retries`` times."""
    if not graph.todo():
        return Outcome([], {}, 0.0)
    executor = submitit.LocalExecutor(folder)
    ready = ReadyQueue(graph, bottom_levels(graph, seconds))
    starts = [0] * len(workers)

    def start(index: int) -> _Slot:
        starts[index] += 1
        devices = workers[index].devices()
        executor.update_parameters(
            timeout_min=WORKER_LIFETIME_MIN,  # per unit, the driver's own limit applies
            gpus_per_node=0 if workers[index].gpu is None else 1,
            visible_gpus=() if workers[index].gpu is None else (workers[index].gpu,),
            setup=[OWN_WANDB_SERVICE, *(f"export {name}={value}" for name, value in devices.items())])
        place = folder / f"worker{index}-{starts[index]}"
        place.mkdir(parents=True, exist_ok=True)
        return _Slot(executor.submit(LocalWorker(place, os.getpid(), devices)), place)

    pool = [start(index) for index in range(len(workers))]
    lost = [0] * len(workers)  # idle workers that died: a worker that cannot start
    tries: dict[str, int] = {}
    slots: list[Slot] = []
    failure: str | None = None
    began_all, total = time.time(), len(graph.todo())
    try:
        while failure is None and (ready or any(slot.unit for slot in pool)):
            for slot in pool:
                if slot.unit is None and ready:
                    key = ready.pop()
                    node = graph.nodes[key]
                    save_json({"argv": list(node.argv), "stages": list(node.stages),
                               "fused": node.fused},
                              slot.folder / f"task-{slot.count}.json")
                    slot.unit = (key, time.time())
            time.sleep(poll_s)
            for index, slot in enumerate(pool):
                state, error = _check(slot, timeout_s)
                if state == "gone":  # an idle worker died: a new one in its place
                    lost[index] += 1
                    if lost[index] > retries:
                        failure = (f"worker {index} died {lost[index]} times between stages; "
                                   f"its log: {slot.job.paths.stderr}")
                        break
                    pool[index] = start(index)
                if state not in ("done", "failed"):
                    continue
                key, began = slot.unit
                node = graph.nodes[key]
                slot.unit, slot.count = None, slot.count + 1
                if state == "done":
                    slots.append(Slot(key, index, began - began_all, time.time() - began_all))
                    ready.finished(key)
                    say(f"[{len(slots)}/{total}] done {node.name} ({key}) on worker {index} in "
                        f"{time.time() - began:.1f} s")
                    continue
                tries[key] = tries.get(key, 0) + 1
                say(f"worker {index}: {node.name} ({key}) failed ({error}); log "
                    f"{slot.job.paths.stderr}")
                if not error.startswith("raised"):  # the worker is dead or hangs
                    pool[index] = start(index)
                if tries[key] > retries:
                    failure = f"{node.name} ({key}) failed {tries[key]} times; last: {error}"
                else:
                    ready.again(key)
    finally:
        for slot in pool:
            if slot.unit is None and not slot.job.done():
                save_json({"stop": True}, slot.folder / f"task-{slot.count}.json")
            else:
                slot.job.cancel(check=False)
    if failure is not None:
        raise LTHError(f"grid stopped: {failure}. What finished is in the store; run the grid "
                       f"again to continue")
    return Outcome(slots, tries, time.time() - began_all)


def _check(slot: _Slot, timeout_s: float) -> tuple[str, str]:
    """(state, why it failed): "done" or "failed" (its unit), "busy", "idle" or "gone" (an
    idle worker that died). A worker that hangs past the timeout is cancelled."""
    answer = slot.folder / f"done-{slot.count}.json"
    if slot.unit is not None and answer.is_file():
        result = load_json(answer)
        return ("done", "") if result["ok"] else ("failed", f"raised {result['error']}")
    if slot.job.done():
        return ("failed", "the worker died (killed?)") if slot.unit else ("gone", "")
    if slot.unit is None:
        return "idle", ""
    if time.time() - slot.unit[1] > timeout_s:
        slot.job.cancel(check=False)
        return "failed", f"timed out after {timeout_s:.0f} s"
    return "busy", ""


SUBMITTED = "slurm_jobs.json"  # in the jobs folder: the last submission's unit -> job
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED",
                    "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"})
FAILED = frozenset({"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                    "PREEMPTED"})
RECORDS = "records"  # the records job's place among the unit keys


def grid_name(graph: GridGraph) -> str:
    """The SLURM job name of every job of this grid, the same for each rerun of it."""
    digest = hashlib.sha256("\n".join(sorted(graph.nodes)).encode()).hexdigest()[:8]
    return f"lth-grid-{digest}"


def last_submission(folder: Path, say: Callable[[str], None] = print) -> dict[str, str]:
    """The jobs of the last submission from ``folder`` still pending or running (unit key ->
    job id); says in one line which failed (state, log) and how many were cancelled."""
    path = folder / SUBMITTED
    if not path.is_file():
        return {}
    last = load_json(path)
    jobs = {key: submitit.SlurmJob(folder, entry["job"]) for key, entry in last.items()}
    states = {key: job.state.split()[0] for key, job in jobs.items()}  # "CANCELLED by 0"
    unknown = {jobs[key].job_id: key for key, state in states.items() if state == "UNKNOWN"}
    for job_id, state in _queue_states(list(unknown)).items():
        states[unknown[job_id]] = state
    failed = [f"{last[key]['name']} (job {jobs[key].job_id} {state}, log "
              f"{jobs[key].paths.stderr})" for key, state in states.items() if state in FAILED]
    cancelled = [key for key, state in states.items() if state == "CANCELLED"]
    if failed or cancelled:
        say(f"grid: last submission: {len(failed)} failed: {'; '.join(failed) or '-'}; "
            f"{len(cancelled)} cancelled (a failed input, or scancel); submitting what is not "
            f"done")
    return {key: jobs[key].job_id for key, state in states.items() if state in ACTIVE}


def _queue_states(job_ids: list[str]) -> dict[str, str]:
    """The controller's state of jobs that ``sacct`` does not list (yet): accounting records
    a job a moment after ``sbatch`` returns, and a rerun in that moment must not read a
    queued job as gone and submit its unit twice. Jobs squeue does not know either are left
    out (they stay UNKNOWN: gone, so their units are submitted again)."""
    if not job_ids:
        return {}
    listed = subprocess.run(["squeue", "-h", "--states=all", "-j", ",".join(job_ids),
                             "-o", "%i %T"], capture_output=True, text=True, check=False)
    rows = (line.split() for line in listed.stdout.splitlines())
    return {row[0]: row[1] for row in rows if len(row) == 2 and row[0] in job_ids}


def submit_slurm(graph: GridGraph, spec: GridSpec, order: list[str], seconds: dict[str, float],
                 folder: Path, parameters: dict,
                 say: Callable[[str], None] = print) -> dict[str, str]:
    """Submit every unit left (``order``: each after the units it needs) with ``afterok``
    dependencies, then the records job after all of them; a unit whose job from the last
    submission is still pending or running keeps that job. ``parameters``: submitit's
    SlurmExecutor parameters (partition, gpus_per_node, cpus_per_task, mem, ...); without
    ``time`` each job asks for twice its estimate plus 10 minutes. Returns key -> job id."""
    executor = submitit.SlurmExecutor(folder, max_num_timeout=3)
    name = grid_name(graph)
    queued = last_submission(folder, say)
    jobs: dict[str, str] = {}
    names: dict[str, str] = {}
    for key in order:
        node = graph.nodes[key]
        names[key] = node.name
        if key in queued:
            jobs[key] = queued[key]
            say(f"{node.name} ({key}) is still queued as job {jobs[key]}")
            continue
        after = [jobs[need] for need in node.needs if need in jobs]
        minutes = math.ceil(2 * seconds[key] / 60) + 10
        executor.update_parameters(**{"time": minutes, **parameters,
                                      **_slurm_names(parameters, name, node.name, after)})
        jobs[key] = executor.submit(UnitJob(node.argv, node.stages, node.fused)).job_id
        say(f"submitted {node.name} ({key}) as job {jobs[key]}"
            + (f" after {','.join(after)}" if after else ""))
    if RECORDS in queued and all(jobs[key] == queued.get(key) for key in jobs):
        jobs[RECORDS] = queued[RECORDS]  # nothing new: the queued records job waits on it all
    else:
        records = {**parameters, "gpus_per_node": None, "time": 30}
        executor.update_parameters(**{**records, **_slurm_names(parameters, name, RECORDS,
                                                                list(jobs.values()))})
        jobs[RECORDS] = executor.submit(RecordsJob(spec)).job_id
    names[RECORDS] = RECORDS
    save_json({key: {"job": job, "name": names[key]} for key, job in jobs.items()},
              folder / SUBMITTED)
    say(f"grid: {len(jobs)} jobs named {name}, the records job {jobs[RECORDS]} last (see them: "
        f"squeue --name={name}; cancel them: scancel --name={name})")
    return jobs


def _slurm_names(parameters: dict, grid: str, stage: str, after: list[str]) -> dict:
    """The job's name (the grid's), comment (its stage), dependencies and setup lines; a job
    whose input failed is cancelled, not left pending forever."""
    extra = dict(parameters.get("additional_parameters") or {})
    if after:
        extra["kill-on-invalid-dep"] = "yes"
    return {"job_name": grid, "comment": stage,
            "dependency": "afterok:" + ":".join(after) if after else None,
            "additional_parameters": extra,
            "setup": [OWN_WANDB_SERVICE, *(parameters.get("setup") or [])]}
