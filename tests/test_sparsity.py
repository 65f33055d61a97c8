"""Masks, the fixed-mask invariant of sparse training, and IMP (schedule, pruning).

IMP runs (rounds as stages, resume) are tested end to end in test_experiment.py.

Everything runs a real Lightning Trainer on CPU with tiny random data.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_lth.errors import LTHError
from lightning_lth.sparsity import imp
from lightning_lth.sparsity.mask import Mask
from lightning_lth.training.module import LTHModule

PAPER_TARGETS = [0.8, 0.9, 0.95, 0.97]


# -- helpers --------------------------------------------------------------------------------
class TinyData(L.LightningDataModule):
    """Random images and labels; the test split is the training split."""

    def __init__(self, shape=(1, 8, 8), count=64, batch_size=16, classes=10, seed=0,
                 poison_batch: int | None = None):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, *shape, generator=generator)
        self.labels = torch.randint(0, classes, (count,), generator=generator)
        if poison_batch is not None:  # overflows fp16: the GradScaler skips that step
            self.images[poison_batch * batch_size:(poison_batch + 1) * batch_size] = 1e30
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size,
                          shuffle=True)

    def test_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=len(self.labels))


def make_trainer(max_epochs, callbacks=(), logger=False, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=logger,
                     callbacks=list(callbacks), enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def tiny_mlp(seed=0, **hparams):
    torch.manual_seed(seed)
    return LTHModule("mlp", 1, 10, 1, 8, arch_kwargs={"hidden": (32, 32)}, **hparams)


def random_mask(net, sparsity=0.8, seed=1, names=None):
    generator = torch.Generator().manual_seed(seed)
    params = dict(net.named_parameters())
    names = names or imp.prunable_names(net)
    return Mask({name: torch.rand(params[name].shape, generator=generator) >= sparsity
                 for name in names}, {})


class SimulatedCrash(RuntimeError):
    pass


class StepCheck(L.Callback):
    """After every optimizer step: every masked weight is exactly 0.0.

    ``on_train_batch_end`` runs after the step; an optimizer step-post hook registered after
    the module's (hooks run in order) counts the steps really taken. ``poison_dead_grads``
    writes 1.0 into the gradients of masked weights just before the step, so only the
    module's step-post hook can keep them at 0.0.
    """

    def __init__(self, poison_dead_grads=False, fail_at_batch=None):
        self.poison_dead_grads, self.fail_at_batch = poison_dead_grads, fail_at_batch
        self.batches = self.steps_taken = 0
        self.violations, self.dead_grad_nonzero = [], 0

    def on_train_start(self, trainer, pl_module):
        self.start = {name: p.detach().clone() for name, p in pl_module.net.named_parameters()}
        self.dead = {name: ~keep for name, keep in pl_module.mask.tensors.items()}
        self._post_hooks_before = len(trainer.optimizers[0]._optimizer_step_post_hooks)
        trainer.optimizers[0].register_step_post_hook(self._count)

    def _count(self, *_):
        self.steps_taken += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = dict(pl_module.net.named_parameters())
        for name, dead in self.dead.items():
            grad = params[name].grad
            if self.poison_dead_grads:
                grad.masked_fill_(dead, 1.0)
            elif bool(((grad != 0) & dead).any()):
                self.dead_grad_nonzero += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        params = dict(pl_module.net.named_parameters())
        for name, dead in self.dead.items():
            revived = (params[name].detach() != 0) & dead
            if bool(revived.any()):
                self.violations.append((self.batches, name, int(revived.sum())))
        if self.fail_at_batch is not None and self.batches == self.fail_at_batch:
            raise SimulatedCrash(f"simulated crash at batch {self.batches}")

    def kept_weights_moved(self, net, mask) -> bool:
        params = dict(net.named_parameters())
        return all(not torch.equal(params[n].detach()[k], self.start[n][k])
                   for n, k in mask.tensors.items())


# -- the invariant: masked weights are exactly 0.0 after every optimizer step -------------
INVARIANT_CASES = {
    # name: (arch, data shape, batch size, module kwargs, trainer kwargs, StepCheck kwargs)
    "resnet20": ("resnet20", (3, 32, 32), 4, {}, {}, {}),
    "vgg11": ("vgg11", (3, 32, 32), 2, {}, {}, {}),
    "mlp": ("mlp", (1, 28, 28), 8, {}, {}, {}),
    "mlp-clip-norm": ("mlp", (1, 28, 28), 8, {}, {"gradient_clip_val": 0.05}, {}),
    "mlp-clip-value": ("mlp", (1, 28, 28), 8, {},
                       {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"}, {}),
    "mlp-bf16": ("mlp", (1, 28, 28), 8, {}, {"precision": "bf16-mixed"}, {}),
    "mlp-bf16-poisoned-grads": ("mlp", (1, 28, 28), 8, {}, {"precision": "bf16-mixed"},
                                {"poison_dead_grads": True}),
    "resnet20-poisoned-grads": ("resnet20", (3, 32, 32), 4, {}, {"gradient_clip_val": 1.0},
                                {"poison_dead_grads": True}),
}


@pytest.mark.parametrize("case", list(INVARIANT_CASES))
def test_masked_weights_stay_zero_after_every_step(case):
    arch, shape, batch, module_kwargs, trainer_kwargs, check_kwargs = INVARIANT_CASES[case]
    torch.manual_seed(0)
    module = LTHModule(arch, 1, 10, shape[0], shape[1], lr=0.05, momentum=0.9,
                       weight_decay=5e-4, **module_kwargs)
    module.mask = random_mask(module.net)
    check = StepCheck(**check_kwargs)
    data = TinyData(shape, count=50 * batch, batch_size=batch)
    make_trainer(1, [check], **trainer_kwargs).fit(module, datamodule=data)
    assert check.batches == 50 and check.steps_taken == 50
    assert check.violations == []
    if not check.poison_dead_grads:
        assert check.dead_grad_nonzero == 0  # the gradient hook zeroed them
    assert check.kept_weights_moved(module.net, module.mask)  # training really happened
    # the hooks are gone after fit: without them a masked weight could move again
    assert all(not p._backward_hooks and not p._post_accumulate_grad_hooks
               for p in module.net.parameters())


def test_masked_weights_stay_zero_when_the_grad_scaler_skips_a_step():
    """fp16 AMP with a GradScaler (CPU): an overflowing batch skips optimizer.step(), so the
    step-post hook is not called for it; the weights, masked ones included, stay as they were."""
    module = tiny_mlp(lr=0.05, momentum=0.9, weight_decay=5e-4)
    module.mask = random_mask(module.net)
    check = StepCheck(poison_dead_grads=True)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    data = TinyData((1, 8, 8), count=60 * 4, batch_size=4, poison_batch=3)
    make_trainer(1, [check], plugins=[plugin]).fit(module, datamodule=data)
    assert check.batches == 60
    assert check.steps_taken < 60  # at least the poisoned batch's step was skipped
    assert check.steps_taken >= 50
    assert check.violations == []


def test_hooks_of_a_crashed_fit_do_not_leak_into_the_next_fit():
    """A fit that dies mid-way never reaches on_fit_end; the next fit, with another mask,
    must not keep zeroing gradients with the old mask."""
    module = tiny_mlp(lr=0.1, momentum=0.9)
    first = random_mask(module.net, 0.5, seed=1)
    module.mask = first
    with pytest.raises(SimulatedCrash):
        make_trainer(1, [StepCheck(fail_at_batch=2)]).fit(module, datamodule=TinyData())
    second = Mask({name: ~keep for name, keep in first.tensors.items()}, {})
    module.mask = second
    check = StepCheck()
    make_trainer(1, [check]).fit(module, datamodule=TinyData())
    assert check.violations == [] and check.dead_grad_nonzero == 0
    # weights kept by the second mask (all pruned to 0.0 by the first) must train
    assert check.kept_weights_moved(module.net, second)


def test_a_mask_that_does_not_fit_fails_at_fit_start_with_lth_error():
    module = tiny_mlp()
    module.mask = Mask({"layers.0.weight": torch.ones(3, 3, dtype=torch.bool)}, {})
    with pytest.raises(LTHError, match="shape"):
        make_trainer(1).fit(module, datamodule=TinyData())


# -- Mask ------------------------------------------------------------------------------------
@pytest.mark.quick
def test_mask_save_load_round_trip(tmp_path):
    net = tiny_mlp().net
    mask = random_mask(net, 0.7)
    mask.meta = {"model": "mlp", "width": 1, "target_sparsity": 0.7, "round": 3}
    mask.save(tmp_path / "m.pt")
    loaded = Mask.load(tmp_path / "m.pt")
    assert list(loaded.tensors) == list(mask.tensors)
    for name, keep in mask.tensors.items():
        assert loaded.tensors[name].dtype == torch.bool
        assert torch.equal(loaded.tensors[name], keep)
    for key, value in mask.meta.items():
        assert loaded.meta[key] == value
    assert loaded.sparsity() == mask.sparsity()
    assert loaded.meta["actual_sparsity"] == pytest.approx(mask.sparsity())
    assert loaded.layer_sparsity() == mask.layer_sparsity()
    loaded.check_fits(net, "mlp", 1)


@pytest.mark.quick
def test_check_fits_errors():
    net = tiny_mlp().net
    good = random_mask(net)
    good.meta = {"model": "mlp", "width": 1}
    wrong_name = Mask({"layers.9.weight": torch.ones(32, 64, dtype=torch.bool)}, {})
    with pytest.raises(LTHError, match="layers.9.weight"):
        wrong_name.check_fits(net)
    wrong_shape = Mask({"layers.0.weight": torch.ones(64, 32, dtype=torch.bool)}, {})
    with pytest.raises(LTHError, match=r"\(64, 32\)"):
        wrong_shape.check_fits(net)
    with pytest.raises(LTHError, match="model"):
        good.check_fits(net, "resnet20", 1)
    with pytest.raises(LTHError, match="width"):
        good.check_fits(net, "mlp", 2)
    good.check_fits(net, "mlp", 1)


def test_bad_mask_files_give_lth_error(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator()
                                      .manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(LTHError, match="corrupt"):
        Mask.load(corrupt)
    with pytest.raises(LTHError, match="not found"):
        Mask.load(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "weights.pt")
    with pytest.raises(LTHError, match="not a lightning_lth mask"):
        Mask.load(tmp_path / "weights.pt")
    for bad in ({"meta": 5}, {"meta": {"format": "lightning_lth.mask/1"}, "masks": [1, 2]},
                {"meta": {"format": "lightning_lth.mask/1"}, "masks": {"a": 3}}):
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(LTHError):
            Mask.load(tmp_path / "bad.pt")


# -- which weights are pruned ----------------------------------------------------------------
@pytest.mark.quick
def test_prunable_names_defaults():
    resnet = LTHModule("resnet20").net
    names = imp.prunable_names(resnet)
    assert "conv1.weight" in names and "fc.weight" in names
    assert "stages.0.0.conv2.weight" in names
    assert not any("shortcut" in n or "bn" in n or n.endswith("bias") for n in names)
    assert len(names) == 1 + 18 + 1  # stem, 9 blocks x 2 convs, fc
    vgg = LTHModule("vgg11").net
    assert imp.prunable_names(vgg) == [f"features.{i}.weight" for i in
                                       (0, 3, 6, 8, 11, 13, 16, 18)] + ["classifier.weight"]
    mlp = tiny_mlp().net
    assert imp.prunable_names(mlp) == ["layers.0.weight", "layers.2.weight",
                                       "classifier.weight"]
    # include/exclude patterns
    assert imp.prunable_names(mlp, ["layers.*"], []) == ["layers.0.weight", "layers.2.weight"]
    assert imp.prunable_names(mlp, None, ["classifier.*"]) == ["layers.0.weight",
                                                              "layers.2.weight"]
    assert imp.prunable_names(mlp, ["*"], []) == ["layers.0.weight", "layers.2.weight",
                                                 "classifier.weight"]  # never biases
    with_shortcuts = imp.prunable_names(resnet, ["*.weight"], ["*bn*"])
    assert "stages.1.0.shortcut.0.weight" in with_shortcuts
    with pytest.raises(LTHError, match="no prunable weights"):
        imp.prunable_names(mlp, ["nothing*"], [])


# -- the schedule ----------------------------------------------------------------------------
def resnet20_prunable():
    net = LTHModule("resnet20").net
    params = dict(net.named_parameters())
    return sum(params[n].numel() for n in imp.prunable_names(net))


@pytest.mark.parametrize("prunable", [resnet20_prunable(), 10_000, 123_457, 25_000_000])
def test_schedule_paper_targets_round_counts(prunable):
    shared = imp.imp_schedule(prunable, PAPER_TARGETS, 0.2, "shared")
    landed = {r.target: r.step for r in shared if r.target is not None}
    assert landed == {0.8: 8, 0.9: 11, 0.95: 14, 0.97: 16}
    assert len(shared) == 16
    zeros = [r.zeros for r in shared]
    assert zeros == sorted(set(zeros))  # strictly increasing: masks nest
    for r in shared:
        if r.target is not None:
            assert r.zeros == round(r.target * prunable)
    per_target = imp.imp_schedule(prunable, PAPER_TARGETS, 0.2, "per_target")
    assert len(per_target) == 8 + 11 + 14 + 16
    assert [r.index for r in per_target] == list(range(1, 50))
    for chain, target in enumerate(PAPER_TARGETS):
        rounds = [r for r in per_target if r.chain == chain]
        assert [r.step for r in rounds] == list(range(1, len(rounds) + 1))
        assert len(rounds) == {0.8: 8, 0.9: 11, 0.95: 14, 0.97: 16}[target]
        assert rounds[-1].target == target and rounds[-1].zeros == round(target * prunable)
        assert all(r.target is None for r in rounds[:-1])
        live = prunable
        for r in rounds[:-1]:  # every round but the last removes 20% of the live weights
            assert live - (prunable - r.zeros) == round(0.2 * live)
            live = prunable - r.zeros
        assert rounds[-1].zeros - rounds[-2].zeros <= round(0.2 * live)  # lands, no overshoot


@pytest.mark.quick
def test_schedule_shared_prefix_equals_per_target_chain():
    prunable = 50_000
    shared = imp.imp_schedule(prunable, [0.8], 0.2, "shared")
    assert shared == imp.imp_schedule(prunable, [0.8], 0.2, "per_target")
    assert [r.zeros for r in shared[:7]] == [r.zeros for r in
                                            imp.imp_schedule(prunable, [0.95], 0.2, "shared")[:7]]


def test_schedule_target_zero_and_small_counts():
    rounds = imp.imp_schedule(100, [0.0, 0.5], 0.5, "shared")
    assert [(r.step, r.zeros, r.target) for r in rounds] == [(0, 0, 0.0), (1, 50, 0.5)]
    rounds = imp.imp_schedule(10, [0.9], 0.01, "shared")  # 1% of 10 rounds to 0: prune >= 1
    assert [r.zeros for r in rounds] == list(range(1, 10))


@pytest.mark.quick
@pytest.mark.parametrize("targets, match", [
    ([0.8, 0.8], "0.8.*strictly increasing"),
    ([0.9, 0.8], "0.8.*strictly increasing"),
    ([1.0], r"1\.0.*\[0, 1\)"),
    ([0.5, 1.5], r"1\.5.*\[0, 1\)"),
    ([-0.1], r"-0\.1.*\[0, 1\)"),
    ([float("nan")], r"nan.*\[0, 1\)"),
    (["0.8"], r"'0\.8'.*\[0, 1\)"),
    ([True], r"True.*\[0, 1\)"),
    ([], r"\[\].*non-empty"),
    (0.8, r"0\.8.*non-empty list"),
])
def test_bad_targets_give_lth_error(targets, match):
    with pytest.raises(LTHError, match=match):
        imp.check_targets(targets)
    with pytest.raises(LTHError, match=match):
        imp.imp_schedule(1000, targets, 0.2, "shared")


def test_bad_schedule_settings_give_lth_error():
    with pytest.raises(LTHError, match="fraction"):
        imp.imp_schedule(1000, [0.8], 1.0, "shared")
    with pytest.raises(LTHError, match="fraction"):
        imp.imp_schedule(1000, [0.8], 0, "shared")
    with pytest.raises(LTHError, match="chain.*'both'"):
        imp.imp_schedule(1000, [0.8], 0.2, "both")
    with pytest.raises(LTHError, match="0.81.*same"):
        imp.imp_schedule(10, [0.8, 0.81], 0.2, "shared")
    with pytest.raises(LTHError, match="0.99.*all"):
        imp.imp_schedule(10, [0.99], 0.2, "shared")


# -- the pruning step ------------------------------------------------------------------------
def test_prune_global_l1_is_exact_global_nested_and_permanent():
    net = tiny_mlp().net
    names = imp.prunable_names(net)
    with torch.no_grad():  # many ties: exact counts must not depend on distinct magnitudes
        net.layers[0].weight.copy_(torch.randint(-3, 4, net.layers[0].weight.shape) * 0.01)
    params_before = dict(net.named_parameters())
    order_before = [name for name, _ in net.named_parameters()]
    total = sum(params_before[n].numel() for n in names)
    first = imp.prune_global_l1(net, names, None, 1000)
    assert first.zeros == 1000 and first.total == total
    second = imp.prune_global_l1(net, names, first, 700)
    assert second.zeros == 1700
    params = dict(net.named_parameters())
    for name in names:
        assert not bool((first.tensors[name] < second.tensors[name]).any())  # nested
        assert bool((params[name][~second.tensors[name]] == 0).all())
        assert params[name] is params_before[name]  # the same Parameter objects
    assert [name for name, _ in net.named_parameters()] == order_before
    assert not any(hasattr(m, "weight_orig") or hasattr(m, "weight_mask") or
                   m._forward_pre_hooks for m in net.modules())
    assert not any(n.endswith(("_orig", "_mask")) for n in net.state_dict())


def test_prune_global_l1_picks_the_smallest_magnitudes_across_layers():
    net = tiny_mlp().net
    names = imp.prunable_names(net)
    params = dict(net.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    mask = imp.prune_global_l1(net, names, None, 1500)
    pruned = torch.cat([before[n][~mask.tensors[n]].abs() for n in names])
    kept = torch.cat([before[n][mask.tensors[n]].abs() for n in names])
    assert pruned.numel() == 1500 and pruned.max() <= kept.min()
    # the classifier (small init scale) and the first layer are both pruned: one global cut
    assert 0 < mask.layer_sparsity()["layers.0.weight"] < 1
