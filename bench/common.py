"""What every bench shares: side-by-side timing, and result files that say where they came from.

A speed goal here is a ratio of two things measured in one run, so that the machine's load
hits both alike: ``interleaved`` runs the sides round by round, reversing their order every
other round. A number without its machine is not a result: ``write_result`` stores the
numbers with the git commit (and whether the tree had uncommitted changes), the versions of
Python, torch, Lightning and lightning_lth, the device's name, the torch thread count, the
machine's load when the bench started and when it wrote (load average, and Linux's CPU
pressure where there is one), and the command line; the commit and the starting load are read
when this module is imported, before the bench's work. Files go to
``bench/results/<topic>_<UTC time>.json`` (git-ignored); the curated ones are copied into
``docs/benchmarks/`` by hand, with their provenance.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from lightning_lth.io import write_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def cpu_pressure() -> float | None:
    """Linux's CPU pressure: the share (%) of the last minute in which some task waited for a
    CPU (``/proc/pressure/cpu``); None where the kernel does not report it."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            return float(pressure.readline().split()[2].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[float, Any]:
    """Seconds ``fn()`` took (the device synchronised at both ends) and what it returned."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def interleaved(sides: dict[str, Callable[[], Any]], rounds: int, *, keep_going: bool = False,
                on_round: Callable[[int, dict[str, Any]], None] | None = None
                ) -> dict[str, Any]:
    """Each side once per round, in the given order in even rounds and reversed in odd ones;
    returns each side's values, one per round. With ``keep_going``, a side that raises is
    recorded as ``"FAILED: <error>"`` in place of its list and not run again (the others go
    on). ``on_round(index, values)`` is called after each round (to print progress)."""
    values: dict[str, Any] = {name: [] for name in sides}
    for index in range(rounds):
        for name in list(sides) if index % 2 == 0 else list(sides)[::-1]:
            if isinstance(values[name], str):
                continue
            try:
                values[name].append(sides[name]())
            except Exception as error:
                if not keep_going:
                    raise
                values[name] = f"FAILED: {type(error).__name__}: {error}"
        if on_round is not None:
            on_round(index, values)
    return values


def spread(values: Iterable[float]) -> dict[str, float | int]:
    """min, median and max of a side's values, and how many there were."""
    values = sorted(values)
    return {"min": values[0], "median": statistics.median(values), "max": values[-1],
            "n": len(values)}


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name for a CUDA device, else the CPU's model (``/proc/cpuinfo``)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _snapshot() -> dict[str, Any]:
    """The code and the machine's load as the bench begins (this module is imported before any
    work), so that a commit made while a bench runs is not taken for the code it ran."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"started_utc": _utc_now(), "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status),
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
            "cpu_pressure_pct_start": cpu_pressure()}


AT_START = _snapshot()


def provenance(device: torch.device | str | None = None,
               argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and how a number was measured (see the module docstring)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    return {
        **AT_START,
        "written_utc": _utc_now(),
        "command": shlex.join(["python", *(sys.argv if argv is None else argv)]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "lightning_lth": _version("lightning_lth"),
        "device": device_name(device),
        "cuda": torch.version.cuda if cuda else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_pressure_pct_end": cpu_pressure(),
    }


def result_path(topic: str) -> Path:
    """``bench/results/<topic>_<UTC time>.json``: a fresh name for this run's result."""
    return RESULTS / f"{topic}_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"


def write_result(topic: str, numbers: dict[str, Any], *,
                 device: torch.device | str | None = None, path: Path | None = None) -> Path:
    """Write ``numbers`` with their provenance as JSON (atomically), print where, return the
    path: ``path``, else ``result_path(topic)``. Values JSON cannot hold are written as text."""
    path = Path(path) if path is not None else result_path(topic)
    record = {"topic": topic, "numbers": numbers, "provenance": provenance(device)}
    data = json.dumps(record, indent=2, default=str).encode()
    write_atomic(path, lambda handle: handle.write(data))
    print(f"result written to {path}", flush=True)
    return path
