"""Bad input, as a new user gives it: each class is refused by the real CLI (in-process) with
one line ``error: ...`` naming the value and what is allowed, exit code 2, before any work:
the folder it ran in is exactly as it was (no store, lock, event log, lightning_logs or report
folder; no file touched)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_idx_dataset
from torch import nn

from lightning_lth.cli import main
from lightning_lth.parsing import COMMANDS


class ChannelConcat(nn.Module):
    """A user's model whose forward concatenates two branches along the feature axis: no
    derivable permutation spec (one spec axis carries one group)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        features = in_channels * image_size * image_size
        self.left, self.right = nn.Linear(features, 8), nn.Linear(features, 8)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.cat([self.left(x).relu(), self.right(x).relu()], dim=1))


class ThreeScores(nn.Module):
    """A user's model with 3 outputs, on a 10-class dataset."""

    def __init__(self, in_channels: int, image_size: int):
        super().__init__()
        self.head = nn.Linear(in_channels * image_size * image_size, 3)

    def forward(self, x):
        return self.head(x.flatten(1))


@pytest.fixture
def study(tmp_path, monkeypatch) -> Path:
    """A tiny study config (MLP 784-8-10, T = 2) in the current folder, with its data."""
    data_dir = write_idx_dataset(tmp_path / "data", "fashion_mnist", n_train=64, n_test=32)
    # unpacked, as torchvision's first load leaves them: loading writes nothing
    for packed in (data_dir / "FashionMNIST" / "raw").glob("*.gz"):
        packed.with_suffix("").write_bytes(gzip.decompress(packed.read_bytes()))
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "enable_model_summary": False},
        "model": {"arch": "mlp", "arch_kwargs": {"hidden": [8]}, "lr": 0.05},
        "data": {"dataset": "fashion_mnist", "data_dir": str(data_dir), "batch_size": 32,
                 "download": False},
        "study": {"store": "store", "sparsities": [0.5], "rewind_epochs": [0],
                  "prune": {"epochs_per_round": 1}, "wandb_mode": "disabled"},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tree(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns
            for path in sorted(folder.rglob("*"))}


def refused(capsys, folder: Path, *argv: str) -> str:
    """Run the CLI; assert exit 2, one stderr line, nothing written. Returns the line."""
    before = tree(folder)
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert tree(folder) == before
    for made in ("store", "lightning_logs", "report"):
        assert not (folder / made).exists()
    return err[0]


STUDY_COMMANDS = ("plan", "experiment")


# -- the model: refused before the first stage (and by `plan`), `fit` before lightning_logs
@pytest.mark.parametrize("command", STUDY_COMMANDS + ("match",))
def test_a_model_without_a_derivable_spec_is_refused_before_any_stage(study, capsys, command):
    line = refused(capsys, study, command, "--config", "study.yaml",
                   f"--model.arch={__name__}.ChannelConcat", "--model.arch_kwargs=null")
    assert line.startswith("error: cannot derive a permutation spec for ChannelConcat: "
                           "unsupported function torch.cat")


@pytest.mark.parametrize("command", STUDY_COMMANDS + ("fit",))
def test_a_model_too_big_for_the_images_is_refused(study, capsys, command):
    line = refused(capsys, study, command, "--config", "study.yaml", "--model.arch=vgg11",
                   "--model.arch_kwargs=null")
    assert line == ("error: model.arch 'vgg11' on the data's 1x28x28 images has layers of "
                    "size zero (classifier.weight): the images are too small for it; pick a "
                    "model for this dataset")


@pytest.mark.parametrize("command", STUDY_COMMANDS + ("fit",))
def test_a_model_with_the_wrong_number_of_scores_is_refused(study, capsys, command):
    line = refused(capsys, study, command, "--config", "study.yaml",
                   f"--model.arch={__name__}.ThreeScores", "--model.arch_kwargs=null")
    assert line == (f"error: model.arch '{__name__}.ThreeScores' on the data's 1x28x28 "
                    f"images: its forward returns (2, 3), not one score per class (2, 10) "
                    f"(the dataset has 10 classes)")


@pytest.mark.parametrize("command", STUDY_COMMANDS + ("fit",))
def test_an_unknown_arch_kwargs_key_of_a_built_in_model_is_refused(study, capsys, command):
    line = refused(capsys, study, command, "--config", "study.yaml",
                   "--model.arch_kwargs={hidden: [8], depth: 3}")
    assert line.startswith("error: model.arch 'mlp' cannot be built with model.arch_kwargs "
                           "['depth', 'hidden'] (")


def test_a_prunable_set_that_is_empty_is_refused(study, capsys):
    line = refused(capsys, study, "experiment", "--config", "study.yaml",
                   "--study.prune.include=[nothing*]")
    assert line.startswith("error: no prunable weights: include=['nothing*']")


# -- every numeric setting has its range ---------------------------------------------------
@pytest.mark.parametrize("setting, line", [
    ("study.resume.every_n_steps=0",
     "study.resume.every_n_steps=0 is not allowed: it must be every_n_steps>0 (or null)"),
    ("study.resume.every_n_steps=-5",
     "study.resume.every_n_steps=-5 is not allowed: it must be every_n_steps>0 (or null)"),
    ("study.resume.every_minutes=-1",
     "study.resume.every_minutes=-1 is not allowed: it must be every_minutes>0 (or null)"),
    ("study.prune.epochs_per_round=0",
     "study.prune.epochs_per_round=0 is not allowed: it must be epochs_per_round>0"),
    ("study.prune.lr=0", "study.prune.lr=0 is not allowed: it must be lr>0"),
    ("study.prune.weight_decay=-1",
     "study.prune.weight_decay=-1 is not allowed: it must be weight_decay>=0"),
    ("study.sparse.lr=nan", "study.sparse.lr=nan is not allowed: it must be lr>0"),
    ("study.sparse.momentum=1",
     "study.sparse.momentum=1 is not allowed: it must be momentum>=0 and momentum<1"),
    ("study.match.interpolation_points=2", "study.match.interpolation_points=2 is not "
                                           "allowed: it must be interpolation_points>=3"),
    ("study.match.num_batches=0",
     "study.match.num_batches=0 is not allowed: it must be num_batches>0 (or null)"),
    ("study.match.bn_reset_batches=-1",
     "study.match.bn_reset_batches=-1 is not allowed: it must be bn_reset_batches>0 (or null)"),
    ("study.match.seed=-1", "study.match.seed=-1 is not allowed: it must be seed>=0"),
    ("study.fuse=0", "study.fuse=0 is not allowed: it must be fuse>0 (or null)"),
    ("study.rewind_epochs=[]", "study.rewind_epochs is empty; give at least one rewind epoch "
                               "k in 0..1 (the arms train from epoch k)"),
    ("study.rewind_epochs=[2]",
     "rewind epoch 2 leaves no sparse training: k must be < trainer.max_epochs=2"),
    ("study.rewind_epochs=[-1]",
     "rewind epoch -1 is not allowed: rewind epochs are integers >= 0"),
    ("study.sparsities=[1.0]",
     "target sparsity 1.0 is not allowed: each target must be a number in [0, 1)"),
    ("study.prune.fraction=0",
     "study.prune.fraction=0 is not allowed: it must be fraction>0 and fraction<1"),
    ("study.seed_b_offset=0", "study.seed_b_offset=0 makes dense B the same net as dense A; "
                              "give any other integer (default 1000)"),
    ("study.match.epochs=[3]",
     "study.match.epochs entry 3: matching epochs must be in 0..trainer.max_epochs=2"),
    ("trainer.max_epochs=0", "trainer.max_epochs must be >= 1 for a study, got 0"),
    ("model.lr=-1", "model.lr must be > 0, got -1.0"),
    ("model.momentum=1.5", "model.momentum must be in [0, 1), got 1.5"),
    ("model.weight_decay=-0.1", "model.weight_decay must be >= 0, got -0.1"),
    ("model.width=0", "model width must be an integer >= 1, got 0"),
    ("data.batch_size=0", "batch sizes must be >= 1, got 0, 1024"),
    ("data.num_workers=-1",
     "data.num_workers must be >= 0 (0: load in the main process), got -1"),
    ("data.val_split=-1", "data.val_split must be >= 0 (a count or a fraction), got -1.0"),
    ("data.val_split=64", "data.val_split=64.0 leaves no training or no validation images out "
                          "of 64"),  # known only once the data is loaded: before any stage
    ("seed_everything=-1",
     "seed_everything=-1 is not allowed: it must be in 0..4294967295 (or true: a random one)"),
    ("study.seed_b_offset=-1", "dense B's seed -1 (seed_everything=0, study.seed_b_offset=-1) "
                               "is not allowed: seeds must be in 0..4294967295"),
    ("study.rewind_epochs=[0, 0]", "study.rewind_epochs lists an epoch twice: [0, 0]"),
    ("study.replicates=0", "study.replicates=0 is not allowed: it must be replicates>0"),
    ("study.only.replicate=1", "study.only.replicate=1 is not among the study's replicates "
                               "(0 only: study.replicates=1)"),
    ("study.replicates=300", "dense B r299's seed 5016388584 (seed_everything=0, "
                             "study.seed_b_offset=1000, study.replicates=300) is not allowed: "
                             "seeds must be in 0..4294967295"),
    ("model.arch_kwargs=[8]", "model.arch_kwargs=[8] is not allowed: expected dict or null"),
    ("trainer.devices=0",
     "`Trainer(devices='0')` value is not a valid input using cpu accelerator."),
])
def test_a_numeric_setting_out_of_its_range_is_refused(study, capsys, setting, line):
    assert refused(capsys, study, "experiment", "--config", "study.yaml",
                   f"--{setting}") == f"error: {line}"


# -- other settings that would mean something the user did not ask for ----------------------
@pytest.mark.parametrize("setting, start", [
    ("data.dataset=imagenette", "error: unknown dataset 'imagenette'; valid datasets: "),
    ("model.arch=resnet21", "error: unknown model 'resnet21'; valid models: "),
    ("study.arms=[lth, random]", "error: unknown arm 'random'; valid arms: "),
    ("study.match.methods=[]", "error: study.match.methods is empty"),
    ("study.prune.chain=forked", "error: study.prune.chain=forked is not allowed: expected "
                                 "one of shared, per_target"),
    ("study.wandb_mode=sometimes", "error: study.wandb_mode=sometimes is not allowed: "
                                   "expected one of auto, online, offline, disabled"),
    ("study.weights_a=missing.pt", "error: study.weights_a not found: missing.pt"),
])
def test_an_unknown_name_is_refused(study, capsys, setting, start):
    assert refused(capsys, study, "experiment", "--config", "study.yaml",
                   f"--{setting}").startswith(start)


@pytest.mark.quick
def test_folders_that_are_files_are_refused(study, capsys):
    (study / "taken").write_text("")
    assert refused(capsys, study, "experiment", "--config", "study.yaml",
                   "--study.store=taken") == ("error: study.store taken is a file; give a "
                                              "folder (new or a store)")
    assert refused(capsys, study, "plan", "--config", "study.yaml",
                   f"--data.data_dir={study / 'taken'}") == (
        f"error: data.data_dir {study / 'taken'} is a file, not a folder")


@pytest.mark.parametrize("command", ("experiment", "prune", "fit"))
def test_missing_data_is_refused_before_any_stage_or_log_folder(study, capsys, command):
    (study / "empty").mkdir()
    line = refused(capsys, study, command, "--config", "study.yaml", "--data.dataset=mnist",
                   "--data.data_dir=empty")
    assert line.startswith(f"error: dataset 'mnist' not found under {study / 'empty'}: put ")


@pytest.mark.quick
def test_an_empty_store_name_is_refused(study, capsys):
    assert refused(capsys, study, "experiment", "--config", "study.yaml", "--study.store=") == (
        "error: study.store is empty; give the stage store's folder (default: store)")


def test_a_rewind_snapshots_callback_the_study_would_ignore_is_refused(study, capsys):
    callback = ["--trainer.callbacks+=lightning_lth.callbacks.RewindSnapshots"]
    assert refused(capsys, study, "experiment", "--config", "study.yaml", *callback,
                   "--trainer.callbacks.epochs=[9]") == (
        "error: rewind epoch 9 is beyond trainer.max_epochs=2; allowed: 0..2")
    assert refused(capsys, study, "plan", "--config", "study.yaml", *callback,
                   "--trainer.callbacks.epochs=[1]") == (
        "error: trainer.callbacks has RewindSnapshots(epochs=[1]), but a study saves its own "
        "snapshots, study.rewind_epochs=[0]: set the two equal or drop the callback")



def test_any_other_callback_the_study_would_ignore_is_refused(study, capsys):
    callback = ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                "--trainer.callbacks.monitor=val/acc"]
    for command in ("experiment", "plan"):
        assert refused(capsys, study, command, "--config", "study.yaml", *callback) == (
            "error: trainer.callbacks has EarlyStopping, which a study would ignore: its stages "
            "run their own callbacks (snapshots, resume points, progress); drop it for study "
            "commands (it is for `fit`; RewindSnapshots is accepted)")

# -- the commands --------------------------------------------------------------------------
def test_an_unknown_command_lists_every_command(study, capsys):
    line = refused(capsys, study, "frobnicate", "--config", "study.yaml")
    assert line == (f"error: unknown command 'frobnicate'; commands: {', '.join(COMMANDS)} "
                    f"(`python -m lightning_lth --help` says what each does)")


@pytest.mark.parametrize("args, line", [
    ([], "grid: one of the arguments --sweep --config is required "
         "(`python -m lightning_lth grid --help` lists the options)"),
    (["--config", "study.yaml", "--workers", "two"],
     "grid: argument --workers: invalid int value: 'two' "
     "(`python -m lightning_lth grid --help` lists the options)"),
    (["--config", "study.yaml", "--workers", "0"], "--workers=0 is not allowed: it must be >= 1"),
    (["--config", "study.yaml", "--threads", "0"], "--threads=0 is not allowed: it must be >= 1"),
    (["--config", "study.yaml", "--retries", "-1"],
     "--retries=-1 is not allowed: it must be >= 0"),
    (["--config", "study.yaml", "--timeout_min", "0"],
     "--timeout_min=0.0 is not allowed: it must be > 0"),
    (["--config", "study.yaml", "--gpus", "a,b"],
     "--gpus 'a,b': expected GPU ids such as 0,1,2,3"),
    (["--config", "study.yaml", "--executor", "slurm", "--slurm", "{{"],
     "--slurm '{{': expected YAML parameters such as '{partition: gpu, gpus_per_node: 1}'"),
    (["--sweep", "missing.yaml"], "sweep file not found: missing.yaml"),
    (["--config", "study.yaml", "--vary", "study.sparsities=[0.5"],
     "--vary 'study.sparsities=[0.5': expected NAME=[V1,V2,...]"),
    (["--config", "study.yaml", "--epoch_seconds", "missing.yaml"],
     "--epoch_seconds file not found: missing.yaml"),
    (["--config", "study.yaml", "--epoch_seconds", "garbage.yaml"],
     "--epoch_seconds file garbage.yaml is not valid YAML at line 1"),
    (["--config", "study.yaml", "--epoch_seconds", "shape.yaml"],
     "--epoch_seconds shape.yaml: expected YAML {device: {arch: {width: seconds per epoch}}}; "
     "its 'cpu' entry is 3"),
    (["--config", "study.yaml", "--study.store=study.yaml"],
     "study.store study.yaml is a file; give a folder (new or a store)"),
])
def test_grid_argument_errors_are_one_line(study, capsys, args, line):
    (study / "garbage.yaml").write_text("{{{: [")
    (study / "shape.yaml").write_text("cpu: 3")
    assert refused(capsys, study, "grid", *args, "--dry_run") == f"error: {line}"


# -- plan: what it calls done is verified ------------------------------------------------------
def test_plan_shows_a_stage_that_fails_its_checksums_as_corrupt(study, capsys):
    short = ["--config", "study.yaml", "--trainer.max_epochs=1", "--study.prune.fraction=0.5"]
    assert main(["prune", *short]) == 0  # dense A and one IMP round
    (dense,) = [path for path in (study / "store" / "dense").iterdir() if path.is_dir()]
    weights = dense / "rewind" / "final.pt"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    before = tree(study)
    capsys.readouterr()
    assert main(["plan", *short]) == 0
    out = capsys.readouterr().out.splitlines()
    (row,) = [line for line in out if line.startswith("dense A ")]
    assert " corrupt " in row, row
    assert "corrupt: dense A failed their checksums; `experiment` moves them aside and " \
           "computes them again" in out
    assert main(["plan", *short, "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [s["status"] for s in stages if s["name"] == "dense A"] == ["corrupt"]
    assert [s["status"] for s in stages if s["stage"] == "imp"] == ["done"]  # one round
    assert tree(study) == before  # plan moves nothing


# -- report ---------------------------------------------------------------------------------
def test_report_refuses_missing_files_and_bad_lines_unless_told_to_skip(study, capsys):
    assert refused(capsys, study, "report", "--results", "missing.jsonl") == (
        "error: results file not found: missing.jsonl")
    assert refused(capsys, study, "report", "--config", "missing.yaml") == (
        "error: report --config file not found: missing.yaml")
    (study / "results.jsonl").write_text('{"model": "mlp"\nnot json\n')
    assert refused(capsys, study, "report", "--results", "results.jsonl") == (
        "error: results file results.jsonl line 1: invalid JSON (Expecting ',' delimiter); 2 "
        "bad line(s) in all (line 1, 2): fix them, or give --skip_bad_lines to report the rest")
    assert main(["report", "--results", "results.jsonl", "--skip_bad_lines"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: results.jsonl: skipped 2 bad line(s) (line 1, 2; listed in the "
                   "report's notes)", "error: no valid records in results.jsonl (2 problem "
                   "line(s))"]
    assert not (study / "report").exists()
