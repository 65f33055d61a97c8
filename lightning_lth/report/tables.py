"""The report's tables: Tables 3-5 (accuracy), the barriers before/after matching, each pi of
the study, the study's cost (from the store's events.log), the CSV rows, and markdown."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from lightning_lth.experiment.stages import (
    ARMS,
    ArmStage,
    DenseStage,
    ImpRound,
    MatchStage,
    SnapshotStage,
)
from lightning_lth.experiment.store import SETTINGS, stage_times
from lightning_lth.io import load_json
from lightning_lth.report.aggregate import (
    Table,
    cell_stats,
    matched_arms,
    mean_std,
    method_label,
    method_order,
    per_seed,
    sparsity_label,
)

Group = tuple[str, str, int, str]  # (model, dataset, width, config hash)
# the store's stage kinds, in plan order
KINDS = tuple(stage.kind for stage in (DenseStage, SnapshotStage, ImpRound, MatchStage, ArmStage))


def group_records(records: list[dict]) -> dict[Group, list[dict]]:
    """The records by (model, dataset, width, config hash), groups in that order."""
    out: dict[Group, list[dict]] = defaultdict(list)
    for rec in records:
        out[(rec["model"], rec["dataset"], rec["width"], rec["config_hash"])].append(rec)
    return dict(sorted(out.items()))


def pct(mean: float, std: float, n: int) -> str:
    """Percent, with the std only where there is one (n > 1)."""
    return f"{100 * mean:.2f}" if n == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _seeds(n: int) -> str:
    return "one seed (n=1)" if n == 1 else f"mean ± std over n={n} seeds"


def accuracy_rows(records: list[dict]) -> tuple[Table, str]:
    """Tables 3-5 and their caption; the best mean per (sparsity, k) is bold, a cell whose
    seed count differs from the group's most common one shows its n."""
    cells = cell_stats(records)
    methods = method_order(records, ARMS)
    sparsities = sorted({s for s, _, _ in cells})
    ks = sorted({k for _, _, k in cells})
    n_common = statistics.mode(n for _, _, n in cells.values())
    rows = []
    for s in sparsities:
        best = {k: max((round(100 * cells[(s, m, k)][0], 2) for m in methods if (s, m, k) in cells),
                       default=None) for k in ks}
        for i, m in enumerate(methods):
            row = [sparsity_label(s) if i == 0 else "", method_label(m, ARMS)]
            for k in ks:
                if (s, m, k) not in cells:
                    row.append("–")
                    continue
                mean, std, n = cells[(s, m, k)]
                text = pct(mean, std, n)
                if round(100 * mean, 2) == best[k]:
                    text = f"**{text}**"
                row.append(text if n == n_common else f"{text} (n={n})")
            rows.append(row)
    caption = (f"Test accuracy (%), {_seeds(n_common)} per cell"
               + (" unless a cell shows its n." if len({n for *_, n in cells.values()}) > 1
                  else "."))
    return (["S", "Method"] + [f"k={k}" for k in ks], rows), caption


def markdown_table(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def accuracy_table(records: list[dict]) -> str:
    """Markdown table like Tables 3-5, with its caption."""
    table, caption = accuracy_rows(records)
    return markdown_table(table) + f"\n{caption}\n"


def barrier_rows(groups: dict[Group, list[dict]]) -> Table:
    """Loss/error barriers of the dense pair's interpolation, before vs after matching, per
    width: the default curve's (BatchNorm statistics reset at each alpha for a net with
    BatchNorm, else the plain interpolation) and, where any record has them, REPAIR's; the
    Seeds column is each row's n."""
    cols = ["barrier_loss_before", "barrier_loss_after", "barrier_error_before",
            "barrier_error_after"]
    header = ["Model", "Dataset", "Width", "Config", "Loss barrier before", "Loss barrier after",
              "Error barrier before (%)", "Error barrier after (%)"]
    if any(rec.get("barrier_loss_after_repair") is not None
           for recs in groups.values() for rec in recs):
        cols += [f"{col}_repair" for col in cols]
        header += [f"REPAIR {name[0].lower()}{name[1:]}" for name in header[4:]]
    rows = []
    for (model, dataset, width, config), recs in groups.items():
        row = [model, dataset, f"×{width}", config]
        seeds = len(per_seed(recs, cols[0]))
        for col in cols:
            values = per_seed(recs, col)
            if not values:
                row.append("–")
                continue
            mean, std, n = mean_std(values)
            text = pct(mean, std, n) if "error" in col else \
                f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"
            row.append(text if n == seeds else f"{text} (n={n})")
        rows.append(row + [str(seeds)])
    return header + ["Seeds"], rows


def barrier_table(groups: dict[Group, list[dict]]) -> str:
    return markdown_table(barrier_rows(groups))


def matching_rows(records: list[dict]) -> Table | None:
    """Each pi of the study: where it was found, by what, B's accuracy and the barrier there,
    and per permutation group its agreement with the final pi (same method, both nets at T;
    only where B reached T) and the mean correlation of the units it pairs; means over seeds.
    None when the records hold no permuted arm with these fields."""
    matched = matched_arms(records)
    if not matched:
        return None
    per_match: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in matched:
        per_match[r["method"]][r["seed"]] = r  # these fields repeat on every arm of one pi
    groups = sorted({g for r in matched for g in r["pi_correlation"] or {}})
    header = ["Arm", "Method", "A epoch", "B epoch", "B acc at match (%)",
              "Error barrier after (%)", *[f"agreement {g}" for g in groups],
              *[f"corr {g}" for g in groups], "Seeds"]
    rows = []
    for label in method_order(matched, ARMS):
        recs = list(per_match[label].values())
        first = recs[0]

        def mean_of(values: list) -> str:
            return f"{statistics.fmean(values):.3f}" if values else "–"

        rows.append([label, first["match_method"], str(first["match_epoch_a"]),
                     str(first["match_epoch_b"]),
                     pct(*mean_std([r["acc_b_at_match"] for r in recs])),
                     pct(*mean_std([r["barrier_error_after_at_match"] for r in recs])),
                     *[mean_of([r["pi_agreement"][g] for r in recs if r["pi_agreement"]])
                       for g in groups],
                     *[mean_of([r["pi_correlation"][g] for r in recs]) for g in groups],
                     str(len(recs))])
    return header, rows


def csv_rows(groups: dict[Group, list[dict]]) -> list[list]:
    rows = [["model", "dataset", "width", "config_hash", "sparsity", "method", "rewind_epoch",
             "test_acc_mean", "test_acc_std", "n"]]
    for (model, dataset, width, config), recs in groups.items():
        cells = cell_stats(recs)
        order = method_order(recs, ARMS)
        for (s, m, k) in sorted(cells, key=lambda c: (c[0], order.index(c[1]), c[2])):
            mean, std, n = cells[(s, m, k)]
            rows.append([model, dataset, width, config, s, m, k, repr(mean), repr(std), n])
    return rows


def cost_rows(store: Path) -> Table | None:
    """Stages, epochs and wall time per stage kind: each finished stage's last run in
    events.log, its epochs from its settings.json. None without an events.log."""
    times = stage_times(store)
    if not times:
        return None
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for (kind, key), seconds in times.items():
        settings = store / kind / key / SETTINGS
        total = totals[kind]
        total[0] += 1
        total[1] += load_json(settings).get("epochs", 0) if settings.is_file() else 0
        total[2] += seconds
    kinds = sorted(totals, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k))
    totals["all"] = [sum(totals[k][i] for k in kinds) for i in range(3)]
    rows = [[kind, str(stages), str(epochs), f"{seconds:.1f}",
             f"{seconds / epochs:.3f}" if epochs else "–"]
            for kind, (stages, epochs, seconds) in ((k, totals[k]) for k in [*kinds, "all"])]
    return ["Stage kind", "Stages", "Epochs", "Wall time (s)", "s / epoch"], rows
