"""What a round is, in the flow: its config and inputs, where its rows come from, its store,
what it has done, its judges and engines, and the clock of the flow's own work (store
reads and writes, engine shutdowns), so that a round's wall time splits into stages,
engine starts, this, and orchestration. Running its stages: flows/stage.py and
flows/evaluate.py; their order: pipeline/plan.py.
"""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime

from prefect import get_run_logger

from flows.engines import EngineSpec, close_engines, engine_spec
from flows.runlog import console
from pipeline import rounds
from pipeline.config import parse_config
from pipeline.engines import GENERATE, SCORE
from pipeline.models import resolve_model
from pipeline.plan import FLOW, Stage, round_plan
from pipeline.progress import plan_record, progress_bar
from pipeline.rows import RoundContext, Rows, stage_metrics_row
from pipeline.store import Store
from pipeline.training.kinds import stored_policy


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Round:
    def __init__(self, config_json: str, run_id: str, round_: int, model_id: str) -> None:
        self.logger = get_run_logger()
        self.flow_seconds = 0.0
        self.pending: list = []  # submitted method batches: (stage, batch, batches, future)
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

    @contextmanager
    def clock(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.flow_seconds += time.perf_counter() - start

    # -- opening ------------------------------------------------------------------------

    def open(self) -> bool:
        """Register the round (or find it), plan its judges, read what is done; False when
        it is already finished."""
        ctx = self.ctx
        with self.clock(), self.store.session():
            if self.store.round_info(ctx.run_id, ctx.round) is None:
                self.store.upsert_round(ctx.run_id, ctx.round, ctx.model_id, started_at=now())
            if self.store.round_info(ctx.run_id, ctx.round)["status"] == "finished":
                self.logger.info("round %d already finished; skipping", ctx.round)
                return False
            self.model = self.spec(ctx.model_id)
            self.plan_judges()
            self.store.upsert_round(
                ctx.run_id,
                ctx.round,
                ctx.model_id,
                pair_policy_json=json.dumps(self.pair_policies(), sort_keys=True),
                snapshot_dir=str(self.folder.resolve()),  # `status` reads it from anywhere
            )
            self.done = self.store.done_batches(ctx.run_id, ctx.round)
            self.attempt = sum(stage == FLOW for stage, _ in self.done)  # resumed: 1, 2...
            self.seeds = rounds.round_prompts(self.inputs, self.cfg, ctx.round)
            self.store.write(rounds.draw_rows(self.seeds, ctx))
        self.generated: list | None = None  # self-instructed prompts, once made
        return True

    def pair_policies(self) -> dict:
        """How each method makes pairs, with the judge it uses this round (`latest`
        resolved)."""
        policies = rounds.pair_policies(self.cfg)
        for method, plan in self.plans.items():
            policies[method]["judge_used"] = {"kind": plan.settings.kind, "model_id": plan.model_id}
        return policies

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
            role = SCORE if plan.scorer else GENERATE
            self.judges[method] = engine_spec(model_id, path, cfg.engine, ctx.seed, role)

    # -- the plan -----------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        generated = None if self.generated is None else len(self.generated)
        return round_plan(self.cfg, self.inputs, self.ctx.round, len(self.seeds), generated)

    def write_plan(self) -> None:
        """The round's stages and their batches, in order, for `prefloop status`."""
        plan = plan_record([(s.name, s.batches) for s in self.stages()])
        with self.clock():
            self.store.upsert_round(
                self.ctx.run_id, self.ctx.round, self.ctx.model_id, plan_json=json.dumps(plan)
            )

    # -- engines ------------------------------------------------------------------------

    def spec(self, model_id: str, evaluation: bool = False) -> EngineSpec:
        """The engine spec of a registered model: the run's engine, or the evaluation's."""
        model = self.store.model(model_id)
        engine = (self.cfg.evaluation.engine if evaluation else None) or self.cfg.engine
        return engine_spec(model_id, model["path"], engine, self.ctx.seed)

    def engines(self, method: str | None) -> dict[str, EngineSpec]:
        """The round's engine, and the engine of the method's judge when it has a model."""
        engines = {"engine": self.model}
        if method in self.judges:
            engines["judge_engine"] = self.judges[method]
        return engines

    def stop_engines(self, keep: EngineSpec | None = None) -> None:
        """Close the engines (all, or all but `keep`: the next stage's own)."""
        with self.clock():  # a vLLM shutdown takes seconds: the flow's own time
            close_engines(keep)

    # -- rows ---------------------------------------------------------------------------

    def write(self, rows: Rows, stage: str, batch: int = 0, total: int = 1) -> None:
        """Store one batch's rows (with its stage_metrics row) in one transaction."""
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
        if total > 1 and console(err=True).isatty():  # a bar for long stages, in a terminal
            console(err=True).write(
                f"round {self.ctx.round} {stage:<13} {progress_bar(batch + 1, total)}\n"
            )

    def drain(self) -> None:
        """Store the submitted batches' rows, in the order they were submitted."""
        pending, self.pending = self.pending, []
        for stage, batch, total, future in pending:
            self.write(future.result(), stage, batch, total)

    # -- closing ------------------------------------------------------------------------

    def next_model(self) -> str:
        """The model the round hands on: its last stored policy step's, else its own."""
        ctx = self.ctx
        with self.clock():
            steps = self.cfg.training.step_list()
            return stored_policy(self.store, steps, ctx.run_id, ctx.round, ctx.model_id)

    def close(self) -> str:
        """Store the flow's own time, mark the round finished; returns the next model."""
        ctx = self.ctx
        next_model = self.next_model()
        with self.clock():
            counts = self.store.pair_counts(ctx.run_id, ctx.round)
        row = stage_metrics_row(ctx, FLOW, self.attempt, 0, self.flow_seconds)
        self.store.write({"stage_metrics": [row]})
        self.store.upsert_round(
            ctx.run_id, ctx.round, ctx.model_id, status="finished", finished_at=now()
        )
        self.logger.info(
            "round %d finished: pairs %s; next model %s", ctx.round, counts, next_model
        )
        return next_model
