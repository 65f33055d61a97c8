"""Failpoints: fault injection for the resume tests, switched on by an environment variable.

As a database's failpoints do, this lets a test stop a real training run at an exact point
(a SIGKILL, or a hang a scheduler then requeues) to check that a rerun continues from the last
resume checkpoint; ``tests/test_resume.py``, ``test_grid.py`` and ``test_slurm.py`` use it.
The runner adds a ``KillSwitch`` to a stage's callbacks only when ``LIGHTNING_LTH_KILL_AT``
names that stage, so unset (always, outside tests) it does nothing. Production code never
sets it.
"""

from __future__ import annotations

import os
import signal
import time

import lightning as L


class KillSwitch(L.Callback):
    """Test hook: SIGKILL this process at a chosen point of a chosen stage's training.

    Set ``LIGHTNING_LTH_KILL_AT="<stage name>@<epoch>:<batch>"`` (batch ``end``: as the
    epoch ends, between epochs). It fires after that point's resume checkpoint is written
    (callbacks run in list order: put it after ``ResumePoints``), so the kill tests can check
    that a rerun continues from it. With ``:HANG`` appended the process hangs there instead,
    until something kills it (SIGTERM only sets Lightning's flag, which is checked when the
    epoch ends): a job that a scheduler then requeues or preempts at a known point. Never set
    outside tests.
    """

    ENV = "LIGHTNING_LTH_KILL_AT"

    def __init__(self, epoch: int, batch: str, hang: bool = False):
        self.epoch, self.batch, self.hang = epoch, batch, hang

    @classmethod
    def for_stage(cls, name: str) -> KillSwitch | None:
        spec = os.environ.get(cls.ENV, "")
        stage, _, point = spec.rpartition("@")
        if not spec or stage != name:
            return None
        epoch, batch, *hang = point.split(":")
        return cls(int(epoch), batch, hang == ["HANG"])

    def _kill(self) -> None:
        while self.hang:  # until the scheduler's SIGKILL
            time.sleep(60)
        os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and self.batch == str(batch_idx):
            self._kill()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and self.batch == "end":
            self._kill()
