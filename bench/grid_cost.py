"""The published grid's cost on this device, measured: seconds per epoch of each stage kind,
device-hours per (width, seed), and the makespan of the whole grid on 1 and 8 devices,
against the authors' procedure run eagerly one net at a time.

Timed on synthetic CIFAR-shaped data of the real shapes (3x32x32, batch 128), per model of
``--models`` (default: the published grid's ResNet20 x {1, 4, 8, 16} and VGG11 x 1), each as
the configs train it (eager fp32, ``Trainer.fit`` of one net; ``bench_training``'s helpers):

- dense: one dense net alone; IMP round and arm: the same net with a 90 % mask, alone;
- fused: a ``FusedArms`` group of ``--fuse`` masked nets (default: the runner's size on this
  device, ``FUSE_DEFAULT``: 12 on CUDA, 1 -- no group -- on CPU): a member's epoch costs
  (group's time per step / members) / one alone masked net's, times an alone masked epoch;
- the test pass: the eval-mode forward of 10,000 images at the data's eval batch size;
- match: one match stage's work at that width: the activation pass over the 50,000 training
  images (``activation_correlations`` over ``--match-batches``, scaled), the assignment
  (``match``: spec check and solve) and the interpolation curves before and after (11 points,
  each corrected the study's way; ``compare_naive_matched`` on one test batch and five
  training batches of ``--curve-batch``, the real 1 : 5 proportion, scaled to 10,000 test
  images).

An epoch is 390 steps (50,000 images / 128, the last short batch dropped) plus the test
pass. A model not timed is scaled from the nearest timed width of its arch by its prunable
weights (``grid.schedule.scaled``, as ``grid --dry-run`` does). These seconds are fed, as
``grid.schedule.Costs``, to the stage graphs ``grid --dry-run`` builds of ``--grids``
(sweeps/resnet20_cifar10.yaml, sweeps/resnet20_cifar100.yaml, configs/vgg11_cifar10.yaml at
S 0.8, 0.9 with 3 seeds; docs/benchmarks/published_grid_dry_run_2026-12.md) with the fuse
size above, and to the same studies as the authors run them (``bench_study_cost``: per
sparsity its own dense pair and IMP chain, every arm alone). The longest-path-first schedule
gives both makespans. On a CPU the hours are CPU-hours of this machine at ``--threads``.

    PYTHONPATH=. python bench/grid_cost.py [--models resnet20x1,resnet20x4] [--grids ...]
    PYTHONPATH=. python bench/grid_cost.py --smoke     # tiny, any machine: proves it runs

The numbers and their provenance go to ``--out`` (default
``bench/results/grid_cost_<time>.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import bench_training
import torch
from bench_study_cost import authors_procedure
from common import REPO, device_name, interleaved, timed, write_result

from lightning_lth.errors import LTHError
from lightning_lth.experiment.config import MatchSettings
from lightning_lth.experiment.progress import quiet_lightning, silence_known_noise
from lightning_lth.experiment.runner import FUSE_DEFAULT
from lightning_lth.grid import schedule
from lightning_lth.grid.stage_graph import GridGraph, GridSpec, Node, build_graph, from_sweep
from lightning_lth.models import build_model, example_input
from lightning_lth.symmetry import compare_naive_matched, get_spec, match
from lightning_lth.symmetry.matching import activation_correlations

TRAIN_IMAGES, TEST_IMAGES, BATCH = 50_000, 10_000, 128
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH  # the training loader drops the last short batch
SPARSITY = 0.9  # the timed mask's: masking costs the same at any sparsity (dense kernels)
WORKERS = (1, 8)
PUBLISHED = {  # name: (arch, the grid's spec from the overrides every cell gets)
    "resnet20_cifar10": ("resnet20", lambda o: from_sweep(REPO / "sweeps/resnet20_cifar10.yaml", o)),
    "resnet20_cifar100": ("resnet20",
                          lambda o: from_sweep(REPO / "sweeps/resnet20_cifar100.yaml", o)),
    "vgg11_cifar10": ("vgg11", lambda o: GridSpec(
        ("--config", "configs/vgg11_cifar10.yaml"), {"seed_everything": [0, 1, 2]},
        (*o, "--study.sparsities=[0.8,0.9]"))),
}
SMOKE = {"smoke": ("resnet20", lambda o: GridSpec(  # one (width 1, seed) study, S 0.8, 0.9
    ("--config", "configs/resnet20_cifar10.yaml"), {"seed_everything": [0]},
    (*o, "--study.sparsities=[0.8,0.9]")))}
SIZES = {  # per mode: timed steps, eval batch and the matching's data
    "full": {"steps": 200, "warmup": 20, "eval_batch": 1024, "test_batches": 3,
             "match_batches": 4, "curve_batch": 256,
             "models": "resnet20x1,resnet20x4,resnet20x8,resnet20x16,vgg11x1",
             "grids": ",".join(PUBLISHED)},
    "smoke": {"steps": 2, "warmup": 1, "eval_batch": 16, "test_batches": 1, "match_batches": 1,
              "curve_batch": 4, "models": "resnet20x1", "grids": "smoke", "batch_size": 16},
}


def parse_models(text: str) -> list[tuple[str, int]]:
    models = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        found = re.fullmatch(r"([A-Za-z_][\w.]*)x([1-9]\d*)", item)
        if found is None:
            raise LTHError(f"--models {item!r}: expected ARCHxWIDTH such as resnet20x4")
        models.append((found[1], int(found[2])))
    if not models:
        raise LTHError("--models is empty: name at least one ARCHxWIDTH, e.g. resnet20x1")
    return models


def train_args(args) -> SimpleNamespace:
    """``bench_training``'s settings: eager fp32, as the configs train."""
    return SimpleNamespace(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                           images=(args.steps + args.warmup + 1) * args.batch_size,
                           precision="32-true", channels_last=False, compile=False,
                           cuda_graphs=False)


def test_pass_seconds(args, device: torch.device, arch: str, width: int) -> float:
    """The eval-mode forward of the 10,000 test images, from ``--test-batches`` timed."""
    torch.manual_seed(0)
    net = build_model(arch, width, 10, 3, 32).to(device).eval()
    batch = torch.randn(args.eval_batch, 3, 32, 32, device=device)
    with torch.inference_mode():
        net(batch)  # warm-up: allocator, cuDNN's choice
        seconds = timed(lambda: [net(batch) for _ in range(args.test_batches)], device)[0]
    return seconds / (args.test_batches * args.eval_batch) * TEST_IMAGES


def match_seconds(args, device: torch.device, arch: str, width: int) -> dict[str, float]:
    """One match stage's work of two fresh nets, in seconds: the activation pass (scaled to
    the training set), the assignment, the interpolation curves (scaled to the test set)."""
    torch.manual_seed(0)
    net_a, net_b = (build_model(arch, width, 10, 3, 32).to(device) for _ in range(2))
    spec = get_spec(net_a, example_input(3, 32, device))
    generator = torch.Generator().manual_seed(0)

    def batches(count: int, size: int) -> list:
        return [(torch.randn(size, 3, 32, 32, generator=generator).to(device),
                 torch.randint(0, 10, (size,), generator=generator).to(device))
                for _ in range(count)]

    data = batches(args.match_batches, args.eval_batch)
    activation_correlations(net_a, net_b, spec, data[:1], 1)  # warm-up (and graph capture)
    pass_s, correlations = timed(lambda: activation_correlations(
        net_a, net_b, spec, data, len(data)), device)
    solve_s, perm = timed(lambda: match(net_a, net_b, spec, method="activation", batches=data,
                                        num_batches=len(data), correlations=correlations),
                          device)
    test, train = batches(1, args.curve_batch), batches(5, args.curve_batch)
    states = [{k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
              for net in (net_a, net_b)]
    points = MatchSettings().interpolation_points
    curves_s = timed(lambda: compare_naive_matched(net_a, *states, perm, test, train, spec=spec,
                                                   num_alphas=points, bn_batches=None),
                     device)[0]
    out = {"pass_s": pass_s * TRAIN_IMAGES / (len(data) * args.eval_batch), "solve_s": solve_s,
           "curves_s": curves_s * TEST_IMAGES / args.curve_batch}
    return {**out, "total_s": sum(out.values())}


def time_model(args, device: torch.device, arch: str, width: int) -> dict:
    """Steps of the dense, masked and fused sides (rounds interleaved, best kept), the test
    pass and the match, as seconds."""
    settings = train_args(args)
    sides = {"dense": lambda: bench_training.lightning_rate(settings, device, arch=arch,
                                                            width=width),
             "masked": lambda: bench_training.lightning_rate(settings, device, SPARSITY, arch,
                                                             width)}
    if args.fuse > 1:
        sides["fused"] = lambda: bench_training.fused_rate(settings, device, (SPARSITY,),
                                                           args.fuse, arch, width)
    rates = interleaved(sides, args.rounds, keep_going=True)
    failed = {name: value for name, value in rates.items() if isinstance(value, str)}
    if "dense" in failed or "masked" in failed:
        raise LTHError(f"{arch}x{width}: {failed}")
    step = {name: args.batch_size / max(value) for name, value in rates.items()
            if name not in failed}  # fused: the group's seconds per step over its members
    test_s = test_pass_seconds(args, device, arch, width)
    out = {"step_s": step, "test_pass_s": test_s, "match": match_seconds(args, device, arch, width),
           "epoch_s": {"dense": STEPS_PER_EPOCH * step["dense"] + test_s,
                       "masked": STEPS_PER_EPOCH * step["masked"] + test_s}}
    if "fused" in step:
        out["fused_epoch_cost"] = step["fused"] / step["masked"]
        out["epoch_s"]["fused member"] = out["fused_epoch_cost"] * out["epoch_s"]["masked"]
    elif failed:
        out["fused_failed"] = failed["fused"]
    return out


def make_costs(timed_models: dict[tuple[str, int], dict], fused: bool = True) -> schedule.Costs:
    """The measured seconds as the simulator's costs; ``fused=False``: a fused group's
    members cost what they cost alone (the plan's own saving, without the fusion's)."""
    def table(pick) -> dict:
        return {model: pick(t) for model, t in timed_models.items() if pick(t) is not None}

    masked = table(lambda t: t["epoch_s"]["masked"])
    member = table(lambda t: t["epoch_s"].get("fused member")) if fused else masked
    return schedule.Costs(
        epoch_seconds=table(lambda t: t["epoch_s"]["dense"]),
        kind_epoch_seconds={"imp": masked, "arm": masked, "fused": member},
        model_kind_seconds={"match": table(lambda t: t["match"]["total_s"])})


def authors_graph(graph: GridGraph, studies: list, name: str) -> GridGraph:
    """The grid's studies as the authors run them: per sparsity a dense pair, its own IMP
    chain and a match, then each of the grid's arms at that sparsity alone; the keys start
    with ``authors/<name>/``."""
    chosen = {stage for node in graph.nodes.values() for stage in node.stages}
    nodes: dict[str, Node] = {}
    for index, (runner, plan) in enumerate(studies):
        model = runner.config["model"]
        common = {"argv": (), "arch": model["arch"], "width": int(model["width"]),
                  "weights": plan.rounds[0].prunable, "done": False}

        def add(name: str, kind: str, epochs: int, needs: tuple[str, ...] = (),
                prefix: str = f"authors/{name}/{index}/", common: dict = common) -> str:
            key = prefix + name
            nodes[key] = Node(key=key, stages=(key,), kind=kind, name=name, epochs=epochs,
                              needs=needs, **common)
            return key

        arms = [arm for arm in plan.arms if arm.key in chosen]
        for part in authors_procedure(plan, runner.study, arms):
            tag = f"S={part.sparsity}"
            a = add(f"{tag} dense A", "dense", part.dense_epochs[0])
            b = add(f"{tag} dense B", "dense", part.dense_epochs[1])
            last = a
            for number, epochs in enumerate(part.round_epochs, start=1):
                last = add(f"{tag} imp round {number}", "imp", epochs, (last,))
            matched = add(f"{tag} match", "match", 0, (a, b))
            for arm in part.arms:
                add(f"{tag} {arm.key}", "arm", arm.epochs, (last, matched))
    return GridGraph(nodes, [], graph.store)


def owners(studies: list, authors: GridGraph, name: str) -> dict[str, tuple[str, int, int]]:
    """Each stage key (ours and the authors') -> its study's (arch, width, seed)."""
    out = {}
    for index, (runner, plan) in enumerate(studies):
        model = runner.config["model"]
        who = (model["arch"], int(model["width"]), int(runner.config["seed_everything"]))
        out.update({stage.key: who for stage in plan.stages})
        out.update({key: who for key in authors.nodes
                    if key.startswith(f"authors/{name}/{index}/")})
    return out


def spans(graph: GridGraph, seconds: dict[str, float]) -> dict[str, float]:
    out = {}
    for workers in WORKERS:
        span = schedule.makespan(schedule.schedule(graph, seconds, workers))
        out[f"makespan_{workers}_s"] = span
        out[f"hours_{workers}"] = span / 3600
    return out


def per_epoch_rows(costs: schedule.Costs, graphs: dict[str, GridGraph],
                   timed_models: dict) -> list[dict]:
    """Seconds per epoch (match: per stage) of every (arch, width, kind) the grids hold."""
    nodes = [node for graph in graphs.values() for node in graph.nodes.values()]
    widths = {(n.arch, n.width): n.weights for n in nodes}
    rows = []
    for arch, width in sorted(widths):
        probe = next(n for n in nodes if (n.arch, n.width) == (arch, width))
        source = "measured" if (arch, width) in timed_models else "scaled by weights"
        tables = {"dense": costs.epoch_seconds, "imp / arm (masked)": costs.kind_epoch_seconds["imp"],
                  "fused member": costs.kind_epoch_seconds["fused"],
                  "match (per stage)": costs.model_kind_seconds["match"]}
        for kind, table in tables.items():
            value = schedule.scaled(table, probe, widths)
            if value is not None:
                rows.append({"arch": arch, "width": width, "kind": kind, "seconds": value,
                             "source": source})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one small grid: checks the script runs (< 1 min)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--models", default=None, help="ARCHxWIDTH,... to time")
    parser.add_argument("--grids", default=None,
                        help=f"comma-separated, of {', '.join(PUBLISHED)} (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps a side")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds, best kept")
    parser.add_argument("--fuse", type=int, default=None,
                        help="fused group size (default: FUSE_DEFAULT of the device; --smoke: 2)")
    parser.add_argument("--eval-batch", type=int, default=None, help="test-pass batch size")
    parser.add_argument("--test-batches", type=int, default=None, help="test batches timed")
    parser.add_argument("--match-batches", type=int, default=None,
                        help="activation-pass batches (of --eval-batch) timed")
    parser.add_argument("--curve-batch", type=int, default=None,
                        help="batch size of the interpolation curves' timed batches")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--out", default=None, help="the result's JSON path")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "full"
    for name, value in {**SIZES[mode], "batch_size": SIZES[mode].get("batch_size", BATCH)}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LTHError("--device cuda: no CUDA device here; use --device cpu")
    if device.type not in FUSE_DEFAULT:
        raise LTHError(f"--device {args.device!r}: expected cpu or cuda")
    if args.fuse is None:
        args.fuse = 2 if args.smoke else FUSE_DEFAULT[device.type]
    for name in ("steps", "warmup", "rounds", "fuse", "eval_batch", "test_batches",
                 "match_batches", "curve_batch", "batch_size"):
        if getattr(args, name) < 1:
            raise LTHError(f"--{name.replace('_', '-')}={getattr(args, name)}: it must be >= 1")
    models = parse_models(args.models)
    known = {**PUBLISHED, **SMOKE}
    grids = [name.strip() for name in args.grids.split(",") if name.strip()]
    for name in grids:
        if name not in known:
            raise LTHError(f"--grids {name!r}: valid grids are {', '.join(known)}")
        if known[name][0] not in {arch for arch, _ in models}:
            raise LTHError(f"--grids {name}: nothing of {known[name][0]} in --models "
                           f"{args.models}; time at least one width of it")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    warnings.filterwarnings("ignore")
    silence_known_noise()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    unit = "GPU-hours" if device.type == "cuda" else "CPU-hours"
    where = device_name(device)
    print(f"grid_cost ({mode}) on {device} ({where}), torch threads {torch.get_num_threads()}; "
          f"{args.warmup} + {args.steps} steps a side, batch {args.batch_size}, fuse "
          f"{args.fuse}; hours are {unit}", flush=True)

    timed_models = {}
    for arch, width in models:
        began = time.perf_counter()
        found = timed_models[arch, width] = time_model(args, device, arch, width)
        print(f"  {arch}x{width}: step dense {found['step_s']['dense'] * 1e3:.1f} ms, masked "
              f"{found['step_s']['masked'] * 1e3:.1f} ms"
              + (f", fused {args.fuse} {found['step_s']['fused'] * 1e3:.1f} ms a member "
                 f"(cost {found['fused_epoch_cost']:.3f})" if "fused" in found["step_s"] else "")
              + f"; test pass {found['test_pass_s']:.2f} s; match {found['match']['total_s']:.1f}"
              f" s ({time.perf_counter() - began:.0f} s)", flush=True)

    overrides = ("--study.fuse=" + str(args.fuse), "--study.wandb_mode=disabled",
                 "--trainer.logger=false")
    graphs, authors, studies = {}, {}, {}
    with tempfile.TemporaryDirectory() as store:
        for name in grids:
            began = time.perf_counter()
            spec = known[name][1]((f"--study.store={store}", *overrides))
            with quiet_lightning(), contextlib.chdir(REPO):  # the files name paths from it
                graphs[name] = build_graph(spec)
                studies[name] = [(runner, runner.plan()) for runner in graphs[name].runners]
            authors[name] = authors_graph(graphs[name], studies[name], name)
            print(f"  graph {name}: {len(graphs[name].cells)} cells, {len(graphs[name].nodes)} "
                  f"units ({time.perf_counter() - began:.0f} s)", flush=True)

    rows = per_epoch_rows(make_costs(timed_models), graphs, timed_models)
    print(f"\nseconds per epoch on {where} (an epoch: {STEPS_PER_EPOCH} steps of {BATCH} + the "
          f"test pass of {TEST_IMAGES:,}; match: seconds per stage)")
    print(f"{'model':<12} {'kind':<20} {'seconds':>10}  source")
    for row in rows:
        print(f"{row['arch'] + 'x' + str(row['width']):<12} {row['kind']:<20} "
              f"{row['seconds']:10.1f}  {row['source']}")

    # ours: as the grid runs here (fused groups at their measured cost); ours_unfused: the
    # same graph with every arm at its alone cost; authors: their procedure, all alone
    alone = make_costs(timed_models, fused=False)
    sides = {"ours": make_costs(timed_models), "ours_unfused": alone, "authors": alone}
    results: dict = {"grids": {}, "per_width_seed": []}
    # the whole grid: each grid's own seconds (an untimed width is scaled by its own grid's
    # weights: CIFAR-100's fc makes them differ), scheduled together
    whole = {side: (GridGraph({}, [], Path(".")), {}) for side in sides}
    for name in grids:
        who = owners(studies[name], authors[name], name)
        entry = {"cells": len(graphs[name].cells), "units": len(graphs[name].nodes),
                 "fused_groups": sum(node.fused for node in graphs[name].nodes.values()),
                 "fused_epochs": sum(node.epochs for node in graphs[name].nodes.values()
                                     if node.fused)}
        for side, side_costs in sides.items():
            graph = authors[name] if side == "authors" else graphs[name]
            seconds = side_costs.seconds(graph)
            entry[side] = {"epochs": sum(node.epochs for node in graph.nodes.values()),
                           "device_s": sum(seconds.values()), **spans(graph, seconds)}
            whole[side][0].nodes.update(graph.nodes)
            whole[side][1].update(seconds)
            hours: dict[tuple, float] = {}
            for key, node in graph.nodes.items():
                owner = who[node.stages[0]]
                hours[owner] = hours.get(owner, 0.0) + seconds[key] / 3600
            entry[side]["hours_per_width_seed"] = {f"{a}x{w} seed {s}": h
                                                   for (a, w, s), h in sorted(hours.items())}
        results["grids"][name] = entry
        for label in entry["ours"]["hours_per_width_seed"]:
            results["per_width_seed"].append(
                {"grid": name, "study": label,
                 **{f"{side}_h": entry[side]["hours_per_width_seed"][label] for side in sides}})
    for side, (graph, seconds) in whole.items():
        results[f"whole_{side}"] = {"device_s": sum(seconds.values()), **spans(graph, seconds)}

    print(f"\n{unit} per (width, seed): ours (fuse {args.fuse}; unfused: every arm alone) vs "
          f"the authors' procedure (eager, one net at a time)")
    print(f"{'grid':<18} {'study':<24} {'ours':>9} {'unfused':>9} {'authors':>9} "
          f"{'authors / ours':>15}")
    for row in results["per_width_seed"]:
        print(f"{row['grid']:<18} {row['study']:<24} {row['ours_h']:9.2f} "
              f"{row['ours_unfused_h']:9.2f} {row['authors_h']:9.2f} "
              f"{row['authors_h'] / row['ours_h']:15.2f}")
    print(f"\nmakespan in hours ({unit} of {where}) on 1 and 8 devices")
    print(f"{'grid':<18} " + " ".join(f"{side.replace('ours_', '') + ', ' + str(n):>13}"
                                      for n in WORKERS for side in sides))
    for name, entry in [*results["grids"].items(),
                        ("whole", {side: results[f"whole_{side}"] for side in sides})]:
        print(f"{name:<18} " + " ".join(f"{entry[side][f'hours_{n}']:13.1f}" for n in WORKERS
                                        for side in sides))
    goal = [row for row in results["per_width_seed"]
            if row["grid"] == "resnet20_cifar10" and row["study"].startswith("resnet20x1 ")]
    if goal and device.type == "cuda":
        worst = max(row["ours_h"] for row in goal)
        results["goal"] = {"resnet20x1_cifar10_hours_per_seed": worst, "goal": "< 2 GPU-hours",
                           "met": worst < 2}
        print(f"goal: ResNet20x1 CIFAR-10, one seed, < 2 GPU-hours (the authors' ~23 h): "
              f"{worst:.2f} h, {'met' if worst < 2 else 'NOT met'}")
    elif goal:
        print("goal (< 2 GPU-hours per ResNet20x1 CIFAR-10 seed) is for a GPU: these are "
              f"{unit} of {where}")
    results = {"mode": mode, "device": where, "device_type": device.type, "unit": unit,
               "fuse": args.fuse, "settings": {k: v for k, v in vars(args).items()},
               "steps_per_epoch": STEPS_PER_EPOCH, "test_images": TEST_IMAGES,
               "timed": {f"{a}x{w}": t for (a, w), t in timed_models.items()},
               "per_epoch": rows, **results}
    write_result("grid_cost", results, device=device,
                 path=Path(args.out) if args.out else None)
    return results


if __name__ == "__main__":
    main()
