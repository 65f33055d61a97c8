"""The result record: one per trained arm, written by the runner, read by the report."""

from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from lightning_lth.io import write_atomic

RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class Record:
    """What one arm measured, and everything needed to tell it from another arm's."""

    model: str
    dataset: str
    width: int
    seed: int
    method: str  # the arm's name in the arm registry
    sparsity: float
    rewind_epoch: int
    test_acc: float  # fractions, never percent
    test_loss: float
    dense_acc_a: float
    dense_acc_b: float
    pruned_acc_a: float  # IMP's net at this sparsity, before the arms retrain
    barrier_loss_before: float
    barrier_loss_after: float
    barrier_error_before: float
    barrier_error_after: float
    connectivity: str | None  # the match stage's connectivity.json
    wall_time_s: float
    key: str  # the arm's stage key
    config_hash: str  # the configuration (seed and width aside): reports keep these apart
    num_threads: int  # torch intra-op threads: they change the last bits of CPU numbers
    device: str
    finished_at: str
    # REPAIR's barriers (study.match.repair), None where not computed; absent in older records
    barrier_loss_before_repair: float | None = None
    barrier_loss_after_repair: float | None = None
    barrier_error_before_repair: float | None = None
    barrier_error_after_repair: float | None = None
    # The size of the fused group the arm trained in (lightning_lth.fused); 1: alone. Records
    # of releases before fusion lack it: they trained alone.
    fused: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


_FRACTIONS = ("sparsity", "test_acc", "dense_acc_a", "dense_acc_b", "pruned_acc_a")


def _type_ok(value, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": number,
            "str | None": value is None or isinstance(value, str),
            "float | None": value is None or number}[kind]


def invalid(record) -> str | None:
    """Why ``record`` (a decoded JSON object) is not a usable Record, or None.

    Accuracies must be fractions: a percent slipping in would scale one arm's cells by 100.
    Losses and barriers of a diverged run may legitimately be NaN or inf. Fields with a
    default (added after a release) may be missing."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [f.name for f in fields(Record) if f.name not in record and f.default is MISSING]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    for f in fields(Record):
        if f.name in record and not _type_ok(record[f.name], f.type):
            return f"{f.name} must be {f.type}, got {record[f.name]!r}"
    for name in _FRACTIONS:
        if not 0.0 <= record[name] <= 1.0:
            return f"{name} must be a fraction in [0, 1], got {record[name]!r}"
    return None


def append_record(path: Path, record: Record) -> bool:
    """Append one JSON line unless a record with the same key is there; under a file lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("key") == record.key:
                    return False
        body = "".join(line + "\n" for line in lines) + json.dumps(record.to_dict(),
                                                                   sort_keys=True) + "\n"
        write_atomic(path, lambda handle: handle.write(body.encode()))
        return True
