"""One whole arm stage as ``experiment`` runs it vs a bare PyTorch loop doing the same work.

The stage side is ``Runner.run(arm)`` on the demo config (MLP 784-512-512-512-10 on
Fashion-MNIST, batch 128): the store's lock and work folder, the module and Trainer set-up,
T - k epochs of masked SGD with a test evaluation after each (``data.val_split`` 0), the
final test, the mask/weights/result files and the store's seal. The bare side is the same
work by hand: the same snapshot, mask, data loaders, SGD + cosine schedule, the mask applied
to the gradients and the weights at every step, one test evaluation per epoch and at the
end, the final weights saved; no logging, no metrics objects, no callbacks. The floor side
is the bare loop's work as the smallest LightningModule (a ``LeanModule``, as the study's
modules are), fitted by a Lightning Trainer with the stage's settings (its profiler too):
bare / floor is what Lightning's own loop costs on this machine, a bound for any stage that
its automatic optimisation fits; floor / stage is the study's own share (its metrics, hooks,
callbacks, checkpoints, files and store).

The study's other stages (dense A and B, the IMP rounds to 0.9, the matching its record
reads) are computed once before timing, with one epoch per IMP round so that this set-up
takes about a minute: what the mask came from does not change how long the arm trains. The
sides then alternate (stage, bare, floor, floor, bare, stage, ...: ``common.interleaved``)
and the medians are compared: ratio = bare / stage time (goal >= 0.90), whole runs and per
step (the median time from one optimizer step to the next, taken by torch's global step
hook on every side alike; also the time before the first step and after the last), at
each torch thread count of ``--threads`` (default: 1 and the machine's default, measured
one after the other in this process). The numbers and their provenance go to
``bench/results/arm_stage_<time>.json``.

    python bench/bench_arm_stage.py [--epochs 3] [--repeats 5] [--threads 1,2] [--profile]

``--profile`` runs the stage once more under cProfile and prints where its time went.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from common import interleaved, spread, timed, write_result
from torch.optim.optimizer import register_optimizer_step_post_hook

from lightning_lth.experiment.progress import quiet_lightning, silence_known_noise
from lightning_lth.experiment.runner import Runner
from lightning_lth.io import load_tensors, save_tensors
from lightning_lth.models import build_model
from lightning_lth.parsing import make_cli
from lightning_lth.sparsity.mask import Mask
from lightning_lth.training.lean import LeanModule
from lightning_lth.training.module import load_snapshot

REPO = Path(__file__).resolve().parents[1]
SIDES = ("stage", "bare", "floor")


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


def run_stage(runner: Runner, arm) -> None:
    """``Runner.run(arm)`` from an empty slot in the store (its earlier result removed)."""
    forget(runner, arm)
    runner.run(arm)


class ArmWork:
    """What the bare and floor sides share: the arm's net at its start with the mask applied,
    the mask as 0.0/1.0 factors, SGD + cosine, and its train and test loaders."""

    def __init__(self, runner: Runner, arm):
        model_config, sparse = runner.config["model"], runner.study.sparse
        self.model = build_model(model_config["arch"], model_config["width"],
                                 model_config["num_classes"], model_config["in_channels"],
                                 model_config["image_size"], model_config.get("arch_kwargs"))
        self.model.load_state_dict(load_snapshot(str(runner.weights(arm.init))))
        mask = Mask.load(runner.store.path(arm.round) / "mask.pt")
        params = dict(self.model.named_parameters())
        # 0.0/1.0 masks in the weights' dtype: a bool factor is converted at every multiply
        self.weights = [params[name] for name in mask.tensors]
        self.keeps = [keep.to(params[name].dtype) for name, keep in mask.tensors.items()]
        with torch.no_grad():
            self.remask()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=sparse.lr,
                                         momentum=sparse.momentum,
                                         weight_decay=sparse.weight_decay)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                   T_max=arm.epochs)
        datamodule = runner.datamodule
        datamodule.order_seed = runner.order_seed(*arm.order())
        self.epoch = 0
        self.train = datamodule.build_loader("train", epoch_fn=lambda: self.epoch)
        self.test = datamodule.build_loader("test")

    def mask_grads(self) -> None:
        torch._foreach_mul_([weight.grad for weight in self.weights], self.keeps)

    def remask(self) -> None:
        """The weights times their mask, in place (with autograd off)."""
        torch._foreach_mul_(self.weights, self.keeps)

    def save(self, out: Path) -> None:
        out.mkdir(exist_ok=True)
        save_tensors({"state_dict": {k: v.detach().clone()
                                     for k, v in self.model.state_dict().items()}},
                     out / "final.pt")


def bare_arm(runner: Runner, arm, out: Path) -> None:
    """The arm by hand: same start, mask, data and schedule; no Lightning."""
    work = ArmWork(runner, arm)
    model, optimizer, test = work.model, work.optimizer, work.test

    def evaluate() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test:
                correct += int((model(images).argmax(1) == labels).sum())
        model.train()
        return correct / len(test.labels)

    model.train()
    for work.epoch in range(arm.epochs):
        for images, labels in work.train:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                work.mask_grads()
                optimizer.step()
                work.remask()
        work.schedule.step()
        evaluate()
    evaluate()
    work.save(out)


class FloorModule(LeanModule):
    """The bare loop's work as the smallest LightningModule: the same net, mask, SGD, schedule
    and loaders, the mask applied as the bare loop applies it, a count of correct answers per
    evaluation; no metrics objects, logging or callbacks. Its time over the bare loop's is
    what Lightning's own loop costs (with the hook bookkeeping the study's modules save:
    ``training/lean.py``); the stage's time over this one is the study's share."""

    def __init__(self, work: ArmWork):
        super().__init__()
        self.work, self.model = work, work.model
        self.correct = 0

    def train_dataloader(self):
        return self.work.train

    def val_dataloader(self):
        return self.work.test

    def on_fit_start(self) -> None:
        self.work.optimizer.register_step_post_hook(self._remask)

    @torch.no_grad()
    def _remask(self, *_) -> None:
        self.work.remask()

    def on_train_epoch_start(self) -> None:
        self.work.epoch = self.current_epoch

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def on_after_backward(self) -> None:
        self.work.mask_grads()

    def on_validation_epoch_start(self) -> None:
        self.correct = 0

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.correct += int((self.model(images).argmax(1) == labels).sum())

    def configure_optimizers(self):
        return {"optimizer": self.work.optimizer, "lr_scheduler": self.work.schedule}


def floor_arm(runner: Runner, arm, out: Path) -> None:
    """The bare loop's work fitted by a Lightning Trainer with the stage's settings (one
    evaluation per epoch as its validation, one more at the end); no callbacks or loggers."""
    module = FloorModule(ArmWork(runner, arm))
    trainer = L.Trainer(**runner.trainer_args, max_epochs=arm.epochs, logger=False,
                        callbacks=[], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    trainer.fit(module)
    trainer.validate(module, verbose=False)
    module.work.save(out)


def thread_counts(text: str) -> list[int]:
    """``--threads``: comma-separated counts; ``default`` is torch's count at start."""
    counts = [torch.get_num_threads() if item == "default" else int(item)
              for item in text.split(",")]
    return list(dict.fromkeys(counts))  # 1,default on a 1-core machine: once


def check_same_work(runner: Runner, arm, folder: Path) -> None:
    """The three sides did the same work: their final weights are equal to the bit (else the
    ratios compare different computations, and the bench stops)."""
    weights = {side: load_tensors(path, what="final weights")["state_dict"] for side, path in (
        ("stage", runner.store.path(arm) / "final.pt"), ("bare", folder / "bare" / "final.pt"),
        ("floor", folder / "floor" / "final.pt"))}
    for side in ("bare", "floor"):
        differ = [name for name, tensor in weights["stage"].items()
                  if not torch.equal(tensor, weights[side][name])]
        if differ:
            raise SystemExit(f"the {side} side's final weights differ from the stage's in "
                             f"{', '.join(differ)}: the sides do not do the same work")
    print("  final weights of stage, bare and floor: equal to the bit", flush=True)


class StepClock:
    """The time from one optimizer step to the next, on every side alike (torch's global
    step hook: no side's code is touched). Its median over a side's runs is that side's
    per-step cost; the few intervals spanning an evaluation do not move a median. Each run's
    time before its first step (set-up) and after its last (the final test, files, seal) is
    kept too: what of a whole run's difference is not per step."""

    def __init__(self):
        self.intervals: dict[str, list[float]] = {side: [] for side in SIDES}
        self.edges: dict[str, list[tuple[float, float]]] = {side: [] for side in SIDES}
        self.side, self.first, self.last = None, None, None

    def __enter__(self) -> StepClock:
        self._hook = register_optimizer_step_post_hook(self._stepped)
        return self

    def __exit__(self, *_) -> None:
        self._hook.remove()

    def _stepped(self, *_) -> None:
        now = time.perf_counter()
        if self.side is not None and self.last is not None:
            self.intervals[self.side].append(now - self.last)
        self.first = now if self.first is None else self.first
        self.last = now

    def timing(self, side: str, run) -> float:
        """``run()``'s seconds, its steps' intervals and its edges kept under ``side``."""
        self.side, self.first, self.last = side, None, None
        start = time.perf_counter()
        try:
            return timed(run)[0]
        finally:
            end = time.perf_counter()
            if self.first is not None:
                self.edges[side].append((self.first - start, end - self.last))
            self.side = None

    def median_ms(self, side: str) -> float:
        return statistics.median(self.intervals[side]) * 1e3

    def edges_s(self, side: str) -> dict[str, float]:
        """Median seconds before the first step and after the last, over ``side``'s runs."""
        return {"before_first_step": statistics.median(e[0] for e in self.edges[side]),
                "after_last_step": statistics.median(e[1] for e in self.edges[side])}


def compare(runner: Runner, arm, folder: Path, threads: int, repeats: int) -> dict:
    """Stage, bare and floor at ``threads`` torch threads, interleaved: their whole-run
    spreads, per-step medians and ratios."""
    torch.set_num_threads(threads)
    print(f"torch threads {threads}: {repeats} x (stage, bare, floor)", flush=True)
    runs = {"stage": lambda: run_stage(runner, arm),
            "bare": lambda: bare_arm(runner, arm, folder / "bare"),
            "floor": lambda: floor_arm(runner, arm, folder / "floor")}
    with StepClock() as clock:
        times = interleaved(
            {side: lambda side=side: clock.timing(side, runs[side]) for side in SIDES},
            repeats, on_round=lambda index, done: print(
                f"  repeat {index + 1}: " + ", ".join(f"{side} {done[side][-1]:6.2f} s"
                                                     for side in SIDES), flush=True))
    check_same_work(runner, arm, folder)
    step = {side: clock.median_ms(side) for side in SIDES}
    print("  per step (median): " + ", ".join(f"{side} {step[side]:.3f} ms" for side in SIDES)
          + f"; bare / stage {step['bare'] / step['stage']:.3f}, bare / floor "
            f"{step['bare'] / step['floor']:.3f}, floor / stage "
            f"{step['floor'] / step['stage']:.3f}")
    edges = {side: clock.edges_s(side) for side in SIDES}
    print("  outside the steps (median): " + ", ".join(
        f"{side} {edges[side]['before_first_step']:.2f} s before the first, "
        f"{edges[side]['after_last_step']:.2f} s after the last" for side in SIDES))
    median = {side: spread(times[side])["median"] for side in SIDES}
    ratio = median["bare"] / median["stage"]
    print("  median: " + ", ".join(f"{side} {median[side]:.2f} s "
                                   f"({median[side] / arm.epochs:.2f} s/epoch)"
                                   for side in SIDES))
    print(f"  ratio bare / stage {ratio:.3f} (goal >= 0.90): "
          f"{'met' if ratio >= 0.90 else 'NOT met'}; Lightning's own loop: bare / floor "
          f"{median['bare'] / median['floor']:.3f}; the study's share: floor / stage "
          f"{median['floor'] / median['stage']:.3f}", flush=True)
    return {"threads": threads, **{f"{side}_s": spread(times[side]) for side in SIDES},
            **{f"{side}_s_per_round": times[side] for side in SIDES},
            "ratio_bare_over_stage": ratio,
            "ratio_bare_over_floor": median["bare"] / median["floor"],
            "ratio_floor_over_stage": median["floor"] / median["stage"],
            "step_ms_median": step, "outside_steps_s_median": edges,
            "step_intervals": {side: len(clock.intervals[side]) for side in SIDES}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo_fmnist.yaml")
    parser.add_argument("--epochs", type=int, default=3, help="T (the arm trains T epochs, k=0)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side")
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
            profile = cProfile.Profile()
            profile.runcall(run_stage, runner, arm)
            pstats.Stats(profile).sort_stats("cumulative").print_stats(45)
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
