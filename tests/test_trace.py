"""lightning_lth.symmetry.trace: permutation specs derived from a model's torch.fx graph.

CPU, random data, small inputs. Every derive_spec call also runs check_spec (float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_lth.errors import LTHError
from lightning_lth.models import build_model
from lightning_lth.sparsity import imp
from lightning_lth.symmetry import (
    MatchPoint,
    PermutationSpec,
    apply_permutation,
    derive_spec,
    get_spec,
    match,
    random_permutation,
    skip_path_convs,
)
from lightning_lth.symmetry.trace import locate, tap, trace


class UserCNN(nn.Module):
    """A user's model: a residual add, functional ReLUs, a flatten into two linears."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))  # a stream read at a functional op: a node
        x = torch.flatten(F.max_pool2d(x, 2), 1)  # (8, 4, 4) per sample: a flattened axis
        return self.fc2(F.relu(self.fc1(x)))


def cifar_stem(model):
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def narrow_vgg11_bn():
    """torchvision's vgg11_bn with its 4096-wide classifier narrowed to 64 (the layout, the
    7x7 adaptive pool and the flatten into the classifier are kept), to stay fast."""
    model = torchvision.models.vgg11_bn(num_classes=10)
    model.classifier[0] = nn.Linear(512 * 7 * 7, 64)
    model.classifier[3] = nn.Linear(64, 64)
    model.classifier[6] = nn.Linear(64, 10)
    return model


SUPPORTED = {
    # name: (constructor, input sample shape)
    "resnet18_cifar": (lambda: cifar_stem(torchvision.models.resnet18(num_classes=10)),
                       (3, 16, 16)),
    "resnet18_imagenet": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "resnet50_cifar": (lambda: cifar_stem(torchvision.models.resnet50(num_classes=10)),
                       (3, 16, 16)),
    "resnet50_imagenet": (lambda: torchvision.models.resnet50(num_classes=10), (3, 32, 32)),
    "vgg11_bn": (narrow_vgg11_bn, (3, 32, 32)),
    "vgg11_bn_full": (lambda: torchvision.models.vgg11_bn(num_classes=10), (3, 32, 32)),  # slow
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 32, 32)),
    "user_cnn": (UserCNN, (3, 8, 8)),
}


def lively(model, shape, seed=0):
    """Calibrated on one random batch: each biased conv/linear output unit's mean moved to 0.05
    (through its bias) and BatchNorm running statistics set to the batch's, so that ReLU units
    are alive on about half the samples. A unit dead on the data, or alive on one sample or two,
    cannot be told apart from others by any matching; random nets have many."""

    def centre(module, args, out):
        channel = out.dim() - 1 if isinstance(module, nn.Linear) else 1
        shift = out.mean([d for d in range(out.dim()) if d != channel]) - 0.05
        module.bias.sub_(shift)
        return out - shift.view(-1, *[1] * (out.dim() - 1 - channel))

    handles = [m.register_forward_hook(centre) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is not None]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # running stats = this batch's
        gen = torch.Generator().manual_seed(seed)
        model.train()(torch.randn(16, *shape, generator=gen))
    for handle in handles:
        handle.remove()
    return model.eval()


def permuted(model, spec, perm, noise=0.0, seed=0):
    """A copy of the model with its state permuted, plus relative noise on its parameters."""
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(model.state_dict(), spec, perm))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(noise * param.abs().mean() * torch.randn(param.shape, generator=gen))
    return other.eval()


def live_units(model, spec, x):
    """group -> bool per unit: at the group's match point on ``x``, std > 1e-3 and 3+ distinct
    values. No matching can tell apart units with 2 values (ReLU units dead on every sample,
    or alive on one: any two alive on the same sample correlate perfectly)."""
    run, taps = tap(model, spec.points)
    live = {}

    def keep(group, post):
        def hook(module, args, out):
            out = out.clamp(min=0) if post == "relu" else out
            values = out.movedim(1, -1).reshape(-1, out.shape[1]).sort(0).values
            distinct = 1 + (values[1:] != values[:-1]).sum(0)
            live[group] = (values.std(0) > 1e-3) & (distinct >= 3)
        return hook

    handles = [taps[g].register_forward_hook(keep(g, p.post)) for g, p in spec.points.items()]
    with torch.no_grad():
        run(x)
    for handle in handles:
        handle.remove()
    return live


def partition(spec):
    """group -> frozenset of (tensor, axis): the spec up to group names."""
    return {group: frozenset(entries) for group, entries in spec.groups.items()}


# ----------------------------------------------------------------------------------------------
# the built-in models: derived == hand-written


BUILT_IN = {
    "mlp": (dict(in_channels=1, image_size=8, hidden=(32, 32, 32)), (1, 8, 8)),
    "resnet20": (dict(in_channels=3, image_size=32), (3, 16, 16)),
    "vgg11": (dict(in_channels=3, image_size=32), (3, 32, 32)),
}


@pytest.mark.quick
@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_derived_spec_equals_hand_written(name):
    kwargs, shape = BUILT_IN[name]
    model = build_model(name, 1, 10, **kwargs)
    derived, written = derive_spec(model, torch.randn(2, *shape)), model.permutation_spec()
    derived_groups, written_groups = partition(derived), partition(written)
    assert set(derived_groups.values()) == set(written_groups.values())
    assert set(derived.axes) == set(written.axes)
    by_entries = {entries: group for group, entries in written_groups.items()}
    for group, entries in derived_groups.items():
        assert derived.points[group] == written.points[by_entries[entries]], group
    assert get_spec(model) == written  # the declared spec wins (the fast path)


def test_prunable_sets_of_built_ins_unchanged_by_skip_path_rule():
    for name, (kwargs, _) in BUILT_IN.items():
        model = build_model(name, 1, 10, **kwargs)
        assert imp.prunable_names(model, skip_paths=skip_path_convs(model)) == imp.prunable_names(model)
    resnet = build_model("resnet20", 1, 10, in_channels=3, image_size=32)
    assert skip_path_convs(resnet) == ["stages.1.0.shortcut.0", "stages.2.0.shortcut.0"]
    resnet18 = torchvision.models.resnet18(num_classes=10)
    names = imp.prunable_names(resnet18, skip_paths=skip_path_convs(resnet18))
    assert "layer1.0.conv1.weight" in names and "fc.weight" in names
    assert not any("downsample" in n for n in names)
    assert skip_path_convs(torchvision.models.resnet50()) == [
        f"layer{i}.0.downsample.0" for i in range(1, 5)]
    assert skip_path_convs(torchvision.models.mobilenet_v2()) == []  # identity skips only


# ----------------------------------------------------------------------------------------------
# torchvision models and a user's model


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow)
                                  if name == "vgg11_bn_full" else name for name in SUPPORTED])
def test_derived_spec_keeps_function_and_recovers_planted_permutation(name):
    build, shape = SUPPORTED[name]
    torch.manual_seed(0)
    model = lively(build(), shape)
    spec = get_spec(model, torch.randn(2, *shape))  # derived and checked
    sizes = spec.validate(model)
    classifier = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert spec.axes[f"{classifier}.weight"][0] is None  # outputs never permuted
    # a random permutation keeps the function, in float64
    perm = random_permutation(sizes, seed=3)
    model64 = copy.deepcopy(model).double()
    other64 = permuted(model64, spec, perm)
    x = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        out, out_perm = model64(x), other64(x)
    assert (out - out_perm).abs().max() <= 1e-9 * out.abs().max()
    # activation matching recovers a planted permutation: B = pi(A) + small noise
    b = permuted(model, spec, perm, noise=1e-4, seed=1)
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, *shape, generator=gen), None) for _ in range(2)]
    # eps 1e-12: random nets have near-constant units (std down to 1e-5); the default eps damps
    # their self-correlation, and a damped unit can swap partners with a live one
    pi = match(model, b, spec, method="activation", batches=data, check=False, eps=1e-12)
    live = live_units(model, spec, torch.cat([x for x, _ in data]))
    for group in sizes:
        live_in_b = live[group][perm[group]]  # B's unit j is A's unit perm[j]
        assert live_in_b.float().mean() > 0.9, group  # nearly all units take part
        assert torch.equal(pi[group][live_in_b], perm[group][live_in_b]), group


def test_user_cnn_points_include_a_graph_node():
    spec = derive_spec(UserCNN(), torch.randn(2, 3, 8, 8))
    assert spec.points == {"conv1": MatchPoint(node="relu_1"),
                           "fc1": MatchPoint("fc1", "relu")}
    assert spec.axes["conv2.weight"] == ("conv1", "conv1", None, None)
    assert spec.axes["fc1.weight"] == ("fc1", "conv1")  # 8 channels x 16 positions
    assert spec.axes["fc2.weight"] == (None, "fc1") and spec.axes["fc2.bias"] == (None,)
    with pytest.raises(LTHError, match="exactly one of a module and a graph node"):
        MatchPoint("fc1", node="relu_1")


def test_graph_node_points_match_like_module_hooks():
    """The tap path (graph nodes) reads the same activations as module and container hooks."""
    kwargs, shape = BUILT_IN["resnet20"]
    a, b = (lively(build_model("resnet20", 1, 10, **kwargs), shape, seed) for seed in (0, 1))
    spec = a.permutation_spec()
    graph = trace(a).graph
    as_nodes = PermutationSpec(spec.axes, {g: MatchPoint(node=locate(graph, p).name, post=p.post)
                                           for g, p in spec.points.items()})
    data = [(torch.randn(8, *shape, generator=torch.Generator().manual_seed(3)), None)]
    hooks = match(a, b, spec, batches=data, check=False)
    taps = match(a, b, as_nodes, batches=data, check=False)
    assert all(torch.equal(hooks[g], taps[g]) for g in spec.points)


# ----------------------------------------------------------------------------------------------
# refusals: one line, naming the op and the graph node


class Wrap(nn.Module):
    def __init__(self, body, head_in):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = body
        self.head = nn.Linear(head_in, 10)

    def forward(self, x):
        return self.head(self.body(self.conv(x)).mean((2, 3)))


class Cumsum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)


class Cat(nn.Module):
    def forward(self, x):
        return torch.cat([x, x], 1)


@pytest.mark.quick
@pytest.mark.parametrize("body,head_in,pattern", [
    (Cumsum(), 8, r"unsupported function torch\.cumsum at graph node 'cumsum'"),
    (nn.Conv2d(8, 8, 3, groups=2), 8,
     r"unsupported Conv2d module 'body' at graph node 'body' \(grouped convolution, groups=2"),
    (nn.Conv2d(8, 16, 3, groups=8), 16, r"Conv2d module 'body' .*groups=8, 8->16 channels"),
    (nn.GroupNorm(2, 8), 8, r"GroupNorm module 'body' at graph node 'body' \(2 groups of 8"),
    (Cat(), 16, r"function torch\.cat at graph node 'cat' \(concatenation along a permuted"),
    (nn.PReLU(8), 8, r"unsupported PReLU module 'body' at graph node 'body'"),
])
def test_unsupported_op_refused_in_one_line(body, head_in, pattern):
    with pytest.raises(LTHError, match=pattern) as error:
        derive_spec(Wrap(body, head_in), torch.randn(2, 3, 8, 8))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("body", [nn.GroupNorm(1, 8), nn.GroupNorm(8, 8),
                                  nn.InstanceNorm2d(8, affine=True)])
def test_per_channel_norms_handled(body):
    spec = derive_spec(Wrap(body, 8), torch.randn(2, 3, 8, 8))
    assert spec.axes["body.weight"] == ("conv",) and spec.axes["head.weight"] == (None, "conv")


def test_layer_norm_over_channels_handled():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.norm(self.fc1(x))))

    spec = derive_spec(Mixer(), torch.randn(4, 6))
    assert spec.axes["norm.weight"] == ("fc1",) and spec.axes["fc2.weight"] == (None, "fc1")
    assert spec.points == {"fc1": MatchPoint("norm", "relu")}


def test_untraceable_model_and_missing_example_input():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(LTHError, match="cannot trace Branchy with torch.fx"):
        derive_spec(Branchy(), torch.randn(2, 4))
    with pytest.raises(LTHError, match="example_input"):
        get_spec(UserCNN())
    with pytest.raises(LTHError, match=r"failed on example_input of shape \(2, 4\)"):
        derive_spec(UserCNN(), torch.randn(2, 4))
