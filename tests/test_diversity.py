"""report/diversity.py: the Evci et al. metrics on probability tables small enough to compute
on paper (the numbers are in the comments), its refusals, and a group of one; and the
report's Table 1 from a store's kept outputs: its groups, the missing-outputs line, W&B."""

import csv
import json
import math
import statistics

import pytest
import torch

from lightning_lth import report
from lightning_lth.errors import LTHError
from lightning_lth.experiment.results import RESULTS_FILE, Record
from lightning_lth.io import load_tensors, save_tensors
from lightning_lth.report import write
from lightning_lth.report.diversity import FLOAT16_TINY, diversity
from lightning_lth.report.load import OUTPUTS
from lightning_lth.report.page import render_markdown
from lightning_lth.report.tables import DIVERSITY_CSV
from lightning_lth.report.write import diversity_section

TARGETS = torch.tensor([0, 1])
# three models, two images, two classes; rows are images
THREE = [torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64),   # predicts 0, 1: acc 1
         torch.tensor([[0.6, 0.4], [0.6, 0.4]], dtype=torch.float64),   # predicts 0, 0: acc 1/2
         torch.tensor([[0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)]  # predicts 1, 1: acc 1/2


def test_three_models_by_hand():
    d = diversity(THREE, [TARGETS] * 3)
    assert d.members == 3
    assert d.acc_mean == pytest.approx(2 / 3)
    # deviations 1/3, -1/6, -1/6: sum of squares 1/6, / (3 - 1), sqrt: 0.288675
    assert d.acc_std == pytest.approx(math.sqrt(1 / 12))
    # mean probabilities: image 0 [0.6, 0.4] -> 0, image 1 [0.41667, 0.58333] -> 1: both right
    assert d.ensemble_acc == 1.0
    # pairs (0,1) differ on image 1, (0,2) on image 0, (1,2) on both: (1/2 + 1/2 + 1) / 3
    assert d.disagreement == pytest.approx(2 / 3)
    # KL(i||j), mean over the two images, e.g. (0||1): image 0 0.9 ln(0.9/0.6) + 0.1 ln(0.1/0.4)
    # = 0.226278, image 1 0.2 ln(0.2/0.6) + 0.8 ln(0.8/0.4) = 0.334807; mean 0.280542.
    # All six ordered pairs: (0||1) 0.280542, (0||2) 0.465864, (1||0) 0.346574, (1||2) 0.118635,
    # (2||0) 0.595695, (2||1) 0.114740; mean 0.320342
    assert d.kl == pytest.approx(0.320342, abs=1e-6)
    # JS per unordered pair (mean over images): (0,1) 0.074796, (0,2) 0.120674,
    # (1,2) 0.028761; mean 0.074744
    assert d.js == pytest.approx(0.074744, abs=1e-6)
    # m = 1: the members' mean 2/3; m = 2: {0,1} 1, {0,2} 1, {1,2} (image 0 [0.45, 0.55] -> 1,
    # image 1 [0.525, 0.475] -> 0: both wrong) 0, so 2/3; m = 3: the ensemble, 1
    assert d.ensemble_by_size == pytest.approx((2 / 3, 2 / 3, 1.0))


def test_kl_is_over_ordered_pairs_and_clamps_a_float16_zero():
    # p = [1, 0] and q = [1/2, 1/2] on one image, stored as float16 (p's 0 is exact).
    # KL(p||q) = 1 ln 2 = ln 2; KL(q||p) = 1/2 ln(1/2 / 2^-24) + 1/2 ln(1/2 / 1) = 11 ln 2:
    # the mean of the ordered pairs is 6 ln 2, finite. JS: m = [3/4, 1/4],
    # H(m) - (H(p) + H(q)) / 2 = 0.562335 - (0 + ln 2) / 2 = 0.215762 (no clamp involved).
    p = torch.tensor([[1.0, 0.0]], dtype=torch.float16)
    q = torch.tensor([[0.5, 0.5]], dtype=torch.float16)
    d = diversity([p, q], [torch.tensor([0])] * 2)
    assert FLOAT16_TINY == 2.0 ** -24
    assert d.kl == pytest.approx(6 * math.log(2))
    assert d.js == pytest.approx(0.215762, abs=1e-6)
    assert d.disagreement == 0.0  # q's tie goes to the first class, as p's argmax
    assert (d.acc_mean, d.acc_std, d.ensemble_acc) == (1.0, 0.0, 1.0)


def test_identical_models_do_not_differ_and_rows_are_renormalised():
    a = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    # float16 rows that sum to 0.998 or 1.002 are divided by their sums: still the same model
    d = diversity([a, a * 0.998, a * 1.002], [torch.tensor([0, 1])] * 3)
    assert (d.disagreement, d.acc_mean, d.acc_std, d.ensemble_acc) == (0.0, 0.5, 0.0, 0.5)
    assert d.kl == pytest.approx(0.0, abs=1e-12) and d.js == pytest.approx(0.0, abs=1e-12)


def test_a_group_of_one_has_no_pairwise_metrics():
    d = diversity(THREE[:1], [TARGETS])
    assert (d.members, d.acc_mean, d.ensemble_acc, d.ensemble_by_size) == (1, 1.0, 1.0, (1.0,))
    assert (d.acc_std, d.disagreement, d.kl, d.js) == (None, None, None, None)


@pytest.mark.parametrize("probs, targets, message", [
    (THREE[:2], [TARGETS, torch.tensor([1, 0])], "model 1's targets differ from model 0's"),
    ([THREE[0], torch.full((2, 3), 1 / 3)], [TARGETS] * 2, "model 1's probabilities have shape"),
    ([THREE[0], torch.full((3, 2), 0.5)], [TARGETS, torch.tensor([0, 1, 1])],
     "expected [2, C]"),
    (THREE[:1], [TARGETS, TARGETS], "1 probability tensors but 2 targets"),
    ([], [], "at least one model"),
    (THREE[:1], [torch.tensor([0.0, 1.0])], "1-D integer tensor"),
    (THREE[:1], [torch.tensor([0, 2])], "targets must lie in [0, 2)"),
    ([torch.tensor([[0.5, float("nan")], [0.5, 0.5]])], [TARGETS], "non-finite"),
])
def test_refusals_are_one_line(probs, targets, message):
    with pytest.raises(LTHError) as err:
        diversity(probs, targets)
    assert message in str(err.value) and "\n" not in str(err.value)


# -- the report's Table 1 from a store's stage folders ------------------------------------------
# The fixture writes what a study with R replicates leaves (the contract's format: stage folders
# <store>/<kind>/<key>/test_outputs.pt via io.save_tensors, records with `replicate` and
# `stages`); the report must find each group's files and average the groups over seeds.

N_TEST, CLASSES, R, SEEDS, K = 40, 10, 3, (0, 1), (0, 1)
ROW_LABELS = {"dense": "dense", "imp": "IMP", "lth": "LTH", "naive": "naive",
              "permuted": "permuted"}


def _outputs(store, kind, key, base, noise, gen, targets):
    logits = base + noise * torch.randn(base.shape, generator=gen)
    save_tensors({"probs": logits.softmax(dim=1).to(torch.float16), "targets": targets},
                 store / kind / key / OUTPUTS)


def write_store(tmp_path):
    """Dense A, B_r, IMP at 0.9 and every arm of seeds 0, 1 (k = 0, 1; R = 3) with outputs;
    LTH's replicates are near copies of one net, naive's and permuted's independent ones."""
    store = tmp_path / "store"
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, CLASSES, (N_TEST,), generator=gen)
    signal = 2.0 * torch.nn.functional.one_hot(targets, CLASSES)
    lines = []
    for seed in SEEDS:
        imp, dense_a = f"imp-{seed}", f"denseA-{seed}"
        _outputs(store, "imp", imp, signal, 1.5, gen, targets)
        for r in range(R):
            _outputs(store, "dense", f"denseB-{seed}-{r}", signal, 1.5, gen, targets)
        for k in K:
            lth_base = signal + 1.5 * torch.randn(signal.shape, generator=gen)
            for method in ("lth", "naive", "permuted"):
                for r in range(R):
                    key = f"arm-{method}-{seed}-{k}-{r}"
                    base, noise = (lth_base, 0.1) if method == "lth" else (signal, 1.5)
                    _outputs(store, "arm", key, base, noise, gen, targets)
                    rec = Record(
                        model="mlp", dataset="fashion_mnist", width=1, seed=seed, method=method,
                        sparsity=0.9, rewind_epoch=k, test_acc=0.5, test_loss=1.0,
                        dense_acc_a=0.8, dense_acc_b=0.8, pruned_acc_a=0.7,
                        barrier_loss_before=1.0, barrier_loss_after=0.5,
                        barrier_error_before=0.3, barrier_error_after=0.1, connectivity=None,
                        wall_time_s=1.0, key=key, config_hash="c0ffee", num_threads=1,
                        device="cpu", finished_at="2026-01-01T00:00:00Z").to_dict()
                    # as ArmStage.stage_keys: LTH reads no B
                    rec |= {"replicate": r, "stages": {"dense_a": dense_a, "imp": imp} | (
                        {} if method == "lth" else {"dense_b": f"denseB-{seed}-{r}"})}
                    lines.append(json.dumps(rec))
    (store / RESULTS_FILE).write_text("\n".join(lines) + "\n")
    return store


def group_metrics(store, kind, keys):
    data = [load_tensors(store / kind / key / OUTPUTS) for key in keys]
    return diversity([d["probs"] for d in data], [d["targets"] for d in data])


def expected_row(store, row, k, seeds=SEEDS):
    """The row's numbers as the table's groups say: the mean over seeds of each seed's group
    (IMP: one group of one net per seed)."""
    if row == "imp":
        groups = [group_metrics(store, "imp", [f"imp-{s}" for s in seeds])]
    elif row == "dense":
        groups = [group_metrics(store, "dense", [f"denseB-{s}-{r}" for r in range(R)])
                  for s in seeds]
    else:
        groups = [group_metrics(store, "arm", [f"arm-{row}-{s}-{k}-{r}" for r in range(R)])
                  for s in seeds]

    def mean(name):
        values = [getattr(g, name) for g in groups]
        return None if values[0] is None else statistics.fmean(values)

    return {name: mean(name) for name in ("acc_mean", "acc_std", "ensemble_acc", "disagreement",
                                          "kl", "js")}, len(groups)


def diversity_tables(md):
    """{(S, k) label: {row label: cells}} from report.md's diversity section."""
    section = md.split("### Diversity and ensembles")[1].split("\n## ")[0]
    tables, current = {}, None
    for line in section.splitlines():
        if line.startswith("S = "):
            current = tables.setdefault(line, {})
        elif line.startswith("| ") and not line.startswith("| Row") and current is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            current[cells[0]] = cells[1:]
    return tables


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """One `report` of the store, as of a study config whose W&B mode is auto (offline here)."""
    tmp = tmp_path_factory.mktemp("diversity")
    store = write_store(tmp)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(tmp))
        report.main(str(store / RESULTS_FILE), str(tmp / "out"),
                    wandb_settings=("lth-test", "auto"))
    return store, tmp / "out"


def section_markdown(records, store):
    """The report's diversity section alone (no other figure drawn), as markdown."""
    blocks, _, _, notes = diversity_section(records, store,
                                            ("mlp", "fashion_mnist", 1, "c0ffee"), "stem", "title")
    return render_markdown([*blocks, ("list", notes)])


def test_table_one_per_cell_groups_replicates_and_averages_seeds(reported):
    store, out = reported
    tables = diversity_tables((out / "report.md").read_text())
    assert list(tables) == ["S = 90%, k = 0", "S = 90%, k = 1"]
    for k in K:
        table = tables[f"S = 90%, k = {k}"]
        assert list(table) == list(ROW_LABELS.values())  # the published table's row order
        for row, label in ROW_LABELS.items():
            want, groups = expected_row(store, row, k)
            cells = table[label]
            assert cells[0] == f"{100 * want['acc_mean']:.2f} ± {100 * want['acc_std']:.2f}"
            assert cells[1] == f"{100 * want['ensemble_acc']:.2f}"
            assert cells[2:5] == [f"{want[m]:.3f}" for m in ("disagreement", "kl", "js")]
            assert cells[5:] == (["2", "1"] if row == "imp" else [str(R), str(len(SEEDS))])
        # the planted shape: LTH's near copies barely disagree, naive's independent nets do
        assert float(table["LTH"][2]) < 0.1 < float(table["naive"][2])
    with open(out / "diversity.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(ROW_LABELS) and rows[0].keys() == set(DIVERSITY_CSV)
    naive = next(r for r in rows if (r["row"], r["rewind_epoch"]) == ("naive", "1"))
    want, _ = expected_row(store, "naive", 1)
    assert float(naive["kl"]) == pytest.approx(want["kl"], rel=1e-12)
    by_size = json.loads(naive["ensemble_acc_by_members"])
    assert len(by_size) == R and by_size[0] == pytest.approx(want["acc_mean"])
    assert by_size[-1] == pytest.approx(want["ensemble_acc"])
    html = (out / "report.html").read_text()
    assert "Diversity and ensembles" in html and "ensemble accuracy vs its number" in html
    png = (out / "mlp_fashion_mnist_w1_ensemble.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_one_seed_imp_row_holds_one_model_and_blank_pairs(reported, tmp_path):
    store, _ = reported
    records = [json.loads(line) for line in (store / RESULTS_FILE).read_text().splitlines()]
    table = diversity_tables(section_markdown([r for r in records if r["seed"] == 0],
                                              store))["S = 90%, k = 0"]
    want, _ = expected_row(store, "imp", 0, seeds=(0,))
    assert table["IMP"] == [f"{100 * want['acc_mean']:.2f}", f"{100 * want['acc_mean']:.2f}",
                            "–", "–", "–", "1", "1"]
    assert table["naive"][-2:] == [str(R), "1"]


def test_missing_outputs_are_said_in_one_line_and_their_groups_left_out(tmp_path):
    store = write_store(tmp_path)
    (store / "arm" / "arm-naive-0-1-2" / OUTPUTS).unlink()
    lines = (store / RESULTS_FILE).read_text().splitlines()
    older = [json.loads(line) for line in lines]
    for rec in older:
        if rec["key"] == "arm-permuted-1-0-0":
            del rec["stages"]  # a record of before kept outputs
    bad_targets = load_tensors(store / "arm" / "arm-lth-1-1-1" / OUTPUTS)
    save_tensors({**bad_targets, "targets": bad_targets["targets"].roll(1)},
                 store / "arm" / "arm-lth-1-1-1" / OUTPUTS)
    md = section_markdown(older, store)
    assert (f"2 of {len(older)} record(s) lack kept test outputs (no `stages` in the record, "
            f"or no {OUTPUTS} in {store}/<kind>/<key>/): the groups they belong to are left "
            f"out.") in md
    tables = diversity_tables(md)
    assert tables["S = 90%, k = 1"]["naive"][-1] == "1"  # seed 0's group lost a member
    assert tables["S = 90%, k = 0"]["naive"][-1] == "2"
    # seed 1's B_0 is unknown (its record has no stages): seed 1's dense group is left out
    assert tables["S = 90%, k = 0"]["dense"][-1] == "1"
    assert tables["S = 90%, k = 1"]["LTH"][-1] == "1"  # seed 1's targets differ: left out
    assert "S=90%, k=1, lth: group left out (diversity: model 1's targets differ" in md
    # a store of no kept outputs at all: the line and no table
    for path in store.rglob(OUTPUTS):
        path.unlink()
    blocks, images, rows, _ = diversity_section(older, store, ("mlp",), "stem", "title")
    md = render_markdown(blocks)
    assert f"{len(older)} of {len(older)} record(s) lack kept test outputs" in md
    assert (diversity_tables(md), images, rows) == ({}, {}, [])


def test_disabled_wandb_makes_no_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    write.log_diversity_table([["mlp"]], "lth-test", "disabled", tmp_path / "wandb")
    assert not (tmp_path / "wandb").exists()


def test_wandb_offline_run_holds_the_table(reported):
    store, out = reported
    runs = list((store / "wandb").rglob("offline-run-*"))
    assert len(runs) == 1
    tables = list((runs[0] / "files" / "media" / "table").glob("diversity_table_*.table.json"))
    assert len(tables) == 1
    # the run's log (W&B's protobuf records) sets the summary key to that file, in the
    # project, with job_type "report"
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    path = str(tables[0].relative_to(runs[0] / "files")).encode()
    assert b"diversity_table" in log and b'"table-file"' in log and path in log
    assert b"lth-test" in log and b"report" in log
    table = json.loads(tables[0].read_text())
    with open(out / "diversity.csv") as handle:
        rows = list(csv.reader(handle))
    assert table["columns"] == rows[0] == DIVERSITY_CSV
    assert [[str(v) for v in row] for row in table["data"]] == rows[1:]
