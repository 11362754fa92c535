"""Asking a model which of two answers is better: label probabilities after a prefix, the
same question in both A/B orders, and the `comparisons` row each question leaves."""

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pipeline.engines.base import Conversation, Engine, Sampling
from pipeline.hashing import row_id
from pipeline.judging.parsing import choice_parser
from pipeline.rows import RoundContext
from pipeline.templates import Template

# What a preference question (RLCD-Rescore, RL-CAI feedback, the evaluation) is rendered with.
PREFERENCE_VARS = ("instruction", "response_a", "response_b", "principle")
PAIRWISE_VARS = ("instruction", "response_a", "response_b")


def label_probs(
    engine: Engine,
    conversations: Sequence[Conversation],
    labels: Sequence[str],
    prefixes: Sequence[str],
    *,
    single_token: bool = True,
) -> list[list[float] | None]:
    """Normalised probabilities of `labels` after each prefix, with None for a question too
    long for the context instead of a failed batch. Single-token labels (A/B) are one
    next-token reading; otherwise each label is a complete continuation of one or more
    tokens (`Engine.continuation_probs`)."""
    probs: list[list[float] | None] = [None] * len(conversations)
    # Room for the longest label after the prompt (+1: its tokens may split differently
    # alone than after the prefix).
    room = 1 if single_token else max(len(engine.encode(label)) for label in labels) + 1
    fits = [
        i
        for i, (c, p) in enumerate(zip(conversations, prefixes, strict=True))
        if len(engine.encode(engine.render(c, p))) + room <= engine.max_model_len
    ]
    if fits:
        asked = [conversations[i] for i in fits]
        at = [prefixes[i] for i in fits]
        got = (
            engine.choice_probs(asked, labels, at)
            if single_token
            else engine.continuation_probs(asked, labels, at)
        )
        for i, row in zip(fits, got, strict=True):
            probs[i] = row
    return probs


def ask_choices(
    engine: Engine,
    template: Template,
    questions: Sequence[dict[str, Any]],
    reasoning_params: Sampling | None = None,
) -> tuple[list[list[float] | None], list[str | None]]:
    """Label probabilities for each question (the template's variables), in one call.

    With a chain-of-thought template (`reasoning_prefix`), the judge first writes its
    reasoning in one generate call; the label is then read after that reasoning.
    Returns the probabilities (None where the question does not fit the context) and the
    reasoning texts (None without reasoning).
    """
    parser = choice_parser(template)
    conversations = [[{"role": "user", "content": template.render(**q)}] for q in questions]
    reasoning: list[str | None] = [None] * len(conversations)
    if parser.reasoning_prefix is not None:
        base = reasoning_params or Sampling(temperature=0.0, max_tokens=256)
        # The reasoning stops where the answer would start; the label is read from there.
        params = replace(base, n=1, stop=(parser.prefix.strip(),) if parser.prefix else ())
        outputs = engine.generate(
            conversations, params, [parser.reasoning_prefix] * len(conversations)
        )
        reasoning = [out[0].text.strip() for out in outputs]
        prefixes = [f"{parser.reasoning_prefix} {r}\n{parser.prefix}" for r in reasoning]
    else:
        prefixes = [parser.prefix] * len(conversations)
    return label_probs(engine, conversations, parser.labels, prefixes), reasoning


def comparison_row(
    ctx: RoundContext,
    method: str,
    key: tuple,
    prompt_id: str,
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    prob_a: float | None,
    template: Template,
    model_id: str,
    *,
    principle_id: str | None = None,
    raw_output: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One A/B question as asked: `a` and `b` are generation rows in the order shown, and
    `key` tells it apart from the method's other questions (its id is `key` and the
    template's hash)."""
    return {
        "comparison_id": row_id(ctx.run_id, ctx.round, method, *key, template.sha256),
        "run_id": ctx.run_id,
        "round": ctx.round,
        "method": method,
        "prompt_id": prompt_id,
        "generation_a_id": a["generation_id"],
        "generation_b_id": b["generation_id"],
        "model_id": model_id,
        "template_id": template.template_id,
        "principle_id": principle_id,
        "prob_a": prob_a,
        "raw_output": raw_output,
        "meta_json": json.dumps(meta) if meta is not None else None,
    }


def ask_both_orders(
    engine: Engine,
    template: Template,
    questions: Sequence[Mapping[str, Any]],
    first: Sequence[Mapping[str, Any]],
    second: Sequence[Mapping[str, Any]],
    reasoning_params: Sampling | None = None,
) -> list[tuple[tuple[float | None, float | None], tuple[str | None, str | None]]]:
    """Ask each question (template variables other than the two responses) with `first`'s
    answer as (A), then as (B), all in one call. Returns per question P(A better) in each
    of the two orders (None where it did not fit the context) and the reasoning texts."""
    asked = []
    for q, a, b in zip(questions, first, second, strict=True):
        asked.append({**q, "response_a": a["text"], "response_b": b["text"]})
        asked.append({**q, "response_a": b["text"], "response_b": a["text"]})
    probs, reasoning = ask_choices(engine, template, asked, reasoning_params) if asked else ([], [])
    prob_a = [None if p is None else p[0] for p in probs]
    return [
        ((prob_a[2 * i], prob_a[2 * i + 1]), (reasoning[2 * i], reasoning[2 * i + 1]))
        for i in range(len(questions))
    ]


def first_better(orders: tuple[float | None, float | None]) -> list[float | None]:
    """P(first answer better) per order, from P(A better) as asked in `ask_both_orders`."""
    in_first, in_second = orders
    return [in_first, None if in_second is None else 1.0 - in_second]
