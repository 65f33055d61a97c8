"""Study cost: epochs our plan trains for the paper's ResNet20 CIFAR-10 grid, one (width,
seed), against the authors' procedure (a dense pair and an IMP chain per sparsity).

Both counts come from the same planning code the experiment runs (no training, no data);
``authors_procedure`` is the authors' per-sparsity studies as stages, which
``bench/grid_cost.py`` also schedules. The numbers and their provenance go to
``bench/results/study_cost_<time>.json``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

from common import write_result

from lightning_lth.experiment.plan import Plan, build_plan, study_settings
from lightning_lth.experiment.stages import ArmStage
from lightning_lth.parsing import make_cli
from lightning_lth.sparsity import imp


@dataclass(frozen=True)
class PerSparsity:
    """The authors' study of one target sparsity: its own dense pair, its own IMP chain
    (rounds from the dense weights to that target), and that sparsity's arms."""

    sparsity: float
    dense_epochs: tuple[int, int]  # A, B
    round_epochs: tuple[int, ...]  # the chain's trained rounds, in order
    arms: tuple[ArmStage, ...]

    @property
    def epochs(self) -> int:
        return sum(self.dense_epochs) + sum(self.round_epochs) + sum(a.epochs for a in self.arms)


def authors_procedure(plan: Plan, study, arms: Sequence[ArmStage] | None = None
                      ) -> list[PerSparsity]:
    """Our plan's study as the authors run it: per sparsity (``study.sparsities``) a dense
    pair and a ``per_target`` IMP chain of its own, then the arms (``arms``, default the
    plan's) at that sparsity."""
    arms = plan.arms if arms is None else arms
    rounds = imp.imp_schedule(plan.rounds[0].prunable, study.sparsities, study.prune.fraction,
                              "per_target")
    out = []
    for chain in sorted({r.chain for r in rounds}):
        own = [r for r in rounds if r.chain == chain]
        sparsity = next(r.target for r in own if r.target is not None)
        out.append(PerSparsity(
            sparsity, (plan.dense_a.epochs, plan.dense_b.epochs),
            tuple(study.prune.epochs_per_round for r in own if r.step > 0),
            tuple(a for a in arms if math.isclose(a.sparsity, sparsity))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/resnet20_cifar10.yaml")
    args = parser.parse_args()
    config = make_cli(["--config", args.config, "--trainer.accelerator=cpu",
                       "--trainer.logger=false"], run=False).config.as_dict()
    plan = build_plan(config, saved_epochs=lambda key: None)  # an empty store
    study, T = study_settings(config), plan.dense_a.epochs
    authors = sum(part.epochs for part in authors_procedure(plan, study))
    ours = plan.epochs
    print(f"cells: {len(plan.arms)}  (sparsities x k x arms), T = {T}")
    print(f"our plan:          {ours} epochs (2 dense + one shared IMP chain + arms)")
    print(f"authors' procedure: {authors} epochs (per sparsity: 2 dense + its own IMP chain;"
          f" same arms)")
    print(f"ratio ours / authors = {ours / authors:.3f}  (goal <= 0.9)")
    write_result("study_cost", {"config": args.config, "cells": len(plan.arms), "T": T,
                                "our_epochs": ours, "authors_epochs": authors,
                                "ratio_ours_over_authors": ours / authors, "goal": "<= 0.9"})


if __name__ == "__main__":
    main()
