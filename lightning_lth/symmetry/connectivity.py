"""Linear mode connectivity: loss and accuracy along (1 - a) * A + a * B, and the barrier.

Each curve has a *correction*, what is done to the interpolated net before it is evaluated:

- ``plain``: nothing; the interpolated weights (and BatchNorm running statistics) as they are.
- ``bn_reset`` (nets with BatchNorm): every BatchNorm's running statistics reset and
  recomputed on training data at every alpha (cumulative average, ``momentum=None``, over
  ``bn_batches`` training batches).
- ``repair``: REPAIR (Jordan et al., ICLR 2023): at every alpha, each channel written by a
  layer that carries a permutation group (the spec's conv and linear layers whose output axis
  is a group, i.e. every hidden layer's pre-activations) is renormalised so that its mean and
  std on the training batches are the interpolation ``(1 - a) * A's + a * B's`` of the two
  endpoints' (see :class:`Repair`). A layer whose output goes straight into a BatchNorm is
  left alone: the BatchNorm, reset in the same pass, already renormalises it (on a net whose
  every such layer feeds a BatchNorm, REPAIR is the BatchNorm reset).

The default correction, which the record's barriers report, is ``bn_reset`` for a net with
BatchNorm and ``plain`` otherwise. ``interpolation_curve`` returns a JSON-able dict
``{alphas, loss, acc, loss_barrier, error_barrier, correction, bn_recomputed}`` (and
``repaired``, the corrected layers, for REPAIR);
``compare_naive_matched`` computes the naive (A -> B) and matched (pi(A) -> B) curves under
every correction that applies (report.plots.plot_interpolation draws them).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from lightning_lth.errors import LTHError
from lightning_lth.symmetry.spec import PermutationSpec, apply_permutation
from lightning_lth.symmetry.trace import get_spec

MIN_ALPHAS = 11
PLAIN, BN_RESET, REPAIR = "plain", "bn_reset", "repair"
CORRECTIONS = (PLAIN, BN_RESET, REPAIR)


def interpolate_state(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * A + alpha * B for float tensors; integer buffers (num_batches_tracked)
    are taken from the nearer end."""
    if list(state_a) != list(state_b):
        raise LTHError("cannot interpolate: the two state dicts have different tensor names")
    out = {}
    for name, a in state_a.items():
        b = state_b[name]
        if a.shape != b.shape:
            raise LTHError(f"cannot interpolate: {name!r} has shape {tuple(a.shape)} vs "
                           f"{tuple(b.shape)}")
        if a.is_floating_point():
            out[name] = torch.lerp(a.detach(), b.detach().to(a.device, a.dtype), float(alpha))
        else:
            out[name] = (a if alpha < 0.5 else b).clone()
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def _inputs(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _inputs_targets(batch):
    if isinstance(batch, Mapping):
        return batch["x"], batch["y"]
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise LTHError("evaluation batches must be (x, y) pairs")
    return batch[0], batch[1]


def _limited(batches: Iterable, num_batches: int | None):
    for index, batch in enumerate(batches):
        if num_batches is not None and index >= num_batches:
            return
        yield batch


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the modules it measures have run."""


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    """One forward pass that a :class:`_Stop` hook may cut short."""
    try:
        model(x)
    except _Stop:
        pass


def _stop_after(module: nn.Module):
    def stop(_module, _args, _out):
        raise _Stop
    return module.register_forward_hook(stop)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable, num_batches: int | None = None,
                       norms: Sequence[_BatchNorm] | None = None,
                       stop: nn.Module | None = None) -> None:
    """Reset the running statistics of ``norms`` (None: every BatchNorm) and recompute them
    as the plain average over ``num_batches`` training batches (None = all). Only those layers
    run in train mode; the model is left in eval mode with the layers' momentum restored.
    ``stop``: a module after which each forward pass may end (nothing after it is needed)."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)] if norms is None \
        else list(norms)
    if not norms:
        return
    device = _device(model)
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    handle = _stop_after(stop) if stop is not None else None
    seen = 0
    try:
        for batch in _limited(batches, num_batches):
            _forward(model, _inputs(batch).to(device, non_blocking=True))
            seen += 1
    finally:
        if handle is not None:
            handle.remove()
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    if seen == 0:
        raise LTHError("recomputing BatchNorm statistics needs at least one training batch")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable,
             num_batches: int | None = None) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy in [0, 1]) in eval mode."""
    device = _device(model)
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in _limited(batches, num_batches):
        x, y = _inputs_targets(batch)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += int(y.shape[0])
    if count == 0:
        raise LTHError("evaluation saw no test samples")
    return loss_sum / count, correct / count


def barrier(alphas: Sequence[float], values: Sequence[float]) -> float:
    """max over alpha of value(a) - ((1 - a) value(0) + a value(1)); the ends are the first and
    last points."""
    a0, a1 = alphas[0], alphas[-1]
    v0, v1 = values[0], values[-1]
    return max(v - (v0 + (a - a0) / (a1 - a0) * (v1 - v0)) for a, v in zip(alphas, values, strict=True))


def make_alphas(num_alphas: int = MIN_ALPHAS) -> list[float]:
    if isinstance(num_alphas, bool) or not isinstance(num_alphas, int) or \
            num_alphas < MIN_ALPHAS:
        raise LTHError(f"the interpolation needs at least {MIN_ALPHAS} evenly spaced alphas, "
                       f"got {num_alphas!r}")
    return [i / (num_alphas - 1) for i in range(num_alphas)]


# ----------------------------------------------------------------------------------------------
# REPAIR


def repair_layers(model: nn.Module, spec: PermutationSpec) -> list[str]:
    """The modules whose output channels REPAIR corrects: every conv or linear layer whose
    weight's output axis carries a permutation group (the spec's writers; derived specs start
    each group at one). Refuses a group that no such layer writes: its units could not be
    corrected."""
    modules = dict(model.named_modules())
    layers, written = [], set()
    for tensor, groups in spec.axes.items():
        name, _, leaf = tensor.rpartition(".")
        module = modules.get(name)
        if leaf == "weight" and groups and groups[0] is not None and \
                isinstance(module, (nn.Linear, _ConvNd)) and \
                not isinstance(module, _ConvTransposeNd):
            layers.append(name)
            written.add(groups[0])
    unwritten = sorted(set(spec.groups) - written)
    if unwritten:
        raise LTHError(f"REPAIR: no conv or linear layer of {type(model).__name__} writes the "
                       f"units of permutation group(s) {', '.join(map(repr, unwritten))}; "
                       f"REPAIR corrects the outputs of conv and linear layers only")
    return layers


def _channel_axis(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


class _Moments:
    """Per-channel count, sum and sum of squares of a module's outputs, in float64."""

    def __init__(self, axis: int):
        self.axis, self.n, self.sums, self.squares = axis, 0, 0.0, 0.0

    def add(self, out: torch.Tensor) -> None:
        x = out.detach().movedim(self.axis, -1)
        x = x.reshape(-1, x.shape[-1]).double()
        self.n += x.shape[0]
        self.sums = self.sums + x.sum(0)
        self.squares = self.squares + (x * x).sum(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sums / self.n
        return mean, (self.squares / self.n - mean * mean).clamp_min(0).sqrt()


@torch.no_grad()
def channel_stats(model: nn.Module, names: Sequence[str], batches: Iterable,
                  num_batches: int | None = None, stop: str | None = None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (mean, std)} of each named module's output channels (population std,
    float64) over ``num_batches`` batches, in eval mode. ``stop``: the module after which each
    pass may end."""
    modules = dict(model.named_modules())
    moments = {name: _Moments(_channel_axis(modules[name])) for name in names}
    handles = [modules[name].register_forward_hook(
        lambda _m, _a, out, name=name: moments[name].add(out)) for name in names]
    if stop is not None:
        handles.append(_stop_after(modules[stop]))
    device = _device(model)
    model.eval()
    try:
        for batch in _limited(batches, num_batches):
            _forward(model, _inputs(batch).to(device, non_blocking=True))
    finally:
        for handle in handles:
            handle.remove()
    if any(m.n == 0 for m in moments.values()):
        raise LTHError("REPAIR: no training batch reached the layers it corrects")
    return {name: m.mean_std() for name, m in moments.items()}


class Repair:
    """REPAIR for one pair of endpoints (Jordan et al., ICLR 2023, "REPAIR: REnormalizing
    Permuted Activations for Interpolation Repair").

    On construction: which layers to correct (:func:`repair_layers`, less those whose output
    goes straight into a BatchNorm), the order they and the BatchNorms run in (one forward pass
    on the first training batch), and each corrected layer's per-channel mean and std at both
    endpoints (each endpoint evaluated as given, in eval mode). :meth:`apply` corrects a net
    loaded with the interpolated weights at ``alpha``: in the order the layers run, each
    corrected layer's output statistics are measured in eval mode (the layers before it already
    corrected) and an affine map per channel, a forward hook on that layer, sets them to
    ``(1 - alpha) * endpoint A's + alpha * endpoint B's``; the BatchNorms between corrected
    layers are reset in the same order (:func:`recompute_bn_stats`). So after :meth:`apply`,
    every corrected channel has exactly those statistics on the same training batches. Each
    step is one pass over ``num_batches`` training batches, cut short after its layer.
    """

    def __init__(self, model: nn.Module, spec: PermutationSpec,
                 state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                 batches: Iterable, num_batches: int | None = None):
        self.batches, self.num_batches = batches, num_batches
        probe = copy.deepcopy(model).eval()
        layers = repair_layers(probe, spec)
        self.steps = self._order(probe, layers)
        self.corrected = [step for step in self.steps if isinstance(step, str)]
        self.endpoints = []
        for state in (state_a, state_b):
            probe.load_state_dict(state)
            self.endpoints.append(channel_stats(probe, self.corrected, batches, num_batches,
                                                stop=self.corrected[-1])
                                  if self.corrected else {})

    def _order(self, model: nn.Module, layers: list[str]) -> list:
        """The steps of :meth:`apply` in the order the modules run: a layer's name, or a tuple
        of the names of consecutive BatchNorms (reset in one pass)."""
        modules = dict(model.named_modules())
        norms = {name for name, m in modules.items() if isinstance(m, _BatchNorm)}
        ran: list[str] = []
        outputs: dict[str, torch.Tensor] = {}  # each layer's output, to see where it goes
        fed_norm: set[str] = set()

        def after(name):
            def record(_m, _args, out):
                ran.append(name)
                if name in outputs:
                    raise LTHError(f"REPAIR: layer {name!r} runs more than once in a forward "
                                   f"pass of {type(model).__name__}; its calls cannot be "
                                   f"corrected separately")
                outputs[name] = out
            return record

        def before(_m, args):
            fed_norm.update(name for name, out in outputs.items() if args and args[0] is out)

        handles = [modules[name].register_forward_hook(after(name)) for name in layers]
        handles += [modules[name].register_forward_hook(
            lambda _m, _a, _o, name=name: ran.append(name)) for name in norms]
        handles += [modules[name].register_forward_pre_hook(before) for name in norms]
        try:
            batch = next(iter(self.batches), None)
            if batch is None:
                raise LTHError("REPAIR needs at least one training batch")
            with torch.no_grad():
                model(_inputs(batch).to(_device(model)))
        finally:
            for handle in handles:
                handle.remove()
        steps: list = []
        for name in dict.fromkeys(ran):  # first call order
            if name in norms:
                if steps and isinstance(steps[-1], tuple):
                    steps[-1] += (name,)
                else:
                    steps.append((name,))
            elif name not in fed_norm:
                steps.append(name)
        return steps

    @torch.no_grad()
    def apply(self, model: nn.Module, alpha: float) -> list:
        """Correct ``model`` (loaded with the weights at ``alpha``); returns the hooks' handles
        (remove them to undo the correction, then reload the weights: BatchNorm statistics were
        recomputed)."""
        modules = dict(model.named_modules())
        handles = []
        try:
            for step in self.steps:
                if isinstance(step, tuple):
                    recompute_bn_stats(model, self.batches, self.num_batches,
                                       [modules[name] for name in step], modules[step[-1]])
                    continue
                (mean, std), = channel_stats(model, [step], self.batches, self.num_batches,
                                             stop=step).values()
                (mean_a, std_a), (mean_b, std_b) = (ends[step] for ends in self.endpoints)
                goal_mean = torch.lerp(mean_a, mean_b, float(alpha))
                goal_std = torch.lerp(std_a, std_b, float(alpha))
                # a channel constant on the data (std 0) can only be shifted
                scale = torch.where(std > 0, goal_std / std.clamp_min(1e-300), 1.0)
                handles.append(modules[step].register_forward_hook(
                    _affine(scale, goal_mean - scale * mean, _channel_axis(modules[step]))))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles


def _affine(scale: torch.Tensor, shift: torch.Tensor, axis: int):
    """A forward hook mapping each output channel c to ``scale[c] * x + shift[c]``."""
    def correct(_module, _args, out):
        shape = [1] * out.dim()
        shape[axis] = -1
        return torch.addcmul(shift.to(out).view(shape), out, scale.to(out).view(shape))
    return correct


# ----------------------------------------------------------------------------------------------
# curves


def default_correction(model: nn.Module) -> str:
    """What the record's barriers report: bn_reset for a net with BatchNorm, else plain."""
    return BN_RESET if has_batchnorm(model) else PLAIN


def interpolation_curve(model: nn.Module, state_a: Mapping[str, torch.Tensor],
                        state_b: Mapping[str, torch.Tensor], test_batches: Iterable,
                        train_batches: Iterable | None = None, num_alphas: int = MIN_ALPHAS,
                        bn_batches: int | None = 50, test_num_batches: int | None = None,
                        correction: str | None = None,
                        spec: PermutationSpec | None = None) -> dict:
    """Loss/accuracy of ``(1 - a) * state_a + a * state_b`` at ``num_alphas`` evenly spaced a.

    model: a template of the architecture (copied; never changed). test_batches and
    train_batches are re-iterated at every alpha (pass lists or DataLoaders, not one-shot
    iterators). correction: plain, bn_reset or repair (module docstring; None: the default).
    bn_batches: training batches for the BatchNorm recomputation and REPAIR's statistics
    (None = all); test_num_batches: test batches per evaluation (None = all). spec: REPAIR's
    permutation spec (default: the model's own).
    """
    alphas = make_alphas(num_alphas)
    probe = copy.deepcopy(model)
    with_bn = has_batchnorm(probe)
    correction = correction if correction is not None else default_correction(probe)
    if correction not in CORRECTIONS:
        raise LTHError(f"unknown interpolation correction {correction!r}; valid: "
                       f"{', '.join(CORRECTIONS)}")
    if correction == BN_RESET and not with_bn:
        raise LTHError(f"{type(model).__name__} has no BatchNorm to reset; valid corrections "
                       f"here: {PLAIN}, {REPAIR}")
    if correction != PLAIN and train_batches is None:
        raise LTHError(f"{type(model).__name__}: the {correction} interpolation needs training "
                       f"batches to recompute {'its BatchNorm' if correction == BN_RESET else 'the'}"
                       f" statistics")
    repair = Repair(probe, spec if spec is not None else get_spec(probe), state_a, state_b,
                    train_batches, bn_batches) if correction == REPAIR else None
    losses, accs = [], []
    for alpha in alphas:
        probe.load_state_dict(interpolate_state(state_a, state_b, alpha))
        if correction == BN_RESET:
            recompute_bn_stats(probe, train_batches, bn_batches)
        handles = repair.apply(probe, alpha) if repair is not None else []
        try:
            loss, acc = evaluate(probe, test_batches, test_num_batches)
        finally:
            for handle in handles:
                handle.remove()
        losses.append(loss)
        accs.append(acc)
    return {
        "alphas": alphas,
        "loss": losses,
        "acc": accs,
        "loss_barrier": barrier(alphas, losses),
        "error_barrier": barrier(alphas, [1.0 - a for a in accs]),
        "correction": correction,
        "bn_recomputed": with_bn and correction != PLAIN,
        **({"repaired": repair.corrected} if repair is not None else {}),
    }


def compare_naive_matched(model: nn.Module, state_a: Mapping[str, torch.Tensor],
                          state_b: Mapping[str, torch.Tensor], perm: Mapping[str, torch.Tensor],
                          test_batches: Iterable, train_batches: Iterable | None = None,
                          spec: PermutationSpec | None = None, repair: bool = False,
                          **kwargs) -> dict:
    """The naive (A -> B) and matched (pi(A) -> B) curves under every correction that
    applies: plain; bn_reset for a net with BatchNorm; repair when asked. kwargs go to
    :func:`interpolation_curve`. Returns (JSON-able)::

        {"naive": curve, "matched": curve,   # the default correction's, as the record reports
         "default": "bn_reset" | "plain",
         "curves": {correction: {"naive": curve, "matched": curve}},   # those computed
         "about": {correction: what it is, or why it is absent}}
    """
    spec = spec if spec is not None else get_spec(model)
    matched_a = apply_permutation(dict(state_a), spec, perm)
    default = default_correction(model)
    about = {PLAIN: "the interpolated weights as they are"
             + (" (BatchNorm running statistics interpolated too)" if default == BN_RESET
                else ""),
             BN_RESET: "BatchNorm running statistics recomputed on training data at each alpha"
             if default == BN_RESET else f"absent: {type(model).__name__} has no BatchNorm"}
    present = [PLAIN, BN_RESET] if default == BN_RESET else [PLAIN]
    if repair:
        present.append(REPAIR)
    else:
        about[REPAIR] = "absent: not requested (study.match.repair)"
    curves = {correction: {
        side: interpolation_curve(model, start, state_b, test_batches, train_batches,
                                  correction=correction, spec=spec, **kwargs)
        for side, start in (("naive", state_a), ("matched", matched_a))}
        for correction in present}
    if repair:
        layers = curves[REPAIR]["matched"]["repaired"]
        about[REPAIR] = (
            f"channel statistics at each alpha set to the interpolated endpoints' at the outputs "
            f"of {', '.join(layers)}" + ("; the BatchNorms between them reset in order"
                                         if default == BN_RESET else "") if layers else
            "every layer writing permuted units feeds a BatchNorm, so REPAIR is the BatchNorm "
            "reset (the same curve as bn_reset)")
    return {**curves[default], "default": default, "curves": curves, "about": about}
