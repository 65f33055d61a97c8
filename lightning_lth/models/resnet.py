"""ResNet20xw for 32x32 images, as in the authors' code (method.md)."""

from __future__ import annotations

from torch import nn

from lightning_lth.models.registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU.

    A block that changes shape uses the authors' shortcut: a 3x3 conv (stride 2, padding 1,
    no bias) + BN, not the 1x1 conv of the original ResNet paper.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@register_model("resnet20", numerics=1)
class ResNet20(nn.Module):
    def __init__(self, width: int = 1, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32, blocks_per_stage: int = 3):
        super().__init__()
        planes = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU()
        stages, in_planes = [], planes[0]
        for index, out_planes in enumerate(planes):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_planes, out_planes, stride))
                in_planes = out_planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[-1], num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        return self.fc(self.pool(out).flatten(1))

    def permutation_spec(self):
        """Weight symmetries (lightning_lth.symmetry): one group per residual stream and one per
        block's inner channels.

        ``stage{s}``: the residual stream of stage s, shared by everything that writes into it
        (stem conv/bn for stage 0, each block's conv2/bn2, the shortcut conv/bn) and read by
        every conv on it and by the fc input; matched at the stage's output (its last block's
        output). ``stage{s}.block{b}``: the block's conv1/bn1 outputs = conv2's inputs,
        matched after bn1 + ReLU. A block with an identity shortcut keeps its input's stream.
        Written by hand to document the symmetry and to skip tracing: ``get_spec`` uses it
        first; ``symmetry.trace.derive_spec`` gives the same groups and match points
        (tests/test_trace.py).
        """
        from lightning_lth.symmetry.spec import MatchPoint, PermutationSpec

        axes, points = {}, {}

        def conv_bn(conv, bn, out_group, in_group):
            axes[f"{conv}.weight"] = (out_group, in_group, None, None)
            for key in ("weight", "bias", "running_mean", "running_var"):
                axes[f"{bn}.{key}"] = (out_group,)

        stream = "stage0"
        conv_bn("conv1", "bn1", stream, None)
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                prefix, inner, in_stream = f"stages.{s}.{b}", f"stage{s}.block{b}", stream
                if len(block.shortcut):
                    stream = f"stage{s}"
                    conv_bn(f"{prefix}.shortcut.0", f"{prefix}.shortcut.1", stream, in_stream)
                conv_bn(f"{prefix}.conv1", f"{prefix}.bn1", inner, in_stream)
                conv_bn(f"{prefix}.conv2", f"{prefix}.bn2", stream, inner)
                points[inner] = MatchPoint(f"{prefix}.bn1", "relu")
            points[stream] = MatchPoint(f"stages.{s}")
        axes["fc.weight"] = (None, stream)
        axes["fc.bias"] = (None,)
        return PermutationSpec(axes, points, check_input_shape=(self.conv1.in_channels, 8, 8))
