"""VGG11xw, the REPAIR variant the authors use: no BatchNorm, one linear layer (method.md)."""

from __future__ import annotations

from torch import nn

from lightning_lth.models import register_model

VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@register_model("vgg11")
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
