"""The W&B sweep files: they parse, their grids have the paper's sizes, and every parameter
name reaches the CLI (each command resolved as `wandb agent` would, in plan mode). And the
configs no sweep runs: each is planned by a test."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import yaml

from lightning_lth.cli import main

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
CONFIGS = REPO / "configs"
# Configs no sweep file runs, and the test that plans each.
PLANNED_ALONE = {"resnet50_imagenet": "tests/test_imagenet.py",
                 "resnet20_svhn": "test_svhn_config_plans_the_rebuttal_setting",
                 "early_matching_resnet20_cifar10": "test_early_matching_config_plans_the_"
                                                    "rebuttal_table",
                 **{f"diversity_{name}": "tests/test_replicates.py" for name in (
                     "demo_fmnist", "resnet20_cifar10", "resnet20_cifar100")}}
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


@pytest.mark.quick
def test_every_config_is_planned_by_a_test():
    """Each study config is a sweep's (planned above) or one of PLANNED_ALONE."""
    swept = {part for path in SWEEPS.glob("*.yaml") for part in yaml.safe_load(
        path.read_text())["command"] if part.startswith("configs/")}
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == {
        Path(name).stem for name in swept} | set(PLANNED_ALONE)


def plan_json(config: str, store: Path, capsys, *extra: str) -> dict:
    code = main(["plan", "--json", "--config", str(CONFIGS / config), f"--study.store={store}",
                 "--trainer.accelerator=cpu", "--trainer.logger=false", *extra])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    return json.loads(out.out[out.out.index("{"):])


def test_svhn_config_plans_the_rebuttal_setting(tmp_path, capsys):
    """No data needed to plan: naive and permuted at k = 10 and 20, four sparsities, on
    ResNet20x1 SVHN (10 classes, 3 channels: the dataset table's)."""
    plan = plan_json("resnet20_svhn.yaml", tmp_path, capsys)
    cells = {(c["arm"], c["sparsity"], c["rewind_epoch"]) for c in plan["cells"]}
    assert cells == set(itertools.product(["naive", "permuted"], [0.8, 0.9, 0.95, 0.97],
                                          [10, 20]))
    assert all(s["key"].startswith("resnet20-w1-svhn-seed") for s in plan["stages"])
    assert not list(tmp_path.iterdir())  # a plan writes nothing


def test_early_matching_config_plans_the_rebuttal_table(tmp_path, capsys):
    """k = 20, pi from B at 5, 20, 50, 100 and 200 (T: the paper's `permuted`); every stage
    but the early matchings and their arms is one of configs/resnet20_cifar10.yaml's (its
    store's dense nets, IMP chain, matching and k = 20 arms are reused)."""
    plan = plan_json("early_matching_resnet20_cifar10.yaml", tmp_path, capsys)
    early = ["permuted@b5", "permuted@b20", "permuted@b50", "permuted@b100"]
    cells = {(c["arm"], c["sparsity"], c["rewind_epoch"]) for c in plan["cells"]}
    assert cells == set(itertools.product(["lth", "naive", "permuted", *early],
                                          [0.8, 0.9, 0.95, 0.97], [20]))
    matches = [s["name"] for s in plan["stages"] if s["stage"] == "match"]
    assert sorted(matches) == sorted(["match", "match@b5", "match@b20", "match@b50",
                                      "match@b100"])
    paper = {s["key"] for s in plan_json("resnet20_cifar10.yaml", tmp_path, capsys)["stages"]}
    own = {s["key"] for s in plan["stages"] if "@b" not in s["name"]}
    assert own <= paper and len(own) == len(plan["stages"]) - 4 - 4 * len(early)
