"""report/: the paper-style tables hold the right numbers, bad lines are reported not fatal,
the figures are real PNGs, and report.html (the dashboard) is report.md's tables and figures
on one self-contained page."""

import base64
import csv
import io
import json
import re
import shutil
import statistics
import subprocess
import types
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pytest
from conftest import run_cli
from helpers import NO_WANDB, tiny_config

from lightning_lth import report
from lightning_lth.errors import LTHError
from lightning_lth.report.load import (
    arm_curves,
    load_connectivity,
    load_records,
    load_wandb_records,
)
from lightning_lth.report.plots import plot_group_interpolation
from lightning_lth.report.tables import accuracy_table, barrier_table, group_records
from lightning_lth.report.write import write_report

METHODS = ("lth", "naive", "permuted")  # the package's arms (experiment.stages.ARMS)
LABELS = {"lth": "LTH", "naive": "naive", "permuted": "permuted"}  # as the report shows them
SEEDS = (0, 1, 2)
SPARSITIES = (0.8, 0.9)
KS = (0, 5)
BASE = {"lth": 0.90, "naive": 0.85, "permuted": 0.88}
SEED_NOISE = {0: 0.0, 1: 0.004, 2: -0.003}


def acc(method, sparsity, k, seed):
    # permuted beats LTH at (0.9, k=5) so the bold test is not just "LTH always wins"
    bump = 0.05 if (method, sparsity, k) == ("permuted", 0.9, 5) else 0.0
    return BASE.get(method, 0.5) - 0.1 * (sparsity - 0.8) + 0.002 * k + SEED_NOISE[seed] * (1 + KS.index(k)) + bump


def record(tmp_path, method="lth", sparsity=0.8, k=0, seed=0, width=1, **over):
    rec = {"model": "resnet20", "dataset": "cifar10", "width": width, "seed": seed,
           "method": method, "sparsity": sparsity, "rewind_epoch": k,
           "test_acc": acc(method, sparsity, k, seed), "test_loss": 0.3,
           "dense_acc_a": 0.92 + 0.001 * seed, "dense_acc_b": 0.921, "pruned_acc_a": 0.915,
           "barrier_loss_before": 1.0 + seed, "barrier_loss_after": 0.2,
           "barrier_error_before": 0.5, "barrier_error_after": 0.05,
           "connectivity": str(tmp_path / "match" / f"w{width}s{seed}" / "connectivity.json"),
           "wall_time_s": 1.0, "key": f"arm-{method}-{sparsity}-{k}-{seed}-{width}",
           "finished_at": "2026-11-25T19:00:00Z", "config_hash": "c0ffee", "num_threads": 1,
           "device": "cpu"}
    rec.update(over)
    return rec


def all_records(tmp_path, width=1, seeds=SEEDS):
    return [record(tmp_path, m, s, k, seed, width)
            for seed in seeds for s in SPARSITIES for k in KS for m in METHODS]


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def expected_cell(method, sparsity, k, seeds=SEEDS):
    vals = [acc(method, sparsity, k, s) for s in seeds]
    return statistics.mean(vals), statistics.stdev(vals)


def table_rows(md_table):
    """{(sparsity label, method label): [cells]}, carrying the sparsity down the merged rows."""
    rows, current = {}, None
    for line in md_table.splitlines():
        if not line.startswith("| ") or line.startswith("| S |"):
            continue
        parts = [p.strip() for p in line.strip("|").split("|")]
        current = parts[0] or current
        rows[(current, parts[1])] = parts[2:]
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One report over two widths: width 1 has one connectivity file, width 2 has none."""
    tmp = tmp_path_factory.mktemp("rep")
    curve = {"alphas": [0, 0.5, 1], "loss": [0.3, 1.5, 0.3], "acc": [0.9, 0.4, 0.9],
             "loss_barrier": 1.2, "error_barrier": 0.5}
    conn = tmp / "match" / "w1s0" / "connectivity.json"
    conn.parent.mkdir(parents=True)
    conn.write_text(json.dumps({"naive": curve, "matched": {**curve, "acc": [0.9, 0.85, 0.9]}}))
    recs = all_records(tmp, 1) + all_records(tmp, 2, seeds=(0,))
    paths = write_report(recs, tmp / "out")
    return tmp / "out", paths


def test_markdown_and_csv_hold_means_stds_and_bold_the_best(built):
    out, _ = built
    md = (out / "report.md").read_text()
    w1 = md.split("## resnet20×1 / cifar10")[1].split("## ")[0]
    rows = table_rows(w1)
    for s in SPARSITIES:
        for ki, k in enumerate(KS):
            means = {m: expected_cell(m, s, k)[0] for m in METHODS}
            best = max(means, key=means.get)
            for m in METHODS:
                mean, std = expected_cell(m, s, k)
                text = f"{100 * mean:.2f} ± {100 * std:.2f}"
                cell = rows[(f"{100 * s:g}%", LABELS[m])][ki]
                assert cell == (f"**{text}**" if m == best else text), (s, k, m, cell)
    assert rows[("90%", "permuted")][1].startswith("**")  # the planted winner over LTH
    assert "Dense accuracy: 92.10 ± 0.10 (n=3)" in md

    with open(out / "report.csv") as h:
        rows = list(csv.DictReader(h))
    assert len(rows) == 2 * len(SPARSITIES) * len(KS) * 3
    for row in rows:
        if row["width"] != "1":
            assert row["n"] == "1" and float(row["test_acc_std"]) == 0.0
            continue
        mean, std = expected_cell(row["method"], float(row["sparsity"]), int(row["rewind_epoch"]))
        assert float(row["test_acc_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(row["test_acc_std"]) == pytest.approx(std, abs=1e-12)
        assert row["n"] == "3"


def test_barrier_table_averages_per_seed_not_per_record(built):
    out, _ = built
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| resnet20 | cifar10 | ×1 |"))
    # barrier_loss_before is 1, 2, 3 over seeds -> 2.000 ± 1.000, whatever the arm count per seed
    assert "| 2.000 ± 1.000 | 0.200 ± 0.000 | 50.00 ± 0.00 | 5.00 ± 0.00 | 3 |" in row


def test_pngs_exist_and_are_valid_images(built):
    out, paths = built
    names = {p.name for p in paths}
    expected = {"report.md", "report.html", "report.csv",
                "resnet20_cifar10_w1_vs_k.png", "resnet20_cifar10_w1_vs_sparsity.png",
                "resnet20_cifar10_w1_interpolation.png",
                "resnet20_cifar10_w2_vs_k.png", "resnet20_cifar10_w2_vs_sparsity.png"}
    assert names == expected  # width 2 has no connectivity file -> no interpolation figure
    for p in paths:
        assert p.is_file() and p.parent == out
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            img = matplotlib.image.imread(p)
            assert img.shape[0] > 50 and img.shape[1] > 50
    md = (out / "report.md").read_text()
    assert "connectivity file missing" in md and "w2s0" in md
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.quick
def test_uneven_seed_counts_show_n(tmp_path):
    recs = [r for r in all_records(tmp_path)
            if not (r["seed"] == 2 and r["method"] == "naive" and r["rewind_epoch"] == 5)]
    rows = table_rows(accuracy_table(recs))
    assert rows[("80%", "naive")][1].endswith("(n=2)")
    assert "(n=" not in rows[("80%", "naive")][0]
    mean, std = expected_cell("naive", 0.8, 5, seeds=(0, 1))
    assert rows[("80%", "naive")][1] == f"{100 * mean:.2f} ± {100 * std:.2f} (n=2)"


def test_one_seed_shows_its_n_and_no_plus_minus(built):
    out, _ = built
    md = (out / "report.md").read_text()
    w2 = md.split("## resnet20×2 / cifar10")[1].split("## ")[0]  # width 2: seed 0 only
    assert "±" not in w2 and "Dense accuracy: 92.00 (n=1)" in w2
    assert "Test accuracy (%), one seed (n=1) per cell." in w2
    mean = acc("lth", 0.8, 0, 0)
    assert table_rows(w2)[("80%", "LTH")][0] == f"**{100 * mean:.2f}**"
    w1 = md.split("## resnet20×1 / cifar10")[1].split("## ")[0]
    assert "Test accuracy (%), mean ± std over n=3 seeds per cell." in w1
    row = next(line for line in md.splitlines() if line.startswith("| resnet20 | cifar10 | ×2 |"))
    assert row.endswith("| 1.000 | 0.200 | 50.00 | 5.00 | 1 |")


def test_repair_barriers_get_their_columns_and_curves_and_older_records_still_load(tmp_path):
    """Width 1 computed REPAIR (its records and its connectivity file have it), width 2 is an
    older record without the REPAIR fields: it loads, and its REPAIR cells show '–'."""
    curve = {"alphas": [0, 0.5, 1], "loss": [0.3, 1.5, 0.3], "acc": [0.9, 0.4, 0.9],
             "loss_barrier": 1.2, "error_barrier": 0.5}
    flat = {**curve, "loss": [0.3, 0.32, 0.3], "acc": [0.9, 0.89, 0.9]}
    conn = tmp_path / "match" / "w1s0" / "connectivity.json"
    conn.parent.mkdir(parents=True)
    conn.write_text(json.dumps({"naive": curve, "matched": curve, "default": "plain",
                                "curves": {"plain": {"naive": curve, "matched": curve},
                                           "repair": {"naive": curve, "matched": flat}}}))
    repaired = {"barrier_loss_before_repair": 0.9, "barrier_loss_after_repair": 0.02,
                "barrier_error_before_repair": 0.3, "barrier_error_after_repair": 0.01}
    old = record(tmp_path, width=2, seed=0)
    recs = [record(tmp_path, seed=seed, **repaired) for seed in (0, 1)] + [old]
    lines = write_jsonl(tmp_path / "results.jsonl", recs)
    loaded, bad, notes = load_records(lines)
    assert not bad and not notes and len(loaded) == 3
    table = barrier_table(group_records(loaded))
    assert "REPAIR loss barrier after" in table.splitlines()[0]
    w1 = next(line for line in table.splitlines() if "| ×1 |" in line)
    assert w1.endswith("| 0.900 ± 0.000 | 0.020 ± 0.000 | 30.00 ± 0.00 | 1.00 ± 0.00 | 2 |")
    w2 = next(line for line in table.splitlines() if "| ×2 |" in line)
    assert w2.endswith("| – | – | – | – | 1 |")
    curves, notes = load_connectivity(recs[:1])
    png = plot_group_interpolation(curves, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and not notes
    conn.write_text(json.dumps({"naive": curve, "matched": curve,
                                "curves": {"repair": {"naive": curve}}}))
    curves, notes = load_connectivity(recs[:1])
    assert not curves and any("curves.repair.matched" in note for note in notes)


@pytest.mark.quick
def test_bad_lines_are_reported_and_report_still_builds(tmp_path, capsys):
    good = all_records(tmp_path)
    missing = record(tmp_path)
    del missing["test_acc"]
    lines = [good[0],                                      # 1
             "{not json",                                  # 2
             missing,                                      # 3
             record(tmp_path, width="1"),                  # 4 wrong type
             record(tmp_path, method="random"),            # 5 unknown method
             record(tmp_path, test_acc=91.2),              # 6 percent, not a fraction
             "[1, 2]",                                     # 7 not an object
             ""] + good[1:] + [good[0]]                    # blank line skipped; rerun of line 1
    path = write_jsonl(tmp_path / "results.jsonl", lines)
    records, bad, notes = load_records(path)
    assert len(records) == len(good)
    by_line = {p.split(":")[0]: p for p in bad + notes}
    assert [p.split(":")[0] for p in bad] == ["line 2", "line 3", "line 4", "line 5", "line 6",
                                               "line 7"]
    assert set(by_line) == {"line 1", "line 2", "line 3", "line 4", "line 5", "line 6", "line 7"}
    assert "invalid JSON" in by_line["line 2"]
    assert "test_acc" in by_line["line 3"] and "missing" in by_line["line 3"]
    assert "width" in by_line["line 4"]
    assert "random" in by_line["line 5"]
    assert "fraction" in by_line["line 6"]
    assert "superseded" in by_line["line 1"]

    with pytest.raises(LTHError, match=r"line 2: invalid JSON .*6 bad line\(s\)"):
        report.main(str(path), str(tmp_path / "out"))  # refused unless told to skip them
    assert not (tmp_path / "out").exists()
    paths = report.main(str(path), str(tmp_path / "out"), skip_bad_lines=True)
    assert (tmp_path / "out" / "report.md") in paths
    md = (tmp_path / "out" / "report.md").read_text()
    assert "line 2: invalid JSON" in md
    assert "skipped 6 bad line(s) (line 2, 3, 4, 5, 6, 7" in capsys.readouterr().err


@pytest.mark.quick
def test_missing_or_empty_inputs_raise_one_line_errors(tmp_path):
    with pytest.raises(LTHError, match="results file not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(LTHError, match="no valid records"):
        report.main(str(write_jsonl(tmp_path / "r.jsonl", ["{bad"])), str(tmp_path / "o"),
                    skip_bad_lines=True)
    with pytest.raises(LTHError, match="exactly one"):
        report.main(None, str(tmp_path / "o"))
    with pytest.raises(LTHError, match="exactly one"):
        report.main("r.jsonl", str(tmp_path / "o"), wandb_project="p")


def test_wandb_records_and_unreachable_api(tmp_path, monkeypatch):
    rec = record(tmp_path)
    config = {k: rec[k] for k in ("model", "dataset", "width", "seed", "method", "sparsity",
                                  "rewind_epoch")}
    summary = {k: v for k, v in rec.items() if k not in config}

    class Summary(dict):
        pass

    run_ok = types.SimpleNamespace(id="abc", config=config, summary=Summary(summary))
    run_bad = types.SimpleNamespace(id="xyz", config=config, summary=Summary())
    seen = {}

    class Api:
        def __init__(self, timeout=None):
            pass

        def runs(self, path):
            seen["path"] = path
            return [run_ok, run_bad]

    monkeypatch.setitem(__import__("sys").modules, "wandb", types.SimpleNamespace(Api=Api))
    records, problems = load_wandb_records("proj", "me")
    assert seen["path"] == "me/proj" and records == [rec]
    assert len(problems) == 1 and problems[0].startswith("run xyz: missing")

    class DeadApi:
        def __init__(self, timeout=None):
            raise RuntimeError("No API key configured.\nmore detail")

    monkeypatch.setitem(__import__("sys").modules, "wandb", types.SimpleNamespace(Api=DeadApi))
    with pytest.raises(LTHError, match="cannot read W&B project 'proj'.*No API key configured"):
        report.main(wandb_project="proj", out_dir=str(tmp_path / "o"))


def test_two_configurations_in_one_store_get_one_table_each(tmp_path, capsys):
    """Records of another configuration (another config_hash) never replace a cell of this
    one: each configuration gets its own table, figures and CSV rows."""
    other = [dict(r, config_hash="beef00", key=r["key"] + "-other",
                  test_acc=r["test_acc"] - 0.1) for r in all_records(tmp_path)]
    results = write_jsonl(tmp_path / "results.jsonl", all_records(tmp_path) + other)
    report.main(str(results), str(tmp_path / "out"))
    assert "warning" not in capsys.readouterr().err  # nothing superseded, nothing dropped
    md = (tmp_path / "out" / "report.md").read_text()
    assert "(configuration c0ffee)" in md and "(configuration beef00)" in md
    rows = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert {r["config_hash"] for r in rows} == {"c0ffee", "beef00"}
    assert len(rows) == 2 * len(SPARSITIES) * len(KS) * len(METHODS)
    cell = {(r["config_hash"], r["method"], r["sparsity"], r["rewind_epoch"]):
            float(r["test_acc_mean"]) for r in rows}
    mean, _ = expected_cell("lth", 0.8, 0)
    assert cell[("c0ffee", "lth", "0.8", "0")] == pytest.approx(mean)
    assert cell[("beef00", "lth", "0.8", "0")] == pytest.approx(mean - 0.1)
    assert len(list((tmp_path / "out").glob("*_vs_k.png"))) == 2


# --------------------------------------------------------------------------- the dashboard

class _Page(HTMLParser):
    """The tables (rows of cell texts, bold markers kept as **) and images of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "b" and self.cell is not None:
            self.cell += "**"
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None
        elif tag == "b" and self.cell is not None:
            self.cell += "**"

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def markdown_tables(md: str) -> list[list[list[str]]]:
    tables, previous = [], False
    for line in md.splitlines():
        is_row = line.startswith("|")
        if is_row and not previous:
            tables.append([])
        if is_row and not line.startswith("|---"):
            tables[-1].append([cell.strip() for cell in line.strip()[1:-1].split("|")])
        previous = is_row
    return tables


FIGURES = {"accuracy vs k", "accuracy vs sparsity", "accuracy over each arm's epochs",
           "interpolation before and after matching", "study cost per stage kind",
           "ensemble accuracy vs its number of members"}


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A tiny study's store and its report: report.md and the parsed report.html."""
    tmp = tmp_path_factory.mktemp("dashboard")
    config = tiny_config(tmp)
    for command in ("experiment", "report"):
        result = run_cli(command, "--config", config, cwd=tmp, env=NO_WANDB)
        assert result.returncode == 0, result.stderr[-3000:]
    out = tmp / "store" / "report"
    page = _Page()
    page.feed((out / "report.html").read_text())
    return out, (out / "report.md").read_text(), page


def test_dashboard_holds_every_table_and_figure(dashboard):
    out, md, page = dashboard
    # accuracy (one group), its pi, barriers, study cost; the diversity table per (S, k)
    for table in page.tables:
        assert len(table) > 1 and all(cell for row in table[1:] for cell in row[1:])
    diversity = [table for table in page.tables if table[0][0] == "Row"]
    accuracy, matching, barriers, cost = [t for t in page.tables if t[0][0] != "Row"]
    assert len(diversity) == 2 * 2
    for table in diversity:  # one seed, one replicate: groups of one, no pairs
        assert [row[0] for row in table[1:]] == ["dense", "IMP", "LTH", "naive", "permuted"]
        assert {row[-2] for row in table[1:]} == {"1"}  # models per group
        assert {cell for row in table[1:] for cell in row[3:6]} == {"–"}  # pairwise: undefined
    assert [row[:4] for row in matching[1:]] == [["permuted", "activation", "3", "3"]]
    assert matching[0][6:8] == ["agreement layer0", "agreement layer1"]
    assert matching[1][6:8] == ["1.000", "1.000"]  # the final pi agrees with itself
    assert [row[1] for row in accuracy[1:]] == ["LTH", "naive", "permuted"] * 2
    assert barriers[0][-1] == "Seeds" and barriers[1][-1] == "1"
    assert [row[0] for row in cost[1:]] == ["dense", "imp", "match", "arm", "all"]
    assert [row[2] for row in cost[1:]] == ["6", str(1 * 8), "0", "30", "44"]  # epochs
    assert {image["alt"] for image in page.images} == FIGURES
    assert all(len(image["src"]) > 1000 for image in page.images)
    assert "one seed (n=1) per cell" in md and "one seed (n=1) per cell" in (
        out / "report.html").read_text()


def test_dashboard_numbers_equal_report_md(dashboard):
    _, md, page = dashboard
    assert page.tables == markdown_tables(md)


def test_dashboard_figures_are_embedded_pngs_that_decode(dashboard):
    _, _, page = dashboard
    for image in page.images:
        head, data = image["src"].split(",", 1)
        assert head == "data:image/png;base64"
        png = base64.b64decode(data, validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(io.BytesIO(png))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01


def test_dashboard_holds_no_url(dashboard):
    out, _, _ = dashboard
    page = (out / "report.html").read_text()
    assert not re.search(r"https?://", page, re.IGNORECASE)
    assert not re.search(r"<(script|link|iframe)", page)
    assert re.findall(r'src="([^"]{0,22})', page) == ["data:image/png;base64,"] * len(FIGURES)


def test_arm_curves_are_labelled_with_their_split(tmp_path):
    """The x axis is the T-epoch schedule (an arm from k starts at k); an epoch logged twice
    (a resumed stage) keeps its last row; val/acc is test accuracy only with val_split 0."""
    recs = []
    for key, k, val_split in (("a", 5, 0), ("b", 0, 0.1), ("c", 0, None)):
        logs = tmp_path / "arm" / key / "logs"
        logs.mkdir(parents=True)
        (logs / "metrics.csv").write_text(
            "epoch,step,val/acc,train/acc\n0,3,0.5,\n0,3,,0.4\n0,3,0.6,\n1,7,0.7,\n")
        if val_split is not None:
            (logs.parent / "result.json").write_text(json.dumps({"val_split": val_split}))
        recs.append(record(tmp_path, k=k, key=key))
    curves, notes = arm_curves(recs + [record(tmp_path, key="gone")], tmp_path)
    assert curves == {"a": ("test", [(6, 0.6), (7, 0.7)]),
                      "b": ("validation", [(1, 0.6), (2, 0.7)]),
                      "c": ("val/acc", [(1, 0.6), (2, 0.7)])}
    assert notes == [f"no training log for 1 arm(s) in {tmp_path}/arm/<key>/logs/"]


# Pixel variance of a grey-level 1280 x 2400 screenshot (values in [0, 1]): a blank page
# has 0, a short page of text alone 0.0006, the tiny study's dashboard 0.018 (measured).
SCREENSHOT_VARIANCE = 0.005


@pytest.mark.slow
def test_dashboard_renders_in_headless_chromium(dashboard, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not found: `apt-get install -y chromium` (Debian) "
                    "renders the dashboard for this test")
    out, _, _ = dashboard
    shot = tmp_path / "dashboard.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2400", f"--screenshot={shot}",
                    (out / "report.html").as_uri()], capture_output=True, timeout=180)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    grey = pixels[..., :3].mean(axis=2)
    assert grey.var() > SCREENSHOT_VARIANCE, grey.var()
    colour = np.ptp(pixels[..., :3], axis=2) > 0.3  # the methods' coloured lines
    assert colour.mean() > 0.001


@pytest.mark.quick
def test_top5_sits_beside_top1_where_records_have_it(tmp_path):
    from lightning_lth.report.tables import accuracy_rows, csv_rows

    recs = [record(tmp_path, m, 0.8, 0, seed, test_acc_top5=0.95 + 0.01 * seed)
            for seed in (0, 1) for m in ("lth", "naive")]
    recs[-1]["test_acc_top5"] = None  # naive's seed 1 has none: its cell counts one seed
    (header, rows), caption = accuracy_rows(recs)
    assert header == ["S", "Method", "k=0", "k=0 top-5"]
    # lth: 95 and 96 -> 95.50 ± 0.71; naive: seed 0's 95 only
    assert [row[3] for row in rows] == ["95.50 ± 0.71", "95.00 (n=1)"]
    assert "Top-5 columns" in caption
    csv_table = csv_rows(group_records(recs))
    assert csv_table[0][-2:] == ["test_acc_top5_mean", "test_acc_top5_std"]
    assert float(csv_table[1][-2]) == pytest.approx(0.955)
    # without top-5 (datasets under 100 classes): no column, empty CSV cells
    (header, _), caption = accuracy_rows([{**r, "test_acc_top5": None} for r in recs])
    assert header == ["S", "Method", "k=0"] and "Top-5" not in caption
