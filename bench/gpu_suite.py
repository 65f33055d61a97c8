"""Issue 15's GPU numbers in one run (about 8 minutes on an H100, compile time included).

Synthetic CIFAR-shaped data only (a lent device has no network). In order, each section
timed and printed as it ends, a failing section reported and the next one run:

1. correctness: ``pytest tests/test_graphs.py`` (the CUDA-graph step against the eager one)
2. ResNet20x1, batch 128, fp32: images/s of a bare eager PyTorch loop, ``fit`` eager and
   ``fit`` with ``model.cuda_graphs``, measured side by side (``bench_training``'s sides,
   rounds interleaved, best of each)
3. the same with ``configs/trainer/fast.yaml``'s settings (bf16-mixed, channels_last,
   torch.compile) on every side
4. fused 12 arms: ``bench/bench_fused.py``'s ``compare()`` (the HOOK below), the fused group
   of 12 ResNet20x1 arms vs the same arms one after another
5. matching ResNet20x4 over 50 batches / the time of 50 training steps (``bench_matching``)

    PYTHONPATH=. python bench/gpu_suite.py            # a CUDA machine: the numbers
    PYTHONPATH=. python bench/gpu_suite.py --smoke    # any machine, CPU, tiny: proves it runs

The last line is every number as JSON. On a lent device, give it a limit of ~9 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_matching  # noqa: E402
import bench_training  # noqa: E402

from lightning_lth.experiment.progress import silence_known_noise  # noqa: E402

# ---- HOOK: the fused-arms bench (bench/bench_fused.py) ----------------------------------
# Its ``compare()`` on 12 ResNet20x1 arms (4 sparsities x 3 arms at k = 1) on synthetic
# CIFAR-10 files: the fused group vs the same 12 arms one after another, both through the
# real stage code. Adjust here if that script's options change.
FUSED_GPU = {"model": "resnet20", "synthetic": True, "accelerator": "gpu", "epochs": 3}
FUSED_TRAIN_IMAGES = 5000  # what compare(synthetic=True) writes
# -----------------------------------------------------------------------------------------

SIZES = {  # per mode: the training sides, and the matching bench
    "gpu": {"steps": 200, "warmup": 20, "rounds": 3, "images": 50_000, "batch_size": 128,
            "matching": ["--device", "cuda", "--batches", "50", "--train-steps", "50",
                         "--repeats", "2"]},
    "smoke": {"steps": 3, "warmup": 5, "rounds": 1, "images": 512, "batch_size": 32,
              "matching": ["--device", "cpu", "--width", "1", "--batches", "2",
                           "--train-steps", "2", "--batch-size", "16", "--lap-size", "64"]},
}


def training_rates(mode: str, device: torch.device, fast: bool) -> dict[str, float]:
    """Best images/s of bare eager, fit eager and fit + CUDA graphs, rounds interleaved."""
    size = SIZES[mode]
    args = SimpleNamespace(steps=size["steps"], warmup=size["warmup"], images=size["images"],
                           batch_size=size["batch_size"],
                           precision="bf16-mixed" if fast else "32-true",
                           channels_last=fast, compile=fast, cuda_graphs=False)
    graphed = SimpleNamespace(**{**vars(args), "cuda_graphs": True})
    sides = {"bare eager": lambda: bench_training.bare_rate(args, device),
             "fit eager": lambda: bench_training.lightning_rate(args, device),
             "fit cuda_graphs": lambda: bench_training.lightning_rate(graphed, device)}
    best: dict = dict.fromkeys(sides, 0.0)
    for round_index in range(size["rounds"]):
        for name, rate in sides.items():
            if isinstance(best[name], str):
                continue
            try:  # a side that fails (say, the graph's capture) keeps the others' numbers
                best[name] = max(best[name], rate())
            except Exception as error:
                best[name] = f"FAILED: {type(error).__name__}: {error}"
        print(f"  round {round_index + 1}: " + ", ".join(
            f"{name} {value:,.0f} img/s" if not isinstance(value, str) else f"{name} {value}"
            for name, value in best.items()), flush=True)
    bare = best["bare eager"]
    for name, goal in (("fit eager", 0.95), ("fit cuda_graphs", 2.5)):
        if not isinstance(best[name], str) and not isinstance(bare, str):
            best[f"{name} / bare"] = round(best[name] / bare, 3)
            print(f"  {name} / bare eager {best[name] / bare:.3f} (goal >= {goal})")
    return best


def fused(mode: str):
    import bench_fused

    if mode == "smoke":  # wired up, not run: its smallest run takes minutes on a CPU
        return f"skipped in --smoke (bench_fused.compare found: {callable(bench_fused.compare)})"
    result = bench_fused.compare(**FUSED_GPU)
    arm_epochs = result["arm_epochs"]
    result["fused_images_per_s"] = 12 * arm_epochs * FUSED_TRAIN_IMAGES / result["fused_s"]
    print(f"  fused 12 arms {result['fused_s']:.1f} s vs one after another "
          f"{result['sequential_s']:.1f} s: ratio {result['ratio']:.2f} (goal >= 4); "
          f"{result['fused_images_per_s']:,.0f} img/s over the 12 arms (whole stages: set-up, "
          f"evaluation and saving included); accuracy check "
          f"{'passed' if result['check_passed'] else 'FAILED'}", flush=True)
    return result


def graph_tests() -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(BENCH.parent / "tests" / "test_graphs.py")],
                          capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    print(done.stdout[-3000:] + done.stderr[-1000:], flush=True)
    return "passed" if done.returncode == 0 else f"FAILED (exit {done.returncode})"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny sizes, no torch.compile: checks the script runs")
    args = parser.parse_args(argv)
    silence_known_noise()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    mode = "smoke" if args.smoke else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU check")
    device = torch.device("cuda", torch.cuda.current_device()) if mode == "gpu" \
        else torch.device("cpu")
    card = torch.cuda.get_device_name(device) if mode == "gpu" else "cpu"
    print(f"gpu_suite ({mode}): {card}, torch {torch.__version__}", flush=True)
    began = time.perf_counter()
    results: dict = {"mode": mode, "device": card}
    sections = [("graph tests", graph_tests),
                ("ResNet20x1 fp32", lambda: training_rates(mode, device, fast=False)),
                ("ResNet20x1 fast.yaml", lambda: training_rates(mode, device, fast=True)
                 if mode == "gpu" else "skipped in --smoke (torch.compile on a CPU: minutes)"),
                ("fused 12 arms", lambda: fused(mode)),
                ("matching", lambda: bench_matching.main(SIZES[mode]["matching"]))]
    for name, section in sections:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            results[name] = section()
        except Exception as error:  # one broken section must not cost the others' numbers
            results[name] = f"FAILED: {type(error).__name__}: {error}"
            print(results[name], flush=True)
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    results["total_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(results, default=str))
    return results


if __name__ == "__main__":
    main()
