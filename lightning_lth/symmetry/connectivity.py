"""Linear mode connectivity: loss and accuracy along (1 - a) * A + a * B, and the barrier.

A model with BatchNorm gets its running statistics reset and recomputed on training data at
every alpha before it is evaluated (cumulative average, ``momentum=None``, over
``bn_batches`` training batches); a model without BatchNorm skips that step (and needs no
training batches).

``interpolation_curve`` returns a JSON-able dict ``{alphas, loss, acc, loss_barrier,
error_barrier, bn_recomputed}``; ``compare_naive_matched`` computes the naive (A -> B) and
matched (pi(A) -> B) curves; ``plot_interpolation`` writes them as a PNG.
"""

from __future__ import annotations

import copy
import io as _bytes_io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_lth.errors import LTHError
from lightning_lth.io import write_atomic
from lightning_lth.symmetry.spec import PermutationSpec, apply_permutation, get_spec

MIN_ALPHAS = 11


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


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable,
                       num_batches: int | None = None) -> None:
    """Reset every BatchNorm's running statistics and recompute them as the plain average over
    ``num_batches`` training batches (None = all). Only BatchNorm layers run in train mode; the
    model is left in eval mode with the layers' momentum restored."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return
    device = _device(model)
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for batch in _limited(batches, num_batches):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device, non_blocking=True))
            seen += 1
    finally:
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


def interpolation_curve(model: nn.Module, state_a: Mapping[str, torch.Tensor],
                        state_b: Mapping[str, torch.Tensor], test_batches: Iterable,
                        train_batches: Iterable | None = None, num_alphas: int = MIN_ALPHAS,
                        bn_batches: int | None = 50,
                        test_num_batches: int | None = None) -> dict:
    """Loss/accuracy of ``(1 - a) * state_a + a * state_b`` at ``num_alphas`` evenly spaced a.

    model: a template of the architecture (copied; never changed). test_batches and
    train_batches are re-iterated at every alpha (pass lists or DataLoaders, not one-shot
    iterators). bn_batches: training batches for the BatchNorm recomputation (None = all);
    test_num_batches: test batches per evaluation (None = all).
    """
    alphas = make_alphas(num_alphas)
    probe = copy.deepcopy(model)
    with_bn = has_batchnorm(probe)
    if with_bn and train_batches is None:
        raise LTHError(f"{type(model).__name__} has BatchNorm: the interpolation needs training "
                       f"batches to recompute its running statistics")
    losses, accs = [], []
    for alpha in alphas:
        probe.load_state_dict(interpolate_state(state_a, state_b, alpha))
        if with_bn:
            recompute_bn_stats(probe, train_batches, bn_batches)
        loss, acc = evaluate(probe, test_batches, test_num_batches)
        losses.append(loss)
        accs.append(acc)
    return {
        "alphas": alphas,
        "loss": losses,
        "acc": accs,
        "loss_barrier": barrier(alphas, losses),
        "error_barrier": barrier(alphas, [1.0 - a for a in accs]),
        "bn_recomputed": with_bn,
    }


def compare_naive_matched(model: nn.Module, state_a: Mapping[str, torch.Tensor],
                          state_b: Mapping[str, torch.Tensor], perm: Mapping[str, torch.Tensor],
                          test_batches: Iterable, train_batches: Iterable | None = None,
                          spec: PermutationSpec | None = None, **kwargs) -> dict:
    """{"naive": curve A -> B, "matched": curve pi(A) -> B}; kwargs go to
    :func:`interpolation_curve`."""
    spec = spec if spec is not None else get_spec(model)
    matched_a = apply_permutation(dict(state_a), spec, perm)
    return {
        "naive": interpolation_curve(model, state_a, state_b, test_batches, train_batches,
                                     **kwargs),
        "matched": interpolation_curve(model, matched_a, state_b, test_batches, train_batches,
                                       **kwargs),
    }


def plot_interpolation(naive: Mapping, matched: Mapping, path: str | Path,
                       title: str | None = None) -> Path:
    """Write a PNG: test accuracy and test loss vs alpha, naive (A -> B) and matched
    (pi(A) -> B). Rendered off-screen (Agg) to bytes, then written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for curve, label, style in ((naive, "naive A -> B", "o--"),
                                (matched, "matched pi(A) -> B", "s-")):
        ax_acc.plot(curve["alphas"], [100 * a for a in curve["acc"]], style,
                    label=f"{label} (error barrier {100 * curve['error_barrier']:.1f} pt)")
        ax_loss.plot(curve["alphas"], curve["loss"], style,
                     label=f"{label} (loss barrier {curve['loss_barrier']:.3f})")
    ax_acc.set(xlabel="alpha", ylabel="test accuracy (%)", title="accuracy")
    ax_loss.set(xlabel="alpha", ylabel="test loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = _bytes_io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    path = Path(path)
    write_atomic(path, lambda handle: handle.write(data))
    return path
