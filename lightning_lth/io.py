"""Atomic writes and safe reads: every file the project reads back goes through here."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_lth.errors import LTHError


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a reader sees all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(obj: Any, path: str | Path) -> None:
    """torch.save a tree of tensors and plain values, atomically."""
    write_atomic(Path(path), lambda handle: torch.save(obj, handle))


def load_tensors(path: str | Path, what: str = "file") -> Any:
    """torch.load with weights_only=True: never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise LTHError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise LTHError(f"{what} {path} is unreadable or corrupt ({type(exc).__name__}); "
                       f"expected a torch.save file of tensors") from None


def save_json(obj: Any, path: str | Path) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    write_atomic(Path(path), lambda handle: handle.write(data))


def load_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LTHError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LTHError(f"{what} {path} is not valid JSON") from None


def load_yaml(path: str | Path, what: str = "file") -> Any:
    """A YAML file the user names (a sweep, a cost table, a config): missing, a folder or
    not YAML is one LTHError naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LTHError(f"{what} not found: {path}" if not path.exists()
                       else f"{what} {path} is a folder, not a file")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise LTHError(f"{what} {path} is not valid YAML{line}") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
