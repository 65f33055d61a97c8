"""The config path of the rewind callback: ``class_path: lightning_lth.callbacks.RewindSnapshots``
(``configs/*.yaml``). The code lives in ``training/callbacks.py``; this module only keeps the
path users write working."""

from lightning_lth.training.callbacks import RewindSnapshots

__all__ = ["RewindSnapshots"]
