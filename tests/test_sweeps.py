"""The W&B sweep files: they parse, their grids have the paper's sizes, and every parameter
name reaches the CLI (each command resolved as `wandb agent` would, in plan mode)."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import yaml

from lightning_lth.cli import main

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
GRID_SIZES = {"resnet20_cifar10": 1296, "resnet20_cifar100": 1296, "vgg11_cifar10": 252,
              "demo_fmnist": 72}
# Phase 1 of each: one run per (width, seed) computing the shared stages, no arm.
GRID_SIZES.update({f"{name}_shared": size for name, size in (
    ("resnet20_cifar10", 12), ("resnet20_cifar100", 12), ("vgg11_cifar10", 3), ("demo_fmnist", 3))})


def load(name: str) -> dict:
    return yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())


def agent_argv(sweep: dict, params: dict) -> list[str]:
    """The command `wandb agent` runs: ${env} dropped, ${args} as --key=value."""
    argv = []
    for part in sweep["command"]:
        if part == "${env}":
            continue
        if part == "${args}":
            argv += [f"--{key}={value}" for key, value in params.items()]
        else:
            argv.append(part)
    return argv


@pytest.mark.quick
def test_every_sweep_file_is_listed():
    assert {p.stem for p in SWEEPS.glob("*.yaml")} == set(GRID_SIZES)


@pytest.mark.quick
@pytest.mark.parametrize("name", sorted(GRID_SIZES))
def test_sweep_grid_has_the_paper_size(name):
    sweep = load(name)
    assert sweep["method"] == "grid" and "${args}" in sweep["command"]
    sizes = [len(p["values"]) for p in sweep["parameters"].values()]
    assert math.prod(sizes) == GRID_SIZES[name]


@pytest.mark.parametrize("name", sorted(GRID_SIZES))
def test_sampled_cells_resolve_through_the_cli(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    sweep = load(name)
    keys = list(sweep["parameters"])
    grid = list(itertools.product(*(sweep["parameters"][k]["values"] for k in keys)))
    for values in [grid[0], grid[-1], *random.Random(0).sample(grid, 3)]:
        argv = agent_argv(sweep, dict(zip(keys, values, strict=True)))
        assert argv[:4] == ["python", "-m", "lightning_lth", "experiment"]
        # plan: the same parser and cell resolution as `experiment`, without training.
        code = main(["plan", "--json", *argv[4:], f"--study.store={tmp_path}",
                     "--trainer.accelerator=cpu", "--trainer.logger=false"])
        out = capsys.readouterr()
        assert code == 0, out.err[-2000:]
        plan = json.loads(out.out[out.out.index("{"):])
        if name.endswith("_shared"):
            assert plan["cells"] == []
            assert {s["stage"] for s in plan["stages"]} == {"dense", "imp", "match"}
            continue
        (cell,) = plan["cells"]
        params = dict(zip(keys, values, strict=True))
        assert cell["arm"].split("@")[0] == params["study.only.arm"]  # permuted@b1
        assert cell["sparsity"] == params["study.only.sparsity"]
        assert cell["rewind_epoch"] == params["study.only.rewind_epoch"]


def test_a_misspelt_sweep_parameter_is_caught(tmp_path, capsys):
    sweep = load("demo_fmnist")
    argv = agent_argv(sweep, {"study.only.sparsty": 0.9})
    assert main(["plan", *argv[4:], f"--study.store={tmp_path}"]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()  # one line, naming it
    assert error.startswith("error:") and "sparsty" in error
