"""Callbacks: rewind snapshots and resume points (with RNG state).

The resume tests' fault injection (``KillSwitch``) is not here: ``training/failpoints.py``."""

from __future__ import annotations

import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from lightning_lth.errors import LTHError
from lightning_lth.io import save_json, save_tensors


def check_rewind_epochs(epochs, max_epochs: int | None = None) -> list[int]:
    """Sorted unique rewind epochs; each an integer in [0, max_epochs]."""
    checked = []
    for epoch in epochs:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise LTHError(f"rewind epoch {epoch!r} is not allowed: rewind epochs are "
                           f"integers >= 0")
        if max_epochs is not None and max_epochs >= 0 and epoch > max_epochs:
            raise LTHError(f"rewind epoch {epoch} is beyond trainer.max_epochs={max_epochs}; "
                           f"allowed: 0..{max_epochs}")
        checked.append(epoch)
    return sorted(set(checked))


def snapshot_name(epoch: int) -> str:
    return f"epoch_{epoch}.pt"


def completed_epochs(trainer: L.Trainer) -> int:
    """Epochs fully trained so far (restored counters included once training has started)."""
    return trainer.fit_loop.epoch_progress.current.completed


class RewindSnapshots(L.Callback):
    """Saves ``<dirpath>/epoch_<k>.pt`` after k epochs (k = 0: the init) and ``final.pt``.

    Each file holds {"state_dict": net weights + BN buffers, "epoch": k, "meta": ...} and is
    written atomically on global rank 0. ``dirpath`` defaults to ``<log_dir>/rewind``.

    The init is saved only by a fit that starts from scratch: Lightning restores a checkpoint's
    weights before ``on_fit_start`` but its epoch counters after it, so a resumed fit must not
    look at the counters there (it would save trained weights as epoch 0). A resumed fit drops
    the snapshots of epochs its checkpoint had not reached: they belong to the killed try's
    future, and this fit writes them once, from its own trajectory.
    """

    FINAL = "final.pt"  # the last epoch's weights, beside the snapshots

    def __init__(self, epochs: list[int] = (0,), dirpath: str | None = None,
                 save_final: bool = True):
        self.epochs = check_rewind_epochs(epochs)
        self.dirpath = Path(dirpath) if dirpath else None
        self.save_final = save_final

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        check_rewind_epochs(self.epochs, trainer.max_epochs)
        if self.dirpath is None:
            self.dirpath = Path(trainer.log_dir or trainer.default_root_dir) / "rewind"

    def _save(self, trainer, pl_module, name: str, epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        hp = pl_module.hparams
        state = {key: value.detach().cpu().clone()
                 for key, value in pl_module.net.state_dict().items()}
        meta = {"model": hp.get("arch"), "width": hp.get("width"), "epoch": epoch}
        save_tensors({"state_dict": state, "epoch": epoch, "meta": meta}, self.dirpath / name)

    def on_fit_start(self, trainer, pl_module):
        if trainer.ckpt_path is not None:  # known from here on, not yet in setup
            return
        existing = sorted(p.name for p in self.dirpath.glob("*.pt")) if self.dirpath.is_dir() \
            else []
        if existing and trainer.is_global_zero:  # under DDP, rank 0 may have saved epoch 0
            raise LTHError(f"{self.dirpath} already holds snapshots ({', '.join(existing[:3])}"
                           f"...); choose another dirpath, or resume with --ckpt_path")
        if 0 in self.epochs:
            self._save(trainer, pl_module, snapshot_name(0), 0)

    def on_train_start(self, trainer, pl_module):
        if trainer.ckpt_path is None or not trainer.is_global_zero:
            return
        reached = completed_epochs(trainer)
        for epoch in self.epochs:
            if epoch > reached:
                (self.dirpath / snapshot_name(epoch)).unlink(missing_ok=True)

    def on_train_epoch_end(self, trainer, pl_module):
        done = trainer.current_epoch + 1
        if done in self.epochs:
            self._save(trainer, pl_module, snapshot_name(done), done)

    def on_fit_end(self, trainer, pl_module):
        if self.save_final:
            self._save(trainer, pl_module, self.FINAL, trainer.current_epoch)


def _rng_state() -> dict:
    """Every generator's state, as tensors and plain values (checkpoints load weights-only)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumePoints(L.Callback):
    """Atomic ``<dirpath>/last.ckpt`` at every epoch boundary, every ``every_n_steps`` steps
    and every ``every_minutes`` of training, so a kill loses at most that much work.

    The epoch's checkpoint is taken in ``on_train_epoch_end`` (after the epoch's validation
    and, being later in the callback list, after ``RewindSnapshots``), the point Lightning
    resumes from as "epoch done". A step checkpoint is never taken at an epoch's last batch:
    resuming there, Lightning counts the epoch as done without running its epoch-end hooks,
    so that epoch's rewind snapshot would never be written.

    The checkpoint also carries every random generator's state (restored when training
    resumes), and the training loader saves its position (``DeviceLoader.state_dict``), so a
    resumed fit continues the same trajectory. All ranks take part in each save (Lightning's
    save has a barrier); rank 0's clock decides the timed ones.
    """

    FILE = "last.ckpt"
    CLOCK_STEPS = 20  # a timed save is at most this many steps late

    def __init__(self, dirpath: str | Path, every_n_steps: int | None = None,
                 every_minutes: float | None = 10.0):
        self.path = Path(dirpath) / self.FILE
        self.every_n_steps = every_n_steps
        self.every_seconds = None if every_minutes is None else 60.0 * every_minutes
        self._last_save = time.monotonic()
        self._restored_rng: dict | None = None

    def state_dict(self) -> dict:
        return {"rng": _rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_rng = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module):
        # Applied here, after Lightning has restored everything else, right before training.
        if self._restored_rng is not None:
            _set_rng_state(self._restored_rng)
            self._restored_rng = None
        self._last_save = time.monotonic()

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole training state
        if trainer.is_global_zero:  # what the store's "resume" event reports
            save_json({"epoch": trainer.current_epoch, "global_step": trainer.global_step},
                      self.path.with_suffix(".json"))
        self._last_save = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's own checkpoint follows
        due = bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0
        # The clock every CLOCK_STEPS steps: under DDP rank 0's answer is a collective.
        if self.every_seconds is not None and trainer.global_step % self.CLOCK_STEPS == 0:
            late = time.monotonic() - self._last_save >= self.every_seconds
            due = due or trainer.strategy.broadcast(late)
        if due:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer)
