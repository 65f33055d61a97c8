"""A fit stopped at a checkpoint -- mid-epoch, at an epoch's last batch, or at an epoch's end
-- and resumed in a fresh Trainer with a fresh module and DataModule ends with the very
weights of the uninterrupted fit: both loaders continue the epoch at the next batch."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch
from conftest import write_idx_dataset
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lth.data import LTHDataModule
from lightning_lth.training.module import LTHModule

EPOCHS, BATCHES = 3, 8  # 256 training images in batches of 32


def fit(root, data_dir, loader, callbacks=(), ckpt_path=None):
    """The net's weights after a deterministic fit (resumed from ``ckpt_path`` when given)."""
    L.seed_everything(0, verbose=False)
    module = LTHModule(arch="mlp", arch_kwargs={"hidden": (32,)}, num_classes=10,
                       in_channels=1, image_size=28, lr=0.05)
    data = LTHDataModule("fashion_mnist", str(data_dir), batch_size=32, eval_batch_size=64,
                         loader=loader, num_workers=0, download=False)
    data.order_seed = 5
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, deterministic=True,
                        logger=False, enable_checkpointing=bool(callbacks),
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=root, callbacks=list(callbacks))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data, ckpt_path=ckpt_path)
    return module.net.state_dict()


@pytest.mark.quick
@pytest.mark.parametrize("loader", ["device", "torchvision"])
def test_resumed_fit_equals_uninterrupted_fit(tmp_path, loader):
    data_dir = write_idx_dataset(tmp_path / "data", "fashion_mnist")
    steps = ModelCheckpoint(tmp_path / "steps", "{step}", every_n_train_steps=1, save_top_k=-1)
    epochs = ModelCheckpoint(tmp_path / "epochs", "{epoch}", every_n_epochs=1, save_top_k=-1,
                             save_on_train_epoch_end=True)
    reference = fit(tmp_path, data_dir, loader, [steps, epochs])
    for ckpt in (f"steps/step={BATCHES + 5}.ckpt",  # epoch 1, after its 6th batch
                 f"steps/step={2 * BATCHES}.ckpt",  # after epoch 1's last batch
                 "epochs/epoch=0.ckpt"):  # at epoch 0's end
        resumed = fit(tmp_path, data_dir, loader, ckpt_path=tmp_path / ckpt)
        for name, tensor in reference.items():
            assert torch.equal(resumed[name], tensor), (ckpt, name)
