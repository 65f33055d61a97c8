"""Writing the report: write_report lays out the blocks (per group of runs: the tables and
figures, the diversity table; then the barriers, the study's cost and the notes) and writes
report.md, report.html, report.csv, diversity.csv and the PNGs, and logs the diversity table
to W&B; main is the `report` command's entry, which also decides what a results file with bad
lines gets (refused, or reported without them)."""

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
from lightning_lth.experiment.tracking import QUIET, wandb_mode
from lightning_lth.io import write_atomic
from lightning_lth.report.aggregate import mean_std, per_seed, sparsity_label
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
    plot_ensemble_by_size,
    plot_group_interpolation,
    plot_vs_k,
    plot_vs_match_epoch,
    plot_vs_sparsity,
)
from lightning_lth.report.tables import (
    DIVERSITY_CSV,
    DIVERSITY_GROUPS,
    accuracy_rows,
    barrier_rows,
    cost_rows,
    csv_rows,
    diversity_cells,
    diversity_csv_rows,
    diversity_rows,
    ensemble_by_size,
    group_records,
    matching_rows,
    pct,
)
from lightning_lth.symmetry.matching import METHODS as MATCH_METHODS

_MATCH_FIELDS = {f.name: f.default for f in fields(Record) if f.default is not MISSING}


def _write(path: Path, data: bytes) -> Path:
    write_atomic(path, lambda handle: handle.write(data))
    return path


def log_diversity_table(rows: list[list], project: str, mode: str, save_dir: Path) -> None:
    """The diversity table (diversity.csv's columns) as a wandb.Table under the summary key
    ``diversity_table`` of a run with job_type "report", as the stages' runs are made
    (experiment.tracking: quiet, offline without credentials); nothing when disabled."""
    mode = wandb_mode(mode)
    if mode == "disabled":
        return
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    save_dir.mkdir(parents=True, exist_ok=True)
    wandb.setup(wandb.Settings(**QUIET))
    logger = WandbLogger(project=project, name="report", job_type="report", tags=["report"],
                         mode=mode, save_dir=str(save_dir))
    logger.log_table("diversity_table", columns=DIVERSITY_CSV, data=rows)
    wandb.finish()


def diversity_section(recs: list[dict], store: Path, group: tuple, stem: str,
                      title: str) -> tuple[list[Block], dict[str, bytes], list[list], list[str]]:
    """The published Table 1 per (sparsity, k) with its groups' definitions, the ensemble
    figure (its name -> PNG), the CSV rows and the notes; a group's records lacking kept
    outputs are said in one line where the table would be."""
    cells, lacking, notes = diversity_cells(recs, store)
    blocks: list[Block] = [("h3", "Diversity and ensembles (the published Table 1)")]
    if lacking:
        blocks.append(("p", lacking))
    if not cells:
        return blocks, {}, [], [f"{stem}: {n}" for n in notes]
    for (s, k), rows in cells.items():
        blocks += [("p", f"S = {sparsity_label(s)}, k = {k}"), ("table", diversity_rows(rows))]
    name = f"{stem}_ensemble.png"
    png = plot_ensemble_by_size([(f"sparsity {sparsity_label(s)}, k = {k}",
                                  {row.row: ensemble_by_size(row) for row in rows})
                                 for (s, k), rows in cells.items()], title, ARMS)
    blocks += [("p", DIVERSITY_GROUPS),
               ("figure", name, "ensemble accuracy vs its number of members")]
    return (blocks, {name: png}, diversity_csv_rows(group, cells),
            [f"{stem}: {n}" for n in notes])


def write_report(records: list[dict], out_dir: str | Path, problems: Sequence[str] = (),
                 ks: list[int] | None = None, store: str | Path | None = None,
                 wandb_settings: tuple[str, str] | None = None) -> list[Path]:
    """Write report.md, report.html, report.csv and the PNGs; return their paths. `problems`
    (from loading) are listed as notes; `ks` limits the vs-sparsity panels; `store` (the
    stage store the records came from) adds the arms' curves, the study's cost and, from the
    kept test outputs, the diversity table (diversity.csv; to W&B as well where
    `wandb_settings`, the study's (project, mode), is given)."""
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

    diversity_csv: list[list] = []
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
        if store is not None:
            section, pngs, rows, section_notes = diversity_section(
                recs, Path(store), (model, dataset, width, config), stem, title)
            blocks += section
            images.update(pngs)
            diversity_csv += rows
            notes += section_notes
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
    if diversity_csv:  # a file of its own: report.csv's readers keep their one header
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([DIVERSITY_CSV, *diversity_csv])
        written.append(_write(out / "diversity.csv", buf.getvalue().encode()))
        if wandb_settings is not None:
            log_diversity_table(diversity_csv, *wandb_settings, Path(store) / "wandb")
    return written + [_write(out / name, png) for name, png in images.items()]


def main(results: str | None = None, out_dir: str = "report",
         wandb_project: str | None = None, skip_bad_lines: bool = False,
         wandb_settings: tuple[str, str] | None = None) -> list[Path]:
    """CLI entry: read results.jsonl, or a W&B project given as 'project' or 'entity/project'.

    A results file with unparseable or invalid lines is refused (the first one named) unless
    ``skip_bad_lines``: then the report is made from the rest and says what it left out.
    ``wandb_settings``: the study's (wandb_project, wandb_mode), where the report is of a
    study config: the diversity table is logged there."""
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
    paths = write_report(records, out_dir, problems, store=store, wandb_settings=wandb_settings)
    for p in paths:
        print(p)
    return paths
