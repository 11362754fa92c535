"""Two judges on the same candidates: do they agree? Pure functions over per-candidate
scores, so every number can be checked by hand.

For each prompt, the candidates both judges scored are compared in every pair (i, j):
the pair is ordered the same when both judges' score differences have the same sign (a
tie by either judge is counted apart). Kendall's tau-b per prompt measures the same rank
agreement with ties handled; best and worst agree when both judges put the same candidate
on top (bottom), ties broken by candidate order as the pair selection does.
"""

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two score lists over the same items; None when either judge
    gives every item the same score (no ranking to compare).

    tau_b = (C - D) / sqrt((n0 - t_x) * (n0 - t_y)), n0 = n(n-1)/2, t_x (t_y) the pairs
    tied in x (y); C and D the concordant and discordant pairs.
    """
    concordant = discordant = tied_x = tied_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0:
            tied_x += 1
        if dy == 0:
            tied_y += 1
        if dx and dy:
            if (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = len(x) * (len(x) - 1) // 2
    denominator = math.sqrt((n0 - tied_x) * (n0 - tied_y))
    return (concordant - discordant) / denominator if denominator else None


def distribution(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "n": len(ordered),
        "mean": statistics.fmean(ordered),
        "std": statistics.pstdev(ordered),
        "min": ordered[0],
        "q1": q[0],
        "median": q[1],
        "q3": q[2],
        "max": ordered[-1],
    }


def compare_scores(
    candidates: Sequence[Mapping[str, Any]],
    scores_a: Mapping[str, float | None],
    scores_b: Mapping[str, float | None],
    samples_a: Mapping[str, tuple[int, int]],
    samples_b: Mapping[str, tuple[int, int]],
) -> dict[str, Any]:
    """Agreement of judges a and b. `candidates` are generation rows (generation_id,
    prompt_id) in candidate order; `scores_*` the mean valid score per generation (None:
    no valid sample); `samples_*` per generation (valid samples, all samples)."""
    by_prompt: dict[str, list[str]] = defaultdict(list)
    for c in candidates:
        by_prompt[c["prompt_id"]].append(c["generation_id"])
    same = opposite = tied = 0
    taus, best, worst = [], [], []
    for ids in by_prompt.values():
        both = [g for g in ids if scores_a.get(g) is not None and scores_b.get(g) is not None]
        if len(both) < 2:
            continue
        xa = [scores_a[g] for g in both]
        xb = [scores_b[g] for g in both]
        for i, j in combinations(range(len(both)), 2):
            da, db = xa[i] - xa[j], xb[i] - xb[j]
            if not da or not db:
                tied += 1
            elif (da > 0) == (db > 0):
                same += 1
            else:
                opposite += 1
        tau = kendall_tau_b(xa, xb)
        if tau is not None:
            taus.append(tau)
        best.append(xa.index(max(xa)) == xb.index(max(xb)))
        worst.append(xa.index(min(xa)) == xb.index(min(xb)))
    decided = same + opposite
    return {
        "prompts": len(best),
        "candidate_pairs": decided + tied,
        "pair_agreement": same / decided if decided else None,
        "pairs_same": same,
        "pairs_opposite": opposite,
        "pairs_tied": tied,
        "kendall_tau": statistics.fmean(taus) if taus else None,
        "kendall_tau_prompts": len(taus),
        "same_best": statistics.fmean(best) if best else None,
        "same_worst": statistics.fmean(worst) if worst else None,
        "a": _judge_summary(scores_a, samples_a),
        "b": _judge_summary(scores_b, samples_b),
    }


def _judge_summary(
    scores: Mapping[str, float | None], samples: Mapping[str, tuple[int, int]]
) -> dict[str, Any]:
    valid = sum(v for v, _ in samples.values())
    total = sum(n for _, n in samples.values())
    return {
        "parse_failure_rate": 1 - valid / total if total else None,
        "samples": total,
        "scores": distribution([s for s in scores.values() if s is not None]),
    }
