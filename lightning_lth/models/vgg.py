"""VGG11xw, the REPAIR variant the authors use: no BatchNorm, one linear layer (method.md)."""

from __future__ import annotations

from torch import nn

from lightning_lth.models.registry import register_model

VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@register_model("vgg11", numerics=1)
class VGG11(nn.Module):
    def __init__(self, width: int = 1, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32):
        super().__init__()
        layers, channels = [], in_channels
        for item in VGG11_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item * width, 3, padding=1), nn.ReLU()]
                channels = item * width
        self.features = nn.Sequential(*layers)
        spatial = image_size // 2 ** VGG11_LAYOUT.count("M")
        self.classifier = nn.Linear(channels * spatial * spatial, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

    def permutation_spec(self):
        """Weight symmetries (lightning_lth.symmetry): one group per conv's output channels,
        matched after its ReLU. The classifier's input follows the last conv's channels (with a
        1x1 final map the flatten order is the channel order; a larger map is handled by the
        spec's flattened-axis rule). Written by hand to document the symmetry and to skip
        tracing: ``get_spec`` uses it first; ``symmetry.trace.derive_spec`` gives the same
        groups and match points (tests/test_trace.py)."""
        from lightning_lth.symmetry.spec import MatchPoint, PermutationSpec

        axes, points, previous, count = {}, {}, None, 0
        for index, module in enumerate(self.features):
            if isinstance(module, nn.Conv2d):
                group = f"conv{count}"
                axes[f"features.{index}.weight"] = (group, previous, None, None)
                axes[f"features.{index}.bias"] = (group,)
                points[group] = MatchPoint(f"features.{index + 1}")  # its ReLU
                previous, count = group, count + 1
        axes["classifier.weight"] = (None, previous)
        axes["classifier.bias"] = (None,)
        last_channels = [m for m in self.features if isinstance(m, nn.Conv2d)][-1].out_channels
        spatial = round((self.classifier.in_features // last_channels) ** 0.5)
        image_size = spatial * 2 ** sum(isinstance(m, nn.MaxPool2d) for m in self.features)
        return PermutationSpec(axes, points, check_input_shape=(
            self.features[0].in_channels, image_size, image_size))
