"""Early matching and matching methods as study dimensions (study.match.epochs / .methods).

Real stages on tiny Fashion-MNIST-format data: a planted permutation recovered at every
matching epoch, one permuted arm per (epoch, method) planned, keyed, recorded and reported,
and dense B trained only as far as the study reads it (then continued, not retrained).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from helpers import events, records, tiny_config

from lightning_lth.cli import main
from lightning_lth.experiment.plan import build_plan
from lightning_lth.experiment.stages import load_perm
from lightning_lth.io import load_json, load_tensors
from lightning_lth.models.mlp import MLP
from lightning_lth.parsing import make_cli
from lightning_lth.report.write import write_report
from lightning_lth.symmetry.spec import apply_permutation


class PlantedMLP(MLP):
    """The MLP with one fixed init (generator seed 0) whose hidden units the global RNG (the
    dense stage's seed) shuffles: any two of them are exact permutations of each other, and
    trained alike (one full batch per epoch, no augmentation) they stay so."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        fixed = torch.Generator().manual_seed(0)
        linears = [m for m in self.layers if isinstance(m, torch.nn.Linear)] + [self.classifier]
        previous = None
        with torch.no_grad():
            for layer in linears:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=fixed)
                                   / layer.in_features ** 0.5)
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=fixed))
                if previous is not None:
                    layer.weight.copy_(layer.weight[:, previous])
                if layer is not self.classifier:
                    previous = torch.randperm(layer.out_features)
                    layer.weight.copy_(layer.weight[previous])
                    layer.bias.copy_(layer.bias[previous])


def _edit(config: Path, **sections) -> Path:
    data = yaml.safe_load(config.read_text())
    for section, values in sections.items():
        data[section].update(values)
    config.write_text(yaml.safe_dump(data))
    return config


def _weights(store: Path, ident: str, epoch: str | None = None) -> dict[str, torch.Tensor]:
    """A dense net's weights from a match stage's input ("<dense key>@<epoch or final>"),
    at ``epoch`` when given."""
    key, _, at = ident.rpartition("@")
    at = epoch or at
    name = "final.pt" if at == "final" else f"epoch_{at}.pt"
    return load_tensors(store / "dense" / key / "rewind" / name)["state_dict"]


def test_planted_permutation_recovered_at_every_matching_epoch(tmp_path):
    """B = pi(A) at init, trained alike: the match at every pair [j, j] finds the planted pi,
    and pi(A_j) is B_j all along the trajectory."""
    config = _edit(tiny_config(tmp_path, match={"epochs": [[1, 1], [2, 2], [3, 3]]}),
                   model={"arch": f"{__name__}.PlantedMLP"}, data={"batch_size": 256})
    assert main(["match", "--config", str(config)]) == 0
    store = tmp_path / "store"
    spec = PlantedMLP(hidden=(32, 32)).permutation_spec()
    folders = sorted(p for p in (store / "match").iterdir() if (p / "perm.pt").is_file())
    epochs = []
    for folder in folders:
        identity = load_json(folder / "settings.json")["identity"]
        quality = load_json(folder / "quality.json")
        perm = load_perm(folder / "perm.pt")
        epochs.append((quality["epoch_a"], quality["epoch_b"]))
        assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
        # the planted pi: it maps A's init exactly onto B's ...
        init_a, init_b = (_weights(store, identity[n], "0") for n in ("a", "b"))
        moved = apply_permutation(init_a, spec, perm)
        assert all(torch.equal(moved[n], init_b[n]) for n in init_b), folder.name
        # ... and A_j onto B_j (trained alike: equal up to float reassociation)
        moved = load_tensors(folder / "weights_a_permuted.pt")["state_dict"]
        for name, tensor in _weights(store, identity["b"]).items():
            torch.testing.assert_close(moved[name], tensor, atol=1e-4, rtol=1e-4)
        # eps damps the units nearly constant on the data, hence not 1
        assert min(quality["correlation"].values()) > 0.9
    assert sorted(epochs) == [(1, 1), (2, 2), (3, 3)]


def _plan(config: Path):
    parsed = make_cli(["--config", str(config)], run=False).config.as_dict()
    return build_plan(parsed, saved_epochs=lambda key: None)


def test_arms_per_matching_epoch_and_method_planned_keyed_recorded_reported(tmp_path):
    plain = tiny_config(tmp_path / "plain", sparsities=[0.8])
    config = tiny_config(tmp_path, sparsities=[0.8],
                         match={"epochs": [1, 3], "methods": ["activation", "weight"]})
    plan, default = _plan(config), _plan(plain)
    arms = {(a.shown, a.rewind_epoch): a for a in plan.arms}
    shown = {name for name, _ in arms}
    assert shown == {"lth", "naive", "permuted", "permuted@b1", "permuted[weight]",
                     "permuted@b1[weight]"}
    # the paper's arms and match keep the keys of a study without the new dimensions
    assert {(a.shown, a.rewind_epoch): a.key for a in default.arms}.items() <= \
        {k: a.key for k, a in arms.items()}.items()
    assert plan.final_match.key == default.final_match.key
    assert len({m.key.rpartition("-")[2] for m in plan.matches}) == 4  # hashes differ
    assert plan.b_until == 3 and plan.b_epochs_saved == 0
    assert arms[("permuted@b1", 0)].matching.b.ident.endswith("@1")
    assert 1 in plan.dense_b.save_epochs  # the early pi's B is a saved snapshot

    assert main(["experiment", "--config", str(config)]) == 0
    store = tmp_path / "store"
    rows = {(r["method"], r["rewind_epoch"]): r for r in records(store)}
    assert set(rows) == set(arms) and all(rows[c]["key"] == arms[c].key for c in arms)
    final, early = rows[("permuted", 0)], rows[("permuted@b1", 0)]
    assert (final["match_epoch_a"], final["match_epoch_b"]) == (3, 3)
    assert (early["match_epoch_a"], early["match_epoch_b"], early["match_method"]) == \
        (3, 1, "activation")
    assert set(final["pi_agreement"].values()) == {1.0}
    assert all(0 <= v <= 1 for v in early["pi_agreement"].values())
    assert rows[("permuted@b1[weight]", 1)]["match_method"] == "weight"
    assert abs(final["acc_b_at_match"] - final["dense_acc_b"]) < 1e-9  # B at T, two ways
    assert rows[("lth", 0)]["match_method"] is None
    assert early["barrier_error_after"] == final["barrier_error_after"]  # the paper's pi

    written = {p.name for p in write_report(records(store), tmp_path / "report", store=store)}
    assert {"mlp_fashion_mnist_w1_vs_match_epoch.png",
            "mlp_fashion_mnist_w1_agreement.png"} <= written
    report = (tmp_path / "report" / "report.md").read_text()
    for name in shown - {"lth", "naive"}:
        assert f"|  | {name} |" in report, name
    assert "agreement layer0" in report


def test_b_trained_only_as_far_as_needed_then_continued(tmp_path):
    """match.epochs [1] with k <= 1: B trains 1 epoch of T = 3 (on the T-epoch schedule);
    adding the match at T later continues that run to T instead of training B again, and
    the continued B is the one a study trained from scratch has, bit for bit."""
    config = tiny_config(tmp_path, sparsities=[0.8], match={"epochs": [1]})
    plan = _plan(config)
    assert (plan.b_until, plan.b_epochs_saved) == (1, 2)
    assert plan.dense_b not in plan.stages
    assert plan.epochs == _plan(tiny_config(tmp_path / "full", sparsities=[0.8])).epochs - 2
    assert main(["experiment", "--config", str(config)]) == 0
    store = tmp_path / "store"
    assert [e["stage"] for e in events(store)].count("dense") == 1  # A only
    (truncated,) = (p for p in (store / "snapshot").iterdir() if p.is_dir())
    assert sorted(p.name for p in (truncated / "rewind").iterdir()) == ["epoch_0.pt",
                                                                       "epoch_1.pt"]
    rows = records(store)
    assert all(r["dense_acc_b"] is None and r["barrier_error_after"] is None for r in rows)
    early = [r for r in rows if r["method"] == "permuted@b1"]
    assert len(early) == 2 and all(r["pi_agreement"] is None for r in early)
    assert all(0 < r["acc_b_at_match"] <= 1 for r in early)

    data = yaml.safe_load(config.read_text())
    data["study"]["match"]["epochs"] = [1, 3]
    config.write_text(yaml.safe_dump(data))
    assert main(["experiment", "--config", str(config)]) == 0
    (continued,) = events(store, "continue")
    assert continued["stage"] == "dense" and continued["epoch"] == 1
    computed = [e["key"] for e in events(store)]
    assert len(computed) == len(set(computed))  # nothing computed twice (no permuted@b1 again)

    scratch = tiny_config(tmp_path / "scratch", sparsities=[0.8])
    assert main(["match", "--config", str(scratch)]) == 0
    b_key = _plan(config).dense_b.key
    for name in ("final.pt", "epoch_1.pt"):
        ours = load_tensors(store / "dense" / b_key / "rewind" / name)["state_dict"]
        theirs = load_tensors(tmp_path / "scratch" / "store" / "dense" / b_key / "rewind"
                              / name)["state_dict"]
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs), name
    early = [r for r in records(store) if r["method"] == "permuted@b1"]
    assert len(early) == 2  # recorded once; the arms were not trained again
