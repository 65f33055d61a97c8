"""``python -m lightning_lth <command> --config configs/X.yaml``.

fit / validate / test are LightningCLI's own. prune, match, experiment and plan parse the
same config (trainer, model, data, study) and hand it to the pipeline; report reads results,
dashboard builds the W&B view.
``main`` routes them, and answers a bare ``--help`` with every command; the parsing it
shares with ``grid`` is ``parsing.py``.
"""

from __future__ import annotations

import argparse
import re
import sys

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_lth.errors import LTHError
from lightning_lth.experiment.progress import quiet_lightning, silence_known_noise
from lightning_lth.io import load_yaml
from lightning_lth.parsing import (
    COMMANDS,
    PIPELINE_COMMANDS,
    PROG,
    REPLACED,
    help_kwargs,
    make_cli,
    overview,
)


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
        if argv[0] == "dashboard":
            from lightning_lth.report.dashboard import main as dashboard_main

            return dashboard_main(argv[1:])
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
    """jsonargparse's error as one line; a value out of a range type's bounds, not among a
    Literal's choices, or of none of a union's types (whose message lists every alternative),
    as ``<key>=<value> is not allowed: ...``."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", message).replace("NoneType", "null")
    key = re.search(r'Parser key "([^"]+)"', text)
    choice = re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", text)
    if key is not None and choice is not None:
        return (f"{key.group(1)}={choice.group(2).strip()} is not allowed: expected one of "
                + ", ".join(name.strip(" '\"") for name in choice.group(1).split(",")))
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
    from lightning_lth.experiment.config import Study

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
    results, out_dir, wandb_settings = args.results, args.out_dir, None
    if args.config:
        config = load_yaml(args.config, "report --config file")  # one line if it is not YAML
        if not isinstance(config, dict):
            raise LTHError(f"report --config {args.config}: expected a study config (a "
                           f"mapping with a study: section), got a {type(config).__name__}")
        study = OmegaConf.load(args.config).get("study", {})
        store = study.get("store", Study.store)
        results = results or (None if args.wandb_project else f"{store}/results.jsonl")
        out_dir = out_dir or f"{store}/report"
        # the study's W&B settings: the report's diversity table is logged where its runs are
        wandb_settings = (study.get("wandb_project", Study.wandb_project),
                          study.get("wandb_mode", Study.wandb_mode))
    report.main(results, out_dir or "report", args.wandb_project, args.skip_bad_lines,
                wandb_settings)
    return 0
