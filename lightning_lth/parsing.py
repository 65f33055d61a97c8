"""What ``cli`` and ``grid`` both parse with: the command table (``COMMANDS``: each
command's help), the LightningCLI subclass that adds the ``study:`` section (``LTHCLI``),
``make_cli`` (a config and overrides to a parsed CLI) and ``help_kwargs`` (a study command's
``--help``). Here, not in ``cli.py``, so that ``grid`` can parse cells without importing the
entry point that routes to it."""

from __future__ import annotations

import argparse
import textwrap
import warnings

from jsonargparse import DefaultHelpFormatter, set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from lightning_lth.data import LTHDataModule
from lightning_lth.errors import LTHError
from lightning_lth.experiment.config import SEED_MAX, Study
from lightning_lth.training.callbacks import RewindSnapshots, check_rewind_epochs
from lightning_lth.training.lean import profiler_or_quiet
from lightning_lth.training.module import LTHModule

# The string after each ``study`` dataclass field is that setting's `--help` text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

PIPELINE_COMMANDS = ("prune", "match", "experiment", "plan")
# A setting that was replaced: its old name, in a config file or on the command line, is
# refused with the new one (the parser alone would call it unknown, or ambiguous).
REPLACED = {"match.method": "study.match.method is now study.match.methods, a list (e.g. "
                            "[activation] or [activation, weight]): one permuted arm each"}
PROG = "python -m lightning_lth"

# command -> (one line, what it does at more length, an example): `--help`'s first lines.
COMMANDS = {
    "fit": ("train one net (LightningCLI); --model.mask keeps a mask fixed", "",
            "fit --config configs/demo_fmnist.yaml"),
    "validate": ("evaluate a checkpoint on the validation split (LightningCLI)", "",
                 "validate --config configs/demo_fmnist.yaml --ckpt_path last.ckpt"),
    "test": ("evaluate a checkpoint on the test split (LightningCLI)", "",
             "test --config configs/demo_fmnist.yaml --ckpt_path last.ckpt"),
    "experiment": (
        "the whole study: dense A and B, IMP on A, matching, the LTH / naive / permuted arms",
        "Runs every stage of the plan over the stage store (study.store), resuming what a "
        "killed run left, then appends one record per arm to <store>/results.jsonl. On a "
        "terminal one live view shows the stages, the epochs and an ETA; in a log file, one "
        "line when each stage starts and one when it ends.",
        "experiment --config configs/demo_fmnist.yaml --seed_everything=1"),
    "prune": ("dense A and its IMP chain, one stage per round; prints each target's round "
              "folder", "Trains dense A (or reads --study.weights_a) and prunes it round by "
              "round to every sparsity in study.sparsities.",
              "prune --config configs/demo_fmnist.yaml --study.sparsities=[0.9]"),
    "match": ("pi from A to B, the interpolation before and after it, barriers",
              "Aligns A's hidden units to B's, once per method (study.match.methods) and "
              "matching epoch (study.match.epochs); each match writes perm.pt, A permuted, "
              "connectivity.json, quality.json and interpolation.png; with --study.mask also "
              "that mask permuted.",
              "match --config configs/demo_fmnist.yaml --study.mask=mask.pt"),
    "plan": ("the study's stages as a table (status, epochs, estimated time), nothing trained",
             "Lists every stage of the plan with what it computes, its status in the store, "
             "its epochs and its time (measured, or estimated from the stages the store has "
             "timed), then the totals. --json prints the plan as JSON instead.",
             "plan --config configs/demo_fmnist.yaml --json"),
    "grid": ("a whole grid of studies as one stage graph, on local workers or SLURM",
             "Builds the graph of every stage of every cell of a sweep file (or a config with "
             "--vary), each shared stage once, and runs it longest critical path first, "
             "through submitit: on local worker processes (one per GPU, or N on the CPU) or "
             "as one SLURM job per stage with dependencies. The store says what is done: run "
             "it again to resume. --dry_run prints the schedule and the estimated makespan.",
             "grid --sweep sweeps/demo_fmnist.yaml --workers 2 --dry_run"),
    "report": ("tables, figures and report.html from the arms' results",
               "Reads <store>/results.jsonl (or --results, or --wandb_project) and writes "
               "report.md, report.csv, the figures and report.html (one self-contained page: "
               "open it in a browser, no network needed).",
               "report --config configs/demo_fmnist.yaml"),
    "dashboard": ("the report's comparison as a saved W&B workspace view (wandb-workspaces)",
                  "Creates, or updates, a view of the project's workspace: the arms' runs "
                  "grouped by arm and cell, coloured as in the report, with accuracy vs k and "
                  "vs sparsity, the arms' curves, the barriers and the diversity table. Needs "
                  "W&B credentials and network; --dry_run prints the view's JSON instead and "
                  "contacts nothing.",
                  "dashboard --wandb_project lightning_lth --dry_run"),
}


class _Described(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the description's line breaks, so its example stands on a line of its own."""


def help_kwargs(command: str) -> dict:
    """A study command's parser: ``--help`` starts with what it does and an example (the
    option list follows; the usage line would be the whole option list again)."""
    line, more, example = COMMANDS[command]
    text = "\n\n".join([textwrap.fill(f"{PROG} {command}: {line}.", 88),
                        textwrap.fill(more, 88), f"example:\n  {PROG} {example}"])
    return {"prog": f"{PROG} {command}", "description": text, "usage": argparse.SUPPRESS,
            "formatter_class": _Described}


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> [--config FILE] [--section.key=value ...]", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (line, _, _) in COMMANDS.items()]
    lines += ["", f"`{PROG} <command> --help` tells more about one command and its options."]
    return "\n".join(lines)


class LTHCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        for attribute in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}",
                                  apply_on="instantiate")
        parser.add_class_arguments(Study, "study")

    def _set_seed(self):
        """A seed numpy refuses is one line here, not its traceback from seed_everything."""
        seed = self._get(self.config, "seed_everything")
        if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed <= SEED_MAX:
            raise LTHError(f"seed_everything={seed} is not allowed: it must be in "
                           f"0..{SEED_MAX} (or true: a random one)")
        super()._set_seed()

    def instantiate_trainer(self, **kwargs):
        """The trainer, with ``QuietProfiler`` where ``trainer.profiler`` names none."""
        configured = self._get(self.config_init, "trainer", default={}).get("profiler")
        kwargs.setdefault("profiler", profiler_or_quiet(configured))
        return super().instantiate_trainer(**kwargs)

    def before_fit(self):
        """Rewind epochs beyond max_epochs, a model that cannot run on the data, or data
        that cannot be loaded, fail here, before any logger or output dir exists."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, RewindSnapshots):
                check_rewind_epochs(callback.epochs, self.trainer.max_epochs)
        from lightning_lth.experiment.plan import preflight

        preflight(dict(self.model.hparams), matching=False)  # a fresh net: no compile, no mode
        self.datamodule.setup("fit")  # kept: the trainer's own setup call reuses it


def make_cli(args: list[str], run: bool = True, command: str | None = None) -> LTHCLI:
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within")
    kwargs = {"parser_mode": "omegaconf", "exit_on_error": False}
    return LTHCLI(LTHModule, LTHDataModule, args=args, run=run,
                  parser_kwargs={**kwargs, **(help_kwargs(command) if command else {})},
                  save_config_kwargs={"overwrite": False})
