"""The ``study:`` section of a config: everything beyond one training run.

``fit``/``validate``/``test`` ignore it; ``prune``, ``match``, ``experiment`` and ``plan``
read it. Defaults are the paper's (Appendix A.1, A.5) and the authors' code (method.md).
IMP's section (``PruneSettings``) is defined by IMP itself, ``sparsity/imp.py``,
and used here as ``study.prune``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from lightning_lth.ranges import InterpolationPoints, Momentum
from lightning_lth.sparsity.imp import PruneSettings  # IMP owns its settings

SEED_MAX = 2**32 - 1  # numpy's, which seed_everything seeds too

@dataclass
class MatchSettings:
    """How pi is found: one match stage per (method, matching epoch), one permuted arm each.

    ``epochs``: a bare j is B at epoch j and A at T; a pair [i, j] is A at i and B at j. None
    is [T], the paper's (both nets trained). A study that needs B only up to some epoch < T
    trains B only that far. ``methods``: the first one is the paper's comparison point."""

    methods: list[str] = field(default_factory=lambda: ["activation"])
    epochs: list[int | list[int]] | None = None
    num_batches: PositiveInt | None = None  # None: one pass over the training set
    interpolation_points: InterpolationPoints = 11  # both ends and at least one alpha between
    # BN (and REPAIR) statistics at each alpha; None: one pass
    bn_reset_batches: PositiveInt | None = None
    seed: NonNegativeInt = 0
    repair: bool = False  # also the REPAIR curves (Jordan et al. 2023): nets without BatchNorm
    # On one CUDA device, each batch's two forwards and moment updates replayed as one CUDA
    # graph (the same numbers); false: eagerly, for a net whose forward cannot be captured.
    cuda_graphs: bool = True


@dataclass
class SparseSettings:
    """The three arms: SGD, momentum, wd, lr; cosine to 0 over T - k epochs."""

    lr: PositiveFloat = 0.02
    momentum: Momentum = 0.9
    weight_decay: NonNegativeFloat = 5e-4


@dataclass
class OnlyCells:
    """Narrow the experiment to part of the grid (a sweep agent runs one cell)."""

    sparsity: float | None = None
    rewind_epoch: int | None = None
    arm: str | None = None
    match_epoch: int | list[int] | None = None  # one entry of study.match.epochs
    match_method: str | None = None  # one of study.match.methods


@dataclass
class ResumeSettings:
    """How often a training stage writes its resume checkpoint (besides every epoch start).

    Not part of any key: resume is exact, so the cadence cannot change a number."""

    every_minutes: PositiveFloat | None = 10.0
    every_n_steps: PositiveInt | None = None


@dataclass
class Study:
    store: str = "store"
    sparsities: list[float] = field(default_factory=lambda: [0.8, 0.9, 0.95, 0.97])
    rewind_epochs: list[int] = field(default_factory=lambda: [0, 5, 10, 15, 20, 25, 50, 75, 100])
    arms: list[str] = field(default_factory=lambda: ["lth", "naive", "permuted"])
    seed_b_offset: int = 1000  # dense B's seed = seed_everything + this
    prune: PruneSettings = field(default_factory=PruneSettings)
    match: MatchSettings = field(default_factory=MatchSettings)
    sparse: SparseSettings = field(default_factory=SparseSettings)
    only: OnlyCells = field(default_factory=OnlyCells)
    resume: ResumeSettings = field(default_factory=ResumeSettings)
    # Arms trained side by side as one stacked model, this many per group (arms of one k);
    # 1: one after another; None: the training device's default (runner.FUSE_DEFAULT).
    fuse: PositiveInt | None = None
    wandb_project: str = "lightning_lth"
    wandb_mode: str = "auto"  # auto: online when logged in, else offline; or online/offline/disabled
    # Explicit inputs instead of the store's stages (files you already have). The arms rewind
    # to the snapshots beside them (epoch_<k>.pt in the same folder) or refuse to run:
    weights_a: str | None = None  # trained dense A (final.pt)
    weights_b: str | None = None  # trained dense B (final.pt)
    mask: str | None = None  # A's mask, permuted by match
