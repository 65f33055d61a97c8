"""The ``dashboard`` command's W&B view, offline: its serialised form (run set, filters,
grouping, colours, panels) and that every name a panel reads is one that a real offline run
of a tiny study wrote (W&B's offline file, read record by record). Saving to a live W&B
server is not exercised here: there is no network."""

from __future__ import annotations

import json
import struct
from urllib.parse import unquote, urlparse

import pytest
import wandb
from conftest import run_cli
from helpers import tiny_config
from matplotlib.colors import to_hex
from wandb.proto import wandb_internal_pb2

from lightning_lth.cli import main
from lightning_lth.experiment.stages import ARMS
from lightning_lth.report import dashboard

# W&B's offline run file (run-<id>.wandb): a 7-byte header (":W&B", magic, version), then
# LevelDB's log format: 32 KiB blocks of chunks (crc32c, length, type), a block's tail under
# a chunk header is padding; a protobuf Record is one FULL chunk or FIRST, MIDDLE..., LAST.
BLOCK, CHUNK_HEADER, FULL, LAST = 32 * 1024, 7, 1, 4


def wandb_records(path) -> list:
    data, records, parts, position = path.read_bytes(), [], [], 7
    assert data[:4] == b":W&B", path
    while position + CHUNK_HEADER <= len(data):
        left = BLOCK - position % BLOCK
        _, length, kind = struct.unpack("<IHB", data[position:position + CHUNK_HEADER])
        if left < CHUNK_HEADER or kind == 0:
            position += left
            continue
        parts.append(data[position + CHUNK_HEADER:position + CHUNK_HEADER + length])
        position += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(parts)))
            parts = []
    return records


@pytest.fixture(scope="module")
def arm_run(tmp_path_factory) -> dict:
    """What one arm's offline W&B run holds: config, summary and history keys, job type,
    group (the lth arm of one cell of the tiny study)."""
    folder = tmp_path_factory.mktemp("study")
    config = tiny_config(folder, n_train=64, sparsities=[0.2], rewind_epochs=[1],
                         wandb_mode="offline", fuse=2, arms=["lth", "naive"])
    # T = 2, one IMP round, two arms trained as one fused group (the default on CUDA): each
    # member's run is written from its CSV log after the group has trained
    result = run_cli("experiment", "--config", config, "--trainer.max_epochs=2", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    (log,) = (folder / "store").glob("wandb/wandb/offline-run-*-lth-*/run-*.wandb")
    assert len(list((folder / "store").glob("wandb/wandb/offline-run-*-naive-*/run-*.wandb"))) == 1
    records = wandb_records(log)

    def of(kind: str) -> list:
        return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]

    (run,) = of("run")
    return {"config": {item.key: json.loads(item.value_json) for item in run.config.update},
            "summary": {item.key for summary in of("summary") for item in summary.update},
            "history": {item.key or "/".join(item.nested_key) for history in of("history")
                        for item in history.item},
            "job_type": run.job_type, "group": run.run_group}


def view(entity: str | None = "me", project: str = "lth", name: str = dashboard.DEFAULT_NAME):
    return dashboard.serialised(dashboard.build(project, entity, name))


def panels(spec: dict) -> dict[str, list[dict]]:
    return {section["name"]: section["panels"]
            for section in spec["section"]["panelBankConfig"]["sections"]}


def read_names(spec: dict) -> dict[str, set[str]]:
    """Each name the panels read, by where a run keeps it: config, summary, history."""
    found = {"config": set(), "summary": set(), "history": set(), "summary table": set()}

    def accessor(text: str) -> None:
        section, _, name = text.partition(":")
        if section == "config":
            found["config"].add(name.removesuffix(".value"))
        else:
            assert section == "summary", text
            found["summary"].add(name)

    for panel in [p for section in panels(spec).values() for p in section]:
        config, kind = panel["config"], panel["viewType"]
        if kind == "Scatter Plot":
            accessor(config["xAxis"]), accessor(config["yAxis"])
        elif kind == "Bar Chart":
            found["summary"] |= {m.removeprefix("summary_metrics.") for m in config["metrics"]}
        elif kind == "Parallel Coordinates Plot":
            for column in config["columns"]:
                accessor(column["accessor"])
        elif kind == "Run History Line Plot":
            found["history"] |= {config["xAxis"], *config["metrics"]}
        elif kind == "Weave":
            found["summary table"].add(config["panel2Config"]["exp"]["fromOp"]["inputs"]
                                       ["key"]["val"])
        else:
            assert kind == "Run Comparer", kind
    return found


def test_every_name_the_view_reads_is_written_by_a_real_offline_run(arm_run):
    """A renamed metric, config key or record field fails here: the panels' names, the
    filter's and the grouping's are looked up in the lth arm's offline run."""
    spec = view()["spec"]
    names = read_names(spec)
    assert names["config"] == {"rewind_epoch", "sparsity"}
    assert names["config"] <= arm_run["config"].keys()
    assert names["summary"] >= {"test_acc", "barrier_loss_before", "barrier_error_after"}
    assert names["summary"] <= arm_run["summary"]
    assert names["history"] == {"epoch", "val/acc", "train/loss_epoch"}
    assert names["history"] <= arm_run["history"]
    # the diversity table is the report run's (contract.md), not an arm's
    assert names["summary table"] == {"diversity_table"}
    (runs,) = spec["section"]["runSets"]
    stage, job_type = runs["filters"]["filters"]
    assert stage["key"] == {"section": "config", "name": "stage"}
    assert arm_run["config"]["stage"] == stage["value"] == "arm"
    assert job_type["key"] == {"section": "run", "name": "jobType"}
    assert job_type["value"] == "report" != arm_run["job_type"]
    method, group = runs["grouping"]
    assert method == {"section": "config", "name": "method.value"}
    assert arm_run["config"]["method"] == arm_run["job_type"] == "lth"
    assert group == {"section": "run", "name": "group"}
    assert arm_run["group"] == "mlp-w1-fashion_mnist-s0.2-k1"  # one cell: model-w-data-s-k


def test_the_view_shows_the_arm_runs_and_the_report_run_grouped_and_coloured_by_arm():
    saved = view("team", "cifar")
    assert (saved["entity"], saved["project"], saved["displayName"]) == (
        "team", "cifar", "LTH vs naive vs permuted")
    (runs,) = saved["spec"]["section"]["runSets"]
    assert [f.get("connector") for f in runs["filters"]["filters"]] == [None, "OR"]
    colours = saved["spec"]["section"]["customRunColors"]
    by_arm = {json.loads(unquote(key.rsplit(":", 1)[-1]))[0]
              ["value"]: colour for key, colour in colours.items()}
    assert by_arm == {arm: to_hex(look.colour) for arm, look in ARMS.items()}
    assert by_arm["lth"] == "#2ca02c"  # tab:green, as in the report's figures
    kinds = {title: [p["viewType"] for p in ps] for title, ps in panels(saved["spec"]).items()}
    assert list(kinds.values()) == [
        ["Scatter Plot", "Scatter Plot", "Bar Chart", "Parallel Coordinates Plot"],
        ["Run History Line Plot"] * 2, ["Bar Chart"] * 2, ["Weave"], ["Run Comparer"]]
    for panel in [p for ps in panels(saved["spec"]).values() for p in ps]:
        if panel["viewType"] in ("Bar Chart", "Run History Line Plot"):  # mean ± std of a cell
            assert (panel["config"]["groupAgg"], panel["config"]["groupArea"]) == (
                "mean", "stddev")


def test_dry_run_writes_the_view_and_a_second_build_is_the_same_view(tmp_path, capsys):
    """Ids derive from entity, project and name, so saving again updates the same view."""
    out = tmp_path / "view.json"
    assert main(["dashboard", "--wandb_project", "me/lth", "--dry_run", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == view("me", "lth")
    assert main(["dashboard", "--wandb_project", "lth", "--entity", "me", "--dry_run"]) == 0
    assert json.loads(capsys.readouterr().out) == view("me", "lth")
    other = view("me", "lth", "another view")
    assert other["spec"]["section"]["runSets"][0]["id"] != view()["spec"]["section"][
        "runSets"][0]["id"]
    assert view(None)["entity"] == ""  # filled in from the credentials when saved


@pytest.mark.parametrize("args, error", [
    (["--wandb_project", "a#b", "--dry_run"],
     "--wandb_project='a#b' is not allowed: a W&B name is 1-128 characters"),
    (["--wandb_project", "x" * 129, "--dry_run"], "is not allowed: a W&B name is 1-128"),
    (["--wandb_project", "me/lth", "--entity", "you", "--dry_run"],
     "names entity 'me' but --entity='you': give the entity once"),
    (["--wandb_project", "lth", "--entity", "a:b", "--dry_run"], "--entity='a:b' is not allowed"),
    (["--wandb_project", "lth", "--name", " ", "--dry_run"], "--name=' ' is not allowed"),
    (["--wandb_project", "lth", "--out", "view.json"], "--out writes the --dry_run JSON"),
    (["--wandb_project", "lth"], "no W&B credentials for {host}: run `wandb login` or set "
                                 "WANDB_API_KEY"),
    ([], "the following arguments are required: wandb_project"),
])
def test_bad_input_is_one_line_and_nothing_is_written(args, error, tmp_path, monkeypatch,
                                                      capsys):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials
    monkeypatch.chdir(tmp_path)
    assert main(["dashboard", *args]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    host = urlparse(wandb.Settings().base_url).hostname  # wandb's default W&B host
    assert line.startswith("error: ") and error.format(host=host) in line, line
    assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_auto_mode_finds_wandb_login_for_the_host_wandb_uses(tmp_path, monkeypatch):
    """`wandb login` writes a netrc entry for wandb's base URL's host (not always
    api.wandb.ai): `study.wandb_mode: auto` is online with it, offline without."""
    from lightning_lth.experiment.tracking import wandb_mode

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode("auto") == "offline"
    host = urlparse(wandb.Settings().base_url).hostname
    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text(f"machine {host}\n  login user\n  password {'x' * 40}\n")
    netrc_file.chmod(0o600)
    assert wandb_mode("auto") == "online"
