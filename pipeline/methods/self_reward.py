"""Self-Rewarding (Yuan et al. 2024): the model writes N answers per prompt, judges them
itself, and best vs worst becomes a preference pair.

The judge is any judge kind (pipeline/judging): by default the LLM-as-a-Judge template
kind on the round's own model, read with the parser its template declares, so swapping
the template (another scale, another output format) needs no code change. New prompts come
from self-instruct (pipeline/self_instruct.py), which the round runs first.
"""

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from pipeline.engines.base import Engine
from pipeline.judging import JUDGES, Judge, judge_candidates
from pipeline.judging.pairs import BEST_VS_WORST, PairPolicy, Strategy, select_pairs
from pipeline.methods.common import MethodConfig
from pipeline.rows import RoundContext, Rows, generation_row, sampling_from
from pipeline.schema import SamplingConfig, kind_field
from pipeline.seeds import Prompt
from pipeline.self_instruct import SelfInstructConfig

METHOD = "self_reward"


class SelfRewardConfig(MethodConfig):
    # Answers per prompt (the paper: 4).
    n_candidates: int = Field(4, ge=2)
    # How candidates are sampled (the paper: T 0.7, top-p 0.9).
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=256)
    # Any judge kind: {kind: template, template: ..., samples: ..., model: ...} by default.
    judge: kind_field(JUDGES, lambda kind: kind.config, "template") = Field(  # type: ignore[valid-type]
        default_factory=lambda: JUDGES["template"].config()
    )
    # A pair needs best minus worst score above this (ties are dropped).
    min_margin: float = Field(0.0, ge=0.0)
    # Meta-Rewarding's length control: when the best scores are within this gap, the
    # shorter answer wins. None turns it off.
    length_control_gap: float | None = Field(None, ge=0.0)
    # best_vs_worst (the paper), best_vs_random (best over a random lower-scored answer),
    # length_penalised (best vs worst on score - length_penalty * tokens).
    pair_strategy: Strategy = BEST_VS_WORST
    # length_penalised: score minus this times the answer's tokens.
    length_penalty: float = Field(0.0, ge=0.0)
    # New prompts from the model itself, before the candidates.
    self_instruct: SelfInstructConfig = SelfInstructConfig()


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


def pair_policy(cfg: SelfRewardConfig) -> PairPolicy:
    return PairPolicy(
        min_margin=cfg.min_margin,
        length_control_gap=cfg.length_control_gap,
        strategy=cfg.pair_strategy,
        length_penalty=cfg.length_penalty,
    )


def run_self_reward(
    engine: Engine,
    judge: Judge,
    prompts: Sequence[Prompt],
    ctx: RoundContext,
    cfg: SelfRewardConfig,
) -> Rows:
    """One batch: candidates, judgments, pairs. The prompts' own rows are included."""
    rows = Rows()
    rows.add("prompts", *(p.record(ctx.run_id, ctx.round) for p in prompts))
    rows.merge(generate_candidates(engine, prompts, ctx, cfg))
    rows.merge(judge_candidates(judge, prompts, rows["generations"], ctx, METHOD))
    rows.merge(
        select_pairs(prompts, rows["generations"], rows["judgments"], ctx, pair_policy(cfg), METHOD)
    )
    return rows


def record_policy(cfg: SelfRewardConfig) -> dict[str, Any]:
    """How this method turns generations into pairs, stored with the round."""
    return {**pair_policy(cfg).record(METHOD), "judge": cfg.judge.model_dump(mode="json")}
