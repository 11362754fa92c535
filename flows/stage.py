"""Running a round's stages: the one Prefect task (`run_stage`: one batch of one stage on
the engines it names), and a runner per kind of stage that builds the batch's work from
the round. The evaluation's runners are in flows/evaluate.py; the order in
pipeline/plan.py; running them in that order in flows/loop.py.

Method batches are submitted to the task runner and stored in order as they arrive
(`Round.drain`); every other stage runs at once and is stored before the next starts.
"""

import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from flows.cluster import placed, training_launcher
from flows.engines import EngineSpec, get_engine
from flows.round import Round
from pipeline import rounds
from pipeline.engines.servers import server_rows, tally
from pipeline.errors import TransientEngineError
from pipeline.plan import Stage
from pipeline.rows import RoundContext, Rows, stage_metrics_row
from pipeline.training.step import train_next_step

log = logging.getLogger("prefloop.flow")


def _transient(task, task_run, state) -> bool:
    """Retry faults that may pass (a server's 5xx, timeouts), saying so on the console;
    a bug or bad input fails at once instead of being retried into the same error.
    Prefect asks only while the task has retries left."""
    exc = state.result(raise_on_failure=False)
    retry = isinstance(exc, (TransientEngineError, ConnectionError, TimeoutError))
    if retry:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("batch %s failed (%s); retrying it", getattr(task_run, "name", "?"), first)
    return retry


def _token_counts(engines: list) -> tuple[int, int]:
    return (
        sum(e.counter.prompt_tokens for e in engines),
        sum(e.counter.completion_tokens for e in engines),
    )


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
    before = _token_counts(distinct)
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
    after = _token_counts(distinct)
    prompt, completion = after[0] - before[0], after[1] - before[1]
    rows.add(
        "stage_metrics",
        stage_metrics_row(ctx, stage, batch, n_items, wall, prompt, completion, setup, servers),
    )
    return rows


def run_now(r: Round, stage: str, n: int, work: Callable[..., Rows], engines: dict) -> Rows:
    """One single-batch stage, run and stored before the next starts."""
    rows = run_stage(stage, 0, n, r.ctx, work, engines)
    r.write(rows, stage)
    return rows


def self_instruct(r: Round, stage: Stage, batch: int) -> None:
    """The round's new prompts, from its seeds and every earlier round's new prompts."""
    settings = rounds.self_instruct_settings(r.cfg)
    with r.clock():
        earlier = r.store.generated_prompts(r.ctx.run_id, r.ctx.round, earlier=True)
    work = partial(
        rounds.self_instruct_batch,
        inputs=r.inputs,
        seeds=r.seeds,
        generated=[rounds.prompt_from_row(p) for p in earlier],
        ctx=r.ctx,
        settings=settings,
    )
    run_now(r, stage.name, len(r.seeds), work, {"engine": r.model})


def generated_prompts(r: Round) -> list:
    """The round's self-instructed prompts as stored (none when no method takes them)."""
    if rounds.self_instruct_settings(r.cfg) is None:
        return []
    with r.clock():
        stored = r.store.generated_prompts(r.ctx.run_id, r.ctx.round)
    return [rounds.prompt_from_row(p) for p in stored]


def method_batch(r: Round, stage: Stage, batch: int) -> None:
    """Submit one batch of a method to the task runner; `Round.drain` stores it."""
    cfg, size = r.cfg, r.cfg.engine.batch_size
    prompts = rounds.method_prompts(cfg, stage.method, r.seeds, r.generated)
    chosen = prompts[batch * size : (batch + 1) * size]
    work = partial(
        rounds.run_batch,
        stage.method,
        judge=r.plans.get(stage.method),
        inputs=r.inputs,
        prompts=chosen,
        ctx=r.ctx,
        cfg=cfg,
    )
    with placed(cfg, cfg.runner.generate):
        future = run_stage.submit(
            stage.name, batch, len(chosen), r.ctx, work, r.engines(stage.method)
        )
    r.pending.append((stage.name, batch, stage.batches, future))


def agreement(r: Round, stage: Stage, batch: int) -> None:
    """The round's model labels the round's pairs again while its engine is up."""
    with r.clock():
        pairs = r.store.evaluation_pairs(r.ctx.run_id, r.ctx.round)
    judged = rounds.self_judge(r.cfg)
    work = partial(
        rounds.relabel_round,
        judge=r.plans.get(judged) if judged else None,
        inputs=r.inputs,
        pairs=pairs,
        ctx=r.ctx,
        cfg=r.cfg,
    )
    run_now(r, stage.name, len(pairs), work, r.engines(judged))


def train(r: Round, stage: Stage, batch: int) -> None:
    """One training step, from the policy the round's earlier stored steps made."""
    cfg, ctx = r.cfg, r.ctx
    result = train_next_step(
        r.store,
        cfg.training,
        stage.step,
        ctx.run_id,
        ctx.round,
        r.folder,
        cfg.seed,
        launch=training_launcher(cfg),
    )
    r.logger.info(
        "round %d %s training: %d rows, %.0fs, held-out %s; model %s",
        ctx.round,
        result["step"],
        result["rows"]["train"],
        result["wall_s"],
        held_out_words(result["metrics"]),
        result["model_id"],
    )


def held_out_words(metrics: dict[str, Any]) -> str:
    """`loss 0.693 -> 0.754, reward_accuracy 0.000 -> 0.375` (before -> after, where the
    step measured before), or `none` when nothing was held out."""
    shown = []
    for key, value in metrics.items():
        if not key.startswith("heldout_") or key.endswith("_before"):
            continue
        if not isinstance(value, float):
            continue
        before = metrics.get(f"{key}_before")
        name = key.removeprefix("heldout_")
        shown.append(
            f"{name} {before:.3f} -> {value:.3f}" if before is not None else f"{name} {value:.3f}"
        )
    return ", ".join(shown) or "none"


RUNNERS: dict[str, Callable[[Round, Stage, int], Any]] = {
    "self_instruct": self_instruct,
    "method": method_batch,
    "agreement": agreement,
    "train": train,
}
