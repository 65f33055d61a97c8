"""A ReLU MLP for small images (Fashion-MNIST, MNIST): the CPU demo model."""

from __future__ import annotations

from torch import nn

from lightning_lth.models import register_model


@register_model("mlp")
class MLP(nn.Module):
    """in -> hidden[0] -> ... -> classes; each hidden size is multiplied by the width."""

    def __init__(self, width: int = 1, num_classes: int = 10, in_channels: int = 1,
                 image_size: int = 28, hidden: tuple[int, ...] = (512, 512, 512)):
        super().__init__()
        sizes = [in_channels * image_size * image_size] + [h * width for h in hidden]
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def forward(self, x):
        return self.classifier(self.layers(x.flatten(1)))
