"""Linear nets side by side: which fused step is fastest for a group of MLPs?

The demo MLP (784-512-512-512-10), ``--members`` nets on one batch: forward, the members'
summed mean losses and backward, timed without Lightning and without the optimizer (the
same elementwise work on every side), in four ways:

- ``sequential``: the nets one after another, as ``study.fuse=1`` trains them;
- ``vmap``: ``torch.func.vmap`` of ``functional_call`` over the stacked parameters (members
  x out x in), as ``FusedArms`` runs any other net;
- ``fused_mlp``: ``FusedArms``'s own forward for the MLP (``fused._linear_chain``: one
  ``baddbmm`` per layer on the stacked weights as stored, activations members x features x
  batch);
- ``baddbmm_in_out``: a hand-written ``baddbmm`` chain on weights stored members x in x out
  (activations members x batch x features): what storing the weights transposed would give.

Rounds alternate the sides (``common.interleaved``), the median of ``--steps`` steps per
round and the best round are kept; ratios are sequential / side (> 1: faster than the nets
one after another). The numbers and their provenance go to
``bench/results/fused_matmul_<time>.json``.

    python bench/bench_fused_matmul.py [--members 12] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import interleaved, write_result
from torch.func import vmap

from lightning_lth.models import example_input
from lightning_lth.sparsity.mask import Mask
from lightning_lth.training.fused import FusedArms
from lightning_lth.training.module import LTHModule


def median_step(step, steps: int) -> float:
    """Seconds of one call of ``step``: the median of ``steps`` calls after 3 warm-ups."""
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sides(members: int, batch_size: int) -> dict:
    """Each side's step (forward, loss, backward) on one fixed batch."""
    torch.manual_seed(0)
    modules = [LTHModule(arch="mlp", num_classes=10, in_channels=1, image_size=28)
               for _ in range(members)]
    for module in modules:  # FusedArms needs masks; they do not change the forward's cost
        module.mask = Mask({name: torch.ones_like(param, dtype=torch.bool)
                            for name, param in module.net.named_parameters()
                            if name.endswith("weight")})
    nets = [module.net for module in modules]
    fused = FusedArms(modules, example_input(1, 28))
    images = torch.randn(batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (batch_size,))
    all_labels = labels.expand(members, -1)

    def group_loss(logits):  # members x batch x classes -> the sum of the members' mean losses
        return F.cross_entropy(logits.transpose(1, 2), all_labels, reduction="none").mean(1).sum()

    def sequential():
        for net in nets:
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(images), labels).backward()

    vmapped_forward = vmap(fused._member, in_dims=(0, 0, None))

    def vmapped():
        fused.zero_grad(set_to_none=True)
        group_loss(vmapped_forward(fused._stacked_params(), {}, images)).backward()

    def fused_mlp():
        fused.zero_grad(set_to_none=True)
        group_loss(fused(images)).backward()

    params = fused._stacked_params()
    in_out = [params[weight].detach().transpose(1, 2).contiguous().requires_grad_()
              for weight, _ in fused._chain]
    biases = [params[bias].detach().clone().requires_grad_() for _, bias in fused._chain]

    def baddbmm_in_out():
        for value in [*in_out, *biases]:
            value.grad = None
        hidden = images.flatten(1).expand(members, -1, -1)
        for index, (weight, bias) in enumerate(zip(in_out, biases, strict=True)):
            hidden = torch.baddbmm(bias.unsqueeze(1), hidden, weight)
            if index < len(in_out) - 1:
                hidden = torch.relu(hidden)
        group_loss(hidden).backward()

    return {"sequential": sequential, "vmap": vmapped, "fused_mlp": fused_mlp,
            "baddbmm_in_out": baddbmm_in_out}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: torch's own count here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per side and round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = sides(args.members, args.batch_size)
    times = interleaved({name: (lambda step=step: median_step(step, args.steps))
                         for name, step in steps.items()}, args.rounds)
    best = {name: min(values) for name, values in times.items()}
    print(f"{args.members} demo-MLP members, batch {args.batch_size}, torch threads "
          f"{args.threads}: forward + loss + backward, ms per batch (best round)")
    for name, seconds in best.items():
        print(f"  {name:15s} {seconds * 1e3:8.2f} ms   sequential / this "
              f"{best['sequential'] / seconds:5.2f}")
    write_result("fused_matmul", {
        "members": args.members, "batch_size": args.batch_size, "threads": args.threads,
        "steps": args.steps, "rounds": args.rounds, "seconds_per_round": times,
        "best_seconds": best,
        "sequential_over": {name: best["sequential"] / value for name, value in best.items()}})


if __name__ == "__main__":
    main()
