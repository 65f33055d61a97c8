"""Models: the registry (``registry.py``: ``register_model``, ``build_model``, a dotted-path
``model.arch``) and the built-ins it registers on import (``mlp``, ``resnet``, ``vgg``).
``from lightning_lth.models import register_model`` is the path a user's own model imports."""

from lightning_lth.models import mlp, resnet, vgg  # noqa: F401  (register the built-ins)
from lightning_lth.models.registry import (
    MODEL_NUMERICS,
    MODELS,
    build_model,
    check_forward,
    example_input,
    model_numerics,
    register_model,
    resolve_arch,
)

__all__ = ["MODELS", "MODEL_NUMERICS", "build_model", "check_forward", "example_input",
           "model_numerics", "register_model", "resolve_arch"]
