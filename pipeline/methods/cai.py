"""Constitutional AI (Bai et al. 2022): critique and revise answers against sampled
principles (SL-CAI), and label which of two answers is better with AI feedback (RL-CAI).

The constitution (principles and few-shot demonstrations) is a YAML file; the wrapping
text is in templates. All prompts advance one step per engine call.
"""

from collections.abc import Sequence
from typing import Any

from pydantic import Field, model_validator

from pipeline.engines.base import Conversation, Engine, Sampling
from pipeline.hashing import row_id
from pipeline.judging.labels import PREFERENCE_VARS, ask_both_orders, comparison_row, first_better
from pipeline.judging.parsing import choice_parser
from pipeline.methods.common import MethodConfig, Resource, load_resource
from pipeline.rows import (
    RoundContext,
    Rows,
    generation_row,
    normalise_text,
    pair_row,
    same_answer,
    sampling_from,
    unusable,
)
from pipeline.schema import SamplingConfig
from pipeline.seeds import Prompt
from pipeline.templates import Template, TemplateLibrary

METHOD = "cai"


class CaiConfig(MethodConfig):
    # A name in prompts/ (constitution -> prompts/constitution.yaml) or a path to YAML.
    constitution: str = "constitution"
    revisions: int = Field(1, ge=1, le=4)
    few_shot: int = Field(2, ge=0)
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=256)
    critique_template: str = "cai_critique"
    revision_template: str = "cai_revision"
    feedback: bool = True
    feedback_cot: bool = False
    feedback_template: str = "choice_ab"
    feedback_cot_template: str = "choice_ab_cot"
    # Chain-of-thought labels are overconfident; the paper clamps them to [0.4, 0.6].
    cot_clamp: tuple[float, float] = (0.4, 0.6)


class PrinciplePair(Resource):
    id: str
    critique: str = Field(min_length=1)
    revision: str = Field(min_length=1)


class FeedbackPrinciple(Resource):
    id: str
    text: str = Field(min_length=1)


class Demonstration(Resource):
    prompt: str
    response: str
    principle: str
    critique: str
    revision: str


class Constitution(Resource):
    name: str
    critique_revision: list[PrinciplePair] = Field(min_length=1)
    feedback: list[FeedbackPrinciple] = Field(min_length=1)
    demonstrations: list[Demonstration] = []

    @model_validator(mode="after")
    def _check(self) -> "Constitution":
        for kind in (self.critique_revision, self.feedback):
            ids = [p.id for p in kind]
            if len(set(ids)) != len(ids):
                raise ValueError(f"principle ids must be unique: {ids}")
        known = {p.id for p in self.critique_revision}
        for d in self.demonstrations:
            if d.principle not in known:
                raise ValueError(
                    f"demonstration principle {d.principle!r} is not in critique_revision"
                )
        return self

    def principle(self, principle_id: str) -> PrinciplePair:
        return next(p for p in self.critique_revision if p.id == principle_id)


def load_constitution(name_or_path: str) -> tuple[Constitution, str]:
    """prompts/<name>.yaml or a path; returns it with its content hash."""
    return load_resource(name_or_path, Constitution)


def sample_principles(
    constitution: Constitution, ctx: RoundContext, prompt_id: str, steps: int
) -> list[PrinciplePair]:
    """One critique/revision pair per step, drawn by the run's seed and the prompt."""
    rng = ctx.rng(METHOD, "principles", prompt_id)
    return [rng.choice(constitution.critique_revision) for _ in range(steps)]


def sample_feedback_principle(
    constitution: Constitution, ctx: RoundContext, prompt_id: str
) -> FeedbackPrinciple:
    return ctx.rng(METHOD, "feedback", prompt_id).choice(constitution.feedback)


def _critique_turns(
    critique: Template, revision: Template, principle: PrinciplePair
) -> tuple[str, str]:
    return (
        critique.render(request=principle.critique),
        revision.render(request=principle.revision),
    )


def few_shot(
    constitution: Constitution, critique: Template, revision: Template, k: int
) -> Conversation:
    """The first k demonstrations as earlier turns of the conversation."""
    turns: Conversation = []
    for demo in constitution.demonstrations[:k]:
        ask_critique, ask_revision = _critique_turns(
            critique, revision, constitution.principle(demo.principle)
        )
        turns += [
            {"role": "user", "content": demo.prompt},
            {"role": "assistant", "content": demo.response},
            {"role": "user", "content": ask_critique},
            {"role": "assistant", "content": demo.critique},
            {"role": "user", "content": ask_revision},
            {"role": "assistant", "content": demo.revision},
        ]
    return turns


def with_shots(shots: Conversation, conversation: Conversation) -> Conversation:
    """Demonstrations go after the prompt's system message (if any), before its turns."""
    system = [m for m in conversation if m["role"] == "system"]
    return system + shots + [m for m in conversation if m["role"] != "system"]


def revision_problem(
    answer: str, critique: str, revision: str, requests: Sequence[str]
) -> str | None:
    """Why a revision is unusable: empty, unchanged, or echoing the critique or the
    instructions instead of rewriting the answer."""
    text = normalise_text(revision)
    if not text:
        return "empty_revision"
    if text == normalise_text(answer):
        return "unchanged_revision"
    if text == normalise_text(critique) or any(normalise_text(r) in text for r in requests):
        return "echoes_instructions"
    return None


def critique_revise(
    engine: Engine,
    templates: dict[str, Template],
    constitution: Constitution,
    prompts: Sequence[Prompt],
    ctx: RoundContext,
    cfg: CaiConfig,
) -> Rows:
    """SL-CAI: an initial answer, then K critique -> revision steps per prompt.

    Every step is stored (principle, critique, revision). A prompt stops at its first
    unusable revision; its last good revision is the final one. Outputs: SFT rows
    (prompt, final revision) and pairs (final revision chosen over the initial answer).
    """
    critique_t, revision_t = templates["critique"], templates["revision"]
    params = sampling_from(cfg.sampling)
    rows = Rows()
    shots = few_shot(constitution, critique_t, revision_t, cfg.few_shot)
    initial = engine.generate([with_shots(shots, p.conversation) for p in prompts], params)

    # State per prompt: (prompt, initial row, current row, principles); None once stopped.
    active: list[tuple[Prompt, dict, dict, list[PrinciplePair]]] = []
    for prompt, [completion] in zip(prompts, initial, strict=True):
        row = generation_row(ctx, METHOD, prompt.prompt_id, "initial", 0, completion, params)
        rows.add("generations", row)
        reason = unusable(completion)
        if reason:
            rows.discard(ctx, METHOD, "initial", prompt.prompt_id, reason)
            continue
        active.append(
            (
                prompt,
                row,
                row,
                sample_principles(constitution, ctx, prompt.prompt_id, cfg.revisions),
            )
        )

    final: dict[str, tuple[Prompt, dict, dict]] = {}
    for step in range(cfg.revisions):
        if not active:
            break
        asks = [
            _critique_turns(critique_t, revision_t, principles[step]) for *_, principles in active
        ]
        base = [
            with_shots(shots, p.conversation) + [{"role": "assistant", "content": cur["text"]}]
            for p, _, cur, _ in active
        ]
        critiques = engine.generate(
            [b + [{"role": "user", "content": a[0]}] for b, a in zip(base, asks, strict=True)],
            params,
        )
        revisions = engine.generate(
            [
                b
                + [
                    {"role": "user", "content": a[0]},
                    {"role": "assistant", "content": c[0].text},
                    {"role": "user", "content": a[1]},
                ]
                for b, a, c in zip(base, asks, critiques, strict=True)
            ],
            params,
        )
        still = []
        for (prompt, init, cur, principles), ask, [crit], [rev] in zip(
            active, asks, critiques, revisions, strict=True
        ):
            principle = principles[step]
            rev_row = generation_row(
                ctx,
                METHOD,
                prompt.prompt_id,
                "revision",
                0,
                rev,
                params,
                template=revision_t,
                parent_id=cur["generation_id"],
                meta={
                    "step": step,
                    "principle_id": principle.id,
                    "constitution": constitution.name,
                },
                key=(step,),
            )
            rows.add("generations", rev_row)
            rows.add(
                "critiques",
                {
                    "critique_id": row_id(ctx.run_id, ctx.round, METHOD, prompt.prompt_id, step),
                    "run_id": ctx.run_id,
                    "round": ctx.round,
                    "prompt_id": prompt.prompt_id,
                    "step": step,
                    "principle_id": principle.id,
                    "input_generation_id": cur["generation_id"],
                    "critique": crit.text,
                    "revision_generation_id": rev_row["generation_id"],
                    "model_id": ctx.model_id,
                    "template_id": critique_t.template_id,
                },
            )
            if unusable(crit):
                reason = "empty_critique"
            else:
                reason = revision_problem(cur["text"], crit.text, rev.text, ask)
            if reason:
                rows.discard(ctx, METHOD, "revision", rev_row["generation_id"], reason)
                continue
            final[prompt.prompt_id] = (prompt, init, rev_row)
            still.append((prompt, init, rev_row, principles))
        active = still

    for prompt, init, rev_row in final.values():
        rows.add(
            "sft_examples",
            {
                "sft_id": row_id(ctx.run_id, ctx.round, METHOD, "sft", prompt.prompt_id),
                "run_id": ctx.run_id,
                "round": ctx.round,
                "method": METHOD,
                "prompt_id": prompt.prompt_id,
                "generation_id": rev_row["generation_id"],
            },
        )
        rows.add(
            "pairs",
            pair_row(
                ctx, METHOD, "revision", prompt, rev_row["generation_id"], init["generation_id"]
            ),
        )
    for prompt in prompts:
        if prompt.prompt_id not in final:
            rows.discard(ctx, METHOD, "pairs", prompt.prompt_id, "no_usable_revision")
    return rows


def ai_feedback(
    engine: Engine,
    template: Template,
    constitution: Constitution,
    prompts: Sequence[Prompt],
    ctx: RoundContext,
    cfg: CaiConfig,
) -> Rows:
    """RL-CAI: two answers per prompt, one sampled feedback principle, the multiple-choice
    question asked in both orders; the soft label averages the two to cancel position
    bias. A chain-of-thought template's labels are clamped to `cfg.cot_clamp`."""
    parser = choice_parser(template)
    params = sampling_from(cfg.sampling, n=2)
    answers = engine.generate([p.conversation for p in prompts], params)
    rows = Rows()
    plans = []
    for prompt, completions in zip(prompts, answers, strict=True):
        pair = [
            generation_row(ctx, METHOD, prompt.prompt_id, "feedback_answer", k, c, params)
            for k, c in enumerate(completions)
        ]
        rows.add("generations", *pair)
        reason = unusable(completions[0]) or unusable(completions[1])
        if reason is None and same_answer(pair[0]["text"], pair[1]["text"]):
            reason = "identical"
        if reason:
            rows.discard(ctx, METHOD, "feedback", prompt.prompt_id, reason)
            continue
        plans.append((prompt, pair, sample_feedback_principle(constitution, ctx, prompt.prompt_id)))
    cot = parser.reasoning_prefix is not None
    answers_asked = ask_both_orders(
        engine,
        template,
        [
            {"instruction": prompt.text, "principle": principle.text}
            for prompt, _, principle in plans
        ],
        [x for _, (x, _), _ in plans],
        [y for _, (_, y), _ in plans],
        Sampling(temperature=0.0, max_tokens=cfg.sampling.max_tokens),
    )
    low, high = cfg.cot_clamp
    for (prompt, (x, y), principle), (probs, reasoning) in zip(plans, answers_asked, strict=True):
        if cot:
            probs = tuple(None if p is None else min(max(p, low), high) for p in probs)
        for order, (a, b) in enumerate(((x, y), (y, x))):
            rows.add(
                "comparisons",
                comparison_row(
                    ctx,
                    METHOD,
                    ("feedback", prompt.prompt_id, order),
                    prompt.prompt_id,
                    a,
                    b,
                    probs[order],
                    template,
                    ctx.model_id,
                    principle_id=principle.id,
                    raw_output=reasoning[order],
                    meta={"order": order, "cot": cot},
                ),
            )
        first = [p for p in first_better(probs) if p is not None]
        if len(first) < 2:
            rows.discard(ctx, METHOD, "feedback", prompt.prompt_id, "prompt_too_long")
            continue
        label = sum(first) / 2
        if label == 0.5:
            rows.discard(ctx, METHOD, "feedback", prompt.prompt_id, "tie")
            continue
        chosen, rejected = (x, y) if label > 0.5 else (y, x)
        rows.add(
            "pairs",
            pair_row(
                ctx,
                METHOD,
                "feedback",
                prompt,
                chosen["generation_id"],
                rejected["generation_id"],
                soft_label=max(label, 1.0 - label),
            ),
        )
    return rows


def cai_templates(library: TemplateLibrary, cfg: CaiConfig) -> dict[str, Template]:
    """The templates a run uses, loaded (and checked) before any generation."""
    out = {
        "critique": library.get(cfg.critique_template).expect("critique", ["request"]),
        "revision": library.get(cfg.revision_template).expect("revision", ["request"]),
    }
    if cfg.feedback:
        feedback = library.get(
            cfg.feedback_cot_template if cfg.feedback_cot else cfg.feedback_template
        )
        choice_parser(feedback)
        out["feedback"] = feedback.expect("preference", PREFERENCE_VARS)
    return out


def run_cai(
    engine: Engine,
    templates: dict[str, Template],
    constitution: Constitution,
    prompts: Sequence[Prompt],
    ctx: RoundContext,
    cfg: CaiConfig,
) -> Rows:
    """One batch: critique-revision, then AI feedback when enabled."""
    rows = Rows()
    rows.add("prompts", *(p.record(ctx.run_id, ctx.round) for p in prompts))
    rows.add("templates", *(t.record() for t in templates.values()))
    rows.merge(critique_revise(engine, templates, constitution, prompts, ctx, cfg))
    if cfg.feedback:
        rows.merge(ai_feedback(engine, templates["feedback"], constitution, prompts, ctx, cfg))
    return rows


def load(cfg: CaiConfig, library: TemplateLibrary) -> dict[str, Any]:
    """Templates and the constitution, read and checked before any engine starts."""
    return {
        "templates": cai_templates(library, cfg),
        "constitution": load_constitution(cfg.constitution)[0],
    }


def run(engine: Engine, loaded: dict[str, Any], prompts, ctx, cfg: CaiConfig, judge) -> Rows:
    return run_cai(engine, loaded["templates"], loaded["constitution"], prompts, ctx, cfg)


def record_policy(cfg: CaiConfig) -> dict[str, Any]:
    return {
        "rule": "final_revision_over_initial",
        "revisions": cfg.revisions,
        "feedback": cfg.feedback,
        "feedback_cot": cfg.feedback_cot,
    }
