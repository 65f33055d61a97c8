"""Permutation specs: which axes of which tensors a hidden-unit permutation touches.

A :class:`PermutationSpec` is one declarative table. Every parameter and buffer of the model
(BatchNorm ``weight``, ``bias``, ``running_mean`` and ``running_var`` included; only
``num_batches_tracked`` is skipped) maps to a tuple with one entry per tensor axis: the name of
the permutation group that permutes that axis, or ``None``. A group is a set of hidden units
that must be permuted together: a layer's output channels, or, in a ResNet, every channel of a
residual stream. Each group also names its *matching point*, the module (or graph node) whose
output carries the group's units, which activation matching reads (see ``matching.py``).

A model may declare its own spec with a ``permutation_spec()`` method (the built-in ResNet20,
VGG11 and MLP do); ``trace.get_spec`` asks the model for it, or else derives one from the model's
torch.fx graph (``trace.py``), and :func:`check_spec` verifies any spec on any model by
permuting a copy at random and comparing outputs.

Permutation convention, used by every function in this package: ``perm[group]`` is a
LongTensor ``p`` of the group's size and the permuted net's unit ``j`` is the original net's
unit ``p[j]`` (``tensor.index_select(axis, p)`` on every axis of the group). ``match(A, B)``
returns the ``p`` for which ``pi(A)`` unit ``j`` lines up with ``B`` unit ``j``.

Flattened axes: an axis whose size is ``k`` times its group's size is viewed as
``(group size, k)`` in row-major order and permuted on the first factor. That is how
``torch.flatten`` lays out an ``N, C, H, W`` feature map, so a linear layer reading a flattened
conv output (VGG's classifier when the last map is larger than 1x1) declares the conv's group
on its input axis. The group's size is the smallest axis size that carries it.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lth.errors import LTHError
from lightning_lth.sparsity.mask import Mask

SKIPPED_BUFFERS = ("num_batches_tracked",)
POST_OPS = (None, "relu")


@dataclass(frozen=True)
class MatchPoint:
    """Where activation matching reads a group's units: the output of ``module``, or of the
    graph node ``node`` of the model's torch.fx trace (``trace.py``).

    ``post`` is applied to that output first: ``"relu"`` for a point after a nonlinearity that
    is not a module of its own (a ResNet block's ``bn1`` output goes through a ReLU module that
    the block calls twice, so the point is ``bn1`` + ``post="relu"``). ``node`` names outputs
    that no module call returns alone, such as a functional op's output or one call of a module
    called twice; a derived spec uses it only when no module fits (module hooks need no trace).
    Give exactly one of ``module`` and ``node``. The output's dimension 1 is the channel
    dimension; every other position (batch, spatial) is one sample.
    """

    module: str | None = None
    post: str | None = None
    node: str | None = None

    def __post_init__(self):
        if (self.module is None) == (self.node is None):
            raise LTHError(f"a match point names exactly one of a module and a graph node; got "
                           f"module={self.module!r}, node={self.node!r}")
        if self.post not in POST_OPS:
            raise LTHError(f"match point post-op {self.post!r} is not supported; valid: "
                           f"{', '.join(map(repr, POST_OPS))}")

    @property
    def where(self) -> str:
        """How messages name the point."""
        return f"module {self.module!r}" if self.node is None else f"graph node {self.node!r}"


@dataclass
class PermutationSpec:
    """axes: tensor name -> group (or None) per axis; points: group -> MatchPoint.

    check_input_shape: the shape of one input sample the model accepts (no batch dimension);
    :func:`check_spec` feeds a small random batch of that shape.
    """

    axes: dict[str, tuple[str | None, ...]]
    points: dict[str, MatchPoint] = field(default_factory=dict)
    check_input_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        self.axes = {name: tuple(groups) for name, groups in self.axes.items()}
        self.points = {g: p if isinstance(p, MatchPoint) else
                       (MatchPoint(p) if isinstance(p, str) else MatchPoint(*p))
                       for g, p in self.points.items()}

    @property
    def groups(self) -> dict[str, list[tuple[str, int]]]:
        """group -> [(tensor name, axis), ...], in table order."""
        out: dict[str, list[tuple[str, int]]] = {}
        for name, groups in self.axes.items():
            for axis, group in enumerate(groups):
                if group is not None:
                    out.setdefault(group, []).append((name, axis))
        return out

    def group_sizes(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Each group's number of units, read from the tensors' shapes (see module doc)."""
        sizes = {}
        for group, entries in self.groups.items():
            dims = [(name, axis, state[name].shape[axis]) for name, axis in entries
                    if name in state]
            if not dims:
                continue
            n = min(d for _, _, d in dims)
            for name, axis, d in dims:
                if n == 0 or d % n:
                    raise LTHError(f"permutation group {group!r}: axis {axis} of {name!r} has "
                                   f"size {d}, not a multiple of the group's size {n}")
            sizes[group] = n
        return sizes

    def validate(self, model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Structural checks against a model or state dict; returns the group sizes.

        Every parameter and buffer (but num_batches_tracked) must be in the table, each
        entry must name existing tensors with one group entry per axis, and every group must
        have a match point.
        """
        state = _state_of(model_or_state)
        for name in state:
            if _skipped(name):
                continue
            if name not in self.axes:
                raise LTHError(f"permutation spec has no entry for {name!r}; every parameter "
                               f"and buffer must be listed (use None for an axis that is not "
                               f"permuted)")
        for name, groups in self.axes.items():
            if name not in state:
                raise LTHError(f"permutation spec names {name!r}, which the model does not "
                               f"have; model tensors: {', '.join(list(state)[:6])}, ...")
            if len(groups) != state[name].dim():
                raise LTHError(f"permutation spec for {name!r} has {len(groups)} axis "
                               f"entries, the tensor has {state[name].dim()} axes "
                               f"{tuple(state[name].shape)}")
        for group in self.groups:
            if group not in self.points:
                raise LTHError(f"permutation group {group!r} has no match point; add "
                               f"points[{group!r}] = MatchPoint(module_name)")
        return self.group_sizes(state)


def declared_spec(model: nn.Module) -> PermutationSpec | None:
    """The model's own spec (its ``permutation_spec()`` method), or None if it declares none
    (``trace.get_spec`` then derives one from its graph)."""
    declare = getattr(model, "permutation_spec", None)
    if declare is None:
        return None
    spec = declare()
    if not isinstance(spec, PermutationSpec):
        raise LTHError(f"{type(model).__name__}.permutation_spec() returned "
                       f"{type(spec).__name__}, expected a PermutationSpec")
    return spec


def no_spec_error(model: nn.Module) -> LTHError:
    """A model without a declared spec, and no example input to derive one with."""
    return LTHError(f"model {type(model).__name__} declares no permutation spec and no "
                    f"example_input was given to derive one from its graph: pass "
                    f"get_spec(model, example_input=<a batch>) or add a "
                    f"permutation_spec() method returning a "
                    f"lightning_lth.symmetry.PermutationSpec")


def _skipped(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in SKIPPED_BUFFERS


def _state_of(obj) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict(keep_vars=False)
    if isinstance(obj, Mask):
        return obj.tensors
    return obj


# ----------------------------------------------------------------------------------------------
# applying permutations


def permute_axis(tensor: torch.Tensor, axis: int, perm: torch.Tensor) -> torch.Tensor:
    """index_select ``perm`` on ``axis``; an axis k times longer is viewed as (len(perm), k)."""
    n, size = perm.numel(), tensor.shape[axis]
    perm = perm.to(tensor.device)
    if size == n:
        return tensor.index_select(axis, perm)
    if n == 0 or size % n:
        raise LTHError(f"cannot permute an axis of size {size} with a permutation of {n} "
                       f"units")
    shape = tensor.shape
    folded = tensor.reshape(*shape[:axis], n, size // n, *shape[axis + 1:])
    return folded.index_select(axis, perm).reshape(shape)


def _check_perm(group: str, perm: torch.Tensor, size: int | None) -> torch.Tensor:
    if not isinstance(perm, torch.Tensor):
        perm = torch.as_tensor(perm)
    perm = perm.to(torch.long).flatten()
    n = perm.numel()
    if size is not None and n != size:
        raise LTHError(f"permutation for group {group!r} has {n} entries, the group has "
                       f"{size} units")
    if not torch.equal(perm.sort().values.cpu(), torch.arange(n)):
        raise LTHError(f"permutation for group {group!r} is not a permutation of 0..{n - 1}")
    return perm


def apply_permutation(obj, spec: PermutationSpec, perm: Mapping[str, torch.Tensor]):
    """Permute a state dict (returns a new dict) or a :class:`Mask` (returns a new Mask with a
    copy of the same meta). Tensors keep dtype and device; num_batches_tracked is copied.

    A state dict must cover the whole spec's tensors it contains; a Mask may hold any subset of
    the spec's tensors. Every group that touches a present tensor needs an entry in ``perm``.
    """
    if isinstance(obj, Mask):
        return Mask(_permute_tensors(obj.tensors, spec, perm), dict(obj.meta))
    if not isinstance(obj, Mapping):
        raise LTHError(f"apply_permutation takes a state dict or a Mask, got "
                       f"{type(obj).__name__}")
    return _permute_tensors(obj, spec, perm)


def _permute_tensors(tensors, spec, perm):
    sizes = spec.group_sizes(tensors)
    checked: dict[str, torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        if _skipped(name):
            out[name] = tensor.clone()
            continue
        if name not in spec.axes:
            raise LTHError(f"{name!r} is not in the permutation spec")
        groups = spec.axes[name]
        if len(groups) != tensor.dim():
            raise LTHError(f"permutation spec for {name!r} has {len(groups)} axis entries, "
                           f"the tensor has {tensor.dim()} axes")
        result = tensor
        for axis, group in enumerate(groups):
            if group is None:
                continue
            if group not in checked:
                if group not in perm:
                    raise LTHError(f"no permutation given for group {group!r} (needed by "
                                   f"{name!r})")
                checked[group] = _check_perm(group, perm[group], sizes.get(group))
            result = permute_axis(result, axis, checked[group])
        out[name] = result if result is not tensor else tensor.clone()
    return out


def identity_permutation(sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    return {g: torch.arange(n) for g, n in sizes.items()}


def random_permutation(sizes: Mapping[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A random permutation per group (never the identity for a group of 2+ units);
    deterministic for a seed, generated on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for group in sorted(sizes):
        n = sizes[group]
        p = torch.randperm(n, generator=gen)
        if n > 1 and torch.equal(p, torch.arange(n)):
            p = p.roll(1)
        out[group] = p
    return out


def invert_permutation(perm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {g: torch.argsort(p) for g, p in perm.items()}


# ----------------------------------------------------------------------------------------------
# the checker


@contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode inside the block; every module's mode restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


def _perturbed_state(model: nn.Module, dtype, seed: int) -> dict[str, torch.Tensor]:
    """The model's float tensors in ``dtype``, each jittered, so that a spec entry missing for
    a tensor whose values are all equal (fresh BatchNorm, zero biases) is caught. Positive
    tensors (BN weight, running_var) are scaled by factors in [0.8, 1.2) and stay positive;
    others get uniform noise within +-0.2 x their mean magnitude (0.1 if zero). The noise is
    uniform float32 (a few times cheaper than normal float64 on a CPU, which matters for
    70M-parameter nets), drawn on the tensors' device from a generator seeded with ``seed``
    (deterministic per device)."""
    state, generators = {}, {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if not t.numel():
            state[name] = t.to(dtype, copy=True)
            continue
        if t.device not in generators:
            generators[t.device] = torch.Generator(device=t.device).manual_seed(seed)
        t = t.detach().to(torch.promote_types(t.dtype, torch.float32))
        noise = torch.rand(t.shape, generator=generators[t.device], dtype=t.dtype,
                           device=t.device).sub_(0.5)  # in [-0.5, 0.5)
        if float(t.amin()) > 0:
            noise.mul_(0.4).add_(1).mul_(t)
        else:
            scale = float(torch.linalg.vector_norm(t, 1)) / t.numel()
            noise.mul_(0.4 * (scale if scale > 0 else 0.1)).add_(t)
        state[name] = noise.to(dtype)
    return state


@torch.no_grad()
def check_spec(model: nn.Module, spec: PermutationSpec | None = None,
               x: torch.Tensor | None = None, atol: float = 1e-4, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> None:
    """Raise LTHError unless permuting every group at random leaves the model's function alone.

    Runs the model in eval mode (each module's mode is restored after) on a jittered copy of
    its float tensors in ``dtype`` (``torch.func.functional_call``: the model itself is neither
    changed nor copied; see :func:`_perturbed_state`). float64 by default: on a GPU, float32
    convolutions may run in TF32, whose ~1e-3 relative error would fail the tolerance. Passes
    when ``max|f_perm(x) - f(x)| <= atol * max|f(x)|``. On failure each group is tried alone
    and the message names the groups whose permutation changes the output.
    ``x`` defaults to 2 random samples of ``spec.check_input_shape``.
    """
    if spec is None:
        spec = declared_spec(model)
        if spec is None:
            raise no_spec_error(model)
    sizes = spec.validate(model)
    gen = torch.Generator().manual_seed(seed)
    device = next(iter(model.parameters()), torch.empty(0)).device
    if x is None:
        if spec.check_input_shape is None:
            raise LTHError("permutation spec has no check_input_shape; pass an example input")
        x = torch.randn((2, *spec.check_input_shape), generator=gen, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    state = _perturbed_state(model, dtype, seed + 1)
    unsaved = {name: b.to(dtype) for name, b in model.named_buffers()  # non-persistent buffers
               if b.is_floating_point() and name not in state}

    def run(s):
        with eval_mode(model):
            out = torch.func.functional_call(model, {**unsaved, **s}, (x,))
        return out if isinstance(out, torch.Tensor) else out[0]

    reference = run(state)
    tol = atol * max(float(reference.abs().max()), 1e-12)
    perm = random_permutation(sizes, seed)
    if float((run(apply_permutation(state, spec, perm)) - reference).abs().max()) <= tol:
        return
    failing = []
    for group in sizes:
        single = identity_permutation(sizes)
        single[group] = perm[group]
        if float((run(apply_permutation(state, spec, single)) - reference).abs().max()) > tol:
            failing.append(group)
    named = ", ".join(repr(g) for g in failing) if failing else "(only all groups together)"
    raise LTHError(f"permutation spec of {type(model).__name__} is wrong: permuting group(s) "
                   f"{named} changes the model's output (tolerance {atol:g} x output scale); "
                   f"some tensor reading or writing those units is missing or mislabelled")
