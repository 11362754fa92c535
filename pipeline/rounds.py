"""A round as the library sees it: its inputs, read and checked once before any engine
starts; the round's prompts; one batch of one method; the snapshot folder. The flows call
these and hold the only Prefect; nothing here names a method, judge kind or training kind:
the registries answer for them.

`RoundInputs` carries every text a batch needs (templates, descriptor files, constitution,
prompts), so a batch task runs from its arguments alone, on any machine.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.engines.base import Engine
from pipeline.errors import ConfigError
from pipeline.evaluation.stages import relabel_pairs
from pipeline.hashing import row_id
from pipeline.judging import JudgePlan, build_judge, load_judge, plan_judge
from pipeline.judging.labels import PAIRWISE_VARS
from pipeline.judging.parsing import choice_parser
from pipeline.methods import METHODS
from pipeline.prompt_datasets import load_dataset_prompts
from pipeline.rows import RoundContext, Rows
from pipeline.seeds import Prompt, load_prompts
from pipeline.self_instruct import SelfInstructConfig, write_new_prompts
from pipeline.self_instruct import load as load_self_instruct
from pipeline.templates import Template, TemplateLibrary
from pipeline.training.kinds import TRAINING_KINDS
from pipeline.training.step import load_reward, scorer_before
from pipeline.verifiable.prompts import SEEN, Checked, load_checked


@dataclass
class RoundInputs:
    """Everything read from files: prompts, and what each enabled method, its judge,
    self-instruct and the evaluation's judge loaded."""

    train_prompts: list[Prompt]
    heldout_prompts: list[Prompt]
    duplicate_prompts: int = 0  # the same messages twice across the files: used once
    methods: dict[str, Any] = field(default_factory=dict)  # name -> what its `load` returned
    judges: dict[str, Any] = field(default_factory=dict)  # name -> its judge's loaded files
    # An online RL step's kind -> its reward judge's loaded files.
    rewards: dict[str, Any] = field(default_factory=dict)
    self_instruct: Template | None = None
    eval_judge: Template | None = None
    # The yardstick's prompts with their check specs and topics (evaluation.yardstick), per
    # split: "seen" (its `prompts` file) first, then its `splits` in order.
    yardstick: dict[str, list[Checked]] = field(default_factory=dict)

    def templates(self) -> list[Template]:
        """Every template the round uses (for the snapshot and provenance)."""
        found: dict[str, Template] = {}
        _collect(
            [self.methods, self.judges, self.rewards, self.self_instruct, self.eval_judge], found
        )
        return list(found.values())


def _collect(value: Any, found: dict[str, Template]) -> None:
    if isinstance(value, Template):
        found[value.template_id] = value
    elif isinstance(value, dict):
        for v in value.values():
            _collect(v, found)
    elif isinstance(value, list | tuple):
        for v in value:
            _collect(v, found)


def load_inputs(cfg: RunConfig) -> RoundInputs:
    """Read and check every input file the config names; errors name the file and field."""
    library = TemplateLibrary()
    prompts: list[Prompt] = []
    for path in cfg.prompts.files:
        prompts += load_prompts(path)
    for index, source in enumerate(cfg.prompts.datasets):
        prompts += load_dataset_prompts(source, index)
    unique = list({p.prompt_id: p for p in prompts}.values())
    files = (
        ", ".join([*map(str, cfg.prompts.files), *(d.path for d in cfg.prompts.datasets)])
        or "prompts.files"
    )
    if not unique:
        raise ConfigError(
            f"{files}: no prompts (prompts.files or prompts.datasets must give at least one)"
        )
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
    for name in cfg.enabled_methods():
        method, settings = METHODS[name], cfg.method(name)
        inputs.methods[name] = method.load(settings, library)
        judge = judge_settings(cfg, name)
        if judge is not None:
            try:
                inputs.judges[name] = load_judge(judge, library)
            except ConfigError as e:  # "judge.function: ..." -> "self_reward.judge.function"
                raise ConfigError(_placed(str(e), "judge.", f"{name}.judge.")) from None
    steps = cfg.training.step_list()
    for i, step in enumerate(steps):
        if step.reward is not None and TRAINING_KINDS[step.kind].online:
            where = f"training.steps.{i}"
            try:
                inputs.rewards[step.kind] = load_reward(
                    step.reward, library, scorer_before(steps, i)
                )
            except ConfigError as e:  # "judge.function: ..." -> "training.steps.0.reward..."
                raise ConfigError(_placed(str(e), "judge.", f"{where}.reward.")) from None
    instruct = self_instruct_settings(cfg)
    if instruct is not None:
        inputs.self_instruct = load_self_instruct(instruct, library)
    if cfg.evaluation.enabled:
        inputs.eval_judge = library.get(cfg.evaluation.judge_template)
        choice_parser(inputs.eval_judge)
        inputs.eval_judge.expect("pairwise judge", PAIRWISE_VARS)
        inputs.yardstick = load_yardstick(cfg.evaluation.yardstick)
    return inputs


def load_yardstick(stick: Any) -> dict[str, list[Checked]]:
    """The yardstick's splits, each file read and checked now: "seen" (its `prompts`)
    first, then its `splits` in order; none when it is off."""
    if not stick.enabled:
        return {}
    files = {SEEN: stick.prompts, **stick.splits}
    return {name: load_checked(f, stick.limit) for name, f in files.items()}


def _placed(message: str, prefix: str, where: str) -> str:
    """A judge's error located in the config: `judge.function: ...` -> `<where>function:`."""
    return where + message.removeprefix(prefix) if message.startswith(prefix) else message


def judge_settings(cfg: RunConfig, method: str) -> Any | None:
    """The `judge:` settings of a method that scores answers with a judge, else None."""
    entry = METHODS[method]
    return entry.judge(cfg.method(method)) if entry.judge else None


def judge_plans(
    cfg: RunConfig, inputs: RoundInputs, latest_scorer: dict[str, Any] | None
) -> dict[str, JudgePlan]:
    """Per enabled method with a judge, the judge it uses this round; `latest_scorer` is
    the run's most recent reward model before the round (for `model: latest`)."""
    return {
        name: plan_judge(settings, inputs.judges[name], latest_scorer)
        for name in cfg.enabled_methods()
        if (settings := judge_settings(cfg, name)) is not None
    }


def self_judge(cfg: RunConfig) -> str | None:
    """The first enabled method with a judge: the evaluation re-labels the other methods'
    pairs with that judge (cross-method agreement)."""
    return next((m for m in cfg.enabled_methods() if judge_settings(cfg, m)), None)


def self_instruct_settings(cfg: RunConfig) -> SelfInstructConfig | None:
    """Self-instruct settings when an enabled method takes self-instructed prompts."""
    for name in cfg.enabled_methods():
        entry = METHODS[name]
        if entry.self_instruct is not None:
            settings = entry.self_instruct(cfg.method(name))
            if settings.enabled:
                return settings
    return None


def method_takes_generated(cfg: RunConfig, method: str) -> bool:
    """Whether a method's prompts include the round's self-instructed ones."""
    entry = METHODS[method]
    return entry.self_instruct is not None and entry.self_instruct(cfg.method(method)).enabled


def method_prompts(
    cfg: RunConfig, method: str, seeds: list[Prompt], generated: list[Prompt]
) -> list[Prompt]:
    """A method's prompts this round: the seeds, plus the self-instructed prompts for a
    method that takes them."""
    return seeds + generated if method_takes_generated(cfg, method) else seeds


def round_prompts(inputs: RoundInputs, cfg: RunConfig, round_: int) -> list[Prompt]:
    """The round's seed prompts: `per_round` of them drawn by the run's seed and the round
    (all of them when per_round is unset), in a stable order."""
    pool = inputs.train_prompts
    if cfg.prompts.per_round is None or cfg.prompts.per_round >= len(pool):
        return list(pool)
    ranked = sorted(pool, key=lambda p: row_id("round", cfg.seed, cfg.name, round_, p.prompt_id))
    return ranked[: cfg.prompts.per_round]


def draw_rows(prompts: list[Prompt], ctx: RoundContext) -> dict[str, list[dict[str, Any]]]:
    """The round's draw as rows: each prompt (stored once per run) and that this round
    drew it (`round_prompts`: what an online RL step of the round trains on)."""
    return {
        "prompts": [p.record(ctx.run_id, ctx.round) for p in prompts],
        "round_prompts": [
            {"run_id": ctx.run_id, "round": ctx.round, "prompt_id": p.prompt_id} for p in prompts
        ],
    }


def prompt_from_row(row: dict[str, Any]) -> Prompt:
    return Prompt.from_messages(
        json.loads(row["messages_json"]),
        task=row.get("task"),
        source=row["source"],
        generation_id=row.get("generation_id"),
    )


def method_judge(
    plan: JudgePlan | None, engine: Engine, judge_engine: Engine | None, ctx: RoundContext
):
    """The judge a plan describes (None for a method without one): on its own model's
    engine when it names one, else on the round's engine."""
    if plan is None:
        return None
    return build_judge(
        plan.settings, plan.loaded, judge_engine or engine, plan.model_id or ctx.model_id
    )


def _plan(cfg: RunConfig, inputs: RoundInputs, method: str) -> JudgePlan | None:
    settings = judge_settings(cfg, method)
    return None if settings is None else plan_judge(settings, inputs.judges[method], None)


def run_batch(
    method: str,
    engine: Engine,
    inputs: RoundInputs,
    prompts: list[Prompt],
    ctx: RoundContext,
    cfg: RunConfig,
    judge_engine: Engine | None = None,
    judge: JudgePlan | None = None,
) -> Rows:
    """One batch of one method. `judge` is the round's plan for its judge (by default the
    configured one, with no reward model yet); `judge_engine` runs it if it has a model."""
    plan = judge or _plan(cfg, inputs, method)
    scorer = method_judge(plan, engine, judge_engine, ctx)
    return METHODS[method].run(
        engine, inputs.methods.get(method), prompts, ctx, cfg.method(method), scorer
    )


def pair_policies(cfg: RunConfig) -> dict[str, Any]:
    """How each enabled method turns generations into pairs, stored with the round."""
    return {m: METHODS[m].record_policy(cfg.method(m)) for m in cfg.enabled_methods()}


def tie_reasons() -> dict[str, tuple[str, ...]]:
    """Per method, the discard reasons that mean its two sides were equally good."""
    return {m: METHODS[m].tie_reasons for m in METHODS}


def training_metric_names() -> dict[str, dict[str, str]]:
    """Per training kind, its metrics.json key -> evaluations metric."""
    return {name: dict(kind.metrics) for name, kind in TRAINING_KINDS.items()}


def round_dir(runs_dir: Path | str, run_id: str, round_: int) -> Path:
    return Path(runs_dir) / run_id / f"round-{round_}"


def write_snapshot(folder: Path, cfg: RunConfig, inputs: RoundInputs) -> None:
    """The round's immutable record: the resolved config and the templates' hashes (the
    exported training data and checkpoints land beside them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(cfg.model_dump_json(indent=2))
    (folder / "templates.json").write_text(
        json.dumps({t.name: t.template_id for t in inputs.templates()}, indent=2)
    )


def self_instruct_batch(
    engine: Engine,
    inputs: RoundInputs,
    seeds: list[Prompt],
    generated: list[Prompt],
    ctx: RoundContext,
    settings: SelfInstructConfig,
) -> Rows:
    """The round's new prompts (and the discarded ones, with their reasons)."""
    _, rows = write_new_prompts(engine, inputs.self_instruct, seeds, generated, ctx, settings)
    rows.add("templates", inputs.self_instruct.record())
    return rows


def relabel_round(
    engine: Engine,
    inputs: RoundInputs,
    pairs: list[dict[str, Any]],
    ctx: RoundContext,
    cfg: RunConfig,
    judge_engine: Engine | None = None,
    judge: JudgePlan | None = None,
) -> Rows:
    """Cross-method agreement: the round's pairs labelled again by the self-judge (the
    judge of the first method that has one) and by the pairwise judge."""
    judged = self_judge(cfg)
    plan = judge or (_plan(cfg, inputs, judged) if judged else None)
    scorer = method_judge(plan, engine, judge_engine, ctx)
    return relabel_pairs(engine, scorer, judged, inputs.eval_judge, pairs, ctx, cfg.evaluation)
