"""Benchmark: deriving permutation specs from the graph, and matching with them.

(a) derive_spec (torch.fx trace, one run of the example, then check_spec: float32 on a CPU) for
    torchvision resnet18 and resnet50 (ImageNet stem, 2 x 3x32x32 example) and the built-in
    ResNet20x16 (2 x 3x8x8, its hand-written spec's check shape); goal < 2 s each, check
    included; the check alone is printed too.
(b) activation matching (``activation_match``, no spec check) of two ResNet20x{width} nets
    with the derived spec vs the hand-written one (torchvision resnet18 has no hand-written
    spec to compare with); goal: ratio <= 1.05. Also, for information, resnet18 with its
    derived spec read by module hooks vs the same points read as graph nodes (taps in the
    traced graph), the path a spec with functional-op points takes.

    python bench/bench_trace.py    # CPU, 1 thread; (a) fastest of --repeats rounds, (b) median
                                   # ratio of rounds

The numbers and their provenance go to ``bench/results/trace_<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torchvision
from common import cpu_pressure, interleaved, timed, write_result

from lightning_lth.models import build_model
from lightning_lth.symmetry import activation_match, check_spec, derive_spec
from lightning_lth.symmetry.spec import MatchPoint, PermutationSpec
from lightning_lth.symmetry.trace import check_dtype, locate, trace


def fastest(fn, repeats: int) -> float:
    return min(timed(fn)[0] for _ in range(repeats))


def pressure_text() -> str:
    """How busy the machine is: CPU pressure where Linux reports it, else the load average."""
    pressure = cpu_pressure()
    return f"{pressure:.0f}% waiting (PSI)" if pressure is not None else \
        f"load average {os.getloadavg()[0]:.2f}"


def as_graph_nodes(model, spec: PermutationSpec) -> PermutationSpec:
    """The same spec with every point named by its graph node (forces the tap path)."""
    graph = trace(model.eval()).graph
    points = {g: MatchPoint(node=locate(graph, p).name, post=p.post)
              for g, p in spec.points.items()}
    return PermutationSpec(spec.axes, points, spec.check_input_shape)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=2, help="ResNet20 width for (b)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a busy shared CPU, two OpenMP threads wait on "
                             "each other and time several-fold slower and noisier than one")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"torch_threads": torch.get_num_threads(), "repeats": args.repeats}
    at_start = pressure_text()

    nets = {
        "resnet18": (torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
        "resnet50": (torchvision.models.resnet50(num_classes=10), (3, 32, 32)),
        "resnet20x16": (build_model("resnet20", 16, 10, 3, 32), (3, 8, 8)),
    }
    for name, (net, shape) in nets.items():
        x = torch.randn(2, *shape)
        spec = derive_spec(net, x)  # warm-up, and the spec for the check-alone timing
        derive_s = fastest(lambda net=net, x=x: derive_spec(net, x), args.repeats)
        check_s = fastest(lambda net=net, spec=spec: check_spec(
            net, spec, dtype=check_dtype(torch.device("cpu"))), args.repeats)
        params = sum(p.numel() for p in net.parameters())
        result[name] = {"params_M": round(params / 1e6, 1), "groups": len(spec.points),
                        "derive_and_check_s": round(derive_s, 3), "of_which_check_s":
                        round(check_s, 3)}
        print(f"(a) {name} ({params / 1e6:.1f}M params, {len(spec.points)} groups): derive + "
              f"check {derive_s:.2f} s (check alone {check_s:.2f} s; goal < 2 s) -> "
              f"{'OK' if derive_s < 2 else 'MISSED'}")

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(args.batch_size, 3, 32, 32, generator=gen), None)
            for _ in range(args.batches)]

    def compare(label, pair, specs, goal=None):
        """activation_match with two specs, run back to back in each round (alternating which
        goes first): the fastest time of each, and the median of the rounds' ratios (robust to
        the machine's load drifting between rounds)."""
        def side(spec):
            return lambda: timed(lambda: activation_match(*pair, spec, data))[0]

        times = interleaved({key: side(spec) for key, spec in specs.items()}, args.repeats)
        (key_a, a), (key_b, b) = times.items()
        ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
        verdict = f"(goal <= {goal}) -> {'OK' if ratio <= goal else 'MISSED'}" if goal else \
            "(no goal: the taps' fixed cost is two fx traces per call)"
        print(f"(b) {label}: {key_a} {min(a):.2f} s vs {key_b} {min(b):.2f} s (fastest), median "
              f"ratio {ratio:.3f} {verdict}")
        return {f"{key_a}_s": round(min(a), 3), f"{key_b}_s": round(min(b), 3),
                "median_ratio": round(ratio, 3)}

    resnet20 = [build_model("resnet20", args.width, 10, 3, 32).eval() for _ in range(2)]
    derived = derive_spec(resnet20[0], torch.randn(2, 3, 32, 32))
    result[f"match_resnet20x{args.width}"] = compare(
        f"activation matching ResNet20x{args.width}, {args.batches} x {args.batch_size}",
        resnet20, {"derived": derived, "hand_written": resnet20[0].permutation_spec()}, 1.05)
    resnet18 = [torchvision.models.resnet18(num_classes=10).eval() for _ in range(2)]
    hooks = derive_spec(resnet18[0], torch.randn(2, 3, 32, 32))
    result["match_resnet18"] = compare(
        f"activation matching resnet18 (derived spec), {args.batches} x {args.batch_size}",
        resnet18, {"graph_nodes": as_graph_nodes(resnet18[0], hooks), "module_hooks": hooks})
    print(f"CPU contention {at_start} at start, {pressure_text()} at end, {os.cpu_count()} "
          f"CPUs: on a shared machine timings vary several-fold")
    print(json.dumps(result))
    write_result("trace", result)
    return result


if __name__ == "__main__":
    main()
