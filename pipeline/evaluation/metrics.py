"""Per-round evaluation metrics: pure functions of stored rows, no engine.

- win rate of M_t+1 over M_t from a fixed judge's verdicts in both A/B orders (ties count
  0.5), and the order-flip rate (position bias);
- pair statistics per method (count, tie rate, judge parse failures, margin, judge
  variance, length ratio, duplicate prompts) and the trainer's held-out metrics;
- cross-method agreement: how often a second labeler sides with a method's label.

Each lands in `evaluations` as one row per round, metric and method (`evaluation_row`).
"""

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pipeline.hashing import row_id
from pipeline.rows import RoundContext, Rows
from pipeline.store import RoundLabels

METHOD = "evaluation"
WIN, LOSS, TIE = 1.0, 0.0, 0.5

# The evaluation's metric names (`evaluations.metric`), each defined here only. The
# yardstick's are in yardstick.py, a training kind's in its registry entry.
WIN_RATE = "win_rate"
ORDER_FLIP_RATE = "order_flip_rate"
HELDOUT_CHARS = "heldout_chars"
AGREEMENT_SELF_JUDGE = "agreement_self_judge"
AGREEMENT_PAIRWISE = "agreement_pairwise"
LENGTH_RATIO = "length_ratio"
# `prefloop judge`'s comparison of two judges (evaluations metric -> its result's key).
JUDGE_COMPARISON = {
    "judge_pair_agreement": "pair_agreement",
    "judge_kendall_tau": "kendall_tau",
    "judge_same_best": "same_best",
    "judge_same_worst": "same_worst",
}
JUDGE_PAIR_AGREEMENT = "judge_pair_agreement"
JUDGE_PARSE_FAILURE_RATE = "judge_parse_failure_rate"
# Per method, from the round's stored labels (`pair_statistics`), in reading order.
PAIR_METRICS = (
    "pairs",
    "tie_rate",
    "parse_failure_rate",
    "mean_margin",
    "judge_variance",
    LENGTH_RATIO,
    "duplicate_prompt_rate",
)


def verdict(p_first_better: float | None, band: float) -> float | None:
    """1 (first side better), 0 (second), 0.5 (tie: within `band` of 0.5), None (no label)."""
    if p_first_better is None:
        return None
    if p_first_better > 0.5 + band:
        return WIN
    if p_first_better < 0.5 - band:
        return LOSS
    return TIE


def win_rate(
    p_new: Mapping[str, Sequence[float | None]], band: float, identical: Collection[str] = ()
) -> dict[str, Any]:
    """Win rate of the new model from P(new answer better), one value per order asked,
    per prompt. Each answered order is one verdict: win 1, tie 0.5, loss 0. Identical
    answers are ties in both orders without asking. The flip rate is the share of prompts
    asked in both orders whose winner changes with the order (position bias)."""
    counts = Counter({WIN: 0, LOSS: 0, TIE: 2 * len(identical)})
    flips = both = unanswered = 0
    for ps in p_new.values():
        verdicts = [verdict(p, band) for p in ps]
        unanswered += sum(v is None for v in verdicts)
        answered = [v for v in verdicts if v is not None]
        counts.update(answered)
        if len(answered) == 2:
            both += 1
            flips += {answered[0], answered[1]} == {WIN, LOSS}
    n = sum(counts.values())
    return {
        WIN_RATE: (counts[WIN] + 0.5 * counts[TIE]) / n if n else None,
        "flip_rate": flips / both if both else None,
        "wins": counts[WIN],
        "losses": counts[LOSS],
        "ties": counts[TIE],
        "prompts": len(p_new) + len(identical),
        "identical": len(identical),
        "unanswered": unanswered,
    }


def agreement(verdicts: Sequence[float | None]) -> dict[str, Any]:
    """How often a second labeler sides with the pairs' chosen answer. `verdicts` holds one
    verdict per pair (1: chosen better, 0: rejected better, 0.5: tie, None: no label);
    the rate is over the decided ones."""
    agree = sum(v == WIN for v in verdicts)
    disagree = sum(v == LOSS for v in verdicts)
    decided = agree + disagree
    return {
        "agreement": agree / decided if decided else None,
        "agree": agree,
        "disagree": disagree,
        "ties": sum(v == TIE for v in verdicts),
        "unlabelled": sum(v is None for v in verdicts),
    }


def length_ratio(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean chosen length over mean rejected length, in characters (> 1: the labels favour
    longer answers), and the share of pairs whose chosen answer is the longer one."""
    if not pairs:
        return {LENGTH_RATIO: None, "chosen_chars": None, "rejected_chars": None}
    chosen = statistics.fmean(p["chosen_chars"] for p in pairs)
    rejected = statistics.fmean(p["rejected_chars"] for p in pairs)
    return {
        LENGTH_RATIO: chosen / rejected if rejected else None,
        "chosen_chars": chosen,
        "rejected_chars": rejected,
        "chosen_longer": sum(p["chosen_chars"] > p["rejected_chars"] for p in pairs) / len(pairs),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def pair_statistics(
    labels: RoundLabels,
) -> dict[str, dict[str, tuple[float | None, dict[str, Any]]]]:
    """Per method: metric -> (value, details), from what the round stored (see
    `RoundLabels` for the fields)."""
    pairs, ties = labels.pairs, labels.ties
    judge_counts, judge_variance = labels.judge_counts, labels.judge_variance
    by_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for p in pairs:
        by_method[p["method"]].append(p)
    methods = sorted(set(by_method) | set(ties) | set(judge_counts))
    out: dict[str, dict[str, tuple[float | None, dict[str, Any]]]] = {}
    for method in methods:
        rows = by_method[method]
        n, tied = len(rows), ties.get(method, 0)
        asked, failed = judge_counts.get(method, (0, 0))
        lengths = length_ratio(rows)
        repeated = sum(bool(p["seen_before"]) for p in rows)
        values = (
            (float(n), {}),
            (tied / (n + tied) if n + tied else None, {"ties": tied}),
            (failed / asked if asked else None, {"asked": asked, "failed": failed}),
            (_mean([p["margin"] for p in rows]), {}),
            (judge_variance.get(method), {}),
            (lengths.pop(LENGTH_RATIO), lengths),
            (repeated / n if n else None, {"repeated": repeated}),
        )
        out[method] = dict(zip(PAIR_METRICS, values, strict=True))
    return out


def training_metrics(
    names: Mapping[str, str], metrics: Mapping[str, Any]
) -> dict[str, tuple[float, dict]]:
    """The held-out numbers of a finished training step (`names`: its kind's metrics.json
    key -> evaluations metric), with their before-training value where measured."""
    out = {}
    for key, name in names.items():
        if metrics.get(key) is not None:
            before = metrics.get(f"{key}_before")
            out[name] = (
                float(metrics[key]),
                {
                    "before": before,
                    "pairs": metrics.get("heldout_pairs"),
                    "examples": metrics.get("heldout_examples"),
                },
            )
    return out


def evaluation_row(
    ctx: RoundContext,
    metric: str,
    value: float | None,
    method: str | None = None,
    *,
    key: tuple = (),
    **details,
) -> dict[str, Any]:
    """One evaluations row; `key` tells apart rows of one metric that compare different
    things (two judges)."""
    return {
        "evaluation_id": row_id(ctx.run_id, ctx.round, metric, method, *key),
        "run_id": ctx.run_id,
        "round": ctx.round,
        "metric": metric,
        "method": method,
        "value": value,
        "details_json": json.dumps(details, sort_keys=True, default=str),
    }


def round_statistics(
    ctx: RoundContext,
    labels: RoundLabels,
    training: Sequence[Mapping[str, Any]],
    training_names: Mapping[str, Mapping[str, str]],
) -> Rows:
    """Pair statistics and trainer metrics of a finished round, as evaluations rows.
    `training`: the round's finished training runs; `training_names`: per training kind,
    its metrics.json key -> evaluations metric."""
    rows = Rows()
    stats = pair_statistics(labels)
    for method, metrics in stats.items():
        for metric, (value, details) in metrics.items():
            rows.add("evaluations", evaluation_row(ctx, metric, value, method, **details))
    for run in training:
        metrics = json.loads(run["metrics_json"] or "{}")
        for metric, (value, details) in training_metrics(
            training_names.get(run["kind"], {}), metrics
        ).items():
            rows.add(
                "evaluations",
                evaluation_row(ctx, metric, value, model=run["output_model_id"], **details),
            )
    return rows
