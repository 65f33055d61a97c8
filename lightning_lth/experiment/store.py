"""The stage store: every stage's outputs under a key made of exactly what determines them.

Layout: ``<root>/<stage>/<key>/`` holds a finished stage, with ``MANIFEST.json`` listing
each file's sha256. Work happens in ``<key>.partial/`` (which also holds the stage's resume
checkpoints) and becomes ``<key>/`` by one atomic rename, so an unfinished stage never looks
finished. A ``<key>.lock`` file lock (fcntl; the kernel releases it when its holder dies)
makes concurrent runs that need the same stage wait for one of them instead of both
computing it. A finished stage whose files fail their checksums is moved aside to
``<key>.corrupt-<time>`` (never deleted) and computed again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from lightning_lth.io import file_sha256, load_json, save_json, write_atomic

MANIFEST = "MANIFEST.json"


def stage_key(stage: str, settings: dict, label: str = "") -> str:
    """A readable label plus the hash of the canonical JSON of the settings."""
    canonical = json.dumps({"stage": stage, **settings}, sort_keys=True, default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return f"{label}-{digest}" if label else digest


@dataclass(frozen=True)
class Stage:
    """One stage instance: its kind (dense, imp, match, arm), key and settings."""

    kind: str
    key: str
    settings: dict


def make_stage(kind: str, settings: dict, label: str = "") -> Stage:
    return Stage(kind, stage_key(kind, settings, label), settings)


class Store:
    def __init__(self, root: str | Path, is_writer: bool = True,
                 sync: Callable[[], None] = lambda: None):
        self.root = Path(root)
        self.is_writer = is_writer  # False on DDP ranks other than 0: they compute, never write
        self.sync = sync  # a DDP barrier: every rank has finished computing before the rename

    def path(self, stage: Stage) -> Path:
        return self.root / stage.kind / stage.key

    def partial_path(self, stage: Stage) -> Path:
        return self.root / stage.kind / f"{stage.key}.partial"

    def status(self, stage: Stage) -> str:
        if (self.path(stage) / MANIFEST).is_file():
            return "done"
        return "partial" if self.partial_path(stage).exists() else "missing"

    def verify(self, stage: Stage) -> bool:
        """True when the finished stage exists and every file matches its checksum."""
        final = self.path(stage)
        try:
            manifest = load_json(final / MANIFEST)
            return all(file_sha256(final / name) == digest
                       for name, digest in manifest["files"].items())
        except Exception:
            return False

    def log_event(self, event: str, stage: Stage) -> None:
        """One line per computed stage in <root>/events.log: proof of what was (re)computed."""
        if not self.is_writer:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), "event": event, "stage": stage.kind,
                           "key": stage.key, "pid": os.getpid()})
        with open(self.root / "events.log", "a") as handle:
            handle.write(line + "\n")

    @contextlib.contextmanager
    def lock(self, stage: Stage):
        if not self.is_writer:
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

    def _set_aside_if_corrupt(self, stage: Stage) -> None:
        final = self.path(stage)
        if final.exists() and not self.verify(stage):
            aside = final.with_name(f"{final.name}.corrupt-{int(time.time())}")
            rank_zero_warn(f"stage {stage.kind}/{stage.key} failed its checksums: moved to "
                           f"{aside.name} and computing it again")
            if self.is_writer:
                os.replace(final, aside)
                self.log_event("corrupt", stage)

    def run(self, stage: Stage, compute: Callable[[Path], None],
            is_done: Callable[[], bool] | None = None) -> Path:
        """The finished stage's folder, computing it first unless a finished copy exists.

        ``compute(workdir)`` writes the outputs into ``workdir`` (resuming from whatever it
        left there before). ``is_done`` lets DDP ranks share rank 0's view of the store.
        """
        final = self.path(stage)
        if is_done is not None and is_done():
            return final
        if is_done is None and self.status(stage) == "done" and self.verify(stage):
            return final
        with self.lock(stage):
            self._set_aside_if_corrupt(stage)
            if is_done is None and self.status(stage) == "done":
                return final  # another run finished it while we waited for the lock
            work = self.partial_path(stage)
            work.mkdir(parents=True, exist_ok=True)
            self.log_event("compute", stage)
            compute(work)
            self.sync()
            if self.is_writer:
                save_json({"stage": stage.kind, "key": stage.key, **stage.settings},
                          work / "settings.json")
                files = {str(p.relative_to(work)): file_sha256(p)
                         for p in sorted(work.rglob("*"))
                         if p.is_file() and not _is_scratch(p.relative_to(work))}
                save_json({"files": files, "finished_at": time.time()}, work / MANIFEST)
                os.replace(work, final)
                self.log_event("done", stage)
        return final


SCRATCH = ("checkpoints", "logs", "wandb", "rounds")


def _is_scratch(relative: Path) -> bool:
    """Resume checkpoints and logs are kept but not checksummed (they may be large)."""
    return relative.parts[0] in SCRATCH or relative.name == MANIFEST


def append_record(path: Path, record: dict) -> bool:
    """Append one JSON line unless a record with the same key is there; under a file lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("key") == record["key"]:
                    return False
        body = "".join(line + "\n" for line in lines) + json.dumps(record, sort_keys=True) + "\n"
        write_atomic(path, lambda handle: handle.write(body.encode()))
        return True
