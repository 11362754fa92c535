"""Engines live in the process that uses them, started once and shared by every stage.

Tasks get an `EngineSpec` (a path and settings), never an engine object, so a task that
runs on another worker (Ray) starts its own; in the flow process they share one. A remote
engine's spec carries the model's tokenizer files, so a task on a machine that has no copy
of the model renders prompts exactly as the flow's machine would.
"""

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pipeline.engines import GENERATE, EngineBase, start_for_role
from pipeline.engines.scorer import RewardScorer
from pipeline.schema import EngineConfig

# What AutoTokenizer reads from a model directory (weights excluded).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "config.json",
)


@dataclass(frozen=True)
class EngineSpec:
    model_id: str
    model_path: str
    engine_json: str  # EngineConfig as JSON
    seed: int
    role: str = GENERATE  # or SCORE: a reward model (pipeline/engines/scorer.py)
    # A remote engine's tokenizer: (file name, bytes) pairs, and their hash.
    tokenizer: tuple[tuple[str, bytes], ...] = field(default=(), compare=False, repr=False)
    tokenizer_sha: str = ""


def engine_spec(
    model_id: str, model_path: str, engine: EngineConfig, seed: int, role: str = GENERATE
) -> EngineSpec:
    """A spec for a task; an OpenAI-compatible engine's carries its tokenizer files."""
    files: tuple[tuple[str, bytes], ...] = ()
    sha = ""
    if engine.kind == "openai":
        files, sha = tokenizer_bundle(model_path)
    return EngineSpec(model_id, model_path, engine.model_dump_json(), seed, role, files, sha)


@lru_cache(maxsize=8)
def tokenizer_bundle(model_path: str) -> tuple[tuple[tuple[str, bytes], ...], str]:
    folder = Path(model_path)
    files = tuple(
        (name, (folder / name).read_bytes())
        for name in TOKENIZER_FILES
        if (folder / name).is_file()
    )
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return files, digest.hexdigest()


def tokenizer_dir(spec: EngineSpec) -> Path | None:
    """The spec's tokenizer files in a folder of this machine (written once per hash)."""
    if not spec.tokenizer:
        return None
    folder = Path(tempfile.gettempdir()) / "prefloop-tokenizers" / spec.tokenizer_sha[:16]
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
        for name, data in spec.tokenizer:
            (partial / name).write_bytes(data)
        try:
            os.rename(partial, folder)
        except OSError:  # another worker wrote it first
            shutil.rmtree(partial, ignore_errors=True)
    return folder


_ENGINES: dict[EngineSpec, EngineBase | RewardScorer] = {}
_LOCK = threading.Lock()
log = logging.getLogger("prefloop.engines")


def get_engine(spec: EngineSpec) -> EngineBase | RewardScorer:
    """The spec's engine in this process, started on first use (one console line: the
    engines' own start-up output goes to the run's log file)."""
    with _LOCK:
        if spec not in _ENGINES:
            cfg = EngineConfig.model_validate_json(spec.engine_json)
            began = time.perf_counter()
            _ENGINES[spec] = start_for_role(
                Path(spec.model_path), cfg, spec.seed, spec.role, tokenizer_dir(spec)
            )
            log.info(
                "engine %s started for %s (%s) in %.0fs",
                _ENGINES[spec].kind,
                spec.model_id,
                spec.role,
                time.perf_counter() - began,
            )
        return _ENGINES[spec]


def close_engines(keep: EngineSpec | None = None) -> None:
    """Free every engine's memory (before training, and at the end of a run); `keep`: an
    engine that stays up (the next stage's, when it is running already)."""
    with _LOCK:
        for spec in [s for s in _ENGINES if s != keep]:
            _ENGINES.pop(spec).close()
