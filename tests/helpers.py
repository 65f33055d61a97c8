"""Helpers shared by several test modules (plain functions; fixtures live in conftest.py):
no test module imports another (tests/test_layers.py checks it).

- a whole tiny study: ``tiny_config`` and what a run leaves in its store (``events``,
  ``records``, ``results``, ``stage_outputs``), ``experiment`` (the CLI run, optionally killed
  at a fail point), ``assert_same`` (outputs equal, timing fields aside),
  ``rows_without_timing`` (result rows to compare across runs);
- ``kept_outputs``: every stage's kept test outputs, each checked against its stage;
- ``DEVICES``: cpu, and cuda where there is a CUDA device (``requires_cuda``, conftest.py);
- small nets in a generic state for the symmetry tests: ``MODELS``, ``make``,
  ``permuted_copy``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, write_idx_dataset

from lightning_lth.models import build_model
from lightning_lth.symmetry import apply_permutation
from lightning_lth.training.failpoints import KillSwitch

# A test's device cases: the CUDA one is listed as skipped where there is no CUDA device.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda("the cuda case"))]
NO_WANDB = {"WANDB_MODE": "disabled"}
IMP_ROUNDS = 8  # targets 0.5 and 0.8 with fraction 0.2: one shared chain of 8 rounds


def tiny_config(tmp_path: Path, n_train: int = 256, **study) -> Path:
    """A whole study on tiny Fashion-MNIST-format data: MLP 784-32-32-10, T = 3."""
    data_dir = write_idx_dataset(tmp_path / "data", "fashion_mnist", n_train=n_train, n_test=128)
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 3, "accelerator": "cpu", "deterministic": True,
                    "enable_model_summary": False},
        "model": {"arch": "mlp", "arch_kwargs": {"hidden": [32, 32]}, "lr": 0.05},
        "data": {"dataset": "fashion_mnist", "data_dir": str(data_dir), "batch_size": 64,
                 "download": False},
        "study": {"store": str(tmp_path / "store"), "sparsities": [0.5, 0.8],
                  "rewind_epochs": [0, 1], "prune": {"epochs_per_round": 1},
                  "match": {"interpolation_points": 11}, "wandb_mode": "disabled", **study},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def events(store: Path, kind: str = "compute") -> list[dict]:
    log = store / "events.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def records(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "results.jsonl").read_text().splitlines()]


VARYING = {"wall_time_s", "finished_at", "connectivity"}  # timing and path fields
SCRATCH = {"logs", "wandb", "checkpoints"}


def stage_outputs(store: Path) -> dict[str, object]:
    """Every output of every finished stage: tensors loaded, JSON parsed."""
    found = {}
    for path in sorted(store.glob("*/*/**/*")):
        relative = path.relative_to(store)
        stage_folder = relative.parts[1]
        if (not path.is_file() or "." in stage_folder.rsplit("-", 1)[-1]
                or SCRATCH & set(relative.parts) or path.name == "MANIFEST.json"):
            continue
        if path.suffix == ".pt":
            found[str(relative)] = torch.load(path, weights_only=True)
        elif path.suffix == ".json":
            found[str(relative)] = json.loads(path.read_text())
        else:
            found[str(relative)] = path.read_bytes() if path.suffix != ".png" else "png"
    return found


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a.keys() - VARYING:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)  # NaN equals NaN here


# float16 rounds each probability to within 2**-11 of itself (relative), subnormals below
# 2**-14 to within 2**-25, and a tied top class is rounded up one step (at most 2**-10 of
# itself, training/outputs.py): a row of C sums to 1 within 2**-11 + 2**-10 + C * 2**-25.
def row_sum_tolerance(classes: int) -> float:
    return 2**-11 + 2**-10 + classes * 2**-25


def kept_outputs(store: Path, labels: np.ndarray) -> dict[Path, dict]:
    """Every finished stage's test_outputs.pt by folder, each checked: float16 probabilities
    [N, C] whose rows sum to 1, the test set's ``labels`` in order, sealed in the stage's
    manifest, and as many argmax hits as the stage's recorded test accuracy counts."""
    found = {}
    for path in sorted(store.glob("*/*/test_outputs.pt")):
        folder = path.parent
        outputs = torch.load(path, weights_only=True)
        probs, targets = outputs["probs"], outputs["targets"]
        assert probs.dtype == torch.float16 and probs.shape[0] == len(labels), folder
        assert targets.dtype == torch.int64 and targets.tolist() == labels.tolist(), folder
        row_sums = probs.float().sum(1)
        assert float((row_sums - 1).abs().max()) <= row_sum_tolerance(probs.shape[1]), folder
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        assert path.name in manifest["files"], folder
        stored = json.loads((folder / ("result.json" if folder.parent.name == "arm"
                                       else "metrics.json")).read_text())
        hits = int((probs.argmax(1) == targets).sum())
        assert round(stored["test_acc"] * len(labels)) == hits, folder
        found[folder] = outputs
    return found


def results(store: Path) -> list[dict]:
    rows = [json.loads(line) for line in (store / "results.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda row: row["key"])


def experiment(folder: Path, *overrides: str, kill_at: str | None = None):
    env = dict(NO_WANDB, **({KillSwitch.ENV: kill_at} if kill_at else {}))
    return run_cli("experiment", "--config", folder / "study.yaml", "--trainer.enable_progress_bar=false",
                   *overrides, cwd=folder, env=env, timeout=600)


TIMING_AND_PATHS = ("wall_time_s", "finished_at", "connectivity")


def rows_without_timing(rows: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in row.items() if k not in TIMING_AND_PATHS} for row in rows),
                  key=lambda row: row["key"])


MODELS = {
    # name: (build kwargs, input shape used in tests)
    "mlp": (dict(in_channels=1, image_size=8, hidden=(32, 32, 32)), (1, 8, 8)),
    "resnet20": (dict(in_channels=3, image_size=32), (3, 16, 16)),  # fully conv: 16x16 is fine
    "vgg11": (dict(in_channels=3, image_size=32), (3, 32, 32)),
}


def make(name: str, seed: int = 0, width: int = 1, lively: bool = True):
    """A net in a generic, non-fresh state: BN running stats from random data, and biases
    nudged positive so that random data leaves no ReLU unit dead (a dead unit is constant on
    the data, so no matching can tell two of them apart)."""
    kwargs, shape = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(name, width, 10, **kwargs)
    with torch.no_grad():
        if lively:
            for key, param in model.named_parameters():
                if key.endswith("bias"):
                    param.add_(0.05 + 0.05 * torch.rand_like(param))
        model.train()
        model(torch.randn(8, *shape))  # BN running stats away from (0, 1)
    return model.eval()


def permuted_copy(model, spec, perm):
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(model.state_dict(), spec, perm))
    return other.eval()
