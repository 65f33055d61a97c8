"""``python -m lightning_lth <command> --config configs/X.yaml``.

fit / validate / test are LightningCLI's own. prune, match, experiment and plan parse the
same config (trainer, model, data, study) and hand it to the pipeline; report reads results.
"""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

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


def make_cli(args: list[str], run: bool = True) -> LTHCLI:
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within")
    return LTHCLI(LTHModule, LTHDataModule, args=args, run=run,
                  parser_kwargs={"parser_mode": "omegaconf"},
                  save_config_kwargs={"overwrite": False})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "report":
            from lightning_lth.report import cli_main

            return cli_main(argv[1:])
        if argv and argv[0] in PIPELINE_COMMANDS:
            from lightning_lth.experiment import pipeline

            return pipeline.run_command(argv[0], make_cli(argv[1:], run=False))
        make_cli(argv)
        return 0
    except LTHError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
