"""The pre-flight: everything a run will need, checked before a flow or an engine starts.

`prefloop run`, `prefloop serve` (before it registers a deployment: a bad config never
reaches a worker) and the loop flow itself all call `preflight`, so a mistake is one line
naming the file and the field, and the database is left as it was.
"""

import json
from collections.abc import Mapping
from functools import lru_cache

from pipeline.config import RunConfig
from pipeline.engines import engine_kind, engine_problem
from pipeline.engines.base import continuation_tokens
from pipeline.errors import ConfigError, EngineError, TemplateError
from pipeline.evaluation.benchmarks import tasks_problem
from pipeline.judging import JudgePlan, judge_model
from pipeline.models import ModelInfo, resolve_model
from pipeline.rounds import RoundInputs, judge_plans, load_inputs
from pipeline.schema import EngineConfig
from pipeline.store import Store
from pipeline.templates import ChoiceParser, ScoreParser, Template
from pipeline.training.kinds import TRAINING_KINDS

PREFLIGHT_WAIT_S = 10.0


def preflight(cfg: RunConfig, source: str = "config", *, ping: bool = True) -> RoundInputs:
    """Check every input file, every model the run names, the engines' settings (and that
    a remote engine answers, with `ping`), and that the database can be written; returns
    the loaded inputs."""
    inputs = load_inputs(cfg)
    model = resolve_model(cfg.model)
    # Each judge as a round before any reward model would use it (`latest`: its fallback).
    plans = judge_plans(cfg, inputs, None)
    rewards = [judge_model(s.reward) for s in cfg.training.step_list() if s.reward is not None]
    for other in (*(p.model_path for p in plans.values()), *rewards, cfg.evaluation.judge_model):
        if other is not None:
            resolve_model(other)
    for name, engine in (("engine", cfg.engine), ("evaluation.engine", cfg.evaluation.engine)):
        if engine is None:
            continue
        problem = engine_problem(engine) or _context_problem(engine, model)
        if problem:
            raise ConfigError(f"{source}: {name}.{problem}")
        if ping and engine.kind == "openai":  # a wrong URL fails here, at once
            _ping(engine)
    check_label_templates(cfg, inputs, plans)
    check_training_steps(cfg, source)
    benchmarks = cfg.evaluation.benchmarks
    problem = tasks_problem(benchmarks.tasks, benchmarks.include_path)
    if problem:
        raise ConfigError(f"{source}: evaluation.benchmarks.{problem}")
    # Held by another process, or from a newer prefloop: fail here (a reader holding it
    # briefly is waited for, a few seconds at most).
    with Store(cfg.db_path, lock_timeout_s=min(cfg.db_lock_timeout_s, PREFLIGHT_WAIT_S)):
        pass
    return inputs


def check_training_steps(cfg: RunConfig, source: str = "config") -> None:
    """Each training step has rows to train on (one of the methods it reads is enabled and
    kept by its `methods` filter) and integrations to log to that exist here; else it
    would fail only after a round's generation."""
    enabled = set(cfg.enabled_methods())
    label = "training.steps" if cfg.training.steps is not None else "training"
    for i, step in enumerate(cfg.training.step_list()):
        where = f"{label}.{i}" if cfg.training.steps is not None else label
        kept = enabled & set(step.methods if step.methods is not None else enabled)
        wanted = TRAINING_KINDS[step.kind].sources(step)
        usable = kept if wanted is None else kept & set(wanted)
        if not usable and not TRAINING_KINDS[step.kind].online:  # online: the round's prompts
            reads = "any method's pairs" if wanted is None else ", ".join(wanted)
            reads = reads or "nothing (its settings turn every source off)"
            raise ConfigError(
                f"{source}: {where}: {step.kind} has nothing to train on: it reads {reads}, "
                f"and the enabled methods kept by training.methods are "
                f"{', '.join(sorted(kept)) or 'none'}"
            )
        shared = step.report_to == cfg.training.report_to  # written once, under training
        problem = _report_to_problem(step.report_to)
        if problem:
            key = "training.report_to" if shared else f"{where}.report_to"
            raise ConfigError(f"{source}: {key}: {problem}")


def _report_to_problem(names: list[str]) -> str | None:
    """A `report_to` name transformers does not know, or whose package is not installed
    (the trainer would fail only once its child started)."""
    if not names:
        return None
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            return f"{name!r} is not one of {', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
        if name not in get_available_reporting_integrations():
            return f"{name} is not installed here (pip install {name})"
    return None


def _context_problem(engine, model: ModelInfo) -> str | None:
    """vLLM refuses a max_model_len beyond the model's positions, after half a minute of
    starting; say so now."""
    if engine_kind(engine) != "vllm":
        return None
    config = json.loads((model.path / "config.json").read_text())
    positions = config.get("max_position_embeddings")
    if positions and engine.max_model_len > positions:
        return (
            f"max_model_len: {engine.max_model_len} is more than {model.name}'s context "
            f"(max_position_embeddings {positions})"
        )
    return None


def check_label_templates(
    cfg: RunConfig, inputs: RoundInputs, plans: Mapping[str, JudgePlan]
) -> None:
    """Every template read from label probabilities (a prefilled score scale, an A/B
    question) is checked with the tokenizer of the model that will read it: each label
    must start where the prefix ends and none may read as the start of another. Only the
    tokenizer loads, so a bad scale fails in a second, before any engine starts."""
    judged: set[str] = set()
    for plan in plans.values():
        if plan.settings.kind == "template":
            check_labels(plan.loaded, plan.model_path or cfg.model)
            judged.add(plan.loaded.template_id)
    if inputs.eval_judge is not None:  # read by the fixed evaluation judge's model
        check_labels(inputs.eval_judge, cfg.evaluation.judge_model or cfg.model)
        judged.add(inputs.eval_judge.template_id)
    for template in inputs.templates():
        if template.template_id not in judged:
            check_labels(template, cfg.model)


def check_labels(template: Template, model: str) -> None:
    """The labels of one template, read by `model`'s tokenizer and chat template."""
    parser = template.meta.parser
    if isinstance(parser, ScoreParser) and parser.prefix is not None:
        labels, prefix, single = parser.continuations, parser.prefix, False
    elif isinstance(parser, ChoiceParser):
        # A chain-of-thought judge reads its label after its own reasoning and a newline.
        reasoning = f"{parser.reasoning_prefix} ...\n" if parser.reasoning_prefix else ""
        labels, prefix, single = parser.labels, reasoning + parser.prefix, True
    else:
        return
    tokenizer = _tokenizer(str(resolve_model(model).path))
    message = template.render(**{v: f"<{v}>" for v in template.meta.variables})
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    try:
        continuation_tokens(
            lambda t: tokenizer.encode(t, add_special_tokens=False), text + prefix, labels, single
        )
    except EngineError as e:
        raise TemplateError(f"{template.path}: {e}") from None


@lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _ping(engine: EngineConfig) -> None:
    """The servers answer (their pool alone: no tokenizer is loaded for it)."""
    from pipeline.engines.openai_engine import open_pool

    pool = open_pool(engine)
    try:
        pool.ping()
    finally:
        pool.close()
