"""Issue 15's GPU numbers in one run, within a time budget (``--budget``, default 420 s).

Synthetic CIFAR-shaped data only (a lent device has no network). In order of importance,
each section timed and printed as it ends, a failing section reported and the next one run;
a section that would not fit in what is left of the budget (by its estimate) is skipped, and
one that overruns it is stopped:

1. correctness: ``CUDA_TESTS`` (the CUDA-graph step against the eager one, fused members
   against their alone runs, the fast options and the device loader, on CUDA); ``--tests``
   narrows them
2. ResNet20x1, batch 128, fp32: images/s of a bare eager PyTorch loop, ``fit`` eager (dense
   and with a 90 % mask) and ``fit`` with ``model.cuda_graphs``, side by side (rounds
   interleaved, best of each)
3. fused 12 arms, per step: a ``FusedArms`` group of 12 masked ResNet20x1 (4 sparsities x 3)
   under ``fit`` (fp32; bf16-mixed; bf16-mixed + channels_last + the group's step as one CUDA
   graph), images/s summed over the members, vs ``fit`` of one masked eager fp32 net (12 nets
   one after another go at its rate; goal for the graphed bf16 group >= 10x); then, where
   the budget leaves time, the fast group's members' test accuracy after a short run on
   learnable synthetic images against the same nets trained alone in fp32 eager (goal:
   within 0.3 points)
4. matching ResNet20x4 over 50 batches / the time of 50 training steps (``bench_matching``),
   then its profile
5. fused 12 arms, whole stages, which is also the study's smoke run on the GPU: ``prune``,
   ``match`` and two ``experiment`` runs (fused and one after another) through the CLI
   (``bench_fused.compare``, the HOOK below)
6. the same sides as 2 with ``configs/trainer/fast.yaml``'s settings (bf16-mixed,
   channels_last, torch.compile)
7. MFU (issue 23, ``bench_mfu``): ``fit`` and a bare loop, both with all of fast.yaml's
   settings (CUDA graphs included), for ResNet20x16, VGG11x1, ResNet20x8, x4, x1 at batch 128
   (in that order: the goals' models first); each model's numbers are kept as it ends, also
   when the budget stops the section part-way
8. the published grid's cost (``bench/grid_cost.py``, issue 23): seconds per epoch of each
   stage kind at each width, fused 12, GPU-hours per (width, seed) and the makespans on 1
   and 8 GPUs against the authors' procedure; past the default budget: ``--only 8``

    PYTHONPATH=. python bench/gpu_suite.py [--out DIR] [--fmnist DIR] [--only 1,2]
    PYTHONPATH=. python bench/gpu_suite.py --smoke       # any machine, CPU, tiny: proves it runs

Every number goes, with its provenance (``common.write_result``: commit, versions, device,
load, command), to ``DIR/gpu_suite.json`` (``--out``, default ``$OUT`` when set; else
``bench/results/gpu_suite_<time>.json``) after each section, and as the last line printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import bench_matching
import bench_training
import lightning as L
import torch
from common import interleaved, provenance, result_path, write_result

from lightning_lth.data import DeviceLoader
from lightning_lth.experiment.progress import silence_known_noise
from lightning_lth.models import example_input
from lightning_lth.training.fused import FusedArms

BENCH = Path(__file__).resolve().parent

# ---- HOOK: the fused-arms stage bench (bench/bench_fused.py) ------------------------------
# Its ``compare()``: the fused group of 12 arms (4 sparsities x 3 arms at k = 1) vs the same
# 12 arms one after another, both through the real stage code. With ``--fmnist DIR`` (a
# data_dir holding FashionMNIST/raw/*.gz), the demo's MLP on the real Fashion-MNIST, where
# the accuracy check is meaningful; else ResNet20x1 on synthetic CIFAR-10 files, where
# training is too chaotic after two epochs for it (ResNet20 is checked per step by
# tests/test_fused.py). Adjust here if that script's options change.
FUSED_GPU = {"resnet20": {"model": "resnet20", "synthetic": True, "accelerator": "gpu",
                          "epochs": 3},
             "mlp": {"model": "mlp", "accelerator": "gpu", "epochs": 2}}
# -----------------------------------------------------------------------------------------

SIZES = {  # per mode: the training sides, and the matching bench
    "gpu": {"steps": 150, "warmup": 15, "rounds": 3, "images": 50_000, "batch_size": 128,
            "matching": ["--device", "cuda", "--batches", "50", "--train-steps", "50",
                         "--repeats", "2"]},
    "smoke": {"steps": 3, "warmup": 5, "rounds": 1, "images": 512, "batch_size": 32,
              "matching": ["--device", "cpu", "--width", "1", "--batches", "2",
                           "--train-steps", "2", "--batch-size", "16", "--lap-size", "64"]},
}


def _sides_args(mode: str, fast: bool) -> SimpleNamespace:
    size = SIZES[mode]
    return SimpleNamespace(steps=size["steps"], warmup=size["warmup"], images=size["images"],
                           batch_size=size["batch_size"],
                           precision="bf16-mixed" if fast else "32-true",
                           channels_last=fast, compile=fast, cuda_graphs=False)


def best_rates(sides: dict, rounds: int) -> dict:
    """Best images/s of each side over ``rounds`` interleaved rounds; a side that fails (say,
    a graph's capture) is reported and the others go on."""

    def show(index: int, values: dict) -> None:
        print(f"  round {index + 1}: " + ", ".join(
            f"{name} {value[-1]:,.0f} img/s" if not isinstance(value, str) else f"{name} {value}"
            for name, value in values.items()), flush=True)

    values = interleaved(sides, rounds, keep_going=True, on_round=show)
    return {name: value if isinstance(value, str) else max(value)
            for name, value in values.items()}


def add_ratio(best: dict, name: str, base: str, goal: float) -> None:
    if not isinstance(best[name], str) and not isinstance(best[base], str):
        best[f"{name} / {base}"] = round(best[name] / best[base], 3)
        print(f"  {name} / {base} {best[name] / best[base]:.3f} (goal >= {goal})", flush=True)


def training_rates(mode: str, device: torch.device, fast: bool) -> dict:
    """Bare eager, fit eager (dense, masked) and fit + CUDA graphs, rounds interleaved."""
    args = _sides_args(mode, fast)
    graphed = SimpleNamespace(**{**vars(args), "cuda_graphs": True})
    best = best_rates({"bare eager": lambda: bench_training.bare_rate(args, device),
                       "fit eager": lambda: bench_training.lightning_rate(args, device),
                       "fit eager masked 90%": lambda: bench_training.lightning_rate(
                           args, device, sparsity=0.9),
                       "fit cuda_graphs": lambda: bench_training.lightning_rate(graphed, device)},
                      SIZES[mode]["rounds"])
    add_ratio(best, "fit eager", "bare eager", 0.95)
    add_ratio(best, "fit cuda_graphs", "bare eager", 2.5)
    add_ratio(best, "fit eager masked 90%", "fit eager", 0)
    return best


FAST_GROUP = "fused 12 bf16 + channels_last + cuda graph (sum over members)"
# The accuracy check's run: learnable synthetic CIFAR-shaped images (a pattern per class plus
# noise), ResNet20x1, 4 members (one per sparsity) alone vs in the group of 12.
ACCURACY = {"gpu": {"train": 10_000, "test": 2_000, "epochs": 3, "noise": 90.0, "alone": 4},
            "smoke": {"train": 96, "test": 64, "epochs": 1, "noise": 90.0, "alone": 1}}


def fused_steps(mode: str, device: torch.device, seconds_left) -> dict:
    """The fused group's summed images/s vs one masked eager fp32 net's, rounds interleaved:
    the group in fp32, bf16-mixed, and bf16-mixed + channels_last + its step as one CUDA
    graph; then, if ``seconds_left()`` allows, ``fused_accuracy``."""
    args = _sides_args(mode, fast=False)
    args.steps, args.warmup = max(args.steps // 3, 2), max(args.warmup // 3, 3)
    bf16 = SimpleNamespace(**{**vars(args), "precision": "bf16-mixed"})
    fast = SimpleNamespace(**{**vars(bf16), "channels_last": True, "cuda_graphs": True})
    best = best_rates({"fit one masked net": lambda: bench_training.lightning_rate(
                           args, device, sparsity=0.9),
                       "fused 12 (sum over members)": lambda: bench_training.fused_rate(
                           args, device),
                       "fused 12 bf16-mixed (sum over members)":
                           lambda: bench_training.fused_rate(bf16, device),
                       FAST_GROUP: lambda: bench_training.fused_rate(fast, device)},
                      max(SIZES[mode]["rounds"] - 1, 1))
    add_ratio(best, "fused 12 (sum over members)", "fit one masked net", 4)
    add_ratio(best, "fused 12 bf16-mixed (sum over members)", "fit one masked net", 4)
    add_ratio(best, FAST_GROUP, "fit one masked net", 10)
    if mode == "gpu" and seconds_left() < 60:
        best["accuracy"] = f"skipped: {seconds_left():.0f} s left, estimated 60 s"
    else:
        try:
            best["accuracy"] = fused_accuracy(mode, device, fast)
        except Exception as error:  # the rates above are kept
            best["accuracy"] = f"FAILED: {type(error).__name__}: {error}"
        print(f"  accuracy: {best['accuracy']}", flush=True)
    return best


def _learnable_loaders(mode: str, device: torch.device, batch_size: int, epoch_fn):
    """(train, test) DeviceLoaders of CIFAR-shaped images a pattern per class plus noise."""
    size = ACCURACY[mode]
    generator = torch.Generator().manual_seed(0)
    patterns = torch.rand(10, 3, 32, 32, generator=generator) * 195 + 30

    def split(count: int):
        labels = torch.randint(0, 10, (count,), generator=generator)
        noise = torch.randn(count, 3, 32, 32, generator=generator) * size["noise"]
        return (patterns[labels] + noise).round().clamp(0, 255).to(torch.uint8), labels

    mean, std = bench_training.MEAN, bench_training.STD
    train, test = split(size["train"]), split(size["test"])
    return (DeviceLoader(*train, batch_size, mean, std, train=True, augment=False, seed=0,
                         device=device, epoch_fn=epoch_fn),
            DeviceLoader(*test, 1024, mean, std, train=False, augment=False, seed=0,
                         device=device))


def fused_accuracy(mode: str, device: torch.device, fast: SimpleNamespace) -> dict:
    """Test accuracy (%) of the fast group's members after ``ACCURACY``'s epochs vs the
    same nets (init, mask, batches) trained alone in fp32 eager; the largest gap."""
    size = ACCURACY[mode]
    eager = SimpleNamespace(**{**vars(fast), "precision": "32-true", "channels_last": False,
                               "cuda_graphs": False})
    members = [(seed, sparsity) for seed, sparsity in enumerate(
        s for s in (0.8, 0.9, 0.95, 0.97) for _ in range(3))]

    def accuracy(module, args) -> list[float]:
        trainer = L.Trainer(accelerator=device.type, devices=1, precision=args.precision,
                            max_epochs=size["epochs"], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0)
        train, test = _learnable_loaders(mode, device, fast.batch_size,
                                         lambda: trainer.current_epoch)
        trainer.fit(module, train)
        tested = trainer.test(module, test, verbose=False)[0]
        if isinstance(module, FusedArms):
            return [100 * row["test/acc"] for row in module.metrics("test")]
        return [100 * tested["test/acc"]]

    group = FusedArms([bench_training.resnet20_module(fast, seed, sparsity)
                       for seed, sparsity in members], example_input(3, 32))
    fused = accuracy(group, fast)
    # one member per sparsity: the first of each (seed 0, 3, 6, 9)
    chosen = list(range(0, len(members), 3))[:size["alone"]]
    alone = {index: accuracy(bench_training.resnet20_module(eager, *members[index]), eager)[0]
             for index in chosen}
    gaps = {f"S={members[i][1]} seed {i}": round(fused[i] - alone[i], 2) for i in chosen}
    largest = max(abs(gap) for gap in gaps.values())
    return {"epochs": size["epochs"], "fused bf16 members %": [round(a, 2) for a in fused],
            "alone fp32 %": {f"S={members[i][1]} seed {i}": round(a, 2)
                             for i, a in alone.items()},
            "fused - alone (points)": gaps, "largest gap (points)": round(largest, 2),
            "goal": "<= 0.3", "met": largest <= 0.3}


def fused_stages(mode: str, fmnist: str):
    import bench_fused

    if mode == "smoke":  # wired up, not run: its smallest run takes minutes on a CPU
        return f"skipped in --smoke (bench_fused.compare found: {callable(bench_fused.compare)})"
    settings = {**FUSED_GPU["mlp"], "data_dir": fmnist} if fmnist else FUSED_GPU["resnet20"]
    result = bench_fused.compare(**settings)
    print(f"  {settings['model']}: fused 12 arms {result['fused_s']:.1f} s vs one after "
          f"another {result['sequential_s']:.1f} s: ratio {result['ratio']:.2f} (whole stages: "
          f"set-up, evaluation and saving included); largest test accuracy gap "
          f"{result['max_test_acc_gap']:.4f}: check "
          f"{'passed' if result['check_passed'] else 'FAILED'}", flush=True)
    return result


MFU_SIZES = {"gpu": {"models": ["resnet20x16", "vgg11x1", "resnet20x8", "resnet20x4",
                                 "resnet20x1"], "batch_size": 128, "steps": 60, "warmup": 50,
                      "rounds": 1}}


def mfu_section(mode: str, device: torch.device) -> dict:
    """``bench_mfu.measure`` at ``MFU_SIZES`` (``--smoke``: its own smoke sizes, no compile);
    past the budget, the models measured so far and a note."""
    import bench_mfu

    sizes = MFU_SIZES.get(mode, bench_mfu.SMOKE)
    done: dict = {}
    try:
        bench_mfu.measure(device, sizes["models"], batch_size=sizes["batch_size"],
                          steps=sizes["steps"], warmup=sizes["warmup"], rounds=sizes["rounds"],
                          compile=False if mode == "smoke" else None, results=done)
    except Overrun as stop:
        done["stopped"] = f"{stop}: the models not listed were not measured"
    return done


# ---- the grid's cost (bench/grid_cost.py): its options per mode --------------------------
GRID_COST = {"gpu": ["--device", "cuda", "--steps", "60", "--warmup", "10"],
             "smoke": ["--smoke", "--device", "cpu"]}


def grid_cost(mode: str, out: Path) -> dict:
    """``grid_cost.main``, its whole record beside the suite's (``grid_cost*.json``); here
    its headline figures."""
    import grid_cost as bench_grid_cost

    found = bench_grid_cost.main([*GRID_COST[mode], "--out", str(
        out.with_name("grid_cost" + out.name.removeprefix("gpu_suite")))])
    return {"per_epoch": found["per_epoch"], "per_width_seed": found["per_width_seed"],
            **{key: found[key] for key in ("whole_ours", "whole_authors", "goal")
               if key in found}}


CUDA_TESTS = ("test_cuda_graphs.py", "test_fused.py", "test_fast_options.py",
              "test_device_loader.py")


def cuda_tests(select: str) -> str:
    """The tests with CUDA cases (skipped on a CPU machine), run where CUDA is; ``select``:
    a pytest -k expression (empty: all of them)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rs", *(str(BENCH.parent / "tests" / name) for name in CUDA_TESTS),
                           *(["-k", select] if select else [])],
                          capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    print(done.stdout[-3000:] + done.stderr[-1000:], flush=True)
    return "passed" if done.returncode == 0 else f"FAILED (exit {done.returncode})"


class Overrun(Exception):
    """A section ran past what was left of the budget."""


def _overrun(signum, frame):
    raise Overrun("stopped: past the suite's time budget")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny sizes, no torch.compile: checks the script runs")
    parser.add_argument("--budget", type=float, default=420,
                        help="seconds for the whole suite (sections past it are skipped)")
    parser.add_argument("--only", default="",
                        help="comma-separated section numbers to run (default: all)")
    parser.add_argument("--tests", default="",
                        help="a pytest -k expression for section 1 (default: every test)")
    parser.add_argument("--fmnist", default="",
                        help="a data_dir with FashionMNIST/raw/*.gz: section 5 on the demo MLP")
    parser.add_argument("--out", default=os.environ.get("OUT", ""),
                        help="folder for gpu_suite.json (default: $OUT where set)")
    args = parser.parse_args(argv)
    silence_known_noise()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    mode = "smoke" if args.smoke else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU check")
    device = torch.device("cuda", torch.cuda.current_device()) if mode == "gpu" \
        else torch.device("cpu")
    where = provenance(device)
    print(f"gpu_suite ({mode}): {where['device']}, torch {where['torch']}, lightning "
          f"{where['lightning']}, commit {where['git_commit']}", flush=True)
    out = Path(args.out) / "gpu_suite.json" if args.out else result_path("gpu_suite")
    began = time.perf_counter()
    results: dict = {"mode": mode}

    def seconds_left() -> float:
        return args.budget - (time.perf_counter() - began)

    sections = [  # (name, estimated seconds on an H100, run)
        ("CUDA tests", 60, lambda: cuda_tests(args.tests)),
        ("ResNet20x1 fp32", 70, lambda: training_rates(mode, device, fast=False)),
        ("fused 12 arms, steps", 65, lambda: fused_steps(mode, device, seconds_left)),
        ("matching", 50, lambda: bench_matching.main([*SIZES[mode]["matching"], "--profile"])),
        ("fused 12 arms, stages (study smoke run)", 120, lambda: fused_stages(mode, args.fmnist)),
        ("ResNet20x1 fast.yaml", 150, lambda: training_rates(mode, device, fast=True)
         if mode == "gpu" else "skipped in --smoke (torch.compile on a CPU: minutes)"),
        # 5 models x 2 sides: ~25 s of compiling and ~10 s of steps and capture per model
        # (an estimate: not yet run on a GPU)
        ("MFU, fast.yaml (bench_mfu)", 180, lambda: mfu_section(mode, device)),
        ("grid cost", 360, lambda: grid_cost(mode, out)),
    ]
    only = {int(number) for number in args.only.split(",") if number}
    signal.signal(signal.SIGALRM, _overrun)
    for number, (name, estimate, section) in enumerate(sections, start=1):
        if only and number not in only:
            continue
        left = args.budget - (time.perf_counter() - began)
        print(f"== {number}. {name} ({left:.0f} s of the budget left)", flush=True)
        if mode == "gpu" and left < estimate:
            results[name] = f"skipped: {left:.0f} s left, estimated {estimate} s"
            print(results[name], flush=True)
            continue
        start = time.perf_counter()
        signal.alarm(max(int(left), 1))
        try:
            results[name] = section()
        except Exception as error:  # one broken section must not cost the others' numbers
            results[name] = f"FAILED: {type(error).__name__}: {error}"
            print(results[name], flush=True)
        finally:
            signal.alarm(0)
        results[f"{name} seconds"] = round(time.perf_counter() - start, 1)
        print(f"   ({results[f'{name} seconds']:.0f} s)", flush=True)
        write_result("gpu_suite", results, device=device, path=out)
    results["total_s"] = round(time.perf_counter() - began, 1)
    write_result("gpu_suite", results, device=device, path=out)
    print(json.dumps(results, default=str))
    return results


if __name__ == "__main__":
    main()
