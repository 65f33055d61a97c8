"""DDP with 2 CPU processes (gloo): a tiny study cell, sparse training and matching."""

from __future__ import annotations

import torch
from conftest import run_cli
from test_experiment import NO_WANDB, events, records, tiny_config

from lightning_lth.io import load_tensors
from lightning_lth.sparsity.mask import Mask


def test_ddp_two_cpu_ranks_agree_and_write_once(tmp_path):
    config = tiny_config(tmp_path, n_train=512)
    store = tmp_path / "store"
    result = run_cli("experiment", "--config", config, "--trainer.accelerator=cpu",
                     "--trainer.devices=2", "--trainer.strategy=ddp",
                     "--study.only.arm=permuted", "--study.only.sparsity=0.8",
                     "--study.only.rewind_epoch=1", cwd=tmp_path, env=NO_WANDB, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "ranks agree on the permutation (2 ranks)" in output
    assert "ranks agree on the permuted mask (2 ranks)" in output
    (row,) = records(store)  # one record, written once
    assert row["method"] == "permuted"
    assert sorted(e["stage"] for e in events(store)) == ["arm", "dense", "dense", "imp", "match"]
    # The mask invariant on the DDP-trained sparse net.
    arm = store / "arm" / row["key"]
    mask = Mask.load(arm / "mask.pt")
    weights = load_tensors(arm / "final.pt")["state_dict"]
    for name, keep in mask.tensors.items():
        assert torch.count_nonzero(weights[name][~keep]) == 0, name
    assert abs(mask.sparsity() - 0.8) < 1e-3
    assert not list(store.glob("*/*.partial"))
