"""Linear nets side by side: is there a faster fused step than vmap's for an MLP group?

The demo MLP (784-512-512-512-10), ``--members`` nets on one batch: forward, the members'
summed mean losses and backward, timed without Lightning and without the optimizer (the
same elementwise work on every side), in four ways:

- ``sequential``: the nets one after another, as ``study.fuse=1`` trains them;
- ``vmap``: ``torch.func.vmap`` of ``functional_call`` over the stacked parameters, as
  ``FusedArms`` runs a group (weights stacked as members x out x in);
- ``baddbmm_out_in``: a hand-written ``baddbmm`` chain on those same stacked weights
  (transposed views, no copy);
- ``baddbmm_in_out``: the same chain on weights stored members x in x out.

Rounds alternate the sides (``common.interleaved``), the median of ``--steps`` steps per
round and the best round are kept; ratios are sequential / side (> 1: faster than the nets
one after another). The numbers and their provenance go to
``bench/results/fused_matmul_<time>.json``.

    python bench/bench_fused_matmul.py [--members 12] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from common import interleaved, write_result
from torch.func import functional_call, stack_module_state, vmap

from lightning_lth.models import build_model


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
    nets = [build_model("mlp", 1, 10, 1, 28, None) for _ in range(members)]
    images = torch.randn(batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (batch_size,))
    flat, all_labels = images.flatten(1), labels.expand(members, -1)

    def group_loss(logits):  # members x batch x classes -> the sum of the members' mean losses
        return F.cross_entropy(logits.transpose(1, 2), all_labels, reduction="none").mean(1).sum()

    def sequential():
        for net in nets:
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(images), labels).backward()

    params, buffers = stack_module_state(nets)
    params = {name: value.detach().requires_grad_() for name, value in params.items()}
    template = copy.deepcopy(nets[0]).to("meta")
    forward = vmap(lambda p, b, x: functional_call(template, (p, b), (x,)), in_dims=(0, 0, None))

    def vmapped():
        for value in params.values():
            value.grad = None
        group_loss(forward(params, buffers, images)).backward()

    weights = [name for name in params if name.endswith("weight")]
    biases = [params[name[:-len("weight")] + "bias"] for name in weights]
    out_in = [params[name] for name in weights]
    in_out = [params[name].detach().transpose(1, 2).contiguous().requires_grad_()
              for name in weights]

    def chain(stacked, transpose):
        def step():
            for value in [*stacked, *biases]:
                value.grad = None
            hidden = flat.expand(members, -1, -1)
            for index, (weight, bias) in enumerate(zip(stacked, biases, strict=True)):
                hidden = torch.baddbmm(bias.unsqueeze(1), hidden,
                                       weight.transpose(1, 2) if transpose else weight)
                if index < len(stacked) - 1:
                    hidden = torch.relu(hidden)
            group_loss(hidden).backward()
        return step

    return {"sequential": sequential, "vmap": vmapped,
            "baddbmm_out_in": chain(out_in, transpose=True),
            "baddbmm_in_out": chain(in_out, transpose=False)}


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
