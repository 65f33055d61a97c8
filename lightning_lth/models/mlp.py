"""A ReLU MLP for small images (Fashion-MNIST, MNIST): the CPU demo model."""

from __future__ import annotations

from torch import nn

from lightning_lth.models.registry import register_model


@register_model("mlp", numerics=1)
class MLP(nn.Module):
    """in -> hidden[0] -> ... -> classes; each hidden size is multiplied by the width."""

    def __init__(self, width: int = 1, num_classes: int = 10, in_channels: int = 1,
                 image_size: int = 28, hidden: tuple[int, ...] = (512, 512, 512)):
        super().__init__()
        sizes = [in_channels * image_size * image_size] + [h * width for h in hidden]
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def forward(self, x):
        return self.classifier(self.layers(x.flatten(1)))

    def permutation_spec(self):
        """Weight symmetries (lightning_lth.symmetry): one group per hidden layer, matched after
        its ReLU. Written by hand to document the symmetry and to skip tracing: ``get_spec``
        uses it first; ``symmetry.trace.derive_spec`` gives the same groups and match points
        (tests/test_trace.py)."""
        from lightning_lth.symmetry.spec import MatchPoint, PermutationSpec

        axes, points, previous, count = {}, {}, None, 0
        for index, module in enumerate(self.layers):
            if isinstance(module, nn.Linear):
                group = f"layer{count}"
                axes[f"layers.{index}.weight"] = (group, previous)
                axes[f"layers.{index}.bias"] = (group,)
                points[group] = MatchPoint(f"layers.{index + 1}")  # its ReLU
                previous, count = group, count + 1
        axes["classifier.weight"] = (None, previous)
        axes["classifier.bias"] = (None,)
        return PermutationSpec(axes, points,
                               check_input_shape=(self.layers[0].in_features,))
