"""Kill -9 anywhere, rerun, and get an uninterrupted run's results tensor for tensor.

The kills are real SIGKILLs at chosen points (``LIGHTNING_LTH_KILL_AT``, the KillSwitch
callback), so every scenario is deterministic. Every process runs torch on one thread
(``run_cli``) with ``deterministic: true``: the comparisons are exact.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_same, events, experiment, results, stage_outputs, tiny_config

from lightning_lth.experiment.plan import build_plan
from lightning_lth.parsing import make_cli


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    tiny_config(folder)
    done = experiment(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "store"


def round_name(folder: Path, step: int) -> str:
    config = make_cli(["--config", str(folder / "study.yaml")], run=False).config.as_dict()
    (stage,) = [s for s in build_plan(config, lambda key: None).rounds if s.step == step]
    return stage.name


@pytest.mark.slow  # minutes: one kill per fail point; the fused, grid and SLURM kill tests stay in the default suite
def test_kill_anywhere_then_rerun_equals_an_uninterrupted_run(tmp_path, reference):
    tiny_config(tmp_path)  # T = 3 epochs of 4 batches; resume points after every step
    store = tmp_path / "store"
    kill_points = [  # in the order the study reaches them
        "dense A@0:0", "dense A@0:end", "dense A@1:2",  # the first step, between epochs, later
        "dense B@2:1",
        f"{round_name(tmp_path, 2)}@0:1",  # an IMP round
        "arm permuted S=0.5 k=1@0:2", "arm lth S=0.8 k=0@1:end",
    ]
    for point in kill_points:
        killed = experiment(tmp_path, "--study.resume.every_n_steps=1", kill_at=point)
        assert killed.returncode == -9, (point, killed.stderr[-3000:])
        assert list(store.glob("*/*.partial/checkpoints/last.ckpt")), point
        if point == "dense A@1:2":  # a write killed half-way leaves a temporary file
            (partial,) = store.glob("dense/*.partial")
            (partial / "rewind" / ".epoch_2.pt.x1y2.tmp").write_bytes(b"half a snapshot")
    finished = experiment(tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]

    resumed = events(store, "resume")  # each kill was resumed from its checkpoint, not redone
    assert len(resumed) == len(kill_points)
    assert all(event["global_step"] > 0 for event in resumed)
    assert [e["global_step"] for e in resumed][:3] == [1, 4, 7]  # dense A: 4 steps an epoch
    assert not list(store.glob("*/*.partial")) and not list(store.rglob("*.tmp"))
    assert_same(stage_outputs(reference), stage_outputs(store))
    assert_same(results(reference), results(store))
    assert len(results(store)) == 12


def test_a_rewind_epoch_added_later_is_a_snapshot_stage_equal_to_a_full_run(tmp_path,
                                                                            reference):
    """Dense nets are keyed without their snapshot epochs: adding k = 2 later trains a
    snapshot stage up to epoch 2 (never dense A or B again), and its snapshot is the one a
    dense run that saved epoch 2 holds."""
    cell = ["--study.rewind_epochs=[0,1,2]", "--study.only.rewind_epoch=2",
            "--study.only.sparsity=0.5", "--study.only.arm=lth"]
    extended = tmp_path / "extended"
    extended.mkdir()
    tiny_config(extended)
    shutil.copytree(reference, extended / "store")  # the finished study, as a user has it
    before = len(events(extended / "store"))
    done = experiment(extended, *cell)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [e["stage"] for e in events(extended / "store")[before:]] == ["snapshot", "arm"]
    (snapshot,) = (extended / "store" / "snapshot").glob("*-k2-*/rewind/epoch_2.pt")

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    tiny_config(fresh)
    done = experiment(fresh, *cell)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "snapshot" not in [e["stage"] for e in events(fresh / "store")]
    (dense_a,) = [p for p in (fresh / "store" / "dense").glob("*seed0-*") if p.is_dir()]
    assert_same(torch.load(snapshot, weights_only=True),
                torch.load(dense_a / "rewind" / "epoch_2.pt", weights_only=True))
    (record,) = results(fresh / "store")
    assert_same(record, {r["key"]: r for r in results(extended / "store")}[record["key"]])
