"""Stage keys come from the whole resolved config: every leaf is checked against a table.

The leaves are walked from the parsed config tree itself, so a new config field with no
expectation here fails ``test_every_config_leaf_changes_exactly_the_stages_it_should``. The
expected effects below are written independently of ``keys.EXCLUDED``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
from test_experiment import tiny_config

from lightning_lth.cli import make_cli
from lightning_lth.errors import LTHError
from lightning_lth.experiment import keys
from lightning_lth.experiment.plan import build_plan
from lightning_lth.sparsity.mask import Mask

DENSE = {"dense A", "dense B"}
ARMS = {"arm lth", "arm naive", "arm permuted"}
ALL = DENSE | {"imp", "match"} | ARMS


@dataclass(frozen=True)
class Expect:
    change: frozenset  # stage categories whose keys must change
    keep: frozenset = frozenset()  # ... must keep their keys; None below: every other one
    value: object = "MUTATED"  # the mutated value ("MUTATED": a generic stand-in)
    refused: bool = False  # a study refuses the leaf when set
    also: tuple = ()  # (path, value) pairs changed with it, for a valid config


def exact(change, value="MUTATED") -> Expect:
    change = frozenset(change)
    return Expect(change, frozenset(ALL - change), value)


def plan_shaping(keep, value) -> Expect:
    """The leaf changes which stages exist; the stages both plans share keep their keys."""
    return Expect(frozenset(), frozenset(keep), value)


NOTHING = exact(set())
EXPECTED: dict[str, Expect] = {
    # what was parsed, not what it says
    "config": exact(set(), value=[]),
    "seed_everything": exact(ALL, value=5),
    # a whole section is keyed everywhere unless listed
    "trainer": exact(ALL),
    "trainer.max_epochs": exact(ALL, value=4),
    "trainer.logger": exact(set(), value=[]),
    "trainer.callbacks": exact(set(), value=[]),
    "trainer.enable_progress_bar": NOTHING,
    "trainer.enable_model_summary": NOTHING,
    "trainer.enable_checkpointing": NOTHING,
    "trainer.default_root_dir": NOTHING,
    "trainer.log_every_n_steps": NOTHING,
    "trainer.enable_autolog_hparams": NOTHING,
    "trainer.profiler": NOTHING,
    "trainer.model_registry": NOTHING,
    "model": exact(ALL),
    "model.arch": Expect(frozenset(ALL), value="resnet20", also=(("model.arch_kwargs", None),)),
    "model.width": exact(ALL, value=2),
    "model.arch_kwargs.hidden": exact(ALL, value=[32, 48]),
    "model.init_weights": Expect(frozenset(), refused=True),
    "model.mask": Expect(frozenset(), refused=True),
    "model.schedule_epochs": Expect(frozenset(), value=3, refused=True),
    # graph replay reorders nothing, but fused SGD and a tensor learning rate round differently
    "model.cuda_graphs": exact(ALL, value=True),
    "optimizer": Expect(frozenset(), value={"class_path": "torch.optim.Adam"}, refused=True),
    "lr_scheduler": Expect(frozenset(), value={"class_path": "x"}, refused=True),
    "data": exact(ALL),
    "data.dataset": exact(ALL, value="mnist"),
    "data.seed": exact(ALL, value=7),
    "data.data_dir": NOTHING,
    "data.download": NOTHING,
    "data.num_workers": NOTHING,  # the tiny config uses the device loader; see below
    "study.store": NOTHING,
    "study.only.sparsity": exact(set(), value=0.8),
    "study.only.rewind_epoch": exact(set(), value=1),
    "study.only.arm": exact(set(), value="lth"),
    "study.arms": exact(set(), value=["lth"]),
    "study.wandb_project": NOTHING,
    "study.wandb_mode": exact(set(), value="offline"),
    "study.resume": NOTHING,
    "study.fuse": exact(set(), value=3),  # float-tolerance only; recorded (fused)
    "study.seed_b_offset": exact({"dense B", "match", "arm naive", "arm permuted"}, value=7),
    "study.prune": exact({"imp"} | ARMS),
    "study.prune.include": exact({"imp"} | ARMS, value=["*.weight", "layers.*"]),
    "study.prune.exclude": exact({"imp"} | ARMS, value=["*bn*"]),
    # other pruned counts: other rounds (new names), so only the arms are left to compare
    "study.prune.fraction": Expect(frozenset(ARMS), DENSE | {"match"}, value=0.3),
    "study.prune.chain": plan_shaping(DENSE | {"match"}, "per_target"),
    "study.match": exact({"match", "arm permuted"}),
    # only the curves change, but pi's stage is re-keyed, and the permuted arms read it
    "study.match.repair": exact({"match", "arm permuted"}, value=True),
    "study.match.cuda_graphs": exact(set(), value=False),  # the same numbers (test_graphs)
    # another method adds match stages and arms (match[weight]); the study's own keep keys
    "study.match.methods": plan_shaping(ALL, ["activation", "weight"]),
    # new match stages and permuted arms (permuted@b1); the study's own keep their keys
    "study.match.epochs": plan_shaping(ALL, [1, 3]),
    "study.only.match_epoch": exact(set(), value=3),
    "study.only.match_method": exact(set(), value="activation"),
    "study.sparse": exact(ARMS),
    "study.sparsities": plan_shaping(DENSE | {"match"}, [0.5, 0.9]),
    "study.rewind_epochs": plan_shaping(ALL, [0, 2]),
    "study.weights_a": Expect(frozenset(), refused=True),
    "study.weights_b": Expect(frozenset(), refused=True),
    "study.mask": exact({"match", "arm permuted"}),  # value: a real mask file, set below
}


def expectation(path: str) -> Expect | None:
    for prefix in sorted(EXPECTED, key=len, reverse=True):
        if path == prefix or path.startswith(prefix + "."):
            return EXPECTED[prefix]
    return None


def category(name: str) -> str:
    if name.startswith("imp"):
        return "imp"
    if name.startswith("arm"):
        return " ".join(name.split()[:2])
    return name


def stage_keys(config: dict) -> dict[str, str]:
    return {stage.name: stage.key
            for stage in build_plan(config, saved_epochs=lambda key: None).stages}


def mutate(config: dict, path: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value
    return config


def wrong_effects(config: dict, path: str, expect: Expect) -> list[str]:
    """How changing ``path`` disagrees with ``expect`` (empty: it agrees)."""
    before = stage_keys(config)
    for other, value in expect.also:
        config = mutate(config, other, value)
    after = stage_keys(mutate(config, path, expect.value))
    changed, kept = set(), set()
    for name in before.keys() & after.keys():
        (changed if before[name] != after[name] else kept).add(category(name))
    problems = [f"{path}: {c} should change" for c in expect.change if c not in changed]
    problems += [f"{path}: {c} should keep its key" for c in expect.keep if c in changed]
    return problems


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    parsed = make_cli(["--config", str(tiny_config(folder))], run=False).config.as_dict()
    mask = folder / "mask.pt"
    Mask({"layers.0.weight": __import__("torch").ones(32, 784, dtype=bool)}).save(mask)
    EXPECTED["study.mask"] = exact({"match", "arm permuted"}, value=str(mask))
    return parsed


def test_every_config_leaf_changes_exactly_the_stages_it_should(config):
    leaves = dict(keys.leaves(config))
    assert len(leaves) > 60 and "data.seed" in leaves and "trainer.precision" in leaves
    unexpected = [path for path in leaves if expectation(path) is None]
    assert not unexpected, f"config leaves with no expectation in this test: {unexpected}"
    problems = []
    for path in leaves:
        expect = expectation(path)
        if expect.refused:
            with pytest.raises(LTHError):
                stage_keys(mutate(config, path, expect.value))
            continue
        problems += wrong_effects(config, path, expect)
    assert not problems, problems


def test_the_worker_count_is_keyed_with_the_torchvision_loader(config):
    torchvision = mutate(config, "data.loader", "torchvision")
    assert not wrong_effects(torchvision, "data.num_workers", exact(ALL, value=5))
    assert not wrong_effects(config, "data.num_workers", exact(set(), value=5))


@pytest.mark.parametrize("leaf", ["data.seed", "study.sparse.lr", "trainer.precision"])
def test_dropping_a_field_from_the_keys_is_caught(config, monkeypatch, leaf):
    """The mutation check: the table above notices a key derivation that forgets a field."""
    monkeypatch.setitem(keys.EXCLUDED, leaf, "forgotten")
    assert wrong_effects(config, leaf, expectation(leaf))


def test_keying_an_excluded_field_is_caught(config, monkeypatch):
    monkeypatch.delitem(keys.EXCLUDED, "study.store")
    monkeypatch.setitem(keys.STUDY_SECTIONS, "arm", ("study.sparse", "study.store"))
    assert wrong_effects(config, "study.store", expectation("study.store"))


def test_arms_share_a_data_order_per_k_distinct_from_the_dense_nets():
    assert keys.order_seed("arm", 0, 2, None) == keys.order_seed("arm", 0, 2, None)
    seeds = {keys.order_seed("arm", 0, k, None) for k in range(5)}
    seeds |= {keys.order_seed("dense", s, None) for s in (0, 1000)}
    assert len(seeds) == 7
    assert keys.order_seed("arm", 0, 2, None) != keys.order_seed("arm", 0, 2, 1)  # data.seed
