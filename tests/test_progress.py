"""The study's progress view: the ETA from measured epochs, the plain log of a study without
a terminal (one line per stage start and end), the live view's contents, quiet logs."""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import lightning as L
import pytest
from conftest import run_cli
from helpers import IMP_ROUNDS, tiny_config
from rich.console import Console

from lightning_lth.experiment.progress import (
    LiveProgress,
    PlainProgress,
    silence_known_noise,
    watch,
)


@dataclass(frozen=True)
class FakeStage:
    kind: str
    name: str
    epochs: int

    @property
    def key(self) -> str:
        return self.name


STAGES = [FakeStage("dense", "dense A", 3), FakeStage("dense", "dense B", 3),
          FakeStage("imp", "imp round 1", 1), FakeStage("imp", "imp round 2", 1),
          FakeStage("match", "match", 0), FakeStage("arm", "arm lth", 2),
          FakeStage("arm", "arm permuted", 2)]
EPOCH_SECONDS = {"dense": 2.0, "imp": 0.5, "arm": 1.0}
MATCH_SECONDS = 4.0


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_run(view, clock: FakeClock, stages, after_epoch=lambda stage, epoch: None):
    """What the runner and EpochClock tell the view, with known epoch times."""
    for stage in stages:
        view.started(stage)
        for epoch in range(stage.epochs):
            clock.now += EPOCH_SECONDS[stage.kind]
            view.epoch_done(stage, EPOCH_SECONDS[stage.kind])
            after_epoch(stage, epoch)
        if stage.epochs == 0:
            clock.now += MATCH_SECONDS
        view.finished(stage)


@pytest.mark.quick
def test_eta_from_a_fake_runner_with_known_epoch_times():
    clock, out = FakeClock(), io.StringIO()
    view = PlainProgress("experiment", STAGES, clock=clock, out=out)
    assert view.planned == 12 and view.eta() is None  # nothing measured yet
    seen = {}

    def after_epoch(stage, epoch):
        seen[(stage.name, epoch)] = (view.epochs_done, view.eta())

    fake_run(view, clock, STAGES[:4], after_epoch)
    # dense A's first epoch: 2 s per epoch for every kind until another kind is measured;
    # 11 epochs left
    assert seen[("dense A", 0)] == (1, pytest.approx(22.0))
    assert seen[("dense B", 0)] == (4, pytest.approx(16.0))  # 2 + 2 + 4 epochs at 2 s
    # imp measured at 0.5 s/epoch; arms, unmeasured, at the mean of all epochs so far
    mean = (6 * 2.0 + 0.5) / 7
    assert seen[("imp round 1", 0)] == (7, pytest.approx(0.5 + 4 * mean))
    assert view.eta() == pytest.approx(4 * 13.0 / 8)  # the match counts 0 until timed
    fake_run(view, clock, STAGES[4:6])
    assert view.eta() == pytest.approx(2 * 1.0)  # arms measured: 1 s per epoch
    assert view.epochs_done == 10
    fake_run(view, clock, STAGES[6:])
    assert view.eta() == 0.0 and view.epochs_done == 12
    lines = out.getvalue().splitlines()
    assert lines[1] == "[1/7] done  dense A in 6.0 s; epochs 3/12, ETA 18.0 s"
    assert lines[9] == "[5/7] done  match in 4.0 s; epochs 8/12, ETA 6.5 s"


def fake_runner(status: dict[str, str] | None = None, runs=()):
    status = status or {}
    return SimpleNamespace(
        dist=SimpleNamespace(is_writer=True), show_steps=True, view=None,
        store=SimpleNamespace(root="/store", status=lambda s: status.get(s.key, "missing")),
        tracking=SimpleNamespace(runs=list(runs)))


@pytest.mark.quick
def test_plain_log_is_a_header_a_line_per_stage_start_and_end_and_a_footer(capsys):
    clock = FakeClock()
    runner = fake_runner({"dense A": "done"}, runs=["/store/wandb/wandb/offline-run-1/"])
    with watch(runner, "experiment", STAGES) as view:
        view.clock = clock
        fake_run(view, clock, STAGES[1:])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("experiment: 7 stages, 12 epochs planned; 1 stages (3 epochs) "
                        "already done; store /store")
    assert [line.split()[1:3] for line in lines[1:13]] == [
        [word, stage.name.split()[0]] for stage in STAGES[1:] for word in ("start", "done")]
    assert lines[1] == "[2/7] start dense B (3 epochs)"
    assert lines[5] == "[4/7] start imp round 2 (1 epoch)"
    assert lines[7] == "[5/7] start match"
    assert re.fullmatch(r"experiment: finished in .*; 6 stages computed, 1 already done, "
                        r"epochs 12/12", lines[13])
    assert lines[14:] == ["W&B: 1 runs", "  1 offline in /store/wandb/wandb; upload with: "
                          "wandb sync /store/wandb/wandb/offline-run-*"]

    runner = fake_runner()
    with pytest.raises(RuntimeError), watch(runner, "prune", STAGES[:2]) as view:
        view.started(STAGES[0])
        raise RuntimeError("disk full")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1] == "[1/2] start dense A (3 epochs)"
    assert re.fullmatch(r"prune: stopped after .* in dense A \(RuntimeError\); 0 stages "
                        r"computed, epochs 0/6", lines[2])


def test_live_view_shows_stages_the_running_stage_epochs_steps_and_eta():
    clock = FakeClock()
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    view = LiveProgress("experiment", STAGES, {"dense A"}, store="/store", clock=clock,
                        console=console)
    view.started(STAGES[1])
    clock.now += 2.0
    view.epoch_done(STAGES[1], 2.0)
    view.step(STAGES[1], 5, 8)
    console.print(view.render())
    text = re.sub(r"\x1b\[[0-9;]*m", "", console.file.getvalue())
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert rows["dense"] == ["1", "1", "4/6"]  # done, running, epochs done / planned
    assert rows["arm"] == ["2", "0/4"]  # waiting
    assert "running dense B" in text and "epoch 2/3" in text and "step 5/8" in text
    assert "epochs 4/12" in text and "ETA 16.0 s" in text  # 8 epochs left at 2 s


def srun_on_path(tmp_path) -> str:
    """PATH with an `srun` first (a stand-in: Lightning only looks for it), as on any
    machine where SLURM is installed."""
    tools = tmp_path / "slurm-bin"
    tools.mkdir(exist_ok=True)
    (tools / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tools / "srun").chmod(0o755)
    return f"{tools}{os.pathsep}{os.environ['PATH']}"


def srun_hints(silenced: bool) -> list[str]:
    """Lightning's hints to launch with srun as a Trainer is made (after the CLI's noise
    filter when ``silenced``)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # pytest's own filters aside
        if silenced:
            silence_known_noise()
        L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    return [str(w.message) for w in seen if "`srun` command is available" in str(w.message)]


def test_lightning_hints_srun_where_it_is_installed_and_the_noise_filter_drops_it(
        tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", srun_on_path(tmp_path))
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)  # not inside a SLURM job
    assert len(srun_hints(silenced=False)) == 1  # what each stage of a study printed
    assert srun_hints(silenced=True) == []


def test_study_log_without_a_terminal_has_one_line_per_stage_start_and_end(tmp_path):
    """A tiny study with W&B offline, stdout a pipe: a header, one start and one end line per
    stage, the results line, a footer, the W&B runs once; no per-stage noise anywhere."""
    config = tiny_config(tmp_path)
    result = run_cli("experiment", "--config", config, cwd=tmp_path,
                     env={"WANDB_MODE": "offline", "PATH": srun_on_path(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    stages = 2 + IMP_ROUNDS + 1 + 12
    starts = [line for line in lines if re.match(r"\[ ?\d+/23\] start ", line)]
    ends = [line for line in lines if re.match(r"\[ ?\d+/23\] done  .* in .*; epochs "
                                               r"\d+/44, ETA ", line)]
    assert len(starts) == len(ends) == stages
    names = [line.split(" start ")[1].split(" (")[0] for line in starts]
    assert len(set(names)) == stages
    assert [line.split(" done  ")[1].split(" in ")[0] for line in ends] == names
    assert lines[0].startswith("experiment: 23 stages, 44 epochs planned; 0 stages")
    assert lines[2 * stages + 1].startswith("experiment: 12 arm results in ")
    assert lines[2 * stages + 2].startswith("experiment: finished in ")
    assert lines[2 * stages + 3:] == [
        "W&B: 23 runs", f"  23 offline in {tmp_path}/store/wandb/wandb; upload with: wandb "
        f"sync {tmp_path}/store/wandb/wandb/offline-run-*"]
    assert len(lines) == 1 + 2 * stages + 2 + 2
    for noise in ("wandb:", "LeafSpec", "tensorboardX", "litlogger", "Tip:", "weights_only",
                  "GPU available", "Seed set to", "fixed mask", "Epoch ", "Testing", "srun"):
        assert noise not in result.stdout + result.stderr, noise
