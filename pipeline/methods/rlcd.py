"""RLCD (Yang et al. 2024): contrastive prompts p+ and p- that differ only in a descriptor
produce the chosen (o+) and rejected (o-) answers, labelled by construction. The Rescore
variant asks the model which of the two is better and stores that soft label.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.engines.base import Conversation, Engine
from pipeline.judging.labels import PREFERENCE_VARS, ask_choices, comparison_row
from pipeline.judging.parsing import choice_parser
from pipeline.methods.common import MethodConfig, Resource, load_resource
from pipeline.rows import (
    RoundContext,
    Rows,
    generation_row,
    pair_row,
    same_answer,
    sampling_from,
    unusable,
)
from pipeline.schema import SamplingConfig
from pipeline.seeds import Prompt
from pipeline.templates import Template, TemplateLibrary

METHOD = "rlcd"
VARIANT = "contrastive"
FLAG_RESCORE = "rescore_prefers_rejected"


class RlcdConfig(MethodConfig):
    # Descriptor files (prompts/rlcd/<task>.yaml, or paths to YAML files). A prompt uses
    # the task its prompt file gives it, else `default_task`.
    tasks: list[str] = Field(["harmlessness", "helpfulness"], min_length=1)
    # The descriptor file of a prompt that names no task.
    default_task: str = "helpfulness"
    # system: the descriptor is a system instruction about the next reply (chat models
    # follow system prompts); assistant_tag: it opens the assistant's turn, as in the paper.
    placement: Literal["system", "assistant_tag"] = "system"
    # How o+ and o- are sampled (the paper: T 1.0, 300 tokens).
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=300)
    # RLCD-Rescore: ask the model which side is better and store it as a soft label.
    rescore: bool = False
    # Rescore's A/B question template.
    rescore_template: str = "choice_ab"

    @model_validator(mode="after")
    def _default_listed(self) -> "RlcdConfig":
        names = [Path(t).stem for t in self.tasks]
        if self.default_task not in names:
            raise ValueError(f"default_task {self.default_task!r} is not one of tasks {names}")
        return self


class DescriptorPair(Resource):
    id: str
    positive: str = Field(min_length=1)
    negative: str = Field(min_length=1)


class Task(Resource):
    """One descriptor file: prompts/rlcd/<task>.yaml."""

    task: str
    rescore_question: str
    pairs: list[DescriptorPair] = Field(min_length=1)


def load_tasks(names: Sequence[str]) -> dict[str, Task]:
    """Descriptor files by task name (prompts/rlcd/<name>.yaml) or by path."""
    tasks = {}
    for name in names:
        task, _ = load_resource(name, Task, "rlcd")
        tasks[Path(name).stem] = task
    return tasks


def contrastive_prompts(
    prompt: Prompt,
    pair: DescriptorPair,
    placement: str,
    system: Template,
    tag: Template,
) -> tuple[tuple[Conversation, str], tuple[Conversation, str]]:
    """(conversation, assistant prefix) for p+ and for p-.

    They differ only in the descriptor. Earlier assistant turns carry the opposite
    descriptor, as in the paper, so the contrast is about the reply being written.
    """

    def build(this: str, other: str) -> tuple[Conversation, str]:
        messages = []
        for role, content in prompt.messages:
            if role == "assistant":
                content = f"{tag.render(descriptor=other)} {content}"
            messages.append({"role": role, "content": content})
        if placement == "assistant_tag":
            return messages, f"{tag.render(descriptor=this)} "
        instruction = system.render(descriptor=this)
        if messages[0]["role"] == "system":
            merged = f"{messages[0]['content']}\n\n{instruction}"
            messages[0] = {"role": "system", "content": merged}
        else:
            messages.insert(0, {"role": "system", "content": instruction})
        return messages, ""

    return build(pair.positive, pair.negative), build(pair.negative, pair.positive)


def _contrastive_requests(
    templates: dict[str, Template],
    tasks: dict[str, Task],
    prompts: Sequence[Prompt],
    ctx: RoundContext,
    cfg: RlcdConfig,
    rows: Rows,
) -> tuple[list[tuple[Conversation, str]], list[tuple[Prompt, Task, DescriptorPair, dict]]]:
    """p+ and p- for every prompt whose task is enabled (one descriptor pair drawn per
    prompt), with each prompt's plan: its task, descriptor pair and provenance."""
    enabled = {Path(t).stem for t in cfg.tasks} & set(tasks)
    requests, plans = [], []
    for prompt in prompts:
        task_name = prompt.task or cfg.default_task
        if task_name not in enabled:
            rows.discard(ctx, METHOD, "prompts", prompt.prompt_id, "task_not_enabled", task_name)
            continue
        task = tasks[task_name]
        pair = ctx.rng(METHOD, prompt.prompt_id).choice(task.pairs)
        positive, negative = contrastive_prompts(
            prompt, pair, cfg.placement, templates["system"], templates["assistant_tag"]
        )
        requests += [positive, negative]
        meta = {"task": task_name, "descriptor_id": pair.id, "placement": cfg.placement}
        plans.append((prompt, task, pair, meta))
    return requests, plans


def run_rlcd(
    engine: Engine,
    templates: dict[str, Template],
    tasks: dict[str, Task],
    prompts: Sequence[Prompt],
    ctx: RoundContext,
    cfg: RlcdConfig,
) -> Rows:
    """One batch: o+ and o- for every prompt in one engine call, then pairs (and the
    Rescore labels when enabled). `templates` holds system, assistant_tag and rescore."""
    rows = Rows()
    rows.add("prompts", *(p.record(ctx.run_id, ctx.round) for p in prompts))
    rows.add("templates", *(t.record() for t in templates.values()))
    params = sampling_from(cfg.sampling)
    requests, plans = _contrastive_requests(templates, tasks, prompts, ctx, cfg, rows)
    outputs = engine.generate([c for c, _ in requests], params, [p for _, p in requests])
    template = templates["system" if cfg.placement == "system" else "assistant_tag"]
    made = []
    for i, (prompt, task, pair, meta) in enumerate(plans):
        pos, neg = (
            generation_row(
                ctx,
                METHOD,
                prompt.prompt_id,
                role,
                0,
                completion,
                params,
                template=template,
                meta={**meta, "descriptor": descriptor},
            )
            for role, descriptor, [completion] in (
                ("positive", pair.positive, outputs[2 * i]),
                ("negative", pair.negative, outputs[2 * i + 1]),
            )
        )
        rows.add("generations", pos, neg)
        reason = unusable(outputs[2 * i][0]) or unusable(outputs[2 * i + 1][0])
        if reason is None and same_answer(pos["text"], neg["text"]):
            reason = "identical"
        if reason:
            rows.discard(ctx, METHOD, "pairs", prompt.prompt_id, reason)
            continue
        # The pair's prompt is the neutral one: descriptors never reach training data.
        ids = (pos["generation_id"], neg["generation_id"])
        made.append((prompt, task, pair_row(ctx, METHOD, VARIANT, prompt, *ids), pos, neg))
    if cfg.rescore and made:
        rows.merge(rescore(engine, templates["rescore"], made, ctx))
    rows.add("pairs", *(m[2] for m in made))
    return rows


def rescore(
    engine: Engine,
    template: Template,
    made: Sequence[tuple[Prompt, Task, dict[str, Any], dict, dict]],
    ctx: RoundContext,
) -> Rows:
    """RLCD-Rescore: o+ and o- in a seeded random (A)/(B) order; the soft label is the
    probability that o+ is better. A pair whose rescoring prefers o- is flagged."""
    rows = Rows()
    questions, orders = [], []
    for prompt, task, _, pos, neg in made:
        swap = ctx.rng(METHOD, "rescore_order", prompt.prompt_id).random() < 0.5
        a, b = (neg, pos) if swap else (pos, neg)
        orders.append((swap, a, b))
        questions.append(
            {
                "instruction": prompt.text,
                "response_a": a["text"],
                "response_b": b["text"],
                "principle": task.rescore_question,
            }
        )
    probs, _ = ask_choices(engine, template, questions)
    for (prompt, task, pair, _, _), (swap, a, b), p in zip(made, orders, probs, strict=True):
        prob_a = None if p is None else p[0]
        rows.add(
            "comparisons",
            comparison_row(
                ctx,
                METHOD,
                ("rescore", prompt.prompt_id),
                prompt.prompt_id,
                a,
                b,
                prob_a,
                template,
                ctx.model_id,
                principle_id=task.task,
                meta={"order": "negative_first" if swap else "positive_first"},
            ),
        )
        if prob_a is None:
            pair.update(flagged=True, flag_reason="rescore_prompt_too_long")
            continue
        label = 1.0 - prob_a if swap else prob_a
        pair["soft_label"] = label
        if label < 0.5:
            pair.update(flagged=True, flag_reason=FLAG_RESCORE)
    return rows


def rlcd_templates(library: TemplateLibrary, cfg: RlcdConfig) -> dict[str, Template]:
    """The templates a run uses, loaded (and checked) before any generation."""
    out = {
        "system": library.get("rlcd_system").expect("descriptor", ["descriptor"]),
        "assistant_tag": library.get("rlcd_assistant_tag").expect("descriptor", ["descriptor"]),
    }
    if cfg.rescore:
        out["rescore"] = library.get(cfg.rescore_template)
        choice_parser(out["rescore"])
        out["rescore"].expect("preference", PREFERENCE_VARS)
    return out


def load(cfg: RlcdConfig, library: TemplateLibrary) -> dict[str, Any]:
    """Templates and descriptor files, read and checked before any engine starts."""
    return {"templates": rlcd_templates(library, cfg), "tasks": load_tasks(cfg.tasks)}


def run(engine: Engine, loaded: dict[str, Any], prompts, ctx, cfg: RlcdConfig, judge) -> Rows:
    return run_rlcd(engine, loaded["templates"], loaded["tasks"], prompts, ctx, cfg)


def record_policy(cfg: RlcdConfig) -> dict[str, Any]:
    return {
        "rule": "positive_over_negative",
        "rescore": cfg.rescore,
        "placement": cfg.placement,
        "drop": ["empty", "identical"],
    }
