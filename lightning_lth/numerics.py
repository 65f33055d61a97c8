"""Numerics versions: what enters a stage key for the code, as config leaves do for settings.

A stored stage is reused only if the code that made it would make it again, and a key sees
only the config. So each component whose code determines numbers carries an integer here
(each model carries its own, in its registry entry: ``register_model(name, numerics=N)``).
Bump a component's number in the commit that changes what it computes (an init, a loss, an
augmentation, a pruning or matching rule): the stages whose compute runs that code are then
keyed anew, and nothing else is. ``tests/test_golden.py`` pins a tiny study's tensors, so a
change of numbers without a bump fails there.

A stage's key holds, directly, the versions of the components its own compute runs
(``DEPENDS``); what upstream stages computed enters through their keys, which its identity
names. Matching runs in a permuted arm too (it permutes the mask by pi): a direct input there.
"""

from __future__ import annotations

import lightning
import torch

from lightning_lth import __version__
from lightning_lth.models import MODEL_NUMERICS, model_numerics

# component -> (version, what it covers)
COMPONENTS: dict[str, tuple[int, str]] = {
    "data": (1, "lightning_lth/data: loading, normalisation, augmentation, batch order "
                "and sharding, the device loader"),
    "train_step": (1, "lightning_lth/training: module.py, cuda_graphs.py, fused.py, "
                      "epoch_sums.py: the loss, SGD and its schedule, the mask hooks, "
                      "evaluation"),
    "imp": (1, "lightning_lth/sparsity: global L1 magnitude pruning, which weights are "
               "prunable, the mask"),
    "matching": (1, "lightning_lth/symmetry: activation and weight matching, applying pi, "
                    "interpolation, REPAIR"),
}

DEPENDS: dict[str, tuple[str, ...]] = {
    "dense": ("model", "data", "train_step"),
    "snapshot": ("model", "data", "train_step"),
    "imp": ("model", "data", "train_step", "imp"),
    "match": ("model", "data", "matching"),
    "arm": ("model", "data", "train_step"),
    "arm permuted": ("model", "data", "train_step", "matching"),
}


def versions(kind: str, arch: str) -> dict[str, int]:
    """The numerics versions a stage of ``kind`` (``"arm permuted"`` for a permuted arm) is
    keyed by; a model given as a dotted path has none (its code is the user's)."""
    out = {}
    for component in DEPENDS[kind]:
        version = model_numerics(arch) if component == "model" else COMPONENTS[component][0]
        if version is not None:
            out[f"model {arch}" if component == "model" else component] = version
    return out


def current() -> dict[str, int]:
    """Every component's version and every registered model's: what settings.json records."""
    return {**{name: version for name, (version, _) in COMPONENTS.items()},
            **{f"model {name}": version for name, version in sorted(MODEL_NUMERICS.items())}}


def computed_with() -> dict:
    """What a sealed stage was computed with (settings.json): the releases and the numerics
    versions, for people and for `plan`'s account of an older store."""
    return {"lightning_lth": __version__, "torch": torch.__version__,
            "lightning": lightning.__version__, "numerics": current()}
