"""Iterative magnitude pruning (IMP): global, unstructured, L1, with training between rounds.

The schedule
    Every round prunes part of the live prunable weights, then trains with the mask fixed.
    The count of pruned weights ("zeros") follows the uninterrupted chain
    ``z_r = z_(r-1) + round(fraction * (prunable - z_(r-1)))`` (at least 1 per round), and a
    round whose ``z_r`` would pass the next target lands exactly on it instead:
    ``zeros = round(target * prunable)``.

    ``chain="per_target"`` (the authors): an independent chain per target, each starting from
    the dense weights; every round removes ``fraction`` of the live weights until the last
    one, which lands on the target.

    ``chain="shared"``: one chain that stops on each target in turn, so the masks are nested.
    After a stop it rejoins the uninterrupted chain (the round after a stop removes more than
    ``fraction`` of the live weights), so every target is reached after the same number of
    rounds as its own per-target chain: 8 / 11 / 14 / 16 rounds for 0.80 / 0.90 / 0.95 / 0.97
    with fraction 0.2, and all four masks cost the longest chain (16 rounds). (A chain that
    kept removing exactly ``fraction`` after each stop would need 8 / 12 / 16 / 19.)

    A target of 0.0 gives a "round 0": the dense weights and an all-True mask, no training.

The pruning step
    ``torch.nn.utils.prune``: the current mask is attached with ``custom_from_mask``, then
    ``global_unstructured`` with ``L1Unstructured`` and an integer amount prunes exactly that
    many of the still-live weights (it composes with the attached mask and ranks |w| with
    ``topk``, so the count is exact even with ties), the bool mask is read from the
    ``weight_mask`` buffers and ``prune.remove`` makes the pruning permanent: the module holds
    its original ``Parameter`` objects again (pruned entries 0.0) and no hooks or buffers.

Where it runs
    Each round is a stage of the experiment (``experiment/stages.py``: ``ImpRound``), keyed by
    the round before it and its own count, so the shared and per-target chains share every
    round with the same history, and a crash loses at most the round's last resume point.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from jsonargparse.typing import NonNegativeFloat, OpenUnitInterval, PositiveFloat, PositiveInt
from torch import nn
from torch.nn.utils import prune

from lightning_lth.errors import LTHError
from lightning_lth.ranges import Momentum
from lightning_lth.sparsity.mask import Mask

PRUNABLE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
Chain = Literal["shared", "per_target"]
CHAINS = get_args(Chain)


# -- the settings (the config's ``study.prune``) --------------------------------------------
@dataclass
class PruneSettings:
    """IMP: global magnitude pruning, ``fraction`` of the live weights per round."""

    fraction: OpenUnitInterval = 0.2
    """Fraction of the live weights pruned per round, in (0, 1)."""
    epochs_per_round: PositiveInt = 50
    """Training epochs of each IMP round."""
    lr: PositiveFloat = 0.01
    """IMP training's learning rate."""
    momentum: Momentum = 0.0
    """IMP training's SGD momentum, in [0, 1); the authors' code: 0, plain SGD."""
    weight_decay: NonNegativeFloat = 0.0
    """IMP training's weight decay."""
    chain: Chain = "shared"
    """shared: one chain stopping at each target; per_target: a chain per target (authors')."""
    include: list[str] = field(default_factory=lambda: ["*.weight"])
    """fnmatch patterns of the parameter names pruned."""
    exclude: list[str] = field(default_factory=lambda: ["*shortcut*", "*bn*"])
    """fnmatch patterns of parameter names left dense (ResNet shortcuts, BatchNorm)."""


# -- what is pruned -------------------------------------------------------------------------
def prunable_names(net: nn.Module, include: Sequence[str] | None = None,
                   exclude: Sequence[str] | None = None,
                   skip_paths: Collection[str] = ()) -> list[str]:
    """Names of the conv and linear weights (ndim >= 2) that IMP prunes.

    A name must match an ``include`` pattern and no ``exclude`` pattern (fnmatch, on the
    names of ``net.named_parameters()``). Defaults: ``PruneSettings``' (all ``*.weight``, not
    ResNet shortcut convs, as in the authors' code). Biases and BatchNorm parameters are never
    pruned: they are not conv/linear weights. ``skip_paths``: names of convs also left out,
    as the caller finds them: for a model without a hand-written ``permutation_spec()`` the
    experiment passes those its torch.fx graph shows alone on a residual skip path
    (``experiment.stages.prunable_names``).
    """
    defaults = PruneSettings()
    include = list(defaults.include if include is None else include)
    exclude = list(defaults.exclude if exclude is None else exclude)
    for pattern in include + exclude:
        if not isinstance(pattern, str):
            raise LTHError(f"prune include/exclude pattern {pattern!r} is not a string; "
                           f"use fnmatch patterns such as '*.weight'")
    candidates = []
    for module_name, module in net.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        weight = module._parameters.get("weight")
        if weight is None or weight.ndim < 2:
            continue
        candidates.append(f"{module_name}.weight" if module_name else "weight")
    skipped = {f"{name}.weight" for name in skip_paths}
    names = [name for name in candidates if name not in skipped
             and any(fnmatch.fnmatchcase(name, p) for p in include)
             and not any(fnmatch.fnmatchcase(name, p) for p in exclude)]
    if not names:
        raise LTHError(f"no prunable weights: include={include} exclude={exclude} leave none of "
                       f"the model's conv/linear weights ({', '.join(candidates[:6]) or 'none'}"
                       f"{', ...' if len(candidates) > 6 else ''})")
    return names


# -- the schedule ---------------------------------------------------------------------------
def check_targets(targets) -> list[float]:
    """Target sparsities as floats: a non-empty list, each in [0, 1), strictly increasing."""
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence) or not targets:
        raise LTHError(f"target sparsities {targets!r} are not allowed: give a non-empty list "
                       f"of numbers in [0, 1), strictly increasing")
    checked: list[float] = []
    for target in targets:
        if (isinstance(target, bool) or not isinstance(target, (int, float))
                or not math.isfinite(target) or not 0 <= target < 1):
            raise LTHError(f"target sparsity {target!r} is not allowed: each target must be a "
                           f"number in [0, 1)")
        if checked and target <= checked[-1]:
            raise LTHError(f"target sparsity {target!r} is not allowed: targets must be "
                           f"strictly increasing (it follows {checked[-1]!r})")
        checked.append(float(target))
    return checked


@dataclass(frozen=True)
class Round:
    """One IMP round: prune to ``zeros`` pruned weights, then train (``step`` 0: neither)."""

    index: int  # 1-based position in the whole run
    chain: int  # 0 for the shared chain; the target's position for per_target chains
    step: int  # rounds so far in its chain (0: the dense weights, for a target of 0.0)
    zeros: int  # pruned weights after this round's pruning
    target: float | None  # the target this round lands on, if any


def imp_schedule(prunable: int, targets, fraction: float = 0.2,
                 chain: str = "shared") -> list[Round]:
    """Every round of an IMP run, in order (see the module docstring for the rule)."""
    targets = check_targets(targets)
    if isinstance(prunable, bool) or not isinstance(prunable, int) or prunable < 1:
        raise LTHError(f"IMP needs at least one prunable weight, got {prunable!r}")
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
            or not 0 < fraction < 1):
        raise LTHError(f"prune.fraction {fraction!r} is not allowed: it must be in (0, 1)")
    if chain not in CHAINS:
        raise LTHError(f"unknown prune.chain {chain!r}; valid: {', '.join(CHAINS)}")
    counts = [round(t * prunable) for t in targets]
    for target, count, previous in zip(targets[1:], counts[1:], counts[:-1], strict=True):
        if count == previous:
            raise LTHError(f"target sparsity {target!r} gives {count} pruned weights out of "
                           f"{prunable}, the same as the target before it; use targets further "
                           f"apart")
    for target, count in zip(targets, counts, strict=True):
        if count >= prunable:
            raise LTHError(f"target sparsity {target!r} would prune all {prunable} prunable "
                           f"weights; use a lower target")
    chains = ([list(zip(targets, counts, strict=True))] if chain == "shared"
              else [[pair] for pair in zip(targets, counts, strict=True)])
    rounds: list[Round] = []
    for chain_index, pending in enumerate(chains):
        step, free_running = 0, 0  # free_running: the uninterrupted chain's zeros
        while pending:
            target, count = pending[0]
            if count == 0:  # only a target of (almost) 0.0, before any pruning
                zeros = 0
            else:
                step += 1
                live = prunable - free_running
                free_running += min(live, max(1, round(fraction * live)))
                zeros = min(free_running, count)
            landed = zeros == count
            rounds.append(Round(len(rounds) + 1, chain_index, step, zeros,
                                target if landed else None))
            if landed:
                pending.pop(0)
    return rounds


# -- the pruning step -----------------------------------------------------------------------
@torch.no_grad()
def prune_global_l1(net: nn.Module, names: Sequence[str], current: Mask | None,
                    remove: int) -> Mask:
    """Prune the ``remove`` smallest-|w| live weights over all ``names`` together.

    ``current`` is the mask so far (None: all alive); the returned mask is nested in it.
    Pruning is made permanent: the net keeps plain parameters, pruned entries are 0.0.
    """
    modules = dict(net.named_modules())
    keeps = {}
    for name in names:
        weight = net.get_parameter(name)
        keeps[name] = (current.tensors[name].to(weight.device) if current is not None
                       else torch.ones_like(weight, dtype=torch.bool))
    live = sum(int(keep.sum()) for keep in keeps.values())
    if not 0 <= remove <= live:
        raise LTHError(f"cannot prune {remove} of {live} live weights")
    parameters, orders = [], []
    try:
        for name in names:
            module_name, _, attr = name.rpartition(".")
            module = modules[module_name]
            orders.append((module, list(module._parameters)))
            prune.custom_from_mask(module, attr, keeps[name])
            parameters.append((module, attr))
        prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured,
                                  amount=int(remove))
        masks = {name: getattr(module, f"{attr}_mask").detach().to("cpu", torch.bool).clone()
                 for name, (module, attr) in zip(names, parameters, strict=True)}
    finally:
        for module, attr in parameters:
            prune.remove(module, attr)
        for module, order in orders:  # prune.remove re-registers the weight last
            for key in order:
                if key in module._parameters:
                    module._parameters[key] = module._parameters.pop(key)
    meta = dict(current.meta) if current is not None else {}
    return Mask(masks, meta)


def full_mask(net: nn.Module, names: Sequence[str]) -> Mask:
    params = dict(net.named_parameters())
    return Mask({name: torch.ones(params[name].shape, dtype=torch.bool) for name in names})


# -- checks ---------------------------------------------------------------------------------
def check_masked_zero(net: nn.Module, mask: Mask, where: str) -> None:
    params = dict(net.named_parameters())
    for name, keep in mask.tensors.items():
        param = params[name].detach()
        if bool((param[~keep.to(param.device)] != 0).any()):
            raise RuntimeError(f"IMP: pruned weights of {name} are not 0.0 after {where}")
