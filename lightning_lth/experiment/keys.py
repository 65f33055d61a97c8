"""Stage keys: what a stored stage is reused for, and only for (the policy: docs/keys.md).

A stage's key hashes ``key_inputs``: the key policy's version, its kind, its identity (which
net, round, arm, ...: the keys of what it reads), the numerics versions of the code its
compute runs (``lightning_lth/numerics.py``), and the config leaves its kind depends on:

- every leaf of the resolved config but those in ``EXCLUDED`` (leaves that cannot change a
  stage's numbers, or that enter the key through the identity) and the ``study`` sections its
  kind does not read (``STUDY_SECTIONS``);
- minus a leaf at its registered no-op value (``NO_OP``): a switch that is off computes what
  the code computed before the switch existed, so adding one that defaults to off, or
  writing its default out, changes no key;
- of the ``trainer`` section only the arguments in the project's own list of those that can
  change numbers (``TRAINER_KEYED``), not every argument the installed Lightning declares: a
  Lightning upgrade that adds an argument, or spells a default differently, changes no key.
  An argument in ``TRAINER_INERT`` cannot change numbers; any other one is refused unless it
  is at Lightning's default (a difference the key cannot see is never computed).

``tests/test_keys.py`` walks every leaf of the config tree against its own table, so a new
field is classified (keyed, excluded or no-op) before it ships; ``tests/test_golden.py`` pins
real keys, so a re-key is always deliberate. The torch thread count is not a setting: it is
recorded in every record (``num_threads``), and each sealed stage's ``settings.json`` records
the versions it was computed with (``numerics.computed_with``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Iterator
from typing import Any

from lightning_lth.errors import LTHError

# The policy's version, in every key. 1 was the first release's (every leaf but EXCLUDED,
# the whole trainer section, no numerics versions); its stages lack ``key_inputs`` in
# settings.json, and `plan` says so. Bumping it re-keys every stage: say so in the changelog.
POLICY = 2

# path -> why it is not part of any key (trainer arguments: TRAINER_INERT)
EXCLUDED: dict[str, str] = {
    "config": "the config files' names; their contents are the other leaves",
    "seed_everything": "enters each stage's identity as the seed that stage uses",
    "model.init_weights": "for `fit`; a study refuses it",
    "model.mask": "for `fit`; a study refuses it",
    "model.schedule_epochs": "for `fit`; each study stage sets its own",
    "optimizer": "LightningCLI's optimizer override; a study refuses it",
    "lr_scheduler": "LightningCLI's scheduler override; a study refuses it",
    "data.data_dir": "where the files are, not what they hold",
    "data.download": "where the files come from",
    "study.store": "where results go",
    "study.only": "selects which cells run",
    "study.arms": "selects which arms run",
    "study.sparsities": "shapes the plan; an IMP round is keyed by its own count and history",
    "study.rewind_epochs": "shapes the plan; a snapshot is keyed by its net and epoch",
    "study.seed_b_offset": "shapes the plan; dense B is keyed by its own seed",
    "study.replicates": "shapes the plan; each B_r is keyed by its own seed, each arm of "
                        "replicate r >= 1 by r (replicate 0's keys are the study's own)",
    "study.prune.chain": "shapes the plan; a round's history is in what it reads",
    "study.match.methods": "shapes the plan; each match stage is keyed by its own method, "
                           "as study.match.method (match_view)",
    "study.match.epochs": "shapes the plan; a match stage is keyed by the snapshots it reads",
    "study.match.cuda_graphs": "how matching runs on CUDA: a replay runs the eager passes' "
                               "kernels on the same buffers (tests/test_cuda_graphs.py)",
    "study.weights_a": "a file input, keyed by its checksum where it is read",
    "study.weights_b": "a file input, keyed by its checksum where it is read",
    "study.mask": "a file input, keyed by its checksum where it is read",
    "study.resume": "checkpoint cadence; resume is exact",
    "study.fuse": "how arms are batched: a fused member equals its alone run to float "
                  "tolerance (float32: 1e-5, bf16-mixed: bf16's 2e-3, tests/test_fused.py), "
                  "like the thread count; the group size is recorded in each record (fused), "
                  "and an arm finished either way is reused",
    "study.keep_outputs": "which files a stage keeps: its test outputs change no number",
    "study.wandb_project": "logging",
    "study.wandb_mode": "logging",
}
# Excluded only where it cannot change the numbers: with the torchvision loader each worker
# draws its own augmentation stream, so the worker count is keyed there.
DEVICE_LOADER_ONLY = {"data.num_workers": "the device loader has no workers"}

# Trainer arguments that can change a stage's numbers (outputs, records, or the validation
# curves in its logs that `report` reads): keyed, each unless at a no-op value in NO_OP.
TRAINER_KEYED: dict[str, str] = {
    "max_epochs": "T: every stage's schedule",
    "max_steps": "cuts training short",
    "accelerator": "CPU and GPU kernels round differently; 'auto' is keyed as written",
    "devices": "under DDP the sums over ranks round differently, and data.ddp_batch=per_rank "
               "multiplies the global batch by the rank count; 'auto' is keyed as written",
    "num_nodes": "the rank count, as devices",
    "strategy": "DDP, FSDP or DeepSpeed change the reductions and the optimizer's state",
    "sync_batchnorm": "BatchNorm statistics over the ranks",
    "use_distributed_sampler": "which images each rank draws",
    "precision": "the dtype of every computation",
    "plugins": "a precision or environment plugin changes the computation",
    "deterministic": "which kernels run (cuDNN, scatter); off is torch's default",
    "benchmark": "cuDNN picks kernels by timing them; off is torch's default",
    "accumulate_grad_batches": "the effective batch",
    "gradient_clip_val": "clips the gradients",
    "gradient_clip_algorithm": "how they are clipped ('norm' is Lightning's default)",
    "limit_train_batches": "the training steps per epoch",
    "limit_val_batches": "the validation curves in logs/",
    "limit_test_batches": "the test metrics of every stage",
    "val_check_interval": "when validation runs: the validation curves",
    "check_val_every_n_epoch": "when validation runs: the validation curves",
    "num_sanity_val_steps": "validation passes before training (2: Lightning's default)",
}
# Trainer arguments that cannot change a stage's numbers.
TRAINER_INERT: dict[str, str] = {
    "logger": "study stages log to their own CSV and W&B loggers",
    "callbacks": "callbacks of `fit`; study stages use their own",
    "enable_progress_bar": "display only",
    "enable_model_summary": "display only",
    "enable_checkpointing": "study stages always write resume points",
    "default_root_dir": "a path; study stages write into the store",
    "log_every_n_steps": "logging cadence",
    "enable_autolog_hparams": "logging",
    "profiler": "profiling",
    "model_registry": "where `fit` uploads models",
    "detect_anomaly": "checks the backward pass for NaNs; changes no value",
    "inference_mode": "evaluation under inference_mode or no_grad: the same values",
    "limit_predict_batches": "a study predicts nothing",
}
# Any other trainer argument (fast_dev_run, overfit_batches, max_time, min_epochs, min_steps,
# reload_dataloaders_every_n_epochs, barebones, and whatever a Lightning release adds) is
# refused at any value but Lightning's default: classify it above to use it.

# path -> the values at which the leaf is off (type-exact: 1 is not 1.0): left out of keys.
# A value that is only a default (model.lr, study.prune.fraction, ...) is not a no-op.
NO_OP: dict[str, tuple] = {
    "model.arch_kwargs": (None, {}),  # the registered model's own defaults
    "model.compile": (False,),
    "model.channels_last": (False,),
    "model.cuda_graphs": (False,),
    "data.seed": (None,),  # order seeds from the stage identities alone
    "data.val_split": (0, 0.0),  # nothing held out: validation on the test split
    "data.ddp_batch": ("global",),  # the one-device batch under any rank count
    "study.match.repair": (False,),
    "trainer.num_nodes": (1,),
    "trainer.sync_batchnorm": (False,),
    "trainer.use_distributed_sampler": (True,),
    "trainer.max_steps": (-1,),
    "trainer.plugins": (None, []),
    "trainer.precision": (None, "32-true", "32", 32),  # None: "32-true"
    "trainer.deterministic": (None, False),
    "trainer.benchmark": (None, False),
    "trainer.accumulate_grad_batches": (1,),
    "trainer.gradient_clip_val": (None,),
    "trainer.gradient_clip_algorithm": (None, "norm"),
    "trainer.limit_train_batches": (None, 1.0),
    "trainer.limit_val_batches": (None, 1.0),
    "trainer.limit_test_batches": (None, 1.0),
    "trainer.val_check_interval": (None, 1.0),
    "trainer.check_val_every_n_epoch": (1,),
    "trainer.num_sanity_val_steps": (None, 2),
}

# Every leaf of study.match but the excluded ones is keyed for the match stage,
# study.match.repair included when on: it changes only the curves (connectivity.json), yet as
# a match-stage leaf it also re-keys the permuted arms that read that stage's pi.
STUDY_SECTIONS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "snapshot": (),
    "imp": ("study.prune",),
    "match": ("study.match",),
    "arm": ("study.sparse",),
}
# Cell dimensions a report aggregates or splits by itself: not part of a configuration.
CELL_DIMENSIONS = ("seed_everything", "model.width")


def leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf; dicts are descended, lists are values."""
    if isinstance(tree, dict) and (tree or not prefix):
        for name in sorted(tree):
            yield from leaves(tree[name], f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix, tree


def _under(path: str, section: str) -> bool:
    return path == section or path.startswith(section + ".")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def excluded(path: str, config: dict) -> bool:
    if any(_under(path, name) for name in EXCLUDED):
        return True
    device = config.get("data", {}).get("loader") == "device"
    return device and any(_under(path, name) for name in DEVICE_LOADER_ONLY)


def is_no_op(path: str, value: Any) -> bool:
    return any(_same(value, off) for off in NO_OP.get(path, ()))


@functools.cache
def _lightning_defaults() -> dict[str, Any]:
    from lightning.pytorch import Trainer

    return {name: p.default for name, p in inspect.signature(Trainer.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _trainer_leaves(trainer: dict) -> Iterator[tuple[str, Any]]:
    """The keyed trainer leaves; an unclassified argument off Lightning's default: refused."""
    for name in sorted(trainer):
        value = trainer[name]
        if name in TRAINER_KEYED:
            yield from leaves(value, f"trainer.{name}")
        elif name not in TRAINER_INERT:
            default = _lightning_defaults().get(name, inspect.Parameter.empty)
            if not _same(value, default):
                raise LTHError(f"trainer.{name}={value!r}: a study keys only the Trainer "
                               f"arguments it knows the effect of, and {name} is not one "
                               f"(lightning_lth/experiment/keys.py TRAINER_KEYED / "
                               f"TRAINER_INERT); leave it at Lightning's default "
                               + (f"{default!r}" if default is not inspect.Parameter.empty
                                  else "(it has none: drop it)"))


def config_leaves(config: dict) -> dict[str, Any]:
    """Every leaf the key policy keys, all study sections included."""
    walked = [*((p, v) for p, v in leaves({k: v for k, v in config.items() if k != "trainer"})
                if p), *_trainer_leaves(config.get("trainer") or {})]
    return {path: value for path, value in walked
            if not excluded(path, config) and not is_no_op(path, value)}


def keyed_leaves(config: dict, kind: str) -> dict[str, Any]:
    """The leaves a stage of this kind is keyed by."""
    sections = STUDY_SECTIONS[kind]
    return {path: value for path, value in config_leaves(config).items()
            if not _under(path, "study") or any(_under(path, s) for s in sections)}


def match_view(config: dict, method: str) -> dict:
    """The config as one match stage is keyed by: ``study.match`` with that stage's method
    as ``method``."""
    section = {name: value for name, value in config["study"]["match"].items()
               if name not in ("methods", "epochs")}
    return {**config, "study": {**config["study"], "match": {**section, "method": method}}}


def digest(obj: Any, length: int = 16) -> str:
    canonical = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def key_inputs(kind: str, identity: dict, config: dict, numerics: dict[str, int]) -> dict:
    """Everything a stage's key hashes, as JSON (settings.json keeps it: `plan` compares a
    stored stage's with the planned one's to say why it is recomputed)."""
    inputs = {"policy": POLICY, "kind": kind, "identity": identity,
              "config": keyed_leaves(config, kind), "numerics": numerics}
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def stage_key(label: str, inputs: dict) -> str:
    """``<label>-<hash>``: readable, and unique to everything that determines the stage."""
    return f"{label}-{digest(inputs)}"


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


OLDER_RELEASE = "key policy changed (older release)"


def changes(stored: dict, planned: dict) -> list[str]:
    """Why a stored stage (its settings.json) is not the planned one (its key inputs): the
    key policy, a numerics version, a config leaf, what it reads."""
    old = stored.get("key_inputs")
    if old is None:
        return [OLDER_RELEASE]
    if old.get("policy") != planned["policy"]:
        return [f"key policy {old.get('policy')} -> {planned['policy']}"]
    why = []
    for field, label in (("numerics", "{} numerics {} -> {}"), ("config", "config leaf {}: {} -> {}")):
        before, after = old.get(field, {}), planned[field]
        for name in sorted(before.keys() | after.keys()):
            if before.get(name) != after.get(name):
                why.append(label.format(name, _shown(before.get(name, "unset")),
                                        _shown(after.get(name, "unset"))))
    before, after = old.get("identity", {}), planned["identity"]
    for name in sorted(before.keys() | after.keys()):
        if before.get(name) != after.get(name):
            why.append(f"reads another {name} (recomputed upstream)"
                       if isinstance(after.get(name), str) and isinstance(before.get(name), str)
                       else f"{name}: {_shown(before.get(name))} -> {_shown(after.get(name))}")
    return why or ["key inputs differ"]


def config_hash(config: dict) -> str:
    """One configuration's fingerprint: what a report keeps apart (seeds and widths aside)."""
    kept = {path: value for path, value in config_leaves(config).items()
            if not any(_under(path, name) for name in CELL_DIMENSIONS)}
    return digest(kept, 12)


def order_seed(*identity) -> int:
    """A 31-bit seed from a stage's identity: each net, round and arm draws its own data
    order, and equal identities (arms that rewind to the same k) draw the same one."""
    return int(digest(list(identity), 8), 16) % (2 ** 31)
