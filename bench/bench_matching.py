"""Benchmark: activation matching vs training steps, and the linear assignment solver.

(a) activation matching of two ResNet20x{width} nets over N batches of random CIFAR-shaped
    images (the whole ``match()`` call: spec check, hooks, float64 moments accumulated on the
    nets' device -- on CUDA replayed as a CUDA graph, and also timed eagerly --, assignments),
    against the time of 50 training steps (SGD momentum 0.9,
    forward + backward + step) of the same model, measured in this run (``--train-steps``
    of them, scaled to 50); prints the ratio matching / 50 steps (goal <= 1.0).
(b) scipy linear_sum_assignment on a {lap_size}^2 random matrix in [-1, 1] (goal < 1 s).

The sides run in ``--repeats`` interleaved rounds (``common.interleaved``), fastest kept; the
numbers and their provenance go to ``bench/results/matching_<time>.json``.

    python bench/bench_matching.py --device cpu --batches 5 --train-steps 5  # CPU default
    python bench/bench_matching.py --device cuda --batches 50                # the goal's setting
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from common import device_name, interleaved, sync, timed, write_result
from scipy.optimize import linear_sum_assignment

from lightning_lth.models import build_model
from lightning_lth.symmetry import check_spec, match
from lightning_lth.symmetry.matching import activation_correlations


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=None,
                        help="batches (= training steps) timed; default 50 on cuda, 5 on cpu "
                             "(ResNet20x4 trains at a few seconds per step on a small CPU)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="training steps timed (the ratio scales them to 50); default 50 "
                             "on cuda, 5 on cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed rounds, alternating which of the two runs first; the "
                             "fastest round of each is reported (helps on a busy machine)")
    parser.add_argument("--lap-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="then one more matching under torch.profiler: its top operators")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    if args.batches is None:
        args.batches = 50 if device.type == "cuda" else 5
    if args.train_steps is None:
        args.train_steps = 50 if device.type == "cuda" else 5
    if args.batches < 1 or args.train_steps < 1:
        parser.error("--batches and --train-steps must be >= 1")

    torch.manual_seed(args.seed)
    nets = [build_model("resnet20", args.width, 10, 3, 32).to(device) for _ in range(3)]
    model_a, model_b, trained = nets
    gen = torch.Generator().manual_seed(args.seed)
    data = [(torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device),
             torch.randint(0, 10, (args.batch_size,), generator=gen).to(device))
            for _ in range(max(args.batches, args.train_steps))]

    # warm-up (allocator, cuDNN autotune, thread pools): one forward of each kind, not timed
    with torch.no_grad():
        model_a.eval()(data[0][0])
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.08, momentum=0.9, weight_decay=5e-4)
    trained.train()

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(trained(x), y).backward()
        optimizer.step()

    step(*data[0])
    spec = model_a.permutation_spec()

    def train_all():
        for x, y in data[:args.train_steps]:
            step(x, y)

    def match_all(cuda_graphs: bool = True):
        batches = data[:args.batches]
        correlations = activation_correlations(model_a, model_b, spec, batches, args.batches,
                                               cuda_graphs=cuda_graphs)
        return match(model_a, model_b, spec, method="activation", batches=batches,
                     num_batches=args.batches, correlations=correlations)

    def check_and_match():
        check_s = timed(lambda: check_spec(model_a, spec), device)[0]
        return check_s, *timed(match_all, device)

    # on CUDA, also the passes run eagerly (study.match.cuda_graphs=false) for comparison
    sides = {"match": check_and_match, "train": lambda: timed(train_all, device)[0]}
    if device.type == "cuda":
        sides["eager"] = lambda: timed(lambda: match_all(cuda_graphs=False), device)[0]
    rounds = interleaved(sides, max(args.repeats, 1))
    _, match_s, pi = min(rounds["match"], key=lambda done: done[1])
    check_s = min(done[0] for done in rounds["match"])
    train_s, eager_s = min(rounds["train"]), rounds.get("eager", [])
    train_50_s = train_s / args.train_steps * 50

    lap_gen = torch.Generator().manual_seed(args.seed)
    matrix = (torch.rand(args.lap_size, args.lap_size, generator=lap_gen,
                         dtype=torch.float64) * 2 - 1).numpy()
    lap_s = timed(lambda: linear_sum_assignment(matrix, maximize=True))[0]

    result = {
        "device": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "model": f"resnet20x{args.width}",
        "batches": args.batches,
        "batch_size": args.batch_size,
        "repeats": max(args.repeats, 1),
        "activation_match_s": round(match_s, 3),
        "of_which_spec_check_s": round(check_s, 3),
        "train_steps": args.train_steps,
        "train_steps_s": round(train_s, 3),
        "train_50_steps_s": round(train_50_s, 3),
        "match_over_50_steps_ratio": round(match_s / train_50_s, 3),
        "eager_passes_match_s": round(min(eager_s), 3) if eager_s else None,
        "ratio_goal": "<= 1.0",
        "lap_size": args.lap_size,
        "lap_s": round(lap_s, 3),
        "lap_goal": "< 1 s",
        "groups": len(pi),
    }
    print(f"(a) activation matching, {result['model']}, {args.batches} batches x "
          f"{args.batch_size} on {result['device']}: {match_s:.2f} s (spec check "
          f"~{check_s:.2f} s); 50 SGD training steps: {train_50_s:.2f} s ({args.train_steps} "
          f"timed: {train_s:.2f} s); ratio matching / 50 steps {match_s / train_50_s:.3f} "
          f"(goal <= 1.0) -> {'OK' if match_s <= train_50_s else 'MISSED'}"
          + (f"; with the passes eager (no CUDA graph): {min(eager_s):.2f} s" if eager_s else ""))
    print(f"(b) linear_sum_assignment {args.lap_size}x{args.lap_size}: {lap_s:.3f} s (goal < 1 "
          f"s) -> {'OK' if lap_s < 1 else 'MISSED'}")
    print(json.dumps(result))
    write_result("matching", result, device=device)
    if args.profile:
        profile_matching(match_all, device)
    return result


def profile_matching(match_all, device: torch.device) -> None:
    """Where one matching's time goes: the top operators by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        match_all()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
