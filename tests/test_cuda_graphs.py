"""``model.cuda_graphs``: the training step captured as one CUDA graph, and its CPU fallback.

A masked MLP trains the same batches with and without the switch, through the real Trainer;
on CUDA the graphed run must capture and replay (warm-up steps, then one graph, an eager
odd-sized last batch) and end within ``ATOL`` of the eager run's weights (fused SGD with a
device learning rate rounds differently from the eager foreach step), with the mask
invariant exact and the same step count and learning rate. On a CPU the switch falls back
to the eager step: same numbers bit for bit, said once.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch

from lightning_lth.cuda_streams import WARMUP
from lightning_lth.data import DeviceLoader
from lightning_lth.models import build_model
from lightning_lth.sparsity.mask import Mask
from lightning_lth.symmetry.matching import _GraphedPasses, activation_correlations
from lightning_lth.training import module as module_file
from lightning_lth.training.module import LTHModule

ATOL = 1e-5  # after 2 epochs of 9 steps, lr 0.05: eager vs graphed fused SGD
NO_CUDA = "CUDA graphs are captured on a GPU only"


class GraphSeen(L.Callback):
    """Whether a graph had been captured by the last training batch."""

    captured = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        graphed = pl_module._graphed
        self.captured = graphed is not None and graphed.graph is not None


def train(device: str, cuda_graphs: bool, epochs: int = 2):
    """(module, trainer, callback) after a masked MLP fit on 8x8 images."""
    L.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    # 1100 images at batch 128: 8 full batches and a last one of 76 (eager in the graph run)
    images = torch.randint(0, 256, (1100, 1, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (1100,), generator=generator)
    loader = DeviceLoader(images, labels, 128, (0.5,), (0.25,), train=True, augment=False,
                          seed=0, device=torch.device(device))
    module = LTHModule(arch="mlp", arch_kwargs={"hidden": (64, 64)}, num_classes=10,
                       in_channels=1, image_size=8, lr=0.05, cuda_graphs=cuda_graphs)
    generator.manual_seed(1)
    module.mask = Mask({name: torch.rand(param.shape, generator=generator) >= 0.7
                        for name, param in module.net.named_parameters()
                        if name.endswith("weight")}, {})
    seen = GraphSeen()
    trainer = L.Trainer(max_epochs=epochs, accelerator=device, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[seen])
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    trainer.fit(module, loader)
    return module, trainer, seen


def check_mask_exact(module: LTHModule) -> None:
    params = dict(module.net.named_parameters())
    for name, keep in module.mask.tensors.items():
        assert torch.count_nonzero(params[name].detach()[~keep.to(params[name].device)]) == 0


@pytest.mark.quick
def test_cuda_graphs_fall_back_on_cpu_same_numbers_said_once(monkeypatch):
    monkeypatch.setattr(module_file, "_told_no_cuda", set())  # as in a fresh process
    eager, eager_trainer, _ = train("cpu", cuda_graphs=False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        graphed, trainer, seen = train("cpu", cuda_graphs=True)
        again, _, _ = train("cpu", cuda_graphs=True)
    fallback = [w for w in said if "model.cuda_graphs" in str(w.message)]
    assert len(fallback) == 1 and "eagerly" in str(fallback[0].message)
    assert graphed.automatic_optimization and not seen.captured
    assert trainer.global_step == eager_trainer.global_step == 18
    for name, value in eager.net.state_dict().items():
        assert torch.equal(graphed.net.state_dict()[name], value), name
        assert torch.equal(again.net.state_dict()[name], value), name


@pytest.mark.requires_cuda(NO_CUDA)
def test_cuda_graph_step_matches_the_eager_step():
    eager, eager_trainer, eager_seen = train("cuda", cuda_graphs=False)
    graphed, trainer, seen = train("cuda", cuda_graphs=True)
    assert seen.captured and not eager_seen.captured
    assert not graphed.automatic_optimization
    assert trainer.global_step == eager_trainer.global_step == 18
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.device.type == "cuda"
    assert float(lr) == pytest.approx(eager_trainer.optimizers[0].param_groups[0]["lr"])
    check_mask_exact(graphed)
    for name, value in eager.net.state_dict().items():
        torch.testing.assert_close(graphed.net.state_dict()[name], value, rtol=0, atol=ATOL)
    for key in ("train/acc", "train/loss_epoch"):  # the graph's sums vs the eager step's
        assert float(trainer.callback_metrics[key]) == pytest.approx(
            float(eager_trainer.callback_metrics[key]), abs=1e-4)


@pytest.mark.requires_cuda(NO_CUDA)
def test_graphed_passes_capture_after_warmup_replay_and_run_odd_batches_eagerly():
    total = torch.zeros((), dtype=torch.float64, device="cuda")
    seen = []  # Python side effects happen only when a pass runs eagerly or is captured

    def run(x):
        seen.append(len(x))
        total.add_(x.double().sum())

    passes = _GraphedPasses(run, run, {})
    batches = [torch.full((8,), float(i), device="cuda") for i in range(1, 7)]
    batches.append(torch.full((3,), 10.0, device="cuda"))  # the odd last batch
    for x in batches:
        passes(x)
    assert passes.graph is not None
    assert seen == [8] * 2 * (WARMUP + 1) + [3, 3]  # warm-up, capture, then the odd batch
    assert float(total) == 2 * (8 * sum(range(1, 7)) + 3 * 10.0)


@pytest.mark.requires_cuda(NO_CUDA)
def test_graphed_matching_equals_eager_matching():
    torch.manual_seed(0)
    nets = [build_model("resnet20", 1, 10, 3, 32).cuda() for _ in range(2)]
    spec = nets[0].permutation_spec()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 3, 32, 32, generator=generator).cuda() for _ in range(7)]
    batches.append(torch.randn(12, 3, 32, 32, generator=generator).cuda())
    graphed = activation_correlations(*nets, spec, batches)
    eager = activation_correlations(*nets, spec, batches, cuda_graphs=False)
    assert graphed.keys() == eager.keys()
    for group, corr in eager.items():  # the same kernels on the same buffers
        torch.testing.assert_close(graphed[group], corr, rtol=0, atol=1e-12)
