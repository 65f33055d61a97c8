"""``python -m lightning_lth <command> --config configs/X.yaml``.

fit / validate / test are LightningCLI's own. prune, match, experiment and plan parse the
same config (trainer, model, data, study) and hand it to the pipeline; report reads results.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from lightning_lth.callbacks import RewindSnapshots, check_rewind_epochs
from lightning_lth.data import LTHDataModule
from lightning_lth.errors import LTHError
from lightning_lth.experiment.config import Study
from lightning_lth.module import LTHModule

PIPELINE_COMMANDS = ("prune", "match", "experiment", "plan")


class LTHCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        for attribute in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}",
                                  apply_on="instantiate")
        parser.add_class_arguments(Study, "study")

    def before_fit(self):
        """Rewind epochs beyond max_epochs fail here, before any logger or output dir exists."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, RewindSnapshots):
                check_rewind_epochs(callback.epochs, self.trainer.max_epochs)


def make_cli(args: list[str], run: bool = True) -> LTHCLI:
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within")
    return LTHCLI(LTHModule, LTHDataModule, args=args, run=run,
                  parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
                  save_config_kwargs={"overwrite": False})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "report":
            return report_main(argv[1:])
        if argv and argv[0] in PIPELINE_COMMANDS:
            from lightning_lth.experiment import runner

            return runner.run_command(argv[0], make_cli(argv[1:], run=False))
        make_cli(argv)
        return 0
    except argparse.ArgumentError as exc:  # the parser's type and value errors
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


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

    parser = ArgumentParser(prog="python -m lightning_lth report", exit_on_error=False,
                            description="Paper-style tables and plots of the arms' results.")
    parser.add_argument("--config", type=str | None, default=None,
                        help="a study config: reads <study.store>/results.jsonl")
    parser.add_argument("--results", type=str | None, default=None, help="a results.jsonl")
    parser.add_argument("--out_dir", type=str | None, default=None,
                        help="default: <store>/report, or ./report")
    parser.add_argument("--wandb_project", type=str | None, default=None,
                        help="read the runs of this W&B project ([entity/]project) instead")
    args = parser.parse_args(argv)
    results, out_dir = args.results, args.out_dir
    if args.config:
        store = OmegaConf.load(args.config).get("study", {}).get("store", "store")
        results = results or (None if args.wandb_project else f"{store}/results.jsonl")
        out_dir = out_dir or f"{store}/report"
    report.main(results, out_dir or "report", args.wandb_project)
    return 0
