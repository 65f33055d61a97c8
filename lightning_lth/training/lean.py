"""Lightning's bookkeeping around every hook call, made cheap, with the same behaviour.

Lightning dispatches some 20 hooks a training step (module, callback and strategy hooks).
Around each it sets and restores ``LightningModule._current_fx_name`` (through
``nn.Module.__setattr__``, with its parameter, module and buffer checks: 3.8 us a time
against 0.5 us stored directly, on the 2-core CPU machine) and enters its profiler's context
manager (the pass-through one: 2.0 us against 0.4 us for a null context). With
``automatic_optimization`` decided once per trainer (``training/module.py``), this saves
about 0.25 ms a step there (docs/benchmarks/arm_stage_cpu_2026-12.md). Neither touches a
number.
"""

from __future__ import annotations

import contextlib

import lightning as L
from lightning.pytorch.profilers import PassThroughProfiler

_NOTHING = contextlib.nullcontext()  # reusable: it keeps no state


class LeanModule(L.LightningModule):
    """A LightningModule whose ``_current_fx_name`` (a plain string Lightning sets twice per
    hook call) is stored directly, not through ``nn.Module.__setattr__``."""

    def __setattr__(self, name, value):
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


class QuietProfiler(PassThroughProfiler):
    """Lightning's default profiler (records nothing) without a generator-based context
    manager per hook call. A study's stages and ``fit`` use it unless ``trainer.profiler``
    names one."""

    def profile(self, action_name: str):
        return _NOTHING


def profiler_or_quiet(profiler):
    """``trainer.profiler`` as configured, or ``QuietProfiler`` where it names none."""
    return QuietProfiler() if profiler is None else profiler
