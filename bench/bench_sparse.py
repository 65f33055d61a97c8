"""Sparse vs dense training of ResNet20: step time and peak memory, measured side by side.

Both variants are the same ``LTHModule`` trained by a real Lightning Trainer (SGD, momentum
0.9, weight decay 5e-4, batch 128 by default); the sparse one carries a fixed global-magnitude
mask (IMP's pruning step, 90% sparsity by default), so its steps include the mask hooks
exactly as ``LTHModule`` installs them (gradient hook + optimizer step-post hook).

(a) step time: forward + backward + optimizer step + hooks, from ``on_train_batch_start`` to
    ``on_train_batch_end`` (data loading excluded; CUDA synchronised). Dense and sparse fits
    alternate in blocks in one process (``common.interleaved``), so drifting machine load
    hits both alike; each block drops its first steps as warm-up. Ratio of the medians;
    goal <= 1.05.
(b) peak memory: one child process per variant trains a few steps. CPU: peak RSS
    (``ru_maxrss``) of the child, and the growth over its RSS just before ``fit``; CUDA:
    ``torch.cuda.max_memory_allocated`` during fit, and its growth over the memory allocated
    just before ``fit``. Goal <= 1.10.

On CPU the bench runs one torch thread by default (``--threads``): on a shared machine two
threads competing with other processes made single steps up to 3x slower at random, which
drowns a ratio near 1.

Usage: ``python bench/bench_sparse.py [--device cpu|cuda] [--steps N] [--batch-size B]``.
The numbers and their provenance go to ``bench/results/sparse_<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import lightning as L
import torch
from common import interleaved, sync, write_result
from torch.utils.data import DataLoader, TensorDataset

from lightning_lth.sparsity import imp
from lightning_lth.training.module import LTHModule

GOAL_TIME, GOAL_MEMORY = 1.05, 1.10


def build(sparse: bool, args) -> LTHModule:
    torch.manual_seed(0)
    module = LTHModule("resnet20", args.width, lr=0.08, momentum=0.9, weight_decay=5e-4,
                       schedule="constant")
    if sparse:
        names = imp.prunable_names(module.net)
        params = dict(module.net.named_parameters())
        prunable = sum(params[name].numel() for name in names)
        module.mask = imp.prune_global_l1(module.net, names, None,
                                          round(args.sparsity * prunable))
    return module


def loader(args, batches: int) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batches * args.batch_size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batches * args.batch_size,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=args.batch_size)


def trainer(args, steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                     precision=args.precision, max_steps=steps, max_epochs=-1, logger=False,
                     callbacks=list(callbacks), enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0)


class StepTimer(L.Callback):
    def __init__(self, device: str, warmup: int):
        self.device, self.warmup, self.times = device, warmup, []

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = self._now() - self.start
        if batch_idx >= self.warmup:
            self.times.append(elapsed)


def measure_time(args) -> dict:
    modules = {"dense": build(False, args), "sparse": build(True, args)}
    per_block = -(-args.steps // args.repeats)
    data = loader(args, args.warmup + per_block)

    def block(name: str) -> list[float]:
        timer = StepTimer(args.device, args.warmup)
        trainer(args, args.warmup + per_block, [timer]).fit(modules[name], data)
        return timer.times

    blocks = interleaved({name: lambda name=name: block(name) for name in modules},
                         args.repeats)
    times = {name: [step for steps in blocks[name] for step in steps] for name in modules}
    block_ratios = [statistics.median(sparse) / statistics.median(dense)
                    for dense, sparse in zip(blocks["dense"], blocks["sparse"], strict=True)]
    sparse_mask = modules["sparse"].mask
    return {"median_s": {n: statistics.median(t) for n, t in times.items()},
            "mean_s": {n: statistics.fmean(t) for n, t in times.items()},
            "steps": {n: len(t) for n, t in times.items()}, "block_ratios": block_ratios,
            "sparsity": sparse_mask.sparsity()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    """One variant in a fresh process: print its memory as one JSON line."""
    module = build(args.child == "sparse", args)
    data = loader(args, args.memory_steps)
    fit = trainer(args, args.memory_steps)
    if args.device == "cuda":
        module.cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fit.fit(module, data)
        peak = torch.cuda.max_memory_allocated()
    else:
        before = rss_bytes()
        fit.fit(module, data)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "before": before}))


def measure_memory(args) -> dict:
    results = {}
    for variant in ("dense", "sparse"):
        command = [sys.executable, __file__, "--child", variant, "--device", args.device,
                   "--batch-size", str(args.batch_size), "--width", str(args.width),
                   "--sparsity", str(args.sparsity), "--memory-steps", str(args.memory_steps),
                   "--precision", args.precision]
        command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"memory child for {variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=18,
                        help="timed steps per variant, after warm-up (default 18)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating dense/sparse blocks the timed steps are split into")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per block")
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine one thread is "
                             "far less disturbed by other load; the ratio is the point); "
                             "0 = torch's default")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--child", choices=("dense", "sparse"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_lth"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.child:
        child(args)
        return

    device = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"cpu ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"
    print(f"ResNet20x{args.width}, batch {args.batch_size}, {args.precision}, SGD momentum 0.9 "
          f"wd 5e-4, sparsity {args.sparsity}, on {device}")
    started = time.perf_counter()
    timing = measure_time(args)
    memory = measure_memory(args)
    dense_t, sparse_t = timing["median_s"]["dense"], timing["median_s"]["sparse"]
    time_ratio = sparse_t / dense_t
    peak_ratio = memory["sparse"]["peak"] / memory["dense"]["peak"]
    growth = {v: memory[v]["peak"] - memory[v]["before"] for v in memory}
    growth_ratio = growth["sparse"] / growth["dense"] if growth["dense"] > 0 else float("nan")
    what = "max_memory_allocated" if args.device == "cuda" else "peak RSS"
    mib = 2 ** 20
    print(f"(a) step time, median of {timing['steps']['dense']} steps each: dense "
          f"{dense_t * 1e3:.1f} ms ({args.batch_size / dense_t:.0f} img/s), sparse "
          f"{sparse_t * 1e3:.1f} ms (mask sparsity {timing['sparsity']:.3f})")
    print(f"    per-block ratios: {', '.join(f'{r:.3f}' for r in timing['block_ratios'])}; "
          f"ratio of means {timing['mean_s']['sparse'] / timing['mean_s']['dense']:.3f}")
    print(f"(b) {what}, {args.memory_steps} steps in a child process each: dense "
          f"{memory['dense']['peak'] / mib:.1f} MiB, sparse {memory['sparse']['peak'] / mib:.1f}"
          f" MiB; growth during fit: dense {growth['dense'] / mib:.1f} MiB, sparse "
          f"{growth['sparse'] / mib:.1f} MiB")
    misses = []
    for label, ratio, goal in (("step time sparse/dense", time_ratio, GOAL_TIME),
                               (f"{what} sparse/dense", peak_ratio, GOAL_MEMORY),
                               ("memory growth during fit sparse/dense", growth_ratio,
                                GOAL_MEMORY)):
        ok = ratio <= goal
        misses += [] if ok else [label]
        print(f"RATIO {label}: {ratio:.3f} (goal <= {goal:.2f}) {'ok' if ok else 'MISSED'}")
    print(f"total {time.perf_counter() - started:.0f} s")
    write_result("sparse", {
        "model": f"resnet20x{args.width}", "batch_size": args.batch_size,
        "precision": args.precision, "sparsity": timing["sparsity"], "timing": timing,
        "memory": memory, "what_memory": what, "ratio_step_time": time_ratio,
        "ratio_peak_memory": peak_ratio, "ratio_memory_growth": growth_ratio,
        "goals": {"step_time": f"<= {GOAL_TIME}", "memory": f"<= {GOAL_MEMORY}"},
        "missed": misses}, device=args.device)
    if args.strict and misses:
        sys.exit(1)


if __name__ == "__main__":
    main()
