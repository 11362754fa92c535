"""Constitutional AI (Bai et al. 2022): critique and revise answers against sampled
principles (SL-CAI), and label which of two answers is better with AI feedback (RL-CAI).

The constitution (principles and few-shot demonstrations) is a YAML file; the wrapping
text is in templates. All prompts advance one step per engine call.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from pipeline.engines.base import Completion, Conversation, Engine, Sampling
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
    # Critique-revision steps per answer (the paper: up to 4).
    revisions: int = Field(1, ge=1, le=4)
    # Demonstrations from the constitution before each prompt.
    few_shot: int = Field(2, ge=0)
    # How answers, critiques and revisions are sampled.
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=256)
    # Wraps a principle's critique request.
    critique_template: str = "cai_critique"
    # Wraps a principle's revision request.
    revision_template: str = "cai_revision"
    # RL-CAI: label two answers by a sampled principle (both A/B orders).
    feedback: bool = True
    # Let the feedback judge reason first (labels clamped to cot_clamp).
    feedback_cot: bool = False
    # The feedback question's template.
    feedback_template: str = "choice_ab"
    # The chain-of-thought feedback template.
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


@dataclass
class Revising:
    """One prompt under critique and revision: its initial answer's row, its latest usable
    answer's row (the initial one until a revision is kept), and its sampled principles."""

    prompt: Prompt
    initial: dict[str, Any]
    current: dict[str, Any]
    principles: list[PrinciplePair]
    revised: bool = False

    def base(self, shots: Conversation) -> Conversation:
        """The conversation up to the current answer, after the demonstrations."""
        return with_shots(shots, self.prompt.conversation) + [
            {"role": "assistant", "content": self.current["text"]}
        ]


def _initial_answers(
    engine: Engine,
    shots: Conversation,
    prompts: Sequence[Prompt],
    ctx: RoundContext,
    cfg: CaiConfig,
    constitution: Constitution,
    rows: Rows,
) -> list[Revising]:
    """Each prompt's first answer (stored); the usable ones start revising."""
    params = sampling_from(cfg.sampling)
    initial = engine.generate([with_shots(shots, p.conversation) for p in prompts], params)
    active = []
    for prompt, [completion] in zip(prompts, initial, strict=True):
        row = generation_row(ctx, METHOD, prompt.prompt_id, "initial", 0, completion, params)
        rows.add("generations", row)
        reason = unusable(completion)
        if reason:
            rows.discard(ctx, METHOD, "initial", prompt.prompt_id, reason)
            continue
        principles = sample_principles(constitution, ctx, prompt.prompt_id, cfg.revisions)
        active.append(Revising(prompt, row, row, principles))
    return active


def _critiques_and_revisions(
    engine: Engine,
    active: list[Revising],
    asks: list[tuple[str, str]],
    shots: Conversation,
    params: Sampling,
) -> tuple[list[list[Completion]], list[list[Completion]]]:
    """One critique per active prompt, then one revision given that critique."""
    bases = [a.base(shots) for a in active]
    critiques = engine.generate(
        [b + [{"role": "user", "content": ask[0]}] for b, ask in zip(bases, asks, strict=True)],
        params,
    )
    revisions = engine.generate(
        [
            b
            + [
                {"role": "user", "content": ask[0]},
                {"role": "assistant", "content": c[0].text},
                {"role": "user", "content": ask[1]},
            ]
            for b, ask, c in zip(bases, asks, critiques, strict=True)
        ],
        params,
    )
    return critiques, revisions


def _revision_step(
    engine: Engine,
    templates: dict[str, Template],
    constitution: Constitution,
    active: list[Revising],
    step: int,
    shots: Conversation,
    ctx: RoundContext,
    params: Sampling,
    rows: Rows,
) -> list[Revising]:
    """Critique and revise every active prompt once; every step is stored, a prompt stops
    at its first unusable revision. Returns the prompts that go on."""
    critique_t, revision_t = templates["critique"], templates["revision"]
    asks = [_critique_turns(critique_t, revision_t, a.principles[step]) for a in active]
    critiques, revisions = _critiques_and_revisions(engine, active, asks, shots, params)
    still = []
    for a, ask, [crit], [rev] in zip(active, asks, critiques, revisions, strict=True):
        principle = a.principles[step]
        meta = {"step": step, "principle_id": principle.id, "constitution": constitution.name}
        rev_row = generation_row(
            ctx,
            METHOD,
            a.prompt.prompt_id,
            "revision",
            0,
            rev,
            params,
            template=revision_t,
            parent_id=a.current["generation_id"],
            meta=meta,
            key=(step,),
        )
        rows.add("generations", rev_row)
        rows.add("critiques", _critique_row(ctx, a, step, principle, crit, rev_row, critique_t))
        reason = "empty_critique" if unusable(crit) else None
        reason = reason or revision_problem(a.current["text"], crit.text, rev.text, ask)
        if reason:
            rows.discard(ctx, METHOD, "revision", rev_row["generation_id"], reason)
            continue
        a.current, a.revised = rev_row, True
        still.append(a)
    return still


def _critique_row(
    ctx: RoundContext,
    a: Revising,
    step: int,
    principle: PrinciplePair,
    critique: Completion,
    revision: dict[str, Any],
    template: Template,
) -> dict[str, Any]:
    return {
        "critique_id": row_id(ctx.run_id, ctx.round, METHOD, a.prompt.prompt_id, step),
        "run_id": ctx.run_id,
        "round": ctx.round,
        "prompt_id": a.prompt.prompt_id,
        "step": step,
        "principle_id": principle.id,
        "input_generation_id": a.current["generation_id"],
        "critique": critique.text,
        "revision_generation_id": revision["generation_id"],
        "model_id": ctx.model_id,
        "template_id": template.template_id,
    }


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
    rows = Rows()
    shots = few_shot(constitution, templates["critique"], templates["revision"], cfg.few_shot)
    active = _initial_answers(engine, shots, prompts, ctx, cfg, constitution, rows)
    revising = list(active)
    params = sampling_from(cfg.sampling)
    for step in range(cfg.revisions):
        if not revising:
            break
        revising = _revision_step(
            engine, templates, constitution, revising, step, shots, ctx, params, rows
        )
    revised = {a.prompt.prompt_id: a for a in active if a.revised}
    for a in revised.values():
        prompt_id, final = a.prompt.prompt_id, a.current["generation_id"]
        rows.add(
            "sft_examples",
            {
                "sft_id": row_id(ctx.run_id, ctx.round, METHOD, "sft", prompt_id),
                "run_id": ctx.run_id,
                "round": ctx.round,
                "method": METHOD,
                "prompt_id": prompt_id,
                "generation_id": final,
            },
        )
        pair = pair_row(ctx, METHOD, "revision", a.prompt, final, a.initial["generation_id"])
        rows.add("pairs", pair)
    for prompt in prompts:
        if prompt.prompt_id not in revised:
            rows.discard(ctx, METHOD, "pairs", prompt.prompt_id, "no_usable_revision")
    return rows


def _two_answers(
    engine: Engine, prompts: Sequence[Prompt], ctx: RoundContext, cfg: CaiConfig, rows: Rows
) -> list[tuple[Prompt, list[dict[str, Any]]]]:
    """Two sampled answers per prompt (stored); the usable, different ones go on."""
    params = sampling_from(cfg.sampling, n=2)
    answers = engine.generate([p.conversation for p in prompts], params)
    kept = []
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
        kept.append((prompt, pair))
    return kept


def _labelled(
    ctx: RoundContext,
    template: Template,
    prompt: Prompt,
    sides: list[dict[str, Any]],
    principle: FeedbackPrinciple,
    asked: tuple[list[float | None], list[str | None]],
    cot: bool,
    rows: Rows,
) -> None:
    """Store both orders' questions, then the pair their mean label gives (or a discard:
    unanswered, or a tie)."""
    (x, y), (probs, reasoning) = sides, asked
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
        return
    label = sum(first) / 2
    if label == 0.5:
        rows.discard(ctx, METHOD, "feedback", prompt.prompt_id, "tie")
        return
    chosen, rejected = (x, y) if label > 0.5 else (y, x)
    soft = max(label, 1.0 - label)
    ids = (chosen["generation_id"], rejected["generation_id"])
    rows.add("pairs", pair_row(ctx, METHOD, "feedback", prompt, *ids, soft_label=soft))


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
    cot = choice_parser(template).reasoning_prefix is not None
    rows = Rows()
    kept = _two_answers(engine, prompts, ctx, cfg, rows)
    principles = [sample_feedback_principle(constitution, ctx, p.prompt_id) for p, _ in kept]
    asked = ask_both_orders(
        engine,
        template,
        [
            {"instruction": p.text, "principle": q.text}
            for (p, _), q in zip(kept, principles, strict=True)
        ],
        [x for _, (x, _) in kept],
        [y for _, (_, y) in kept],
        Sampling(temperature=0.0, max_tokens=cfg.sampling.max_tokens),
    )
    low, high = cfg.cot_clamp
    for (prompt, sides), principle, (probs, reasoning) in zip(kept, principles, asked, strict=True):
        if cot:
            probs = tuple(None if p is None else min(max(p, low), high) for p in probs)
        _labelled(ctx, template, prompt, sides, principle, (probs, reasoning), cot, rows)
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
