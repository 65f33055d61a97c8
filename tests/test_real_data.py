"""Real Fashion-MNIST (Debian's dataset-fashion-mnist): matching two trained MLPs lowers the
interpolation barrier. Slow: two dense trainings and the interpolation on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_fmnist.yaml"


@pytest.mark.slow
@pytest.mark.skipif(not SYSTEM_FMNIST.is_file(),
                    reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
def test_matching_lowers_the_barrier_on_real_fashion_mnist(tmp_path):
    result = run_cli("match", "--config", CONFIG, "--trainer.max_epochs=3",
                     "--study.match.epochs=[3]",  # pi from A and B both trained, as the paper
                     f"--data.data_dir={tmp_path / 'data'}", f"--study.store={tmp_path / 'store'}",
                     cwd=tmp_path, env={"WANDB_MODE": "disabled"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (connectivity,) = (tmp_path / "store" / "match").glob("*/connectivity.json")
    curves = json.loads(connectivity.read_text())
    naive, matched = curves["naive"], curves["matched"]
    assert naive["acc"][0] > 0.8 and naive["acc"][-1] > 0.8  # both nets trained
    assert matched["loss_barrier"] < 0.5 * naive["loss_barrier"]
    assert matched["error_barrier"] < 0.5 * naive["error_barrier"]
