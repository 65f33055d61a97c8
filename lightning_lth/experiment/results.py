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
    method: str  # the arm's name in the arm registry; a permuted arm's with its match suffix
    sparsity: float
    rewind_epoch: int
    test_acc: float  # fractions, never percent
    test_loss: float
    dense_acc_a: float
    dense_acc_b: float | None  # None: the study trained B only up to an early match epoch
    pruned_acc_a: float  # IMP's net at this sparsity, before the arms retrain
    # the paper's match (both nets at T, the first method); None where the study has none
    barrier_loss_before: float | None
    barrier_loss_after: float | None
    barrier_error_before: float | None
    barrier_error_after: float | None
    connectivity: str | None  # that match's connectivity.json (else this arm's own match's)
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
    # The size of the fused group the arm trained in (lightning_lth.training.fused); 1: alone. Records
    # of releases before fusion lack it: they trained alone.
    fused: int = 1
    # A permuted arm's own match (None on the other arms); records from before these fields
    # existed lack them. *_at_match: measured on the nets at the epochs matched.
    match_method: str | None = None
    match_epoch_a: int | None = None
    match_epoch_b: int | None = None
    acc_b_at_match: float | None = None  # B's test accuracy at match_epoch_b
    barrier_loss_before_at_match: float | None = None
    barrier_loss_after_at_match: float | None = None
    barrier_error_before_at_match: float | None = None
    barrier_error_after_at_match: float | None = None
    pi_correlation: dict | None = None  # group -> mean correlation of the units pi pairs
    pi_agreement: dict | None = None  # group -> fraction of units mapped as by the final pi
    # (same method, both nets at T); None where B did not reach T or no such match ran
    # Top-5 test accuracy, for datasets of 100 classes or more (None below, and in records
    # from before it was kept)
    test_acc_top5: float | None = None
    # The keys of the stages the arm read (ArmStage.stage_keys: dense_a, imp, dense_b where
    # it trained from a B): their folders <store>/<kind>/<key>/ hold their test outputs
    stages: dict[str, str] | None = None
    # r of study.replicates: the arm's B_r and data order (docs/replicates.md); records from
    # before replicates existed lack it: they are replicate 0
    replicate: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


_FRACTIONS = ("sparsity", "test_acc", "dense_acc_a", "dense_acc_b", "pruned_acc_a",
              "acc_b_at_match", "test_acc_top5")


def _type_ok(value, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    integer = isinstance(value, int) and not isinstance(value, bool)
    per_group = isinstance(value, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values())
    names = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    base, _, optional = kind.partition(" | ")
    if optional and value is None:
        return True
    return {"str": isinstance(value, str), "int": integer, "float": number,
            "dict": per_group, "dict[str, str]": names}[base]


def invalid(record) -> str | None:
    """Why ``record`` (a decoded JSON object) is not a usable Record, or None.

    Accuracies must be fractions: a percent slipping in would scale one arm's cells by 100.
    Losses and barriers of a diverged run may legitimately be NaN or inf. Fields with a
    default (added after a release) may be missing."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [f.name for f in fields(Record)
               if f.name not in record and f.default is MISSING]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    for f in fields(Record):
        if f.name in record and not _type_ok(record[f.name], f.type):
            return f"{f.name} must be {f.type}, got {record[f.name]!r}"
    for name in _FRACTIONS:
        if record.get(name) is not None and not 0.0 <= record[name] <= 1.0:
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
