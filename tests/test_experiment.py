"""The experiment end to end over the stage store (issue: the experiment, never recompute)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, class_images, run_cli
from helpers import IMP_ROUNDS, NO_WANDB, events, kept_outputs, records, tiny_config

from lightning_lth.cli import main
from lightning_lth.experiment.results import invalid
from lightning_lth.io import save_tensors
from lightning_lth.sparsity.mask import Mask
from lightning_lth.training.module import LTHModule


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
        assert row["barrier_loss_after_repair"] is None  # study.match.repair is off
    computed = events(store)
    assert sorted(e["stage"] for e in computed) == sorted(
        ["dense", "dense"] + ["imp"] * IMP_ROUNDS + ["match"] + ["arm"] * 12)
    assert len({r["config_hash"] for r in rows}) == 1 and all(r["num_threads"] == 1 for r in rows)
    # Data order: arms at the same k share one, distinct from each other k and dense A's.
    orders = {(r["method"], r["sparsity"], r["rewind_epoch"]):
              json.loads((store / "arm" / r["key"] / "result.json").read_text())["order_seed"]
              for r in rows}
    dense_orders = {json.loads(path.read_text())["order_seed"]
                    for path in store.glob("dense/*/metrics.json")}
    by_k = {k: {seed for (_, _, kk), seed in orders.items() if kk == k} for k in (0, 1)}
    assert all(len(seeds) == 1 for seeds in by_k.values())
    assert len(by_k[0] | by_k[1] | dense_orders) == 4
    masks = {r["key"]: store / "arm" / r["key"] / "mask.pt" for r in rows}
    assert all(path.is_file() for path in masks.values())
    # Kept test outputs: each dense net, the IMP round at each target and each arm; the
    # rounds between keep none. Each record names the stages it read, where they are.
    kept = kept_outputs(store, class_images(128, 10, (28, 28), 0)[1])
    targets = {row["stages"]["imp"] for row in rows}
    assert len(targets) == 2 and {f.parent.name for f in kept} == {"dense", "imp", "arm"}
    assert {f.name for f in kept if f.parent.name == "imp"} == targets
    assert {f.name for f in kept if f.parent.name == "arm"} == {r["key"] for r in rows}
    dense = {f.name for f in kept if f.parent.name == "dense"}
    assert len(dense) == 2 and {r["stages"]["dense_a"] for r in rows} < dense
    assert {r["stages"].get("dense_b") for r in rows} == (dense - {rows[0]["stages"]["dense_a"]}
                                                         ) | {None}  # LTH reads no B
    assert all((r["method"] == "lth") == ("dense_b" not in r["stages"]) for r in rows)
    assert all(r["test_acc_top5"] is None and invalid(r) is None for r in rows)  # 10 classes
    assert invalid({**rows[0], "stages": {"imp": 3}}).startswith("stages must be dict[str, str]")
    old = {k: v for k, v in rows[0].items() if k not in ("stages", "test_acc_top5")}
    assert invalid(old) is None  # records from before these fields

    stamps = {p: p.stat().st_mtime_ns for p in store.rglob("*.pt")}
    again = run_cli("experiment", "--config", config, cwd=tmp_path, env=NO_WANDB)
    assert again.returncode == 0, again.stderr[-3000:]
    assert events(store) == computed  # nothing computed again
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.pt")} == stamps
    assert records(store) == rows  # no duplicate records
    assert " start " not in again.stdout and "0 stages computed, 23 already done" in again.stdout

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
    # trainer settings a cluster user passes: no progress bar, no loggers, another root dir
    result = run_cli("experiment", "--config", config, "--study.only.sparsity=0.8",
                     "--study.only.rewind_epoch=1", "--study.only.arm=permuted",
                     "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path / 'elsewhere'}", cwd=tmp_path,
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
    ("--study.match.methods=[greedy]", "unknown matching method 'greedy'"),
    ("--study.match.method=weight", "study.match.method is now study.match.methods"),
    ("--study.match.epochs=[1,[1,4]]", "matching epochs must be in 0..trainer.max_epochs=3"),
    ("--study.match.epochs=[1,[3,1]]", "names the epoch pair (A 3, B 1) twice"),
    ("--study.only.match_epoch=2", "matching epoch 2 is not among study.match.epochs [3]"),
    ("--study.only.match_method=weight", "matching method 'weight' is not among"),
    ("--model.schedule_epochs=3", "model.schedule_epochs is for `fit`"),
    ("--model.width=1.5", 'Parser key "model.width"'),
    ("--trainer.max_epochs=two", "trainer.max_epochs=two is not allowed: expected int or null"),
    ("--study.wandb_mode=loud", "study.wandb_mode=loud is not allowed: expected one of auto"),
])
def test_bad_cells_fail_before_any_work(tmp_path, capsys, override, message):
    config = tiny_config(tmp_path)
    assert main(["experiment", "--config", str(config), override]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "store").exists()  # no work started


def test_plan_lists_cells_without_training(tmp_path):
    config = tiny_config(tmp_path)
    result = run_cli("plan", "--config", config, "--json", cwd=tmp_path, env=NO_WANDB)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout[result.stdout.index("{"):])
    assert len(plan["cells"]) == 12 and {s["status"] for s in plan["stages"]} == {"missing"}
    assert not (tmp_path / "store" / "dense").exists()


def test_plan_table_shows_status_epochs_and_time_measured_or_estimated(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert main(["plan", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["stage", "what", "status", "epochs", "time", "run"]
    assert len(lines) == 2 + 23 + 2
    assert all(line.split()[-2:] == ["?", "compute"] for line in lines[2:25])
    assert lines[-1] == ("total: 23 stages (0 done, 0 partial, 23 missing); 44 epochs, 44 to "
                         "train; time measured 0.0 s, estimated left ? (no epoch measured in "
                         "this store)")

    assert main(["prune", "--config", str(config)]) == 0  # dense A and the IMP rounds
    capsys.readouterr()
    assert main(["plan", "--config", str(config)]) == 0
    cells = [re.split(r"\s{2,}", line) for line in capsys.readouterr().out.splitlines()[2:25]]
    rows = {name: rest for name, *rest in cells}  # what, status, epochs, time, run
    assert rows["dense A"][1:3] == ["done", "3"] and re.fullmatch(r"\d+\.\d s", rows["dense A"][3])
    assert rows["dense A"][4] == "reuse"
    assert rows["dense B"][1:] == ["missing", "3", rows["dense B"][3], "compute"]
    assert rows["dense B"][3].startswith("~")  # estimated from dense A's measured epochs
    assert rows["match"][3] == "?"  # no stage of its kind measured, no epochs to go by
    assert rows["arm permuted S=0.8 k=1"][3].startswith("~")
    assert rows["imp round 3 S=0.4880"][0] == "prune to 12898/26432 zeros, then train with the mask"


def test_two_concurrent_runs_compute_each_stage_once(tmp_path):
    config = tiny_config(tmp_path, n_train=1024)
    env = dict(os.environ, PYTHONPATH=str(REPO), **NO_WANDB)
    command = [sys.executable, "-m", "lightning_lth", "prune", "--config", str(config)]
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs[0][1][-2000:]
    computed = [e["stage"] for e in events(tmp_path / "store")]
    assert sorted(computed) == ["dense"] + ["imp"] * IMP_ROUNDS  # dense A, its rounds: once


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


@pytest.mark.quick
def test_prune_and_match_refuse_bad_inputs_before_any_work(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert main(["prune", "--config", str(config),
                 f"--study.weights_a={tmp_path / 'missing.pt'}"]) == 2
    assert "study.weights_a not found" in capsys.readouterr().err
    wider = LTHModule(arch="mlp", width=2, num_classes=10, in_channels=1, image_size=28,
                      arch_kwargs={"hidden": [32, 32]}).net
    other = Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in wider.named_parameters()
                  if n.endswith("weight")}, {"model": "mlp", "width": 2})
    other.save(tmp_path / "other_mask.pt")
    assert main(["match", "--config", str(config),
                 f"--study.mask={tmp_path / 'other_mask.pt'}"]) == 2
    assert "mask was made for width=2" in capsys.readouterr().err
    weights = tmp_path / "wider" / "final.pt"
    save_tensors({"state_dict": wider.state_dict(), "epoch": 3, "meta": {}}, weights)
    assert main(["match", "--config", str(config), f"--study.weights_b={weights}"]) == 2
    assert "do not fit the model" in capsys.readouterr().err
    assert main(["experiment", "--config", str(config), f"--study.weights_a={weights}"]) == 2
    assert "are inputs of `prune` and `match`" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # no event, folder, lock or log left behind
    assert not list(tmp_path.rglob("lightning_logs"))


@pytest.mark.quick
def test_match_command_writes_pi_permuted_weights_mask_and_report(tmp_path):
    config = tiny_config(tmp_path)
    store = tmp_path / "store"
    assert main(["prune", "--config", str(config)]) == 0
    (mask_file,) = [folder / "mask.pt" for folder in store.glob("imp/*")
                    if folder.is_dir() and abs(json.loads((folder / "metrics.json")
                                                      .read_text())["sparsity"] - 0.8) < 1e-3]
    assert main(["match", "--config", str(config), f"--study.mask={mask_file}",
                 "--study.match.repair=true"]) == 0
    (match_dir,) = [p for p in (store / "match").iterdir() if p.is_dir()]
    for name in ("perm.pt", "weights_a_permuted.pt", "connectivity.json", "interpolation.png"):
        assert (match_dir / name).is_file(), name
    curves = json.loads((match_dir / "connectivity.json").read_text())
    assert len(curves["naive"]["alphas"]) >= 11 and len(curves["matched"]["loss"]) >= 11
    # the MLP has no BatchNorm: plain (the default) and REPAIR, which corrects both hidden layers
    assert curves["default"] == "plain" and list(curves["curves"]) == ["plain", "repair"]
    assert curves["curves"]["repair"]["matched"]["repaired"] == ["layers.0", "layers.2"]
    assert curves["about"]["bn_reset"].startswith("absent")
    mask, permuted = Mask.load(mask_file), Mask.load(match_dir / "mask_permuted.pt")
    assert permuted.layer_sparsity() == mask.layer_sparsity()
    assert any(not torch.equal(mask.tensors[n], permuted.tensors[n]) for n in mask.tensors)


def _rounds(store: Path) -> dict[float, Path]:
    """IMP round folders by their sparsity."""
    found = {}
    for folder in store.glob("imp/*"):
        if folder.is_dir() and not folder.name.endswith((".lock", ".partial")):
            found[json.loads((folder / "metrics.json").read_text())["sparsity"]] = folder
    return found


def test_imp_rounds_land_on_each_target_nested_and_chains_share_rounds(tmp_path, capsys):
    config = tiny_config(tmp_path, sparsities=[0.0, 0.5, 0.8])
    store = tmp_path / "store"
    assert main(["prune", "--config", str(config)]) == 0
    rounds = _rounds(store)
    (dense,) = [p for p in (store / "dense").iterdir() if p.is_dir()]
    # target 0.0: dense A itself, all weights kept, nothing trained
    zero = rounds[0.0]
    assert Mask.load(zero / "mask.pt").zeros == 0
    final = torch.load(dense / "rewind" / "final.pt", weights_only=True)["state_dict"]
    kept = torch.load(zero / "weights.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(kept[name], final[name]) for name in final)
    prunable = json.loads((zero / "metrics.json").read_text())["prunable"]
    previous = None
    for target in (0.5, 0.8):
        (folder,) = [f for s, f in rounds.items() if abs(s - target) < 1e-3]
        mask = Mask.load(folder / "mask.pt")
        assert mask.zeros == round(target * prunable)
        weights = torch.load(folder / "weights.pt", weights_only=True)["state_dict"]
        for name, keep in mask.tensors.items():
            assert bool((weights[name][~keep] == 0).all())
            if previous is not None:  # the shared chain's masks are nested
                assert not bool((keep & ~previous.tensors[name]).any())
        previous = mask
    printed = capsys.readouterr().out
    assert "prune: sparsity 0.5:" in printed and "prune: sparsity 0.8:" in printed

    # The authors' per-target chains: the chain to 0.5 is the shared chain's first rounds
    # (same history, same keys): only the chain to 0.8 trains new rounds.
    before = len(events(store))
    assert main(["prune", "--config", str(config), "--study.prune.chain=per_target"]) == 0
    new = [e for e in events(store)[before:]]
    shared_steps = len([s for s in rounds if 0 < s <= 0.5 + 1e-3])
    assert len(new) == IMP_ROUNDS - shared_steps + 1 and {e["stage"] for e in new} == {"imp"}


def test_every_stage_logs_to_wandb_offline_and_the_arm_summary_is_its_record(tmp_path):
    """One offline W&B run per stage, its id the stage key; the arm's run holds its record
    (W&B's offline format is binary: the record's values are looked up as their JSON text)."""
    config = tiny_config(tmp_path, wandb_mode="offline",
                         match={"interpolation_points": 11, "repair": True})
    store = tmp_path / "store"
    result = run_cli("experiment", "--config", config, "--study.only.sparsity=0.5",
                     "--study.only.rewind_epoch=1", "--study.only.arm=lth", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {path.name.split("-", 3)[3]: path for path in store.glob("wandb/wandb/offline-run-*")}
    stages = {path.name for kind in ("dense", "imp", "match", "arm")
              for path in (store / kind).iterdir() if path.is_dir()}
    assert set(runs) == stages and len(stages) == 2 + IMP_ROUNDS + 1 + 1
    (row,) = records(store)
    (log,) = runs[row["key"]].glob("run-*.wandb")
    for value in (row["test_acc"], row["barrier_loss_after"], row["config_hash"],
                  row["barrier_loss_after_repair"]):
        assert json.dumps(value).encode() in log.read_bytes(), value
    (match_key,) = [path.name for path in (store / "match").iterdir() if path.is_dir()]
    (log,) = runs[match_key].glob("run-*.wandb")
    for name in ("match/repair/matched_loss_barrier", "match/plain/naive_acc",
                 "match/matched_error_barrier"):
        assert name.encode() in log.read_bytes(), name
