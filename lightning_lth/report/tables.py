"""The report's tables: Tables 3-5 (accuracy, top-5 beside top-1 where recorded), the
published Table 1 (diversity and ensembles, from the stages' kept test outputs), the barriers
before/after matching, each pi of the study, the study's cost (from the store's events.log),
the CSV rows, and markdown."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lightning_lth.errors import LTHError
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
    DENSE_ROW,
    IMP_ROW,
    Table,
    cell_stats,
    matched_arms,
    mean_std,
    method_label,
    method_order,
    per_seed,
    sparsity_label,
)
from lightning_lth.report.diversity import Diversity, diversity
from lightning_lth.report.load import OUTPUTS, load_outputs, outputs_path

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
    seed count differs from the group's most common one shows its n. Where records carry
    top-5 accuracy, each k's column is followed by its top-5 column."""
    cells = cell_stats(records)
    top5 = cell_stats(records, "test_acc_top5")
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
                if top5:
                    five = top5.get((s, m, k))
                    row.append("–" if five is None else
                               pct(*five) if five[2] == n else f"{pct(*five)} (n={five[2]})")
            rows.append(row)
    caption = (f"Test accuracy (%), {_seeds(n_common)} per cell"
               + (" unless a cell shows its n." if len({n for *_, n in cells.values()}) > 1
                  else ".") + (" Top-5 columns: top-5 accuracy, where recorded." if top5 else ""))
    columns = [[f"k={k}", f"k={k} top-5"] if top5 else [f"k={k}"] for k in ks]
    return (["S", "Method"] + [c for pair in columns for c in pair], rows), caption


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
    """report.csv: one row per (sparsity, method, k) cell; the top-5 columns are empty where
    the records have no top-5 accuracy."""
    rows = [["model", "dataset", "width", "config_hash", "sparsity", "method", "rewind_epoch",
             "test_acc_mean", "test_acc_std", "n", "test_acc_top5_mean", "test_acc_top5_std"]]
    for (model, dataset, width, config), recs in groups.items():
        cells = cell_stats(recs)
        top5 = cell_stats(recs, "test_acc_top5")
        order = method_order(recs, ARMS)
        for (s, m, k) in sorted(cells, key=lambda c: (c[0], order.index(c[1]), c[2])):
            mean, std, n = cells[(s, m, k)]
            five = [repr(v) for v in top5[(s, m, k)][:2]] if (s, m, k) in top5 else ["", ""]
            rows.append([model, dataset, width, config, s, m, k, repr(mean), repr(std), n, *five])
    return rows


# -- the published Table 1: diversity and ensembles ------------------------------------------

Member = tuple[str, str]  # (stage kind, key): its kept outputs in <store>/<kind>/<key>/
Cell = tuple[float, int]  # (sparsity, k)

DIVERSITY_GROUPS = (
    "Groups: LTH, naive and permuted: the R replicates of one (seed, sparsity, k) cell "
    "(`replicate` 0..R-1), each row the mean over seeds of its groups' metrics (test acc: the "
    "mean over seeds of each group's mean ± its std); IMP: the IMP nets at this sparsity of "
    "the seeds' independent dense nets A, one per seed, as one group; dense: the dense nets "
    "B_r of a seed, averaged over seeds. Ensemble: the mean of the members' softmax outputs, "
    "then top-1. Disagreement: the fraction of test images on which two models' top-1 "
    "predictions differ, mean over pairs; KL: KL(p_i||p_j) in nats, mean over images and "
    "ordered pairs (= the symmetrised KL's mean over unordered pairs); JS: Jensen-Shannon "
    "divergence in nats (at most ln 2), mean over unordered pairs. A group of one model "
    "has no pairs: its columns are blank. Models: per group; Groups: groups averaged.")


@dataclass(frozen=True)
class DiversityRow:
    """One row of the table: its groups' metrics (one group per seed; IMP's across seeds)."""

    row: str  # DENSE_ROW, IMP_ROW or a record's method
    groups: list[Diversity]


def diversity_members(records: list[dict], store: Path) -> tuple[
        dict[Cell, dict[str, list[list[Member]]]], int]:
    """(sparsity, k) -> row -> its groups' members, and how many records lack kept outputs
    (their own, or a stage's their `stages` names, or have no `stages`): a group with a
    member whose outputs are not in the store is left out, never computed from the rest."""
    def have(kind: str, key: str | None) -> bool:
        return key is not None and outputs_path(store, kind, key).is_file()

    lacking: set[int] = set()
    arms: dict[tuple, list[tuple[int, Member]]] = defaultdict(list)
    broken: set[tuple] = set()  # arm cells, (IMP_ROW, s), (DENSE_ROW, seed) missing a member
    imp: dict[tuple[float, int], set[str]] = defaultdict(set)
    dense: dict[int, set[str]] = defaultdict(set)
    for index, rec in enumerate(records):
        s, seed = round(rec["sparsity"], 6), rec["seed"]
        arm = (s, rec["rewind_epoch"], rec["method"], seed)
        arms[arm].append((rec.get("replicate", 0), (ArmStage.kind, rec["key"])))
        if not have(ArmStage.kind, rec["key"]):
            lacking.add(index)
            broken.add(arm)
        stages = rec.get("stages")
        if not stages:
            lacking.add(index)
            broken |= {(DENSE_ROW, seed)}
            continue
        if have(ImpRound.kind, stages.get("imp")):
            imp[(s, seed)].add(stages["imp"])
        else:
            lacking.add(index)
        if stages.get("dense_b") is not None:  # an arm that reads a B
            if have(DenseStage.kind, stages["dense_b"]):
                dense[seed].add(stages["dense_b"])
            else:
                lacking.add(index)
                broken.add((DENSE_ROW, seed))
    cells: dict[Cell, dict[str, list[list[Member]]]] = {}
    for s, k in sorted({(s, k) for s, k, _, _ in arms}):
        seeds = sorted({seed for s2, k2, _, seed in arms if (s2, k2) == (s, k)})
        rows = {DENSE_ROW: [[(DenseStage.kind, key) for key in sorted(dense[seed])]
                            for seed in seeds if dense[seed] and (DENSE_ROW, seed) not in broken],
                IMP_ROW: [[(ImpRound.kind, key) for seed in seeds
                           for key in sorted(imp[(s, seed)])]]
                if all(imp[(s, seed)] for seed in seeds) else []}
        for (s2, k2, method, seed), members in sorted(arms.items()):
            if (s2, k2) == (s, k) and (s, k, method, seed) not in broken:
                rows.setdefault(method, []).append([member for _, member in sorted(members)])
        cells[(s, k)] = {row: groups for row, groups in rows.items() if groups}
    return cells, len(lacking)


def diversity_cells(records: list[dict], store: Path) -> tuple[
        dict[Cell, list[DiversityRow]], str | None, list[str]]:
    """Each (sparsity, k)'s rows in the table's order (dense, IMP, the arms); one line saying
    how many records lack kept outputs (None if none do); a note for each group whose
    outputs could not be used."""
    members, lacking = diversity_members(records, store)
    order = method_order(records, ARMS)
    line = (f"{lacking} of {len(records)} record(s) lack kept test outputs (no `stages` "
            f"in the record, or no {OUTPUTS} in {store}/<kind>/<key>/): the groups they "
            f"belong to are left out." if lacking else None)
    notes: list[str] = []
    cells: dict[Cell, list[DiversityRow]] = {}
    for cell, rows in members.items():
        out = []
        for row in sorted(rows, key=lambda r: (r != DENSE_ROW, r != IMP_ROW,
                                                order.index(r) if r in order else 0)):
            metrics = []
            for group in rows[row]:
                loaded = [load_outputs(outputs_path(store, kind, key)) for kind, key in group]
                why = next((why for _, why in loaded if why), None)
                if why is None:
                    try:
                        metrics.append(diversity([data["probs"] for data, _ in loaded],
                                                 [data["targets"] for data, _ in loaded]))
                        continue
                    except LTHError as exc:  # outputs of different test sets
                        why = str(exc)
                notes.append(f"diversity at S={sparsity_label(cell[0])}, k={cell[1]}, "
                             f"{row}: group left out ({why})")
            if metrics:
                out.append(DiversityRow(row, metrics))
        if out:
            cells[cell] = out
    return cells, line, notes


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def row_label(row: str) -> str:
    return {DENSE_ROW: "dense", IMP_ROW: "IMP"}.get(row) or method_label(row, ARMS)


def ensemble_by_size(row: DiversityRow) -> list[float]:
    """[m - 1]: mean over the row's groups of at least m models of their ensemble accuracy."""
    largest = max(g.members for g in row.groups)
    return [statistics.fmean(g.ensemble_by_size[m] for g in row.groups if g.members > m)
            for m in range(largest)]


def _summary(row: DiversityRow) -> dict:
    """The row's numbers (fractions; None where its groups have no pairs)."""
    sizes = sorted({g.members for g in row.groups})
    return {"row": row.row,
            "test_acc_mean": _mean([g.acc_mean for g in row.groups]),
            "test_acc_std": _mean([g.acc_std for g in row.groups]),
            "ensemble_acc": _mean([g.ensemble_acc for g in row.groups]),
            "disagreement": _mean([g.disagreement for g in row.groups]),
            "kl": _mean([g.kl for g in row.groups]), "js": _mean([g.js for g in row.groups]),
            "models": str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}",
            "groups": len(row.groups)}


def diversity_rows(rows: list[DiversityRow]) -> Table:
    """One (sparsity, k)'s table in the published Table 1's layout."""
    def num(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    body = []
    for row in rows:
        v = _summary(row)
        acc = ("–" if v["test_acc_mean"] is None else
               pct(v["test_acc_mean"], v["test_acc_std"] or 0.0,
                   1 if v["test_acc_std"] is None else 2))
        body.append([row_label(row.row), acc, f"{100 * v['ensemble_acc']:.2f}",
                     num(v["disagreement"]), num(v["kl"]), num(v["js"]), v["models"],
                     str(v["groups"])])
    return (["Row", "Test acc (%)", "Ensemble acc (%)", "Disagreement", "KL", "JS", "Models",
             "Groups"], body)


DIVERSITY_CSV = ["model", "dataset", "width", "config_hash", "sparsity", "rewind_epoch", "row",
                 "test_acc_mean", "test_acc_std", "ensemble_acc", "disagreement", "kl", "js",
                 "models", "groups", "ensemble_acc_by_members"]


def diversity_csv_rows(group: Group, cells: dict[Cell, list[DiversityRow]]) -> list[list]:
    """diversity.csv's rows (and the W&B table's) for one group of records: fractions as
    repr, empty where undefined; ensemble_acc_by_members a JSON list, [m - 1] for m models."""
    out = []
    for (s, k), rows in cells.items():
        for row in rows:
            v = _summary(row)
            out.append([*group, s, k, row.row,
                        *("" if v[c] is None else repr(v[c]) for c in DIVERSITY_CSV[7:13]),
                        v["models"], v["groups"], json.dumps(ensemble_by_size(row))])
    return out


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
