"""How diverse a group of models is, from their test-set output distributions: the metrics of
Evci et al. (AAAI 2022, "Gradient Flow in Sparse Neural Networks and How Lottery Tickets
Win") that the published paper's Table 1 reports. Pure: tensors in, numbers out, no I/O.

Each member is its softmax probabilities on the test set, [N, C] (the kept outputs are
float16), with the targets [N]. Definitions (all as fractions, divergences in nats):

- test accuracy: top-1 (argmax, the first index on a tie) against the targets; the group's
  mean and sample std (ddof=1, as the report's other tables);
- ensemble accuracy: the mean of the members' probabilities, then top-1;
- disagreement: the fraction of test images on which two members' top-1 predictions differ,
  averaged over the unordered pairs;
- KL: KL(p_i || p_j) per image (natural log), averaged over the images and then over the
  ordered pairs i != j. That is the same number as the average over unordered pairs of the
  symmetrised 1/2 (KL(p_i || p_j) + KL(p_j || p_i)); it is half of Jeffreys' divergence (the
  sum), which this is not;
- JS: Jensen-Shannon divergence 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, natural log
  (so at most ln 2), averaged over images and unordered pairs.

float16 outputs: each row is upcast to float64 and renormalised to sum 1 (float16 rounding
leaves a row off by up to ~1e-3). A probability that underflowed to 0 is handled exactly
where the limit is defined (0 log 0 = 0, so JS needs no guard: m > 0 wherever p > 0); only
KL's log q_j is clamped, at q_j >= 2^-24 (float16's smallest positive value, below which the
kept outputs cannot tell a probability from 0), so one underflow gives a large finite term,
not inf.

Ensemble accuracy against the number of members m = 1..R: the mean over all subsets of size
m, or, where there are more than ``MAX_SUBSETS`` of them, over the R cyclic windows
{i, i+1, ..., i+m-1 mod R} (each member in m of them). A group of one has no pairs: its
std, disagreement, KL and JS are None (undefined, not 0)."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_lth.errors import LTHError

FLOAT16_TINY = 2.0 ** -24  # the smallest positive float16: KL's clamp on log q
MAX_SUBSETS = 256  # per ensemble size; above it, the R cyclic windows


@dataclass(frozen=True)
class Diversity:
    """One group's metrics (fractions; divergences in nats)."""

    members: int
    acc_mean: float
    acc_std: float | None  # None for one member
    ensemble_acc: float
    disagreement: float | None
    kl: float | None
    js: float | None
    ensemble_by_size: tuple[float, ...]  # [m - 1]: mean ensemble accuracy of m members


def _checked(probs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> tuple[
        list[torch.Tensor], torch.Tensor]:
    """The members' rows as float64 distributions, and the one targets tensor; refuses
    anything that does not describe one test set."""
    if not probs:
        raise LTHError("diversity: a group needs at least one model's outputs")
    if len(probs) != len(targets):
        raise LTHError(f"diversity: {len(probs)} probability tensors but {len(targets)} "
                       f"targets tensors (one each per model)")
    first = targets[0]
    if first.ndim != 1 or first.dtype.is_floating_point or first.numel() == 0:
        raise LTHError(f"diversity: targets must be a non-empty 1-D integer tensor, got "
                       f"{first.dtype} of shape {tuple(first.shape)}")
    out = []
    for i, (p, t) in enumerate(zip(probs, targets, strict=True)):
        if p.ndim != 2 or p.shape[0] != first.shape[0]:
            raise LTHError(f"diversity: model {i}'s probabilities have shape {tuple(p.shape)}, "
                           f"expected [{first.shape[0]}, C] (one row per test image)")
        if p.shape != probs[0].shape:
            raise LTHError(f"diversity: model {i}'s probabilities have shape {tuple(p.shape)}, "
                           f"model 0's {tuple(probs[0].shape)}")
        if t.shape != first.shape or not torch.equal(t, first):
            raise LTHError(f"diversity: model {i}'s targets differ from model 0's: the "
                           f"outputs are not of one test set in one order")
        p = p.to(torch.float64)
        if not torch.isfinite(p).all() or (p < 0).any():
            raise LTHError(f"diversity: model {i}'s probabilities hold negative or non-finite "
                           f"values (expected softmax outputs)")
        total = p.sum(dim=1, keepdim=True)
        if (total <= 0).any():
            raise LTHError(f"diversity: model {i} has a row of all-zero probabilities")
        out.append(p / total)
    if int(first.min()) < 0 or int(first.max()) >= out[0].shape[1]:
        raise LTHError(f"diversity: targets must lie in [0, {out[0].shape[1]}), got "
                       f"[{int(first.min())}, {int(first.max())}]")
    return out, first


def _accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    return (probs.argmax(dim=1) == targets).double().mean().item()


def _subsets(size: int, members: int) -> list[tuple[int, ...]]:
    if math.comb(members, size) <= MAX_SUBSETS:
        return list(itertools.combinations(range(members), size))
    return [tuple((start + j) % members for j in range(size)) for start in range(members)]


def ensemble_by_size(probs: list[torch.Tensor], targets: torch.Tensor) -> tuple[float, ...]:
    """[m - 1]: the mean ensemble accuracy over the subsets of m members (see the module)."""
    return tuple(statistics.fmean(_accuracy(sum(probs[i] for i in subset) / size, targets)
                                  for subset in _subsets(size, len(probs)))
                 for size in range(1, len(probs) + 1))


def diversity(probs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> Diversity:
    """The group's metrics from each member's [N, C] probabilities and [N] targets."""
    dists, y = _checked(probs, targets)
    accs = [_accuracy(p, y) for p in dists]
    ensemble = _accuracy(sum(dists) / len(dists), y)
    by_size = ensemble_by_size(dists, y)
    if len(dists) == 1:
        return Diversity(1, accs[0], None, ensemble, None, None, None, by_size)
    preds = [p.argmax(dim=1) for p in dists]
    neg_entropy = [torch.xlogy(p, p).sum(dim=1) for p in dists]  # sum p log p, 0 log 0 = 0
    log_clamped = [p.clamp_min(FLOAT16_TINY).log() for p in dists]
    pairs = list(itertools.combinations(range(len(dists)), 2))
    disagreement = statistics.fmean((preds[i] != preds[j]).double().mean().item()
                                    for i, j in pairs)
    kl = statistics.fmean((neg_entropy[i] - (dists[i] * log_clamped[j]).sum(dim=1)).mean().item()
                          for i, j in itertools.permutations(range(len(dists)), 2))
    js = statistics.fmean((0.5 * (neg_entropy[i] + neg_entropy[j]) - torch.xlogy(
        mix := 0.5 * (dists[i] + dists[j]), mix).sum(dim=1)).mean().item() for i, j in pairs)
    return Diversity(len(dists), statistics.fmean(accs), statistics.stdev(accs), ensemble,
                     disagreement, kl, js, by_size)
