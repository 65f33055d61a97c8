"""The CLI end to end (``python -m lightning_lth`` as a subprocess) on tiny data written in the
real formats, every bad input, and the rewind snapshots of a real Lightning fit.

Each subprocess pays ~5 s of imports on 2 cores. So the bad-input matrix runs through
``lightning_lth.cli.main`` in-process (the function ``__main__`` calls: the same parser,
the same Trainer) with one case also as a subprocess; the whole matrix as subprocesses is
marked ``slow``. ``validate`` runs in-process, ``fit``, ``test`` and ``--print_config`` as
subprocesses.
"""

import copy
import csv
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, run_cli, write_cifar_dataset, write_idx_dataset

from lightning_lth.callbacks import RewindSnapshots
from lightning_lth.cli import main
from lightning_lth.data import LTHDataModule
from lightning_lth.errors import LTHError
from lightning_lth.training.module import LTHModule, load_snapshot

CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 2
  deterministic: true
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {save_dir: logs, name: run}
  callbacks:
    - class_path: lightning_lth.callbacks.RewindSnapshots
      init_args: {epochs: [0, 1]}
model:
  arch: mlp
  arch_kwargs: {hidden: [64, 64]}
  lr: 0.05
  momentum: ${oc.decode:"0.8"}
data:
  dataset: fashion_mnist
  data_dir: data
  batch_size: 32
  eval_batch_size: ${data.batch_size}
  num_workers: 0
  download: false
"""
MODEL_ARGS = {"arch": "mlp", "arch_kwargs": {"hidden": [64, 64]}, "num_classes": 10,
              "in_channels": 1, "image_size": 28}


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def last(rows: list[dict], key: str) -> float:
    return [float(row[key]) for row in rows if row.get(key)][-1]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def files_under(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below root: its bytes and mtime (to show nothing was rewritten)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_untouched(root: Path, before: dict) -> None:
    """Every file that was there is byte- and mtime-identical, and nothing new was written
    (outside data/, where unpacking the gz files is allowed)."""
    after = files_under(root)
    assert {name: after.get(name) for name in before} == before
    assert [name for name in after if name not in before and not name.startswith("data/")] == []


# -- a real fit through the CLI, shared by the tests that read its outputs ------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``fit`` once as a subprocess: 1 epoch of the MLP on tiny Fashion-MNIST, CSV logger,
    snapshots at epochs 0 and 1 (the config says 2 epochs; the command line says 1)."""
    work = tmp_path_factory.mktemp("fit")
    (work / "config.yaml").write_text(CONFIG)
    data_dir = write_idx_dataset(work / "tiny")
    result = run_cli("fit", "--config", "config.yaml", f"--data.data_dir={data_dir}",
                     "--trainer.max_epochs=1", "--trainer.limit_val_batches=4", cwd=work)
    return work, data_dir, result


def test_fit_subprocess_writes_metrics_and_snapshots(fitted):
    work, _, result = fitted
    assert result.returncode == 0, result.stderr[-3000:]
    run = work / "logs" / "run" / "version_0"
    rows = read_metrics(run / "metrics.csv")
    assert {"epoch", "lr", "train/loss_epoch", "train/acc", "val/loss", "val/acc"} <= set(rows[0])
    assert max(int(row["epoch"]) for row in rows) == 0  # one epoch
    assert last(rows, "val/acc") > 0.5  # chance is 0.1
    assert last(rows, "lr") == pytest.approx(0.05)
    # the saved config is the resolved one: interpolations and overrides applied
    saved = (run / "config.yaml").read_text()
    assert "max_epochs: 1" in saved and "momentum: 0.8" in saved
    assert "eval_batch_size: 32" in saved and "${" not in saved

    rewind = run / "rewind"
    assert sorted(p.name for p in rewind.iterdir()) == ["epoch_0.pt", "epoch_1.pt", "final.pt"]
    snaps = {p.stem: load(p) for p in rewind.iterdir()}
    assert snaps["epoch_0"]["epoch"] == 0 and snaps["epoch_1"]["epoch"] == 1
    assert snaps["epoch_1"]["meta"] == {"model": "mlp", "width": 1, "epoch": 1}
    for key, value in snaps["final"]["state_dict"].items():
        assert torch.equal(value, snaps["epoch_1"]["state_dict"][key])  # 1 epoch: final = k=1
        assert not torch.equal(value, snaps["epoch_0"]["state_dict"][key])
    # k = 0 is the init that seed_everything(0) gives: rebuild it here
    L.seed_everything(0, verbose=False)
    init = LTHModule(**MODEL_ARGS).net.state_dict()
    assert init.keys() == snaps["epoch_0"]["state_dict"].keys()
    for key, value in init.items():
        assert torch.equal(value, snaps["epoch_0"]["state_dict"][key]), key


@pytest.mark.parametrize("command, via", [("test", "subprocess"), ("validate", "in-process")])
def test_validate_and_test_subcommands_reuse_the_trained_weights(fitted, capfd, monkeypatch,
                                                                 command, via):
    work, data_dir, result = fitted
    assert result.returncode == 0, result.stderr[-3000:]
    run = work / "logs" / "run" / "version_0"
    before = files_under(run)
    val_acc = last(read_metrics(run / "metrics.csv"), "val/acc")
    versions = set((work / "logs" / "run").iterdir())
    code, stderr = RUNNERS[via]([command, "--config", "config.yaml",
                                 f"--data.data_dir={data_dir}",
                                 f"--model.init_weights={run / 'rewind' / 'final.pt'}"],
                                work, capfd, monkeypatch)
    assert code == 0, stderr[-3000:]
    (new_run,) = set((work / "logs" / "run").iterdir()) - versions
    rows = read_metrics(new_run / "metrics.csv")
    split = "val" if command == "validate" else "test"
    # the test split is the validation split: the same accuracy as at the end of fit
    assert last(rows, f"{split}/acc") == pytest.approx(val_acc, abs=1e-6)
    assert files_under(run) == before  # the fit's outputs are untouched


def test_print_config_shows_the_resolved_config(tmp_path):
    """omegaconf parser mode: ${...} in the config file is resolved; overrides apply."""
    (tmp_path / "config.yaml").write_text(CONFIG)
    out = run_cli("fit", "--config", "config.yaml", "--model.width=3", "--data.batch_size=8",
                  "--print_config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "${" not in text
    assert "momentum: 0.8" in text  # ${oc.decode:"0.8"} resolved
    assert "eval_batch_size: 32" in text  # ${data.batch_size} resolved within the file
    assert "batch_size: 8" in text and "width: 3" in text  # command-line overrides
    assert "RewindSnapshots" in text and "CSVLogger" in text
    assert not (tmp_path / "logs").exists()  # printing the config trains nothing


@pytest.mark.quick
def test_help_lists_every_command_one_line_each(capsys):
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for command in ("fit", "validate", "test", "experiment", "prune", "match", "plan", "report"):
        (line,) = [line for line in lines if line.split()[:1] == [command]]
        assert len(line.split()) > 3, line
    assert main([]) == 2 and "experiment" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["experiment", "prune", "match", "plan", "report",
                                     "dashboard"])
def test_study_command_help_starts_with_what_it_does_and_an_example(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"python -m lightning_lth {command}: ")
    example = lines.index("example:")
    assert example < 10 and lines[example + 1].startswith(f"  python -m lightning_lth {command} ")
    assert lines[example + 3] == "options:"


@pytest.mark.quick
def test_every_study_setting_has_its_help_line(capsys):
    """The study dataclasses' field docstrings are `experiment --help`'s help texts."""
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    helps, option = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            option = line.split()[0] if line.startswith("  --study.") else None
            if option and " CONFIG" not in line:  # a section's own --study.x CONFIG entry
                helps[option] = line[24:].strip() if line[22:24] == "  " else ""
        elif option in helps and line.strip():
            helps[option] = f"{helps[option]} {line.strip()}".strip()
    assert len(helps) >= 35, sorted(helps)
    assert not [name for name, text in helps.items() if text.startswith("(type:")]
    assert helps["--study.fuse"].startswith("Arms (of one k) trained side by side")
    assert helps["--study.prune.chain"].startswith("shared: one chain stopping at each target")
    assert "Literal['shared', 'per_target']" in helps["--study.prune.chain"]
    assert helps["--study.match.repair"].startswith("Also the REPAIR curves")


@pytest.mark.quick
def test_shipped_demo_config_parses(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "configs" / "demo_fmnist.yaml"), "--print_config"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "arch: mlp" in text and "dataset: fashion_mnist" in text


# -- bad input: one line, non-zero, nothing overwritten -------------------------------------
@pytest.fixture
def workdir(tmp_path):
    """A run folder with a config, tiny data, and the outputs of an earlier run to protect."""
    (tmp_path / "config.yaml").write_text(CONFIG)
    write_idx_dataset(tmp_path / "data", n_train=64, n_test=16)
    earlier = tmp_path / "logs" / "run" / "version_0"
    (earlier / "rewind").mkdir(parents=True)
    (earlier / "metrics.csv").write_text("epoch,val/acc\n0,0.5\n")
    (earlier / "config.yaml").write_text("earlier: run\n")
    torch.save({"state_dict": {}, "epoch": 0}, earlier / "rewind" / "epoch_0.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"this is not a torch file\n" * 10)
    return tmp_path


def run_in_process(args, cwd, capfd, monkeypatch):
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it: undo after
    try:
        code = main(list(args))
    except SystemExit as exc:  # jsonargparse's own errors
        code = exc.code
    return code, capfd.readouterr().err


def run_subprocess(args, cwd, capfd, monkeypatch):
    out = run_cli(*args, cwd=cwd)
    return out.returncode, out.stderr


BAD = {  # name: (extra arguments, what the one-line error must say)
    "unknown model": (["--model.arch=resnet99"],
                      ["'resnet99'", "mlp, resnet20, vgg11"]),
    "unknown dataset": (["--data.dataset=stl10"],
                        ["'stl10'", "cifar10, cifar100, fashion_mnist, imagenet, mnist, svhn"]),
    "width 0": (["--model.width=0"], ["width", "integer >= 1", "got 0"]),
    "rewind beyond max_epochs": (["--trainer.callbacks.epochs=[0,3]"],
                                 ["rewind epoch 3", "max_epochs=2", "0..2"]),
    "negative rewind epoch": (["--trainer.callbacks.epochs=[0,-1]"],
                              ["rewind epoch -1", "integers >= 0"]),
    "data missing offline": (["--data.dataset=cifar10", "--data.data_dir=nowhere"],
                             ["'cifar10'", "nowhere/cifar-10-batches-py", "data_batch_1..5",
                              "download"]),
    "corrupt snapshot": (["--model.init_weights=corrupt.pt"],
                         ["corrupt.pt", "corrupt", "torch.save"]),
    "missing snapshot": (["--model.init_weights=absent.pt"], ["absent.pt", "not found"]),
    "data_dir is a file": (["--data.data_dir=config.yaml"],
                           ["config.yaml", "is a file, not a folder"]),
    "non-integer width": (["--model.width=1.5"], ['Parser key "model.width"', "1.5"]),
}
RUNNERS = {"in-process": run_in_process, "subprocess": run_subprocess}
FAST_SUBPROCESS = {"rewind beyond max_epochs"}
CASES = [pytest.param(name, via, id=f"{name}-{via}",
                      marks=[] if via == "in-process" or name in FAST_SUBPROCESS
                      else [pytest.mark.slow])
         for name in BAD for via in RUNNERS]


@pytest.mark.parametrize("name, via", CASES)
def test_bad_input_is_one_line_nonzero_and_overwrites_nothing(workdir, capfd, monkeypatch,
                                                              name, via):
    extra, expected = BAD[name]
    before = files_under(workdir)
    code, stderr = RUNNERS[via](["fit", "--config", "config.yaml", *extra], workdir, capfd,
                                monkeypatch)
    assert code not in (0, None)
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0] == stderr.rstrip().splitlines()[-1]  # and it is the last word
    for fragment in expected:
        assert fragment in errors[0], (fragment, errors[0])
    assert_untouched(workdir, before)


@pytest.mark.parametrize("via", [
    "in-process", pytest.param("subprocess", marks=pytest.mark.slow)])
@pytest.mark.parametrize("epochs", ["[0,1.5]", "[one]"])
def test_non_integer_rewind_epoch_is_rejected_by_the_parser(workdir, capfd, monkeypatch, via,
                                                            epochs):
    """jsonargparse's own type error, folded into one line: it names the bad value and the
    expected type."""
    before = files_under(workdir)
    code, stderr = RUNNERS[via](["fit", "--config", "config.yaml",
                                 f"--trainer.callbacks.epochs={epochs}"], workdir, capfd,
                                monkeypatch)
    assert code not in (0, None)
    assert "Traceback" not in stderr
    (error,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert error == stderr.rstrip().splitlines()[-1]
    assert 'Parser key "epochs"' in error and "Expected a <class 'int'>" in error
    assert epochs.strip("[]").split(",")[-1] in stderr
    assert_untouched(workdir, before)


def test_bad_input_in_a_config_file_is_one_line_too(workdir, capfd, monkeypatch):
    (workdir / "config.yaml").write_text(CONFIG.replace("epochs: [0, 1]", "epochs: [0, 7]"))
    before = files_under(workdir)
    code, stderr = run_in_process(["fit", "--config", "config.yaml"], workdir, capfd,
                                  monkeypatch)
    assert code == 2
    assert stderr.rstrip().splitlines()[-1] == (
        "error: rewind epoch 7 is beyond trainer.max_epochs=2; allowed: 0..2")
    assert_untouched(workdir, before)


# -- rewind snapshots of an in-process fit --------------------------------------------------
class RecordWeights(L.Callback):
    """The net's weights and buffers at the end of every training epoch, independently."""

    def __init__(self):
        self.after = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.after[trainer.current_epoch + 1] = copy.deepcopy(pl_module.net.state_dict())


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    return write_cifar_dataset(tmp_path_factory.mktemp("cifar"), "cifar10", n_train=64,
                               n_test=16)


def fit_in_process(root: Path, data_dir: Path, seed: int, max_epochs: int, epochs=(0, 1, 2)):
    """ResNet20 (BN buffers included) on tiny CIFAR-10 with augmentation: returns the init,
    the trained weights, the per-epoch record and the snapshot folder."""
    L.seed_everything(seed, verbose=False)
    model = LTHModule(arch="resnet20", num_classes=10, in_channels=3, image_size=32, lr=0.05)
    init = copy.deepcopy(model.net.state_dict())
    data = LTHDataModule("cifar10", str(data_dir), batch_size=16, eval_batch_size=16,
                         download=False, num_workers=0)
    record = RecordWeights()
    dirpath = root / f"seed{seed}-T{max_epochs}-{len(list(root.glob('*')))}"
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, deterministic=True,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        limit_val_batches=0,
                        callbacks=[RewindSnapshots(epochs, dirpath=str(dirpath)), record])
    trainer.fit(model, data)
    return init, copy.deepcopy(model.net.state_dict()), record.after, dirpath


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cifar):
    """Seed 0 for 2 epochs and for 1 epoch, seed 1 for 1 epoch."""
    root = tmp_path_factory.mktemp("runs")
    allow = pytest.MonkeyPatch()
    import torchvision.datasets.cifar as tv_cifar  # as the allow_unverified_cifar fixture

    allow.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    try:
        return {"a": fit_in_process(root, tiny_cifar, 0, 2),
                "one": fit_in_process(root, tiny_cifar, 0, 1, epochs=(0, 1)),
                "other": fit_in_process(root, tiny_cifar, 1, 1, epochs=(0, 1))}
    finally:
        allow.undo()


def test_snapshots_are_the_init_and_the_weights_after_k_epochs(runs):
    init, trained, after, rewind = runs["a"]
    files = {p.name: load(p) for p in rewind.iterdir()}  # weights_only=True loads them all
    assert sorted(files) == ["epoch_0.pt", "epoch_1.pt", "epoch_2.pt", "final.pt"]
    snap = {name: data["state_dict"] for name, data in files.items()}
    assert "stages.1.0.shortcut.1.running_mean" in snap["epoch_1.pt"]  # BN buffers too
    assert same(snap["epoch_0.pt"], init)  # k = 0: before any step
    assert same(snap["epoch_1.pt"], after[1]) and same(snap["epoch_2.pt"], after[2])
    assert same(snap["final.pt"], trained) and same(snap["final.pt"], after[2])
    assert not same(snap["epoch_1.pt"], init) and not same(snap["epoch_1.pt"], trained)
    # the k = 1 snapshot of a 2-epoch run is what a run stopped after 1 epoch ends with
    _, one_epoch, _, _ = runs["one"]
    assert same(snap["epoch_1.pt"], one_epoch)
    assert [files[f"epoch_{k}.pt"]["epoch"] for k in range(3)] == [0, 1, 2]
    assert files["epoch_2.pt"]["meta"] == {"model": "resnet20", "width": 1, "epoch": 2}


def test_same_seed_same_weights_other_seed_other_weights(runs):
    """Two separate fits, both seed 0: the same init, the same data order and augmentation,
    so bit-identical weights after an epoch (CPU); seed 1 differs from the init on."""
    init_a, _, after_a, _ = runs["a"]
    init_b, trained_b, _, _ = runs["one"]
    init_c, trained_c, _, _ = runs["other"]
    assert same(init_a, init_b) and same(after_a[1], trained_b)
    assert not torch.equal(init_a["conv1.weight"], init_c["conv1.weight"])
    assert not torch.equal(trained_b["conv1.weight"], trained_c["conv1.weight"])


class NotATensor:
    """A class a pickle could smuggle in: a weights_only load must refuse it."""


def test_snapshots_load_weights_only_and_nothing_else(runs, tmp_path):
    _, _, _, rewind = runs["a"]
    data = torch.load(rewind / "epoch_0.pt", weights_only=True)
    assert set(data) == {"state_dict", "epoch", "meta"}
    assert all(isinstance(v, torch.Tensor) for v in data["state_dict"].values())
    assert sorted(p.name for p in rewind.iterdir()) == [
        "epoch_0.pt", "epoch_1.pt", "epoch_2.pt", "final.pt"]  # no temporary files left
    assert same(load_snapshot(str(rewind / "epoch_1.pt")), load(rewind / "epoch_1.pt")["state_dict"])
    smuggled = tmp_path / "smuggled.pt"
    torch.save({"state_dict": data["state_dict"], "extra": NotATensor()}, smuggled)
    with pytest.raises(LTHError, match="unreadable or corrupt"):
        load_snapshot(str(smuggled))


def test_snapshots_never_overwrite_an_earlier_runs(runs, tmp_path):
    """A second fit into a folder that already holds snapshots stops before training."""
    _, _, _, rewind = runs["one"]
    before = {p.name: p.read_bytes() for p in rewind.iterdir()}
    model = LTHModule(arch="mlp", num_classes=10, in_channels=1, image_size=28)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path,
                        callbacks=[RewindSnapshots((0, 1), dirpath=str(rewind))])
    with pytest.raises(LTHError, match="already holds snapshots"):
        trainer.fit(model, LTHDataModule("fashion_mnist", str(write_idx_dataset(tmp_path)),
                                         download=False))
    assert {p.name: p.read_bytes() for p in rewind.iterdir()} == before
