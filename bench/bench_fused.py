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

``--synthetic`` writes CIFAR-10-shaped data in the real file format (a device without
network); ``compare()`` is the same as a function for a GPU suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "mlp": {"model": {"arch": "mlp", "lr": 0.08}, "dataset": "fashion_mnist"},
    "resnet20": {"model": {"arch": "resnet20", "width": 1, "lr": 0.08}, "dataset": "cifar10"},
}


def synthetic_cifar(folder: Path, n_train: int, n_test: int) -> Path:
    """CIFAR-10 batches in the real format, not the real images: torchvision's md5 check
    is bypassed for them in this process (as in the tests' ``allow_unverified_cifar``)."""
    import torchvision.datasets.cifar as tv_cifar

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_cifar_dataset

    tv_cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
    return write_cifar_dataset(folder, "cifar10", n_train=n_train, n_test=n_test)


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
                  "rewind_epochs": [1], "prune": {"epochs_per_round": 0},
                  "wandb_mode": "disabled"},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(*args: str) -> float:
    from lightning_lth.cli import main

    started = time.perf_counter()
    code = main(list(args))
    if code:
        raise SystemExit(f"{' '.join(args)} exited with {code}")
    return time.perf_counter() - started


def _arms(store: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (store / "results.jsonl").read_text().splitlines()]
    return {row["key"]: row for row in rows}


def compare(model: str = "mlp", data_dir: str = "data", epochs: int = 2,
            accelerator: str = "cpu", synthetic: bool = False, acc_margin: float = 0.005
            ) -> dict:
    """Time the fused group and the 12 arms one after another; check they agree."""
    folder = Path(tempfile.mkdtemp(prefix="bench_fused_"))
    try:
        if synthetic:
            data_dir = str(synthetic_cifar(folder / "data", 5000, 1000))
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
    args = parser.parse_args()
    result = compare(args.model, args.data_dir, args.epochs, args.accelerator, args.synthetic,
                     args.acc_margin)
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))
    if not result["check_passed"]:
        raise SystemExit("fused and sequential arms disagree beyond the stated tolerance")


if __name__ == "__main__":
    main()
