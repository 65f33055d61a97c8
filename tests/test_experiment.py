"""The experiment end to end over the stage store (issue: the experiment, never recompute)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_cli, write_idx_dataset

from lightning_lth.cli import main, make_cli
from lightning_lth.experiment.pipeline import Pipeline
from lightning_lth.module import LTHModule
from lightning_lth.sparsity.mask import Mask

NO_WANDB = {"WANDB_MODE": "disabled"}


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


def comparable(rows: list[dict]) -> list[tuple]:
    return sorted((r["method"], r["sparsity"], r["rewind_epoch"], r["test_acc"], r["test_loss"],
                   r["key"]) for r in rows)


def test_experiment_end_to_end_then_rerun_trains_nothing(tmp_path):
    config = tiny_config(tmp_path)
    store = tmp_path / "store"
    result = run_cli("experiment", "--config", config, cwd=tmp_path, env=NO_WANDB)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = records(store)
    assert len(rows) == 2 * 2 * 3  # sparsities x k x arms
    assert {r["method"] for r in rows} == {"lth", "naive", "permuted"}
    for row in rows:
        assert 0.0 <= row["test_acc"] <= 1.0 and row["dense_acc_a"] > 0.3
        assert row["barrier_loss_after"] <= row["barrier_loss_before"] + 1e-6
    computed = events(store)
    assert sorted(e["stage"] for e in computed) == sorted(
        ["dense", "dense", "imp", "match"] + ["arm"] * 12)
    masks = {r["key"]: store / "arm" / r["key"] / "mask.pt" for r in rows}
    assert all(path.is_file() for path in masks.values())

    stamps = {p: p.stat().st_mtime_ns for p in store.rglob("*.pt")}
    again = run_cli("experiment", "--config", config, cwd=tmp_path, env=NO_WANDB)
    assert again.returncode == 0, again.stderr[-3000:]
    assert events(store) == computed  # nothing computed again
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.pt")} == stamps
    assert records(store) == rows  # no duplicate records

    # The report over the results of this real experiment.
    report = run_cli("report", "--config", config, cwd=tmp_path, env=NO_WANDB)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (store / "report" / "report.md").read_text()
    assert "permuted" in table and "naive" in table
    pngs = list((store / "report").glob("*.png"))
    assert len(pngs) >= 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_one_cell_override_runs_only_that_arm(tmp_path):
    config = tiny_config(tmp_path)
    store = tmp_path / "store"
    result = run_cli("experiment", "--config", config, "--study.only.sparsity=0.8",
                     "--study.only.rewind_epoch=1", "--study.only.arm=permuted", cwd=tmp_path,
                     env=NO_WANDB)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = records(store)
    assert (row["method"], row["sparsity"], row["rewind_epoch"]) == ("permuted", 0.8, 1)
    assert [e["stage"] for e in events(store)].count("arm") == 1


@pytest.mark.parametrize("override, message", [
    ("--study.only.arm=random", "unknown arm 'random'"),
    ("--study.only.rewind_epoch=2", "rewind epoch 2 is not among the saved snapshots"),
    ("--study.rewind_epochs=[0,3]", "rewind epoch 3 leaves no sparse training"),
    ("--study.only.sparsity=0.9", "sparsity 0.9 is not among the IMP chain's targets"),
    ("--study.sparsities=[0.8,0.5]", "0.5"),
    ("--study.match.method=greedy", "unknown matching method 'greedy'"),
])
def test_bad_cells_fail_before_any_work(tmp_path, capsys, override, message):
    config = tiny_config(tmp_path)
    assert main(["experiment", "--config", str(config), override]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "store").exists()  # no work started


def _pipeline(config: Path, *overrides: str) -> Pipeline:
    return Pipeline(make_cli(["--config", str(config), *overrides], run=False))


def test_stage_keys_depend_on_exactly_their_settings(tmp_path):
    config = tiny_config(tmp_path)
    base = _pipeline(config).plan()

    def keys(*overrides):
        plan = _pipeline(config, *overrides).plan()
        cells = {(c.arm, c.sparsity, c.rewind_epoch): c.stage.key for c in plan.cells}
        return plan.dense_a.key, plan.dense_b.key, plan.imp.key, plan.match.key, cells

    dense_a, dense_b, imp_key, match_key, cells = keys()
    assert (dense_a, dense_b) == (base.dense_a.key, base.dense_b.key) and dense_a != dense_b
    # Unrelated to dense, IMP and matching: k, the sparse optimiser, W&B.
    for override in ("--study.rewind_epochs=[0,2]", "--study.sparse.lr=0.5",
                     "--study.wandb_project=other", "--study.only.arm=lth"):
        a, b, i, m, _ = keys(override)
        assert (a, b, i, m) == (dense_a, dense_b, imp_key, match_key), override
    # IMP changes with its own settings and targets, not the matching; matching the reverse.
    a, b, i, m, _ = keys("--study.prune.lr=0.02")
    assert (a, b, m) == (dense_a, dense_b, match_key) and i != imp_key
    a, b, i, m, _ = keys("--study.sparsities=[0.5,0.9]")
    assert (a, b, m) == (dense_a, dense_b, match_key) and i != imp_key
    a, b, i, m, _ = keys("--study.match.method=weight")
    assert (a, b, i) == (dense_a, dense_b, imp_key) and m != match_key
    # The dense settings change everything downstream.
    for override in ("--model.lr=0.1", "--seed_everything=1", "--trainer.max_epochs=4",
                     "--data.batch_size=32"):
        a, b, i, m, _ = keys(override)
        assert a != dense_a and i != imp_key and m != match_key, override
    # An arm's key: its own sparse lr changes it; the other arms' cells keep theirs.
    *_, sparse_cells = keys("--study.sparse.lr=0.5")
    assert all(sparse_cells[c] != cells[c] for c in cells)
    *_, fewer_cells = keys("--study.sparsities=[0.5,0.8]", "--study.rewind_epochs=[0,1]")
    assert fewer_cells == cells


def test_plan_lists_cells_without_training(tmp_path):
    config = tiny_config(tmp_path)
    result = run_cli("plan", "--config", config, cwd=tmp_path, env=NO_WANDB)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout[result.stdout.index("{"):])
    assert len(plan["cells"]) == 12 and {s["status"] for s in plan["stages"]} == {"missing"}
    assert not (tmp_path / "store" / "dense").exists()


def _wait_for(predicate, process, timeout=120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_kill_mid_stage_then_resume_gives_the_same_records(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    overrides = ["--study.only.rewind_epoch=1", "--study.sparsities=[0.5]",
                 "--study.arms=[lth,permuted]", "--trainer.max_epochs=5"]
    ref_config = tiny_config(reference_dir, n_train=1024)
    done = run_cli("experiment", "--config", ref_config, *overrides, cwd=reference_dir,
                   env=NO_WANDB, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    config = tiny_config(killed_dir, n_train=1024)
    store = killed_dir / "store"
    env = dict(os.environ, PYTHONPATH=str(REPO), **NO_WANDB)
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_lth", "experiment", "--config", str(config),
         *overrides], cwd=killed_dir, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    # Kill -9 once the first dense stage has a resume checkpoint but has not finished.
    mid_stage = _wait_for(lambda: any(store.glob("dense/*.partial/checkpoints/last.ckpt")),
                          process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert mid_stage, "the run ended before it could be killed mid-stage"
    assert list(store.glob("*/*.partial"))  # killed inside a stage, not between stages

    resumed = run_cli("experiment", "--config", config, *overrides, cwd=killed_dir, env=NO_WANDB,
                      timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert comparable(records(store)) == comparable(records(reference_dir / "store"))
    assert not list(store.glob("*/*.partial"))


def test_two_concurrent_runs_compute_each_stage_once(tmp_path):
    config = tiny_config(tmp_path, n_train=1024)
    env = dict(os.environ, PYTHONPATH=str(REPO), **NO_WANDB)
    command = [sys.executable, "-m", "lightning_lth", "prune", "--config", str(config)]
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs[0][1][-2000:]
    computed = [e["stage"] for e in events(tmp_path / "store")]
    assert sorted(computed) == ["dense", "imp"]  # dense A and its IMP chain, once each


def test_corrupt_artifact_is_detected_and_recomputed(tmp_path):
    config = tiny_config(tmp_path)
    store = tmp_path / "store"
    first = run_cli("prune", "--config", config, cwd=tmp_path, env=NO_WANDB)
    assert first.returncode == 0, first.stderr[-2000:]
    (dense_dir,) = [p for p in (store / "dense").iterdir() if p.is_dir()]
    final = dense_dir / "rewind" / "final.pt"
    original = final.read_bytes()
    final.write_bytes(original[:100] + b"corrupt" + original[107:])

    again = run_cli("prune", "--config", config, cwd=tmp_path, env=NO_WANDB)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "failed its checksums" in again.stderr + again.stdout
    assert [e["stage"] for e in events(store, "corrupt")] == ["dense"]
    assert [e["stage"] for e in events(store)].count("dense") == 2
    assert final.read_bytes() == original  # recomputed, same numbers (deterministic CPU)
    assert list((store / "dense").glob("*.corrupt-*"))  # the bad copy is kept aside


def test_prune_and_match_refuse_bad_inputs_before_any_work(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert main(["prune", "--config", str(config),
                 f"--study.weights_a={tmp_path / 'missing.pt'}"]) == 2
    assert "dense checkpoint not found" in capsys.readouterr().err
    wider = LTHModule(arch="mlp", width=2, num_classes=10, in_channels=1, image_size=28,
                      arch_kwargs={"hidden": [32, 32]}).net
    other = Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in wider.named_parameters()
                  if n.endswith("weight")}, {"model": "mlp", "width": 2})
    other.save(tmp_path / "other_mask.pt")
    assert main(["match", "--config", str(config),
                 f"--study.mask={tmp_path / 'other_mask.pt'}"]) == 2
    assert "mask was made for width=2" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_match_command_writes_pi_permuted_weights_mask_and_report(tmp_path):
    config = tiny_config(tmp_path)
    store = tmp_path / "store"
    assert main(["prune", "--config", str(config)]) == 0
    (mask_file,) = store.glob("imp/*/mask_0.8000.pt")
    assert main(["match", "--config", str(config), f"--study.mask={mask_file}"]) == 0
    (match_dir,) = [p for p in (store / "match").iterdir() if p.is_dir()]
    for name in ("perm.pt", "weights_a_permuted.pt", "connectivity.json", "interpolation.png"):
        assert (match_dir / name).is_file(), name
    curves = json.loads((match_dir / "connectivity.json").read_text())
    assert len(curves["naive"]["alphas"]) >= 11 and len(curves["matched"]["loss"]) >= 11
    mask, permuted = Mask.load(mask_file), Mask.load(match_dir / "mask_permuted.pt")
    assert permuted.layer_sparsity() == mask.layer_sparsity()
    assert any(not torch.equal(mask.tensors[n], permuted.tensors[n]) for n in mask.tensors)
