"""Engines live in the process that uses them, started once and shared by every stage.

Tasks get an `EngineSpec` (a path and settings), never an engine object, so a task that
runs on another worker (Ray) starts its own; in the flow process they share one.
"""

import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.engines import EngineBase, start_engine
from pipeline.engines.scorer import RewardScorer
from pipeline.schema import EngineConfig


@dataclass(frozen=True)
class EngineSpec:
    model_id: str
    model_path: str
    engine_json: str  # EngineConfig as JSON
    seed: int
    role: str = "generate"  # or "score": a reward model (pipeline/engines/scorer.py)


_ENGINES: dict[EngineSpec, EngineBase | RewardScorer] = {}
_LOCK = threading.Lock()


def get_engine(spec: EngineSpec) -> EngineBase | RewardScorer:
    with _LOCK:
        if spec not in _ENGINES:
            cfg = EngineConfig.model_validate_json(spec.engine_json)
            if spec.role == "score":
                _ENGINES[spec] = RewardScorer.start(Path(spec.model_path), cfg, spec.seed)
            else:
                _ENGINES[spec] = start_engine(Path(spec.model_path), cfg, spec.seed)
        return _ENGINES[spec]


def close_engines(keep: EngineSpec | None = None) -> None:
    """Free every engine's memory (before training, and at the end of a run); `keep`: an
    engine that stays up (the next stage's, when it is running already)."""
    with _LOCK:
        for spec in [s for s in _ENGINES if s != keep]:
            _ENGINES.pop(spec).close()
