"""Replicates (study.replicates): one dense A and IMP chain, a dense B_r, its matching and
every arm per replicate r; replicate 0 is the study without replicates, key for key.

Plans are built from the real parsed configs; one tiny study is trained for real
(Fashion-MNIST-format data, the MLP): replicate 1 alone first, then the whole study, which
reuses what replicate 1 computed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from helpers import events, records, tiny_config

from lightning_lth.cli import main
from lightning_lth.experiment.plan import REPLICATE_SEED_STRIDE, b_seed
from lightning_lth.experiment.runner import Runner
from lightning_lth.grid.stage_graph import GridSpec, build_graph
from lightning_lth.io import load_json, load_tensors
from lightning_lth.parsing import make_cli
from lightning_lth.report.diversity import diversity
from lightning_lth.report.load import load_records
from lightning_lth.sparsity.mask import Mask


def runner(config: Path, *overrides: str) -> Runner:
    return Runner(make_cli(["--config", str(config), *overrides], run=False,
                           command="experiment"))


def names(stages) -> list[str]:
    return [stage.name for stage in stages]


@pytest.mark.quick
def test_no_two_seed_replicate_pairs_of_a_grid_share_a_dense_b_seed():
    """Over the seeds people use (0..2999 and a few large ones) and 8 replicates, every
    (seed, r) has its own B seed, and no B_r (r >= 1) is any of those A seeds; seeds up to a
    stride apart keep their B seeds apart."""
    used = [*range(3000), 12345, 99999, 10**6, 2**20]
    for offset in (1000, 1, -5, 7919):
        for seeds in (used, [*used, REPLICATE_SEED_STRIDE - 1]):
            b = {(seed, r): b_seed(seed, offset, r) for seed in seeds for r in range(8)}
            assert len(set(b.values())) == len(b)
        later = {b_seed(seed, offset, r) for seed in used for r in range(1, 8)}
        assert not later & set(used)
    assert b_seed(0, 1000, 0) == 1000  # replicate 0: the paper's B, seed + offset
    # the documented bound (docs/replicates.md): seeds a whole stride apart would collide
    assert b_seed(0, 1000, 1) == b_seed(REPLICATE_SEED_STRIDE, 1000, 0)


def test_a_study_with_replicates_plans_one_a_and_a_b_per_replicate(tmp_path):
    config = tiny_config(tmp_path, sparsities=[0.5], rewind_epochs=[1], replicates=2)
    study = runner(config)
    plan, one = study.plan(), runner(config, "--study.replicates=1").plan()
    stages, keys = names(plan.stages), {s.name: s.key for s in plan.stages}
    # replicate 0 is the study without replicates: the same stages under the same keys
    assert {s.name: s.key for s in one.stages}.items() <= keys.items()
    added = [name for name in stages if name not in names(one.stages)]
    assert added == ["dense B r1", "match r1", "arm lth S=0.5 k=1 r1", "arm naive S=0.5 k=1 r1",
                     "arm permuted S=0.5 k=1 r1"]
    assert stages.count("dense A") == 1 and len(plan.rounds) == len(one.rounds)
    b0, b1 = (rep.dense_b for rep in plan.replicates)
    assert (b0.seed, b1.seed) == (1000, b_seed(0, 1000, 1)) and b0.key != b1.key
    arms = {(arm.arm.name, arm.replicate): arm for arm in plan.arms}
    lth0, lth1 = arms["lth", 0], arms["lth", 1]
    assert lth0.init == lth1.init and lth0.round is lth1.round  # A's snapshot, A's mask
    assert lth0.order() != lth1.order()  # its own data order
    assert arms["naive", 1].init.stage.key == b1.key  # B_1's epoch-1 snapshot
    assert arms["permuted", 1].matching.b.stage.key == b1.key  # pi_1: from A to B_1
    assert arms["permuted", 1].matching.a == arms["permuted", 0].matching.a
    assert {arm.wandb_config(study)["replicate"] for arm in plan.arms} == {0, 1}
    # one replicate: only what it needs (dense A and the chain are everyone's)
    only = runner(config, "--study.only.replicate=1").plan()
    assert [n for n in names(only.stages) if not n.startswith("imp")] == [
        "dense A", "dense B r1", "match r1", "arm lth S=0.5 k=1 r1", "arm naive S=0.5 k=1 r1",
        "arm permuted S=0.5 k=1 r1"]
    assert {s.key for s in only.stages} <= set(keys.values())
    # early matching: each B_r trains only as far as pi_r reads it
    early = runner(config, "--study.match.epochs=[1]", "--study.arms=[lth]").plan()
    assert [rep.b_until for rep in early.replicates] == [1, 1]
    assert {"dense B to epoch 1", "dense B to epoch 1 r1"} <= set(names(early.stages))
    assert not {"dense B", "dense B r1"} & set(names(early.stages))


def test_replicates_train_and_record_and_one_replicate_runs_alone_first(tmp_path):
    config = tiny_config(tmp_path, sparsities=[0.5], rewind_epochs=[1], replicates=2)
    store = tmp_path / "store"
    named = {stage.key: stage.name for stage in runner(config).plan().stages}
    assert main(["experiment", "--config", str(config), "--study.only.replicate=1"]) == 0
    first = [named[e["key"]] for e in events(store) if e["stage"] != "imp"]
    assert first == ["dense A", "dense B r1", "match r1", "arm lth S=0.5 k=1 r1",
                     "arm naive S=0.5 k=1 r1", "arm permuted S=0.5 k=1 r1"]
    assert {row["replicate"] for row in records(store)} == {1}
    computed = len(events(store))
    assert main(["experiment", "--config", str(config)]) == 0
    second = [named[e["key"]] for e in events(store)[computed:]]  # replicate 1's are reused
    assert second == ["dense B", "match", "arm lth S=0.5 k=1", "arm naive S=0.5 k=1",
                      "arm permuted S=0.5 k=1"]
    rows = {(row["method"], row["replicate"]): row for row in records(store)}
    assert sorted(rows) == [(arm, r) for arm in ("lth", "naive", "permuted") for r in (0, 1)]
    kept, bad, notes = load_records(store / "results.jsonl")  # no replicate is a "rerun"
    assert (len(kept), bad, notes) == (6, [], [])
    assert rows["lth", 0]["dense_acc_b"] != rows["lth", 1]["dense_acc_b"]  # B_0, B_1
    arm = store / "arm"
    lth = [arm / rows["lth", r]["key"] for r in (0, 1)]
    masks = [Mask.load(folder / "mask.pt").tensors for folder in lth]  # A's IMP mask, both
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][name], masks[1][name]) for name in masks[0])
    weights = [load_tensors(folder / "final.pt")["state_dict"] for folder in lth]
    assert any(not torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    orders = {r: load_json(arm / rows["lth", r]["key"] / "result.json")["order_seed"]
              for r in (0, 1)}
    assert orders[0] != orders[1]

    # the report's diversity table from the stored outputs: each arm's two replicates, the
    # two dense B_r, one IMP solution (one seed)
    assert main(["report", "--config", str(config)]) == 0
    with open(store / "report" / "diversity.csv", newline="") as handle:
        table = {row["row"]: row for row in csv.DictReader(handle)}
    assert {row: int(table[row]["models"]) for row in table} == {
        "dense": 2, "imp": 1, "lth": 2, "naive": 2, "permuted": 2}
    for method in ("lth", "naive", "permuted"):
        outputs = [load_tensors(arm / rows[method, r]["key"] / "test_outputs.pt") for r in (0, 1)]
        expected = diversity([o["probs"] for o in outputs], [o["targets"] for o in outputs])
        assert [float(table[method][name]) for name in ("ensemble_acc", "disagreement", "js")
                ] == pytest.approx([expected.ensemble_acc, expected.disagreement, expected.js],
                                   abs=5e-7), method  # the CSV's rounding
        assert float(table[method]["test_acc_mean"]) == pytest.approx(
            (rows[method, 0]["test_acc"] + rows[method, 1]["test_acc"]) / 2, abs=5e-7)
    assert table["imp"]["disagreement"] == ""  # one model: no pairs


def test_a_grid_over_replicates_shares_a_and_the_imp_chain(tmp_path, capsys):
    config = tiny_config(tmp_path, sparsities=[0.5], rewind_epochs=[1], replicates=3)
    graph = build_graph(GridSpec(("--config", str(config)),
                                 {"study.only.replicate": [0, 1, 2]}))
    plan = graph.runners[0].plan()
    nodes = graph.nodes.values()
    assert len(graph.nodes) == len(plan.stages)  # each stage once
    by_name = {node.name: node for node in nodes}
    assert len(by_name) == len(graph.nodes)
    assert {"dense A", "dense B", "dense B r1", "dense B r2", "match", "match r1",
            "match r2", "arm permuted S=0.5 k=1 r2"} <= by_name.keys()
    shared = {by_name["dense A"].key, *(n.key for n in nodes if n.kind == "imp")}
    for cell in graph.cells:
        r = cell.params["study.only.replicate"]
        mine = {node.name for node in map(graph.nodes.get, cell.units)}
        assert shared <= set(cell.units)
        assert mine - {n.name for n in nodes if n.key in shared} == {
            name + (f" r{r}" if r else "") for name in (
                "dense B", "match", "arm lth S=0.5 k=1", "arm naive S=0.5 k=1",
                "arm permuted S=0.5 k=1")}
    for r in (1, 2):  # an arm waits for its own replicate's matching
        assert by_name[f"match r{r}"].key in by_name[f"arm lth S=0.5 k=1 r{r}"].needs
    assert main(["grid", "--config", str(config), "--vary", "study.only.replicate=[0,1,2]",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dense B r2" in out and "arm naive S=0.5 k=1 r1" in out


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("diversity_*.yaml")),
                         ids=lambda path: path.stem)
def test_each_diversity_config_plans_one_cell_of_replicates(path, tmp_path):
    """The diversity configs parse and plan (their callbacks agree with their study): one
    sparsity (0.9) and one k, R >= 3 replicates of the three arms."""
    plan = runner(path, f"--study.store={tmp_path / 'store'}").plan()
    study = yaml.safe_load(path.read_text())["study"]
    assert study["sparsities"] == [0.9] and len(study["rewind_epochs"]) == 1
    assert len(plan.replicates) == study["replicates"] >= 3
    assert sorted((arm.arm.name, arm.replicate) for arm in plan.arms) == sorted(
        (name, r) for name in ("lth", "naive", "permuted") for r in range(study["replicates"]))
