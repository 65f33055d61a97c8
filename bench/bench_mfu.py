"""Model-FLOP utilisation (MFU) of ``fit`` with ``configs/trainer/fast.yaml`` vs a bare loop.

For ResNet20 x {1, 4, 8, 16} and VGG11x1 at batch 128 (synthetic CIFAR-shaped data on the
device, ``bench_training``'s loader and SGD): images/s of ``Trainer.fit`` of ``LTHModule``
and of a bare PyTorch loop, both with fast.yaml's settings as the file states them
(bf16-mixed, channels_last, torch.compile, the step as one CUDA graph: on the bare side the
capture recipe of PyTorch's docs, ``bench_training.bare_rate(cuda_graphs=True)``). Each model's
two sides run back to back (``common.interleaved``; the order alternates from one model to
the next, and between rounds), best of each kept.

MFU = images/s x model FLOPs per image / the card's dense peak for bf16
(``flops.py``: the matrix products of one forward + backward counted by FlopCounterMode on
the net at the real batch; the peaks from NVIDIA's datasheets, keyed by the card's name). On
a card not in the table, or a CPU, MFU is None and the achieved TFLOP/s is printed alone.
Since both sides do the same FLOPs per image, MFU fit / MFU bare = their images/s ratio.
The timed steps start at step 50 (``--warmup``), past the first step that logs
``train/loss_step`` (Lightning's ``log_every_n_steps``): the regime of most of an epoch.
Goals (issue 23): fit / bare >= 0.9 for every model, MFU >= 35 % of the bf16 peak for
ResNet20x16 and VGG11x1. Results and provenance: ``bench/results/mfu_<time>.json``.

    python bench/bench_mfu.py --device cuda [--models resnet20x16,vgg11x1] [--steps 60]
                              [--warmup 50] [--rounds 1]
    python bench/bench_mfu.py --smoke     # CPU, ResNet20x1 + VGG11x1, tiny, no compile: seconds
"""

from __future__ import annotations

import argparse
import logging
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from bench_training import bare_rate, lightning_rate
from common import device_name, interleaved, spread, write_result
from flops import mfu, model_step_flops, peak_tflops

from lightning_lth.errors import LTHError

FAST_YAML = Path(__file__).resolve().parents[1] / "configs" / "trainer" / "fast.yaml"
MODELS = {"resnet20x1": ("resnet20", 1), "resnet20x4": ("resnet20", 4),
          "resnet20x8": ("resnet20", 8), "resnet20x16": ("resnet20", 16),
          "vgg11x1": ("vgg11", 1)}
MFU_GOAL = {"resnet20x16": 0.35, "vgg11x1": 0.35}  # of the card's bf16 peak
RATIO_GOAL = 0.9  # fit / bare
SMOKE = {"models": ["resnet20x1", "vgg11x1"], "batch_size": 8, "steps": 2, "warmup": 1,
         "rounds": 1}


def fast_settings(path: Path = FAST_YAML) -> dict:
    """fast.yaml's four speed settings, read from the file (so the bench follows it)."""
    config = yaml.safe_load(path.read_text())
    trainer, model = config.get("trainer", {}), config.get("model", {})
    return {"precision": trainer.get("precision", "32-true"),
            "channels_last": bool(model.get("channels_last", False)),
            "compile": bool(model.get("compile", False)),
            "cuda_graphs": bool(model.get("cuda_graphs", False))}


def parse_models(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in MODELS]
    if bad or not names:
        raise LTHError(f"--models {text!r}: allowed are comma-separated names from "
                       f"{', '.join(MODELS)}")
    return names


def measure(device: torch.device, models: list[str], *, batch_size: int = 128, steps: int = 60,
            warmup: int = 50, rounds: int = 1, compile: bool | None = None,
            results: dict | None = None) -> dict:
    """Per model: FLOPs per image, best images/s, achieved TFLOP/s and MFU of each side,
    and fit / bare. ``compile`` None: as fast.yaml says. Each model's entry is put into
    ``results`` (returned) as soon as it is measured, so a caller stopped part-way keeps the
    models done. One epoch of synthetic images covers every step (no epoch end is timed)."""
    settings = fast_settings()
    if compile is not None:
        settings["compile"] = compile
    if warmup < 5 and device.type == "cuda" and settings["cuda_graphs"]:
        raise LTHError(f"warmup={warmup}: the CUDA graphs take 3 eager steps and a capture "
                       f"before the timed ones; allowed: >= 5")
    args = SimpleNamespace(steps=steps, warmup=warmup, batch_size=batch_size,
                           images=batch_size * (warmup + steps), **settings)
    name = device_name(device)
    peak = peak_tflops(name, settings["precision"]) if device.type == "cuda" else None
    results = {} if results is None else results
    print(f"MFU bench on {device} ({name}): {settings}, batch {batch_size}, {warmup} warm-up + "
          f"{steps} timed steps x {rounds} round(s); peak "
          + (f"{peak:g} TFLOP/s ({settings['precision']}, dense)" if peak is not None else
             "unknown for this device: MFU not computed, achieved TFLOP/s only"), flush=True)
    if device.type != "cuda" and settings["cuda_graphs"]:
        print("  not CUDA: both sides run their steps eagerly (no CUDA graph)", flush=True)
    for index, model in enumerate(models):
        arch, width = MODELS[model]
        flops = model_step_flops(arch, width, batch_size)
        sides = {"fit": partial(lightning_rate, args, device, arch=arch, width=width),
                 "bare": partial(bare_rate, args, device, arch=arch, width=width,
                                 cuda_graphs=settings["cuda_graphs"])}
        if index % 2:
            sides = dict(reversed(sides.items()))
        rates = interleaved(sides, rounds)
        entry = {"flops_per_image": flops.per_image, "forward_flops_per_image":
                 flops.forward / batch_size}
        for side in ("fit", "bare"):
            best = max(rates[side])
            entry[side] = {"img_per_s": spread(rates[side]),
                           "tflops": best * flops.per_image / 1e12,
                           "mfu": mfu(best, flops.per_image, peak)}
        entry["fit / bare"] = max(rates["fit"]) / max(rates["bare"])
        results[model] = entry
        show(model, entry)
    return results


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def show(model: str, entry: dict) -> None:
    fit, bare, ratio = entry["fit"], entry["bare"], entry["fit / bare"]
    goals = [f"fit/bare {ratio:.3f} ({'met' if ratio >= RATIO_GOAL else 'NOT met'}: goal >= "
             f"{RATIO_GOAL})"]
    if model in MFU_GOAL and fit["mfu"] is not None:
        goals.append(f"fit MFU goal >= {MFU_GOAL[model]:.0%}: "
                     f"{'met' if fit['mfu'] >= MFU_GOAL[model] else 'NOT met'}")
    print(f"  {model:12s} {entry['flops_per_image'] / 1e9:7.3f} GFLOP/img | fit "
          f"{fit['img_per_s']['max']:10,.0f} img/s {fit['tflops']:7.2f} TFLOP/s MFU "
          f"{_pct(fit['mfu'])} | bare {bare['img_per_s']['max']:10,.0f} img/s "
          f"{bare['tflops']:7.2f} TFLOP/s MFU {_pct(bare['mfu'])} | " + "; ".join(goals),
          flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=50,
                        help="untimed steps before them (compile, graph capture; 50: the "
                             "timed steps come after fit's first logged step, see above)")
    parser.add_argument("--rounds", type=int, default=1, help="best of this many per side")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--out", default="",
                        help="the result file (default: bench/results/mfu_<time>.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, ResNet20x1 and VGG11x1, batch 8, 2 steps, no torch.compile")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.smoke:
        args.device, args.models = "cpu", ",".join(SMOKE["models"])
        args.batch_size, args.steps, args.warmup, args.rounds = (
            SMOKE["batch_size"], SMOKE["steps"], SMOKE["warmup"], SMOKE["rounds"])
    try:
        models = parse_models(args.models)
        for option in ("batch_size", "steps", "rounds"):
            if getattr(args, option) < 1:
                raise LTHError(f"--{option.replace('_', '-')}={getattr(args, option)}: "
                               f"allowed: >= 1")
        if args.device.split(":")[0] not in ("cpu", "cuda"):
            raise LTHError(f"--device {args.device!r}: allowed: cpu, cuda or cuda:N")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LTHError("--device cuda: no CUDA device here; use --device cpu or --smoke")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        results = measure(device, models, batch_size=args.batch_size, steps=args.steps,
                          warmup=args.warmup, rounds=args.rounds,
                          compile=False if args.smoke else None)
    except LTHError as error:
        parser.exit(2, f"error: {error}\n")
    write_result("mfu", {"settings": fast_settings(), "compiled": not args.smoke,
                         "batch_size": args.batch_size, "steps": args.steps,
                         "warmup": args.warmup, "rounds": args.rounds, "smoke": args.smoke,
                         "peak_tflops": peak_tflops(device_name(device), fast_settings()[
                             "precision"]) if device.type == "cuda" else None,
                         "goals": {"fit / bare": f">= {RATIO_GOAL}", "fit mfu": MFU_GOAL},
                         "models": results}, device=device, path=args.out or None)
    return results


if __name__ == "__main__":
    main()
