"""Find the permutation that aligns net A's hidden units to net B's.

``match(model_a, model_b, spec, method=...)`` returns ``{group: LongTensor p}`` (on the CPU)
such that ``apply_permutation(A's state, spec, p)`` lines up with B (convention in
``spec.py``: the permuted net's unit ``j`` is A's unit ``p[j]``).

- ``"activation"`` (the paper's method, method.md "Activation matching"): both nets in eval
  mode see the same training images; each group's match point is read by a forward hook on its
  module, or, when a spec names graph nodes, on an identity tap inserted after that node in the
  net's torch.fx trace (``trace.tap``, which then runs instead of the net, on the same weights);
  at each match point the per-channel sums, second moments and the A x B cross moment are
  accumulated in float64 (conv maps: every batch element and spatial position is a sample);
  correlation = cov / (std_A std_B + eps); the assignment maximising the summed correlation is
  solved with ``scipy.optimize.linear_sum_assignment``.
- ``"weight"``: Git Re-Basin's data-free weight matching, coordinate descent over groups.

Distributed (``context``: the DDP context the runner passes): activation matching all-reduces
(sums) the float64 moments across ranks, so the statistics cover every rank's batches, and then
broadcasts the permutations from rank 0, so every rank returns the identical ``pi`` (each rank
should feed its own shard of the data; every rank must call ``match``). Weight matching is
computed from the weights alone and is also broadcast from rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from lightning_lth.cuda_streams import WARMUP, on_side_stream
from lightning_lth.distributed import DistContext
from lightning_lth.errors import LTHError
from lightning_lth.symmetry.spec import (
    PermutationSpec,
    check_spec,
    identity_permutation,
    permute_axis,
)
from lightning_lth.symmetry.trace import get_spec, tap


def match(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec | None = None,
          method: str = "activation", batches: Iterable | None = None,
          num_batches: int | None = None, seed: int = 0, eps: float = 1e-4,
          max_iter: int = 100, check: bool = True,
          context: DistContext | None = None,
          correlations: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The permutation ``pi`` that aligns A to B: ``{group: LongTensor}`` on the CPU.

    spec: defaults to ``model_a.permutation_spec()``; it is checked first with
    :func:`check_spec` (a spec that does not preserve the function is refused with LTHError).
    batches: an iterable of ``(x, y)`` (or ``x``) training batches, needed for ``"activation"``;
    num_batches: how many to use (None = one full pass). seed: the group order of weight
    matching and the checker's random permutations. eps: the correlation's denominator guard
    (absolute, in squared activation units: it only damps units that are nearly constant on the
    data; trained nets' activations have std around 0.1 to 1).
    max_iter: weight matching's maximum passes over all groups.
    context: the DDP context (default: this process's); under DDP every rank must call.
    correlations: ``activation_correlations`` of these nets on these batches, when the caller
    has them already: activation matching then solves on them instead of another pass.
    """
    context = context if context is not None else DistContext()
    if method not in METHODS:
        raise LTHError(f"unknown matching method {method!r}; valid methods: "
                       f"{', '.join(METHODS)}")
    _check_same_architecture(model_a, model_b)
    spec = spec if spec is not None else get_spec(model_a)
    if check:
        check_spec(model_a, spec, seed=seed)
    return METHODS[method](model_a, model_b, spec, batches=batches, num_batches=num_batches,
                           seed=seed, eps=eps, max_iter=max_iter, context=context,
                           correlations=correlations)


def _by_activation(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, *,
                   batches: Iterable | None, num_batches: int | None, eps: float,
                   context: DistContext, correlations: Mapping[str, torch.Tensor] | None,
                   **_unused) -> dict[str, torch.Tensor]:
    if correlations is None:
        if batches is None:
            raise LTHError("activation matching needs training batches (batches=...)")
        correlations = activation_correlations(model_a, model_b, spec, batches,
                                               num_batches, eps, context)
    return _assign(correlations, context, _device(model_a))


def _by_weight(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, *, seed: int,
               max_iter: int, context: DistContext, **_unused) -> dict[str, torch.Tensor]:
    return weight_match(dict(model_a.named_parameters()), dict(model_b.named_parameters()),
                        spec, seed=seed, max_iter=max_iter, context=context)


# The matching methods: name -> solver, each called with every argument ``match`` takes (it
# uses those it needs). Config validation, the plan's labels (the first is the paper's
# method: its permuted arm carries no ``[method]`` suffix) and the report read this table.
METHODS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "activation": _by_activation,
    "weight": _by_weight,
}


def _check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    if type(model_a) is not type(model_b):
        raise LTHError(f"cannot match a {type(model_a).__name__} to a "
                       f"{type(model_b).__name__}: both nets must have the same architecture")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if list(state_a) != list(state_b):
        only = sorted(set(state_a) ^ set(state_b))
        raise LTHError(f"nets A and B differ in architecture: tensor names differ "
                       f"(e.g. {', '.join(only[:3]) or 'their order'})")
    for name, tensor in state_a.items():
        if tensor.shape != state_b[name].shape:
            raise LTHError(f"nets A and B differ in shape at {name!r}: "
                           f"{tuple(tensor.shape)} vs {tuple(state_b[name].shape)} "
                           f"(different widths?)")


def solve_assignment(score: torch.Tensor) -> torch.Tensor:
    """LongTensor ``p`` with ``p[j] = i`` maximising ``sum_j score[j, p[j]]`` (rows: B's units,
    columns: A's units)."""
    rows, cols = linear_sum_assignment(score.detach().to("cpu", torch.float64).numpy(),
                                       maximize=True)
    assert np.array_equal(rows, np.arange(len(rows)))
    return torch.from_numpy(cols.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# activation matching


CHUNK_ROWS = 16384  # CPU: samples per float32 partial sum before it joins the float64 totals


class _Moments:
    """Streaming sums for one group: n, sum x, sum x^2 (x = [a | b], A's and B's units side
    by side), and the cross moment a^T b.

    A forward hook writes its activations into one half of a (samples, 2 x units) buffer, in
    the (batch, *spatial, channel) order, so every position is one row; once B's half is in,
    the buffer is folded into the totals. The totals are float64. On a GPU the buffer is
    float64 and each batch is summed outright (float64 products do not use TF32). On the CPU,
    where float64 matrix products are several times slower, the buffer is float32 and summed in
    chunks of at most CHUNK_ROWS samples (relative error around 1e-6) that are added to the
    float64 totals. Memory: one buffer per group, about 2 x A's activations at the match
    points (float64 on a GPU).
    """

    def __init__(self, group: str, units: int):
        self.group, self.units = group, units
        self.n = self.sums = self.squares = self.cross = None
        self.buffer = self.ones = None
        self.pending = False

    def put(self, side: int, out, point) -> None:
        """side 0: A's activation (starts a batch); side 1: B's (completes it)."""
        units = self.units
        if not isinstance(out, torch.Tensor):
            raise LTHError(f"match point {point.where} returns {type(out).__name__}, "
                           f"expected a tensor")
        if out.dim() < 2 or out.shape[1] != units:
            raise LTHError(f"match point {point.where} gives shape {tuple(out.shape)}; "
                           f"group {self.group!r} expects {units} channels on dimension 1")
        if self.pending != bool(side):  # A twice before B, or B without A
            raise LTHError(f"match point {point.where} ran more than once in one forward "
                           f"pass; a match point must be a module that runs once (e.g. not a "
                           f"ReLU module reused inside a block: use the module before it with "
                           f"post='relu', or a graph node)")
        rows = out.numel() // units
        if side == 0:
            exact = out.device.type != "cpu" or out.dtype == torch.float64
            dtype = torch.float64 if exact else torch.float32
            if self.buffer is None or self.buffer.shape[0] != rows or \
                    self.buffer.device != out.device:
                self.buffer = torch.empty(rows, 2 * units, dtype=dtype, device=out.device)
                self.ones = torch.ones(rows, dtype=dtype, device=out.device) if exact else None
        elif rows != self.buffer.shape[0]:
            raise LTHError(f"match point {point.where}: A and B give different shapes")
        half = self.buffer[:, side * units:(side + 1) * units]
        half.view(out.shape[0], *out.shape[2:], units).copy_(out.detach().movedim(1, -1))
        if point.post == "relu":
            half.clamp_(min=0)
        self.pending = not side
        if side == 1:
            self._fold()

    def _fold(self) -> None:
        x, units = self.buffer, self.units
        if self.n is None:
            self.zero_totals(x.device)
        if self.ones is not None:  # float64 buffer: one pass each
            self.sums.addmv_(x.T, self.ones)
            self.squares.add_(torch.linalg.vector_norm(x, dim=0).square_())
            self.cross.addmm_(x[:, :units].T, x[:, units:])
        else:
            for start in range(0, x.shape[0], CHUNK_ROWS):
                chunk = x[start:start + CHUNK_ROWS]
                self.sums += chunk.sum(0)
                self.squares += (chunk * chunk).sum(0)
                self.cross += chunk[:, :units].T @ chunk[:, units:]
        self.n += x.shape[0]

    def zero_totals(self, device) -> None:
        zeros = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros((), **zeros)
        self.sums = torch.zeros(2 * self.units, **zeros)
        self.squares = torch.zeros(2 * self.units, **zeros)
        self.cross = torch.zeros(self.units, self.units, **zeros)

    def release(self) -> None:
        self.buffer = self.ones = None
        self.pending = False

    def all_reduce(self, context: DistContext) -> None:
        for tensor in (self.n, self.sums, self.squares, self.cross):
            context.sum_(tensor)

    def correlation(self, eps: float) -> torch.Tensor:
        """corr[i, j] between A's unit i and B's unit j."""
        units, n = self.units, self.n
        mean = self.sums / n
        std = (self.squares / n - mean ** 2).clamp_min(0).sqrt()
        mean_a, mean_b, std_a, std_b = mean[:units], mean[units:], std[:units], std[units:]
        cov = self.cross / n - torch.outer(mean_a, mean_b)
        return cov / (torch.outer(std_a, std_b) + eps)


class _GraphedPasses:
    """Both nets' forward passes over a batch, with the moment updates their hooks make, as
    one CUDA graph. On a GPU, matching is bound by launching its kernels (~350 a batch for
    ResNet20: two forwards, and per group the copies, clamps and moment products; measured on
    an H100), so each batch is one replay instead. The first ``WARMUP`` batches of a shape run
    eagerly on a side stream (cuDNN's choices, the buffers the hooks allocate); the next one of
    that shape is captured (hooks and all) and replayed, and so is every later one. A batch of
    another shape runs eagerly. A replay runs the captured kernels on the same buffers, so the
    moments are the eager run's."""

    def __init__(self, run_a, run_b, moments: dict[str, _Moments]):
        self.run_a, self.run_b, self.moments = run_a, run_b, moments
        self.graph: torch.cuda.CUDAGraph | None = None
        self.input: torch.Tensor | None = None
        self.kept: list = []  # the buffers the graph writes: alive while it may replay
        self.shape, self.eager_batches = None, 0

    def _passes(self, x: torch.Tensor) -> None:
        self.run_a(x)
        self.run_b(x)

    def __call__(self, x: torch.Tensor) -> None:
        if self.graph is None and self.eager_batches >= WARMUP and x.shape == self.shape:
            self.input = x.clone()
            self.kept = [m.buffer for m in self.moments.values()]
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):
                    self._passes(self.input)
            except RuntimeError as error:  # e.g. a forward that syncs with the CPU
                first = (str(error).strip().splitlines() or [""])[0][:200]
                raise LTHError(f"matching's passes cannot be captured as a CUDA graph "
                               f"({first}); set study.match.cuda_graphs=false") from None
        if self.graph is not None and x.shape == self.input.shape and x.dtype == self.input.dtype:
            self.input.copy_(x)
            self.graph.replay()  # capturing ran nothing: this batch is replayed too
            return
        self.eager_batches = self.eager_batches + 1 if x.shape == self.shape else 1
        self.shape = x.shape
        on_side_stream(x.device, self._passes, x)


def _inputs(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        return batch["x"] if "x" in batch else next(iter(batch.values()))
    return batch


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def activation_match(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                     batches: Iterable, num_batches: int | None = None,
                     eps: float = 1e-4,
                     context: DistContext | None = None) -> dict[str, torch.Tensor]:
    """Activation matching (module docstring). Does not run the spec checker: use match()."""
    context = context if context is not None else DistContext()
    correlations = activation_correlations(model_a, model_b, spec, batches, num_batches, eps,
                                           context)
    return _assign(correlations, context, _device(model_a))


def _assign(correlations: Mapping[str, torch.Tensor], context: DistContext | None,
            device: torch.device) -> dict[str, torch.Tensor]:
    # rows: B's units, columns: A's units -> p[j] = A's unit for B's unit j
    context = context if context is not None else DistContext()
    scores = {group: corr.T for group, corr in correlations.items()}
    return context.broadcast_tensors(solve_assignments(scores), device)


def matched_correlation(correlations: Mapping[str, torch.Tensor],
                        perm: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per group, the mean correlation of the unit pairs ``perm`` matches (B's unit j with
    A's unit ``perm[j]``): how well pi lines the nets up, whichever method found it."""
    return {group: float(corr[perm[group].cpu(), torch.arange(len(perm[group]))].mean())
            for group, corr in correlations.items()}


def perm_agreement(perm: Mapping[str, torch.Tensor],
                   reference: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per group, the fraction of units ``perm`` maps as ``reference`` does."""
    return {group: float((perm[group].cpu() == reference[group].cpu()).double().mean())
            for group in reference}


@torch.no_grad()
def activation_correlations(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                            batches: Iterable, num_batches: int | None = None,
                            eps: float = 1e-4, context: DistContext | None = None,
                            cuda_graphs: bool = True) -> dict[str, torch.Tensor]:
    """``{group: corr}`` on the CPU, ``corr[i, j]`` between A's unit i and B's unit j at the
    group's match point, over the batches of every rank (module docstring). On one CUDA
    device the passes are replayed as a CUDA graph (``_GraphedPasses``; ``cuda_graphs=False``:
    eagerly, the same numbers)."""
    context = context if context is not None else DistContext()
    if num_batches is not None and num_batches < 1:
        raise LTHError(f"num_batches must be >= 1 or None, got {num_batches}")
    sizes = spec.validate(model_a)
    moments = {group: _Moments(group, n) for group, n in sizes.items()}
    handles = []

    def hook(group, side):
        point = spec.points[group]

        def record(module, args, out):
            moments[group].put(side, out, point)
        return record

    modes = (model_a.training, model_b.training)
    device_a, device_b = _device(model_a), _device(model_b)
    used = 0
    try:
        model_a.eval()  # before tracing: fx bakes self.training in
        model_b.eval()
        run_a, run_b, readers_a, readers_b = _readers(model_a, model_b, spec, sizes)
        for group in sizes:
            handles.append(readers_a[group].register_forward_hook(hook(group, 0)))
            handles.append(readers_b[group].register_forward_hook(hook(group, 1)))
        replay = _GraphedPasses(run_a, run_b, moments) \
            if cuda_graphs and device_a == device_b and device_a.type == "cuda" else None
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            x = _inputs(batch)
            if replay is not None:
                replay(x.to(device_a, non_blocking=True))
            else:
                run_a(x.to(device_a, non_blocking=True))
                run_b(x.to(device_b, non_blocking=True))
            missing = sorted(g for g, m in moments.items() if m.pending)
            if missing:
                raise LTHError(f"match point(s) of group(s) {', '.join(missing)} ran in A but "
                               f"not in B")
            used += 1
    finally:
        for handle in handles:
            handle.remove()
        for m in moments.values():
            m.release()
        model_a.train(modes[0])
        model_b.train(modes[1])

    if context.active:
        for group in sorted(moments):  # same order on every rank
            if moments[group].n is None:  # this rank saw no batch: contribute zeros
                moments[group].zero_totals(context.collective_device(device_a))
            moments[group].all_reduce(context)
    for group, m in moments.items():
        if m.n is None or float(m.n) == 0:
            raise LTHError(f"activation matching saw no activations for group {group!r} "
                           f"(empty batches?)")
    return {group: moments[group].correlation(eps).cpu() for group in sizes}


def _readers(model_a, model_b, spec, sizes):
    """(what to run for A, for B, {group: module to hook} for A, for B). Module points are
    hooked on the nets; a spec with graph-node points runs each net's traced graph with a tap
    per point instead (``trace.tap``: same modules and weights)."""
    points = {group: spec.points[group] for group in sizes}
    if any(point.node is not None for point in points.values()):
        (run_a, taps_a), (run_b, taps_b) = tap(model_a, points), tap(model_b, points)
        return run_a, run_b, taps_a, taps_b
    modules_a, modules_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    for group, point in points.items():
        if point.module not in modules_a:
            raise LTHError(f"match point {point.module!r} of group {group!r} is not a module "
                           f"of {type(model_a).__name__}")
    return (model_a, model_b, {g: modules_a[p.module] for g, p in points.items()},
            {g: modules_b[p.module] for g, p in points.items()})


def solve_assignments(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """solve_assignment for each group, in parallel threads (scipy's solver releases the GIL;
    each result is independent of the threading)."""
    workers = min(len(scores), os.cpu_count() or 1)
    if workers <= 1:
        return {group: solve_assignment(score) for group, score in scores.items()}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {group: pool.submit(solve_assignment, score) for group, score in scores.items()}
        return {group: future.result() for group, future in futures.items()}


# ----------------------------------------------------------------------------------------------
# weight matching


def _rows(tensor: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """The tensor as (n, -1) float64 with ``axis`` (possibly a flattened (n, k) axis) first."""
    size = tensor.shape[axis]
    t = tensor.detach().to(dtype=torch.float64)
    if size != n:
        t = t.reshape(*t.shape[:axis], n, size // n, *t.shape[axis + 1:])
    return t.movedim(axis, 0).reshape(n, -1)


@torch.no_grad()
def weight_match(params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                 spec: PermutationSpec, seed: int = 0, max_iter: int = 100,
                 context: DistContext | None = None) -> dict[str, torch.Tensor]:
    """Git Re-Basin weight matching: maximise sum_params <W_B, pi(W_A)> by coordinate descent.

    For each group in a random (seeded) order: sum over every tensor carrying the group of
    W_B (group axis first, flattened) @ pi(W_A)^T, with pi applied to W_A's other axes;
    solve the assignment; keep it if it raises that group's objective. Stop after a pass with
    no change, or after max_iter passes. Only the tensors given are used (match() passes the
    parameters, not the BatchNorm running statistics).
    """
    context = context if context is not None else DistContext()
    groups = {g: [(name, axis) for name, axis in entries if name in params_a]
              for g, entries in spec.groups.items()}
    groups = {g: e for g, e in groups.items() if e}
    sizes = spec.group_sizes(params_a)
    perms = identity_permutation(sizes)
    gen = torch.Generator().manual_seed(seed)
    order = sorted(groups)
    used = {name for entries in groups.values() for name, _ in entries}
    device = params_b[next(iter(used))].device if used else torch.device("cpu")
    a64 = {name: params_a[name].detach().to(device, torch.float64) for name in used}
    b_rows = {(name, axis): _rows(params_b[name].to(device), axis, sizes[group])
              for group, entries in groups.items() for name, axis in entries}
    for _ in range(max_iter):
        changed = False
        for index in torch.randperm(len(order), generator=gen).tolist():
            group = order[index]
            n = sizes[group]
            score = None
            for name, axis in groups[group]:
                w_a = a64[name]
                for other, other_group in enumerate(spec.axes[name]):
                    if other != axis and other_group is not None:
                        w_a = permute_axis(w_a, other, perms[other_group])
                term = b_rows[name, axis] @ _rows(w_a, axis, n).T
                score = term if score is None else score + term
            new = solve_assignment(score)
            score = score.cpu()
            old_value = float(score[torch.arange(n), perms[group]].sum())
            new_value = float(score[torch.arange(n), new].sum())
            if new_value > old_value + 1e-12 * max(abs(old_value), 1.0):
                perms[group] = new
                changed = True
        if not changed:
            break
    return context.broadcast_tensors(perms, device)
