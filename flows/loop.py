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
from pipeline import evaluation, report
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
    ctx: RoundContext,
    stage: str,
    batch: int,
    n: int,
    wall: float,
    engine=None,
    before=(0, 0),
    setup: float = 0.0,
) -> dict:
    """A stage_metrics row: the work's wall time and tokens; `setup` is the time the task
    spent before the work (starting an engine), kept apart so tokens/s stays the engine's."""
    prompt_tokens = engine.counter.prompt_tokens - before[0] if engine else 0
    completion_tokens = engine.counter.completion_tokens - before[1] if engine else 0
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
        "setup_s": setup,
    }


class _Timed:
    """The engines a task needs, with the seconds spent starting them (0 when cached)."""

    def __init__(self) -> None:
        self.setup = 0.0

    def engine(self, spec: EngineSpec):
        start = time.perf_counter()
        engine = get_engine(spec)
        self.setup += time.perf_counter() - start
        return engine


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
    timed = _Timed()
    engine = timed.engine(spec)
    judge = timed.engine(judge_spec) if judge_spec else None
    before = (engine.counter.prompt_tokens, engine.counter.completion_tokens)
    start = time.perf_counter()
    rows = run_method(
        method, engine, judge, inputs, prompts, ctx, cfg, judge_spec and judge_spec.model_id
    )
    wall = time.perf_counter() - start
    rows.add(
        "stage_metrics",
        _metrics_row(ctx, method, batch, len(prompts), wall, engine, before, timed.setup),
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
    timed = _Timed()
    engine = timed.engine(spec)
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
            ctx,
            "self_instruct",
            0,
            len(seeds),
            time.perf_counter() - start,
            engine,
            before,
            timed.setup,
        ),
    )
    return rows


@task(
    name="evaluate",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_transient,
    cache_policy=NONE,
)
def evaluation_stage(
    stage: str, ctx: RoundContext, config_json: str, spec: EngineSpec, data: dict[str, Any]
) -> Rows:
    """One evaluation stage on one engine: `heldout` and `heldout_new` (the round's model,
    then the trained one, answer the held-out prompts), `agreement` (re-label the round's
    pairs) or `win_rate` (judge the new model's held-out answers against the old's)."""
    cfg = RunConfig.model_validate_json(config_json)
    inputs = inputs_for(config_json)
    timed = _Timed()
    engine = timed.engine(spec)
    before = (engine.counter.prompt_tokens, engine.counter.completion_tokens)
    start = time.perf_counter()
    if stage in ("heldout", "heldout_new"):
        items = inputs.heldout_prompts
        rows = evaluation.heldout_answers(engine, items, ctx, spec.model_id, cfg.evaluation)
    elif stage == "agreement":
        items = data["pairs"]
        rows = evaluation.relabel_pairs(
            engine, inputs.judge, inputs.eval_judge, items, ctx, cfg.self_reward, cfg.evaluation
        )
    elif stage == "win_rate":
        items = inputs.heldout_prompts
        rows = evaluation.compare_models(
            engine,
            inputs.eval_judge,
            items,
            data["old"],
            data["new"],
            ctx,
            spec.model_id,
            cfg.evaluation,
        )
    else:
        raise ValueError(f"unknown evaluation stage {stage!r}")
    wall = time.perf_counter() - start
    rows.add(
        "stage_metrics",
        _metrics_row(ctx, stage, 0, len(items), wall, engine, before, timed.setup),
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


class _FlowClock:
    """Time the round's own work in the flow (store reads and writes, set-up) so the
    round's wall time splits into stages, this, and orchestration."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> "_FlowClock":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start


@flow(name="prefloop-round", flow_run_name="{run_id}-round-{round_}")
def round_flow(config_json: str, run_id: str, round_: int, model_id: str) -> str:
    """One round; returns the model id the next round generates with."""
    logger = get_run_logger()
    clock = _FlowClock()
    with clock:
        cfg = RunConfig.model_validate_json(config_json)
        inputs = inputs_for(config_json)
        ctx = RoundContext(run_id, round_, model_id, cfg.seed + round_)
        folder = round_dir(cfg, run_id, round_)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(cfg.model_dump_json(indent=2))
        (folder / "templates.json").write_text(
            json.dumps({t.name: t.template_id for t in inputs.templates()}, indent=2)
        )
        store = Store(cfg.db_path)
    with store:
        with clock:
            if store.round_info(run_id, round_) is None:
                store.upsert_round(run_id, round_, model_id, started_at=_now())
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
        with clock:
            spec = _spec(store, cfg, model_id, ctx.seed)
            judge_spec = None
            if cfg.self_reward.enabled and cfg.self_reward.judge_model:
                judge = resolve_model(cfg.self_reward.judge_model)
                store.write({"models": [judge.record("judge")]})
                judge_spec = EngineSpec(
                    judge.model_id, str(judge.path), cfg.engine.model_dump_json(), ctx.seed
                )
            done = store.done_batches(run_id, round_)
            attempt = sum(stage == "flow" for stage, _ in done)  # a resumed round: 1, 2...
            seeds = round_prompts(inputs, cfg, round_)
        evaluate = cfg.evaluation.enabled
        win_rate = evaluate and cfg.training.kind == "dpo" and bool(inputs.heldout_prompts)
        try:
            new_prompts: list[Prompt] = []
            if cfg.self_reward.enabled and cfg.self_reward.self_instruct.enabled:
                if ("self_instruct", 0) not in done:
                    with clock:
                        earlier = store.generated_prompts(run_id, round_, earlier=True)
                        generated = [prompt_from_row(r) for r in earlier]
                    rows = self_instruct_batch(seeds, generated, ctx, config_json, spec)
                    _write(store, rows, clock, logger, ctx, "self_instruct", 0, 1)
                with clock:
                    stored = store.generated_prompts(run_id, round_)
                new_prompts = [prompt_from_row(r) for r in stored]
            # Every missing batch of every method is submitted to the task runner; rows are
            # written by this process, in order, as each batch's result arrives.
            submitted = []
            for method in (m for m in METHODS if getattr(cfg, m).enabled):
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
                _write(store, future.result(), clock, logger, ctx, method, b, total)
            # The round's model re-labels the round's pairs while its engine is up.
            if evaluate and cfg.evaluation.agreement and ("agreement", 0) not in done:
                with clock:
                    pairs = store.evaluation_pairs(run_id, round_)
                rows = evaluation_stage("agreement", ctx, config_json, spec, {"pairs": pairs})
                _write(store, rows, clock, logger, ctx, "agreement", 0, 1)
            _stop_engines(clock)
            # M_t's held-out answers, on the evaluation engine (M_t+1's come after training).
            if win_rate and ("heldout", 0) not in done:
                eval_spec = _spec(store, cfg, model_id, ctx.seed, evaluation=True)
                rows = evaluation_stage("heldout", ctx, config_json, eval_spec, {})
                _write(store, rows, clock, logger, ctx, "heldout", 0, 1)
        finally:
            _stop_engines(clock)  # training needs the memory; a crash must not leak it either

        next_model = model_id
        if cfg.training.kind != "none":
            next_model = _train(store, cfg, run_id, round_, logger)
        if win_rate:
            _win_rate(store, cfg, ctx, next_model, done, config_json, clock, logger)
        with clock:
            if evaluate:
                stats = store.pair_statistics_input(run_id, round_, evaluation.TIE_REASONS)
                training = store.training_results(run_id, round_)
                store.write(evaluation.round_statistics(ctx, stats, training))
            counts = store.pair_counts(run_id, round_)
        # The flow's own time is stored last; the round's finish time right after it.
        store.write({"stage_metrics": [_metrics_row(ctx, "flow", attempt, 0, clock.seconds)]})
        store.upsert_round(run_id, round_, model_id, status="finished", finished_at=_now())
        logger.info("round %d finished: pairs %s; next model %s", round_, counts, next_model)
        return next_model


def _stop_engines(clock: _FlowClock) -> None:
    with clock:  # a vLLM shutdown takes seconds: the flow's own time, not orchestration
        close_engines()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _spec(
    store: Store, cfg: RunConfig, model_id: str, seed: int, evaluation: bool = False
) -> EngineSpec:
    model = store.model(model_id)
    engine = (cfg.evaluation.engine if evaluation else None) or cfg.engine
    return EngineSpec(model_id, model["path"], engine.model_dump_json(), seed)


def _write(store: Store, rows: Rows, clock, logger, ctx, stage: str, batch: int, total: int):
    with clock:
        written = store.write(rows)
    _log_batch(logger, ctx, stage, batch, total, written, rows["stage_metrics"][0])


def _win_rate(
    store: Store,
    cfg: RunConfig,
    ctx: RoundContext,
    new_model: str,
    done: set,
    config_json: str,
    clock: _FlowClock,
    logger,
) -> None:
    """M_t+1 answers the held-out prompts; the fixed judge compares them with M_t's."""
    try:
        if ("heldout_new", 0) not in done:
            new_spec = _spec(store, cfg, new_model, ctx.seed, evaluation=True)
            rows = evaluation_stage("heldout_new", ctx, config_json, new_spec, {})
            _write(store, rows, clock, logger, ctx, "heldout_new", 0, 1)
            _stop_engines(clock)
        if ("win_rate", 0) not in done:
            with clock:
                judge_id = _eval_judge(store, cfg, ctx.run_id)
                judge_spec = _spec(store, cfg, judge_id, ctx.seed, evaluation=True)
                old = store.heldout_answers(ctx.run_id, ctx.round, ctx.model_id)
                new = store.heldout_answers(ctx.run_id, ctx.round, new_model)
            data = {"old": old, "new": new}
            rows = evaluation_stage("win_rate", ctx, config_json, judge_spec, data)
            _write(store, rows, clock, logger, ctx, "win_rate", 0, 1)
            [row] = [r for r in rows["evaluations"] if r["metric"] == "win_rate"]
            details = json.loads(row["details_json"])
            logger.info(
                "round %d win rate of %s over %s: %s (%d wins, %d ties, %d losses; flip rate %s)",
                ctx.round,
                new_model,
                ctx.model_id,
                None if row["value"] is None else round(row["value"], 3),
                details["wins"],
                details["ties"],
                details["losses"],
                details["flip_rate"],
            )
    finally:
        _stop_engines(clock)


def _eval_judge(store: Store, cfg: RunConfig, run_id: str) -> str:
    """The fixed judge: `evaluation.judge_model`, else the run's initial model."""
    if cfg.evaluation.judge_model is None:
        return store.first_round_model(run_id)
    judge = resolve_model(cfg.evaluation.judge_model)
    store.write({"models": [judge.record("judge")]})
    return judge.model_id


def _train(store: Store, cfg: RunConfig, run_id: str, round_: int, logger) -> str:
    output = store.finished_training(run_id, round_, cfg.training.kind)
    if output is None:
        start = time.perf_counter()
        result = train_round(store, cfg, run_id, round_)
        wall = time.perf_counter() - start
        output = result["model_id"]
        m = result["metrics"]
        ctx = RoundContext(run_id, round_, output, cfg.seed)
        store.write(
            {
                "stage_metrics": [
                    _metrics_row(
                        ctx, f"train_{cfg.training.kind}", 0, result["pairs"]["train"], wall
                    )
                ]
            }
        )
        logger.info(
            "round %d %s training: %d pairs, %.0fs, held-out %s",
            round_,
            cfg.training.kind,
            result["pairs"]["train"],
            wall,
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
    page = report.write_report(cfg.db_path, cfg.name, report.report_path(cfg.runs_dir, cfg.name))
    logger.info(
        "run %s: rounds %d-%d in %.0fs; database %s; report %s",
        cfg.name,
        first,
        first + n - 1,
        time.perf_counter() - started,
        Path(cfg.db_path).resolve(),
        page.resolve(),
    )
    return {
        "run_id": cfg.name,
        "rounds": first + n - 1,
        "final_model": model_id,
        "db_path": str(cfg.db_path),
        "report": str(page),
    }
