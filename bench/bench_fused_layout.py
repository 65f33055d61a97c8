"""A fused group's training step in NCHW vs channels_last (``model.channels_last``), and in
float32 vs bf16 autocast: does the layout still mean something under vmap?

A ``FusedArms`` group of masked ResNet20x1 nets (``--members``), one training step (forward,
the members' losses and epoch sums, backward with the mask hooks, SGD) on a fixed synthetic
CIFAR-shaped batch, timed without Lightning so that only the kernels differ between sides.
Rounds alternate the sides (``common.interleaved``); the best of each is kept. The numbers
and their provenance go to ``bench/results/fused_layout_<time>.json``.

    python bench/bench_fused_layout.py [--device cpu] [--members 4] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from bench_training import resnet20_module
from common import interleaved, sync, write_result

from lightning_lth.models import example_input
from lightning_lth.training.fused import FusedArms
from lightning_lth.training.module import hold_masks


def step_time(args, device: torch.device, channels_last: bool, bf16: bool) -> float:
    """Seconds per training step of the group, the best over ``args.steps`` steps."""
    switches = SimpleNamespace(channels_last=channels_last, compile=False, cuda_graphs=False)
    members = [resnet20_module(switches, seed, 0.9) for seed in range(args.members)]
    fused = FusedArms(members, example_input(3, 32)).to(device).train()
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    handles = hold_masks(fused._mask_pairs(), [optimizer])
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 \
        else contextlib.nullcontext()
    best = float("inf")
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = fused._step((images, labels), "train")
        loss.backward()
        optimizer.step()
        sync(device)
        if step >= args.warmup:
            best = min(best, time.perf_counter() - start)
    for handle in handles:
        handle.remove()
    assert all(torch.all(param[keep == 0] == 0) for param, keep in fused._mask_pairs())
    return best


def vmapped_layout(members: int = 4) -> dict[str, list[int]]:
    """Strides of two vmapped 3x3 convolutions' output (members x batch x channels x h x w)
    from channels_last images and weights stacked from channels_last ones, and from NCHW."""
    images = torch.randn(8, 16, 8, 8)
    weight = torch.randn(members, 16, 16, 3, 3)
    last = weight.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # as stacked

    def two_convs(x, w):
        first = torch.func.vmap(lambda w: F.conv2d(x, w, padding=1))(w)  # shared images
        return torch.func.vmap(lambda y, w: F.conv2d(y, w, padding=1))(first, w)  # grouped

    return {"NCHW": list(two_convs(images, weight).stride()),
            "channels_last": list(two_convs(
                images.contiguous(memory_format=torch.channels_last), last).stride())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sides = {f"{'channels_last' if cl else 'NCHW'} {'bf16' if bf16 else 'fp32'}":
             (lambda cl=cl, bf16=bf16: step_time(args, device, cl, bf16))
             for bf16 in (False, True) for cl in (False, True)}
    values = interleaved(sides, args.rounds)
    best = {name: min(times) for name, times in values.items()}
    for name, seconds in best.items():
        print(f"{name}: {1000 * seconds:.1f} ms a step", flush=True)
    for precision in ("fp32", "bf16"):
        ratio = best[f"NCHW {precision}"] / best[f"channels_last {precision}"]
        best[f"NCHW / channels_last {precision}"] = round(ratio, 3)
        print(f"NCHW / channels_last ({precision}): {ratio:.3f}", flush=True)
    layout = vmapped_layout()
    print(f"strides of two vmapped convolutions' output: {layout}", flush=True)
    numbers = {"members": args.members, "batch_size": args.batch_size,
               "threads": args.threads, "seconds_per_step": best,
               "vmapped_output_strides": layout}
    write_result("fused_layout", numbers, device=device)
    return numbers


if __name__ == "__main__":
    main()
