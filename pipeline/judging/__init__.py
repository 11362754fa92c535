"""Judging in one place: a judge scores answers to prompts, and the judge kinds live in one
registry, `JUDGES`.

A judge kind is an entry of that dict: its settings class (the `judge:` mapping of a
method's config, picked by `kind`), `load` (read and check its files before any engine
starts) and `build` (the judge, given the engine that runs it). Nothing else in the code
names a kind: a method asks `build_judge` for its judge and `judge_candidates` for the
`judgments` rows.

The kinds: the LLM-as-a-Judge (`template`), a yes/no reading per requirement of the
request (`checklist`), a reward model (`reward_model`) and a rule (`function`). Also
here: parsers (`parsing`), label probabilities and A/B questions asked in both orders
(`labels`), pair selection from scores (`pairs`) and comparing two judges (`compare`).
"""

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from pipeline.engines.base import Completion, Engine
from pipeline.hashing import row_id
from pipeline.judging import checklist, reward_model
from pipeline.judging import function as function_judge
from pipeline.judging import template as template_judge
from pipeline.judging.parsing import JudgeItem, Sample
from pipeline.rows import RoundContext, Rows, unusable
from pipeline.seeds import Prompt
from pipeline.templates import Template, TemplateLibrary

__all__ = [
    "JUDGES",
    "Judge",
    "JudgeItem",
    "JudgeKind",
    "JudgePlan",
    "Sample",
    "build_judge",
    "judge_candidates",
    "plan_judge",
]


class Judge(Protocol):
    """Scores answers. Its attributes are the provenance each `judgments` row carries."""

    judge_id: str  # what judged: a template id, a model id, a function name and code hash
    key: str  # tells its judgments apart from another judge's in their ids
    model_id: str | None  # the model that judged (None: no model)
    template: Template | None
    sampling: dict[str, Any]

    def score(self, items: Sequence[JudgeItem]) -> list[list[Sample]]:
        """Samples per (instruction, answer, conversation), in order."""
        ...


@dataclass(frozen=True)
class JudgeKind:
    config: type[BaseModel]  # the `judge:` settings; a `kind` field, a `model` if it needs one
    load: Callable[[Any, TemplateLibrary], Any]  # files read and checked before any engine
    build: Callable[
        [Any, Any, Engine | None, str | None], Judge
    ]  # settings, loaded, engine, model id
    needs_engine: bool = True  # runs on a model: the round's own, or the settings' `model`
    # Its engine is a reward-model scorer (`RewardScorer`), not a generator.
    scorer: bool = False
    # The model it runs on when not the round's own (None: the round's, or no model).
    model: Callable[[Any], str | None] = lambda settings: getattr(settings, "model", None)


JUDGES: dict[str, JudgeKind] = {
    "template": JudgeKind(
        config=template_judge.TemplateJudgeConfig,
        load=template_judge.load,
        build=template_judge.TemplateJudge,
    ),
    "reward_model": JudgeKind(
        config=reward_model.RewardModelJudgeConfig,
        load=reward_model.load,
        build=reward_model.RewardModelJudge,
        scorer=True,
        model=lambda cfg: None if cfg.model == reward_model.LATEST else cfg.model,
    ),
    "checklist": JudgeKind(
        config=checklist.ChecklistJudgeConfig,
        load=checklist.load,
        build=checklist.ChecklistJudge,
    ),
    "function": JudgeKind(
        config=function_judge.FunctionJudgeConfig,
        load=function_judge.load,
        build=function_judge.FunctionJudge,
        needs_engine=False,
    ),
}


def judge_model(settings: Any) -> str | None:
    """The model a judge runs on when it is not the round's own (None: the round's)."""
    kind = JUDGES[settings.kind]
    return kind.model(settings) if kind.needs_engine else None


def load_judge(settings: Any, library: TemplateLibrary) -> Any:
    return JUDGES[settings.kind].load(settings, library)


def build_judge(settings: Any, loaded: Any, engine: Engine | None, model_id: str | None) -> Judge:
    return JUDGES[settings.kind].build(settings, loaded, engine, model_id)


@dataclass(frozen=True)
class JudgePlan:
    """The judge a round uses, decided once per round: its settings (a reward model's
    `latest` already resolved, or the fallback in its place), what its `load` returned,
    and the model it runs on (None: the round's own, or no model)."""

    settings: Any
    loaded: Any
    model_path: str | None = None
    model_id: str | None = None

    @property
    def scorer(self) -> bool:
        return JUDGES[self.settings.kind].scorer


def plan_judge(settings: Any, loaded: Any, latest_scorer: Mapping[str, Any] | None) -> JudgePlan:
    """`latest_scorer` is the models row of the run's most recent reward model before this
    round (None: none yet). The caller resolves `model_path` to a model id when the plan
    names a model without one."""
    if settings.kind == "reward_model" and settings.model == reward_model.LATEST:
        if latest_scorer is None:
            return plan_judge(settings.fallback, loaded["fallback"], None)
        resolved = settings.model_copy(update={"model": latest_scorer["path"]})
        return JudgePlan(resolved, loaded, latest_scorer["path"], latest_scorer["model_id"])
    return JudgePlan(settings, loaded, judge_model(settings))


def judge_candidates(
    judge: Judge,
    prompts: Sequence[Prompt],
    candidates: Sequence[Mapping[str, Any]],
    ctx: RoundContext,
    method: str,
) -> Rows:
    """Every sample the judge gives each usable candidate (generation rows), stored with its
    parse status; an unusable candidate (empty, too long) is a discard, never judged.
    `method` names who asked (the evaluation re-judges other methods' answers)."""
    by_id = {p.prompt_id: p for p in prompts}
    rows = Rows()
    todo = []
    for cand in candidates:
        reason = unusable(Completion(cand["text"], 0, cand["finish_reason"]))
        if reason:
            rows.discard(ctx, method, "judge", cand["generation_id"], reason)
            continue
        todo.append(cand)
    items = [
        JudgeItem(by_id[c["prompt_id"]].text, c["text"], by_id[c["prompt_id"]].conversation)
        for c in todo
    ]
    samples = judge.score(items) if items else []
    sampling_json = json.dumps(judge.sampling, sort_keys=True)
    for cand, judged in zip(todo, samples, strict=True):
        for k, sample in enumerate(judged):
            rows.add(
                "judgments",
                {
                    "judgment_id": row_id(
                        ctx.run_id, ctx.round, method, cand["generation_id"], judge.key, k
                    ),
                    "run_id": ctx.run_id,
                    "round": ctx.round,
                    "method": method,
                    "generation_id": cand["generation_id"],
                    "sample_idx": k,
                    "model_id": judge.model_id,
                    "judge_id": judge.judge_id,
                    "template_id": judge.template.template_id if judge.template else None,
                    "raw_output": sample.raw,
                    "score": sample.score,
                    "parse_status": sample.status,
                    "sampling_json": sampling_json,
                    "seed": ctx.seed,
                },
            )
    if judge.template is not None:
        rows.add("templates", judge.template.record())
    return rows
