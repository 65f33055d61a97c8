"""Reading what the report is made of: results.jsonl (each line validated; a rerun's line
replaces the earlier one), a W&B project, and from the store the arms' CSV logs and the
match stages' connectivity files. Each bad line or file is named, never fatal here: whether
a results file with bad lines is refused or reported without them is write.main's call."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lightning_lth.errors import LTHError
from lightning_lth.experiment.results import invalid
from lightning_lth.experiment.stages import ARMS, ArmStage
from lightning_lth.io import load_json
from lightning_lth.report.aggregate import base_method

# One sparse run is identified by these; a rerun appends a second line that replaces the first.
_RUN_ID = ("config_hash", "model", "dataset", "width", "seed", "method", "sparsity",
           "rewind_epoch", "replicate")


def validate_record(rec) -> str | None:
    """Why ``rec`` is not a usable record, or None; beyond the Record type's own checks, the
    method must be an arm this report knows how to draw."""
    why = invalid(rec)
    if why is None and base_method(rec["method"]) not in ARMS:
        return f"unknown method {rec['method']!r} (allowed: {', '.join(ARMS)})"
    return why


def _run_id(rec: dict) -> tuple:
    rec = {"replicate": 0, **rec}  # a record from before replicates: replicate 0
    return tuple(round(rec[k], 6) if k == "sparsity" else rec[k] for k in _RUN_ID)


def _collect(items) -> tuple[list[dict], list[str], list[str]]:
    """Validate (where, record) pairs: (the records, 'where: why' for each invalid one, and
    notes); on duplicate runs keep the later one and note it."""
    kept: dict[tuple, tuple[str, dict]] = {}
    bad: list[str] = []
    notes: list[str] = []
    for where, rec in items:
        why = validate_record(rec)
        if why:
            bad.append(f"{where}: {why}")
            continue
        rid = _run_id(rec)
        if rid in kept:
            notes.append(f"{kept[rid][0]}: superseded by a rerun of the same arm at {where}")
        kept[rid] = (where, rec)
    return [rec for _, rec in kept.values()], bad, notes


def line_number(problem: str) -> int:
    return int(problem.split()[1].rstrip(":"))


def load_records(path: str | Path) -> tuple[list[dict], list[str], list[str]]:
    """Read results.jsonl: (the records, 'line N: why' for each unparseable or invalid line,
    'line N: ...' notes such as a rerun superseding an earlier line), in line order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise LTHError(f"results file not found: {path}") from None
    except OSError as exc:
        raise LTHError(f"results file {path} is unreadable ({exc.strerror})") from None

    parsed, problems = [], []
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                parsed.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(f"line {n}: invalid JSON ({exc.msg})")
    records, bad, notes = _collect(parsed)
    return records, sorted(problems + bad, key=line_number), notes


def load_wandb_records(project: str, entity: str | None = None) -> tuple[list[dict], list[str]]:
    """Records from a W&B project: each run's config merged with its summary (summary wins)."""
    try:
        import wandb
    except ImportError:
        raise LTHError("wandb is not installed; pip install wandb or use --results") from None
    path = f"{entity}/{project}" if entity else project
    try:
        runs = list(wandb.Api(timeout=30).runs(path))
        items = [(f"run {run.id}", {**dict(run.config), **{
            # nested summaries (pi_agreement, pi_correlation) come back as W&B's own mappings
            key: dict(value.items()) if hasattr(value, "items") else value
            for key, value in run.summary.items()}}) for run in runs]
    except Exception as exc:  # network, auth and 404 errors come as many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LTHError(f"cannot read W&B project {path!r} ({type(exc).__name__}: {first}); "
                       f"check `wandb login`, network access and the entity/project name") from None
    records, bad, notes = _collect(items)
    return records, bad + notes


def arm_curves(records: list[dict], store: Path) -> tuple[dict[str, tuple[str, list]], list[str]]:
    """key -> (split, [(epoch on the T-epoch axis, accuracy)]) from each arm's CSV log,
    ``<store>/arm/<key>/logs/metrics.csv`` (an epoch a resumed stage logged twice keeps its
    last row). The log's val/acc is test accuracy only when the arm ran with
    data.val_split = 0 (its result.json says; older stores do not: "val/acc")."""
    curves, missing = {}, 0
    for rec in records:
        folder = store / ArmStage.kind / rec["key"]
        log = folder / ArmStage.LOGS / "metrics.csv"
        if not log.is_file():
            missing += 1
            continue
        by_epoch = {}
        with open(log, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/acc") and row.get("epoch"):
                    by_epoch[int(row["epoch"])] = float(row["val/acc"])
        result = folder / ArmStage.RESULT
        held_out = load_json(result).get("val_split") if result.is_file() else None
        split = "val/acc" if held_out is None else "validation" if held_out else "test"
        curves[rec["key"]] = (split, sorted((rec["rewind_epoch"] + epoch + 1, acc)
                                            for epoch, acc in by_epoch.items()))
    notes = ([f"no training log for {missing} arm(s) in {store}/{ArmStage.kind}/<key>/"
              f"{ArmStage.LOGS}/"] if missing else [])
    return curves, notes


def _repair_curves(data: dict) -> dict | None:
    """The REPAIR curves of a connectivity file, None where not computed."""
    curves = data.get("curves")
    return curves.get("repair") if isinstance(curves, dict) else None


def _load_connectivity(path: str) -> dict:
    data = load_json(path, "connectivity file")
    if not isinstance(data, dict):
        raise LTHError(f"connectivity file {path} holds no JSON object")
    repair = _repair_curves(data) or {}
    checks = [(side, data.get(side)) for side in ("naive", "matched")]
    if repair:
        checks += [(f"curves.repair.{side}", repair.get(side)) for side in ("naive", "matched")]
    for side, curve in checks:
        if not isinstance(curve, dict) or not all(
                isinstance(curve.get(k), list) for k in ("alphas", "loss", "acc")):
            raise LTHError(f"connectivity file {path} lacks {side}.alphas/loss/acc lists")
        if not len(curve["alphas"]) == len(curve["loss"]) == len(curve["acc"]):
            raise LTHError(f"connectivity file {path}: {side} curves differ in length")
    return data


def load_connectivity(records: list[dict]) -> tuple[list[dict], list[str]]:
    """The records' connectivity files (the match stages' curves), each as {naive, matched,
    repair} (repair: REPAIR's {naive, matched} curves where computed, else {}); missing or
    bad files are skipped and returned as notes."""
    notes: list[str] = []
    curves = []
    for path in sorted({r["connectivity"] for r in records if r["connectivity"]}):
        if not Path(path).is_file():
            notes.append(f"connectivity file missing: {path}")
            continue
        try:
            data = _load_connectivity(path)
        except LTHError as exc:
            notes.append(str(exc))
            continue
        curves.append({"naive": data["naive"], "matched": data["matched"],
                       "repair": _repair_curves(data) or {}})
    return curves, notes
