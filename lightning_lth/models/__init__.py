"""Model registry: a model is a name, a width multiplier and the data's shape.

Add a model by decorating its class with ``@register_model("name")`` in a module that is
imported (for a user's own package: ``--model.extra_imports=[mypkg.models]``); nothing in
the core changes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_lth.errors import LTHError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def decorate(cls):
        MODELS[name] = cls
        return cls

    return decorate


def build_model(name: str, width: int, num_classes: int, in_channels: int, image_size: int,
                **kwargs) -> nn.Module:
    if name not in MODELS:
        raise LTHError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise LTHError(f"model width must be an integer >= 1, got {width!r}")
    return MODELS[name](width=width, num_classes=num_classes, in_channels=in_channels,
                        image_size=image_size, **kwargs)


from lightning_lth.models import mlp, resnet, vgg  # noqa: E402,F401  (register the built-ins)
