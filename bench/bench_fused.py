"""Fused arms: one group of 12 arms (4 sparsities x 3 arms at one k) trained as one stacked
model vs the same 12 arms trained one after another, both through the real stage code.

The shared stages (dense A and B, the IMP chain, matching) are computed once into a store
(IMP rounds prune without retraining: they only supply the masks); two copies of it then
run ``experiment`` with ``study.fuse=12`` and ``study.fuse=1``, each timed from the command's
start to its end (every arm stage: trainer set-up, training, per-epoch evaluation, test,
saving). Check: every arm's test accuracy agrees within ``--acc-margin`` (over a whole
epoch the last-bit differences of the kernels grow, so the weights are reported, not
checked: ``tests/test_fused.py`` checks them after a few steps); the ratio is sequential
time / fused time (> 1: fused is faster).

    python bench/bench_fused.py                       # CPU: the demo MLP on Fashion-MNIST
    python bench/bench_fused.py --model resnet20 --synthetic --accelerator gpu --epochs 3

``--synthetic`` writes CIFAR-10-shaped random images in the real file format (a device
without network; ``--train-images`` / ``--test-images`` size it, small for a smoke run);
``compare()`` is the same as a function for a GPU suite. The numbers and their provenance go
to ``bench/results/fused_<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from common import timed, write_result

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "mlp": {"model": {"arch": "mlp", "lr": 0.08}, "dataset": "fashion_mnist"},
    "resnet20": {"model": {"arch": "resnet20", "width": 1, "lr": 0.08}, "dataset": "cifar10"},
}


def synthetic_cifar(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random CIFAR-10 images and labels in torchvision's ``cifar-10-batches-py`` format (five
    training batches, a test batch, the label names); returns the data_dir. Their md5 sums
    are not the real files', so torchvision's check of them is bypassed in this process."""
    import torchvision.datasets.cifar as tv_cifar

    rng = np.random.default_rng(seed)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)

    def write(name: str, count: int) -> None:
        rows = rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count).tolist()
        with open(batches / name, "wb") as handle:
            pickle.dump({"data": rows, "labels": labels}, handle)

    for number, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        write(f"data_batch_{number}", len(part))
    write("test_batch", n_test)
    with open(batches / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class_{i}" for i in range(10)]}, handle)
    tv_cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
    return folder


def study_config(folder: Path, model: str, data_dir: str, epochs: int, accelerator: str) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": epochs, "accelerator": accelerator, "devices": 1,
                    "deterministic": accelerator == "cpu", "enable_model_summary": False,
                    "enable_progress_bar": False},
        "model": MODELS[model]["model"],
        "data": {"dataset": MODELS[model]["dataset"], "data_dir": data_dir,
                 "batch_size": 128},
        "study": {"store": str(folder / "store"), "sparsities": [0.8, 0.9, 0.95, 0.97],
                  "rewind_epochs": [1], "prune": {"epochs_per_round": 1},
                  "wandb_mode": "disabled"},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(*args: str) -> float:
    from lightning_lth.cli import main

    seconds, code = timed(lambda: main(list(args)))
    if code:
        raise SystemExit(f"{' '.join(args)} exited with {code}")
    return seconds


def _arms(store: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (store / "results.jsonl").read_text().splitlines()]
    return {row["key"]: row for row in rows}


def compare(model: str = "mlp", data_dir: str = "data", epochs: int = 2,
            accelerator: str = "cpu", synthetic: bool = False, acc_margin: float = 0.005,
            train_images: int = 5000, test_images: int = 1000) -> dict:
    """Time the fused group and the 12 arms one after another; check they agree."""
    folder = Path(tempfile.mkdtemp(prefix="bench_fused_"))
    try:
        if synthetic:
            data_dir = str(synthetic_cifar(folder / "data", train_images, test_images))
        config = study_config(folder, model, data_dir, epochs, accelerator)
        base = ["--config", str(config)]
        _run("prune", *base)  # dense A and the IMP chain
        _run("match", *base)  # dense B and matching
        stores = {}
        for fuse in (12, 1):
            stores[fuse] = folder / f"store_{fuse}"
            shutil.copytree(folder / "store", stores[fuse])
        seconds = {fuse: _run("experiment", *base, f"--study.store={stores[fuse]}",
                              f"--study.fuse={fuse}") for fuse in (12, 1)}
        fused, alone = _arms(stores[12]), _arms(stores[1])
        assert fused.keys() == alone.keys() and len(fused) == 12
        weight_gap = acc_gap = 0.0
        for key, row in fused.items():
            assert row["fused"] == 12 and alone[key]["fused"] == 1
            acc_gap = max(acc_gap, abs(row["test_acc"] - alone[key]["test_acc"]))
            a = torch.load(stores[12] / "arm" / key / "final.pt", weights_only=True)
            b = torch.load(stores[1] / "arm" / key / "final.pt", weights_only=True)
            weight_gap = max(weight_gap, max(float((a["state_dict"][n] - b["state_dict"][n])
                                                   .abs().max()) for n in a["state_dict"]))
        return {"model": model, "accelerator": accelerator, "arm_epochs": epochs - 1,
                "fused_s": seconds[12], "sequential_s": seconds[1],
                "ratio": seconds[1] / seconds[12], "max_weight_gap": weight_gap,
                "max_test_acc_gap": acc_gap,
                "check_passed": acc_gap <= acc_margin}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=2, help="T; the arms rewind to k = 1")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--acc-margin", type=float, default=0.005)
    parser.add_argument("--train-images", type=int, default=5000,
                        help="with --synthetic: training images written")
    parser.add_argument("--test-images", type=int, default=1000,
                        help="with --synthetic: test images written")
    args = parser.parse_args()
    result = compare(args.model, args.data_dir, args.epochs, args.accelerator, args.synthetic,
                     args.acc_margin, args.train_images, args.test_images)
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))
    write_result("fused", result, device="cuda" if args.accelerator == "gpu" else "cpu")
    if not result["check_passed"]:
        raise SystemExit("fused and sequential arms disagree beyond the stated tolerance")


if __name__ == "__main__":
    main()
