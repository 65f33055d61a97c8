"""REPAIR in the interpolation curves (symmetry/connectivity.py): the corrected midpoint of a
net small enough to work out by hand, the corrected statistics checked against the endpoints',
a flat corrected curve between a net and its permuted copy, and the refusals.

CPU, narrow nets, random data; the study's use of it is in test_experiment.py.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import MODELS, make, permuted_copy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lth.errors import LTHError
from lightning_lth.models import build_model
from lightning_lth.symmetry import (
    PermutationSpec,
    compare_naive_matched,
    get_spec,
    interpolation_curve,
    random_permutation,
)
from lightning_lth.symmetry.connectivity import Repair, interpolate_state

CORNERS = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
LABELS = torch.tensor([0, 1, 1, 0])


def two_unit_pair():
    """MLP 2-2-2 on the four corners of [-1, 1]^2 (each input: mean 0, std 1, uncorrelated).
    A's hidden unit i reads x_i, B's reads the other one (B is A with its hidden units
    swapped); both have bias 1, and the same classifier, whose two columns are equal."""
    a = build_model("mlp", 1, 2, in_channels=2, image_size=1, hidden=(2,))
    with torch.no_grad():
        a.layers[0].weight.copy_(torch.eye(2))
        a.layers[0].bias.fill_(1.0)
        a.classifier.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
        a.classifier.bias.copy_(torch.tensor([0.0, 0.5]))
    b = permuted_copy(a, a.permutation_spec(), {"layer0": torch.tensor([1, 0])})
    return a.eval(), b


@pytest.mark.quick
@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_corrected_interpolation_of_a_hand_made_pair_is_known_in_closed_form(alpha):
    """At alpha, hidden unit 0's pre-activation is (1 - a) x1 + a x2 + 1: mean 1 (as at both
    ends), std sqrt((1 - a)^2 + a^2) < 1 (both ends: 1). REPAIR rescales it to std 1:
    ((1 - a) x1 + a x2) / sqrt((1 - a)^2 + a^2) + 1; unit 1 likewise with x1, x2 swapped."""
    a, b = two_unit_pair()
    x = CORNERS.view(4, 2, 1, 1)
    train = [(x, LABELS)]
    norm = math.sqrt((1 - alpha) ** 2 + alpha ** 2)
    x1, x2 = CORNERS[:, 0], CORNERS[:, 1]
    hidden = torch.stack([((1 - alpha) * x1 + alpha * x2) / norm + 1,
                          ((1 - alpha) * x2 + alpha * x1) / norm + 1], 1)
    expected = F.relu(hidden) @ a.classifier.weight.T + a.classifier.bias
    uncorrected = F.relu(torch.stack([(1 - alpha) * x1 + alpha * x2 + 1,
                                      (1 - alpha) * x2 + alpha * x1 + 1], 1))
    assert not torch.allclose(uncorrected, F.relu(hidden), atol=1e-2)  # REPAIR must act

    repair = Repair(a, a.permutation_spec(), a.state_dict(), b.state_dict(), train)
    assert repair.corrected == ["layers.0"]
    probe = copy.deepcopy(a)
    probe.load_state_dict(interpolate_state(a.state_dict(), b.state_dict(), alpha))
    handles = repair.apply(probe, alpha)
    with torch.no_grad():
        torch.testing.assert_close(probe(x), expected, atol=1e-6, rtol=1e-6)
    for handle in handles:
        handle.remove()
    with torch.no_grad():  # without its hooks, the probe is the plain interpolation again
        torch.testing.assert_close(F.relu(probe.layers[0](CORNERS)), uncorrected)

    curve = interpolation_curve(a, a.state_dict(), b.state_dict(), train, train,
                                num_alphas=21, correction="repair")
    index = curve["alphas"].index(alpha)
    assert curve["loss"][index] == pytest.approx(float(F.cross_entropy(expected, LABELS)),
                                                 abs=1e-6)
    plain = interpolation_curve(a, a.state_dict(), b.state_dict(), train, num_alphas=21)
    assert plain["correction"] == "plain" and curve["repaired"] == ["layers.0"]
    plain_logits = uncorrected @ a.classifier.weight.T + a.classifier.bias
    assert plain["loss"][index] == pytest.approx(float(F.cross_entropy(plain_logits, LABELS)),
                                                 abs=1e-6)


class SmallConvNet(nn.Module):
    """A user's model with no hand-written spec: a conv feeding a BatchNorm, then hidden linear
    layers with none (only those are REPAIR's to correct; the BatchNorm reset covers the conv)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 12)
        self.out = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def small_conv_net(seed):
    torch.manual_seed(seed)
    model = SmallConvNet()
    with torch.no_grad():
        model.train()
        model(torch.randn(16, 3, 4, 4) + 0.5)  # BatchNorm statistics away from (0, 1)
    return model.eval()


def random_batches(shape, count=3, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(count * size, *shape, generator=gen),
                         torch.randint(0, 10, (count * size,), generator=gen))
    return DataLoader(data, batch_size=size, shuffle=False)


def output_stats(model, names, batches):
    """{name: (mean, std)} per output channel, float64, population std: measured here with
    hooks of this test's own, after any hook already on the module."""
    modules, outs = dict(model.named_modules()), {name: [] for name in names}
    handles = [modules[n].register_forward_hook(lambda _m, _a, out, n=n: outs[n].append(
        (out.movedim(1, -1) if out.dim() > 2 else out).reshape(-1, out.shape[1]).double()))
        for n in names]
    with torch.no_grad():
        for x, _ in batches:
            model.eval()(x)
    for handle in handles:
        handle.remove()
    return {n: (torch.cat(v).mean(0), torch.cat(v).std(0, correction=0)) for n, v in outs.items()}


@pytest.mark.parametrize("name,corrected", [
    ("mlp", ["layers.0", "layers.2", "layers.4"]),
    ("vgg11", [f"features.{i}" for i in (0, 3, 6, 8, 11, 13, 16, 18)]),
    ("small_conv", ["fc1", "fc2"]),
])
def test_each_corrected_channel_gets_the_interpolated_endpoint_statistics(name, corrected):
    if name == "small_conv":
        a, b = small_conv_net(0), small_conv_net(1)
        train = random_batches((3, 4, 4))
        spec = get_spec(a, example_input=torch.randn(2, 3, 4, 4))  # derived from the graph
    else:
        a, b = make(name, 0), make(name, 1)
        train = random_batches(MODELS[name][1])
        spec = a.permutation_spec()
    alpha = 0.3
    repair = Repair(a, spec, a.state_dict(), b.state_dict(), train)
    assert repair.corrected == corrected
    probe = copy.deepcopy(a)
    probe.load_state_dict(interpolate_state(a.state_dict(), b.state_dict(), alpha))
    before = output_stats(probe, corrected, train)
    repair.apply(probe, alpha)
    after = output_stats(probe, corrected, train)
    ends = [output_stats(net, corrected, train) for net in (a, b)]
    for layer in corrected:
        for which in (0, 1):  # mean, std
            goal = torch.lerp(ends[0][layer][which], ends[1][layer][which], alpha)
            assert (after[layer][which] - goal).abs().max() <= 1e-5 * (1 + goal.abs().max()), \
                (layer, which)
        assert (before[layer][1] - after[layer][1]).abs().max() > 1e-3  # it did correct
    if name == "small_conv":  # the conv's BatchNorm was reset on the interpolated net
        assert not torch.equal(probe.bn.running_mean, interpolate_state(
            a.state_dict(), b.state_dict(), alpha)["bn.running_mean"])


def test_corrected_curve_is_flat_between_a_net_and_its_permuted_copy():
    a = make("mlp")
    spec = a.permutation_spec()
    perm = random_permutation(spec.validate(a), seed=2)
    b = permuted_copy(a, spec, perm)
    train, test = random_batches(MODELS["mlp"][1], seed=3), random_batches(MODELS["mlp"][1], seed=4)
    out = compare_naive_matched(a, a.state_dict(), b.state_dict(), perm, test, train, spec,
                                repair=True, bn_batches=None)
    assert out["default"] == "plain" and set(out["curves"]) == {"plain", "repair"}
    assert out["about"]["bn_reset"].startswith("absent") and "layers.4" in out["about"]["repair"]
    assert out["naive"] == out["curves"]["plain"]["naive"]  # the default, as the record reads
    matched = out["curves"]["repair"]["matched"]
    assert max(matched["loss"]) - min(matched["loss"]) < 1e-5
    assert matched["error_barrier"] == 0.0 and abs(matched["loss_barrier"]) < 1e-5
    naive = out["curves"]["repair"]["naive"]
    assert naive["loss"] != out["curves"]["plain"]["naive"]["loss"]  # REPAIR moved the naive path
    assert naive["loss"][0] == pytest.approx(out["curves"]["plain"]["naive"]["loss"][0], abs=1e-5)
    json.dumps(out)


def test_on_a_batchnorm_net_repair_is_the_batchnorm_reset():
    """ResNet20: every conv writing permuted channels feeds a BatchNorm, so nothing is left to
    correct and the REPAIR curve is the bn_reset one; plain keeps the interpolated statistics."""
    a, b = make("resnet20", 0), make("resnet20", 1)
    spec = a.permutation_spec()
    train, test = random_batches(MODELS["resnet20"][1], 2, 8), random_batches(
        MODELS["resnet20"][1], 1, 8, seed=4)
    out = compare_naive_matched(a, a.state_dict(), b.state_dict(),
                                random_permutation(spec.validate(a)), test, train, spec,
                                repair=True, num_alphas=11, bn_batches=None)
    assert out["default"] == "bn_reset" and list(out["curves"]) == ["plain", "bn_reset", "repair"]
    assert out["curves"]["repair"]["naive"]["repaired"] == []
    assert "BatchNorm reset" in out["about"]["repair"]
    for side in ("naive", "matched"):
        assert out["curves"]["repair"][side]["loss"] == out["curves"]["bn_reset"][side]["loss"]
        assert out["curves"]["plain"][side]["bn_recomputed"] is False
    assert out["curves"]["plain"]["naive"]["loss"] != out["curves"]["bn_reset"]["naive"]["loss"]


class Twice(nn.Module):
    """One hidden linear layer applied to two inputs: its calls would need two corrections."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x) + self.hidden(2 * x)))


@pytest.mark.quick
def test_refusals():
    a, b = make("mlp", 0), make("mlp", 1)
    spec = a.permutation_spec()
    train = random_batches(MODELS["mlp"][1])
    with pytest.raises(LTHError, match="no BatchNorm"):
        interpolation_curve(a, a.state_dict(), b.state_dict(), train, train,
                            correction="bn_reset")
    with pytest.raises(LTHError, match="valid: plain, bn_reset, repair"):
        interpolation_curve(a, a.state_dict(), b.state_dict(), train, train, correction="x")
    with pytest.raises(LTHError, match="training batches"):
        interpolation_curve(a, a.state_dict(), b.state_dict(), train, correction="repair")
    axes = dict(spec.axes, **{"layers.0.weight": (None, None), "layers.2.weight": (
        "layer1", None)})  # group layer0 left with a bias only: no layer writes it
    with pytest.raises(LTHError, match="'layer0'"):
        Repair(a, PermutationSpec(axes, spec.points), a.state_dict(), b.state_dict(), train)
    twice = Twice()
    twice_spec = get_spec(twice, example_input=torch.randn(2, 4))
    assert twice_spec.axes["hidden.weight"][0] is not None  # a permutation group
    data = [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(LTHError, match="'hidden' runs more than once"):
        Repair(twice, twice_spec, twice.state_dict(), twice.state_dict(), data)
