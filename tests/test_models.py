"""Models: output shapes, parameter counts derived by hand, the width multiplier, bad input."""

import pytest
import torch
from torch import nn

from lightning_lth.errors import LTHError
from lightning_lth.models import MODELS, build_model


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def conv(c_in, c_out, k=3, bias=False):
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn(c):
    return 2 * c  # weight + bias (running stats are buffers, not parameters)


def resnet20_count(w: int, classes: int) -> int:
    """ResNet20xw by hand: stem, 3 stages of 3 BasicBlocks, the authors' 3x3 shortcut."""
    a, b, c = 16 * w, 32 * w, 64 * w
    stem = conv(3, a) + bn(a)
    block = lambda i, o: conv(i, o) + bn(o) + conv(o, o) + bn(o)  # noqa: E731
    shortcut = lambda i, o: conv(i, o) + bn(o)  # noqa: E731  3x3 conv, stride 2, + BN
    stage1 = 3 * block(a, a)
    stage2 = block(a, b) + shortcut(a, b) + 2 * block(b, b)
    stage3 = block(b, c) + shortcut(b, c) + 2 * block(c, c)
    fc = c * classes + classes
    return stem + stage1 + stage2 + stage3 + fc


@pytest.mark.quick
def test_resnet20x1_parameter_count_by_hand():
    # stem:    3*16*9 = 432 conv + 32 BN                                   =     464
    # stage 1: 3 blocks x (16*16*9 + 32 + 16*16*9 + 32) = 3 x 4,672        =  14,016
    # stage 2: block 1: 16*32*9 + 64 + 32*32*9 + 64 = 13,952
    #          shortcut (3x3 conv 16->32 + BN): 16*32*9 + 64 = 4,672
    #          blocks 2,3: 2 x (32*32*9 + 64) x 2 = 2 x 18,560 = 37,120      =  55,744
    # stage 3: block 1: 32*64*9 + 128 + 64*64*9 + 128 = 55,552
    #          shortcut (3x3 conv 32->64 + BN): 32*64*9 + 128 = 18,560
    #          blocks 2,3: 2 x (64*64*9 + 128) x 2 = 2 x 73,984 = 147,968    = 222,080
    # fc:      64*10 + 10                                                  =     650
    # total:   464 + 14,016 + 55,744 + 222,080 + 650                       = 292,954
    assert 464 + 14_016 + 55_744 + 222_080 + 650 == 292_954
    assert resnet20_count(1, 10) == 292_954
    net = build_model("resnet20", 1, 10, 3, 32)
    assert n_params(net) == 292_954
    # the two shape-changing blocks carry the authors' shortcut: a 3x3 stride-2 conv + BN
    shortcuts = [m.shortcut for stage in net.stages for m in stage if len(m.shortcut)]
    assert len(shortcuts) == 2
    for sc in shortcuts:
        conv_, bn_ = sc
        assert conv_.kernel_size == (3, 3) and conv_.stride == (2, 2) and conv_.padding == (1, 1)
        assert conv_.bias is None and isinstance(bn_, nn.BatchNorm2d)


def test_resnet20_count_follows_width_and_classes():
    for w, classes in ((2, 10), (1, 100)):
        assert n_params(build_model("resnet20", w, classes, 3, 32)) == resnet20_count(w, classes)


def test_resnet20x16_builds_with_the_count_by_hand():
    """The published grid's widest net (widths {1, 4, 8, 16}): 256, 512 and 1024 channels,
    74,360,074 parameters on 10 classes; it runs (on small images, to keep the test short)."""
    net = build_model("resnet20", 16, 10, 3, 32).eval()
    assert n_params(net) == resnet20_count(16, 10) == 74_360_074
    assert sorted({m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)}) == [
        256, 512, 1024]
    with torch.no_grad():
        assert net(torch.randn(1, 3, 8, 8)).shape == (1, 10)


def test_vgg11x1_parameter_count_by_hand():
    # convs (3x3, with bias): 3->64, 64->128, 128->256, 256->256, 256->512, 512->512 x 3
    #   3*64*9+64 = 1,792            64*128*9+128 = 73,856       128*256*9+256 = 295,168
    #   256*256*9+256 = 590,080      256*512*9+512 = 1,180,160   512*512*9+512 = 2,359,808 (x3)
    # five 2x2 max-pools take 32x32 to 1x1: one Linear(512 -> 10) = 5,120 + 10 = 5,130
    # total: 1,792 + 73,856 + 295,168 + 590,080 + 1,180,160 + 3 x 2,359,808 + 5,130 = 9,225,610
    layout = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512),
              (512, 512)]
    by_hand = sum(conv(i, o, bias=True) for i, o in layout) + 512 * 10 + 10
    assert by_hand == 9_225_610
    net = build_model("vgg11", 1, 10, 3, 32)
    assert n_params(net) == 9_225_610
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert [type(m) for m in net.modules()].count(nn.Linear) == 1


@pytest.mark.quick
def test_mlp_parameter_count():
    net = build_model("mlp", 1, 10, 1, 28)
    assert n_params(net) == (784 * 512 + 512) + 2 * (512 * 512 + 512) + (512 * 10 + 10)
    small = build_model("mlp", 2, 10, 1, 28, hidden=(8, 4))
    assert n_params(small) == (784 * 16 + 16) + (16 * 8 + 8) + (8 * 10 + 10)


@pytest.mark.parametrize("name, width, classes, in_channels, size", [
    ("resnet20", 1, 10, 3, 32),
    ("resnet20", 2, 100, 3, 32),
    ("resnet20", 1, 10, 1, 28),
    ("vgg11", 1, 10, 3, 32),
    ("mlp", 1, 10, 1, 28),
    ("mlp", 2, 7, 3, 32),
])
def test_output_shapes(name, width, classes, in_channels, size):
    torch.manual_seed(0)
    net = build_model(name, width, classes, in_channels, size).eval()
    with torch.no_grad():
        out = net(torch.randn(4, in_channels, size, size))
    assert out.shape == (4, classes)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_width_scales_channels():
    r1, r2 = build_model("resnet20", 1, 10, 3, 32), build_model("resnet20", 2, 10, 3, 32)
    widths = lambda net: [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]  # noqa: E731
    assert widths(r2) == [2 * c for c in widths(r1)]
    assert sorted(set(widths(r1))) == [16, 32, 64]
    assert r2.fc.in_features == 128
    v1, v3 = build_model("vgg11", 1, 10, 3, 32), build_model("vgg11", 3, 10, 3, 32)
    assert widths(v3) == [3 * c for c in widths(v1)]
    assert widths(v1) == [64, 128, 256, 256, 512, 512, 512, 512]
    assert v3.classifier.in_features == 3 * 512
    m1, m4 = build_model("mlp", 1, 10, 1, 28), build_model("mlp", 4, 10, 1, 28)
    outs = lambda net: [m.out_features for m in net.modules() if isinstance(m, nn.Linear)]  # noqa: E731
    assert outs(m1) == [512, 512, 512, 10] and outs(m4) == [2048, 2048, 2048, 10]


@pytest.mark.quick
def test_unknown_model_lists_valid_names():
    with pytest.raises(LTHError) as info:
        build_model("resnet18", 1, 10, 3, 32)
    message = str(info.value)
    assert "'resnet18'" in message
    for name in ("mlp", "resnet20", "vgg11"):
        assert name in message
    assert set(MODELS) >= {"mlp", "resnet20", "vgg11"}


@pytest.mark.quick
@pytest.mark.parametrize("width", [0, -1, 1.5, "2", True, None])
def test_bad_width(width):
    with pytest.raises(LTHError, match=r"width must be an integer >= 1, got") as info:
        build_model("resnet20", width, 10, 3, 32)
    assert repr(width) in str(info.value)
