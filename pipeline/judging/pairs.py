"""Pairs from scores: best vs worst (or best vs a random other, or on length-penalised
scores) among the validly scored answers to a prompt, with a minimum margin and
Meta-Rewarding's length control, and per-answer score summaries."""

import random
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pipeline.judging.parsing import OK
from pipeline.rows import RoundContext, Rows, pair_row
from pipeline.seeds import Prompt

BEST_VS_WORST = "best_vs_worst"
BEST_VS_RANDOM = "best_vs_random"
LENGTH_PENALISED = "length_penalised"
Strategy = Literal["best_vs_worst", "best_vs_random", "length_penalised"]


@dataclass(frozen=True)
class PairPolicy:
    """How a pair is chosen from scored answers. Stored with the round, so a pair can be
    explained.

    best_vs_worst: the highest mean score is chosen, the lowest rejected (Self-Rewarding).
    best_vs_random: the best is chosen over a random lower-scored answer (seeded per prompt).
    length_penalised: best vs worst on score - length_penalty * length in tokens, against
    the length bias judges and reward models show.
    """

    min_margin: float = 0.0
    # Meta-Rewarding's length control: among answers scoring within this gap of the best,
    # the shortest is chosen; among those within it of the worst, the longest is rejected.
    length_control_gap: float | None = None
    strategy: Strategy = BEST_VS_WORST
    length_penalty: float = 0.0

    def record(self, method: str) -> dict[str, Any]:
        return {"method": method, "rule": self.strategy, **asdict(self)}

    def value(self, candidate: "Scored") -> float:
        if self.strategy == LENGTH_PENALISED:
            return candidate.mean - self.length_penalty * candidate.length
        return candidate.mean


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
    chosen_score: float = 0.0  # the values compared (score, or length-penalised score)
    rejected_score: float = 0.0

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score


def select_pair(
    candidates: Sequence[Scored], policy: PairPolicy, rng: random.Random | None = None
) -> Selection:
    """A pair among validly scored candidates, by the policy's strategy.

    A candidate with no valid score is never a side of the pair (a parse failure is not a
    low score). Equal values are a tie, and ties are dropped.
    """
    scored = [c for c in candidates if c.scores]
    if len(scored) < 2:
        return Selection(reason="fewer_than_2_scored")
    value = policy.value
    best = max(value(c) for c in scored)
    worst = min(value(c) for c in scored)
    if best == worst:
        return Selection(reason="tie")
    # Deterministic among equal values: the first in candidate order.
    chosen = next(c for c in scored if value(c) == best)
    rejected = next(c for c in scored if value(c) == worst)
    if policy.length_control_gap is not None:
        gap = policy.length_control_gap
        chosen = min((c for c in scored if value(c) >= best - gap), key=lambda c: c.length)
        rejected = max((c for c in scored if value(c) <= worst + gap), key=lambda c: c.length)
        if value(chosen) <= value(rejected):
            return Selection(reason="tie")
    if policy.strategy == BEST_VS_RANDOM:
        lower = [c for c in scored if value(c) < value(chosen)]
        rejected = (rng or random.Random(0)).choice(lower)
    selection = Selection(chosen, rejected, None, value(chosen), value(rejected))
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
    variant: str | None = None,
) -> Rows:
    """Pairs (and discards with reasons) from stored candidate and judgment rows; `variant`
    names pairs built from another judge's scores (default: the policy's strategy)."""
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
        rng = ctx.rng(method, "pairs", prompt.prompt_id)
        selection = select_pair(by_prompt[prompt.prompt_id], policy, rng)
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
                variant or policy.strategy,
                prompt,
                chosen.generation_id,
                rejected.generation_id,
                chosen_score=selection.chosen_score,
                rejected_score=selection.rejected_score,
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
