"""``python -m lightning_lth <command> --config configs/X.yaml``.

fit / validate / test are LightningCLI's own. prune, match, experiment and plan parse the
same config (trainer, model, data, study) and hand it to the pipeline; report reads results.
``main`` routes them, and answers a bare ``--help`` with every command.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
import warnings

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_lth.data import LTHDataModule
from lightning_lth.errors import LTHError
from lightning_lth.experiment.config import SEED_MAX, Study
from lightning_lth.experiment.progress import quiet_lightning, silence_known_noise
from lightning_lth.io import load_yaml
from lightning_lth.training.callbacks import RewindSnapshots, check_rewind_epochs
from lightning_lth.training.module import LTHModule

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    silence_known_noise()
    try:
        if argv[0] not in COMMANDS:
            raise LTHError(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} "
                           f"(`{PROG} --help` says what each does)")
        for arg in argv:
            if arg.split("=")[0] == "--study.match.method":
                raise LTHError(REPLACED["match.method"])
        if argv[0] == "report":
            return report_main(argv[1:])
        if argv[0] == "grid":
            from lightning_lth.grid.command import main as grid_main

            return grid_main(argv[1:])
        if argv[0] in PIPELINE_COMMANDS:
            from lightning_lth.experiment import runner

            as_json = argv[0] == "plan" and "--json" in argv
            args = [arg for arg in argv[1:] if not (as_json and arg == "--json")]
            with quiet_lightning():
                return runner.run_command(argv[0], make_cli(args, run=False, command=argv[0]),
                                          as_json)
        make_cli(argv)
        return 0
    except argparse.ArgumentError as exc:  # the parser's type and value errors
        replaced = [why for old, why in REPLACED.items() if f"'{old}'" in str(exc)]
        print(f"error: {replaced[0] if replaced else parser_error(str(exc))}", file=sys.stderr)
        return 2
    except MisconfigurationException as exc:  # Lightning's own refusal of trainer settings
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def parser_error(message: str) -> str:
    """jsonargparse's error as one line; a value out of a range type's bounds, or of none of
    a union's types (whose message lists every alternative), as ``<key>=<value> is not
    allowed: ...``."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", message).replace("NoneType", "null")
    key = re.search(r'Parser key "([^"]+)"', text)
    value = (re.search(r"Given value: (.*)", text)
             or re.search(r"Not of type \w+: (.*) does not conform", text))
    bounds = re.search(r"does not conform to restriction (.+)", text)
    union = re.search(r"Subtypes: \[([\w, ]*)\]", text)
    if key is None or value is None or (bounds is None and union is None):
        return one_line(message)
    name = key.group(1)
    shown = f"{name}={value.group(1).strip()} is not allowed: "
    if bounds is None:
        return shown + "expected " + " or ".join(union.group(1).split(", "))
    allowed = re.sub(r"\bv\b", name.rsplit(".", 1)[-1], bounds.group(1).strip())
    return shown + f"it must be {allowed}" + (" (or null)" if union else "")


def one_line(message: str, limit: int = 400) -> str:
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ..."


def user_error(exc: BaseException) -> LTHError | None:
    """The LTHError behind ``exc``: itself, or one that jsonargparse wrapped while it
    instantiated a class-typed value (e.g. a callback in trainer.callbacks)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LTHError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def report_main(argv: list[str]) -> int:
    """``report``: tables and plots from a results file, a study config's store, or W&B."""
    from jsonargparse import ArgumentParser
    from omegaconf import OmegaConf

    from lightning_lth import report

    parser = ArgumentParser(exit_on_error=False, **help_kwargs("report"))
    parser.add_argument("--config", type=str | None, default=None,
                        help="a study config: reads <study.store>/results.jsonl")
    parser.add_argument("--results", type=str | None, default=None, help="a results.jsonl")
    parser.add_argument("--out_dir", type=str | None, default=None,
                        help="default: <store>/report, or ./report")
    parser.add_argument("--wandb_project", type=str | None, default=None,
                        help="read the runs of this W&B project ([entity/]project) instead")
    parser.add_argument("--skip_bad_lines", action="store_true",
                        help="report a results file's valid lines and skip (and count) the "
                             "unparseable or invalid ones; default: refuse such a file")
    args = parser.parse_args(argv)
    results, out_dir = args.results, args.out_dir
    if args.config:
        config = load_yaml(args.config, "report --config file")  # one line if it is not YAML
        if not isinstance(config, dict):
            raise LTHError(f"report --config {args.config}: expected a study config (a "
                           f"mapping with a study: section), got a {type(config).__name__}")
        store = OmegaConf.load(args.config).get("study", {}).get("store", "store")
        results = results or (None if args.wandb_project else f"{store}/results.jsonl")
        out_dir = out_dir or f"{store}/report"
    report.main(results, out_dir or "report", args.wandb_project, args.skip_bad_lines)
    return 0
