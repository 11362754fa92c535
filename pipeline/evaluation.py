"""Per-round evaluation: did the round help, and can its labels be trusted?

Three parts, each stored in `evaluations` (one row per metric, method and round):

- win rate of M_t+1 over M_t on the held-out prompts, by a fixed pairwise judge asked in
  both A/B orders (ties count 0.5), and the order-flip rate (position bias);
- pair statistics per method, from what the round stored (count, tie rate, judge parse
  failures, margin, judge variance, length ratio, duplicate prompts), and the trainer's
  held-out metrics (DPO implicit-reward accuracy and margin, RM pairwise accuracy);
- cross-method agreement: every pair of the round re-labelled by the round's self-judge
  (pointwise) and by the pairwise judge; how often they side with the method's label.

The metric functions are pure (rows in, numbers out); the engine functions return `Rows`
like the methods do, so the flow stores each stage in one transaction.
"""

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pipeline.config import EvaluationConfig, SelfRewardConfig
from pipeline.engines.base import Engine
from pipeline.hashing import row_id
from pipeline.methods import self_reward
from pipeline.methods.common import (
    RoundContext,
    Rows,
    ask_choices,
    generation_row,
    normalise_text,
    sampling_from,
)
from pipeline.seeds import Prompt
from pipeline.templates import Template

METHOD = "evaluation"
# Discard reasons that mean "the two sides were equally good" for each method.
TIE_REASONS = ("tie", "identical", "unchanged_revision")
WIN, LOSS, TIE = 1.0, 0.0, 0.5

# -- metric functions ---------------------------------------------------------------------


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
        "win_rate": (counts[WIN] + 0.5 * counts[TIE]) / n if n else None,
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
        return {"length_ratio": None, "chosen_chars": None, "rejected_chars": None}
    chosen = statistics.fmean(p["chosen_chars"] for p in pairs)
    rejected = statistics.fmean(p["rejected_chars"] for p in pairs)
    return {
        "length_ratio": chosen / rejected if rejected else None,
        "chosen_chars": chosen,
        "rejected_chars": rejected,
        "chosen_longer": sum(p["chosen_chars"] > p["rejected_chars"] for p in pairs) / len(pairs),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def pair_statistics(
    pairs: Sequence[Mapping[str, Any]],
    ties: Mapping[str, int],
    judge_counts: Mapping[str, tuple[int, int]],
    judge_variance: Mapping[str, float | None],
) -> dict[str, dict[str, tuple[float | None, dict[str, Any]]]]:
    """Per method: metric -> (value, details).

    `pairs`: one row per pair (method, margin, chosen_chars, rejected_chars, seen_before:
    the same method and variant had a pair for this prompt in an earlier round).
    `ties`: pairs not formed because the sides were equal. `judge_counts`: (labels asked,
    labels that did not parse) per method. `judge_variance`: mean variance of the judge's
    samples per candidate."""
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
        out[method] = {
            "pairs": (float(n), {}),
            "tie_rate": (tied / (n + tied) if n + tied else None, {"ties": tied}),
            "parse_failure_rate": (
                failed / asked if asked else None,
                {"asked": asked, "failed": failed},
            ),
            "mean_margin": (_mean([p["margin"] for p in rows]), {}),
            "judge_variance": (judge_variance.get(method), {}),
            "length_ratio": (lengths.pop("length_ratio"), lengths),
            "duplicate_prompt_rate": (repeated / n if n else None, {"repeated": repeated}),
        }
    return out


# Trainer metrics (training_runs.metrics_json) copied into evaluations.
TRAINING_METRICS = {
    "dpo": {
        "heldout_reward_accuracy": "implicit_reward_accuracy",
        "heldout_reward_margin": "implicit_reward_margin",
    },
    "rm": {"heldout_pairwise_accuracy": "rm_pairwise_accuracy"},
}


def training_metrics(kind: str, metrics: Mapping[str, Any]) -> dict[str, tuple[float, dict]]:
    """The held-out numbers of a finished training step, with their before-training value
    where the trainer measured one."""
    out = {}
    for key, name in TRAINING_METRICS.get(kind, {}).items():
        if metrics.get(key) is not None:
            before = metrics.get(f"{key}_before")
            out[name] = (float(metrics[key]), {"before": before, "pairs": metrics["heldout_pairs"]})
    return out


def evaluation_row(
    ctx: RoundContext, metric: str, value: float | None, method: str | None = None, **details
) -> dict[str, Any]:
    return {
        "evaluation_id": row_id(ctx.run_id, ctx.round, metric, method),
        "run_id": ctx.run_id,
        "round": ctx.round,
        "metric": metric,
        "method": method,
        "value": value,
        "details_json": json.dumps(details, sort_keys=True, default=str),
    }


# -- engine stages --------------------------------------------------------------------------


def heldout_answers(
    engine: Engine, prompts: Sequence[Prompt], ctx: RoundContext, model_id: str, cfg
) -> Rows:
    """One greedy answer per held-out prompt from `model_id` (the engine's model)."""
    params = sampling_from(cfg.sampling)
    outputs = engine.generate([p.conversation for p in prompts], params)
    rows = Rows()
    for prompt, completions in zip(prompts, outputs, strict=True):
        rows.add(
            "generations",
            generation_row(
                ctx,
                METHOD,
                prompt.prompt_id,
                "heldout",
                0,
                completions[0],
                params,
                key=(model_id,),
                model_id=model_id,
            ),
        )
    return rows


def _comparison(
    ctx: RoundContext,
    purpose: str,
    key: str,
    order: str,
    prompt_id: str,
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    prob_a: float | None,
    template: Template,
    judge_model_id: str,
) -> dict[str, Any]:
    return {
        "comparison_id": row_id(
            ctx.run_id, ctx.round, METHOD, purpose, key, order, template.sha256
        ),
        "run_id": ctx.run_id,
        "round": ctx.round,
        "method": METHOD,
        "prompt_id": prompt_id,
        "generation_a_id": a["generation_id"],
        "generation_b_id": b["generation_id"],
        "model_id": judge_model_id,
        "template_id": template.template_id,
        "prob_a": prob_a,
        "meta_json": json.dumps({"purpose": purpose, "order": order, "key": key}),
    }


def _ask_both_orders(
    judge: Engine,
    template: Template,
    items: Sequence[tuple[str, str, str, Mapping[str, Any], Mapping[str, Any]]],
    orders: tuple[str, str],
    ctx: RoundContext,
    purpose: str,
    judge_model_id: str,
    rows: Rows,
) -> dict[str, list[float | None]]:
    """Ask every item (key, prompt id, instruction, first answer, second answer) with the
    first answer as (A), then as (B), all in one judge call; store each question as a
    comparison. Returns, per key, P(first answer better) for each order (None where the
    question did not fit the context)."""
    questions, asked = [], []
    for key, prompt_id, instruction, first, second in items:
        for order, a, b in ((orders[0], first, second), (orders[1], second, first)):
            questions.append(
                {"instruction": instruction, "response_a": a["text"], "response_b": b["text"]}
            )
            asked.append((key, prompt_id, order, a, b))
    probs, _ = ask_choices(judge, template, questions) if questions else ([], [])
    p_first: dict[str, list[float | None]] = defaultdict(list)
    for (key, prompt_id, order, a, b), p in zip(asked, probs, strict=True):
        prob_a = None if p is None else p[0]
        rows.add(
            "comparisons",
            _comparison(
                ctx, purpose, key, order, prompt_id, a, b, prob_a, template, judge_model_id
            ),
        )
        p_first[key].append(
            None if prob_a is None else prob_a if order == orders[0] else 1.0 - prob_a
        )
    return p_first


def _add_agreement(
    rows: Rows, ctx: RoundContext, metric: str, by_method: Mapping[str, list], template: Template
) -> None:
    for method, verdicts in sorted(by_method.items()):
        result = agreement(verdicts)
        rows.add(
            "evaluations",
            evaluation_row(
                ctx,
                metric,
                result.pop("agreement"),
                method,
                template_id=template.template_id,
                **result,
            ),
        )


def compare_models(
    judge: Engine,
    template: Template,
    prompts: Sequence[Prompt],
    old: Mapping[str, Mapping[str, Any]],
    new: Mapping[str, Mapping[str, Any]],
    ctx: RoundContext,
    judge_model_id: str,
    cfg: EvaluationConfig,
) -> Rows:
    """Win rate of the new model's held-out answers over the old model's (generation rows
    by prompt id), each prompt asked in both orders in one judge call."""
    items, identical = [], []
    for prompt in prompts:
        o, n = old[prompt.prompt_id], new[prompt.prompt_id]
        if normalise_text(o["text"]) == normalise_text(n["text"]):
            identical.append(prompt.prompt_id)
        else:
            items.append((prompt.prompt_id, prompt.prompt_id, prompt.text, n, o))
    rows = Rows()
    p_new = _ask_both_orders(
        judge, template, items, ("new_first", "old_first"), ctx, "win_rate", judge_model_id, rows
    )
    result = win_rate(p_new, cfg.tie_band, identical)
    old_model = next(iter(old.values()))["model_id"] if old else None
    new_model = next(iter(new.values()))["model_id"] if new else None
    details = {
        **result,
        "old_model": old_model,
        "new_model": new_model,
        "judge_model": judge_model_id,
        "template_id": template.template_id,
        "old_chars": _mean([len(g["text"]) for g in old.values()]),
        "new_chars": _mean([len(g["text"]) for g in new.values()]),
    }
    rows.add(
        "evaluations",
        evaluation_row(ctx, "win_rate", details.pop("win_rate"), **details),
        evaluation_row(ctx, "order_flip_rate", result["flip_rate"], prompts=result["prompts"]),
        evaluation_row(ctx, "heldout_chars", details["new_chars"], model=new_model),
    )
    rows.add("templates", template.record())
    return rows


def relabel_pairs(
    engine: Engine,
    judge: Template | None,
    pairwise: Template,
    pairs: Sequence[Mapping[str, Any]],
    ctx: RoundContext,
    self_reward_cfg: SelfRewardConfig,
    cfg: EvaluationConfig,
) -> Rows:
    """Cross-method agreement: each pair (with its prompt, texts and generation ids) is
    labelled again by the round's own model with the Self-Rewarding judge (both sides
    scored; Self-Rewarding's own pairs are skipped, their label is that judge) and with
    the pairwise judge in both orders (the mean of the two is P(chosen better))."""
    rows = Rows()
    if not pairs:
        return rows
    if judge is not None:
        others = [p for p in pairs if p["method"] != self_reward.METHOD]
        sides = {
            g["generation_id"]: g
            for p in others
            for g in (
                {
                    "generation_id": p[f"{side}_generation_id"],
                    "prompt_id": p["prompt_id"],
                    "text": p[side],
                    "finish_reason": p[f"{side}_finish_reason"],
                }
                for side in ("chosen", "rejected")
            )
        }
        judged = self_reward.judge_candidates(
            engine,
            judge,
            [Prompt.from_messages(json.loads(p["messages_json"])) for p in others],
            list(sides.values()),
            ctx,
            self_reward_cfg,
            method=METHOD,
        )
        rows.merge(judged)
        summary = self_reward.score_summary(judged["judgments"])
        by_method: dict[str, list[float | None]] = defaultdict(list)
        for p in others:
            c = summary.get(p["chosen_generation_id"], {}).get("mean")
            r = summary.get(p["rejected_generation_id"], {}).get("mean")
            v = None if c is None or r is None else WIN if c > r else LOSS if c < r else TIE
            by_method[p["method"]].append(v)
        _add_agreement(rows, ctx, "agreement_self_judge", by_method, judge)
    items = [
        (
            p["pair_id"],
            p["prompt_id"],
            p["prompt"],
            {"generation_id": p["chosen_generation_id"], "text": p["chosen"]},
            {"generation_id": p["rejected_generation_id"], "text": p["rejected"]},
        )
        for p in pairs
    ]
    p_chosen = _ask_both_orders(
        engine,
        pairwise,
        items,
        ("chosen_first", "rejected_first"),
        ctx,
        "agreement",
        ctx.model_id,
        rows,
    )
    by_method = defaultdict(list)
    for p in pairs:
        ps = [x for x in p_chosen.get(p["pair_id"], []) if x is not None]
        by_method[p["method"]].append(verdict(statistics.fmean(ps), cfg.tie_band) if ps else None)
    _add_agreement(rows, ctx, "agreement_pairwise", by_method, pairwise)
    rows.add("templates", pairwise.record())
    return rows


def round_statistics(
    ctx: RoundContext, stats_input: Mapping[str, Any], training: Sequence[Mapping[str, Any]]
) -> Rows:
    """Pair statistics and trainer metrics of a finished round, as evaluations rows.
    `stats_input` holds what `Store.pair_statistics_input` returns."""
    rows = Rows()
    stats = pair_statistics(**stats_input)
    for method, metrics in stats.items():
        for metric, (value, details) in metrics.items():
            rows.add("evaluations", evaluation_row(ctx, metric, value, method, **details))
    for run in training:
        metrics = json.loads(run["metrics_json"] or "{}")
        for metric, (value, details) in training_metrics(run["kind"], metrics).items():
            rows.add(
                "evaluations",
                evaluation_row(ctx, metric, value, model=run["output_model_id"], **details),
            )
    return rows
