"""Writing the report: write_report lays out the blocks (per group of runs: the tables and
figures; then the barriers, the study's cost and the notes) and writes report.md,
report.html, report.csv and the PNGs; main is the `report` command's entry, which also
decides what a results file with bad lines gets (refused, or reported without them)."""

from __future__ import annotations

import csv
import io
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path

from lightning_lth.errors import LTHError
from lightning_lth.experiment.results import Record
from lightning_lth.experiment.stages import ARMS
from lightning_lth.io import write_atomic
from lightning_lth.report.aggregate import mean_std, per_seed
from lightning_lth.report.load import (
    arm_curves,
    line_number,
    load_connectivity,
    load_records,
    load_wandb_records,
)
from lightning_lth.report.page import Block, render_html, render_markdown
from lightning_lth.report.plots import (
    plot_agreement,
    plot_arm_curves,
    plot_cost,
    plot_group_interpolation,
    plot_vs_k,
    plot_vs_match_epoch,
    plot_vs_sparsity,
)
from lightning_lth.report.tables import (
    accuracy_rows,
    barrier_rows,
    cost_rows,
    csv_rows,
    group_records,
    matching_rows,
    pct,
)
from lightning_lth.symmetry.matching import METHODS as MATCH_METHODS

_MATCH_FIELDS = {f.name: f.default for f in fields(Record) if f.default is not MISSING}


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
    groups = group_records(records)
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
        dense = mean_std(per_seed(recs, "dense_acc_a"))
        table, caption = accuracy_rows(recs)
        blocks += [("h2", title), ("p", f"Dense accuracy: {pct(*dense)} (n={dense[2]})"),
                   ("table", table), ("p", caption)]
        figure(f"{stem}_vs_k.png", "accuracy vs k", plot_vs_k(recs, title, ARMS))
        figure(f"{stem}_vs_sparsity.png", "accuracy vs sparsity",
               plot_vs_sparsity(recs, title, ARMS, ks))
        png = plot_arm_curves(recs, curves, title, ARMS)
        if png is not None:
            figure(f"{stem}_arm_curves.png", "accuracy over each arm's epochs", png)
        matching = matching_rows(recs)
        if matching is not None:
            blocks += [("p", "Each pi of the study (permuted arms: `permuted@b{j}` matched B "
                             "at epoch j and A at T, `@a{i}b{j}` A at i and B at j, "
                             "`[method]` a matching method other than the paper's "
                             f"{next(iter(MATCH_METHODS))}): B's accuracy and the "
                             "error barrier after matching at those epochs; per permutation "
                             "group, the fraction of units mapped as by the final pi (same "
                             "method, both nets at T) and the mean activation correlation of "
                             "the units pi pairs."), ("table", matching)]
        png = plot_vs_match_epoch(recs, title, ARMS)
        if png is not None:
            figure(f"{stem}_vs_match_epoch.png", "accuracy vs matching epoch", png)
        png = plot_agreement(recs, title)
        if png is not None:
            figure(f"{stem}_agreement.png", "agreement with the final pi", png)
        connectivity, connectivity_notes = load_connectivity(recs)
        notes += [f"{stem}: {n}" for n in connectivity_notes]
        png = plot_group_interpolation(connectivity, title)
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
        lines = ", ".join(str(line_number(p)) for p in bad)
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
