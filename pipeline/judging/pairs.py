"""Pairs from scores: best vs worst among the validly scored answers to a prompt, with a
minimum margin and Meta-Rewarding's length control, and per-answer score summaries."""

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.judging.parsing import OK
from pipeline.rows import RoundContext, Rows, pair_row
from pipeline.seeds import Prompt

BEST_VS_WORST = "best_vs_worst"


@dataclass(frozen=True)
class PairPolicy:
    """How best vs worst is chosen. Stored with the round, so a pair can be explained."""

    min_margin: float = 0.0
    # Meta-Rewarding's length control: among answers scoring within this gap of the best,
    # the shortest is chosen; among those within it of the worst, the longest is rejected.
    length_control_gap: float | None = None

    def record(self, method: str) -> dict[str, Any]:
        return {"method": method, "rule": BEST_VS_WORST, **asdict(self)}


@dataclass(frozen=True)
class Scored:
    """A candidate and its valid judge scores (unparsed samples are not scores)."""

    generation_id: str
    scores: tuple[float, ...]
    length: int

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def variance(self) -> float:
        return statistics.pvariance(self.scores) if len(self.scores) > 1 else 0.0


@dataclass(frozen=True)
class Selection:
    chosen: Scored | None = None
    rejected: Scored | None = None
    reason: str | None = None  # why there is no pair

    @property
    def margin(self) -> float:
        return self.chosen.mean - self.rejected.mean


def select_pair(candidates: Sequence[Scored], policy: PairPolicy) -> Selection:
    """Best vs worst among validly scored candidates.

    A candidate with no valid score is never a side of the pair (a parse failure is not a
    low score). Equal means are a tie, and ties are dropped.
    """
    scored = [c for c in candidates if c.scores]
    if len(scored) < 2:
        return Selection(reason="fewer_than_2_scored")
    best = max(c.mean for c in scored)
    worst = min(c.mean for c in scored)
    if best == worst:
        return Selection(reason="tie")
    if policy.length_control_gap is None:
        # Deterministic among equal means: the first in candidate order.
        chosen = next(c for c in scored if c.mean == best)
        rejected = next(c for c in scored if c.mean == worst)
    else:
        gap = policy.length_control_gap
        chosen = min((c for c in scored if c.mean >= best - gap), key=lambda c: c.length)
        rejected = max((c for c in scored if c.mean <= worst + gap), key=lambda c: c.length)
        if chosen.mean <= rejected.mean:
            return Selection(reason="tie")
    selection = Selection(chosen, rejected)
    if selection.margin < policy.min_margin:
        return Selection(reason="below_margin")
    return selection


def select_pairs(
    prompts: Sequence[Prompt],
    candidates: Sequence[dict[str, Any]],
    judgments: Sequence[dict[str, Any]],
    ctx: RoundContext,
    policy: PairPolicy,
    method: str,
) -> Rows:
    """Pairs (and discards with reasons) from stored candidate and judgment rows."""
    scores: dict[str, list[float]] = defaultdict(list)
    for j in judgments:
        if j["parse_status"] == OK and j["score"] is not None:
            scores[j["generation_id"]].append(float(j["score"]))
    by_prompt: dict[str, list[Scored]] = defaultdict(list)
    for c in candidates:
        length = c["n_tokens"] if c["n_tokens"] is not None else len(c["text"])
        by_prompt[c["prompt_id"]].append(
            Scored(c["generation_id"], tuple(scores[c["generation_id"]]), length)
        )
    rows = Rows()
    for prompt in prompts:
        selection = select_pair(by_prompt[prompt.prompt_id], policy)
        if selection.reason:
            detail = {c.generation_id[:8]: c.scores for c in by_prompt[prompt.prompt_id]}
            rows.discard(ctx, method, "pairs", prompt.prompt_id, selection.reason, detail)
            continue
        chosen, rejected = selection.chosen, selection.rejected
        rows.add(
            "pairs",
            pair_row(
                ctx,
                method,
                BEST_VS_WORST,
                prompt,
                chosen.generation_id,
                rejected.generation_id,
                chosen_score=chosen.mean,
                rejected_score=rejected.mean,
                margin=selection.margin,
            ),
        )
    return rows


def score_summary(judgments: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per generation: mean and variance of the valid scores, and how many parsed."""
    scores: dict[str, list[float]] = defaultdict(list)
    total: dict[str, int] = defaultdict(int)
    for j in judgments:
        total[j["generation_id"]] += 1
        if j["score"] is not None:
            scores[j["generation_id"]].append(float(j["score"]))
    return {
        g: {
            "mean": statistics.fmean(scores[g]) if scores[g] else None,
            "variance": statistics.pvariance(scores[g]) if len(scores[g]) > 1 else None,
            "valid": len(scores[g]),
            "samples": n,
        }
        for g, n in total.items()
    }
