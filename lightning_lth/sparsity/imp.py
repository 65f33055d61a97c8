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

Outputs (``out_dir``)
    ``mask_<t>.pt`` / ``weights_<t>.pt`` per target (``mask_path``/``weights_path``),
    ``rounds.json`` (one entry per round) and ``rounds/round_<i>.pt``: the weights, mask and
    log after the i-th round of the run. A rerun resumes after the last finished round.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.utils import prune

from lightning_lth.errors import LTHError
from lightning_lth.experiment.config import CHAINS, PruneSettings
from lightning_lth.io import load_tensors, save_json, save_tensors
from lightning_lth.sparsity.mask import Mask

ROUND_FORMAT = "lightning_lth.imp_round/1"
PRUNABLE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


# -- names and paths ------------------------------------------------------------------------
def target_tag(target: float) -> str:
    """The one spelling of a target in file names: 0.8 -> '0.8000'."""
    return f"{float(target):.4f}"


def mask_path(out_dir: str | Path, target: float) -> Path:
    return Path(out_dir) / f"mask_{target_tag(target)}.pt"


def weights_path(out_dir: str | Path, target: float) -> Path:
    return Path(out_dir) / f"weights_{target_tag(target)}.pt"


def round_path(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / "rounds" / f"round_{index}.pt"


def prunable_names(net: nn.Module, include: Sequence[str] | None = None,
                   exclude: Sequence[str] | None = None,
                   exclude_skip_paths: bool = False) -> list[str]:
    """Names of the conv and linear weights (ndim >= 2) that IMP prunes.

    A name must match an ``include`` pattern and no ``exclude`` pattern (fnmatch, on the
    names of ``net.named_parameters()``). Defaults: ``PruneSettings``' (all ``*.weight``, not
    ResNet shortcut convs, as in the authors' code). Biases and BatchNorm parameters are never
    pruned: they are not conv/linear weights. ``exclude_skip_paths``: also leave out the convs
    that the model's torch.fx graph shows alone on a residual skip path
    (``symmetry.trace.skip_path_convs``, e.g. torchvision's ``layer2.0.downsample.0``): the
    authors' shortcut rule for models whose names the default patterns do not know.
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
    skipped = set()
    if exclude_skip_paths:
        from lightning_lth.symmetry.trace import skip_path_convs  # torch.fx only when asked

        skipped = {f"{name}.weight" for name in skip_path_convs(net)}
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

    index: int  # 1-based position in the whole run (the resume key: rounds/round_<index>.pt)
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


# -- the run --------------------------------------------------------------------------------
def _state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in net.state_dict().items()}


def _fingerprint(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(key.encode())
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _evaluate(trainer: L.Trainer, module: L.LightningModule, datamodule) -> dict:
    has_test = (datamodule is not None and type(datamodule).test_dataloader
                is not L.LightningDataModule.test_dataloader)
    if has_test:
        results, split = trainer.test(module, datamodule=datamodule, verbose=False), "test"
    else:
        results, split = trainer.validate(module, datamodule=datamodule, verbose=False), "val"
    metrics = results[0] if results else {}

    def value(key):
        found = metrics.get(f"{split}/{key}")
        return None if found is None else float(found)

    return {"test_acc": value("acc"), "test_loss": value("loss"), "eval_split": split}


def _log_round(trainer: L.Trainer, entry: dict, mask: Mask) -> None:
    metrics = {"imp/round": entry["index"], "imp/sparsity": entry["sparsity"],
               "sparsity/global": mask.sparsity()}
    metrics.update({f"sparsity/{name}": value for name, value in mask.layer_sparsity().items()})
    for key in ("test_acc", "test_loss"):
        if entry[key] is not None:
            metrics[f"imp/{key}"] = entry[key]
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


def _plan_difference(saved: dict, plan: dict) -> str | None:
    for key in sorted(set(saved) | set(plan)):
        if saved.get(key) != plan.get(key):
            return key
    return None


def _load_progress(out_dir: Path, plan: dict) -> dict | None:
    """The newest round file of this run, or None; LTHError if it belongs to another run."""
    folder = out_dir / "rounds"
    found = []
    for path in folder.glob("round_*.pt") if folder.is_dir() else ():
        match = re.fullmatch(r"round_(\d+)\.pt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        return None
    index, path = max(found)
    data = load_tensors(path, what="IMP round file")
    if not isinstance(data, dict) or data.get("format") != ROUND_FORMAT:
        raise LTHError(f"{path} is not an IMP round file of lightning_lth (expected format "
                       f"{ROUND_FORMAT!r}); delete it to recompute that round")
    differs = _plan_difference(data.get("plan", {}), plan)
    if differs is not None:
        raise LTHError(f"{out_dir} holds IMP rounds of another run ({differs!r} differs); "
                       f"restore the settings or delete {folder} to start over")
    if data.get("index") != index or len(data.get("log", [])) != index:
        raise LTHError(f"{path} is inconsistent (holds round {data.get('index')!r}); delete it")
    return data


def _check_masked_zero(net: nn.Module, mask: Mask, where: str) -> None:
    params = dict(net.named_parameters())
    for name, keep in mask.tensors.items():
        param = params[name].detach()
        if bool((param[~keep.to(param.device)] != 0).any()):
            raise RuntimeError(f"IMP: pruned weights of {name} are not 0.0 after {where}")


def run_imp(module, datamodule, make_trainer: Callable[[int], L.Trainer], targets,
            settings: PruneSettings, out_dir: str | Path, meta: dict | None = None,
            seed: int | None = None, keep_rounds: bool = False) -> list[dict]:
    """IMP on the trained dense weights ``module`` holds; returns the per-round log.

    ``module`` is an ``LTHModule``; its optimizer hparams are set from ``settings`` (lr,
    momentum, weight_decay; its schedule, cosine by default, runs within each round).
    ``make_trainer(max_epochs)`` gives a fresh Trainer for each round. Each round: prune,
    fit ``settings.epochs_per_round`` epochs with the mask fixed, then test (or validate, if
    the datamodule has no test loader). Per target: ``mask_path``/``weights_path`` files;
    after every round: ``rounds/round_<i>.pt`` and ``rounds.json``. A rerun with the same
    dense weights and settings continues after the last finished round; finished rounds are
    never retrained. Each round reseeds with ``seed + index`` (``seed`` None:
    ``torch.initial_seed()``), so a resumed run equals an uninterrupted one. Only the newest
    round file is kept unless ``keep_rounds``. Files are written on global rank 0.
    """
    out_dir = Path(out_dir)
    targets = check_targets(targets)
    epochs = settings.epochs_per_round
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise LTHError(f"prune.epochs_per_round {epochs!r} is not allowed: an integer >= 0")
    net = module.net
    names = prunable_names(net, settings.include, settings.exclude)
    params = dict(net.named_parameters())
    prunable = sum(params[name].numel() for name in names)
    rounds = imp_schedule(prunable, targets, settings.fraction, settings.chain)
    for key in ("lr", "momentum", "weight_decay"):
        module.hparams[key] = getattr(settings, key)
    hp = module.hparams
    meta = {"model": hp.get("arch"), "width": hp.get("width"), **(meta or {})}
    base_seed = (torch.initial_seed() if seed is None else int(seed)) % (2 ** 31)
    dense = _state_dict(net)
    plan = {"names": names, "prunable": prunable, "targets": targets,
            "rounds": [asdict(r) for r in rounds], "fraction": settings.fraction,
            "chain": settings.chain, "epochs_per_round": epochs, "lr": settings.lr,
            "momentum": settings.momentum, "weight_decay": settings.weight_decay,
            "schedule": hp.get("schedule"), "dense": _fingerprint(dense)}

    log: list[dict] = []
    mask: Mask | None = None
    writer = True  # global rank 0; known once a trainer exists
    progress = _load_progress(out_dir, plan)
    if progress is not None:
        log = list(progress["log"])
        net.load_state_dict(progress["state_dict"])
        mask = Mask(dict(progress["mask"]), dict(meta))
        rank_zero_info(f"IMP: resuming {out_dir} after round {progress['index']} of "
                       f"{len(rounds)}")
        _recover_outputs(out_dir, rounds, log, progress, meta, epochs)

    for rnd in rounds[len(log):]:
        if rnd.step <= 1:  # a chain starts from the dense weights
            net.load_state_dict(dense)
            mask = None
        L.seed_everything(base_seed + rnd.index, verbose=False)
        trainer = make_trainer(epochs)
        writer = trainer.is_global_zero
        if rnd.step == 0:
            mask = full_mask(net, names)
        else:
            before = mask.zeros if mask is not None else 0
            mask = prune_global_l1(net, names, mask, rnd.zeros - before)
            if mask.zeros != rnd.zeros:
                raise RuntimeError(f"IMP round {rnd.index}: pruned {mask.zeros} weights, "
                                   f"planned {rnd.zeros}")
        mask.meta = dict(meta, round=rnd.step, chain=settings.chain,
                         target_sparsity=rnd.target)
        module.mask = mask
        if rnd.step > 0 and epochs > 0:
            trainer.fit(module, datamodule=datamodule)
            _check_masked_zero(net, mask, f"round {rnd.index}")
        entry = {"index": rnd.index, "round": rnd.step, "chain": rnd.chain,
                 "target": rnd.target, "zeros": mask.zeros, "prunable": prunable,
                 "sparsity": mask.zeros / prunable, "epochs": epochs if rnd.step else 0,
                 **_evaluate(trainer, module, datamodule)}
        log.append(entry)
        rank_zero_info(f"IMP round {rnd.index}/{len(rounds)} (chain {rnd.chain}, step "
                       f"{rnd.step}): sparsity {entry['sparsity']:.4f} ({mask.zeros}/{prunable})"
                       f", test acc {entry['test_acc']}")
        _log_round(trainer, entry, mask)
        if not writer:
            continue
        state = _state_dict(net)
        if rnd.target is not None:
            _save_target(out_dir, rnd, state, mask, meta, epochs)
        save_tensors({"format": ROUND_FORMAT, "plan": plan, "index": rnd.index,
                      "state_dict": state, "mask": mask.tensors, "log": log},
                     round_path(out_dir, rnd.index))
        save_json(log, out_dir / "rounds.json")
        if not keep_rounds:
            for older in range(1, rnd.index):
                round_path(out_dir, older).unlink(missing_ok=True)
    if writer:
        save_json(log, out_dir / "rounds.json")
    return log


def _save_target(out_dir: Path, rnd: Round, state: dict, mask: Mask, meta: dict,
                 epochs: int) -> None:
    target_meta = dict(meta, target_sparsity=rnd.target, round=rnd.step)
    Mask(mask.tensors, target_meta).save(mask_path(out_dir, rnd.target))
    save_tensors({"state_dict": state, "epoch": rnd.step * epochs,
                  "meta": dict(target_meta, epoch=rnd.step * epochs)},
                 weights_path(out_dir, rnd.target))


def _recover_outputs(out_dir: Path, rounds: list[Round], log: list[dict], progress: dict,
                     meta: dict, epochs: int) -> None:
    """Rewrite target files a crash (or a user) left missing, where the round file exists."""
    for rnd in rounds[:len(log)]:
        if rnd.target is None:
            continue
        if mask_path(out_dir, rnd.target).is_file() and weights_path(out_dir,
                                                                      rnd.target).is_file():
            continue
        source = progress if rnd.index == progress["index"] else None
        if source is None and round_path(out_dir, rnd.index).is_file():
            source = load_tensors(round_path(out_dir, rnd.index), what="IMP round file")
        if source is None:
            raise LTHError(f"{mask_path(out_dir, rnd.target).name} or "
                           f"{weights_path(out_dir, rnd.target).name} is missing from "
                           f"{out_dir} and round {rnd.index} is no longer kept; delete "
                           f"{out_dir / 'rounds'} to recompute IMP")
        _save_target(out_dir, rnd, source["state_dict"], Mask(dict(source["mask"])), meta,
                     epochs)
