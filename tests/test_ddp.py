"""DDP with 2 CPU processes (gloo): a tiny study cell, sparse training and matching, and the
same experiment as one process: the global batch stays data.batch_size."""

from __future__ import annotations

import torch
from conftest import class_images, run_cli
from helpers import IMP_ROUNDS, NO_WANDB, events, kept_outputs, records, tiny_config

from lightning_lth.io import load_tensors
from lightning_lth.sparsity.mask import Mask

CELL = ("--study.only.arm=permuted", "--study.only.sparsity=0.8", "--study.only.rewind_epoch=1")


def test_ddp_two_cpu_ranks_agree_and_write_once(tmp_path):
    config = tiny_config(tmp_path, n_train=512)
    store = tmp_path / "store"
    result = run_cli("experiment", "--config", config, "--trainer.accelerator=cpu",
                     "--trainer.devices=2", "--trainer.strategy=ddp", *CELL, cwd=tmp_path,
                     env=NO_WANDB, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "ranks agree on the permutation (2 ranks)" in output
    assert "ranks agree on the permuted mask (2 ranks)" in output
    (row,) = records(store)  # one record, written once
    assert row["method"] == "permuted"
    assert sorted(e["stage"] for e in events(store)) == sorted(
        ["arm", "dense", "dense", "match"] + ["imp"] * IMP_ROUNDS)
    # The mask invariant on the DDP-trained sparse net.
    arm = store / "arm" / row["key"]
    mask = Mask.load(arm / "mask.pt")
    weights = load_tensors(arm / "final.pt")["state_dict"]
    for name, keep in mask.tensors.items():
        assert torch.count_nonzero(weights[name][~keep]) == 0, name
    assert abs(mask.sparsity() - 0.8) < 1e-3
    assert not list(store.glob("*/*.partial"))

    # The same study in one process: each rank took batch_size / 2 of every global batch, so
    # both runs took the same SGD steps (up to float summation order), and the test split was
    # counted once (a duplicated image would move the loss).
    single = tmp_path / "single"
    single.mkdir()
    alone = run_cli("experiment", "--config", config, f"--study.store={single / 'store'}",
                    *CELL, cwd=tmp_path, env=NO_WANDB, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    (one,) = records(single / "store")
    assert one["key"] != row["key"]  # devices and strategy are keyed: never mixed up
    for folder in (store / "dense").iterdir():
        if folder.is_dir():
            seed = folder.name.rsplit("-", 1)[0] + "-"  # the same net, keyed apart
            (twin,) = [p for p in (single / "store" / "dense").iterdir()
                       if p.is_dir() and p.name.startswith(seed)]
            ddp, serial = (load_tensors(f / "rewind" / "final.pt")["state_dict"]
                           for f in (folder, twin))
            for name in serial:
                torch.testing.assert_close(ddp[name], serial[name], rtol=0, atol=1e-5)
    assert abs(one["dense_acc_a"] - row["dense_acc_a"]) < 1e-9
    # Kept test outputs, gathered from both ranks: every test image once, in order, as the
    # one-process run keeps them (to float16 steps: the weights differ in the last bits).
    labels = class_images(128, 10, (28, 28), 0)[1]
    ddp_kept, serial_kept = kept_outputs(store, labels), kept_outputs(single / "store", labels)
    assert len(ddp_kept) == len(serial_kept) == 2 + 2 + 1  # dense A, B, target rounds, arm
    for (ddp, serial) in zip(ddp_kept.values(), serial_kept.values(), strict=True):
        torch.testing.assert_close(ddp["probs"], serial["probs"], atol=2**-8, rtol=0)
    assert abs(one["test_loss"] - row["test_loss"]) < 1e-4
