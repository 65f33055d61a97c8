"""Training images per second: ``Trainer.fit`` of LTHModule vs a bare PyTorch loop.

Both train ResNet20x1 on the same synthetic CIFAR-shaped data, fed by the same
DeviceLoader (whole split on the device, batched crop + flip + normalisation), batch 128,
SGD(lr 0.08, momentum 0.9, weight decay 5e-4), with the same precision / channels_last /
compile settings. The Lightning side is a real Trainer (no logger, checkpointing, progress
bar, model summary or validation); the bare side is forward, cross-entropy, backward, step.
``--warmup`` steps (cudnn autotuning, allocator, torch.compile) are excluded: each side
times ``--steps`` steps from the start of step ``warmup`` (its batch fetched) to the end
of the last, synchronising the device at both ends. Rounds alternate the two sides
(``common.interleaved``); the best of each is kept. Ratio = Lightning / bare (goal:
>= 0.95). The numbers and their provenance go to ``bench/results/training_<time>.json``.
``--profile N`` then runs each side once more under cProfile over its timed steps and prints
what the Lightning side calls beyond the bare loop, and its host syncs per step. The sides
(``bare_rate``, ``lightning_rate``) also take another model and width, and the bare side a
CUDA graph, for ``bench_mfu.py``; this script's own run is ResNet20x1 as above.

    python bench/bench_training.py [--device cuda] [--steps 40] [--precision bf16-mixed]
                                   [--channels-last] [--compile] [--cuda-graphs]
                                   [--profile 40]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import logging
import pstats
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from common import device_name, interleaved, spread, sync, write_result

from lightning_lth.data import DATASETS, DeviceLoader
from lightning_lth.models import build_model, example_input
from lightning_lth.sparsity.mask import Mask
from lightning_lth.training.fused import FusedArms
from lightning_lth.training.module import LTHModule

MEAN, STD = DATASETS["cifar10"].authors_stats
LR, MOMENTUM, WEIGHT_DECAY = 0.08, 0.9, 5e-4
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
GRAPH_WARMUP = 3  # eager steps before a bare loop's capture, as GraphedStep takes


def make_loader(args, device: torch.device, epoch_fn) -> DeviceLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, 10, (args.images,), generator=generator)
    return DeviceLoader(images, labels, args.batch_size, MEAN, STD, train=True, augment=True,
                        seed=0, device=device, epoch_fn=epoch_fn)


class StepTimer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of step warmup + steps - 1;
    a ``profiler`` (cProfile) runs over the same steps."""

    def __init__(self, warmup: int, steps: int, device: torch.device,
                 profiler: cProfile.Profile | None = None):
        self.warmup, self.steps, self.device, self.profiler = warmup, steps, device, profiler
        self.start = self.stop = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()
            if self.profiler is not None:
                self.profiler.enable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup + self.steps:
            if self.profiler is not None:
                self.profiler.disable()
            sync(self.device)
            self.stop = time.perf_counter()


def net_module(args, seed: int = 0, sparsity: float | None = None, arch: str = "resnet20",
               width: int = 1) -> LTHModule:
    """The benched net (ResNet20x1 unless told); with ``sparsity``, a random mask over its
    weight tensors."""
    torch.manual_seed(seed)
    module = LTHModule(arch=arch, width=width, num_classes=10, lr=LR, momentum=MOMENTUM,
                       weight_decay=WEIGHT_DECAY, schedule="constant",
                       channels_last=args.channels_last, compile=args.compile,
                       cuda_graphs=args.cuda_graphs)
    if sparsity is not None:
        module.mask = Mask({name: torch.rand(param.shape) >= sparsity
                            for name, param in module.net.named_parameters() if param.ndim > 1})
    return module


def lightning_rate(args, device: torch.device, sparsity: float | None = None,
                   arch: str = "resnet20", width: int = 1) -> float:
    """Images/s of ``Trainer.fit`` on one net (masked with ``sparsity``)."""
    return fit_rate(args, device, net_module(args, sparsity=sparsity, arch=arch, width=width))


def fused_rate(args, device: torch.device, sparsities=(0.8, 0.9, 0.95, 0.97), copies: int = 3,
               arch: str = "resnet20", width: int = 1) -> float:
    """Images/s summed over the members of one fused group (``copies`` nets per sparsity,
    each its own init and mask): the group's throughput, to set against ``lightning_rate``
    of one masked net (12 nets trained one after another go at that one net's rate)."""
    members = [net_module(args, seed, sparsity, arch, width) for seed, sparsity in
               enumerate(s for s in sparsities for _ in range(copies))]
    fused = FusedArms(members, example_input(3, 32))
    return len(members) * fit_rate(args, device, fused)


def fit_rate(args, device: torch.device, module: L.LightningModule) -> float:
    """Images/s (one batch per step) of a real Trainer fitting ``module``, warm-up excluded."""
    timer = StepTimer(args.warmup, args.steps, device, getattr(args, "profiler", None))
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=args.precision,
                        max_steps=args.warmup + args.steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    loader = make_loader(args, device, lambda: trainer.current_epoch)
    trainer.fit(module, loader)
    return args.steps * args.batch_size / (timer.stop - timer.start)


def bare_rate(args, device: torch.device, arch: str = "resnet20", width: int = 1,
              cuda_graphs: bool = False) -> float:
    """Images/s of a bare PyTorch loop. With ``cuda_graphs`` on a CUDA device, the loop
    PyTorch's CUDA-graph docs give for a whole network: ``GRAPH_WARMUP`` eager steps on a side
    stream, then forward, loss, backward and a fused SGD step (learning rate on the device)
    captured once and replayed per batch, an odd-sized batch run eagerly; elsewhere eager."""
    torch.manual_seed(0)
    model = build_model(arch, width, 10, 3, 32).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if args.compile:
        model.compile()
    graphed = cuda_graphs and device.type == "cuda"
    if graphed and args.precision == "16-mixed":
        raise ValueError("a graphed bare loop has no loss scaler: use 32-true or bf16-mixed")
    optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(LR, device=device)
                                if graphed else LR, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY, fused=graphed or None)
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    epoch = [0]
    loader = make_loader(args, device, lambda: epoch[0])

    def batches():
        while True:
            yield from loader
            epoch[0] += 1

    def step_on(images, labels):
        # capture needs autocast's weight-cast cache off; eager steps match it
        autocast = (torch.autocast(device.type, dtype=half, cache_enabled=not graphed)
                    if half is not None else contextlib.nullcontext())
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model.train()
    start = graph = static = None
    profiler = getattr(args, "profiler", None)
    for step, (images, labels) in enumerate(batches()):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
            if profiler is not None:
                profiler.enable()
        images = images.contiguous(memory_format=memory_format)
        if not graphed:
            step_on(images, labels)
        elif graph is not None and images.shape == static[0].shape:
            static[0].copy_(images)
            static[1].copy_(labels)
            graph.replay()
        elif step < GRAPH_WARMUP or graph is not None:  # warm-up, or an odd-sized batch
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step_on(images, labels)
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            static = (images.clone(), labels.clone())
            graph = torch.cuda.CUDAGraph()
            optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                step_on(*static)
            graph.replay()  # capturing ran nothing: this batch's step
        if step == args.warmup + args.steps - 1:
            if profiler is not None:
                profiler.disable()
            sync(device)
            return args.steps * args.batch_size / (time.perf_counter() - start)
    raise AssertionError("unreachable")


HOST_SYNCS = ("<method 'item' of 'torch._C.TensorBase' objects>",
              "<method 'tolist' of 'torch._C.TensorBase' objects>",
              "<method 'cpu' of 'torch._C.TensorBase' objects>")  # each waits for the device


def per_step(stats: pstats.Stats, steps: int) -> dict:
    """A profiled side per step: ms (under the profiler), Python-level calls, host syncs."""
    return {"ms": round(stats.total_tt / steps * 1e3, 2),
            "calls": round(sum(row[1] for row in stats.stats.values()) / steps, 1),
            "host_syncs": round(sum(row[1] for key, row in stats.stats.items()
                                    if key[2] in HOST_SYNCS) / steps, 2)}


def beyond(bare: pstats.Stats, ours: pstats.Stats, steps: int) -> list:
    """(own ms a step, extra calls a step, function) of each function ``ours`` calls more
    often than ``bare``, most own time first: the per-step work between the two loops."""
    rows = []
    for key, row in ours.stats.items():
        extra = row[1] - bare.stats.get(key, (0, 0))[1]
        if extra > 0:  # the extra calls' share of its own time
            where = f"{key[0].split('site-packages/')[-1]}:{key[1]}({key[2]})"
            rows.append((row[2] * extra / row[1] / steps * 1e3, extra / steps, where))
    return sorted(rows, reverse=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="best of this many per side")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="the Lightning side with model.cuda_graphs (the bare side stays "
                             "eager: the ratio is what the graph gains)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--images", type=int, default=10_000,
                        help="synthetic training images (an epoch boundary may fall inside "
                             "the timed steps, for both sides alike)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then each side once more under cProfile over its timed steps, "
                             "printing its N functions of most own time (where a step's time "
                             "goes beyond the bare loop's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"ResNet20x1, device {device} ({device_name(device)})"
          f", batch {args.batch_size}, precision {args.precision}, channels_last "
          f"{args.channels_last}, compile {args.compile}, cuda_graphs {args.cuda_graphs}, "
          f"{args.warmup} warm-up + "
          f"{args.steps} timed steps x {args.rounds} rounds, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    rates = interleaved(
        {"bare": lambda: bare_rate(args, device), "Lightning": lambda: lightning_rate(args, device)},
        args.rounds, on_round=lambda index, done: print(
            f"  round {index + 1}: bare {done['bare'][-1]:9,.1f} img/s, Lightning "
            f"{done['Lightning'][-1]:9,.1f} img/s", flush=True))
    bare, ours = max(rates["bare"]), max(rates["Lightning"])
    ratio = ours / bare
    print(f"bare PyTorch loop     {bare:10,.1f} img/s")
    print(f"Lightning Trainer.fit {ours:10,.1f} img/s")
    print(f"ratio {ratio:.3f} (goal >= 0.95): {'met' if ratio >= 0.95 else 'NOT met'}")
    profiled, stats = {}, {}
    for name, side in (("bare", bare_rate), ("Lightning", lightning_rate)) if args.profile else ():
        args.profiler = cProfile.Profile()
        side(args, device)
        stats[name] = pstats.Stats(args.profiler)
        profiled[name] = per_step(stats[name], args.steps)
        print(f"== {name}: cProfile over the {args.steps} timed steps: {profiled[name]}",
              flush=True)
        stats[name].sort_stats("tottime").print_stats(args.profile)
    if stats:
        rows = beyond(stats["bare"], stats["Lightning"], args.steps)
        profiled["beyond_bare_ms"] = round(sum(row[0] for row in rows), 2)
        print(f"== what the Lightning side's steps call more often than the bare loop's: "
              f"{profiled['beyond_bare_ms']:.2f} ms a step of own time under the profiler; by "
              f"that time (ms a step, extra calls a step, function):")
        for ms, calls, where in rows[:args.profile]:
            print(f"  {ms:7.3f} {calls:+7.1f}  {where}")
        del args.profiler
    write_result("training", {
        "model": "resnet20x1", "batch_size": args.batch_size, "precision": args.precision,
        "channels_last": args.channels_last, "compile": args.compile,
        "cuda_graphs": args.cuda_graphs, "warmup": args.warmup, "steps": args.steps,
        "rounds": args.rounds, "images": args.images,
        "bare_img_per_s": spread(rates["bare"]), "fit_img_per_s": spread(rates["Lightning"]),
        "ratio_best_fit_over_best_bare": ratio, "goal": ">= 0.95",
        **({"profiled_ms_per_step": profiled} if profiled else {})}, device=device)

if __name__ == "__main__":
    main()
