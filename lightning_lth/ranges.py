"""Number ranges the config parser enforces (its error names the setting, the value and the
range): shared by IMP's settings (``sparsity/imp.py``) and the study's (``experiment/config.py``)."""

from jsonargparse.typing import restricted_number_type

Momentum = restricted_number_type("Momentum", float, [(">=", 0), ("<", 1)], join="and")
InterpolationPoints = restricted_number_type("InterpolationPoints", int, [(">=", 3)])
