"""Golden keys and numbers: a re-key, or a change of numbers, is always deliberate.

``GOLDEN`` pins a tiny study computed on CPU (one torch thread, deterministic): one stage of
each kind, each with its key and a sha256 of its output tensors. Code that changes numbers
without bumping its numerics version (``lightning_lth/numerics.py``, or a model's
``register_model(..., numerics=N)``) fails here; bumping it re-keys exactly the stages that
run that code (``test_bumping_a_version_re_keys_exactly_the_stages_that_run_its_code``), and
then this table is updated in the same commit, which says so. ``DEMO`` pins the demo
config's keys from its plan alone.

The checksums are of one platform's CPU kernels (``CHECKSUMS``: torch build, instruction
set and CPU vendor; MKL and oneDNN pick other code paths on Intel than on AMD, so the same
build and instruction set round differently there, seen: every stage's last bits): on a
platform not listed each stage's tensors are compared by their sum of magnitudes to a
relative 1e-4 instead, which a real change of numbers (an init, a loss) moves by far more.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from helpers import NO_WANDB, tiny_config

from lightning_lth import numerics
from lightning_lth.cli import main
from lightning_lth.experiment.plan import build_plan
from lightning_lth.experiment.stages import TEST_OUTPUTS
from lightning_lth.io import load_tensors, save_json
from lightning_lth.models import MODEL_NUMERICS
from lightning_lth.parsing import make_cli

REPO = Path(__file__).resolve().parents[1]
# stage name -> (key, sum of the magnitudes of its tensors)
GOLDEN: dict[str, tuple[str, float]] = {
    "dense A": ("mlp-w1-fashion_mnist-seed0-a9900f3823e23436", 1135.335708443611),
    "dense B to epoch 1": (
        "mlp-w1-fashion_mnist-seed1000-to1-3f0d52b18f9f3dc1", 1150.2616034369582),
    "imp round 1 S=0.5000": ("mlp-w1-fashion_mnist-seed0-r1-d7e154f9b304e84d", 13662.342855200404),
    "match@b1": ("mlp-w1-fashion_mnist-seed0@b1-87dbcba51485b4ed", 1560.226787846826),
    "arm lth S=0.5 k=0": (
        "mlp-w1-fashion_mnist-seed0-lth-s0.5-k0-34afee486a24d293", 13661.038782966905),
    "arm naive S=0.5 k=0": (
        "mlp-w1-fashion_mnist-seed0-naive-s0.5-k0-18ad2af97cb5e4ac", 13542.196194816297),
    "arm permuted@b1 S=0.5 k=0": (
        "mlp-w1-fashion_mnist-seed0-permuted@b1-s0.5-k0-5748947f42f433ea", 13541.05604186821),
}
# platform (``platform()``) -> stage name -> sha256 of its tensors
CHECKSUMS: dict[str, dict[str, str]] = {
    "torch 2.14.1+cu130, CPU AVX512, AuthenticAMD": {
        "dense A": "be46ac133b5a6e04",
        "dense B to epoch 1": "b210594661f004fe",
        "imp round 1 S=0.5000": "0b1b9c958d76f46c",
        "match@b1": "03132f9d4f3c486d",
        "arm lth S=0.5 k=0": "6f716541ea5f7685",
        "arm naive S=0.5 k=0": "65eb7a561fd355b1",
        "arm permuted@b1 S=0.5 k=0": "937f9ad9b44298e4",
    },
    "torch 2.14.1+cu130, CPU AVX512, GenuineIntel": {
        "dense A": "55e9efd64b0e2d8f",
        "dense B to epoch 1": "4d369946a7b3c7cf",
        "imp round 1 S=0.5000": "f35f30b58f966663",
        "match@b1": "9ef5b160f9070b6e",
        "arm lth S=0.5 k=0": "a3975d11e5aa3630",
        "arm naive S=0.5 k=0": "41803254753466f9",
        "arm permuted@b1 S=0.5 k=0": "f517da73b9700613",
    },
}
DEMO: dict[str, str] = {
    "dense A": "mlp-w1-fashion_mnist-seed0-3169daf627334d35",
    "dense B": "mlp-w1-fashion_mnist-seed1000-b8f2aa379400f2ad",
    "imp round 1 S=0.2000": "mlp-w1-fashion_mnist-seed0-r1-9a070c141dc560cc",
    "match": "mlp-w1-fashion_mnist-seed0-5179adcd3c05861d",
    "match@b1": "mlp-w1-fashion_mnist-seed0@b1-c19d24edcae592f5",
    "arm lth S=0.9 k=0": "mlp-w1-fashion_mnist-seed0-lth-s0.9-k0-f83882ddba56959d",
    "arm naive S=0.9 k=0": "mlp-w1-fashion_mnist-seed0-naive-s0.9-k0-dc365d2bc1c6b22c",
    "arm permuted S=0.9 k=0": "mlp-w1-fashion_mnist-seed0-permuted-s0.9-k0-aac38eecf03a5389",
    "arm permuted@b1 S=0.9 k=0": "mlp-w1-fashion_mnist-seed0-permuted@b1-s0.9-k0-32d97656c9370818",
}


def cpu_vendor() -> str:
    """The CPU's vendor as Linux names it (``GenuineIntel``, ``AuthenticAMD``), else "?"."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info
                         if line.startswith("vendor_id")), "?")
    except OSError:
        return "?"


def platform() -> str:
    return (f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, "
            f"{cpu_vendor()}")


def golden_config(tmp_path: Path) -> Path:
    """The tiny study shrunk to one stage of each kind: T = 2, one sparsity reached in one
    round, k = 0, pi from B at epoch 1 (so B trains only that far: a snapshot stage)."""
    path = tiny_config(tmp_path, n_train=128, sparsities=[0.5], rewind_epochs=[0], fuse=1,
                       prune={"epochs_per_round": 1, "fraction": 0.5},
                       match={"interpolation_points": 11, "epochs": [1]})
    config = yaml.safe_load(path.read_text())
    config["trainer"]["max_epochs"] = 2
    path.write_text(yaml.safe_dump(config))
    return path


def tensors(tree, prefix: str = ""):
    """(path, tensor) of every tensor in a saved file, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for name in sorted(tree, key=str):
            yield from tensors(tree[name], f"{prefix}/{name}")
    elif isinstance(tree, (list, tuple)):
        for index, item in enumerate(tree):
            yield from tensors(item, f"{prefix}/{index}")


def fingerprint(folder: Path) -> tuple[str, float]:
    """sha256 of every output tensor of a stage (names, dtypes, shapes, bytes), and the sum
    of their magnitudes. Its kept test outputs are left out: a function of its weights, they
    are checked against its accuracy in tests/test_outputs.py."""
    digest, magnitude = hashlib.sha256(), 0.0
    for file in sorted(p for p in folder.rglob("*.pt") if p.relative_to(folder).parts[0]
                       not in ("logs", "checkpoints", TEST_OUTPUTS)):
        for name, tensor in tensors(load_tensors(file), str(file.relative_to(folder))):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
            magnitude += float(tensor.double().abs().sum())
    return digest.hexdigest()[:16], magnitude


def stored(store: Path) -> dict[str, tuple[str, str, float]]:
    """stage name -> (key, checksum, magnitude) of every sealed stage."""
    out = {}
    for settings in store.glob("*/*/settings.json"):
        stage = json.loads(settings.read_text())
        out[stage["name"]] = (stage["key"], *fingerprint(settings.parent))
    return out


def plan_keys(config: Path | dict, *overrides: str) -> dict[str, str]:
    parsed = (make_cli(["--config", str(config), *overrides], run=False).config.as_dict()
              if isinstance(config, Path) else config)
    return {s.name: s.key for s in build_plan(parsed, saved_epochs=lambda key: None).stages}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden")
    config = golden_config(folder)
    result = run_cli("experiment", "--config", config, cwd=folder, env=NO_WANDB)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, folder / "store"


def test_the_golden_study_computes_the_pinned_keys_and_numbers(golden):
    _, store = golden
    found = stored(store)
    assert set(found) == set(GOLDEN)
    assert {name: key for name, (key, _, _) in found.items()} == {
        name: key for name, (key, _) in GOLDEN.items()}, "a re-key: update GOLDEN deliberately"
    exact = CHECKSUMS.get(platform())
    for name, (_, checksum, magnitude) in found.items():
        if exact:
            assert checksum == exact[name], (
                f"{name}: its numbers changed without a numerics version bump "
                f"(lightning_lth/numerics.py, or the model's register_model numerics)")
        assert math.isclose(magnitude, GOLDEN[name][1], rel_tol=1e-4), name


def test_sealed_stages_record_what_they_were_computed_with(golden):
    _, store = golden
    for settings in store.glob("*/*/settings.json"):
        stage = json.loads(settings.read_text())
        made = stage["computed_with"]
        assert made["torch"] == torch.__version__ and made["lightning_lth"] == "0.2.0"
        assert made["lightning"] and made["numerics"]["model mlp"] == 1
        assert stage["key_inputs"]["policy"] == 2 and stage["key_inputs"]["kind"] == stage["kind"]


@pytest.mark.quick
def test_the_demo_configs_keys_are_pinned():
    keys = plan_keys(REPO / "configs" / "demo_fmnist.yaml")
    assert {name: keys[name] for name in DEMO} == DEMO, "a re-key: update DEMO deliberately"


def rekeyed(config: Path, before: dict[str, str]) -> set[str]:
    after = plan_keys(config)
    assert after.keys() == before.keys()
    return {name for name in before if before[name] != after[name]}


@pytest.mark.parametrize(("component", "changed"), [
    ("imp", {"imp round 1 S=0.5000", "arm lth S=0.5 k=0", "arm naive S=0.5 k=0",
             "arm permuted@b1 S=0.5 k=0"}),  # the rounds, and the arms that read their masks
    ("matching", {"match@b1", "arm permuted@b1 S=0.5 k=0"}),
    ("data", set(GOLDEN)),
    ("train_step", set(GOLDEN)),  # every stage trains, or reads what was trained
])
def test_bumping_a_version_re_keys_exactly_the_stages_that_run_its_code(
        tmp_path, monkeypatch, component, changed):
    config = golden_config(tmp_path)
    before = plan_keys(config)
    version, covers = numerics.COMPONENTS[component]
    monkeypatch.setitem(numerics.COMPONENTS, component, (version + 1, covers))
    assert rekeyed(config, before) == changed


@pytest.mark.quick
def test_bumping_a_models_version_re_keys_only_its_stages(tmp_path, monkeypatch):
    config = golden_config(tmp_path)
    before = plan_keys(config)
    monkeypatch.setitem(MODEL_NUMERICS, "resnet20", MODEL_NUMERICS["resnet20"] + 1)
    assert rekeyed(config, before) == set()
    monkeypatch.setitem(MODEL_NUMERICS, "mlp", MODEL_NUMERICS["mlp"] + 1)
    assert rekeyed(config, before) == set(GOLDEN)


def plan_rows(config: Path, capsys, *overrides: str) -> dict[str, str]:
    """stage name -> the plan table's last column (what a run does with it, and why)."""
    capsys.readouterr()
    assert main(["plan", "--config", str(config), *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    start = header.index(" run")
    return {line[:header.index("what")].strip(): line[start:].strip()
            for line in lines[2:] if line.strip() and not line.startswith(
                ("total:", "recompute:", "(this release"))} | {"footer": "\n".join(
                    line for line in lines if line.startswith(("recompute:", "(this")))}


def test_plan_tells_what_an_upgrade_reuses_and_recomputes(golden, capsys, monkeypatch):
    config, store = golden
    assert set(plan_rows(config, capsys).values()) == {"reuse", ""}

    # the next release changes pruning's numbers: only the rounds and the arms are new
    version, covers = numerics.COMPONENTS["imp"]
    monkeypatch.setitem(numerics.COMPONENTS, "imp", (version + 1, covers))
    rows = plan_rows(config, capsys)
    assert rows["dense A"] == rows["match@b1"] == rows["dense B to epoch 1"] == "reuse"
    assert rows["imp round 1 S=0.5000"] == "recompute: imp numerics 1 -> 2"
    assert rows["arm lth S=0.5 k=0"] == "recompute: reads another mask (recomputed upstream)"
    monkeypatch.undo()

    # another config value: the arms' learning rate
    rows = plan_rows(config, capsys, "--study.sparse.lr=0.03")
    assert rows["arm naive S=0.5 k=0"] == "recompute: config leaf study.sparse.lr: 0.02 -> 0.03"
    assert rows["imp round 1 S=0.5000"] == "reuse"

    # a store made by the release before the key policy: its settings.json as it wrote them
    folder = store / "dense" / GOLDEN["dense A"][0]
    settings = json.loads((folder / "settings.json").read_text())
    older = folder.with_name(folder.name.rsplit("-", 1)[0] + "-44d22f0f8cf22d33")
    folder.rename(older)
    save_json({name: settings[name] for name in ("kind", "name", "key", "epochs", "identity")},
              older / "settings.json")
    rows = plan_rows(config, capsys)
    assert rows["dense A"] == "recompute: key policy changed (older release)"
    assert rows["imp round 1 S=0.5000"] == "reuse"  # stored under its key: not recomputed
    assert "recompute: 1 stage the store holds under another key" in rows["footer"]
    assert "a store made before lightning_lth 0.2.0 is computed again once" in rows["footer"]
    assert main(["plan", "--config", str(config), "--json"]) == 0
    stages = {s["name"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert (stages["dense A"]["action"], stages["dense A"]["why"]) == (
        "recompute", "key policy changed (older release)")
    assert (stages["match@b1"]["action"], stages["match@b1"]["why"]) == ("reuse", "")
