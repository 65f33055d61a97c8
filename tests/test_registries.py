"""Behaviour by registry: an arm is one ``ARMS`` entry and one mask function, a matching method
one ``symmetry.matching.METHODS`` entry, and the stages answer for their own outputs and lines."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
from helpers import records, tiny_config

from lightning_lth.cli import main
from lightning_lth.experiment import stages
from lightning_lth.experiment.runner import Runner
from lightning_lth.experiment.stages import (
    ARMS,
    ArmSpec,
    ArmStage,
    ImpRound,
    StageContext,
)
from lightning_lth.parsing import make_cli
from lightning_lth.report.load import load_records
from lightning_lth.report.write import write_report
from lightning_lth.sparsity.mask import Mask
from lightning_lth.symmetry import matching


def random_mask(mask: Mask, arm: ArmStage, ctx: StageContext, net: torch.nn.Module) -> Mask:
    """A random-mask control: per tensor as many kept weights as IMP's mask, at places drawn
    from the arm's own data-order seed."""
    generator = torch.Generator().manual_seed(ctx.order_seed(*arm.order()))
    tensors = {}
    for name, kept in mask.tensors.items():
        flat = torch.zeros(kept.numel(), dtype=torch.bool)
        flat[torch.randperm(kept.numel(), generator=generator)[:int(kept.sum())]] = True
        tensors[name] = flat.view_as(kept)
    return Mask(tensors, dict(mask.meta))


@pytest.fixture
def random_arm():
    """A fourth arm, registered for the test only."""
    ARMS["random"] = ArmSpec("random", init="B", label="random mask", colour="tab:brown",
                             make_mask=random_mask,
                             mask_what="random places, IMP's per-tensor counts")
    yield ARMS["random"]
    del ARMS["random"]


def test_a_fourth_arm_is_one_entry_and_one_function(tmp_path, capsys, random_arm):
    config = tiny_config(tmp_path, sparsities=[0.8], rewind_epochs=[1],
                         arms=["lth", "permuted", "random"])
    assert main(["plan", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("arm random"))
    assert "B's epoch-1 weights, random places, IMP's per-tensor counts" in row

    assert main(["experiment", "--config", str(config)]) == 0
    store = tmp_path / "store"
    by_method = {r["method"]: r for r in records(store)}
    assert set(by_method) == {"lth", "permuted", "random"}
    control = by_method["random"]
    # no pi of its own (it needs no match stage), B's snapshot, IMP's round, a mask of its own
    def identity(method: str) -> dict:
        settings = store / ArmStage.kind / by_method[method]["key"] / "settings.json"
        return json.loads(settings.read_text())["identity"]

    folder = store / ArmStage.kind / control["key"]
    mine = identity("random")
    assert control["match_method"] is None and mine["matching"] is None
    assert mine["init"] == identity("permuted")["init"] != identity("lth")["init"]
    assert mine["mask"] == identity("lth")["mask"]
    found = Mask.load(store / ImpRound.kind / mine["mask"] / ImpRound.MASK)
    drawn = Mask.load(folder / ArmStage.MASK)
    assert {n: int(t.sum()) for n, t in drawn.tensors.items()} == \
        {n: int(t.sum()) for n, t in found.tensors.items()}
    assert any(not torch.equal(drawn.tensors[n], found.tensors[n]) for n in found.tensors)
    assert 0.0 <= control["test_acc"] <= 1.0

    loaded, problems, _ = load_records(store / "results.jsonl")
    assert not problems
    write_report(loaded, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert any(line.split("|")[2].strip() == "random mask"
               for line in report.splitlines() if line.count("|") > 3)


def test_an_unregistered_arm_is_refused_with_the_registry_in_the_message(tmp_path, capsys):
    config = tiny_config(tmp_path, arms=["lth", "random"])
    assert main(["plan", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: unknown arm 'random'; valid arms: {', '.join(ARMS)}"]


def test_config_validation_reads_the_matching_table(tmp_path, capsys, monkeypatch):
    config = tiny_config(tmp_path, match={"methods": ["planted"]})
    assert main(["plan", "--config", str(config)]) == 2
    assert "unknown matching method 'planted'; valid: activation, weight" in \
        capsys.readouterr().err
    monkeypatch.setitem(matching.METHODS, "planted", matching.METHODS["weight"])
    assert main(["plan", "--config", str(config)]) == 0
    assert "match[planted]" in capsys.readouterr().out  # not the first: it carries its name


def test_the_runner_is_a_stage_context_and_the_protocol_names_what_stages_use(tmp_path):
    runner = Runner(make_cli(["--config", str(tiny_config(tmp_path))], run=False,
                             command="experiment"))
    assert isinstance(runner, StageContext)
    # the Protocol names exactly the runner members the stages ask for
    used = set(re.findall(r"\bctx\.([a-z_]+)", inspect.getsource(stages)))
    named = set(StageContext.__annotations__) | {
        name for name, value in vars(StageContext).items()
        if callable(value) and not name.startswith("_")}
    assert used == named and len(named) == 19
    assert not isinstance(object(), StageContext)
