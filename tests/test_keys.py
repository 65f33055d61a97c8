"""The key policy (docs/keys.md): every leaf of the config is checked against a table.

The leaves are walked from the parsed config tree itself, so a new config field or a new
Lightning Trainer argument with no expectation here fails
``test_every_config_leaf_changes_exactly_the_stages_it_should``. The expected effects and
no-op values below are written independently of ``keys.EXCLUDED``, ``keys.TRAINER_*`` and
``keys.NO_OP``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
from helpers import tiny_config

from lightning_lth.cli import main
from lightning_lth.errors import LTHError
from lightning_lth.experiment import keys
from lightning_lth.experiment.plan import build_plan
from lightning_lth.parsing import make_cli
from lightning_lth.sparsity.mask import Mask

DENSE = {"dense A", "dense B"}
ARMS = {"arm lth", "arm naive", "arm permuted"}
ALL = DENSE | {"imp", "match"} | ARMS
NO_NO_OP = object()  # the leaf has no value at which it is off


@dataclass(frozen=True)
class Expect:
    change: frozenset  # stage categories whose keys must change
    keep: frozenset = frozenset()  # ... must keep their keys; None below: every other one
    value: object = "MUTATED"  # the mutated value ("MUTATED": a generic stand-in)
    refused: bool = False  # a study refuses the leaf when set
    also: tuple = ()  # (path, value) pairs changed with it, for a valid config
    no_op: object = NO_NO_OP  # the value at which the leaf is off: absent from every key


def exact(change, value="MUTATED", no_op=NO_NO_OP) -> Expect:
    change = frozenset(change)
    return Expect(change, frozenset(ALL - change), value, no_op=no_op)


def plan_shaping(keep, value) -> Expect:
    """The leaf changes which stages exist; the stages both plans share keep their keys."""
    return Expect(frozenset(), frozenset(keep), value)


def refused(value) -> Expect:
    return Expect(frozenset(), value=value, refused=True)


NOTHING = exact(set())
MATCH = {"match", "arm permuted"}
# Every leaf is listed: a new one (ours, or a Lightning release's Trainer argument) fails the
# walk until it is classified here.
EXPECTED: dict[str, Expect] = {
    # what was parsed, not what it says
    "config": exact(set(), value=[]),
    "seed_everything": exact(ALL, value=5),
    # the Trainer arguments that can change numbers
    "trainer.max_epochs": exact(ALL, value=4),
    "trainer.max_steps": exact(ALL, value=10, no_op=-1),
    "trainer.accelerator": exact(ALL, value="gpu"),
    "trainer.devices": exact(ALL, value=2),
    "trainer.num_nodes": exact(ALL, value=2, no_op=1),
    "trainer.strategy": exact(ALL, value="ddp"),
    "trainer.sync_batchnorm": exact(ALL, value=True, no_op=False),
    "trainer.use_distributed_sampler": exact(ALL, value=False, no_op=True),
    "trainer.precision": exact(ALL, value="bf16-mixed", no_op=None),
    "trainer.plugins": exact(ALL, value=["x"], no_op=None),
    "trainer.deterministic": exact(ALL, value=False, no_op=False),
    "trainer.benchmark": exact(ALL, value=True, no_op=None),
    "trainer.accumulate_grad_batches": exact(ALL, value=2, no_op=1),
    "trainer.gradient_clip_val": exact(ALL, value=1.0, no_op=None),
    "trainer.gradient_clip_algorithm": exact(ALL, value="value", no_op=None),
    "trainer.limit_train_batches": exact(ALL, value=1, no_op=1.0),  # 1: one batch, not 100 %
    "trainer.limit_val_batches": exact(ALL, value=0.5, no_op=None),
    "trainer.limit_test_batches": exact(ALL, value=0.5, no_op=None),
    "trainer.val_check_interval": exact(ALL, value=0.5, no_op=None),
    "trainer.check_val_every_n_epoch": exact(ALL, value=2, no_op=1),
    "trainer.num_sanity_val_steps": exact(ALL, value=0, no_op=None),
    # the Trainer arguments that cannot
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
    "trainer.detect_anomaly": exact(set(), value=True),
    "trainer.inference_mode": exact(set(), value=False),
    "trainer.limit_predict_batches": exact(set(), value=0.5),
    # the Trainer arguments the study refuses off Lightning's default
    "trainer.fast_dev_run": refused(True),
    "trainer.overfit_batches": refused(0.1),
    "trainer.max_time": refused("00:01:00:00"),
    "trainer.min_epochs": refused(2),
    "trainer.min_steps": refused(5),
    "trainer.reload_dataloaders_every_n_epochs": refused(1),
    "trainer.barebones": refused(True),
    "model.arch": Expect(frozenset(ALL), value="resnet20", also=(("model.arch_kwargs", None),)),
    "model.width": exact(ALL, value=2),
    "model.arch_kwargs.hidden": exact(ALL, value=[32, 48]),
    "model.lr": exact(ALL, value=0.1),
    "model.momentum": exact(ALL, value=0.5),
    "model.weight_decay": exact(ALL, value=0.0),
    "model.schedule": exact(ALL, value="constant"),
    "model.init_weights": refused("MUTATED"),
    "model.mask": refused("MUTATED"),
    "model.schedule_epochs": refused(3),
    # graph replay reorders nothing, but fused SGD and a tensor learning rate round differently
    "model.cuda_graphs": exact(ALL, value=True, no_op=False),
    "model.compile": exact(ALL, value=True, no_op=False),
    "model.channels_last": exact(ALL, value=True, no_op=False),
    "optimizer": refused({"class_path": "torch.optim.Adam"}),
    "lr_scheduler": refused({"class_path": "x"}),
    "data.dataset": exact(ALL, value="mnist"),
    "data.seed": exact(ALL, value=7, no_op=None),
    "data.augment": exact(ALL, value=False),
    "data.batch_size": exact(ALL, value=32),
    "data.eval_batch_size": exact(ALL, value=512),
    "data.loader": exact(ALL, value="torchvision"),
    "data.normalization": exact(ALL, value="standard"),
    "data.ddp_batch": exact(ALL, value="per_rank", no_op="global"),
    "data.val_split": exact(ALL, value=0.1, no_op=0),
    "data.data_dir": NOTHING,
    "data.download": NOTHING,
    "data.num_workers": NOTHING,  # the tiny config uses the device loader; see below
    "study.store": NOTHING,
    "study.only.sparsity": exact(set(), value=0.8),
    "study.only.rewind_epoch": exact(set(), value=1),
    "study.only.arm": exact(set(), value="lth"),
    "study.only.match_epoch": exact(set(), value=3),
    "study.only.match_method": exact(set(), value="activation"),
    "study.only.replicate": exact(set(), value=0),
    "study.arms": exact(set(), value=["lth"]),
    "study.wandb_project": NOTHING,
    "study.wandb_mode": exact(set(), value="offline"),
    "study.resume.every_minutes": exact(set(), value=1.0),
    "study.resume.every_n_steps": exact(set(), value=5),
    "study.fuse": exact(set(), value=3),  # float-tolerance only; recorded (fused)
    "study.keep_outputs": exact(set(), value=False),  # which files a stage keeps
    "study.seed_b_offset": exact({"dense B", "match", "arm naive", "arm permuted"}, value=7),
    # replicates r >= 1 add their own B, matches and arms; replicate 0's keep their keys
    "study.replicates": plan_shaping(ALL, 3),
    "study.prune.epochs_per_round": exact({"imp"} | ARMS, value=2),
    "study.prune.lr": exact({"imp"} | ARMS, value=0.1),
    "study.prune.momentum": exact({"imp"} | ARMS, value=0.9),
    "study.prune.weight_decay": exact({"imp"} | ARMS, value=0.1),
    "study.prune.include": exact({"imp"} | ARMS, value=["*.weight", "layers.*"]),
    "study.prune.exclude": exact({"imp"} | ARMS, value=["*bn*"]),
    # other pruned counts: other rounds (new names), so only the arms are left to compare
    "study.prune.fraction": Expect(frozenset(ARMS), DENSE | {"match"}, value=0.3),
    "study.prune.chain": plan_shaping(DENSE | {"match"}, "per_target"),
    "study.match.seed": exact(MATCH, value=1),
    "study.match.num_batches": exact(MATCH, value=2),
    "study.match.bn_reset_batches": exact(MATCH, value=2),
    "study.match.interpolation_points": exact(MATCH, value=5),
    # only the curves change, but pi's stage is re-keyed, and the permuted arms read it
    "study.match.repair": exact(MATCH, value=True, no_op=False),
    "study.match.cuda_graphs": exact(set(), value=False),  # the same numbers (test_cuda_graphs)
    # another method adds match stages and arms (match[weight]); the study's own keep keys
    "study.match.methods": plan_shaping(ALL, ["activation", "weight"]),
    # new match stages and permuted arms (permuted@b1); the study's own keep their keys
    "study.match.epochs": plan_shaping(ALL, [1, 3]),
    "study.sparse.lr": exact(ARMS, value=0.1),
    "study.sparse.momentum": exact(ARMS, value=0.5),
    "study.sparse.weight_decay": exact(ARMS, value=0.0),
    "study.sparsities": plan_shaping(DENSE | {"match"}, [0.5, 0.9]),
    "study.rewind_epochs": plan_shaping(ALL, [0, 2]),
    "study.weights_a": refused("MUTATED"),
    "study.weights_b": refused("MUTATED"),
    "study.mask": exact(MATCH),  # value: a real mask file, set below
}


def expectation(path: str) -> Expect | None:
    return EXPECTED.get(path)


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


def without(config: dict, path: str) -> dict:
    """The config of a release (ours or Lightning's) that has no such leaf."""
    config = copy.deepcopy(config)
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
        node = node[name]
    del node[leaf]
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
    EXPECTED["study.mask"] = exact(MATCH, value=str(mask))
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


@pytest.mark.quick
def test_arms_share_a_data_order_per_k_distinct_from_the_dense_nets():
    assert keys.order_seed("arm", 0, 2, None) == keys.order_seed("arm", 0, 2, None)
    seeds = {keys.order_seed("arm", 0, k, None) for k in range(5)}
    seeds |= {keys.order_seed("dense", s, None) for s in (0, 1000)}
    assert len(seeds) == 7
    assert keys.order_seed("arm", 0, 2, None) != keys.order_seed("arm", 0, 2, 1)  # data.seed


def no_op_problems(config: dict) -> list[str]:
    """Leaves the table says are off at a value whose keys change between that value and no
    such leaf at all (the release before the leaf existed)."""
    problems = []
    for path, expect in EXPECTED.items():
        if expect.no_op is NO_NO_OP:
            continue
        at_no_op = mutate(config, path, expect.no_op)
        if stage_keys(at_no_op) != stage_keys(without(at_no_op, path)):
            problems.append(path)
    return problems


def test_a_leaf_at_its_no_op_value_is_left_out_of_every_key(config):
    """A new switch that defaults to off changes no stored stage's key."""
    assert len([e for e in EXPECTED.values() if e.no_op is not NO_NO_OP]) >= 20
    assert not no_op_problems(config)


def test_forgetting_a_no_op_is_caught(config, monkeypatch):
    monkeypatch.delitem(keys.NO_OP, "model.cuda_graphs")
    assert no_op_problems(config) == ["model.cuda_graphs"]


def test_another_lightning_release_keeps_every_key(config):
    """Keys come from the project's list of Trainer arguments: a Lightning that declares
    fewer (or more) arguments, or spells precision's default "32-true", keys the same."""
    before = stage_keys(config)
    trainer = config["trainer"]
    older = {name: trainer[name] for name in ("max_epochs", "accelerator", "deterministic",
                                               "devices", "strategy")}
    assert stage_keys({**config, "trainer": {**older, "precision": "32-true",
                                             "benchmark": False, "num_nodes": 1}}) == before
    assert len(trainer) > 30


def test_an_unclassified_trainer_argument_is_refused_off_its_default(config):
    assert stage_keys(mutate(config, "trainer.fast_dev_run", False)) == stage_keys(config)
    with pytest.raises(LTHError, match=r"^trainer.fast_dev_run=True: a study keys only"):
        stage_keys(mutate(config, "trainer.fast_dev_run", True))
    with pytest.raises(LTHError, match=r"trainer.from_a_later_lightning=1: .*it has none"):
        stage_keys(mutate(config, "trainer.from_a_later_lightning", 1))


def test_the_cli_refuses_an_unclassified_trainer_argument_before_any_work(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert main(["plan", "--config", str(config), "--trainer.min_epochs=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: trainer.min_epochs=2: a study keys only the Trainer")
    assert err[-1].endswith("leave it at Lightning's default None")
    assert not (tmp_path / "store").exists()
