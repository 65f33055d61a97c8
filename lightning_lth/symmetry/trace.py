"""Derive a model's :class:`PermutationSpec` from its graph, for models without a hand-written one.

``derive_spec(model, example_input)`` traces the model with ``torch.fx.symbolic_trace`` and
runs the example through the traced graph once, following which axes carry the same hidden
units. torch.fx rather than torch.export: fx keeps every ``nn.Module`` call as one node named
by the module's qualified name, so each parameter's axes and each match point map straight to
the model's own ``state_dict`` keys and modules (``torch.export`` lifts parameters to inputs and
decomposes modules into aten ops, to be mapped back), and it traces a ResNet50 in tens of
milliseconds. Its limit, shared by export's non-strict mode: forward code with Python control
flow on tensor values does not trace (refused with LTHError).

Propagation. Every axis of every activation and of every parameter is an element of a
union-find; an element joined with the FIXED element is never permuted. The input's axes and
the output's axes are FIXED (the final classifier's outputs are never permuted). A conv or
linear output starts a group (its weight's output axis); BatchNorm, elementwise activations,
dropout, identity and pooling pass the channel axis through; an elementwise op of two tensors
(a residual ``add``) joins their axes, so a ResNet stream becomes one group; per-channel
norms (BatchNorm, InstanceNorm, GroupNorm with one group or one channel per group) and
LayerNorm (statistics over whole axes) label their parameters with those axes; a reshape that
merges a channel axis with the axes after it (``flatten``) carries the group onto the merged
axis as a flattened axis (``spec.py``'s convention); any axis an op mixes non-equivariantly
(a conv's spatial axes, a reduction) is FIXED. What it cannot reason about is refused with
a one-line LTHError naming the op and the graph node: unknown modules and functions, tensor
indexing, parameters read outside a module call (``get_attr``), grouped convolutions other
than depthwise ones with one output per input channel, GroupNorm with 1 < groups < channels,
and ``torch.cat`` along a permuted axis (a spec axis carries one group, a concat carries two).

Each group's match point is its last activation in graph order that comes right after a
non-linearity (else its last activation), with the units on dimension 1. It is named as a
module whose forward returns it (a leaf called once, else of the containers called once the one
holding most of the group's conv/linear writers, e.g. a ResNet stage for its stream), else as a
relu applied to such a module's output (``post="relu"``), else as the graph node itself
(``MatchPoint(node=...)``; ``matching.py`` reads those by tapping the traced graph, see
:func:`tap`). The derived spec is checked with ``check_spec`` before it is returned (in float32
on a CPU, see :func:`check_dtype`).
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_lth.errors import LTHError
from lightning_lth.symmetry.spec import (
    SKIPPED_BUFFERS,
    MatchPoint,
    PermutationSpec,
    check_spec,
    declared_spec,
    eval_mode,
    no_spec_error,
)

FIXED = 0  # the union-find element of axes that are never permuted

NONLINEAR_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                     nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                     nn.Softplus)
PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout)
POOL_MODULES = {cls: dims for dims, classes in {
    1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d),
    2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
    3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
}.items() for cls in classes}

RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_}
NONLINEAR_FUNCTIONS = RELU_FUNCTIONS | {
    F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid,
    torch.sigmoid, F.tanh, torch.tanh, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus}
RELU_METHODS = {"relu", "relu_"}
NONLINEAR_METHODS = RELU_METHODS | {"sigmoid", "sigmoid_", "tanh", "tanh_"}
PASS_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
PASS_METHODS = {"contiguous", "clone", "detach", "float", "to"}
POOL_FUNCTIONS = {F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1,
                  F.adaptive_max_pool1d: 1, F.max_pool2d: 2, F.avg_pool2d: 2,
                  F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2, F.max_pool3d: 3,
                  F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3}
ELEMENTWISE_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                         operator.imul, operator.truediv, operator.itruediv, torch.add,
                         torch.sub, torch.mul, torch.div}
ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
SHAPE_METHODS = {"size", "dim"}


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace``, its failure turned into a one-line LTHError."""
    try:
        return fx.symbolic_trace(model)
    except Exception as error:  # user code: any exception type can come out of tracing
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LTHError(f"cannot trace {type(model).__name__} with torch.fx ({first}); declare "
                       f"its permutation_spec() by hand") from error


def derive_spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """The model's permutation spec, derived from its torch.fx graph (module docstring) and
    checked with ``check_spec`` (in :func:`check_dtype`). ``example_input``: one batch the model accepts; it is run once
    in eval mode (no state changes) and its sample shape becomes ``check_input_shape``."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise LTHError(f"derive_spec needs example_input, a batch tensor the model accepts; "
                       f"got {type(example_input).__name__}")
    with eval_mode(model), torch.no_grad():
        graph = trace(model)
        device = next(iter(model.parameters()), torch.empty(0)).device
        propagation = _Propagation(graph, type(model).__name__)
        try:
            propagation.run(example_input.to(device))
        except LTHError:
            raise
        except Exception as error:  # the model's own code failed on the example
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise LTHError(f"{type(model).__name__} failed on example_input of shape "
                           f"{tuple(example_input.shape)}: {first}") from error
    spec = propagation.spec(model.state_dict(), tuple(example_input.shape[1:]))
    check_spec(model, spec, dtype=check_dtype(device))
    return spec


def check_dtype(device: torch.device) -> torch.dtype:
    """The checker's dtype: float32 on a CPU at full float32 precision, where permuting only
    reorders sums (~1e-6 of the output on ResNet50 and VGG11-BN, 100x under check_spec's
    tolerance) and float64 would double the memory traffic that dominates checking a
    70M-parameter net; float64 elsewhere (GPU float32 convolutions may run in TF32, and
    ``set_float32_matmul_precision`` below "highest" allows bf16 on a CPU)."""
    exact = device.type == "cpu" and torch.get_float32_matmul_precision() == "highest"
    return torch.float32 if exact else torch.float64


class _Propagation(fx.Interpreter):
    """Runs the traced graph once, labelling each tensor axis with a union-find element."""

    def __init__(self, graph: fx.GraphModule, model_name: str):
        super().__init__(graph)
        self.extra_traceback = False  # keep LTHError messages one line
        self.model_name = model_name
        self.parent = [FIXED]
        self.labels: dict[fx.Node, tuple[int, ...]] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.axis_elements: dict[tuple[str, int], int] = {}
        self.writers: list[tuple[int, str]] = []  # (output-axis element, module) in call order

    # -- union-find over axes ----------------------------------------------------------------
    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, element: int) -> int:
        while self.parent[element] != element:
            self.parent[element] = self.parent[self.parent[element]]
            element = self.parent[element]
        return element

    def unify(self, *elements: int) -> int:
        """Join the elements' sets; the root is the oldest (FIXED absorbs)."""
        root = min(self.find(e) for e in elements)
        for element in elements:
            self.parent[self.find(element)] = root
        return root

    def fix(self, *elements: int) -> None:
        if elements:
            self.unify(FIXED, *elements)

    def axis(self, tensor: str, axis: int) -> int:
        if (tensor, axis) not in self.axis_elements:
            self.axis_elements[tensor, axis] = self.new()
        return self.axis_elements[tensor, axis]

    # -- the walk ----------------------------------------------------------------------------
    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node.op == "output":
            self.fix(*(e for arg in _nodes_in(node.args) for e in self.labels.get(arg, ())))
        elif isinstance(value, torch.Tensor):
            self.labels[node] = self.rule(node, value)
            self.shapes[node] = tuple(value.shape)
        elif node.op != "placeholder" and not self.is_shape_query(node, value):
            self.refuse(node, "its result is not a tensor")
        return value

    def refuse(self, node: fx.Node, reason: str | None = None):
        raise LTHError(f"cannot derive a permutation spec for {self.model_name}: unsupported "
                       f"{describe(node, self.module)} at graph node {node.name!r}"
                       f"{f' ({reason})' if reason else ''}; declare its permutation_spec() "
                       f"by hand")

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [arg for arg in _nodes_in((node.args, node.kwargs)) if arg in self.labels]

    def is_shape_query(self, node: fx.Node, value) -> bool:
        """Non-tensor results that depend on shapes only (sizes, and arithmetic on them)."""
        if not self.tensor_args(node):
            return True
        if node.op == "call_method" and node.target in SHAPE_METHODS:
            return True
        return node.op == "call_function" and node.target is getattr and \
            node.args[1] in ("shape", "ndim", "dtype", "device")

    def rule(self, node: fx.Node, value: torch.Tensor) -> tuple[int, ...]:
        """The output's axis labels; joins the inputs' and parameters' labels as needed."""
        if node.op == "get_attr":
            return self.refuse(node, "a parameter or buffer read outside a module call")
        if node.op == "placeholder" or not self.tensor_args(node):
            return (FIXED,) * value.dim()  # the input, or a tensor made from shapes alone
        if node.op == "call_module":
            return self.module_rule(node, self.module.get_submodule(node.target), value)
        if node.op == "call_function":
            return self.function_rule(node, node.target, value)
        return self.method_rule(node, node.target, value)  # call_method

    def first(self, node: fx.Node) -> tuple[int, ...]:
        arg = node.args[0] if node.args else None
        if arg not in self.labels:
            self.refuse(node, "its first argument is not a tensor")
        return self.labels[arg]

    def module_rule(self, node, module, value):
        x = self.first(node)
        if isinstance(module, NONLINEAR_MODULES + PASS_MODULES):
            return x
        if type(module) in POOL_MODULES:
            return self.pool(x, POOL_MODULES[type(module)])
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return self.refuse(node)
        if isinstance(module, nn.modules.conv._ConvNd):
            return self.conv(node, module, x)
        if isinstance(module, nn.Linear):
            out = self.writer(node.target, module)
            self.unify(self.axis(f"{node.target}.weight", 1), x[-1])
            return (*x[:-1], out)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            self.per_channel(node.target, module, x[1])
            return x
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            self.per_channel(node.target, module, x[int(len(x) > module._get_no_batch_dim())])
            return x
        if isinstance(module, nn.GroupNorm):
            if module.num_groups not in (1, module.num_channels):
                self.refuse(node, f"{module.num_groups} groups of {module.num_channels} "
                                  f"channels: a permutation across groups changes the "
                                  f"statistics")
            self.per_channel(node.target, module, x[1])
            return x
        if isinstance(module, nn.LayerNorm):
            normalized = len(module.normalized_shape)  # statistics over all of these axes
            for key, param in module.named_parameters(recurse=False):
                for axis in range(param.dim()):
                    self.unify(self.axis(f"{node.target}.{key}", axis), x[axis - normalized])
            return x
        if isinstance(module, nn.Flatten):
            return self.reshape(node, x, self.shapes[node.args[0]], tuple(value.shape))
        return self.refuse(node)

    def function_rule(self, node, target, value):
        if target in NONLINEAR_FUNCTIONS or target in PASS_FUNCTIONS:
            return self.first(node)
        if target in POOL_FUNCTIONS:
            return self.pool(self.first(node), POOL_FUNCTIONS[target])
        if target in ELEMENTWISE_FUNCTIONS:
            return self.elementwise(node, value)
        if target in RESHAPE_FUNCTIONS:
            return self.reshape(node, self.first(node), self.shapes[node.args[0]],
                                tuple(value.shape))
        if target in REDUCE_FUNCTIONS:
            return self.reduce(node, value)
        if target in (torch.permute, torch.transpose):
            return self.permute(node, target.__name__)
        if target in (torch.cat, torch.concat):
            return self.cat(node)
        return self.refuse(node)

    def method_rule(self, node, target, value):
        if target in NONLINEAR_METHODS or target in PASS_METHODS:
            return self.first(node)
        if target in ELEMENTWISE_METHODS:
            return self.elementwise(node, value)
        if target in RESHAPE_METHODS:
            return self.reshape(node, self.first(node), self.shapes[node.args[0]],
                                tuple(value.shape))
        if target in REDUCE_METHODS:
            return self.reduce(node, value)
        if target in ("permute", "transpose"):
            return self.permute(node, target)
        return self.refuse(node)

    # -- op rules ----------------------------------------------------------------------------
    def writer(self, name: str, module: nn.Module) -> int:
        """The output axis of a conv or linear weight: a new group unless joined later."""
        out = self.axis(f"{name}.weight", 0)
        if (out, name) not in self.writers:
            self.writers.append((out, name))
        if module.bias is not None:
            self.unify(self.axis(f"{name}.bias", 0), out)
        return out

    def conv(self, node, module, x):
        spatial = module.weight.dim() - 2
        channel = len(x) - spatial - 1  # batched or not
        weight = f"{node.target}.weight"
        self.fix(*x[channel + 1:], *(self.axis(weight, a) for a in range(2, spatial + 2)))
        out = self.writer(node.target, module)
        if module.groups == 1:
            self.unify(self.axis(weight, 1), x[channel])
        elif module.groups == module.in_channels == module.out_channels:
            self.fix(self.axis(weight, 1))  # depthwise: output channel i reads input i alone
            out = self.unify(out, x[channel])
        else:
            self.refuse(node, f"grouped convolution, groups={module.groups}, "
                              f"{module.in_channels}->{module.out_channels} channels; only "
                              f"depthwise convolutions with one output per input are supported")
        return (*x[:channel], out, *(FIXED,) * spatial)

    def per_channel(self, name, module, channel):
        for key, tensor in (*module.named_parameters(recurse=False),
                            *module.named_buffers(recurse=False)):
            if key not in SKIPPED_BUFFERS and tensor is not None:
                self.unify(self.axis(f"{name}.{key}", 0), channel)

    def pool(self, x, spatial):
        self.fix(*x[-spatial:])
        return (*x[:-spatial], *(FIXED,) * spatial)

    def elementwise(self, node, value):
        """Broadcasting elementwise op: equal-sized axes of all tensor operands are one."""
        rank = value.dim()
        joined = [[] for _ in range(rank)]
        for arg in self.tensor_args(node):
            labels, shape = self.labels[arg], self.shapes[arg]
            for axis, (label, size) in enumerate(zip(labels, shape, strict=True)):
                out_axis = axis + rank - len(shape)
                if size == value.shape[out_axis]:
                    joined[out_axis].append(label)
                else:  # broadcast from size 1
                    self.fix(label)
        return tuple(self.unify(*labels) if labels else FIXED for labels in joined)

    def reshape(self, node, x, in_shape, out_shape):
        """Reshapes that merge (or keep) axes; a group survives as the leading factor of a
        merged axis (row-major), never split or merged with another group."""
        out = [FIXED] * len(out_shape)
        i = j = 0
        while i < len(in_shape) or j < len(out_shape):
            ins, outs = [i] if i < len(in_shape) else [], [j] if j < len(out_shape) else []
            size_in = in_shape[i] if ins else 1
            size_out = out_shape[j] if outs else 1
            while size_in != size_out:
                if size_in < size_out:
                    i += 1
                    ins.append(i)
                    size_in *= in_shape[i]
                else:
                    j += 1
                    outs.append(j)
                    size_out *= out_shape[j]
            i, j = i + 1, j + 1
            carried = [a for a in ins if in_shape[a] > 1 and self.find(x[a]) != FIXED]
            lead_in = next((a for a in ins if in_shape[a] > 1), None)
            lead_out = next((b for b in outs if out_shape[b] > 1), None)
            if not carried:
                self.fix(*(x[a] for a in ins))
                continue
            if len(carried) > 1 or carried[0] != lead_in or \
                    out_shape[lead_out] % in_shape[lead_in]:
                self.refuse(node, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} splits a "
                                  f"permuted axis or merges it behind another axis")
            self.fix(*(x[a] for a in ins if a != lead_in))
            out[lead_out] = x[lead_in]
        return tuple(out)

    def reduce(self, node, value):
        """mean/sum/amax/amin: symmetric in the reduced axes, so their groups just end."""
        x = self.first(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if isinstance(dims, int):
            dims = [dims]
        reduced = {d % len(x) for d in dims} if dims else set(range(len(x)))  # None, (): all
        if keep:
            return tuple(FIXED if a in reduced else label for a, label in enumerate(x))
        return tuple(label for a, label in enumerate(x) if a not in reduced)

    def permute(self, node, kind):
        x, args = self.first(node), list(node.args[1:])
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            args = list(args[0])
        if not args or not all(isinstance(a, int) for a in args):
            self.refuse(node, "axes not given as integer arguments")
        if kind == "transpose":
            first, second = (a % len(x) for a in args)
            args = list(range(len(x)))
            args[first], args[second] = second, first
        return tuple(x[a % len(x)] for a in args)

    def cat(self, node):
        parts = node.args[0]
        if not all(part in self.labels for part in parts):
            self.refuse(node, "a part is not a tensor of the graph")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        labels = [self.labels[p] for p in parts]
        dim %= len(labels[0])
        if any(self.find(x[dim]) != FIXED for x in labels):
            self.refuse(node, "concatenation along a permuted axis: a spec axis carries one "
                              "group")
        return tuple(FIXED if a == dim else self.unify(*(x[a] for x in labels))
                     for a in range(len(labels[0])))

    # -- the spec ----------------------------------------------------------------------------
    def spec(self, state, input_shape) -> PermutationSpec:
        names: dict[int, str] = {}  # group root -> its first writer's module name
        for element, module in self.writers:
            root = self.find(element)
            if root != FIXED and root not in names:
                names[root] = module
        axes = {}
        for key, tensor in state.items():
            if key.rsplit(".", 1)[-1] in SKIPPED_BUFFERS:
                continue
            axes[key] = tuple(names.get(self.find(self.axis_elements[key, a]))
                              if (key, a) in self.axis_elements else None
                              for a in range(tensor.dim()))
        sizes = PermutationSpec(axes).group_sizes(state)
        outputs = module_outputs(self.module.graph)
        points = {name: self.point(root, sizes[name], outputs) for root, name in names.items()}
        return PermutationSpec(axes, points, check_input_shape=input_shape)

    def point(self, root: int, size: int, outputs: dict[str, fx.Node]) -> MatchPoint:
        """Module docstring: the last activation of the group, after a non-linearity if any."""
        candidates = [node for node, labels in self.labels.items()
                      if len(labels) >= 2 and self.find(labels[1]) == root
                      and self.shapes[node][1] == size
                      and all(self.find(label) == FIXED for a, label in enumerate(labels)
                              if a != 1)]
        if not candidates:
            name = next(m for e, m in self.writers if self.find(e) == root)
            raise LTHError(f"cannot derive a permutation spec for {self.model_name}: no "
                           f"activation carries the units of group {name!r} on dimension 1 "
                           f"(units on another axis, e.g. a linear layer on a sequence); "
                           f"declare its permutation_spec() by hand")
        after = [node for node in candidates if is_nonlinear(node, self.module)]
        writers = [m for e, m in self.writers if self.find(e) == root]
        return name_point((after or candidates)[-1], self.module, outputs, writers)


def describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"{type(root.get_submodule(node.target)).__name__} module {node.target!r}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or "builtins"
        return f"function {module.lstrip('_')}.{getattr(node.target, '__name__', node.target)}"
    return f"{node.op} {node.target!r}"


def _nodes_in(args) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def is_nonlinear(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), NONLINEAR_MODULES)
    if node.op == "call_function":
        return node.target in NONLINEAR_FUNCTIONS
    return node.op == "call_method" and node.target in NONLINEAR_METHODS


def is_relu(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in RELU_METHODS


# ----------------------------------------------------------------------------------------------
# match points: graph node <-> MatchPoint


def module_outputs(graph: fx.Graph) -> dict[str, fx.Node]:
    """module name -> the node its forward returns, for each module called once whose output
    is one node: leaf modules (their call node) and containers (the one node of their scope
    that is used outside it, from fx's ``nn_module_stack``)."""
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    scopes: dict[str, set[fx.Node]] = defaultdict(set)
    for node in graph.nodes:
        for key in node.meta.get("nn_module_stack", {}):
            scopes[key].add(node)
    outputs = {}
    for key, members in scopes.items():
        if f"{key}@1" in scopes or calls[key] > 1 or "@" in key:
            continue
        escaping = [node for node in members if any(user not in members for user in node.users)]
        if len(escaping) == 1:
            outputs[key] = escaping[0]
    for node in graph.nodes:
        if node.op == "call_module" and calls[node.target] == 1:
            outputs[node.target] = node
    return outputs


def name_point(node: fx.Node, root: nn.Module, outputs: dict[str, fx.Node],
               writers: list[str]) -> MatchPoint:
    """The MatchPoint reading ``node``'s output: a module whose forward returns it, else relu
    of such a module, else the node. ``outputs``: :func:`module_outputs` of the graph;
    ``writers``: the modules whose outputs start the group."""
    module = _returning_module(node, outputs, writers)
    if module is not None:
        return MatchPoint(module)
    source = node.args[0] if node.args else None
    if is_relu(node, root) and isinstance(source, fx.Node) and len(_nodes_in(
            (node.args, node.kwargs))) == 1:
        module = _returning_module(source, outputs, writers)
        if module is not None:
            return MatchPoint(module, "relu")
    return MatchPoint(node=node.name)


def _returning_module(node, outputs, writers) -> str | None:
    """The leaf module called at ``node``, else of the containers returning it the one
    holding most of the group's writers (a ResNet stage for its stream), innermost on ties."""
    returning = [name for name, out in outputs.items() if out is node]
    if not returning:
        return None
    if node.op == "call_module" and node.target in returning:
        return node.target
    return max(returning, key=lambda name: (sum(w.startswith(f"{name}.") for w in writers),
                                            name.count(".")))


def locate(graph: fx.Graph, point: MatchPoint) -> fx.Node:
    """The graph node whose output ``point`` reads (before its post-op)."""
    if point.node is not None:
        found = next((node for node in graph.nodes if node.name == point.node), None)
    else:
        found = module_outputs(graph).get(point.module)
    if found is None:
        raise LTHError(f"match point {point.where} is not a node or a once-called module of the "
                       f"model's torch.fx graph")
    return found


def tap(model: nn.Module, points: dict[str, MatchPoint]) -> tuple[fx.GraphModule,
                                                                 dict[str, nn.Module]]:
    """The model's traced graph (sharing its modules and parameters) with an ``nn.Identity``
    after each point's node, so forward hooks on those read any point, graph nodes included.
    Trace in the mode the graph will run in: fx bakes ``self.training`` reads in as constants."""
    graph_module = trace(model)
    nodes = {group: locate(graph_module.graph, point) for group, point in points.items()}
    taps = {}
    for index, (group, node) in enumerate(nodes.items()):
        name = f"lth_tap_{index}"
        graph_module.add_submodule(name, nn.Identity())
        with graph_module.graph.inserting_after(node):
            graph_module.graph.call_module(name, (node,))
        taps[group] = graph_module.get_submodule(name)
    graph_module.recompile()
    return graph_module, taps


# ----------------------------------------------------------------------------------------------
# skip paths, for IMP's prunable set


def skip_path_convs(model: nn.Module) -> list[str]:
    """Convolutions alone on the skip branch of a residual add (torchvision's
    ``layerN.0.downsample.0``, ResNet20's ``shortcut.0``), in graph order.

    A branch of an ``add`` is the chain of single-user, single-input nodes leading back from
    the operand to the node both branches start from; a skip conv is the one conv of such a
    chain whose start reaches the other operand through two or more convs (the block).
    """
    graph = trace(model).graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    found = []
    for node in graph.nodes:
        if not (node.op == "call_function" and node.target in ADD_FUNCTIONS
                or node.op == "call_method" and node.target in ("add", "add_")):
            continue
        operands = [arg for arg in node.args[:2] if isinstance(arg, fx.Node)]
        if len(operands) != 2:
            continue
        for own, other in (operands, operands[::-1]):
            convs, start = [], own
            while len(start.users) == 1 and len(_nodes_in((start.args, start.kwargs))) == 1 \
                    and start.op in ("call_module", "call_function", "call_method"):
                if _is_conv(start, model):
                    convs.append(start.target)
                start = _nodes_in((start.args, start.kwargs))[0]
            if len(convs) == 1 and _most_convs(graph, model, order, start, other) >= 2:
                found.append(convs[0])
    return list(dict.fromkeys(found))


def _is_conv(node: fx.Node, model: nn.Module) -> bool:
    return node.op == "call_module" and isinstance(model.get_submodule(node.target),
                                                   nn.modules.conv._ConvNd)


def _most_convs(graph, model, order, start, end) -> int:
    """The most convs on a path start -> end (-1: no path)."""
    best = {start: 0}
    for node in graph.nodes:
        if order[start] < order[node] <= order[end]:
            reached = [best[arg] for arg in _nodes_in((node.args, node.kwargs)) if arg in best]
            if reached:
                best[node] = max(reached) + _is_conv(node, model)
    return best.get(end, -1)


def get_spec(model: nn.Module, example_input: torch.Tensor | None = None) -> PermutationSpec:
    """The model's own spec (its ``permutation_spec()`` method), else one derived from its
    torch.fx graph with ``example_input`` (a batch it accepts) and checked with
    :func:`check_spec` (:func:`derive_spec`). Here beside the derivation it falls back to, so
    ``spec.py`` (the spec's types) needs nothing from this module."""
    spec = declared_spec(model)
    if spec is not None:
        return spec
    if example_input is None:
        raise no_spec_error(model)
    return derive_spec(model, example_input)
