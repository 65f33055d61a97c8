"""Every figure the study draws, as PNG: the report's (accuracy vs k, vs sparsity, vs the
matching epoch, pi's agreement, the interpolation curves, each arm's epochs, ensemble accuracy
vs its number of members, the study's cost) and the match stage's interpolation.png.

Figures are drawn from plain numbers and dicts (records, curves, tables), rendered with Agg
directly: no pyplot, so no global backend or figure-registry state. This module imports
nothing from lightning_lth but the foundations (errors, io) and report.aggregate, so the
match stage (experiment/, below report/) can draw with it without an import circle."""

from __future__ import annotations

import io
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_lth.errors import LTHError
from lightning_lth.io import write_atomic
from lightning_lth.report.aggregate import (
    DENSE_ROW,
    IMP_ROW,
    Arms,
    Table,
    base_method,
    cell_stats,
    matched_arms,
    mean_std,
    method_label,
    method_order,
    per_seed,
    sparsity_label,
)

_MORE_COLORS = ("tab:purple", "tab:orange", "tab:cyan", "tab:olive", "tab:brown", "tab:pink",
                "tab:gray")  # for the variants of an arm (``permuted@b1``) and pi's series


def _colors(methods: list[str], arms: Arms) -> dict[str, str]:
    """Each arm's own colour; its variants one each of the others."""
    own = {name: look.colour for name, look in arms.items()}
    variants = [m for m in methods if m not in own]
    return {**own, **{m: _MORE_COLORS[i % len(_MORE_COLORS)]
                      for i, m in enumerate(variants)}}


def _png(fig: Figure, dpi: int = 120, tight_bbox: bool = True) -> bytes:
    """The figure as PNG bytes (Agg; the report's figures at 120 dpi cropped to their ink)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight_bbox else None)
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
    ax.axhline(100 * statistics.fmean(per_seed(records, "dense_acc_a")),
               color="black", linestyle="--", linewidth=1, label="dense")


def _accuracy_panels(records: list[dict], title: str, arms: Arms, panels: list, panel_of,
                     x_of, panel_title, xlabel: str) -> bytes:
    """One panel per value of ``panel_of(cell)``: accuracy vs ``x_of(cell)`` per method."""
    cells = cell_stats(records)
    methods = method_order(records, arms)
    colors = _colors(methods, arms)
    fig, axes = _grid(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        for m in methods:
            pts = sorted((x_of(key), mean, std) for key, (mean, std, _) in cells.items()
                         if panel_of(key) == panel and key[1] == m)
            if pts:
                x, mean, std = zip(*pts, strict=True)
                ax.errorbar(x, [100 * v for v in mean], yerr=[100 * v for v in std],
                            marker="o", capsize=3, color=colors[m], label=method_label(m, arms))
        _dense_line(ax, records)
        ax.set(title=panel_title(panel), xlabel=xlabel, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    return _png(fig)


def plot_vs_k(records: list[dict], title: str, arms: Arms) -> bytes:
    """Figs. 3/4: one panel per sparsity, accuracy vs rewind epoch k."""
    sparsities = sorted({s for s, _, _ in cell_stats(records)})
    return _accuracy_panels(records, title, arms, sparsities, lambda key: key[0], lambda key: key[2],
                            lambda s: f"sparsity {sparsity_label(s)}", "rewind epoch k")


def plot_vs_sparsity(records: list[dict], title: str, arms: Arms,
                     ks: list[int] | None = None) -> bytes:
    """Fig. 7: one panel per rewind epoch k, accuracy vs sparsity."""
    present = {k for _, _, k in cell_stats(records)}
    ks = sorted(present if ks is None else set(ks) & present)
    if not ks:
        raise LTHError("none of the requested rewind epochs are present in the results")
    return _accuracy_panels(records, title, arms, ks, lambda key: key[2], lambda key: 100 * key[0],
                            lambda k: f"k = {k}", "sparsity (%)")


def _series(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(method, which A) -> records, for curves over B's matching epoch: "A at T" (a bare
    epoch in study.match.epochs) or "A at B's epoch" (pairs [j, j]); the match of both nets at
    T ends both curves. Other pairs get a series of their own A epoch."""
    matched = matched_arms(records)
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


def plot_vs_match_epoch(records: list[dict], title: str, arms: Arms) -> bytes | None:
    """Permuted-arm accuracy against B's matching epoch, one panel per (sparsity, k), the arms
    without a pi (LTH, naive) as horizontal lines; None without early matches."""
    series = _series(records)
    if not series:
        return None
    cells = sorted({(round(r["sparsity"], 6), r["rewind_epoch"]) for r in matched_arms(records)})
    fig, axes = _grid(len(cells))
    fig.set_layout_engine("constrained")  # room for the title above the panels' titles
    colors = dict(zip(series, _MORE_COLORS[1:] + _MORE_COLORS[:1], strict=False))
    with_pi = {base_method(r["method"]) for r in matched_arms(records)}
    unmatched = [m for m in method_order(records, arms) if m in arms and m not in with_pi]
    for ax, (s, k) in zip(axes, cells, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for (method, which), recs in series.items():
            by_epoch: dict[int, list[float]] = defaultdict(list)
            for r in recs:
                if (round(r["sparsity"], 6), r["rewind_epoch"]) == (s, k):
                    by_epoch[r["match_epoch_b"]].append(r["test_acc"])
            if by_epoch:
                x = sorted(by_epoch)
                ax.errorbar(x, [100 * mean_std(by_epoch[e])[0] for e in x],
                            yerr=[100 * mean_std(by_epoch[e])[1] for e in x], marker="o",
                            capsize=3, color=colors[(method, which)],
                            label=f"permuted ({method}, {which})")
        for m in unmatched:
            accs = [r["test_acc"] for r in records if r["method"] == m
                    and (round(r["sparsity"], 6), r["rewind_epoch"]) == (s, k)]
            if accs:
                ax.axhline(100 * statistics.fmean(accs), color=arms[m].colour, linestyle="--",
                           label=arms[m].label)
        ax.set(title=f"sparsity {sparsity_label(s)}, k = {k}", xlabel="B's matching epoch",
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


def plot_group_interpolation(curves: list[dict], title: str) -> bytes | None:
    """Accuracy and loss along the linear path between the dense pair, before ('naive') and after
    ('matched') permutation matching, one line per connectivity file (load.load_connectivity's
    {naive, matched, repair}), and REPAIR's curves where the file has them
    (study.match.repair); None without a file."""
    if not curves:
        return None
    fig = Figure(figsize=(9, 3.4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    labelled = set()
    for data in curves:
        repair = data["repair"]
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
    return _png(fig)


def plot_arm_curves(records: list[dict], curves: dict, title: str, arms: Arms) -> bytes | None:
    """Each method's accuracy after each epoch, mean over seeds, one panel per (sparsity, k);
    epochs on the T-epoch axis (an arm rewound to k starts at k)."""
    cells = sorted({(round(r["sparsity"], 6), r["rewind_epoch"]) for r in records
                    if r["key"] in curves})
    if not cells:
        return None
    splits = sorted({curves[r["key"]][0] for r in records if r["key"] in curves})
    label = "val/acc (%)" if splits == ["val/acc"] else f"{' / '.join(splits)} accuracy (%)"
    methods = method_order(records, arms)
    colors = _colors(methods, arms)
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
                        label=f"{method_label(m, arms)} (n={len(runs)})")
        ax.set(title=f"sparsity {sparsity_label(s)}, k = {k}", xlabel="epoch (of T)",
               ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: accuracy over each arm's epochs")
    return _png(fig)


_GROUP_ROWS = {DENSE_ROW: ("black", "dense"), IMP_ROW: ("tab:gray", "IMP")}  # rows not arms


def plot_ensemble_by_size(panels: list[tuple[str, dict[str, list[float]]]], title: str,
                          arms: Arms) -> bytes:
    """Ensemble accuracy against its number of members, one panel per (title, row -> [m - 1]
    accuracy as fractions); rows "dense", "imp" or a method, arms in their registry colours."""
    fig, axes = _grid(len(panels))
    fig.set_layout_engine("constrained")  # room for the title above the panels' titles
    methods = sorted({row for _, rows in panels for row in rows if row not in _GROUP_ROWS})
    colors = _colors(methods, arms)
    for ax, (panel, rows) in zip(axes, panels, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for row, accs in rows.items():
            color, label = _GROUP_ROWS.get(row) or (colors[row], method_label(row, arms))
            ax.plot(range(1, len(accs) + 1), [100 * a for a in accs], marker="o", color=color,
                    linestyle="--" if row in _GROUP_ROWS else "-", label=label)
        ax.set(title=panel, xlabel="models in the ensemble", ylabel="ensemble test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: ensemble accuracy vs its number of members")
    return _png(fig)


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


# colour and name per correction (symmetry.connectivity.CORRECTIONS, here as the strings the
# curves carry: this module may not import symmetry)
_STYLES = {"plain": ("tab:gray", "plain"), "bn_reset": ("tab:blue", "BN reset"),
           "repair": ("tab:green", "REPAIR")}


def plot_interpolation(comparison: Mapping, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG: test accuracy and test loss vs alpha, naive (A -> B, dashed) and matched
    (pi(A) -> B, solid), one colour per correction in ``comparison["curves"]`` (the output
    of symmetry.connectivity.compare_naive_matched); the match stage's interpolation.png.
    Written atomically."""
    fig = Figure(figsize=(11, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for correction, sides in comparison["curves"].items():
        color, name = _STYLES[correction]
        for side, label, style in (("naive", "A -> B", "o--"), ("matched", "pi(A) -> B", "s-")):
            curve = sides[side]
            ax_acc.plot(curve["alphas"], [100 * a for a in curve["acc"]], style, color=color,
                        label=f"{name} {label} (error barrier "
                              f"{100 * curve['error_barrier']:.1f} pt)")
            ax_loss.plot(curve["alphas"], curve["loss"], style, color=color,
                         label=f"{name} {label} (loss barrier {curve['loss_barrier']:.3f})")
    ax_acc.set(xlabel="alpha", ylabel="test accuracy (%)", title="accuracy")
    ax_loss.set(xlabel="alpha", ylabel="test loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    data = _png(fig, dpi=100, tight_bbox=False)
    path = Path(path)
    write_atomic(path, lambda handle: handle.write(data))
    return path
