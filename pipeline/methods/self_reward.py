"""Self-Rewarding (Yuan et al. 2024): the model writes prompts and N answers, judges them
itself with an LLM-as-a-Judge template, and best vs worst becomes a preference pair.

Scores are read with the parser the judge template declares, so swapping the template
(another scale, another output format) needs no code change.
"""

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import SelfInstructConfig, SelfRewardConfig
from pipeline.engines.base import PROMPT_TOO_LONG, Completion, Engine
from pipeline.errors import TemplateError
from pipeline.hashing import row_id
from pipeline.judging import OK, parse_score
from pipeline.methods.common import (
    NearDuplicateIndex,
    RoundContext,
    Rows,
    generation_row,
    label_probs,
    pair_row,
    sampling_from,
    unusable,
)
from pipeline.seeds import Prompt
from pipeline.templates import ScoreParser, Template

METHOD = "self_reward"
VARIANT = "best_vs_worst"


# -- new prompts (self-instruct) ---------------------------------------------------------


def write_new_prompts(
    engine: Engine,
    template: Template,
    seeds: Sequence[Prompt],
    generated: Sequence[Prompt],
    ctx: RoundContext,
    cfg: SelfInstructConfig,
    batch: int = 0,
) -> tuple[list[Prompt], Rows]:
    """Few-shot self-instruct: each request shows `seed_shots` seed prompts and
    `generated_shots` earlier generated ones (seeds fill in while there are none), and the
    model writes one new prompt. Near-duplicates (ROUGE-L over `rouge_l_max` against any
    existing prompt or one accepted earlier in the batch), and too short or too long
    prompts are discarded with their reason."""
    rows = Rows()
    if cfg.new_prompts == 0 or not seeds:
        return [], rows
    shots = cfg.seed_shots + cfg.generated_shots
    requests: list[str] = []
    for i in range(cfg.new_prompts):
        rng = ctx.rng(METHOD, "self_instruct", batch, i)
        from_generated = rng.sample(list(generated), min(cfg.generated_shots, len(generated)))
        pool = list(seeds)
        from_seeds = rng.sample(pool, min(shots - len(from_generated), len(pool)))
        examples = [p.text for p in from_seeds + from_generated]
        rng.shuffle(examples)
        requests.append(template.render(examples=examples))
    params = sampling_from(cfg.sampling)
    outputs = engine.generate([[{"role": "user", "content": r}] for r in requests], params)

    index = NearDuplicateIndex(cfg.rouge_l_max)
    for p in [*seeds, *generated]:
        index.add(p.text)
    accepted: list[Prompt] = []
    for i, (request, [completion]) in enumerate(zip(requests, outputs, strict=True)):
        text = completion.text.strip().strip("\"'").strip()
        request_id = row_id(ctx.run_id, ctx.round, "self_instruct_request", batch, i)
        gen = generation_row(
            ctx,
            METHOD,
            request_id,
            "instruction",
            0,
            Completion(text, completion.n_tokens, completion.finish_reason),
            params,
            template=template,
            meta={"request": request},
        )
        rows.add("generations", gen)
        reason = _prompt_problem(text, completion, cfg, index)
        if reason:
            rows.discard(ctx, METHOD, "self_instruct", gen["generation_id"], *reason)
            continue
        index.add(text)
        prompt = Prompt.user(text, source="self_instruct", generation_id=gen["generation_id"])
        accepted.append(prompt)
        rows.add("prompts", prompt.record(ctx.run_id, ctx.round))
    return accepted, rows


def _prompt_problem(
    text: str, completion: Completion, cfg: SelfInstructConfig, index: NearDuplicateIndex
) -> tuple[str, Any] | None:
    if unusable(completion):
        return unusable(completion), None
    n_words = len(text.split())
    if completion.finish_reason == "length" or n_words > cfg.max_words:
        return "too_long", f"{n_words} words, finish {completion.finish_reason}"
    if n_words < cfg.min_words:
        return "too_short", f"{n_words} words"
    score = index.nearest_above(text)
    if score is not None:
        return "near_duplicate", f"ROUGE-L {score:.3f} > {cfg.rouge_l_max}"
    return None


# -- candidates and judgments ------------------------------------------------------------


def generate_candidates(
    engine: Engine, prompts: Sequence[Prompt], ctx: RoundContext, cfg: SelfRewardConfig
) -> Rows:
    """N answers per prompt, in one engine call for the batch."""
    rows = Rows()
    params = sampling_from(cfg.sampling, n=cfg.n_candidates)
    outputs = engine.generate([p.conversation for p in prompts], params)
    for prompt, completions in zip(prompts, outputs, strict=True):
        for k, completion in enumerate(completions):
            rows.add(
                "generations",
                generation_row(ctx, METHOD, prompt.prompt_id, "candidate", k, completion, params),
            )
    return rows


def judge_parser(template: Template) -> ScoreParser:
    parser = template.meta.parser
    if not isinstance(parser, ScoreParser):
        raise TemplateError(
            f"{template.path}: a judge template needs a front-matter `parser` of kind score "
            "(pattern, min, max)"
        )
    return parser


def judge_candidates(
    engine: Engine,
    template: Template,
    prompts: Sequence[Prompt],
    candidates: Sequence[dict[str, Any]],
    ctx: RoundContext,
    cfg: SelfRewardConfig,
    judge_model_id: str | None = None,
    method: str = METHOD,
) -> Rows:
    """K judge samples per usable candidate, in one engine call. Every raw output is kept
    with its parse status; an unparsed sample has score NULL. `method` names who asked
    (the evaluation re-judges other methods' answers with the same judge)."""
    parser = judge_parser(template)
    by_id = {p.prompt_id: p for p in prompts}
    rows = Rows()
    todo = []
    for cand in candidates:
        reason = unusable(Completion(cand["text"], 0, cand["finish_reason"]))
        if reason:
            rows.discard(ctx, method, "judge", cand["generation_id"], reason)
            continue
        todo.append(cand)
    conversations = [
        [
            {
                "role": "user",
                "content": template.render(
                    instruction=by_id[c["prompt_id"]].text, response=c["text"]
                ),
            }
        ]
        for c in todo
    ]
    if parser.prefix is None:
        params = sampling_from(cfg.judge_sampling, n=cfg.judge_samples)
        outputs = engine.generate(conversations, params) if todo else []
        samples = [
            [_parsed(c.text, c.finish_reason, parser) for c in completions]
            for completions in outputs
        ]
        sampling = params.record()
    else:
        # Prefilled judge: one deterministic reading of the score distribution.
        probs = label_probs(engine, conversations, parser.labels, [parser.prefix] * len(todo))
        samples = [[_expected(p, parser)] for p in probs]
        sampling = {"prefix": parser.prefix, "expected_over": parser.labels}
    sampling_json = json.dumps(sampling, sort_keys=True)
    for cand, judged in zip(todo, samples, strict=True):
        for k, (raw, score, status) in enumerate(judged):
            rows.add(
                "judgments",
                {
                    "judgment_id": row_id(
                        ctx.run_id, ctx.round, method, cand["generation_id"], template.sha256, k
                    ),
                    "run_id": ctx.run_id,
                    "round": ctx.round,
                    "method": method,
                    "generation_id": cand["generation_id"],
                    "sample_idx": k,
                    "model_id": judge_model_id or ctx.model_id,
                    "template_id": template.template_id,
                    "raw_output": raw,
                    "score": score,
                    "parse_status": status,
                    "sampling_json": sampling_json,
                    "seed": ctx.seed,
                },
            )
    rows.add("templates", template.record())
    return rows


def _parsed(text: str, finish_reason: str, parser: ScoreParser) -> tuple[str, float | None, str]:
    if finish_reason == PROMPT_TOO_LONG:
        return text, None, PROMPT_TOO_LONG
    return (text, *parse_score(text, parser))


def _expected(probs: list[float] | None, parser: ScoreParser) -> tuple[str, float | None, str]:
    if probs is None:
        return "", None, PROMPT_TOO_LONG
    values = [float(label) for label in parser.labels]
    score = sum(v * p for v, p in zip(values, probs, strict=True))
    raw = json.dumps({"probs": dict(zip(parser.labels, [round(p, 6) for p in probs], strict=True))})
    return raw, score, OK


# -- pair selection ----------------------------------------------------------------------


@dataclass(frozen=True)
class PairPolicy:
    """How best vs worst is chosen. Stored with the round, so a pair can be explained."""

    min_margin: float = 0.0
    # Meta-Rewarding's length control: among answers scoring within this gap of the best,
    # the shortest is chosen; among those within it of the worst, the longest is rejected.
    length_control_gap: float | None = None

    @classmethod
    def from_config(cls, cfg: SelfRewardConfig) -> "PairPolicy":
        return cls(min_margin=cfg.min_margin, length_control_gap=cfg.length_control_gap)

    def record(self) -> dict[str, Any]:
        return {"method": METHOD, "rule": VARIANT, **asdict(self)}


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
            rows.discard(ctx, METHOD, "pairs", prompt.prompt_id, selection.reason, detail)
            continue
        chosen, rejected = selection.chosen, selection.rejected
        rows.add(
            "pairs",
            pair_row(
                ctx,
                METHOD,
                VARIANT,
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


def run_self_reward(
    engine: Engine,
    judge_engine: Engine,
    judge: Template,
    prompts: Sequence[Prompt],
    ctx: RoundContext,
    cfg: SelfRewardConfig,
    judge_model_id: str | None = None,
) -> Rows:
    """One batch: candidates, judgments, pairs. The prompts' own rows are included."""
    judge_parser(judge)  # fail before generating anything
    rows = Rows()
    rows.add("prompts", *(p.record(ctx.run_id, ctx.round) for p in prompts))
    rows.merge(generate_candidates(engine, prompts, ctx, cfg))
    rows.merge(
        judge_candidates(
            judge_engine, judge, prompts, rows["generations"], ctx, cfg, judge_model_id
        )
    )
    policy = PairPolicy.from_config(cfg)
    rows.merge(select_pairs(prompts, rows["generations"], rows["judgments"], ctx, policy))
    return rows
