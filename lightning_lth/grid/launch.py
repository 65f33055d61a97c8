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
inputs are done. Jobs are checkpointable: on preemption or timeout submitit requeues them and
the store resumes the stage. A last job writes the records.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit

from lightning_lth.errors import LTHError
from lightning_lth.grid.graph import GridGraph, GridSpec, build_graph
from lightning_lth.grid.schedule import ReadyQueue, Slot, bottom_levels
from lightning_lth.io import load_json


def _runner(argv):
    from lightning_lth.cli import make_cli
    from lightning_lth.experiment.runner import Runner

    return Runner(make_cli(list(argv), run=False, command="experiment"))


class UnitJob(submitit.helpers.Checkpointable):
    """One unit in a worker: its stages (keys) from the plan of ``argv``, run in order."""

    def __init__(self, argv: tuple[str, ...], stages: tuple[str, ...],
                 devices: dict[str, str]):
        self.argv, self.stages, self.devices = argv, stages, devices

    def __call__(self) -> tuple[str, ...]:
        for name, value in self.devices.items():  # what the driver asked for, or refuse
            if os.environ.get(name) != value:
                raise LTHError(f"worker environment {name}={os.environ.get(name)!r}, the "
                               f"driver set {value!r}")
        from lightning_lth.experiment.progress import quiet_lightning, silence_known_noise, watch

        silence_known_noise()
        with quiet_lightning():
            runner = _runner(self.argv)
            plan = {stage.key: stage for stage in runner.plan().stages}
            missing = [key for key in self.stages if key not in plan]
            if missing:
                raise LTHError(f"stage(s) {', '.join(missing)} are not in the plan of "
                               f"{' '.join(self.argv)}: the config changed since the grid "
                               f"was built; run the grid again")
            stages = [plan[key] for key in self.stages]
            with watch(runner, "grid job", stages):
                for stage in stages:
                    runner.run(stage)
        return self.stages


class RecordsJob(submitit.helpers.Checkpointable):
    """The grid's last SLURM job: every arm's record, once all are done."""

    def __init__(self, spec: GridSpec):
        self.spec = spec

    def __call__(self) -> int:
        return write_records(build_graph(self.spec))


def write_records(graph: GridGraph) -> int:
    """Append each selected arm's record to <store>/results.jsonl (once per key)."""
    from lightning_lth.experiment.results import RESULTS_FILE, append_record

    wanted = {key for cell in graph.cells for key in cell.units}
    written = 0
    for runner in graph.runners:
        for arm in runner.plan().arms:
            if arm.key not in wanted:
                continue
            if runner.store.status(arm) != "done":
                raise LTHError(f"arm {arm.key} is not done: its record cannot be written")
            result = load_json(runner.store.path(arm) / "result.json")
            written += append_record(runner.store.root / RESULTS_FILE,
                                     runner.record(arm, result))
    return written


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


def run_local(graph: GridGraph, seconds: dict[str, float], workers: list[Worker],
              folder: Path, retries: int = 2, timeout_s: float = 86400.0,
              poll_s: float = 0.2, say: Callable[[str], None] = print) -> Outcome:
    """Run every unit left on ``workers``, longest critical path first."""
    executor = submitit.LocalExecutor(folder)
    ready = ReadyQueue(graph, bottom_levels(graph, seconds))
    free = list(range(len(workers)))
    running: dict[int, tuple[str, submitit.Job, float]] = {}
    tries: dict[str, int] = {}
    slots: list[Slot] = []
    failure: str | None = None
    started = time.time()
    total = len(graph.todo())
    while running or (ready and failure is None):
        while free and ready and failure is None:
            key = ready.pop()
            index = free.pop(0)
            running[index] = (key, _submit(executor, graph, key, workers[index], timeout_s),
                              time.time())
        time.sleep(poll_s)
        for index, (key, job, began) in list(running.items()):
            late = time.time() - began > timeout_s
            if not job.done() and not late:
                continue
            if late:
                job.cancel(check=False)
            error = "timed out" if late else _failed(job)
            del running[index]
            free.append(index)
            free.sort()
            node = graph.nodes[key]
            if error is None:
                slots.append(Slot(key, index, began - started, time.time() - started))
                ready.finished(key)
                say(f"[{len(slots)}/{total}] done {node.name} ({key}) on worker {index} in "
                    f"{time.time() - began:.1f} s")
                continue
            tries[key] = tries.get(key, 0) + 1
            say(f"worker {index}: {node.name} ({key}) failed ({error}); log "
                f"{job.paths.stderr}")
            if tries[key] > retries:
                failure = f"{node.name} ({key}) failed {tries[key]} times; last: {error}"
            else:
                ready.again(key)
    if failure is not None:
        raise LTHError(f"grid stopped: {failure}. What finished is in the store; run the grid "
                       f"again to continue")
    return Outcome(slots, tries, time.time() - started)


def _submit(executor, graph: GridGraph, key: str, worker: Worker, timeout_s: float):
    devices = worker.devices()
    executor.update_parameters(
        timeout_min=timeout_s / 60 + 5,  # the driver's limit comes first
        gpus_per_node=0 if worker.gpu is None else 1,
        visible_gpus=() if worker.gpu is None else (worker.gpu,),
        setup=[f"export {name}={value}" for name, value in devices.items()])
    node = graph.nodes[key]
    return executor.submit(UnitJob(node.argv, node.stages, devices))


def _failed(job) -> str | None:
    """Why a finished local job failed, or None: it raised, or died without a result."""
    if not job.paths.result_pickle.exists():
        return "the worker died without a result"
    error = job.exception()
    return None if error is None else str(error).strip().splitlines()[-1]


def submit_slurm(graph: GridGraph, spec: GridSpec, order: list[str], seconds: dict[str, float],
                 folder: Path, parameters: dict,
                 say: Callable[[str], None] = print) -> dict[str, str]:
    """Submit every unit left (``order``: each after the units it needs) with ``afterok``
    dependencies, then the records job after all of them. ``parameters``: submitit's
    SlurmExecutor parameters (partition, gpus_per_node, cpus_per_task, mem, ...); without
    ``time`` each job asks for twice its estimate plus 10 minutes. Returns key -> job id."""
    executor = submitit.SlurmExecutor(folder, max_num_timeout=3)
    jobs: dict[str, str] = {}
    for key in order:
        node = graph.nodes[key]
        after = [jobs[need] for need in node.needs if need in jobs]
        minutes = math.ceil(2 * seconds[key] / 60) + 10
        executor.update_parameters(**{"time": minutes, **parameters,
                                      **_slurm_names(parameters, node.name, after)})
        jobs[key] = executor.submit(UnitJob(node.argv, node.stages, {})).job_id
        say(f"submitted {node.name} ({key}) as job {jobs[key]}"
            + (f" after {','.join(after)}" if after else ""))
    records = {**parameters, "gpus_per_node": None, "time": 30}
    executor.update_parameters(**{**records,
                                  **_slurm_names(parameters, "records", list(jobs.values()))})
    jobs["records"] = executor.submit(RecordsJob(spec)).job_id
    say(f"submitted the records job as {jobs['records']}")
    return jobs


def _slurm_names(parameters: dict, name: str, after: list[str]) -> dict:
    """The job's name and dependencies; a job whose input failed is cancelled, not left
    pending forever."""
    extra = dict(parameters.get("additional_parameters") or {})
    if after:
        extra["kill-on-invalid-dep"] = "yes"
    return {"job_name": f"lth {name}",
            "dependency": "afterok:" + ":".join(after) if after else None,
            "additional_parameters": extra}
