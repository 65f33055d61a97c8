"""W&B: the one module of the study that knows it. Every stage gets a run (grouped by model,
width and dataset; arms also by sparsity and k), offline when there are no credentials."""

from __future__ import annotations

import csv
import netrc
import os
import sys
from pathlib import Path
from typing import get_args
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

from lightning_lth.experiment.config import WandbMode

MODES = get_args(WandbMode)
# No banner per stage and no copy of the terminal in each run: the study's view lists the
# runs once at the end.
QUIET = {"silent": True, "console": "off"}


def missing_credentials() -> str | None:
    """Why W&B could not log online here, or None; asked without network. An API key
    (WANDB_API_KEY, an identity token file) or `wandb login`'s netrc entry for wandb's host
    (its base URL, which WANDB_BASE_URL or `wandb login --host` set: not always
    api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    import wandb

    host = urlparse(wandb.Settings().base_url).hostname
    try:
        found = netrc.netrc().authenticators(host)
    except (OSError, netrc.NetrcParseError):
        found = None
    return None if found else f"no W&B credentials for {host}: run `wandb login` or set WANDB_API_KEY"


def wandb_mode(setting: str) -> str:
    """auto: online when W&B credentials are present, else offline (never a prompt).
    ``setting`` is one of MODES: the parser checks study.wandb_mode's annotation."""
    if os.environ.get("WANDB_MODE") in MODES[1:]:
        return os.environ["WANDB_MODE"]
    if setting != "auto":
        return setting
    return "offline" if missing_credentials() else "online"


class Tracking:
    def __init__(self, project: str, mode: str, save_dir: Path, model: str, width: int,
                 dataset: str):
        self.project, self.mode = project, wandb_mode(mode)
        self.save_dir = save_dir
        self.model, self.width, self.dataset = model, width, dataset
        self.runs: list[str] = []  # each finished run's URL (online) or folder (offline)

    def logger(self, stage, job_type: str, config: dict) -> WandbLogger | None:
        """The stage's W&B logger, or None. Under `wandb agent` only a stage of a sweep's
        cell (``stage.IN_SWEEP``: an arm) logs into the agent's run; the shared stages stay
        local."""
        in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
        if self.mode == "disabled" or (in_sweep and not stage.IN_SWEEP):
            return None
        tags = [job_type, self.model, self.dataset, f"w{self.width}"]
        group = f"{self.model}-w{self.width}-{self.dataset}"
        if "sparsity" in config:
            group += f"-s{config['sparsity']}-k{config['rewind_epoch']}"
            tags += [f"s{config['sparsity']}", f"k{config['rewind_epoch']}"]
        self.save_dir.mkdir(parents=True, exist_ok=True)
        import wandb

        wandb.setup(wandb.Settings(**QUIET))  # process-wide: W&B's own notes are quiet too
        return WandbLogger(project=self.project, name=stage.key,
                           id=None if in_sweep else stage.key, group=group, job_type=job_type,
                           tags=tags, mode=self.mode, save_dir=str(self.save_dir),
                           resume="allow",
                           config={"stage": stage.kind, "key": stage.key, **config})

    def log_connectivity(self, stage, curves: dict, png: Path, method: str) -> None:
        """The interpolation curves (one step per alpha), barriers and plot of
        ``compare_naive_matched``'s output: every correction computed as
        ``match/<correction>/<side>_<metric>``, and the default correction (the record's) also
        under the unqualified ``match/<side>_<metric>``."""
        logger = self.logger(stage, "match", {"method": method, "default": curves["default"],
                                              "corrections": list(curves["curves"])})
        if logger is None:
            return
        named = {**{(correction, side): curve for correction, sides in curves["curves"].items()
                    for side, curve in sides.items()},
                 **{(None, side): curves[side] for side in ("naive", "matched")}}

        def key(correction, side, name):
            return f"match/{f'{correction}/' if correction else ''}{side}_{name}"

        for index, alpha in enumerate(curves["naive"]["alphas"]):
            logger.log_metrics({key(c, side, metric): curve[metric][index]
                                for (c, side), curve in named.items()
                                for metric in ("loss", "acc")} | {"match/alpha": alpha},
                               step=index)
        logger.experiment.summary.update(
            {key(c, side, name): curve[name] for (c, side), curve in named.items()
             for name in ("loss_barrier", "error_barrier")})
        logger.log_image("match/interpolation", [str(png)])

    def replay(self, stage, config: dict, metrics_csv: Path, summary: dict) -> None:
        """A W&B run for a stage that trained without one (a fused group's member: one
        process cannot feed several live runs through Lightning's loggers): the rows of its
        CSV log at their steps, then its summary, and the run finished. The same run (name,
        id, group, config) as the stage would have had alone, written after training. Not
        under `wandb agent`: there the cell's one run is the agent's, not a member's."""
        if os.environ.get("WANDB_SWEEP_ID"):
            return
        logger = self.logger(stage, stage.shown, config)
        if logger is None:
            return
        with open(metrics_csv, newline="") as handle:
            rows = sorted(csv.DictReader(handle), key=lambda row: int(row["step"]))
        for row in rows:
            step = int(row.pop("step"))
            logger.log_metrics({name: float(value) for name, value in row.items() if value != ""},
                               step=step)
        logger.experiment.summary.update(summary)
        self.finish()

    def finish(self) -> None:
        wandb = sys.modules.get("wandb")  # only a run that was started needs finishing
        if wandb is not None and wandb.run is not None:
            run = wandb.run
            self.runs.append(run.url if self.mode == "online" else str(Path(run.dir).parent))
            wandb.finish()

    @staticmethod
    def summary(trainer, values: dict) -> None:
        """``values`` into the summary of the stage's W&B run, where it has one: an arm's
        record, an IMP round's sparsity and accuracy (what sweeps and the report read)."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(values)
