"""The stage store: every stage's outputs under a key derived from what determines them.

Layout: ``<root>/<kind>/<key>/`` holds a finished stage, with ``MANIFEST.json`` listing
each output's sha256 and ``settings.json`` saying what the stage is. Work happens in
``<key>.partial/``, which also holds the stage's resume checkpoint, and becomes ``<key>/`` by
one atomic rename, so an unfinished stage never looks finished. A ``<key>.lock`` file lock
(fcntl; the kernel releases it when its holder dies) makes concurrent runs that need the
same stage wait for one of them instead of both computing it. A finished stage whose files
fail their checksums is moved aside to ``<key>.corrupt-<time>`` (never deleted) and
computed again.

Write once: a partial folder without a resume checkpoint is emptied before its stage starts
(what a killed try wrote there is not trusted), a killed write's temporary file never enters
a finished stage, and a finished stage's files are never written again. The one addition
(``add_file``): a file its stage now keeps that an older copy lacks (its test outputs,
computed from its stored weights), sealed into its manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from lightning.pytorch.utilities import rank_zero_warn

from lightning_lth.distributed import DistContext
from lightning_lth.errors import LTHError
from lightning_lth.experiment.keys import changes
from lightning_lth.io import file_sha256, load_json, save_json
from lightning_lth.numerics import computed_with
from lightning_lth.training.callbacks import ResumePoints

MANIFEST = "MANIFEST.json"
SETTINGS = "settings.json"
CHECKPOINTS = "checkpoints"
GROUPS = "fused"  # <root>/fused/<group key>.partial: a fused group's resume checkpoint
SCRATCH = (CHECKPOINTS, "logs", "wandb")  # kept with the stage, never checksummed


class StoredStage(Protocol):
    kind: str
    key: str
    key_inputs: dict | None

    def describe(self) -> dict: ...


def _drop_temporaries(work: Path) -> None:
    """Remove what killed atomic writes left (``write_atomic``'s ``.<name>.*.tmp``)."""
    for path in [p for p in work.rglob(".*.tmp") if p.is_file()]:
        path.unlink()


def _readable(path: Path) -> dict | None:
    """A store file's JSON, or None where it is missing or damaged (what `plan` reports)."""
    try:
        data = load_json(path)
    except LTHError:
        return None
    return data if isinstance(data, dict) else None


class Store:
    def __init__(self, root: str | Path, dist: DistContext):
        self.root = Path(root)
        self.dist = dist
        self._verified: set[str] = set()  # keys checked once in this process

    def path(self, stage: StoredStage) -> Path:
        return self.root / stage.kind / stage.key

    def partial_path(self, stage: StoredStage) -> Path:
        return self.root / stage.kind / f"{stage.key}.partial"

    def status(self, stage: StoredStage) -> str:
        if (self.path(stage) / MANIFEST).is_file():
            return "done"
        return "partial" if self.partial_path(stage).exists() else "missing"

    def checked_status(self, stage: StoredStage) -> str:
        """``status``, but "corrupt" for a finished stage whose files fail their checksums
        (what ``run`` moves aside and computes again): what `plan` shows."""
        state = self.status(stage)
        return "corrupt" if state == "done" and not self.verify(stage) else state

    def verify(self, stage: StoredStage) -> bool:
        """True when the finished stage exists and every file matches its checksum."""
        return self.intact(self.path(stage))

    def sealed(self, stage: StoredStage, name: str) -> bool:
        """Whether the finished stage's manifest lists ``name`` (checksummed with the rest)."""
        manifest = _readable(self.path(stage) / MANIFEST) or {}
        return name in manifest.get("files", {})

    def add_file(self, stage: StoredStage, name: str, write: Callable[[Path], None]) -> None:
        """Add ``name`` (``write(path)`` writes it atomically) to a finished stage and to its
        manifest, under the stage's lock; rank 0 only. The file first, then the manifest: a
        kill between them leaves a file the manifest does not list, which the next addition
        replaces."""
        if not self.dist.is_writer:
            return
        with self.lock(stage):
            final = self.path(stage)
            manifest = load_json(final / MANIFEST)
            if name in manifest["files"]:  # another run added it meanwhile
                return
            write(final / name)
            manifest["files"][name] = file_sha256(final / name)
            save_json(manifest, final / MANIFEST)
        self.log_event("added", stage, file=name)

    def finished(self, kind: str) -> list[Path]:
        """The folders of every finished stage of ``kind`` (check one with ``intact``)."""
        folder = self.root / kind
        return [path for path in sorted(folder.iterdir())
                if (path / MANIFEST).is_file()] if folder.is_dir() else []

    def older(self, stage: StoredStage) -> Path | None:
        """The last finished stage of the same kind and label under another key: this stage
        as an older release, older code or another config computed it."""
        label = stage.key.rsplit("-", 1)[0]
        found = [((_readable(folder / MANIFEST) or {}).get("finished_at", 0), folder)
                 for folder in self.finished(stage.kind)
                 if folder.name.rsplit("-", 1)[0] == label and folder.name != stage.key]
        return max(found)[1] if found else None

    def action(self, stage: StoredStage, status: str) -> tuple[str, str]:
        """What a run does with the stage, and why, given its ``checked_status``: ``reuse``
        it (finished under its key), ``resume`` it (a partial run's checkpoint), ``compute``
        it (new) or ``recompute`` it (its files fail their checksums, or the store holds it
        under another key: ``keys.changes`` names what differs)."""
        if status == "corrupt":
            return "recompute", "its files fail their checksums"
        if status == "done":
            made = (_readable(self.path(stage) / SETTINGS) or {}).get("computed_with", {})
            now = computed_with()
            return "reuse", ", ".join(f"computed with {name} {made[name]} (now {now[name]})"
                                      for name in ("lightning_lth", "torch", "lightning")
                                      if made.get(name, now[name]) != now[name])
        if (self.partial_path(stage) / CHECKPOINTS / ResumePoints.FILE).is_file():
            return "resume", ""
        older = self.older(stage)
        if older is None:
            return "compute", ""
        settings = _readable(older / SETTINGS)
        if settings is None:
            return "recompute", f"{older.name}/{SETTINGS} is unreadable"
        return "recompute", "; ".join(changes(settings, stage.key_inputs))

    @staticmethod
    def intact(final: Path) -> bool:
        """Every file of the finished stage in ``final`` matches its checksum."""
        try:
            manifest = load_json(final / MANIFEST)
            return all(file_sha256(final / name) == digest
                       for name, digest in manifest["files"].items())
        except Exception:
            return False

    def log_event(self, event: str, stage: StoredStage, **extra) -> None:
        """One line per event in <root>/events.log: proof of what was computed, and how."""
        if not self.dist.is_writer:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), "event": event, "stage": stage.kind,
                           "key": stage.key, "pid": os.getpid(), **extra})
        with open(self.root / "events.log", "a") as handle:
            handle.write(line + "\n")

    @contextlib.contextmanager
    def lock(self, stage: StoredStage):
        if not self.dist.is_writer:
            yield
            return
        path = self.root / stage.kind / f"{stage.key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _set_aside_if_corrupt(self, stage: StoredStage) -> None:
        final = self.path(stage)
        if final.exists() and not self.verify(stage):
            aside = final.with_name(f"{final.name}.corrupt-{int(time.time())}")
            rank_zero_warn(f"stage {stage.kind}/{stage.key} failed its checksums: moved to "
                           f"{aside.name} and computing it again")
            os.replace(final, aside)
            self.log_event("corrupt", stage)

    def _prepare(self, work: Path) -> str | None:
        """The resume checkpoint to continue from, or None after emptying the folder."""
        checkpoint = work / CHECKPOINTS / ResumePoints.FILE
        if checkpoint.is_file():
            _drop_temporaries(work)
            return str(checkpoint)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return None

    def run(self, stage: StoredStage, compute: Callable[[Path, str | None], None]) -> Path:
        """The finished stage's folder, computing it first unless a finished copy exists.

        ``compute(workdir, resume)`` writes the outputs into ``workdir``, continuing from the
        Lightning checkpoint ``resume`` when it is not None. Under DDP every rank calls this;
        rank 0 decides (under the lock) and the others follow.
        """
        final = self.path(stage)
        if stage.key in self._verified:
            return final
        with self.lock(stage):
            decision = None
            if self.dist.is_writer:
                self._set_aside_if_corrupt(stage)
                if self.status(stage) == "done":
                    decision = {"done": True}
                else:
                    decision = {"done": False, "resume": self._prepare(self.partial_path(stage))}
            if self.dist.active:
                decision = self.dist.broadcast(decision)
            elif not self.dist.is_writer:  # launched by rank 0's first fit: no group yet
                decision = self._follow(stage)
            if not decision["done"]:
                work = self.partial_path(stage)
                if decision["resume"]:
                    point = Path(decision["resume"]).with_suffix(".json")
                    self.log_event("resume", stage, **(load_json(point) if point.is_file() else {}))
                else:
                    self.log_event("compute", stage)
                compute(work, decision["resume"])
                self.dist.barrier()
                if self.dist.is_writer:
                    self._seal(stage, work)
                self.dist.barrier()
        self._verified.add(stage.key)
        return final

    def run_group(self, stages: list[StoredStage], group_key: Callable[[list], str],
                  compute: Callable[[list, dict[str, Path], Path, str | None], None]) -> None:
        """Compute stages that train together (a fused group) as one unit, under all their
        locks: those already finished are left out, and so is one holding its own resume
        checkpoint (it resumes alone, nothing is lost). ``compute(pending, works, group_work,
        resume)`` writes each pending stage's outputs into ``works[key]``; the group's resume
        checkpoint lives in ``<root>/fused/<group_key(pending)>.partial``, so a rerun of the
        same pending stages continues it. Each stage is then sealed as if computed alone.
        One process only (fused groups refuse DDP)."""
        with contextlib.ExitStack() as locks:
            for stage in sorted(stages, key=lambda s: s.key):
                locks.enter_context(self.lock(stage))
            pending = []
            for stage in stages:
                self._set_aside_if_corrupt(stage)
                checkpoint = self.partial_path(stage) / CHECKPOINTS / ResumePoints.FILE
                if self.status(stage) != "done" and not checkpoint.is_file():
                    pending.append(stage)
            if len(pending) < 2:  # nothing to fuse: the runner runs what is left alone
                return
            key = group_key(pending)
            group_work = self.root / GROUPS / f"{key}.partial"
            resume = self._prepare(group_work)
            works = {}
            for stage in pending:
                works[stage.key] = work = self.partial_path(stage)
                if resume:  # its logs so far belong to the checkpoint's trajectory
                    work.mkdir(parents=True, exist_ok=True)
                    _drop_temporaries(work)
                else:
                    self._prepare(work)
                point = Path(resume).with_suffix(".json") if resume else None
                self.log_event("resume" if resume else "compute", stage, group=key,
                               fused=len(pending),
                               **(load_json(point) if point and point.is_file() else {}))
            compute(pending, works, group_work, resume)
            for stage in pending:
                self._seal(stage, works[stage.key])
                self._verified.add(stage.key)
            shutil.rmtree(group_work, ignore_errors=True)

    def _follow(self, stage: StoredStage) -> dict:
        """A DDP rank's view before the process group exists. Rank 0 started this rank from
        inside its own first fit, after it had prepared that stage, and cannot write to it
        until this rank joins: the store reads the same here as it did there."""
        if self.status(stage) == "done":
            return {"done": True}
        checkpoint = self.partial_path(stage) / CHECKPOINTS / ResumePoints.FILE
        return {"done": False, "resume": str(checkpoint) if checkpoint.is_file() else None}

    def _seal(self, stage: StoredStage, work: Path) -> None:
        shutil.rmtree(work / CHECKPOINTS, ignore_errors=True)  # a finished stage never resumes
        _drop_temporaries(work)
        save_json({**stage.describe(), "computed_with": computed_with()}, work / SETTINGS)
        files = {str(p.relative_to(work)): file_sha256(p) for p in sorted(work.rglob("*"))
                 if p.is_file() and p.relative_to(work).parts[0] not in SCRATCH}
        save_json({"files": files, "finished_at": time.time()}, work / MANIFEST)
        os.replace(work, self.path(stage))
        self.log_event("done", stage)


def stage_times(root: str | Path, alone: bool = False) -> dict[tuple[str, str], float]:
    """(kind, key) -> seconds of each finished stage's last run, from events.log: from its
    last compute or resume event to its done event (a killed try's time is not known).
    ``alone``: only stages whose last run was not in a fused group (a member's time is the
    whole group's)."""
    log = Path(root) / "events.log"
    began: dict[tuple[str, str], float] = {}
    times: dict[tuple[str, str], float] = {}
    grouped: set[tuple[str, str]] = set()
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            event = json.loads(line)
            stage, moment = (event["stage"], event["key"]), float(event["time"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
        if event.get("event") in ("compute", "resume"):
            began[stage] = moment
            (grouped.add if "group" in event else grouped.discard)(stage)
        elif event.get("event") == "done" and stage in began:
            times[stage] = moment - began.pop(stage)
    return {stage: t for stage, t in times.items() if not (alone and stage in grouped)}
