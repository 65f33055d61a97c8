"""Rewind snapshots: the weights and BN buffers after k epochs, and the final weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lightning_lth.errors import LTHError
from lightning_lth.io import save_tensors


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


class RewindSnapshots(L.Callback):
    """Saves ``<dirpath>/epoch_<k>.pt`` after k epochs (k = 0: the init) and ``final.pt``.

    Each file holds {"state_dict": net weights + BN buffers, "epoch": k, "meta": ...} and is
    written atomically on global rank 0. ``dirpath`` defaults to ``<log_dir>/rewind``.
    """

    def __init__(self, epochs: list[int] = (0,), dirpath: str | None = None,
                 save_final: bool = True, overwrite: bool = False):
        self.epochs = check_rewind_epochs(epochs)
        self.dirpath = Path(dirpath) if dirpath else None
        self.save_final = save_final
        self.overwrite = overwrite  # the pipeline's own scratch folder may hold a killed try's

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        check_rewind_epochs(self.epochs, trainer.max_epochs)
        if self.dirpath is None:
            self.dirpath = Path(trainer.log_dir or trainer.default_root_dir) / "rewind"
        existing = sorted(p.name for p in self.dirpath.glob("*.pt")) if self.dirpath.is_dir() \
            else []
        if existing and not self.overwrite and trainer.ckpt_path is None:
            raise LTHError(f"{self.dirpath} already holds snapshots ({', '.join(existing[:3])}"
                           f"...); choose another dirpath, or resume with --ckpt_path")

    def _save(self, trainer, pl_module, name: str, epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        hp = pl_module.hparams
        state = {key: value.detach().cpu().clone()
                 for key, value in pl_module.net.state_dict().items()}
        meta = {"model": hp.get("arch"), "width": hp.get("width"), "epoch": epoch}
        save_tensors({"state_dict": state, "epoch": epoch, "meta": meta}, self.dirpath / name)

    def on_fit_start(self, trainer, pl_module):
        if 0 in self.epochs and trainer.global_step == 0 and trainer.current_epoch == 0:
            self._save(trainer, pl_module, snapshot_name(0), 0)

    def on_train_epoch_end(self, trainer, pl_module):
        done = trainer.current_epoch + 1
        if done in self.epochs:
            self._save(trainer, pl_module, snapshot_name(done), done)

    def on_fit_end(self, trainer, pl_module):
        if self.save_final:
            self._save(trainer, pl_module, "final.pt", trainer.current_epoch)
