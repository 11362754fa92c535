"""The evaluation's engine stages. Like the methods, each returns `Rows` (answers, judge
questions and the metrics computed from them), which the flow stores in one transaction.

- `heldout_answers`: a model answers the held-out prompts, greedy;
- `compare_models`: the fixed pairwise judge compares two models' held-out answers in
  both orders (the win rate);
- `relabel_pairs`: every pair of the round labelled again by the round's self-judge and
  by the pairwise judge (cross-method agreement).
"""

import json
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.engines.base import Engine
from pipeline.evaluation.metrics import (
    AGREEMENT_PAIRWISE,
    AGREEMENT_SELF_JUDGE,
    HELDOUT_CHARS,
    LOSS,
    METHOD,
    ORDER_FLIP_RATE,
    TIE,
    WIN,
    WIN_RATE,
    agreement,
    evaluation_row,
    verdict,
    win_rate,
)
from pipeline.judging import Judge, judge_candidates
from pipeline.judging.labels import ask_both_orders, comparison_row, first_better
from pipeline.judging.pairs import score_summary
from pipeline.rows import RoundContext, Rows, generation_row, same_answer, sampling_from
from pipeline.schema import EvaluationConfig
from pipeline.seeds import Prompt
from pipeline.templates import Template


def greedy_answers(
    engine: Engine,
    prompts: Sequence[Prompt],
    ctx: RoundContext,
    model_id: str,
    sampling: Any,
    role: str,
) -> Rows:
    """One answer per prompt from `model_id` (the engine's model), as generations rows of
    the evaluation with this role."""
    params = sampling_from(sampling)
    outputs = engine.generate([p.conversation for p in prompts], params)
    rows = Rows()
    for prompt, completions in zip(prompts, outputs, strict=True):
        rows.add(
            "generations",
            generation_row(
                ctx,
                METHOD,
                prompt.prompt_id,
                role,
                0,
                completions[0],
                params,
                key=(model_id,),
                model_id=model_id,
            ),
        )
    return rows


def heldout_answers(
    engine: Engine,
    prompts: Sequence[Prompt],
    ctx: RoundContext,
    model_id: str,
    cfg: EvaluationConfig,
) -> Rows:
    """One greedy answer per held-out prompt from `model_id` (the engine's model)."""
    return greedy_answers(engine, prompts, ctx, model_id, cfg.sampling, "heldout")


def _ask_pairwise(
    engine: Engine,
    template: Template,
    items: Sequence[tuple[str, str, str, Mapping[str, Any], Mapping[str, Any]]],
    orders: tuple[str, str],
    ctx: RoundContext,
    purpose: str,
    judge_model_id: str,
    rows: Rows,
) -> dict[str, list[float | None]]:
    """Ask every item (key, prompt id, instruction, first answer, second answer) in both
    orders and store each question; returns per key P(first answer better) per order."""
    asked = ask_both_orders(
        engine,
        template,
        [{"instruction": instruction} for _, _, instruction, _, _ in items],
        [first for *_, first, _ in items],
        [second for *_, second in items],
    )
    p_first: dict[str, list[float | None]] = {}
    for (key, prompt_id, _, first, second), (probs, _) in zip(items, asked, strict=True):
        for order, a, b, prob_a in (
            (orders[0], first, second, probs[0]),
            (orders[1], second, first, probs[1]),
        ):
            rows.add(
                "comparisons",
                comparison_row(
                    ctx,
                    METHOD,
                    (purpose, key, order),
                    prompt_id,
                    a,
                    b,
                    prob_a,
                    template,
                    judge_model_id,
                    meta={"purpose": purpose, "order": order, "key": key},
                ),
            )
        p_first[key] = first_better(probs)
    return p_first


def _add_agreement(
    rows: Rows, ctx: RoundContext, metric: str, by_method: Mapping[str, list], judge_id: str
) -> None:
    for method, verdicts in sorted(by_method.items()):
        result = agreement(verdicts)
        rows.add(
            "evaluations",
            evaluation_row(
                ctx, metric, result.pop("agreement"), method, template_id=judge_id, **result
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
        if same_answer(o["text"], n["text"]):
            identical.append(prompt.prompt_id)
        else:
            items.append((prompt.prompt_id, prompt.prompt_id, prompt.text, n, o))
    rows = Rows()
    p_new = _ask_pairwise(
        judge, template, items, ("new_first", "old_first"), ctx, WIN_RATE, judge_model_id, rows
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
        "old_chars": _mean_length(old.values()),
        "new_chars": _mean_length(new.values()),
    }
    rows.add(
        "evaluations",
        evaluation_row(ctx, WIN_RATE, details.pop(WIN_RATE), **details),
        evaluation_row(ctx, ORDER_FLIP_RATE, result["flip_rate"], prompts=result["prompts"]),
        evaluation_row(ctx, HELDOUT_CHARS, details["new_chars"], model=new_model),
    )
    rows.add("templates", template.record())
    return rows


def _mean_length(generations) -> float | None:
    lengths = [len(g["text"]) for g in generations]
    return statistics.fmean(lengths) if lengths else None


def _self_judge_agreement(
    self_judge: Judge,
    judged_method: str | None,
    pairs: Sequence[Mapping[str, Any]],
    ctx: RoundContext,
    rows: Rows,
) -> None:
    """Both sides of every pair not labelled by this judge already, scored by it; per
    method, how often it scores the chosen side higher."""
    others = [p for p in pairs if p["method"] != judged_method]
    sides = {
        p[f"{side}_generation_id"]: {
            "generation_id": p[f"{side}_generation_id"],
            "prompt_id": p["prompt_id"],
            "text": p[side],
            "finish_reason": p[f"{side}_finish_reason"],
        }
        for p in others
        for side in ("chosen", "rejected")
    }
    prompts = [Prompt.from_messages(json.loads(p["messages_json"])) for p in others]
    judged = judge_candidates(self_judge, prompts, list(sides.values()), ctx, METHOD)
    rows.merge(judged)
    summary = score_summary(judged["judgments"])
    by_method: dict[str, list[float | None]] = defaultdict(list)
    for p in others:
        c = summary.get(p["chosen_generation_id"], {}).get("mean")
        r = summary.get(p["rejected_generation_id"], {}).get("mean")
        v = None if c is None or r is None else WIN if c > r else LOSS if c < r else TIE
        by_method[p["method"]].append(v)
    _add_agreement(rows, ctx, AGREEMENT_SELF_JUDGE, by_method, self_judge.judge_id)


def _pairwise_agreement(
    engine: Engine,
    pairwise: Template,
    pairs: Sequence[Mapping[str, Any]],
    ctx: RoundContext,
    cfg: EvaluationConfig,
    rows: Rows,
) -> None:
    """Every pair asked of the round's model with the pairwise judge in both orders (the
    mean of the two is P(chosen better)); per method, how often it sides with the chosen."""
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
    orders = ("chosen_first", "rejected_first")
    purpose = "agreement"
    p_chosen = _ask_pairwise(engine, pairwise, items, orders, ctx, purpose, ctx.model_id, rows)
    by_method: dict[str, list[float | None]] = defaultdict(list)
    for p in pairs:
        ps = [x for x in p_chosen.get(p["pair_id"], []) if x is not None]
        by_method[p["method"]].append(verdict(statistics.fmean(ps), cfg.tie_band) if ps else None)
    _add_agreement(rows, ctx, AGREEMENT_PAIRWISE, by_method, pairwise.template_id)
    rows.add("templates", pairwise.record())


def relabel_pairs(
    engine: Engine,
    self_judge: Judge | None,
    judged_method: str | None,
    pairwise: Template,
    pairs: Sequence[Mapping[str, Any]],
    ctx: RoundContext,
    cfg: EvaluationConfig,
) -> Rows:
    """Cross-method agreement: each pair (with its prompt, texts and generation ids) is
    labelled again by the round's self-judge (both sides scored; the pairs of
    `judged_method`, whose label is that judge, are skipped) and by the round's model with
    the pairwise judge in both orders."""
    rows = Rows()
    if not pairs:
        return rows
    if self_judge is not None:
        _self_judge_agreement(self_judge, judged_method, pairs, ctx, rows)
    _pairwise_agreement(engine, pairwise, pairs, ctx, cfg, rows)
    return rows
