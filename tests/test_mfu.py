"""bench/flops.py's FLOP count and peaks, and bench/bench_mfu.py's smoke run (issue 23)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_lth.models import build_model

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_flops", BENCH / "flops.py")
flops = sys.modules["bench_flops"] = importlib.util.module_from_spec(_spec)  # a dataclass needs it
_spec.loader.exec_module(flops)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 5))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_small_conv_linear_net_matches_a_hand_count(device):
    batch = 3
    conv1 = batch * 4 * 3 * 9 * 8 * 8  # multiply-adds: out channels x in x kernel x out map
    conv2 = batch * 6 * 4 * 9 * 4 * 4
    linear = batch * 96 * 5
    count = flops.train_step_flops(small_net().to(device),
                                   torch.randn(batch, 3, 8, 8).to(device))
    assert count.forward == 2 * (conv1 + conv2 + linear)
    # backward: conv1's weight gradient only (the images need none); conv2 and the linear
    # layer compute their input's gradient and their weight's, each as much as the forward
    assert count.backward == 2 * (conv1 + 2 * conv2 + 2 * linear)
    assert count.per_image == count.total / batch


@pytest.mark.parametrize("arch,width", [("resnet20", 1), ("vgg11", 1), ("resnet20", 2)])
def test_the_count_scales_exactly_with_the_batch_and_meta_equals_cpu(arch, width):
    one = flops.model_step_flops(arch, width, 1)
    many = flops.model_step_flops(arch, width, 7)
    assert (many.forward, many.backward) == (7 * one.forward, 7 * one.backward)
    torch.manual_seed(0)
    on_cpu = flops.train_step_flops(build_model(arch, width, 10, 3, 32), torch.randn(2, 3, 32, 32))
    assert on_cpu == flops.model_step_flops(arch, width, 2)


def test_resnet20x1_forward_is_the_hand_count_about_41_million_multiply_adds():
    maps = {16: 32 * 32, 32: 16 * 16, 64: 8 * 8}
    stem = 3 * 16 * 9 * maps[16]
    blocks = sum(6 * c * c * 9 * maps[c] for c in (16, 32, 64))  # 3 blocks x 2 convs per stage
    # the first block of stages 1 and 2 reads c/2 channels: its conv1 costs half a c -> c
    # conv, and the authors' 3x3 shortcut conv (c/2 -> c) adds that half back
    conv1_fix = sum((c // 2 - c) * c * 9 * maps[c] for c in (32, 64))
    shortcuts = sum((c // 2) * c * 9 * maps[c] for c in (32, 64))
    fc = 64 * 10
    macs = flops.model_step_flops("resnet20", 1, 4).forward / 2 / 4
    assert macs == stem + blocks + conv1_fix + shortcuts + fc == 42_910_336
    # the issue's ~41 M is ResNet20 with parameter-free shortcuts: ours less the two 3x3
    # shortcut convs (16->32 at 16x16, 32->64 at 8x8: 1,179,648 each)
    assert shortcuts == 2 * 1_179_648 and macs - shortcuts == 40_551_040
    assert abs(macs - shortcuts - 41e6) / 41e6 < 0.02
    # a step (forward + backward) is about 3 forwards: the stem's input gradient is skipped
    step = flops.model_step_flops("resnet20", 1, 4)
    assert step.backward == 2 * step.forward - 2 * 4 * stem


def test_peaks_per_card_and_none_for_an_unknown_card_or_a_cpu():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989.5
    assert flops.peak_tflops("NVIDIA H200", "bf16-mixed") == 989.5
    assert flops.peak_tflops("NVIDIA H100 PCIe", "32-true") == 378.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312.0
    for peaks in flops.PEAKS.values():  # dense figures: TF32 half of BF16, FP32 well below
        assert peaks["tf32"] == pytest.approx(peaks["bf16"] / 2, rel=0.01)
        assert peaks["fp32"] < peaks["tf32"] / 4 and peaks["fp16"] == peaks["bf16"]
    assert flops.peak_tflops("NVIDIA GeForce RTX 4090", "bf16-mixed") is None
    assert flops.peak_tflops("Intel(R) Xeon(R) Processor", "bf16-mixed") is None
    assert flops.mfu(1000.0, 1e9, None) is None
    assert flops.mfu(100_000.0, 1e9, 200.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="precision 'int8'"):
        flops.peak_tflops("NVIDIA H200", "int8")


def _bench_mfu(*args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    return subprocess.run([sys.executable, str(BENCH / "bench_mfu.py"), *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_bench_mfu_smoke_runs_both_sides_and_writes_its_result(tmp_path):
    out = tmp_path / "mfu.json"
    done = _bench_mfu("--smoke", "--threads", "1", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MFU not computed" in done.stdout
    record = json.loads(out.read_text())
    assert record["provenance"]["git_commit"] and record["numbers"]["smoke"]
    assert record["numbers"]["settings"] == {"precision": "bf16-mixed", "channels_last": True,
                                             "compile": True, "cuda_graphs": True}
    models = record["numbers"]["models"]
    assert sorted(models) == ["resnet20x1", "vgg11x1"]
    for entry in models.values():
        assert entry["fit"]["img_per_s"]["max"] > 0 and entry["bare"]["img_per_s"]["max"] > 0
        assert entry["fit"]["mfu"] is None and entry["fit"]["tflops"] > 0
        assert entry["fit / bare"] == pytest.approx(
            entry["fit"]["img_per_s"]["max"] / entry["bare"]["img_per_s"]["max"])
    assert models["resnet20x1"]["flops_per_image"] == \
        flops.model_step_flops("resnet20", 1, 8).per_image


@pytest.mark.parametrize("argv,line", [
    (["--models", "resnet20x2"], "error: --models 'resnet20x2': allowed are comma-separated "
     "names from resnet20x1, resnet20x4, resnet20x8, resnet20x16, vgg11x1"),
    (["--device", "tpu"], "error: --device 'tpu': allowed: cpu, cuda or cuda:N"),
    (["--steps", "0"], "error: --steps=0: allowed: >= 1"),
])
def test_bench_mfu_refuses_bad_input_in_one_line_before_any_work(argv, line, monkeypatch,
                                                                 capsys, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_mfu

    out = tmp_path / "mfu.json"
    with pytest.raises(SystemExit) as exit_:
        bench_mfu.main(["--device", "cpu", *argv, "--out", str(out)])
    assert exit_.value.code == 2 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines() == [line]
