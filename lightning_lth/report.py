"""Turn the per-arm results (results.jsonl or a W&B project) into the paper's tables and figures.

Tables 3-5: test accuracy (%) as mean ± std over seeds, rows sparsity x method, columns rewind
epoch k.  Figs. 3/4: accuracy vs k per sparsity; Fig. 7: accuracy vs sparsity per k; plus the
matching-quality interpolation curves and loss/error barriers before/after matching.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_lth.errors import LTHError
from lightning_lth.experiment.results import invalid
from lightning_lth.io import load_json, write_atomic

METHODS = ("lth", "naive", "permuted")
_LABELS = {"lth": "LTH", "naive": "naive", "permuted": "permuted"}
_COLORS = {"lth": "tab:green", "naive": "tab:red", "permuted": "tab:blue"}

# One sparse run is identified by these; a rerun appends a second line that replaces the first.
_RUN_ID = ("config_hash", "model", "dataset", "width", "seed", "method", "sparsity",
           "rewind_epoch")

Group = tuple[str, str, int, str]  # (model, dataset, width, config hash)


# --------------------------------------------------------------------------- loading

def validate_record(rec) -> str | None:
    """Why ``rec`` is not a usable record, or None; beyond the Record type's own checks, the
    method must be an arm this report knows how to draw."""
    why = invalid(rec)
    if why is None and rec["method"] not in METHODS:
        return f"unknown method {rec['method']!r} (allowed: {', '.join(METHODS)})"
    return why


def _run_id(rec: dict) -> tuple:
    return tuple(round(rec[k], 6) if k == "sparsity" else rec[k] for k in _RUN_ID)


def _collect(items) -> tuple[list[dict], list[str]]:
    """Validate (where, record) pairs; on duplicate runs keep the later one and say so."""
    kept: dict[tuple, tuple[str, dict]] = {}
    problems: list[str] = []
    for where, rec in items:
        why = validate_record(rec)
        if why:
            problems.append(f"{where}: {why}")
            continue
        rid = _run_id(rec)
        if rid in kept:
            problems.append(f"{kept[rid][0]}: superseded by a rerun of the same arm at {where}")
        kept[rid] = (where, rec)
    return [rec for _, rec in kept.values()], problems


def load_records(path: str | Path) -> tuple[list[dict], list[str]]:
    """Read results.jsonl; bad lines become 'line N: why' problems instead of aborting the report."""
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
    records, more = _collect(parsed)
    problems = sorted(problems + more, key=lambda p: int(p.split()[1].rstrip(":")))
    return records, problems


def load_wandb_records(project: str, entity: str | None = None) -> tuple[list[dict], list[str]]:
    """Records from a W&B project: each run's config merged with its summary (summary wins)."""
    try:
        import wandb
    except ImportError:
        raise LTHError("wandb is not installed; pip install wandb or use --results") from None
    path = f"{entity}/{project}" if entity else project
    try:
        runs = list(wandb.Api(timeout=30).runs(path))
        items = [(f"run {run.id}", {**dict(run.config), **dict(run.summary.items())})
                 for run in runs]
    except Exception as exc:  # network, auth and 404 errors come as many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LTHError(f"cannot read W&B project {path!r} ({type(exc).__name__}: {first}); "
                       f"check `wandb login`, network access and the entity/project name") from None
    return _collect(items)


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
        by_seed[rec["seed"]].append(rec[field])
    return [statistics.fmean(v) for _, v in sorted(by_seed.items())]


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _sparsity_label(s: float) -> str:
    return f"{100 * s:g}%"


# --------------------------------------------------------------------------- tables

def accuracy_table(records: list[dict]) -> str:
    """Markdown table like Tables 3-5; the best mean per (sparsity, k) is bold, a cell whose
    seed count differs from the group's most common one shows its n."""
    cells = cell_stats(records)
    sparsities = sorted({s for s, _, _ in cells})
    ks = sorted({k for _, _, k in cells})
    n_common = statistics.mode(n for _, _, n in cells.values())
    lines = ["| S | Method | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for s in sparsities:
        best = {k: max((round(100 * cells[(s, m, k)][0], 2) for m in METHODS if (s, m, k) in cells),
                       default=None) for k in ks}
        for i, m in enumerate(METHODS):
            row = []
            for k in ks:
                if (s, m, k) not in cells:
                    row.append("–")
                    continue
                mean, std, n = cells[(s, m, k)]
                text = _pct(mean, std)
                if round(100 * mean, 2) == best[k]:
                    text = f"**{text}**"
                row.append(text if n == n_common else f"{text} (n={n})")
            lines.append(f"| {_sparsity_label(s) if i == 0 else ''} | {_LABELS[m]} | "
                         + " | ".join(row) + " |")
    return "\n".join(lines) + f"\n\nTest accuracy (%), mean ± std over seeds (n={n_common} unless shown).\n"


def barrier_table(groups: dict[Group, list[dict]]) -> str:
    """Loss/error barriers of the dense pair's interpolation, before vs after matching, per width."""
    cols = ("barrier_loss_before", "barrier_loss_after", "barrier_error_before", "barrier_error_after")
    lines = ["| Model | Dataset | Width | Config | Loss barrier before | Loss barrier after "
             "| Error barrier before (%) | Error barrier after (%) | Seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (model, dataset, width, config), recs in groups.items():
        row = []
        for col in cols:
            mean, std, n = _stats(_per_seed(recs, col))
            row.append(_pct(mean, std) if "error" in col else f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {model} | {dataset} | ×{width} | {config} | " + " | ".join(row)
                     + f" | {n} |")
    return "\n".join(lines) + "\n"


def csv_rows(groups: dict[Group, list[dict]]) -> list[list]:
    rows = [["model", "dataset", "width", "config_hash", "sparsity", "method", "rewind_epoch",
             "test_acc_mean", "test_acc_std", "n"]]
    for (model, dataset, width, config), recs in groups.items():
        cells = cell_stats(recs)
        for (s, m, k) in sorted(cells, key=lambda c: (c[0], METHODS.index(c[1]), c[2])):
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
    fig, axes = _grid(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        for m in METHODS:
            pts = sorted((x_of(key), mean, std) for key, (mean, std, _) in cells.items()
                         if panel_of(key) == panel and key[1] == m)
            if pts:
                x, mean, std = zip(*pts, strict=True)
                ax.errorbar(x, [100 * v for v in mean], yerr=[100 * v for v in std],
                            marker="o", capsize=3, color=_COLORS[m], label=_LABELS[m])
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


def _load_connectivity(path: str) -> dict:
    data = load_json(path, "connectivity file")
    for side in ("naive", "matched"):
        curve = data.get(side) if isinstance(data, dict) else None
        if not isinstance(curve, dict) or not all(
                isinstance(curve.get(k), list) for k in ("alphas", "loss", "acc")):
            raise LTHError(f"connectivity file {path} lacks {side}.alphas/loss/acc lists")
        if not len(curve["alphas"]) == len(curve["loss"]) == len(curve["acc"]):
            raise LTHError(f"connectivity file {path}: {side} curves differ in length")
    return data


def plot_interpolation(records: list[dict], title: str) -> tuple[bytes | None, list[str]]:
    """Accuracy and loss along the linear path between the dense pair, before ('naive') and after
    ('matched') permutation matching, one line per connectivity file.  Missing or bad files are
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
    for i, data in enumerate(curves):
        for side, style in (("naive", "--"), ("matched", "-")):
            c = data[side]
            label = ("before matching" if side == "naive" else "after matching") if i == 0 else None
            color = "tab:red" if side == "naive" else "tab:blue"
            ax_acc.plot(c["alphas"], [100 * a for a in c["acc"]], style, color=color, label=label)
            ax_loss.plot(c["alphas"], c["loss"], style, color=color, label=label)
    ax_acc.set(xlabel="α (model A → model B)", ylabel="test accuracy (%)")
    ax_loss.set(xlabel="α (model A → model B)", ylabel="test loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend()
    fig.suptitle(f"{title}: linear interpolation ({len(curves)} pair(s))")
    return _png(fig), notes


# --------------------------------------------------------------------------- entry points

def _write(path: Path, data: bytes) -> Path:
    write_atomic(path, lambda handle: handle.write(data))
    return path


def write_report(records: list[dict], out_dir: str | Path, problems: Sequence[str] = (),
                 ks: list[int] | None = None) -> list[Path]:
    """Write report.md, report.csv and three PNGs per (model, dataset, width); return their paths.
    `problems` (from loading) are listed in the markdown; `ks` limits the vs-sparsity panels."""
    if not records:
        raise LTHError("no valid records to report")
    out = Path(out_dir)
    groups = _groups(records)
    written: list[Path] = []
    md = ["# LTH mask transfer: results", "",
          f"{len(records)} runs in {len(groups)} (model, dataset, width, configuration) "
          f"group(s).", ""]
    notes = list(problems)
    configs = defaultdict(set)  # a store may hold several configurations of one model
    for model, dataset, width, config in groups:
        configs[(model, dataset, width)].add(config)
    for (model, dataset, width, config), recs in groups.items():
        stem = f"{model}_{dataset}_w{width}"
        title = f"{model}×{width} / {dataset}"
        if len(configs[(model, dataset, width)]) > 1:
            stem, title = f"{stem}_{config}", f"{title} (configuration {config})"
        dense = _stats(_per_seed(recs, "dense_acc_a"))
        md += [f"## {title}", "", f"Dense accuracy: {_pct(*dense[:2])} (n={dense[2]})", "",
               accuracy_table(recs)]
        written.append(_write(out / f"{stem}_vs_k.png", plot_vs_k(recs, title)))
        written.append(_write(out / f"{stem}_vs_sparsity.png", plot_vs_sparsity(recs, title, ks)))
        md += [f"![accuracy vs k]({stem}_vs_k.png)", "",
               f"![accuracy vs sparsity]({stem}_vs_sparsity.png)", ""]
        png, interp_notes = plot_interpolation(recs, title)
        notes += [f"{stem}: {n}" for n in interp_notes]
        if png is not None:
            written.append(_write(out / f"{stem}_interpolation.png", png))
            md += [f"![interpolation]({stem}_interpolation.png)", ""]
    md += ["## Matching quality (barriers, mean ± std over seeds)", "", barrier_table(groups)]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(csv_rows(groups))
    written.insert(0, _write(out / "report.csv", buf.getvalue().encode()))
    written.insert(0, _write(out / "report.md", "\n".join(md).encode()))
    return written


def main(results: str | None = None, out_dir: str = "report",
         wandb_project: str | None = None) -> list[Path]:
    """CLI entry: read results.jsonl, or a W&B project given as 'project' or 'entity/project'."""
    if (results is None) == (wandb_project is None):
        raise LTHError("give exactly one of --results (a results.jsonl) or --wandb_project")
    if wandb_project is not None:
        entity, _, project = wandb_project.rpartition("/")
        records, problems = load_wandb_records(project, entity or None)
        source = f"W&B project {wandb_project}"
    else:
        records, problems = load_records(results)
        source = results
    for p in problems:
        print(f"warning: {source}: {p}", file=sys.stderr)
    if not records:
        raise LTHError(f"no valid records in {source} ({len(problems)} problem line(s))")
    paths = write_report(records, out_dir, problems)
    for p in paths:
        print(p)
    return paths
