"""Stage keys, derived from the whole resolved config.

A stage's key hashes its kind, its identity (which net, round, arm, ...), the identities of
what it reads, and every leaf of the resolved config except those in ``EXCLUDED`` (leaves
that cannot change a stage's numbers, or that enter the key through the identity) and the
``study`` sections its kind does not read (``STUDY_SECTIONS``). Everything else is keyed,
so a new config field is keyed everywhere until someone decides otherwise: the key test
walks every leaf of the config tree and fails on a leaf it has no expectation for.

Settings that change numerics without changing the experiment: ``model.compile``,
``model.channels_last``, ``model.cuda_graphs`` (fused SGD with a device learning rate on a
GPU; on a CPU it falls back to the eager step, keyed all the same), ``trainer.precision``,
``trainer.deterministic`` are config leaves, hence keyed; the torch thread count is not a setting and is recorded in every
record (``num_threads``) instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

# path -> why it is not part of any key
EXCLUDED: dict[str, str] = {
    "config": "the config files' names; their contents are the other leaves",
    "seed_everything": "enters each stage's identity as the seed that stage uses",
    "trainer.logger": "study stages log to their own CSV and W&B loggers",
    "trainer.callbacks": "callbacks of `fit`; study stages use their own",
    "trainer.enable_progress_bar": "display only",
    "trainer.enable_model_summary": "display only",
    "trainer.enable_checkpointing": "study stages always write resume points",
    "trainer.default_root_dir": "a path; study stages write into the store",
    "trainer.log_every_n_steps": "logging cadence",
    "trainer.enable_autolog_hparams": "logging",
    "trainer.profiler": "profiling",
    "trainer.model_registry": "where `fit` uploads models",
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
    "study.prune.chain": "shapes the plan; a round's history is in what it reads",
    "study.match.methods": "shapes the plan; each match stage is keyed by its own method, "
                           "as study.match.method (match_view)",
    "study.match.epochs": "shapes the plan; a match stage is keyed by the snapshots it reads",
    "study.match.cuda_graphs": "how matching runs on CUDA: a replay runs the eager passes' "
                               "kernels on the same buffers (tests/test_graphs.py)",
    "study.weights_a": "a file input, keyed by its checksum where it is read",
    "study.weights_b": "a file input, keyed by its checksum where it is read",
    "study.mask": "a file input, keyed by its checksum where it is read",
    "study.resume": "checkpoint cadence; resume is exact",
    "study.fuse": "how arms are batched: a fused member equals its alone run to float "
                  "tolerance (tests/test_fused.py), like the thread count; the group size is "
                  "recorded in each record (fused), and an arm finished either way is reused",
    "study.wandb_project": "logging",
    "study.wandb_mode": "logging",
}
# Excluded only where it cannot change the numbers: with the torchvision loader each worker
# draws its own augmentation stream, so the worker count is keyed there.
DEVICE_LOADER_ONLY = {"data.num_workers": "the device loader has no workers"}

# Every leaf of study.match but the excluded ones is keyed for the match stage,
# study.match.repair included: it changes only the curves (connectivity.json), yet as a
# match-stage leaf it also re-keys the permuted arms that read that stage's pi.
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


def excluded(path: str, config: dict) -> bool:
    if any(_under(path, name) for name in EXCLUDED):
        return True
    device = config.get("data", {}).get("loader") == "device"
    return device and any(_under(path, name) for name in DEVICE_LOADER_ONLY)


def keyed_leaves(config: dict, kind: str) -> dict[str, Any]:
    """The leaves a stage of this kind is keyed by."""
    sections = STUDY_SECTIONS[kind]
    return {path: value for path, value in leaves(config)
            if not excluded(path, config)
            and (not _under(path, "study") or any(_under(path, s) for s in sections))}


def match_view(config: dict, method: str) -> dict:
    """The config as one match stage is keyed by: ``study.match`` with that stage's method
    as ``method`` (the leaf of a study with one method, before ``methods`` existed: its match
    stages and permuted arms keep their keys)."""
    section = {name: value for name, value in config["study"]["match"].items()
               if name not in ("methods", "epochs")}
    return {**config, "study": {**config["study"], "match": {**section, "method": method}}}


def digest(obj: Any, length: int = 16) -> str:
    canonical = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def stage_key(kind: str, label: str, identity: dict, config: dict) -> str:
    """``<label>-<hash>``: readable, and unique to everything that determines the stage."""
    return f"{label}-{digest({'kind': kind, 'identity': identity, 'config': keyed_leaves(config, kind)})}"


def config_hash(config: dict) -> str:
    """One configuration's fingerprint: what a report keeps apart (seeds and widths aside)."""
    kept = {path: value for path, value in leaves(config)
            if not excluded(path, config)
            and not any(_under(path, name) for name in CELL_DIMENSIONS)}
    return digest(kept, 12)


def order_seed(*identity) -> int:
    """A 31-bit seed from a stage's identity: each net, round and arm draws its own data
    order, and equal identities (arms that rewind to the same k) draw the same one."""
    return int(digest(list(identity), 8), 16) % (2 ** 31)
