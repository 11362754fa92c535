"""The row contract every stage shares: where rows come from (`RoundContext`), the container
they travel in (`Rows`, table name -> row dicts, stored in one transaction), and the
builders and checks for the rows every producer writes (generations, pairs, discards)."""

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pipeline.engines.base import PROMPT_TOO_LONG, Completion, Sampling
from pipeline.hashing import row_id
from pipeline.seeds import Prompt
from pipeline.templates import Template


@dataclass(frozen=True)
class RoundContext:
    """Where rows come from: ids built from these make re-runs insert nothing new."""

    run_id: str
    round: int
    model_id: str  # the model generating this round's answers
    seed: int

    def rng(self, *parts: Any) -> random.Random:
        """A generator seeded by the run's seed and `parts` (e.g. a method and a prompt id):
        the same draw on every re-run, independent of batch order."""
        return random.Random(row_id(self.seed, self.run_id, self.round, *parts))


class Rows(defaultdict):
    """Table name -> rows to insert. `Store.write(rows)` stores them in one transaction."""

    def __init__(self) -> None:
        super().__init__(list)

    def __reduce__(self):
        return (_rows_from, (dict(self),))

    def add(self, table: str, *rows: dict[str, Any]) -> None:
        self[table].extend(rows)

    def merge(self, other: "Rows") -> "Rows":
        for table, rows in other.items():
            self[table].extend(rows)
        return self

    def discard(
        self, ctx: RoundContext, method: str, stage: str, item_id: str, reason: str, detail=None
    ) -> None:
        self.add(
            "discards",
            {
                "run_id": ctx.run_id,
                "round": ctx.round,
                "method": method,
                "stage": stage,
                "item_id": item_id,
                "reason": reason,
                "detail": None if detail is None else str(detail)[:2000],
            },
        )

    def counts(self) -> dict[str, int]:
        return {table: len(rows) for table, rows in sorted(self.items()) if rows}


def _rows_from(tables: dict[str, list]) -> Rows:
    rows = Rows()
    rows.update(tables)
    return rows


def generation_row(
    ctx: RoundContext,
    method: str,
    prompt_id: str,
    role: str,
    sample_idx: int,
    completion: Completion,
    params: Sampling,
    *,
    template: Template | None = None,
    parent_id: str | None = None,
    meta: dict[str, Any] | None = None,
    key: tuple = (),
    model_id: str | None = None,
) -> dict[str, Any]:
    """One generated text with its provenance. `key` adds what else tells it apart (a CAI
    step); the id never depends on the text, so a re-run maps onto the stored row."""
    return {
        "generation_id": row_id(ctx.run_id, ctx.round, method, prompt_id, role, sample_idx, *key),
        "run_id": ctx.run_id,
        "round": ctx.round,
        "method": method,
        "prompt_id": prompt_id,
        "model_id": model_id or ctx.model_id,
        "template_id": template.template_id if template else None,
        "role": role,
        "sample_idx": sample_idx,
        "parent_generation_id": parent_id,
        "text": completion.text,
        "n_tokens": completion.n_tokens,
        "finish_reason": completion.finish_reason,
        "sampling_json": json.dumps(params.record(), sort_keys=True),
        "seed": ctx.seed,
        "meta_json": json.dumps(meta, sort_keys=True) if meta else None,
    }


def pair_row(
    ctx: RoundContext,
    method: str,
    variant: str,
    prompt: Prompt,
    chosen_id: str,
    rejected_id: str,
    **fields: Any,
) -> dict[str, Any]:
    return {
        "pair_id": row_id(ctx.run_id, ctx.round, method, variant, prompt.prompt_id),
        "run_id": ctx.run_id,
        "round": ctx.round,
        "method": method,
        "variant": variant,
        "prompt_id": prompt.prompt_id,
        "chosen_generation_id": chosen_id,
        "rejected_generation_id": rejected_id,
        "model_id": ctx.model_id,
        "flagged": False,
        **fields,
    }


def sampling_from(cfg: Any, n: int = 1) -> Sampling:
    """Engine sampling parameters from a config's `SamplingConfig`."""
    return Sampling(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)


def unusable(completion: Completion) -> str | None:
    """Why a completion cannot be used as an answer, or None."""
    if completion.finish_reason == PROMPT_TOO_LONG:
        return "prompt_too_long"
    if not completion.text.strip():
        return "empty"
    return None


def normalise_text(text: str) -> str:
    return " ".join(text.split()).casefold()


def same_answer(a: str, b: str) -> bool:
    """Two answers that differ only in spacing or case: never a preference pair."""
    return normalise_text(a) == normalise_text(b)


def stage_metrics_row(
    ctx: RoundContext,
    stage: str,
    batch: int,
    n_items: int,
    wall: float,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    setup: float = 0.0,
    servers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A stage_metrics row: the work's wall time and tokens; `setup` is the time spent
    before the work (starting an engine), kept apart so tokens/s stays the engine's;
    `servers`: per server of a remote engine, what it did."""
    return {
        "run_id": ctx.run_id,
        "round": ctx.round,
        "stage": stage,
        "batch": batch,
        "n_items": n_items,
        "wall_s": wall,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "tokens_per_s": (prompt_tokens + completion_tokens) / wall if wall > 0 else None,
        "setup_s": setup,
        "servers_json": json.dumps(servers) if servers else None,
    }
