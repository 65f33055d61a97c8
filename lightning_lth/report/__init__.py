"""Turn the per-arm results (results.jsonl or a W&B project) into the paper's tables and figures.

Tables 3-5: test accuracy (%) as mean ± std over seeds, rows sparsity x method, columns rewind
epoch k.  Figs. 3/4: accuracy vs k per sparsity; Fig. 7: accuracy vs sparsity per k; plus the
matching-quality interpolation curves and loss/error barriers before/after matching. With the
store at hand, also each arm's accuracy over its epochs (its CSV log) and the study's cost
(events.log).

The report is a list of blocks (headings, paragraphs, tables, figures) written twice: as
report.md and as report.html, one self-contained page (figures inlined as base64 PNG, no
network) to open in a browser. One list for both: the page's numbers are report.md's.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_lth.errors import LTHError
from lightning_lth.experiment.results import Record, invalid
from lightning_lth.experiment.store import SETTINGS, stage_times
from lightning_lth.io import load_json, write_atomic

METHODS = ("lth", "naive", "permuted")  # the arm registry; a permuted arm matched at other
# epochs or by another method is "permuted" + its match suffix (plan.match_suffix)
_LABELS = {"lth": "LTH", "naive": "naive", "permuted": "permuted"}
_COLORS = {"lth": "tab:green", "naive": "tab:red", "permuted": "tab:blue"}
_MORE_COLORS = ("tab:purple", "tab:orange", "tab:cyan", "tab:olive", "tab:brown", "tab:pink",
                "tab:gray")
_MATCH_FIELDS = {f.name: f.default for f in fields(Record) if f.default is not MISSING}

# One sparse run is identified by these; a rerun appends a second line that replaces the first.
_RUN_ID = ("config_hash", "model", "dataset", "width", "seed", "method", "sparsity",
           "rewind_epoch")


def base_method(method: str) -> str:
    """The arm registry's name inside a record's method ("permuted@b1[weight]": permuted)."""
    return method.split("@")[0].split("[")[0]


def method_order(records: list[dict]) -> list[str]:
    """The methods present: LTH, naive, permuted, then the permuted arms matched at other
    epochs or by other methods, by B's matching epoch, A's, method."""
    where = {r["method"]: (r.get("match_epoch_b") or 0, r.get("match_epoch_a") or 0,
                           r.get("match_method") or "") for r in records}
    return sorted(where, key=lambda m: (METHODS.index(base_method(m)), m != base_method(m),
                                        where[m]))


def _label(method: str) -> str:
    return _LABELS.get(method, method)


def _colors(methods: list[str]) -> dict[str, str]:
    variants = [m for m in methods if m not in _COLORS]
    return {**_COLORS, **{m: _MORE_COLORS[i % len(_MORE_COLORS)]
                          for i, m in enumerate(variants)}}

Group = tuple[str, str, int, str]  # (model, dataset, width, config hash)
Table = tuple[list[str], list[list[str]]]  # header, rows of markdown cells (**bold**)
KINDS = ("dense", "snapshot", "imp", "match", "arm")  # the store's stage kinds, in plan order


# --------------------------------------------------------------------------- loading

def validate_record(rec) -> str | None:
    """Why ``rec`` is not a usable record, or None; beyond the Record type's own checks, the
    method must be an arm this report knows how to draw."""
    why = invalid(rec)
    if why is None and base_method(rec["method"]) not in METHODS:
        return f"unknown method {rec['method']!r} (allowed: {', '.join(METHODS)})"
    return why


def _run_id(rec: dict) -> tuple:
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


def _line_number(problem: str) -> int:
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
    return records, sorted(problems + bad, key=_line_number), notes


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


# --------------------------------------------------------------------------- aggregation

def _stats(values: list[float]) -> tuple[float, float, int]:
    """mean, sample std (ddof=1; 0 for a single seed), n."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


def _groups(records: list[dict]) -> dict[Group, list[dict]]:
    out: dict[Group, list[dict]] = defaultdict(list)
    for rec in records:
        out[(rec["model"], rec["dataset"], rec["width"], rec["config_hash"])].append(rec)
    return dict(sorted(out.items()))


def cell_stats(records: list[dict]) -> dict[tuple[float, str, int], tuple[float, float, int]]:
    """(sparsity, method, k) -> test-accuracy (mean, std, n) over seeds, as fractions."""
    vals: dict[tuple, list[float]] = defaultdict(list)
    for rec in records:
        vals[(round(rec["sparsity"], 6), rec["method"], rec["rewind_epoch"])].append(rec["test_acc"])
    return {key: _stats(v) for key, v in vals.items()}


def _per_seed(records: list[dict], field: str) -> list[float]:
    """One value per seed: dense accuracy and barriers repeat on every arm of a seed, so
    averaging raw records would weight seeds by how many arms they ran."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for rec in records:
        if rec.get(field) is not None:  # an optional field (REPAIR's barriers) may be absent
            by_seed[rec["seed"]].append(rec[field])
    return [statistics.fmean(v) for _, v in sorted(by_seed.items())]


def _pct(mean: float, std: float, n: int) -> str:
    """Percent, with the std only where there is one (n > 1)."""
    return f"{100 * mean:.2f}" if n == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _seeds(n: int) -> str:
    return "one seed (n=1)" if n == 1 else f"mean ± std over n={n} seeds"


def _sparsity_label(s: float) -> str:
    return f"{100 * s:g}%"


# --------------------------------------------------------------------------- tables

def accuracy_rows(records: list[dict]) -> tuple[Table, str]:
    """Tables 3-5 and their caption; the best mean per (sparsity, k) is bold, a cell whose
    seed count differs from the group's most common one shows its n."""
    cells = cell_stats(records)
    methods = method_order(records)
    sparsities = sorted({s for s, _, _ in cells})
    ks = sorted({k for _, _, k in cells})
    n_common = statistics.mode(n for _, _, n in cells.values())
    rows = []
    for s in sparsities:
        best = {k: max((round(100 * cells[(s, m, k)][0], 2) for m in methods if (s, m, k) in cells),
                       default=None) for k in ks}
        for i, m in enumerate(methods):
            row = [_sparsity_label(s) if i == 0 else "", _label(m)]
            for k in ks:
                if (s, m, k) not in cells:
                    row.append("–")
                    continue
                mean, std, n = cells[(s, m, k)]
                text = _pct(mean, std, n)
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
        seeds = len(_per_seed(recs, cols[0]))
        for col in cols:
            values = _per_seed(recs, col)
            if not values:
                row.append("–")
                continue
            mean, std, n = _stats(values)
            text = _pct(mean, std, n) if "error" in col else \
                f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"
            row.append(text if n == seeds else f"{text} (n={n})")
        rows.append(row + [str(seeds)])
    return header + ["Seeds"], rows


def barrier_table(groups: dict[Group, list[dict]]) -> str:
    return markdown_table(barrier_rows(groups))


def _matched(records: list[dict]) -> list[dict]:
    """The permuted arms' records that say where their pi was found."""
    return [r for r in records if r["match_method"] is not None]


def _series(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(method, which A) -> records, for curves over B's matching epoch: "A at T" (a bare
    epoch in study.match.epochs) or "A at B's epoch" (pairs [j, j]); the match of both nets at
    T ends both curves. Other pairs get a series of their own A epoch."""
    matched = _matched(records)
    final = max((max(r["match_epoch_a"], r["match_epoch_b"]) for r in matched), default=0)
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in matched:
        a, b = r["match_epoch_a"], r["match_epoch_b"]
        if a == b:
            out[(r["match_method"], "A at B's epoch")].append(r)
        if a != b or a == final:
            out[(r["match_method"], f"A at {a}" if a != final else "A at T")].append(r)
    # a series is a curve only if it has an early point
    return {key: recs for key, recs in sorted(out.items())
            if len({r["match_epoch_b"] for r in recs}) > 1}


def matching_rows(records: list[dict]) -> Table | None:
    """Each pi of the study: where it was found, by what, B's accuracy and the barrier there,
    and per permutation group its agreement with the final pi (same method, both nets at T;
    only where B reached T) and the mean correlation of the units it pairs; means over seeds.
    None when the records hold no permuted arm with these fields."""
    matched = _matched(records)
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
    for label in method_order(matched):
        recs = list(per_match[label].values())
        first = recs[0]

        def mean_of(values: list) -> str:
            return f"{statistics.fmean(values):.3f}" if values else "–"

        rows.append([label, first["match_method"], str(first["match_epoch_a"]),
                     str(first["match_epoch_b"]),
                     _pct(*_stats([r["acc_b_at_match"] for r in recs])),
                     _pct(*_stats([r["barrier_error_after_at_match"] for r in recs])),
                     *[mean_of([r["pi_agreement"][g] for r in recs if r["pi_agreement"]])
                       for g in groups],
                     *[mean_of([r["pi_correlation"][g] for r in recs]) for g in groups],
                     str(len(recs))])
    return header, rows


def plot_vs_match_epoch(records: list[dict], title: str) -> bytes | None:
    """Permuted-arm accuracy against B's matching epoch, one panel per (sparsity, k), LTH and
    naive as horizontal lines; None without early matches."""
    series = _series(records)
    if not series:
        return None
    cells = sorted({(round(r["sparsity"], 6), r["rewind_epoch"]) for r in _matched(records)})
    fig, axes = _grid(len(cells))
    fig.set_layout_engine("constrained")  # room for the title above the panels' titles
    colors = dict(zip(series, _MORE_COLORS[1:] + _MORE_COLORS[:1], strict=False))
    for ax, (s, k) in zip(axes, cells, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for (method, which), recs in series.items():
            by_epoch: dict[int, list[float]] = defaultdict(list)
            for r in recs:
                if (round(r["sparsity"], 6), r["rewind_epoch"]) == (s, k):
                    by_epoch[r["match_epoch_b"]].append(r["test_acc"])
            if by_epoch:
                x = sorted(by_epoch)
                ax.errorbar(x, [100 * _stats(by_epoch[e])[0] for e in x],
                            yerr=[100 * _stats(by_epoch[e])[1] for e in x], marker="o",
                            capsize=3, color=colors[(method, which)],
                            label=f"permuted ({method}, {which})")
        for m in ("lth", "naive"):
            accs = [r["test_acc"] for r in records if r["method"] == m
                    and (round(r["sparsity"], 6), r["rewind_epoch"]) == (s, k)]
            if accs:
                ax.axhline(100 * statistics.fmean(accs), color=_COLORS[m], linestyle="--",
                           label=_LABELS[m])
        ax.set(title=f"sparsity {_sparsity_label(s)}, k = {k}", xlabel="B's matching epoch",
               ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: accuracy vs the epoch pi was found at")
    return _png(fig)


def plot_agreement(records: list[dict], title: str) -> bytes | None:
    """Per permutation group, the fraction of units each pi maps as the final pi does,
    against B's matching epoch (means over seeds); None without early matches where B
    reached T."""
    series = {key: [r for r in recs if r["pi_agreement"]] for key, recs in
              _series(records).items()}
    series = {key: recs for key, recs in series.items() if recs}
    if not series:
        return None
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    styles = ("-", "--", ":", "-.")
    for index, ((method, which), recs) in enumerate(series.items()):
        per_pi = {(r["seed"], r["match_epoch_b"]): r["pi_agreement"] for r in recs}
        groups = sorted({g for agreement in per_pi.values() for g in agreement})
        for color, group in zip(_MORE_COLORS * len(groups), groups, strict=False):
            x = sorted({b for _, b in per_pi})
            ax.plot(x, [statistics.fmean(a[group] for (_, b), a in per_pi.items() if b == e)
                        for e in x], styles[index % len(styles)], marker="o", color=color,
                    label=f"{group} ({method}, {which})")
    ax.set(xlabel="B's matching epoch", ylabel="agreement with the final pi",
           ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{title}: how early pi is found")
    return _png(fig)


def csv_rows(groups: dict[Group, list[dict]]) -> list[list]:
    rows = [["model", "dataset", "width", "config_hash", "sparsity", "method", "rewind_epoch",
             "test_acc_mean", "test_acc_std", "n"]]
    for (model, dataset, width, config), recs in groups.items():
        cells = cell_stats(recs)
        order = method_order(recs)
        for (s, m, k) in sorted(cells, key=lambda c: (c[0], order.index(c[1]), c[2])):
            mean, std, n = cells[(s, m, k)]
            rows.append([model, dataset, width, config, s, m, k, repr(mean), repr(std), n])
    return rows


# --------------------------------------------------------------------------- plots

def _png(fig: Figure) -> bytes:
    """Render with Agg directly: no pyplot, so no global backend or figure-registry state."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _grid(n: int, ncols_max: int = 4) -> tuple[Figure, list]:
    ncols = min(n, ncols_max)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4 * ncols, 3.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _dense_line(ax, records: list[dict]) -> None:
    ax.axhline(100 * statistics.fmean(_per_seed(records, "dense_acc_a")),
               color="black", linestyle="--", linewidth=1, label="dense")


def _accuracy_panels(records: list[dict], title: str, panels: list, panel_of, x_of,
                     panel_title, xlabel: str) -> bytes:
    """One panel per value of ``panel_of(cell)``: accuracy vs ``x_of(cell)`` per method."""
    cells = cell_stats(records)
    methods = method_order(records)
    colors = _colors(methods)
    fig, axes = _grid(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        for m in methods:
            pts = sorted((x_of(key), mean, std) for key, (mean, std, _) in cells.items()
                         if panel_of(key) == panel and key[1] == m)
            if pts:
                x, mean, std = zip(*pts, strict=True)
                ax.errorbar(x, [100 * v for v in mean], yerr=[100 * v for v in std],
                            marker="o", capsize=3, color=colors[m], label=_label(m))
        _dense_line(ax, records)
        ax.set(title=panel_title(panel), xlabel=xlabel, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    return _png(fig)


def plot_vs_k(records: list[dict], title: str) -> bytes:
    """Figs. 3/4: one panel per sparsity, accuracy vs rewind epoch k."""
    sparsities = sorted({s for s, _, _ in cell_stats(records)})
    return _accuracy_panels(records, title, sparsities, lambda key: key[0], lambda key: key[2],
                            lambda s: f"sparsity {_sparsity_label(s)}", "rewind epoch k")


def plot_vs_sparsity(records: list[dict], title: str, ks: list[int] | None = None) -> bytes:
    """Fig. 7: one panel per rewind epoch k, accuracy vs sparsity."""
    present = {k for _, _, k in cell_stats(records)}
    ks = sorted(present if ks is None else set(ks) & present)
    if not ks:
        raise LTHError("none of the requested rewind epochs are present in the results")
    return _accuracy_panels(records, title, ks, lambda key: key[2], lambda key: 100 * key[0],
                            lambda k: f"k = {k}", "sparsity (%)")


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


def plot_interpolation(records: list[dict], title: str) -> tuple[bytes | None, list[str]]:
    """Accuracy and loss along the linear path between the dense pair, before ('naive') and after
    ('matched') permutation matching, one line per connectivity file, and REPAIR's curves where
    the file has them (study.match.repair).  Missing or bad files are
    skipped and returned as notes; None when no file could be read."""
    notes: list[str] = []
    curves = []
    for path in sorted({r["connectivity"] for r in records if r["connectivity"]}):
        if not Path(path).is_file():
            notes.append(f"connectivity file missing: {path}")
            continue
        try:
            curves.append(_load_connectivity(path))
        except LTHError as exc:
            notes.append(str(exc))
    if not curves:
        return None, notes
    fig = Figure(figsize=(9, 3.4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    labelled = set()
    for data in curves:
        repair = _repair_curves(data) or {}
        for c, name, style, color in (
                (data["naive"], "before matching", "--", "tab:red"),
                (data["matched"], "after matching", "-", "tab:blue"),
                (repair.get("naive"), "before matching, REPAIR", "--", "tab:olive"),
                (repair.get("matched"), "after matching, REPAIR", "-", "tab:green")):
            if c is None:
                continue
            label = None if name in labelled else name
            labelled.add(name)
            ax_acc.plot(c["alphas"], [100 * a for a in c["acc"]], style, color=color, label=label)
            ax_loss.plot(c["alphas"], c["loss"], style, color=color, label=label)
    ax_acc.set(xlabel="α (model A → model B)", ylabel="test accuracy (%)")
    ax_loss.set(xlabel="α (model A → model B)", ylabel="test loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend()
    fig.suptitle(f"{title}: linear interpolation ({len(curves)} pair(s))")
    return _png(fig), notes


# --------------------------------------------------------------------------- the store's logs

def arm_curves(records: list[dict], store: Path) -> tuple[dict[str, tuple[str, list]], list[str]]:
    """key -> (split, [(epoch on the T-epoch axis, accuracy)]) from each arm's CSV log,
    ``<store>/arm/<key>/logs/metrics.csv`` (an epoch a resumed stage logged twice keeps its
    last row). The log's val/acc is test accuracy only when the arm ran with
    data.val_split = 0 (its result.json says; older stores do not: "val/acc")."""
    curves, missing = {}, 0
    for rec in records:
        folder = store / "arm" / rec["key"]
        if not (folder / "logs" / "metrics.csv").is_file():
            missing += 1
            continue
        by_epoch = {}
        with open(folder / "logs" / "metrics.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/acc") and row.get("epoch"):
                    by_epoch[int(row["epoch"])] = float(row["val/acc"])
        result = folder / "result.json"
        held_out = load_json(result).get("val_split") if result.is_file() else None
        split = "val/acc" if held_out is None else "validation" if held_out else "test"
        curves[rec["key"]] = (split, sorted((rec["rewind_epoch"] + epoch + 1, acc)
                                            for epoch, acc in by_epoch.items()))
    notes = [f"no training log for {missing} arm(s) in {store}/arm/<key>/logs/"] if missing else []
    return curves, notes


def plot_arm_curves(records: list[dict], curves: dict, title: str) -> bytes | None:
    """Each method's accuracy after each epoch, mean over seeds, one panel per (sparsity, k);
    epochs on the T-epoch axis (an arm rewound to k starts at k)."""
    cells = sorted({(round(r["sparsity"], 6), r["rewind_epoch"]) for r in records
                    if r["key"] in curves})
    if not cells:
        return None
    splits = sorted({curves[r["key"]][0] for r in records if r["key"] in curves})
    label = "val/acc (%)" if splits == ["val/acc"] else f"{' / '.join(splits)} accuracy (%)"
    methods = method_order(records)
    colors = _colors(methods)
    fig, axes = _grid(len(cells))
    fig.set_layout_engine("constrained")  # room for the title above the panels' titles
    for ax, (s, k) in zip(axes, cells, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for m in methods:
            runs = [dict(curves[r["key"]][1]) for r in records if r["key"] in curves
                    and (round(r["sparsity"], 6), r["rewind_epoch"], r["method"]) == (s, k, m)]
            epochs = sorted(set().union(*runs)) if runs else []
            if epochs:
                ax.plot(epochs, [100 * statistics.fmean(run[e] for run in runs if e in run)
                                 for e in epochs], marker=".", color=colors[m],
                        label=f"{_label(m)} (n={len(runs)})")
        ax.set(title=f"sparsity {_sparsity_label(s)}, k = {k}", xlabel="epoch (of T)",
               ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: accuracy over each arm's epochs")
    return _png(fig)


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


def plot_cost(table: Table) -> bytes:
    """Wall time and epochs per stage kind."""
    rows = [row for row in table[1] if row[0] != "all"]
    fig = Figure(figsize=(9, 3))
    ax_time, ax_epochs = fig.subplots(1, 2)
    names = [row[0] for row in rows]
    ax_time.barh(names, [float(row[3]) for row in rows], color="tab:blue")
    ax_epochs.barh(names, [int(row[2]) for row in rows], color="tab:gray")
    ax_time.set(xlabel="wall time (s)")
    ax_epochs.set(xlabel="epochs")
    for ax in (ax_time, ax_epochs):
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("study cost per stage kind")
    return _png(fig)


# --------------------------------------------------------------------------- writing

Block = tuple  # ("h1" | "h2" | "p", text), ("table", Table), ("figure", file, alt), ("list", items)


def render_markdown(blocks: list[Block]) -> str:
    parts = []
    for kind, *body in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"{'#' * int(kind[1])} {body[0]}")
        elif kind == "p":
            parts.append(body[0])
        elif kind == "table":
            parts.append(markdown_table(body[0]).rstrip())
        elif kind == "figure":
            parts.append(f"![{body[1]}]({body[0]})")
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in body[0]))
    return "\n\n".join(parts) + "\n"


def _html_cell(text: str, tag: str) -> str:
    text = html.escape(text)
    if text.startswith("**") and "**" in text[2:]:
        bold, rest = text[2:].split("**", 1)
        text = f"<b>{bold}</b>{rest}"
    return f"<{tag}>{text}</{tag}>"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;
padding:.3em .6em;text-align:right}th{background:#f2f2f2}td:nth-child(-n+2){text-align:left}
figure{display:inline-block;vertical-align:top;margin:1em 1em 1em 0;max-width:100%}
img{max-width:100%;border:1px solid #eee}figcaption{color:#666}"""


def render_html(blocks: list[Block], images: dict[str, bytes]) -> str:
    """One self-contained page: figures inlined as base64 PNG, no link to anything."""
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "table":
            header, rows = rest[0]
            lines = ["<tr>" + "".join(_html_cell(c, "th") for c in header) + "</tr>"]
            lines += ["<tr>" + "".join(_html_cell(c, "td") for c in row) + "</tr>"
                      for row in rows]
            body.append("<table>\n" + "\n".join(lines) + "\n</table>")
        elif kind == "figure":
            data = base64.b64encode(images[rest[0]]).decode()
            body.append(f'<figure><img alt="{html.escape(rest[1])}" '
                        f'src="data:image/png;base64,{data}"><figcaption>'
                        f"{html.escape(rest[1])}</figcaption></figure>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in rest[0])
                        + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>LTH mask transfer: dashboard</title><style>{_STYLE}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _write(path: Path, data: bytes) -> Path:
    write_atomic(path, lambda handle: handle.write(data))
    return path


def write_report(records: list[dict], out_dir: str | Path, problems: Sequence[str] = (),
                 ks: list[int] | None = None, store: str | Path | None = None) -> list[Path]:
    """Write report.md, report.html, report.csv and the PNGs; return their paths. `problems`
    (from loading) are listed as notes; `ks` limits the vs-sparsity panels; `store` (the
    stage store the records came from) adds the arms' curves and the study's cost."""
    if not records:
        raise LTHError("no valid records to report")
    records = [{**_MATCH_FIELDS, **rec} for rec in records]  # older records lack these
    out = Path(out_dir)
    groups = _groups(records)
    images: dict[str, bytes] = {}
    blocks: list[Block] = [
        ("h1", "LTH mask transfer: results"),
        ("p", f"{len(records)} runs in {len(groups)} (model, dataset, width, configuration) "
              f"group(s).")]
    notes = list(problems)

    def figure(name: str, alt: str, png: bytes) -> None:
        images[name] = png
        blocks.append(("figure", name, alt))

    configs = defaultdict(set)  # a store may hold several configurations of one model
    for model, dataset, width, config in groups:
        configs[(model, dataset, width)].add(config)
    curves, curve_notes = arm_curves(records, Path(store)) if store is not None else ({}, [])
    notes += curve_notes
    for (model, dataset, width, config), recs in groups.items():
        stem = f"{model}_{dataset}_w{width}"
        title = f"{model}×{width} / {dataset}"
        if len(configs[(model, dataset, width)]) > 1:
            stem, title = f"{stem}_{config}", f"{title} (configuration {config})"
        dense = _stats(_per_seed(recs, "dense_acc_a"))
        table, caption = accuracy_rows(recs)
        blocks += [("h2", title), ("p", f"Dense accuracy: {_pct(*dense)} (n={dense[2]})"),
                   ("table", table), ("p", caption)]
        figure(f"{stem}_vs_k.png", "accuracy vs k", plot_vs_k(recs, title))
        figure(f"{stem}_vs_sparsity.png", "accuracy vs sparsity",
               plot_vs_sparsity(recs, title, ks))
        png = plot_arm_curves(recs, curves, title)
        if png is not None:
            figure(f"{stem}_arm_curves.png", "accuracy over each arm's epochs", png)
        matching = matching_rows(recs)
        if matching is not None:
            blocks += [("p", "Each pi of the study (permuted arms: `permuted@b{j}` matched B "
                             "at epoch j and A at T, `@a{i}b{j}` A at i and B at j, "
                             "`[method]` another matching method): B's accuracy and the "
                             "error barrier after matching at those epochs; per permutation "
                             "group, the fraction of units mapped as by the final pi (same "
                             "method, both nets at T) and the mean activation correlation of "
                             "the units pi pairs."), ("table", matching)]
        png = plot_vs_match_epoch(recs, title)
        if png is not None:
            figure(f"{stem}_vs_match_epoch.png", "accuracy vs matching epoch", png)
        png = plot_agreement(recs, title)
        if png is not None:
            figure(f"{stem}_agreement.png", "agreement with the final pi", png)
        png, interp_notes = plot_interpolation(recs, title)
        notes += [f"{stem}: {n}" for n in interp_notes]
        if png is not None:
            figure(f"{stem}_interpolation.png", "interpolation before and after matching", png)
    blocks += [("h2", "Matching quality (barriers over seeds; Seeds: n per row)"),
               ("table", barrier_rows(groups)),
               ("p", "Before/after: the default interpolation (BatchNorm statistics recomputed at "
                     "each alpha for a net with BatchNorm, else the weights as they are); REPAIR "
                     "columns, where computed (study.match.repair): each hidden channel's mean and "
                     "std renormalised to the interpolation of the endpoints'.")]
    cost = cost_rows(Path(store)) if store is not None else None
    if cost is not None:
        blocks += [("h2", "Study cost"),
                   ("p", f"Every finished stage in {store} (events.log: each stage's last "
                         f"run, from compute or resume to done)."), ("table", cost)]
        figure("study_cost.png", "study cost per stage kind", plot_cost(cost))
    if notes:
        blocks += [("h2", "Notes"), ("list", notes)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(csv_rows(groups))
    written = [_write(out / "report.md", render_markdown(blocks).encode()),
               _write(out / "report.html", render_html(blocks, images).encode()),
               _write(out / "report.csv", buf.getvalue().encode())]
    return written + [_write(out / name, png) for name, png in images.items()]


def main(results: str | None = None, out_dir: str = "report",
         wandb_project: str | None = None, skip_bad_lines: bool = False) -> list[Path]:
    """CLI entry: read results.jsonl, or a W&B project given as 'project' or 'entity/project'.

    A results file with unparseable or invalid lines is refused (the first one named) unless
    ``skip_bad_lines``: then the report is made from the rest and says what it left out."""
    if (results is None) == (wandb_project is None):
        raise LTHError("give exactly one of --results (a results.jsonl) or --wandb_project")
    if wandb_project is not None:
        entity, _, project = wandb_project.rpartition("/")
        records, problems = load_wandb_records(project, entity or None)
        source = f"W&B project {wandb_project}"
    else:
        records, bad, notes = load_records(results)
        source = results
        lines = ", ".join(str(_line_number(p)) for p in bad)
        if bad and not skip_bad_lines:
            raise LTHError(f"results file {results} {bad[0]}; {len(bad)} bad line(s) in all "
                           f"(line {lines}): fix them, or give --skip_bad_lines to report "
                           f"the rest")
        if bad:
            print(f"warning: {results}: skipped {len(bad)} bad line(s) (line {lines}; "
                  f"listed in the report's notes)", file=sys.stderr)
        problems = bad + notes
    for p in problems if wandb_project is not None else notes:
        print(f"warning: {source}: {p}", file=sys.stderr)
    if not records:
        raise LTHError(f"no valid records in {source} ({len(problems)} problem line(s))")
    store = Path(results).parent if results is not None else None  # results.jsonl's store
    paths = write_report(records, out_dir, problems, store=store)
    for p in paths:
        print(p)
    return paths
