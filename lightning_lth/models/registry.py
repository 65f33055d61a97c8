"""Model registry: a model is a name, a width multiplier and the data's shape.

Add a model by decorating its class with ``@register_model("name")`` in a module that is
imported before the CLI runs; nothing in the core changes. ``numerics`` is the model's
numerics version (``lightning_lth/numerics.py``): bump it when a change to the class changes
what it computes (its init, its layers), so the stages that build it are keyed anew.

Or bring any model without registering it: ``model.arch`` is then the dotted path of an
``nn.Module`` class (or of a function returning one) and ``model.arch_kwargs`` its
arguments, e.g. ``arch: torchvision.models.resnet18`` with ``arch_kwargs: {num_classes: 10}``.
This is LightningCLI's ``class_path``/``init_args`` in the two fields the registry already
has, rather than a second ``model.net: {class_path, init_args}`` section: one place names the
model whichever kind it is, a registered name keeps working unchanged, and the stage keys,
labels and records that read ``model.arch`` need no second case.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lightning_lth.errors import LTHError

MODELS: dict[str, Callable[..., nn.Module]] = {}
MODEL_NUMERICS: dict[str, int] = {}  # name -> numerics version


def register_model(name: str, numerics: int = 1):
    def decorate(cls):
        MODELS[name] = cls
        MODEL_NUMERICS[name] = numerics
        return cls

    return decorate


def model_numerics(arch: str) -> int | None:
    """A registered model's numerics version; None for a dotted path (the user's code)."""
    return MODEL_NUMERICS.get(arch)


def resolve_arch(arch: str) -> Callable[..., nn.Module]:
    """A registered name, else a dotted path to an ``nn.Module`` class or a function that
    returns one (``torchvision.models.resnet18``), imported here."""
    if arch in MODELS:
        return MODELS[arch]
    module_name, _, attr = arch.rpartition(".") if isinstance(arch, str) else ("", "", "")
    if not module_name:
        raise LTHError(f"unknown model {arch!r}; valid models: {', '.join(sorted(MODELS))}, "
                       f"or a dotted path to an nn.Module class such as "
                       f"torchvision.models.resnet18")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise LTHError(f"model.arch {arch!r} does not import ({error}); give a registered "
                       f"name ({', '.join(sorted(MODELS))}) or a dotted path to an nn.Module "
                       f"class") from None
    if isinstance(found, type) and not issubclass(found, nn.Module) or not callable(found):
        raise LTHError(f"model.arch {arch!r} is not an nn.Module class or a function "
                       f"returning one")
    return found


def build_model(name: str, width: int, num_classes: int, in_channels: int, image_size: int,
                arch_kwargs: dict | None = None, **kwargs) -> nn.Module:
    """The net: a registered model gets ``width`` and the data's shapes; any other class (a
    dotted path) gets ``arch_kwargs`` and ``kwargs`` and of the shapes only those its
    signature names, as a user's class knows nothing of this project's arguments."""
    factory = resolve_arch(name)
    kwargs = {**(arch_kwargs or {}), **kwargs}
    if kwargs.get("num_classes", num_classes) != num_classes:
        raise LTHError(f"model.arch_kwargs.num_classes={kwargs['num_classes']!r} but the "
                       f"dataset has {num_classes} classes; drop it or set {num_classes}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise LTHError(f"model width must be an integer >= 1, got {width!r}")
    shapes = {"width": width, "num_classes": num_classes, "in_channels": in_channels,
              "image_size": image_size}
    if name not in MODELS:
        declared = inspect.signature(factory).parameters
        if width != 1 and "width" not in declared:
            raise LTHError(f"model.width={width} but {name} takes no width argument; use "
                           f"model.width=1 and set its size through model.arch_kwargs")
        shapes = {key: value for key, value in shapes.items() if key in declared}
    try:
        with warnings.catch_warnings():  # a zero-size layer warns; it is refused below
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            net = factory(**{**shapes, **kwargs})
    except TypeError as error:  # missing or unknown arguments
        raise LTHError(f"model.arch {name!r} cannot be built with model.arch_kwargs "
                       f"{sorted(kwargs)} ({error}); set its arguments in model.arch_kwargs"
                       ) from None
    if not isinstance(net, nn.Module):
        raise LTHError(f"model.arch {name!r} returned {type(net).__name__}, not an nn.Module")
    empty = [param for param, tensor in net.named_parameters() if tensor.numel() == 0]
    if empty:
        raise LTHError(f"model.arch {name!r} on the data's {in_channels}x{image_size}x"
                       f"{image_size} images has layers of size zero ({', '.join(empty[:3])}): "
                       f"the images are too small for it; pick a model for this dataset")
    return net


def example_input(in_channels: int, image_size: int, device=None) -> torch.Tensor:
    """A batch of 2 zero images of the data's shape: what ``get_spec`` traces a model with."""
    return torch.zeros(2, in_channels, image_size, image_size, device=device)


def check_forward(net: nn.Module, arch: str, num_classes: int, in_channels: int,
                  image_size: int) -> torch.Tensor:
    """Refuse a net that cannot turn a batch of the data's images into one score per class
    (before any training, so a bad pairing fails in a line, not a traceback after a log
    folder exists). Runs ``example_input`` once in eval mode, without gradients; returns it."""
    example = example_input(in_channels, image_size,
                            next(net.parameters(), torch.empty(0)).device)
    shown = f"model.arch {arch!r} on the data's {in_channels}x{image_size}x{image_size} images"
    training = net.training
    try:
        with torch.no_grad():
            out = net.eval()(example)
    except Exception as error:  # the model's own code: any exception is an input error here
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LTHError(f"{shown}: its forward fails ({first}); pick a model for this "
                       f"dataset (or an image size it accepts)") from None
    finally:
        net.train(training)
    wanted = (example.shape[0], num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != wanted:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LTHError(f"{shown}: its forward returns {got}, not one score per class "
                       f"{wanted} (the dataset has {num_classes} classes)")
    return example

