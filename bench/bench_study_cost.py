"""Study cost: epochs our plan trains for the paper's ResNet20 CIFAR-10 grid, one (width,
seed), against the authors' procedure (a dense pair and an IMP chain per sparsity).

Both counts come from the same planning code the experiment runs (no training, no data).
"""

from __future__ import annotations

import argparse

from lightning_lth.cli import make_cli
from lightning_lth.experiment.pipeline import Pipeline
from lightning_lth.module import LTHModule
from lightning_lth.sparsity import imp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/resnet20_cifar10.yaml")
    args = parser.parse_args()
    pipeline = Pipeline(make_cli(["--config", args.config, "--trainer.accelerator=cpu",
                                  "--trainer.logger=false"], run=False))
    ours = pipeline.describe()
    study, T = pipeline.study, pipeline.epochs
    net = LTHModule(**pipeline.model_kwargs).net
    prunable = sum(p.numel() for n, p in net.named_parameters()
                   if n in imp.prunable_names(net, study.prune.include, study.prune.exclude))
    per_target = imp.imp_schedule(prunable, study.sparsities, study.prune.fraction, "per_target")
    arm_epochs = sum(cell["epochs"] for cell in ours["cells"])
    authors = (len(study.sparsities) * 2 * T
               + sum(1 for r in per_target if r.step > 0) * study.prune.epochs_per_round
               + arm_epochs)
    print(f"cells: {len(ours['cells'])}  (sparsities x k x arms), T = {T}")
    print(f"our plan:          {ours['epochs']} epochs (2 dense + one shared IMP chain + arms)")
    print(f"authors' procedure: {authors} epochs (per sparsity: 2 dense + its own IMP chain;"
          f" same arms)")
    print(f"ratio ours / authors = {ours['epochs'] / authors:.3f}  (goal <= 0.9)")


if __name__ == "__main__":
    main()
