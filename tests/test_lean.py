"""Lightning's per-hook bookkeeping made cheap (``training/lean.py``), with the same behaviour:
``_current_fx_name`` stored directly while everything else still registers with
``nn.Module``; ``QuietProfiler`` unless ``trainer.profiler`` names one (stages and ``fit``);
``automatic_optimization`` decided once per trainer, and not carried into copies."""

from __future__ import annotations

import copy
import pickle

import lightning as L
import pytest
import torch
from helpers import tiny_config
from lightning.pytorch.profilers import SimpleProfiler
from torch import nn

from lightning_lth.experiment.runner import Runner
from lightning_lth.parsing import make_cli
from lightning_lth.training.lean import QuietProfiler
from lightning_lth.training.module import LTHModule

pytestmark = pytest.mark.quick


def small_module() -> LTHModule:
    return LTHModule(arch="mlp", arch_kwargs={"hidden": [8]}, num_classes=3, in_channels=1,
                     image_size=4)


def test_fx_name_is_stored_directly_and_modules_parameters_buffers_still_register():
    module = small_module()
    module._current_fx_name = "training_step"
    assert vars(module)["_current_fx_name"] == "training_step"
    module.extra = nn.Linear(2, 2)
    module.scale = nn.Parameter(torch.ones(1))
    module.register_buffer("count", torch.zeros(1))
    module.count = torch.ones(1)  # an assigned buffer stays a buffer
    assert "extra" in module._modules and "scale" in module._parameters
    assert torch.equal(module._buffers["count"], torch.ones(1))
    assert {"extra", "scale", "count"}.isdisjoint(vars(module))


def test_fit_and_study_trainers_use_the_quiet_profiler_unless_one_is_named(tmp_path):
    config = str(tiny_config(tmp_path))
    assert type(make_cli(["--config", config], run=False).trainer.profiler) is QuietProfiler
    named = make_cli(["--config", config, "--trainer.profiler=simple"], run=False)
    assert isinstance(named.trainer.profiler, SimpleProfiler)
    runner = Runner(make_cli(["--config", config], run=False, command="experiment"))
    assert type(runner.trainer_args["profiler"]) is QuietProfiler
    runner = Runner(make_cli(["--config", config, "--trainer.profiler=simple"], run=False,
                             command="experiment"))
    assert runner.trainer_args["profiler"] == "simple"


def test_automatic_optimization_is_decided_per_trainer_and_copies_drop_it():
    module = small_module()
    assert module.automatic_optimization and module._graphs_decided is None  # no trainer
    first, second = (L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
                     for _ in range(2))
    module.trainer = first
    assert module.automatic_optimization and module._graphs_decided[0] is first
    module.trainer = second
    assert module.automatic_optimization and module._graphs_decided[0] is second
    assert copy.deepcopy(module)._graphs_decided is None
    assert pickle.loads(pickle.dumps(module))._graphs_decided is None
