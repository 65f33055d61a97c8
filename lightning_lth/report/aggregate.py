"""What the tables and the figures both compute from the records (plain dicts): the arms in
their order and their labels, mean ± std over seeds, the (sparsity, method, k) cells.

Imports nothing from lightning_lth: plots.py builds on it, and plots.py must stay importable
from the match stage (see the package docstring). So the arm registry
(``experiment.stages.ARMS``), which sits above it, is passed in (``Arms``) by the report's
upper modules."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping
from typing import Protocol


class ArmLook(Protocol):
    """How the report shows an arm (``experiment.stages.ArmSpec`` is one)."""

    label: str
    colour: str


# The arm registry: name -> its look, in the report's order. A record's method is an entry's
# name, or for an arm matched at other epochs or by another method, the name + its match
# suffix (plan.match_suffix: "permuted@b1[weight]").
Arms = Mapping[str, ArmLook]

Table = tuple[list[str], list[list[str]]]  # header, rows of markdown cells (**bold**)

DENSE_ROW, IMP_ROW = "dense", "imp"  # the diversity table's rows that are not arms


def base_method(method: str) -> str:
    """The arm registry's name inside a record's method ("permuted@b1[weight]": permuted)."""
    return method.split("@")[0].split("[")[0]


def method_order(records: list[dict], arms: Arms) -> list[str]:
    """The methods present in the registry's order, each arm followed by its variants matched
    at other epochs or by other methods, by B's matching epoch, A's, method."""
    where = {r["method"]: (r.get("match_epoch_b") or 0, r.get("match_epoch_a") or 0,
                           r.get("match_method") or "") for r in records}
    order = list(arms)
    return sorted(where, key=lambda m: (order.index(base_method(m)), m != base_method(m),
                                        where[m]))


def method_label(method: str, arms: Arms) -> str:
    """An arm's label; a variant shows its method as it is (``permuted@b1``)."""
    return arms[method].label if method in arms else method


def sparsity_label(s: float) -> str:
    return f"{100 * s:g}%"


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """mean, sample std (ddof=1; 0 for a single seed), n."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


def per_seed(records: list[dict], field: str) -> list[float]:
    """One value per seed: dense accuracy and barriers repeat on every arm of a seed, so
    averaging raw records would weight seeds by how many arms they ran."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for rec in records:
        if rec.get(field) is not None:  # an optional field (REPAIR's barriers) may be absent
            by_seed[rec["seed"]].append(rec[field])
    return [statistics.fmean(v) for _, v in sorted(by_seed.items())]


def cell_stats(records: list[dict], field: str = "test_acc") -> dict[
        tuple[float, str, int], tuple[float, float, int]]:
    """(sparsity, method, k) -> the field's (mean, std, n) over the records that have it (test
    accuracy: each seed's arm, and each replicate's), as fractions."""
    vals: dict[tuple, list[float]] = defaultdict(list)
    for rec in records:
        if rec.get(field) is not None:  # test_acc_top5: None below 100 classes
            vals[(round(rec["sparsity"], 6), rec["method"], rec["rewind_epoch"])].append(rec[field])
    return {key: mean_std(v) for key, v in vals.items()}


def matched_arms(records: list[dict]) -> list[dict]:
    """The permuted arms' records that say where their pi was found."""
    return [r for r in records if r["match_method"] is not None]
