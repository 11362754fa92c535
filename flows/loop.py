"""Prefect flows: the loop over rounds, and one round.

round t: prompts -> enabled methods on one shared engine, batch by batch -> stop the
engine -> train on the round's pairs -> register the model that round t+1 generates with.

Resume: every batch's rows and its `stage_metrics` row land in one transaction, so a
batch is either done (skipped on re-run) or absent (redone). Training is skipped when
its `training_runs` row exists. Only this process writes to DuckDB.
"""

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.engines import EngineSpec, close_engines, get_engine
from pipeline.config import RunConfig, load_config
from pipeline.errors import PrefloopError, TransientEngineError
from pipeline.hashing import sha256_text
from pipeline.methods import self_reward
from pipeline.methods.common import RoundContext, Rows
from pipeline.models import resolve_model
from pipeline.rounds import (
    METHODS,
    inputs_for,
    pair_policies,
    prompt_from_row,
    round_prompts,
    run_method,
)
from pipeline.seeds import Prompt
from pipeline.store import Store
from pipeline.training.step import round_dir, train_round


def _transient(task, task_run, state) -> bool:
    """Retry faults that may pass (a server's 5xx, timeouts); a bug or bad input fails
    at once instead of being retried into the same error."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (TransientEngineError, ConnectionError, TimeoutError))


def _metrics_row(
    ctx: RoundContext, stage: str, batch: int, n: int, wall: float, engine, before
) -> dict:
    prompt_tokens = engine.counter.prompt_tokens - before[0]
    completion_tokens = engine.counter.completion_tokens - before[1]
    return {
        "run_id": ctx.run_id,
        "round": ctx.round,
        "stage": stage,
        "batch": batch,
        "n_items": n,
        "wall_s": wall,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "tokens_per_s": (prompt_tokens + completion_tokens) / wall if wall > 0 else None,
    }


@task(
    name="method-batch",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_transient,
    cache_policy=NONE,
)
def method_batch(
    method: str,
    batch: int,
    prompts: list[Prompt],
    ctx: RoundContext,
    config_json: str,
    spec: EngineSpec,
    judge_spec: EngineSpec | None = None,
) -> Rows:
    """One batch of one method; returns its rows and its stage_metrics row."""
    cfg = RunConfig.model_validate_json(config_json)
    inputs = inputs_for(config_json)
    engine = get_engine(spec)
    judge = get_engine(judge_spec) if judge_spec else None
    before = (engine.counter.prompt_tokens, engine.counter.completion_tokens)
    start = time.perf_counter()
    rows = run_method(
        method, engine, judge, inputs, prompts, ctx, cfg, judge_spec and judge_spec.model_id
    )
    rows.add(
        "stage_metrics",
        _metrics_row(ctx, method, batch, len(prompts), time.perf_counter() - start, engine, before),
    )
    return rows


@task(
    name="self-instruct",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_transient,
    cache_policy=NONE,
)
def self_instruct_batch(
    seeds: list[Prompt],
    generated: list[Prompt],
    ctx: RoundContext,
    config_json: str,
    spec: EngineSpec,
) -> Rows:
    cfg = RunConfig.model_validate_json(config_json)
    engine = get_engine(spec)
    before = (engine.counter.prompt_tokens, engine.counter.completion_tokens)
    start = time.perf_counter()
    template = inputs_for(config_json).self_instruct
    _, rows = self_reward.write_new_prompts(
        engine, template, seeds, generated, ctx, cfg.self_reward.self_instruct
    )
    rows.add("templates", template.record())
    rows.add(
        "stage_metrics",
        _metrics_row(
            ctx, "self_instruct", 0, len(seeds), time.perf_counter() - start, engine, before
        ),
    )
    return rows


def _log_batch(
    logger, ctx: RoundContext, stage: str, batch: int, total: int, written: dict[str, int], m: dict
):
    logger.info(
        "round %d %-13s batch %d/%d: %d prompts, %d generations, %d pairs, %.1fs, %.0f tok/s",
        ctx.round,
        stage,
        batch + 1,
        total,
        m["n_items"],
        written.get("generations", 0),
        written.get("pairs", 0),
        m["wall_s"],
        m["tokens_per_s"] or 0.0,
    )


@flow(name="prefloop-round", flow_run_name="{run_id}-round-{round_}")
def round_flow(config_json: str, run_id: str, round_: int, model_id: str) -> str:
    """One round; returns the model id the next round generates with."""
    logger = get_run_logger()
    cfg = RunConfig.model_validate_json(config_json)
    inputs = inputs_for(config_json)
    ctx = RoundContext(run_id, round_, model_id, cfg.seed + round_)
    folder = round_dir(cfg, run_id, round_)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(cfg.model_dump_json(indent=2))
    (folder / "templates.json").write_text(
        json.dumps({t.name: t.template_id for t in inputs.templates()}, indent=2)
    )

    with Store(cfg.db_path) as store:
        store.upsert_round(
            run_id,
            round_,
            model_id,
            pair_policy_json=json.dumps(pair_policies(cfg), sort_keys=True),
            snapshot_dir=str(folder),
        )
        info = store.round_info(run_id, round_)
        if info["status"] == "finished":
            logger.info("round %d already finished; skipping", round_)
            return _next_model(store, cfg, run_id, round_, model_id)
        model = store.model(model_id)
        spec = EngineSpec(model_id, model["path"], cfg.engine.model_dump_json(), ctx.seed)
        judge_spec = None
        if cfg.self_reward.enabled and cfg.self_reward.judge_model:
            judge = resolve_model(cfg.self_reward.judge_model)
            store.write({"models": [judge.record("judge")]})
            judge_spec = EngineSpec(
                judge.model_id, str(judge.path), cfg.engine.model_dump_json(), ctx.seed
            )
        done = store.done_batches(run_id, round_)
        seeds = round_prompts(inputs, cfg, round_)
        todo = [m for m in METHODS if getattr(cfg, m).enabled]
        try:
            new_prompts: list[Prompt] = []
            if cfg.self_reward.enabled and cfg.self_reward.self_instruct.enabled:
                if ("self_instruct", 0) not in done:
                    earlier = store.generated_prompts(run_id, round_, earlier=True)
                    generated = [prompt_from_row(r) for r in earlier]
                    rows = self_instruct_batch(seeds, generated, ctx, config_json, spec)
                    written = store.write(rows)
                    _log_batch(
                        logger, ctx, "self_instruct", 0, 1, written, rows["stage_metrics"][0]
                    )
                new_prompts = [prompt_from_row(r) for r in store.generated_prompts(run_id, round_)]
            # Every missing batch of every method is submitted to the task runner; rows are
            # written by this process, in order, as each batch's result arrives.
            submitted = []
            for method in todo:
                prompts = seeds + new_prompts if method == "self_reward" else seeds
                size = cfg.engine.batch_size
                batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
                for b, batch in enumerate(batches):
                    if (method, b) not in done:
                        future = method_batch.submit(
                            method, b, batch, ctx, config_json, spec, judge_spec
                        )
                        submitted.append((method, b, len(batches), future))
            for method, b, total, future in submitted:
                rows = future.result()
                written = store.write(rows)
                _log_batch(logger, ctx, method, b, total, written, rows["stage_metrics"][0])
        finally:
            close_engines()  # training needs the memory; a crash must not leak it either

        next_model = model_id
        if cfg.training.kind != "none":
            next_model = _train(store, cfg, run_id, round_, logger)
        store.upsert_round(
            run_id,
            round_,
            model_id,
            status="finished",
            finished_at=datetime.now(UTC).replace(tzinfo=None),
        )
        counts = store.pair_counts(run_id, round_)
        logger.info(
            "round %d finished: pairs %s; next model %s",
            round_,
            counts,
            next_model,
        )
        return next_model


def _train(store: Store, cfg: RunConfig, run_id: str, round_: int, logger) -> str:
    output = store.finished_training(run_id, round_, cfg.training.kind)
    if output is None:
        start = time.perf_counter()
        result = train_round(store, cfg, run_id, round_)
        output = result["model_id"]
        m = result["metrics"]
        logger.info(
            "round %d %s training: %d pairs, %.0fs, held-out %s",
            round_,
            cfg.training.kind,
            result["pairs"]["train"],
            time.perf_counter() - start,
            {
                k: round(v, 3)
                for k, v in m.items()
                if k.startswith("heldout_") and isinstance(v, float)
            },
        )
    # A reward model does not replace the policy.
    return output if cfg.training.kind == "dpo" else store.round_info(run_id, round_)["model_id"]


def _next_model(store: Store, cfg: RunConfig, run_id: str, round_: int, model_id: str) -> str:
    if cfg.training.kind != "dpo":
        return model_id
    return store.finished_training(run_id, round_, "dpo") or model_id


def prepare_run(cfg: RunConfig) -> dict[str, Any]:
    """Check every input, register the run and its base model; before any engine starts."""
    config_json = cfg.model_dump_json()
    heldout = inputs_for(config_json).heldout_prompts
    model = resolve_model(cfg.model)
    with Store(cfg.db_path) as store:
        store.register_run(cfg.name, json.loads(config_json), sha256_text(config_json), cfg.seed)
        store.write({"models": [model.record("base")]})
        store.write({"prompts": [p.record(cfg.name, 0, split="heldout") for p in heldout]})
        first = store.round_info(cfg.name, 1)
    return {"model_id": first["model_id"] if first else model.model_id, "config_json": config_json}


def task_runner(cfg: RunConfig):
    """Threads by default (one worker for local engines), Ray on request."""
    if cfg.runner.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise PrefloopError(
                "runner.kind ray needs prefect-ray: .venv/bin/pip install prefect-ray"
            ) from None
        return RayTaskRunner(address=cfg.runner.ray_address)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=cfg.runner.workers)


def _resolve_config(config: str | dict[str, Any], overrides: list[str] | None) -> RunConfig:
    if isinstance(config, dict):
        return RunConfig.model_validate(config)
    return load_config(Path(config), overrides)


@flow(name="prefloop-loop")
def loop_flow(
    config: str | dict[str, Any],
    overrides: list[str] | None = None,
    rounds: int | None = None,
    extend: bool = False,
) -> dict[str, Any]:
    """Run `rounds` rounds (default: the config's); round t+1 generates with the model
    round t registered. `config` is a YAML path (read at run time, so a deployment picks
    up edits) or a config mapping. With `extend`, the rounds come after the run's last
    finished round: each scheduled run of a deployment continues the loop."""
    logger = get_run_logger()
    cfg = _resolve_config(config, overrides)
    n = rounds or cfg.rounds
    run = prepare_run(cfg)
    first = 1
    if extend:
        with Store(cfg.db_path) as store:
            first = store.last_finished_round(cfg.name) + 1
    model_id = run["model_id"]
    started = time.perf_counter()
    for t in range(1, first + n):
        with Store(cfg.db_path) as store:
            existing = store.round_info(cfg.name, t)
        if existing is not None:
            model_id = existing["model_id"]
        model_id = round_flow.with_options(task_runner=task_runner(cfg))(
            run["config_json"], cfg.name, t, model_id
        )
    logger.info(
        "run %s: rounds %d-%d in %.0fs; database %s",
        cfg.name,
        first,
        first + n - 1,
        time.perf_counter() - started,
        Path(cfg.db_path).resolve(),
    )
    return {
        "run_id": cfg.name,
        "rounds": first + n - 1,
        "final_model": model_id,
        "db_path": str(cfg.db_path),
    }
