"""Generation engines behind one protocol: vLLM, transformers, OpenAI-compatible HTTP."""

import importlib.util
from pathlib import Path

from pipeline.engines.base import (
    PROMPT_TOO_LONG,
    Completion,
    Conversation,
    Engine,
    EngineBase,
    Sampling,
)
from pipeline.schema import EngineConfig

__all__ = [
    "PROMPT_TOO_LONG",
    "Completion",
    "Conversation",
    "Engine",
    "EngineBase",
    "Sampling",
    "engine_kind",
    "engine_problem",
    "start_engine",
    "start_for_role",
    "GENERATE",
    "SCORE",
]

# An engine's role: `generate` (a causal LM: answers, judgments, label probabilities) or
# `score` (a reward model, scoring whole conversations).
GENERATE, SCORE = "generate", "score"


def engine_kind(cfg: EngineConfig) -> str:
    """`auto` means vLLM where it is installed, else transformers."""
    if cfg.kind != "auto":
        return cfg.kind
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def engine_problem(cfg: EngineConfig) -> str | None:
    """A setting the configured engine will refuse on this machine ("block_size: ..."),
    found before it starts, or None."""
    if engine_kind(cfg) != "vllm" or cfg.block_size is None:
        return None
    import torch

    from pipeline.engines.vllm_engine import block_size_problem

    return block_size_problem(cfg, torch.cuda.is_available())


def start_engine(
    model_path: Path, cfg: EngineConfig, seed: int, tokenizer_dir: Path | None = None
) -> EngineBase:
    """Start the configured engine; use it as a context manager to release it.
    `tokenizer_dir`: a remote engine's tokenizer files, when `model_path` is not on this
    machine."""
    kind = engine_kind(cfg)
    if kind == "vllm":
        from pipeline.engines.vllm_engine import VllmEngine

        return VllmEngine.start(model_path, cfg, seed)
    if kind == "hf":
        from pipeline.engines.hf_engine import HfEngine

        return HfEngine.start(model_path, cfg, seed)
    from pipeline.engines.openai_engine import OpenAIEngine

    return OpenAIEngine.start(model_path, cfg, seed, tokenizer_dir)


def start_for_role(
    model_path: Path, cfg: EngineConfig, seed: int, role: str, tokenizer_dir: Path | None = None
):
    """The engine that serves a role: a reward-model scorer for `score`, the configured
    generation engine otherwise. The one place that decides it."""
    if role == SCORE:
        from pipeline.engines.scorer import RewardScorer

        return RewardScorer.start(Path(model_path), cfg, seed)
    return start_engine(Path(model_path), cfg, seed, tokenizer_dir=tokenizer_dir)
