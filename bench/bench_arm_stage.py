"""One whole arm stage as ``experiment`` runs it vs a bare PyTorch loop doing the same work.

The stage side is ``Runner.run(arm)`` on the demo config (MLP 784-512-512-512-10 on
Fashion-MNIST, batch 128): the store's lock and work folder, the module and Trainer set-up,
T - k epochs of masked SGD with a test evaluation after each (``data.val_split`` 0), the
final test, the mask/weights/result files and the store's seal. The bare side is the same
work by hand: the same snapshot, mask, data loaders, SGD + cosine schedule, the mask applied
to the gradients and the weights at every step, one test evaluation per epoch and at the
end, the final weights saved; no logging, no metrics objects, no callbacks.

The study's other stages (dense A and B, the IMP rounds to 0.9, the matching its record
reads) are computed once before timing,
with one epoch per IMP round so that this set-up takes about a minute: what the mask
came from does not change how long the arm trains. The two sides then alternate
(stage, bare, bare, stage, ...: ``common.interleaved``) and the medians are compared:
ratio = bare / stage time (goal >= 0.90), at each torch thread count of ``--threads``
(default: 1 and the machine's default, measured one after the other in this process). The
numbers and their provenance go to ``bench/results/arm_stage_<time>.json``.

    python bench/bench_arm_stage.py [--epochs 3] [--repeats 3] [--threads 1,2] [--profile]

``--profile`` runs the stage once more under cProfile and prints where its time went.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from common import interleaved, spread, timed, write_result

from lightning_lth.experiment.progress import quiet_lightning, silence_known_noise
from lightning_lth.experiment.runner import Runner
from lightning_lth.io import save_tensors
from lightning_lth.models import build_model
from lightning_lth.parsing import make_cli
from lightning_lth.sparsity.mask import Mask
from lightning_lth.training.module import load_snapshot

REPO = Path(__file__).resolve().parents[1]


def make_runner(args, store: Path) -> Runner:
    overrides = [f"--trainer.max_epochs={args.epochs}", "--study.sparsities=[0.9]",
                 "--study.rewind_epochs=[0]", "--study.prune.epochs_per_round=1",
                 "--study.arms=[lth]", "--study.match.epochs=null", "--study.wandb_mode=disabled",
                 f"--study.store={store}", "--trainer.logger=false",
                 "--trainer.callbacks=[]"]  # the demo's RewindSnapshots is for `fit`
    cli = make_cli(["--config", str(REPO / args.config), *overrides], run=False,
                   command="experiment")
    return Runner(cli)


def forget(runner: Runner, arm) -> None:
    """Remove the arm's finished folder, so that the next ``run`` computes it again."""
    shutil.rmtree(runner.store.path(arm), ignore_errors=True)
    runner.store._verified.discard(arm.key)


def stage_seconds(runner: Runner, arm) -> float:
    """``Runner.run(arm)`` from an empty slot in the store (its earlier result removed)."""
    forget(runner, arm)
    return timed(lambda: runner.run(arm))[0]


def bare_seconds(runner: Runner, arm, out: Path) -> float:
    """The same arm by hand: same start, mask, data and schedule; no Lightning."""
    return timed(lambda: bare_arm(runner, arm, out))[0]


def bare_arm(runner: Runner, arm, out: Path) -> None:
    model_config, sparse = runner.config["model"], runner.study.sparse
    model = build_model(model_config["arch"], model_config["width"],
                        model_config["num_classes"], model_config["in_channels"],
                        model_config["image_size"], model_config.get("arch_kwargs"))
    model.load_state_dict(load_snapshot(str(runner.weights(arm.init))))
    mask = Mask.load(runner.store.path(arm.round) / "mask.pt")
    params = dict(model.named_parameters())
    # 0.0/1.0 masks in the weights' dtype: a bool factor is converted at every multiply
    weights = [params[name] for name in mask.tensors]
    keeps = [keep.to(params[name].dtype) for name, keep in mask.tensors.items()]
    with torch.no_grad():
        torch._foreach_mul_(weights, keeps)
    optimizer = torch.optim.SGD(model.parameters(), lr=sparse.lr, momentum=sparse.momentum,
                                weight_decay=sparse.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=arm.epochs)
    datamodule = runner.datamodule
    datamodule.order_seed = runner.order_seed(*arm.order())
    epoch = [0]
    train = datamodule.build_loader("train", epoch_fn=lambda: epoch[0])
    test = datamodule.build_loader("test")

    def evaluate() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test:
                correct += int((model(images).argmax(1) == labels).sum())
        model.train()
        return correct / len(test.labels)

    model.train()
    for epoch[0] in range(arm.epochs):
        for images, labels in train:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                torch._foreach_mul_([weight.grad for weight in weights], keeps)
                optimizer.step()
                torch._foreach_mul_(weights, keeps)
        schedule.step()
        evaluate()
    evaluate()
    save_tensors({"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                 out / "final.pt")


def thread_counts(text: str) -> list[int]:
    """``--threads``: comma-separated counts; ``default`` is torch's count at start."""
    counts = [torch.get_num_threads() if item == "default" else int(item)
              for item in text.split(",")]
    return list(dict.fromkeys(counts))  # 1,default on a 1-core machine: once


def compare(runner: Runner, arm, folder: Path, threads: int, repeats: int) -> dict:
    """Stage and bare at ``threads`` torch threads, interleaved; their spreads and ratio."""
    torch.set_num_threads(threads)
    print(f"torch threads {threads}: {repeats} x (stage, bare)", flush=True)
    times = interleaved(
        {"stage": lambda: stage_seconds(runner, arm),
         "bare": lambda: bare_seconds(runner, arm, folder)}, repeats,
        on_round=lambda index, done: print(
            f"  repeat {index + 1}: stage {done['stage'][-1]:6.2f} s, bare "
            f"{done['bare'][-1]:6.2f} s", flush=True))
    stage, bare = (spread(times[side])["median"] for side in ("stage", "bare"))
    ratio = bare / stage
    print(f"  median: stage {stage:.2f} s ({stage / arm.epochs:.2f} s/epoch), bare "
          f"{bare:.2f} s ({bare / arm.epochs:.2f} s/epoch)")
    print(f"  ratio bare / stage {ratio:.3f} (goal >= 0.90): "
          f"{'met' if ratio >= 0.90 else 'NOT met'}", flush=True)
    return {"threads": threads, "stage_s": spread(times["stage"]),
            "bare_s": spread(times["bare"]), "stage_s_per_round": times["stage"],
            "bare_s_per_round": times["bare"], "ratio_bare_over_stage": ratio}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo_fmnist.yaml")
    parser.add_argument("--epochs", type=int, default=3, help="T (the arm trains T epochs, k=0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--threads", default="1,default",
                        help="torch intra-op thread counts, comma-separated ('default': "
                             "torch's own count here)")
    parser.add_argument("--profile", action="store_true",
                        help="then one more stage run under cProfile: its top functions")
    args = parser.parse_args(argv)
    counts = thread_counts(args.threads)
    silence_known_noise()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder, quiet_lightning():
        store = Path(folder) / "store"
        runner = make_runner(args, store)
        (arm,) = runner.plan().arms
        for stage in runner._plan.stages:  # dense A and B, IMP rounds, matching: untimed
            if stage is not arm:
                runner.run(stage)
        print(f"arm stage of {args.config}: {arm.name}, {arm.epochs} epochs, batch "
              f"{runner.config['data']['batch_size']}", flush=True)
        results = [compare(runner, arm, Path(folder), threads, args.repeats)
                   for threads in counts]
        write_result("arm_stage", {
            "config": args.config, "arm": arm.name, "epochs": arm.epochs,
            "batch_size": runner.config["data"]["batch_size"], "repeats": args.repeats,
            "by_threads": results, "goal": ">= 0.90 at each thread count"})
        if args.profile:
            forget(runner, arm)
            profile = cProfile.Profile()
            profile.runcall(runner.run, arm)
            pstats.Stats(profile).sort_stats("cumulative").print_stats(45)
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
