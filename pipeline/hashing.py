"""Content hashes and deterministic row ids."""

import hashlib
import json
from pathlib import Path
from typing import Any


def row_id(*parts: Any) -> str:
    """A stable id for a row, from what produced it (run, round, method, prompt, index...).

    Re-running the same work yields the same id, so inserts can skip what exists.
    """
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(path: Path, exclude: tuple[str, ...] = ()) -> str:
    """Hash of a directory's files (relative names and contents), order independent;
    `exclude`: files or top-level folders left out."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in exclude or rel.split("/", 1)[0] in exclude:
            continue
        h.update(rel.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()
