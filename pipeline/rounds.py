"""What a round needs, loaded and checked once before any engine starts, and the round's
prompt selection. The flows call these; they hold no Prefect."""

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pipeline.config import RunConfig
from pipeline.engines.base import Engine
from pipeline.errors import ConfigError
from pipeline.hashing import row_id
from pipeline.methods import cai, rlcd, self_reward
from pipeline.methods.common import RoundContext, Rows, choice_parser
from pipeline.seeds import Prompt, load_prompts
from pipeline.templates import Template, TemplateLibrary

METHODS = ("self_reward", "rlcd", "cai")
# What each role's template is rendered with.
JUDGE_VARS = ("instruction", "response")
PAIRWISE_VARS = ("instruction", "response_a", "response_b")


@dataclass
class RoundInputs:
    """Everything read from files: templates, descriptors, constitution, seed prompts."""

    train_prompts: list[Prompt]
    heldout_prompts: list[Prompt]
    duplicate_prompts: int = 0  # the same messages twice across the files: used once
    judge: Template | None = None
    self_instruct: Template | None = None
    rlcd_templates: dict[str, Template] = field(default_factory=dict)
    rlcd_tasks: dict[str, rlcd.Task] = field(default_factory=dict)
    cai_templates: dict[str, Template] = field(default_factory=dict)
    constitution: cai.Constitution | None = None
    eval_judge: Template | None = None

    def templates(self) -> list[Template]:
        found = [self.judge, self.self_instruct, self.eval_judge, *self.rlcd_templates.values()]
        return [t for t in found + list(self.cai_templates.values()) if t is not None]


def load_inputs(cfg: RunConfig) -> RoundInputs:
    """Read and check every input file the config names; errors name the file and field."""
    library = TemplateLibrary()
    prompts: list[Prompt] = []
    for path in cfg.prompts.files:
        prompts += load_prompts(path)
    unique = list({p.prompt_id: p for p in prompts}.values())
    files = ", ".join(map(str, cfg.prompts.files))
    if not unique:
        raise ConfigError(f"{files}: no prompts (prompts.files must name at least one prompt)")
    if len(unique) <= cfg.prompts.heldout:
        raise ConfigError(
            f"prompts.heldout: {cfg.prompts.heldout} held-out prompts leave none of the "
            f"{len(unique)} prompts in {files} for training"
        )
    # Held-out prompts (for evaluation) are chosen by hash: stable as files grow.
    ranked = sorted(unique, key=lambda p: row_id("heldout", cfg.seed, p.prompt_id))
    heldout_ids = {p.prompt_id for p in ranked[: cfg.prompts.heldout]}
    inputs = RoundInputs(
        train_prompts=[p for p in unique if p.prompt_id not in heldout_ids],
        heldout_prompts=[p for p in unique if p.prompt_id in heldout_ids],
        duplicate_prompts=len(prompts) - len(unique),
    )
    if cfg.self_reward.enabled:
        # The parser first: a template of the wrong kind is named as such.
        inputs.judge = library.get(cfg.self_reward.judge_template)
        self_reward.judge_parser(inputs.judge)
        inputs.judge.expect("judge", JUDGE_VARS)
        if cfg.self_reward.self_instruct.enabled:
            template = library.get(cfg.self_reward.self_instruct.template)
            inputs.self_instruct = template.expect("self-instruct", ["examples"])
    if cfg.rlcd.enabled:
        inputs.rlcd_templates = rlcd.rlcd_templates(library, cfg.rlcd)
        inputs.rlcd_tasks = rlcd.load_tasks(cfg.rlcd.tasks)
    if cfg.cai.enabled:
        inputs.cai_templates = cai.cai_templates(library, cfg.cai)
        inputs.constitution, _ = cai.load_constitution(cfg.cai.constitution)
    if cfg.evaluation.enabled:
        inputs.eval_judge = library.get(cfg.evaluation.judge_template)
        choice_parser(inputs.eval_judge)
        inputs.eval_judge.expect("pairwise judge", PAIRWISE_VARS)
    return inputs


@lru_cache(maxsize=4)
def inputs_for(config_json: str) -> RoundInputs:
    """Per process, once: tasks get the config as JSON and load inputs here."""
    return load_inputs(RunConfig.model_validate_json(config_json))


def round_prompts(inputs: RoundInputs, cfg: RunConfig, round_: int) -> list[Prompt]:
    """The round's seed prompts: `per_round` of them drawn by the run's seed and the round
    (all of them when per_round is unset), in a stable order."""
    pool = inputs.train_prompts
    if cfg.prompts.per_round is None or cfg.prompts.per_round >= len(pool):
        return list(pool)
    ranked = sorted(pool, key=lambda p: row_id("round", cfg.seed, cfg.name, round_, p.prompt_id))
    return ranked[: cfg.prompts.per_round]


def prompt_from_row(row: dict[str, Any]) -> Prompt:
    return Prompt.from_messages(
        json.loads(row["messages_json"]),
        task=row.get("task"),
        source=row["source"],
        generation_id=row.get("generation_id"),
    )


def run_method(
    method: str,
    engine: Engine,
    judge_engine: Engine | None,
    inputs: RoundInputs,
    prompts: list[Prompt],
    ctx: RoundContext,
    cfg: RunConfig,
    judge_model_id: str | None = None,
) -> Rows:
    """One batch of one method."""
    if method == "self_reward":
        return self_reward.run_self_reward(
            engine,
            judge_engine or engine,
            inputs.judge,
            prompts,
            ctx,
            cfg.self_reward,
            judge_model_id,
        )
    if method == "rlcd":
        return rlcd.run_rlcd(
            engine, inputs.rlcd_templates, inputs.rlcd_tasks, prompts, ctx, cfg.rlcd
        )
    if method == "cai":
        return cai.run_cai(engine, inputs.cai_templates, inputs.constitution, prompts, ctx, cfg.cai)
    raise ValueError(f"unknown method {method!r}")


def pair_policies(cfg: RunConfig) -> dict[str, Any]:
    """How each enabled method turns generations into pairs, stored with the round."""
    out: dict[str, Any] = {}
    if cfg.self_reward.enabled:
        out["self_reward"] = {
            **self_reward.PairPolicy.from_config(cfg.self_reward).record(),
            "judge_template": cfg.self_reward.judge_template,
            "judge_samples": cfg.self_reward.judge_samples,
        }
    if cfg.rlcd.enabled:
        out["rlcd"] = {
            "rule": "positive_over_negative",
            "rescore": cfg.rlcd.rescore,
            "placement": cfg.rlcd.placement,
            "drop": ["empty", "identical"],
        }
    if cfg.cai.enabled:
        out["cai"] = {
            "rule": "final_revision_over_initial",
            "revisions": cfg.cai.revisions,
            "feedback": cfg.cai.feedback,
            "feedback_cot": cfg.cai.feedback_cot,
        }
    return out
