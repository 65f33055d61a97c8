"""Study cost: epochs our plan trains for the paper's ResNet20 CIFAR-10 grid, one (width,
seed), against the authors' procedure (a dense pair and an IMP chain per sparsity).

Both counts come from the same planning code the experiment runs (no training, no data).
The numbers and their provenance go to ``bench/results/study_cost_<time>.json``.
"""

from __future__ import annotations

import argparse

from common import write_result

from lightning_lth.experiment.plan import build_plan, study_settings
from lightning_lth.parsing import make_cli
from lightning_lth.sparsity import imp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/resnet20_cifar10.yaml")
    args = parser.parse_args()
    config = make_cli(["--config", args.config, "--trainer.accelerator=cpu",
                       "--trainer.logger=false"], run=False).config.as_dict()
    plan = build_plan(config, saved_epochs=lambda key: None)  # an empty store
    study, T = study_settings(config), plan.dense_a.epochs
    per_target = imp.imp_schedule(plan.rounds[0].prunable, study.sparsities,
                                  study.prune.fraction, "per_target")
    arm_epochs = sum(arm.epochs for arm in plan.arms)
    authors = (len(study.sparsities) * 2 * T
               + sum(1 for r in per_target if r.step > 0) * study.prune.epochs_per_round
               + arm_epochs)
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
