"""Prefect flows: the loop over rounds, and one round.

round t: prompts -> enabled methods on one shared engine, batch by batch -> stop the
engine -> the training steps on the round's data (`[dpo]`, `[sft, dpo]`, ...), each
registered -> the last policy step's model is the one round t+1 generates with.

Resume: every batch's rows and its `stage_metrics` row land in one transaction, so a
batch is either done (skipped on re-run) or absent (redone). A training step is skipped
when its `training_runs` row exists. Only this process writes to DuckDB; a task gets what it
needs in its arguments (the round's loaded inputs, engine specs) and returns rows.
"""

import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.cluster import placed, ray_session, task_runner, training_launcher
from flows.engines import EngineSpec, close_engines, engine_spec, get_engine
from pipeline import report, rounds
from pipeline.config import RunConfig, load_config, parse_config
from pipeline.engines.servers import server_rows, tally
from pipeline.errors import PrefloopError, TransientEngineError
from pipeline.evaluation.metrics import round_statistics
from pipeline.evaluation.stages import compare_models, heldout_answers
from pipeline.evaluation.yardstick import instruction_following
from pipeline.hashing import sha256_text
from pipeline.models import resolve_model
from pipeline.preflight import preflight
from pipeline.progress import plan_record, progress_bar
from pipeline.rows import RoundContext, Rows, stage_metrics_row
from pipeline.store import Store
from pipeline.training.kinds import produces_policy
from pipeline.training.step import stored_policy, train_round


def _transient(task, task_run, state) -> bool:
    """Retry faults that may pass (a server's 5xx, timeouts); a bug or bad input fails
    at once instead of being retried into the same error."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (TransientEngineError, ConnectionError, TimeoutError))


@task(
    name="stage",
    task_run_name="{stage}-{batch}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_transient,
    cache_policy=NONE,
)
def run_stage(
    stage: str,
    batch: int,
    n_items: int,
    ctx: RoundContext,
    work: Callable[..., Rows],
    engines: Mapping[str, EngineSpec],
) -> Rows:
    """Run one batch of one stage: start (or reuse) the engines it names, call `work` with
    them as keyword arguments, and add the stage's metrics row (wall time, tokens, and the
    engine start time apart)."""
    start = time.perf_counter()
    started = {role: get_engine(spec) for role, spec in engines.items()}
    setup = time.perf_counter() - start
    distinct = list({id(e): e for e in started.values()}.values())
    before = [(e.counter.prompt_tokens, e.counter.completion_tokens) for e in distinct]
    start = time.perf_counter()
    with tally() as counts:  # per server, this batch's requests only
        rows = work(**started)
    wall = time.perf_counter() - start
    up = {
        url: stats["up"]
        for e in distinct
        if hasattr(e, "server_stats")
        for url, stats in e.server_stats().items()
    }
    servers = server_rows(counts, up, wall) if up else None
    prompt = sum(e.counter.prompt_tokens - b[0] for e, b in zip(distinct, before, strict=True))
    completion = sum(
        e.counter.completion_tokens - b[1] for e, b in zip(distinct, before, strict=True)
    )
    rows.add(
        "stage_metrics",
        stage_metrics_row(ctx, stage, batch, n_items, wall, prompt, completion, setup, servers),
    )
    return rows


class Round:
    """One round's state in the flow: the store, what is done, the engine specs, and the
    clock of the flow's own work (store reads and writes, engine shutdowns), so a round's
    wall time splits into stages, engine starts, this, and orchestration."""

    def __init__(self, config_json: str, run_id: str, round_: int, model_id: str) -> None:
        self.logger = get_run_logger()
        self.flow_seconds = 0.0
        with self.clock():
            self.cfg = parse_config(config_json)
            self.inputs = rounds.load_inputs(self.cfg)
            self.ctx = RoundContext(run_id, round_, model_id, self.cfg.seed + round_)
            self.folder = rounds.round_dir(self.cfg.runs_dir, run_id, round_)
            rounds.write_snapshot(self.folder, self.cfg, self.inputs)
            # Opened per write and read: readers (prefloop sql, status, a DuckDB client)
            # get in between; a reader holding it makes a write wait, with one log line.
            self.store = Store(
                self.cfg.db_path,
                lock_timeout_s=self.cfg.db_lock_timeout_s,
                on_wait=self.logger.warning,
            )

    # -- the flow's own time ------------------------------------------------------------

    @contextmanager
    def clock(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.flow_seconds += time.perf_counter() - start

    def write(self, rows: Rows, stage: str, batch: int = 0, total: int = 1) -> None:
        with self.clock():
            written = self.store.write(rows)
        m = rows["stage_metrics"][0]
        self.logger.info(
            "round %d %-13s batch %d/%d: %d prompts, %d generations, %d pairs, %.1fs, %.0f tok/s",
            self.ctx.round,
            stage,
            batch + 1,
            total,
            m["n_items"],
            written.get("generations", 0),
            written.get("pairs", 0),
            m["wall_s"],
            m["tokens_per_s"] or 0.0,
        )
        if total > 1 and sys.stderr.isatty():  # a bar for long stages, in the terminal only
            sys.stderr.write(
                f"round {self.ctx.round} {stage:<13} {progress_bar(batch + 1, total)}\n"
            )

    def write_plan(self, generated: int | None = None) -> None:
        """The round's stages and their batches, in order, for `prefloop status`; before
        self-instruct ran, its new prompts are counted as asked for (`generated`: as
        made)."""
        cfg = self.cfg
        instruct = rounds.self_instruct_settings(cfg)
        new = generated if generated is not None else (instruct.new_prompts if instruct else 0)
        stages = [("self_instruct", 1)] if instruct else []
        for method in cfg.enabled_methods():
            n = len(self.seeds) + (new if rounds.method_takes_generated(cfg, method) else 0)
            stages.append((method, -(-n // cfg.engine.batch_size)))
        if cfg.evaluation.enabled and cfg.evaluation.agreement:
            stages.append(("agreement", 1))
        if self.inputs.yardstick and self.ctx.round == 1:
            stages.append(("yardstick_base", 1))
        if self.win_rate:
            stages.append(("heldout", 1))
        stages += [(f"train_{step.kind}", 1) for step in cfg.training.step_list()]
        if self.win_rate:
            stages.append(("heldout_new", 1))
        if self.inputs.yardstick:
            stages.append(("yardstick", 1))
        if self.win_rate:
            stages.append(("win_rate", 1))
        with self.clock():
            self.store.upsert_round(
                self.ctx.run_id,
                self.ctx.round,
                self.ctx.model_id,
                plan_json=json.dumps(plan_record(stages)),
            )

    def stage(self, name: str, work: Callable[..., Rows], engines: dict, n: int) -> None:
        """Run a single-batch stage unless it is done, and store its rows."""
        if (name, 0) not in self.done:
            self.write(run_stage(name, 0, n, self.ctx, work, engines), name)

    def stop_engines(self, keep: EngineSpec | None = None) -> None:
        """Close the engines (all, or all but `keep`: the next stage's own)."""
        with self.clock():  # a vLLM shutdown takes seconds: the flow's own time
            close_engines(keep)

    def spec(self, model_id: str, evaluation: bool = False) -> EngineSpec:
        model = self.store.model(model_id)
        engine = (self.cfg.evaluation.engine if evaluation else None) or self.cfg.engine
        return engine_spec(model_id, model["path"], engine, self.ctx.seed)

    # -- the steps of a round -----------------------------------------------------------

    def open(self) -> bool:
        """Register the round (or find it); False when it is already finished."""
        cfg, ctx = self.cfg, self.ctx
        with self.clock(), self.store.session():
            if self.store.round_info(ctx.run_id, ctx.round) is None:
                self.store.upsert_round(ctx.run_id, ctx.round, ctx.model_id, started_at=_now())
            if self.store.round_info(ctx.run_id, ctx.round)["status"] == "finished":
                self.logger.info("round %d already finished; skipping", ctx.round)
                return False
            self.model = self.spec(ctx.model_id)
            self.plan_judges()
            policies = rounds.pair_policies(cfg)
            for method, plan in self.plans.items():  # the judge it used, `latest` resolved
                policies[method]["judge_used"] = {
                    "kind": plan.settings.kind,
                    "model_id": plan.model_id,
                }
            self.store.upsert_round(
                ctx.run_id,
                ctx.round,
                ctx.model_id,
                pair_policy_json=json.dumps(policies, sort_keys=True),
                snapshot_dir=str(self.folder),
            )
            self.done = self.store.done_batches(ctx.run_id, ctx.round)
            self.attempt = sum(stage == "flow" for stage, _ in self.done)  # resumed: 1, 2...
            self.seeds = rounds.round_prompts(self.inputs, cfg, ctx.round)
        self.policy_trained = any(produces_policy(s.kind) for s in cfg.training.step_list())
        self.win_rate = (
            cfg.evaluation.enabled and self.policy_trained and bool(self.inputs.heldout_prompts)
        )
        self.write_plan()
        return True

    def plan_judges(self) -> None:
        """Each method's judge this round, and the engine of any judge with its own model:
        `model: latest` is the reward model of the run's most recent earlier round, or the
        fallback judge until one is trained."""
        cfg, ctx = self.cfg, self.ctx
        latest = self.store.latest_scorer(ctx.run_id, ctx.round)
        self.plans = rounds.judge_plans(cfg, self.inputs, latest)
        self.judges: dict[str, EngineSpec] = {}
        for method, plan in self.plans.items():
            if plan.model_path is None:
                continue
            model_id, path = plan.model_id, plan.model_path
            if model_id is None:
                judge = resolve_model(path)
                self.store.write({"models": [judge.record("judge")]})
                model_id, path = judge.model_id, str(judge.path)
                self.plans[method] = replace(plan, model_id=model_id)
            role = "score" if plan.scorer else "generate"
            self.judges[method] = engine_spec(model_id, path, cfg.engine, ctx.seed, role)

    def _engines(self, method: str | None) -> dict[str, EngineSpec]:
        engines = {"engine": self.model}
        if method in self.judges:
            engines["judge_engine"] = self.judges[method]
        return engines

    def generate(self) -> None:
        """Self-instruct, then every missing batch of every enabled method, submitted to
        the task runner; rows are written here, in order, as each batch's result arrives."""
        cfg, ctx = self.cfg, self.ctx
        generated = []
        instruct = rounds.self_instruct_settings(cfg)
        if instruct is not None:
            with self.clock():
                earlier = self.store.generated_prompts(ctx.run_id, ctx.round, earlier=True)
            work = partial(
                rounds.self_instruct_batch,
                inputs=self.inputs,
                seeds=self.seeds,
                generated=[rounds.prompt_from_row(r) for r in earlier],
                ctx=ctx,
                settings=instruct,
            )
            self.stage("self_instruct", work, {"engine": self.model}, len(self.seeds))
            with self.clock():
                stored = self.store.generated_prompts(ctx.run_id, ctx.round)
            generated = [rounds.prompt_from_row(r) for r in stored]
            self.write_plan(len(generated))
        submitted = []
        size = cfg.engine.batch_size
        for method in cfg.enabled_methods():
            prompts = rounds.method_prompts(cfg, method, self.seeds, generated)
            batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
            for b, batch in enumerate(batches):
                if (method, b) in self.done:
                    continue
                work = partial(
                    rounds.run_batch,
                    method,
                    judge=self.plans.get(method),
                    inputs=self.inputs,
                    prompts=batch,
                    ctx=ctx,
                    cfg=cfg,
                )
                with placed(cfg, cfg.runner.generate):
                    future = run_stage.submit(
                        method, b, len(batch), ctx, work, self._engines(method)
                    )
                submitted.append((method, b, len(batches), future))
        for method, b, total, future in submitted:
            self.write(future.result(), method, b, total)

    def relabel(self) -> None:
        """The round's model labels the round's pairs again while its engine is up."""
        if not (self.cfg.evaluation.enabled and self.cfg.evaluation.agreement):
            return
        if ("agreement", 0) in self.done:
            return
        with self.clock():
            pairs = self.store.evaluation_pairs(self.ctx.run_id, self.ctx.round)
        judged = rounds.self_judge(self.cfg)
        work = partial(
            rounds.relabel_round,
            judge=self.plans.get(judged) if judged else None,
            inputs=self.inputs,
            pairs=pairs,
            ctx=self.ctx,
            cfg=self.cfg,
        )
        self.stage("agreement", work, self._engines(judged), len(pairs))

    def measure(self, stage: str, model_id: str, round_: int) -> None:
        """The yardstick: `model_id`'s held-out instruction-following accuracy, stored as
        round `round_`'s (0: the run's initial model). On the evaluation engine; the
        round's engine is reused when that is the same one."""
        if not self.inputs.yardstick or (stage, 0) in self.done:
            return
        spec = self.spec(model_id, evaluation=True)
        self.stop_engines(keep=spec)  # local engines run one at a time
        ctx = RoundContext(self.ctx.run_id, round_, model_id, self.ctx.seed)
        work = partial(
            instruction_following,
            prompts=self.inputs.yardstick,
            ctx=ctx,
            model_id=model_id,
            cfg=self.cfg.evaluation.yardstick,
        )
        rows = run_stage(stage, 0, len(self.inputs.yardstick), self.ctx, work, {"engine": spec})
        self.write(rows, stage)
        [row] = [r for r in rows["evaluations"] if r["metric"] == "ifeval_prompt_strict"]
        d = json.loads(row["details_json"])
        self.logger.info(
            "yardstick of %s (M_%d): strict prompt-level accuracy %.3f, 95%% CI [%.3f, %.3f], "
            "%d prompts",
            model_id,
            round_,
            row["value"],
            *d["ci95"],
            d["n"],
        )

    def answer_heldout(self, stage: str = "heldout", model_id: str | None = None) -> None:
        """A model answers the held-out prompts on the evaluation engine: the round's model
        before training, the trained one after."""
        if not self.win_rate:
            return
        spec = self.spec(model_id or self.ctx.model_id, evaluation=True)
        self.stop_engines(keep=spec)
        work = partial(
            heldout_answers,
            prompts=self.inputs.heldout_prompts,
            ctx=self.ctx,
            model_id=spec.model_id,
            cfg=self.cfg.evaluation,
        )
        self.stage(stage, work, {"engine": spec}, len(self.inputs.heldout_prompts))

    def train(self) -> str:
        """The round's training steps in order (those stored are skipped); returns the
        model the next round generates with: the last policy step's, else the round's."""
        cfg, ctx = self.cfg, self.ctx

        def logged(result: dict[str, Any]) -> None:
            held = {
                k: round(v, 3)
                for k, v in result["metrics"].items()
                if k.startswith("heldout_") and isinstance(v, float)
            }
            self.logger.info(
                "round %d %s training: %d rows, %.0fs, held-out %s; model %s",
                ctx.round,
                result["step"],
                result["rows"]["train"],
                result["wall_s"],
                held,
                result["model_id"],
            )

        trained = train_round(
            self.store,
            cfg.training,
            ctx.run_id,
            ctx.round,
            self.folder,
            cfg.seed,
            on_step=logged,
            launch=training_launcher(cfg),
        )
        return trained["policy"]

    def evaluate(self, new_model: str) -> None:
        """M_t+1's held-out answers against M_t's, by the fixed judge; M_t+1 on the
        yardstick; then the round's pair statistics and trainer metrics."""
        cfg, ctx = self.cfg, self.ctx
        try:
            if self.win_rate:
                self.answer_heldout("heldout_new", new_model)
            self.measure("yardstick", new_model, ctx.round)
            if self.win_rate:
                self._compare(new_model)
        finally:
            self.stop_engines()
        if cfg.evaluation.enabled:
            with self.clock():
                labels = self.store.round_labels(ctx.run_id, ctx.round, rounds.tie_reasons())
                training = self.store.training_results(ctx.run_id, ctx.round)
                names = rounds.training_metric_names()
                self.store.write(round_statistics(ctx, labels, training, names))

    def _compare(self, new_model: str) -> None:
        if ("win_rate", 0) in self.done:
            return
        self.stop_engines()
        ctx = self.ctx
        with self.clock():
            judge_id = _eval_judge(self.store, self.cfg, ctx.run_id)
            old = self.store.heldout_answers(ctx.run_id, ctx.round, ctx.model_id)
            new = self.store.heldout_answers(ctx.run_id, ctx.round, new_model)
        work = partial(
            compare_models,
            template=self.inputs.eval_judge,
            prompts=self.inputs.heldout_prompts,
            old=old,
            new=new,
            ctx=ctx,
            judge_model_id=judge_id,
            cfg=self.cfg.evaluation,
        )
        judge = {"judge": self.spec(judge_id, evaluation=True)}
        rows = run_stage("win_rate", 0, len(self.inputs.heldout_prompts), ctx, work, judge)
        self.write(rows, "win_rate")
        [row] = [r for r in rows["evaluations"] if r["metric"] == "win_rate"]
        d = json.loads(row["details_json"])
        self.logger.info(
            "round %d win rate of %s over %s: %s (%d wins, %d ties, %d losses; flip rate %s)",
            ctx.round,
            new_model,
            ctx.model_id,
            None if row["value"] is None else round(row["value"], 3),
            d["wins"],
            d["ties"],
            d["losses"],
            d["flip_rate"],
        )

    def close(self, next_model: str) -> str:
        """Store the flow's own time, then mark the round finished."""
        ctx = self.ctx
        with self.clock():
            counts = self.store.pair_counts(ctx.run_id, ctx.round)
        row = stage_metrics_row(ctx, "flow", self.attempt, 0, self.flow_seconds)
        self.store.write({"stage_metrics": [row]})
        self.store.upsert_round(
            ctx.run_id, ctx.round, ctx.model_id, status="finished", finished_at=_now()
        )
        self.logger.info(
            "round %d finished: pairs %s; next model %s", ctx.round, counts, next_model
        )
        return next_model

    def next_model(self) -> str:
        """The model a finished round hands on (its last policy step's, if any)."""
        ctx = self.ctx
        return stored_policy(self.store, self.cfg.training, ctx.run_id, ctx.round, ctx.model_id)


@flow(name="prefloop-round", flow_run_name="{run_id}-round-{round_}")
def round_flow(config_json: str, run_id: str, round_: int, model_id: str) -> str:
    """One round; returns the model id the next round generates with."""
    r = Round(config_json, run_id, round_, model_id)
    if not r.open():
        return r.next_model()
    try:
        r.generate()
        r.relabel()
        if round_ == 1:  # M_0, once per run, while its engine may still be up
            r.measure("yardstick_base", model_id, 0)
        r.answer_heldout()
    finally:
        r.stop_engines()  # training needs the memory; a crash must not leak it either
    next_model = r.train()
    r.evaluate(next_model)
    return r.close(next_model)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _eval_judge(store: Store, cfg: RunConfig, run_id: str) -> str:
    """The fixed judge: `evaluation.judge_model`, else the run's initial model."""
    if cfg.evaluation.judge_model is None:
        return store.first_round_model(run_id)
    judge = resolve_model(cfg.evaluation.judge_model)
    store.write({"models": [judge.record("judge")]})
    return judge.model_id


def prepare_run(cfg: RunConfig) -> dict[str, Any]:
    """The pre-flight, then register the run and its base model; before any engine starts."""
    inputs = preflight(cfg, cfg.name)
    config_json = cfg.model_dump_json()
    model = resolve_model(cfg.model)
    with Store(cfg.db_path, lock_timeout_s=cfg.db_lock_timeout_s) as store:
        # A run stored by an earlier prefloop (older key names) is the same run when its
        # config reads as this one.
        store.register_run(
            cfg.name,
            json.loads(config_json),
            sha256_text(config_json),
            cfg.seed,
            same=lambda stored: _same_config(stored, cfg),
        )
        store.write({"models": [model.record("base")]})
        heldout = inputs.heldout_prompts
        store.write({"prompts": [p.record(cfg.name, 0, split="heldout") for p in heldout]})
        first = store.round_info(cfg.name, 1)
    return {"model_id": first["model_id"] if first else model.model_id, "config_json": config_json}


def _same_config(stored: dict[str, Any], cfg: RunConfig) -> bool:
    try:
        return parse_config(stored) == cfg
    except PrefloopError:
        return False


def _resolve_config(config: str | dict[str, Any], overrides: list[str] | None) -> RunConfig:
    if isinstance(config, dict):
        return parse_config(config)
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
        with Store(cfg.db_path, lock_timeout_s=cfg.db_lock_timeout_s) as store:
            first = store.last_finished_round(cfg.name) + 1
    model_id = run["model_id"]
    started = time.perf_counter()
    with ray_session(cfg):  # one Ray connection for every round (threads: nothing)
        for t in range(1, first + n):
            with Store(cfg.db_path, lock_timeout_s=cfg.db_lock_timeout_s) as store:
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
