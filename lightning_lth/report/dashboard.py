"""``dashboard``: the report's comparison as a saved W&B workspace view, built with
wandb-workspaces (W&B's workspaces as code) instead of by hand in the W&B interface.

The view shows the arms' runs and the report's run: accuracy against rewind epoch k and
against sparsity, each cell's mean and std over seeds, the arms' curves, the barriers before
and after matching (from the records in the arms' summaries) and the diversity table. Runs are
grouped by arm, then by W&B group (model-width-dataset-sparsity-k: one cell), and each arm has
its registry colour, as in the report. A workspace has one run set and no filter per panel, so
"per sparsity" is a panel's axis (parallel coordinates, the bars' cell groups), not one panel
per sparsity. Building the view needs no network; saving it does (and W&B credentials), and
an existing view of the same name in the project is updated, not duplicated."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from matplotlib.colors import to_hex

from lightning_lth.errors import LTHError
from lightning_lth.experiment.stages import ARMS, ArmStage
from lightning_lth.experiment.tracking import missing_credentials
from lightning_lth.io import write_atomic
from lightning_lth.parsing import help_kwargs

DEFAULT_NAME = "LTH vs naive vs permuted"
REPORT_JOB_TYPE = "report"  # the report's W&B run, which logs the diversity table
DIVERSITY_TABLE = "diversity_table"
# What the arms' runs write (experiment/stages.py wandb_config, training/module.py, the
# record in their summary): tests/test_dashboard.py finds each one in a real offline run.
CURVES = ("val/acc", "train/loss_epoch")
BARRIERS = (("loss barrier", ("barrier_loss_before", "barrier_loss_after")),
            ("error barrier", ("barrier_error_before", "barrier_error_after")))
# W&B's own rule for project (and entity) names: at most 128 characters, none of these.
_NOT_IN_NAMES = "/\\#?%:"
_PIN = "wandb-workspaces==0.4.13"


def check_name(value: str, option: str) -> str:
    """``value`` if W&B accepts it as a project or entity name, else one line naming it."""
    if not value or len(value) > 128 or any(c in _NOT_IN_NAMES for c in value) \
            or value != value.strip():
        raise LTHError(f"{option}={value!r} is not allowed: a W&B name is 1-128 characters, "
                       f"no leading or trailing space, none of {' '.join(_NOT_IN_NAMES)}")
    return value


def split_project(wandb_project: str, entity: str | None) -> tuple[str | None, str]:
    """(entity, project) from ``[entity/]project`` (as ``report --wandb_project`` takes it)
    and ``--entity``."""
    named, _, project = wandb_project.rpartition("/")
    if named and entity and named != entity:
        raise LTHError(f"--wandb_project={wandb_project!r} names entity {named!r} but "
                       f"--entity={entity!r}: give the entity once")
    entity = entity or named or None
    if entity is not None:
        check_name(entity, "--entity")
    return entity, check_name(project, "--wandb_project")


def _ident(*parts: str) -> str:
    """A stable 11-character id (the length of W&B's own): the same view gets the same ids."""
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:11]


def view_name(entity: str, project: str, name: str) -> str:
    """The view's internal name, fixed by where it is and what it is called: saving again
    updates that view."""
    return f"nw-{_ident(entity, project, name)}-v"


def build(project: str, entity: str | None, name: str = DEFAULT_NAME):
    """The workspace view (a ``wandb_workspaces.workspaces.Workspace``); nothing contacted.
    ``entity`` None: the credentials' default entity, filled in when it is saved."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise LTHError(f"wandb-workspaces is not installed: make install, or pip install "
                       f"'{_PIN}'") from None

    def accuracy(title: str, x: str):
        return wr.ScatterPlot(title=title, x=wr.Config(x), y=wr.SummaryMetric("test_acc"))

    def bars(title: str, metrics: tuple[str, ...]):
        return wr.BarPlot(title=title, metrics=[wr.SummaryMetric(m) for m in metrics],
                          groupby_aggfunc="mean", groupby_rangefunc="stddev")

    def curve(metric: str):
        return wr.LinePlot(title=f"{metric} over each arm's epochs (mean ± std over seeds)",
                           x="epoch", y=[metric], groupby_aggfunc="mean",
                           groupby_rangefunc="stddev")

    sections = [
        ("Accuracy: Tables 3-5, Figs. 3/4 and 7", [
            accuracy("test accuracy vs rewind epoch k", "rewind_epoch"),
            accuracy("test accuracy vs sparsity", "sparsity"),
            bars("test accuracy per cell (mean ± std over seeds)", ("test_acc",)),
            wr.ParallelCoordinatesPlot(title="per sparsity: brush the sparsity axis", columns=[
                wr.ParallelCoordinatesPlotColumn(metric=metric) for metric in (
                    wr.Config("sparsity"), wr.Config("rewind_epoch"),
                    wr.SummaryMetric("test_acc"), wr.SummaryMetric("pruned_acc_a"),
                    wr.SummaryMetric("dense_acc_a"))])]),
        ("The arms' training curves", [curve(metric) for metric in CURVES]),
        ("Barriers before / after matching (the dense pair's)",
         [bars(title, metrics) for title, metrics in BARRIERS]),
        ("Diversity and ensembles: Table 1",
         [wr.WeavePanelSummaryTable(table_name=DIVERSITY_TABLE, layout=wr.Layout(w=24, h=10))]),
        ("Runs side by side", [wr.RunComparer(diff_only="split", layout=wr.Layout(w=24, h=10))]),
    ]
    internal = view_name(entity or "", project, name)
    for title, panels in sections:
        for index, panel in enumerate(panels):
            panel._id = _ident(internal, title, str(index))  # stable across updates
    runs = ws.RunsetSettings(
        # the arms' runs (their config's stage) and the report's run; dense, IMP and match
        # runs stay out
        filters=ws.Or(ws.Config("stage") == ArmStage.kind,
                      ws.Metric("JobType") == REPORT_JOB_TYPE),
        groupby=[ws.Config("method"), ws.Metric("Group")],
        group_colors={arm: to_hex(look.colour) for arm, look in ARMS.items()})
    try:
        workspace = ws.Workspace(entity=entity or "", project=project, name=name,
                                 sections=[ws.Section(name=title, panels=panels, is_open=True)
                                           for title, panels in sections],
                                 runset_settings=runs)
    except ValueError as exc:  # pydantic's check of the name (W&B refuses emoji)
        raise LTHError(f"--name={name!r} is not allowed: {str(exc).splitlines()[-1].strip()}"
                       ) from None
    workspace._internal_runset_id = _ident(internal, "runs")
    return workspace


def serialised(workspace) -> dict:
    """The view as W&B receives it (wandb-workspaces' own model, its field names)."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def save(workspace) -> str:
    """Create the view, or update the one of the same name; its URL."""
    import wandb
    from wandb_workspaces.workspaces import internal

    try:
        if not workspace.entity:
            workspace.entity = wandb.Api(timeout=30).default_entity
        workspace._internal_name = view_name(workspace.entity, workspace.project,
                                             workspace.name)
        try:
            existing = internal.View.from_name(workspace.entity, workspace.project,
                                               workspace._internal_name)
            workspace._internal_id = existing.id
        except ValueError as exc:  # wandb-workspaces: no such view (or project) yet
            if "not found" not in str(exc):
                raise
        return workspace.save().url
    except Exception as exc:  # network, auth and server errors come as many types
        first = (str(exc).strip().splitlines() or [""])[0]
        raise LTHError(f"cannot save the view to W&B project {workspace.entity}/"
                       f"{workspace.project} ({type(exc).__name__}: {first}); check `wandb "
                       f"login`, network access and the entity/project name") from None


def main(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, **help_kwargs("dashboard"))
    parser.add_argument("--wandb_project", type=str, required=True,
                        help="the W&B project the study logged to ([entity/]project)")
    parser.add_argument("--entity", type=str | None, default=None,
                        help="default: the entity in --wandb_project, else the credentials'")
    parser.add_argument("--name", type=str, default=DEFAULT_NAME,
                        help="the view's name; saving again updates the view of this name")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the view's JSON (what would be saved); contacts nothing")
    parser.add_argument("--out", type=str | None, default=None,
                        help="with --dry_run: write the JSON to this file, not stdout")
    args = parser.parse_args(argv)
    entity, project = split_project(args.wandb_project, args.entity)
    if not args.name.strip():
        raise LTHError(f"--name={args.name!r} is not allowed: a view needs a name")
    if args.out and not args.dry_run:
        raise LTHError("--out writes the --dry_run JSON: add --dry_run, or drop --out")
    if not args.dry_run and (missing := missing_credentials()):
        raise LTHError(f"{missing} (or use --dry_run, which contacts nothing)")
    workspace = build(project, entity, args.name)
    if args.dry_run:
        text = json.dumps(serialised(workspace), indent=1) + "\n"
        if args.out:
            write_atomic(Path(args.out), lambda handle: handle.write(text.encode()))
        else:
            sys.stdout.write(text)
        return 0
    print(f"dashboard: view {args.name!r} saved: {save(workspace)}")
    return 0
