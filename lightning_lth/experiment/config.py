"""The ``study:`` section of a config: everything beyond one training run.

``fit``/``validate``/``test`` ignore it; ``prune``, ``match``, ``experiment`` and ``plan``
read it. Defaults are the paper's (Appendix A.1, A.5) and the authors' code (method.md).
IMP's section (``PruneSettings``) is defined by IMP itself, ``sparsity/imp.py``,
and used here as ``study.prune``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from lightning_lth.ranges import InterpolationPoints, Momentum
from lightning_lth.sparsity.imp import PruneSettings  # IMP owns its settings

SEED_MAX = 2**32 - 1  # numpy's, which seed_everything seeds too

WandbMode = Literal["auto", "online", "offline", "disabled"]  # tracking.MODES


@dataclass
class MatchSettings:
    """How pi is found: one match stage per (method, matching epoch), one permuted arm each.

    ``epochs``: a bare j is B at epoch j and A at T; a pair [i, j] is A at i and B at j. None
    is [T], the paper's (both nets trained). A study that needs B only up to some epoch < T
    trains B only that far. ``methods``: the first one is the paper's comparison point."""

    methods: list[str] = field(default_factory=lambda: ["activation"])
    """How pi is found (activation, weight); the first is the paper's comparison point."""
    epochs: list[int | list[int]] | None = None
    """Matching epochs: j (B at j, A at T) or [i, j] (A at i, B at j); null: [T]."""
    num_batches: PositiveInt | None = None
    """Batches the activation matching reads; null: one pass over the training set."""
    interpolation_points: InterpolationPoints = 11
    """Alphas on the A-B curve: both ends and at least one between."""
    bn_reset_batches: PositiveInt | None = None
    """Batches for the BN (and REPAIR) statistics at each alpha; null: one pass."""
    seed: NonNegativeInt = 0
    """Seed of weight matching's order over the permutation groups."""
    repair: bool = False
    """Also the REPAIR curves (Jordan et al. 2023): for nets without BatchNorm."""
    cuda_graphs: bool = True
    """On one CUDA device, each batch's two forwards and moment updates as one CUDA graph
    (the same numbers); false: eagerly, for a net whose forward cannot be captured."""


@dataclass
class SparseSettings:
    """The three arms: SGD, momentum, wd, lr; cosine to 0 over T - k epochs."""

    lr: PositiveFloat = 0.02
    """The arms' peak learning rate."""
    momentum: Momentum = 0.9
    """The arms' SGD momentum, in [0, 1)."""
    weight_decay: NonNegativeFloat = 5e-4
    """The arms' weight decay."""


@dataclass
class OnlyCells:
    """Narrow the experiment to part of the grid (a sweep agent runs one cell)."""

    sparsity: float | None = None
    """Only this entry of study.sparsities; null: all."""
    rewind_epoch: int | None = None
    """Only this entry of study.rewind_epochs; null: all."""
    arm: str | None = None
    """Only this entry of study.arms; null: all."""
    match_epoch: int | list[int] | None = None
    """Only this entry of study.match.epochs; null: all."""
    match_method: str | None = None
    """Only this entry of study.match.methods; null: all."""
    replicate: int | None = None
    """Only this replicate r in 0..study.replicates-1 (its B_r, pi_r and arms); null: all."""


@dataclass
class ResumeSettings:
    """How often a training stage writes its resume checkpoint (besides every epoch start).

    Not part of any key: resume is exact, so the cadence cannot change a number."""

    every_minutes: PositiveFloat | None = 10.0
    """A resume checkpoint at least this often (minutes of training); null: never by time."""
    every_n_steps: PositiveInt | None = None
    """A resume checkpoint every this many optimizer steps; null: never by steps."""


@dataclass
class Study:
    """The study: the grid of sparsities x rewind epochs x arms, and where it is kept."""

    store: str = "store"
    """The stage store's folder (created if new)."""
    sparsities: list[float] = field(default_factory=lambda: [0.8, 0.9, 0.95, 0.97])
    """Target sparsities, each in [0, 1): the fraction of prunable weights pruned."""
    rewind_epochs: list[int] = field(default_factory=lambda: [0, 5, 10, 15, 20, 25, 50, 75, 100])
    """Rewind epochs k (each < trainer.max_epochs): the arms train from epoch k."""
    arms: list[str] = field(default_factory=lambda: ["lth", "naive", "permuted"])
    """The arms trained at each (sparsity, k): lth, naive, permuted, or registered ones."""
    seed_b_offset: int = 1000
    """Dense B's seed = seed_everything + this (not 0: B would be A)."""
    replicates: PositiveInt = 1
    """R: one dense A, R dense B's. Replicate r trains every arm again: LTH under its own data
    order, naive and permuted from B_r (docs/replicates.md); 1: the paper's study."""
    prune: PruneSettings = field(default_factory=PruneSettings)
    match: MatchSettings = field(default_factory=MatchSettings)
    sparse: SparseSettings = field(default_factory=SparseSettings)
    only: OnlyCells = field(default_factory=OnlyCells)
    resume: ResumeSettings = field(default_factory=ResumeSettings)
    fuse: PositiveInt | None = None
    """Arms (of one k) trained side by side as one stacked model, this many per group; 1: one
    after another; null: the training device's default (runner.FUSE_DEFAULT)."""
    keep_outputs: bool = True
    """Each dense net, target IMP round and arm keeps its test-set softmax outputs (float16,
    test_outputs.pt) for the diversity metrics; false for huge test sets (README)."""
    wandb_project: str = "lightning_lth"
    """The W&B project of every stage's run."""
    wandb_mode: WandbMode = "auto"
    """auto: online when logged in to W&B, else offline; or online, offline, disabled."""
    weights_a: str | None = None
    """Trained dense A (final.pt) instead of the store's stage; the arms rewind to the
    snapshots beside it (epoch_<k>.pt in the same folder) or refuse to run."""
    weights_b: str | None = None
    """Trained dense B (final.pt) instead of the store's stage, snapshots beside it."""
    mask: str | None = None
    """A's mask instead of the store's IMP stage; match permutes it."""
