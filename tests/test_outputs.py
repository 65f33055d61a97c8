"""Kept test outputs (training/outputs.py) and top-5 accuracy (training/epoch_sums.py): the
switch that turns them off changes no key, a store without them gets them from its stored
weights, and a 100-class dataset records top-5 at every stage. The outputs of a whole study
(dense, IMP, arms) are checked in tests/test_experiment.py, fused members against their
alone runs in tests/test_fused.py, DDP ranks against one process in tests/test_ddp.py."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import class_images, write_cifar_dataset
from helpers import events, kept_outputs, records, tiny_config

from lightning_lth.cli import main
from lightning_lth.errors import LTHError
from lightning_lth.experiment.plan import build_plan
from lightning_lth.experiment.store import Store
from lightning_lth.parsing import make_cli
from lightning_lth.training.epoch_sums import EpochSums
from lightning_lth.training.outputs import interleave


@pytest.mark.quick
def test_top5_counts_a_label_among_the_five_largest_logits_and_every_top1_hit():
    logits = torch.tensor([
        [9., 1., 2., 3., 4., 5., 6.],  # label 0: the largest            top-1 and top-5
        [1., 2., 7., 6., 9., 3., 0.],  # label 3: third largest          top-5 only
        [1., 2., 3., 4., 5., 6., 7.],  # label 2: fifth largest          top-5 only
        [1., 2., 3., 4., 5., 6., 7.],  # label 1: sixth largest          neither
        [0., 0., 0., 0., 0., 0., 0.],  # label 0: a 7-way tie, argmax 0  top-1 and top-5
    ])
    labels = torch.tensor([0, 3, 2, 1, 0])
    loss = F.cross_entropy(logits, labels)
    with_top5, plain = EpochSums(top5=True), EpochSums()
    for sums in (with_top5, plain):
        sums.update(logits[:2], labels[:2], F.cross_entropy(logits[:2], labels[:2]))
        sums.update(logits[2:], labels[2:], F.cross_entropy(logits[2:], labels[2:]))
    values, without = with_top5.compute(), plain.compute()
    assert float(values["acc"]) == pytest.approx(2 / 5) and float(values["acc_top5"]) == \
        pytest.approx(4 / 5)
    assert set(without) == {"acc", "loss"}  # below 100 classes: no top-5
    assert torch.equal(values["acc"], without["acc"]) and torch.equal(values["loss"], without["loss"])
    assert float(values["loss"]) == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.quick
def test_ranks_shards_interleave_back_into_the_test_sets_order():
    # 7 images over 3 ranks: rank r evaluated r, r + 3, ...; ranks 1 and 2 are padded by one
    shards = [[0, 3, 6], [1, 4], [2, 5]]
    rows = torch.tensor([shard + [-1] * (3 - len(shard)) for shard in shards])
    assert interleave(rows, [3, 2, 2]).tolist() == list(range(7))
    with pytest.raises(LTHError, match=r"ranks hold \[2, 3, 2\] images, not the shards"):
        interleave(rows, [2, 3, 2])


def plan_keys(config, *overrides: str) -> dict[str, str]:
    parsed = make_cli(["--config", str(config), *overrides], run=False).config.as_dict()
    return {stage.name: stage.key for stage in build_plan(parsed, lambda key: None).stages}


def small_study(tmp_path, **study) -> dict:
    """The tiny study at T = 2, one sparsity in one IMP round, k = 1: dense A and B, the
    round, a match, the arms. Returns the config (``write`` saves it)."""
    path = tiny_config(tmp_path, n_train=128, sparsities=[0.5], rewind_epochs=[1],
                       prune={"epochs_per_round": 1, "fraction": 0.5}, **{"fuse": 1, **study})
    config = yaml.safe_load(path.read_text())
    config["trainer"]["max_epochs"] = 2
    return config


def write(tmp_path, config: dict):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_keep_outputs_off_keeps_none_and_experiment_adds_them_from_stored_weights(tmp_path):
    config = write(tmp_path, small_study(tmp_path, arms=["naive"]))
    store = tmp_path / "store"
    off = "--study.keep_outputs=false"
    assert plan_keys(config, off) == plan_keys(config)  # not keyed: it changes no number
    assert main(["experiment", "--config", str(config), off]) == 0
    assert not list(store.rglob("test_outputs.pt"))
    computed = events(store)

    # The default run over that store: no stage trains again; dense A, B, the target round
    # and the arm get their outputs from a test pass of their stored weights, sealed.
    assert main(["experiment", "--config", str(config)]) == 0
    assert events(store) == computed
    kept = kept_outputs(store, class_images(128, 10, (28, 28), 0)[1])
    (row,) = records(store)
    assert {(f.parent.name, f.name) for f in kept} == {
        ("dense", row["stages"]["dense_a"]), ("dense", row["stages"]["dense_b"]),
        ("imp", row["stages"]["imp"]), ("arm", row["key"])}
    assert len(events(store, "added")) == 4 and all(Store.intact(folder) for folder in kept)
    assert main(["experiment", "--config", str(config)]) == 0
    assert len(events(store, "added")) == 4  # kept now: nothing added again


def test_a_100_class_dataset_records_top5_at_every_stage_fused_arms_too(
        tmp_path, allow_unverified_cifar):
    data = write_cifar_dataset(tmp_path / "cifar", "cifar100", n_train=200, n_test=100)
    config = small_study(tmp_path, arms=["lth", "naive"], fuse=2)
    config["data"].update(dataset="cifar100", data_dir=str(data))
    path = write(tmp_path, config)
    store = tmp_path / "store"
    assert main(["experiment", "--config", str(path)]) == 0

    rows = records(store)
    assert len(rows) == 2 and {row["fused"] for row in rows} == {2}
    kept = kept_outputs(store, class_images(100, 100, (32, 32, 3), 0)[1])
    assert len(kept) == 2 + 1 + 2  # dense A and B, the target round, the arms
    stored = [json.loads(p.read_text()) for kind in ("dense", "imp")
              for p in store.glob(f"{kind}/*/metrics.json")]
    stored += [json.loads((store / "arm" / row["key"] / "result.json").read_text())
               for row in rows]
    assert len(stored) == 2 + 1 + 2 and rows[0]["test_acc_top5"] is not None
    for values in stored + rows:
        assert 0 <= values["test_acc"] <= values["test_acc_top5"] <= 1
    assert any(values["test_acc_top5"] > values["test_acc"] for values in stored)
    for folder, outputs in kept.items():  # top-5 of the kept probabilities: the stage's own
        hits = (outputs["probs"].float().topk(5).indices == outputs["targets"][:, None]).any(1)
        top5 = json.loads((folder / ("result.json" if folder.parent.name == "arm"
                                     else "metrics.json")).read_text())["test_acc_top5"]
        assert math.isclose(float(hits.double().mean()), top5, abs_tol=1e-6)
    with open(next(store.glob("dense/*/logs/metrics.csv"))) as handle:
        assert "test/acc_top5" in next(csv.reader(handle))
