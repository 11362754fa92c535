"""Evaluating a round in the flow: held-out answers of the round's model and of the one
training made, the yardstick and lm-eval's benchmarks of either (and of the run's initial
model, once), the win rate of the new model over the old by a fixed judge, and the round's
pair statistics and trainer metrics. Each runs on the evaluation's engine; the round's
engine is reused when that is the same one (lm-eval starts its own, in a child process).
"""

import json
from functools import partial

from flows.round import Round
from flows.stage import run_now, run_stage
from pipeline import rounds
from pipeline.config import RunConfig
from pipeline.evaluation.benchmarks import benchmark_task
from pipeline.evaluation.metrics import WIN_RATE, round_statistics
from pipeline.evaluation.stages import compare_models, heldout_answers
from pipeline.evaluation.yardstick import PROMPT_STRICT, instruction_following, split_metric
from pipeline.models import resolve_model
from pipeline.plan import Stage
from pipeline.rows import RoundContext, Rows
from pipeline.store import Store


def stage_model(r: Round, stage: Stage) -> str:
    """The model a stage answers with: the round's, the run's initial one, or the one
    training made (the round's own when nothing was trained)."""
    if stage.model == "trained":
        return r.next_model()
    if stage.model == "initial":
        with r.clock():
            return r.store.first_round_model(r.ctx.run_id) or r.ctx.model_id
    return r.ctx.model_id


def answers(r: Round, stage: Stage, batch: int) -> None:
    """A model's greedy answers to the held-out prompts, on the evaluation engine."""
    model_id = stage_model(r, stage)
    spec = r.spec(model_id, evaluation=True)
    r.stop_engines(keep=spec)  # local engines run one at a time
    prompts = r.inputs.heldout_prompts
    work = partial(
        heldout_answers, prompts=prompts, ctx=r.ctx, model_id=model_id, cfg=r.cfg.evaluation
    )
    run_now(r, stage.name, len(prompts), work, {"engine": spec})


def yardstick(r: Round, stage: Stage, batch: int) -> None:
    """A model's held-out instruction-following accuracy on each yardstick split, stored
    as its round's (0: the run's initial model)."""
    model_id = stage_model(r, stage)
    measured_round = 0 if stage.model == "initial" else r.ctx.round
    spec = r.spec(model_id, evaluation=True)
    r.stop_engines(keep=spec)
    splits = r.inputs.yardstick
    ctx = RoundContext(r.ctx.run_id, measured_round, model_id, r.ctx.seed)
    work = partial(
        instruction_following,
        splits=splits,
        ctx=ctx,
        model_id=model_id,
        cfg=r.cfg.evaluation.yardstick,
    )
    total = sum(len(p) for p in splits.values())
    rows = run_now(r, stage.name, total, work, {"engine": spec})
    stored = {e["metric"]: e for e in rows["evaluations"]}
    for split in splits:
        row = stored[split_metric(PROMPT_STRICT, split)]
        d = json.loads(row["details_json"])
        r.logger.info(
            "yardstick (%s) of %s (M_%d): strict prompt-level accuracy %.3f, 95%% CI "
            "[%.3f, %.3f], %d prompts",
            split,
            model_id,
            measured_round,
            row["value"],
            *d["ci95"],
            d["n"],
        )


def benchmark(r: Round, stage: Stage, batch: int) -> None:
    """One lm-eval task (the stage's batch-th) on a model, in a child process of its own,
    stored as its round's (0: the run's initial model). A task stored for that model
    already (`prefloop eval` ran it) is not run again."""
    model_id = stage_model(r, stage)
    measured_round = 0 if stage.model == "initial" else r.ctx.round
    ctx = RoundContext(r.ctx.run_id, measured_round, model_id, r.ctx.seed)
    settings = r.cfg.evaluation.benchmarks
    task = settings.tasks[batch]
    with r.clock():
        stored = task in r.store.benchmarked(ctx.run_id, ctx.round, model_id)
        path = r.store.model(model_id)["path"]
    work = partial(
        benchmark_task,
        ctx,
        model_id,
        path,
        task,
        settings,
        r.cfg.evaluation.engine or r.cfg.engine,
        r.folder / "benchmarks",
    )
    rows = run_stage(stage.name, batch, 0 if stored else 1, r.ctx, Rows if stored else work, {})
    r.write(rows, stage.name, batch, stage.batches)


def compare(r: Round, stage: Stage, batch: int) -> None:
    """The win rate of the trained model's held-out answers over the round model's, by
    the fixed judge in both orders."""
    r.stop_engines()
    ctx, new_model = r.ctx, r.next_model()
    with r.clock():
        judge_id = eval_judge(r.store, r.cfg, ctx.run_id)
        old = r.store.heldout_answers(ctx.run_id, ctx.round, ctx.model_id)
        new = r.store.heldout_answers(ctx.run_id, ctx.round, new_model)
    prompts = r.inputs.heldout_prompts
    work = partial(
        compare_models,
        template=r.inputs.eval_judge,
        prompts=prompts,
        old=old,
        new=new,
        ctx=ctx,
        judge_model_id=judge_id,
        cfg=r.cfg.evaluation,
    )
    judge = {"judge": r.spec(judge_id, evaluation=True)}
    rows = run_now(r, stage.name, len(prompts), work, judge)
    [row] = [e for e in rows["evaluations"] if e["metric"] == WIN_RATE]
    d = json.loads(row["details_json"])
    value = None if row["value"] is None else round(row["value"], 3)
    r.logger.info(
        "round %d win rate of %s over %s: %s (%d wins, %d ties, %d losses; flip rate %s)",
        ctx.round,
        new_model,
        ctx.model_id,
        value,
        d["wins"],
        d["ties"],
        d["losses"],
        None if d["flip_rate"] is None else round(d["flip_rate"], 2),
    )


def statistics(r: Round) -> None:
    """The round's pair statistics per method and its trainer metrics (recomputed on every
    attempt; their ids make a repeat insert nothing)."""
    if not r.cfg.evaluation.enabled:
        return
    ctx = r.ctx
    with r.clock():
        labels = r.store.round_labels(ctx.run_id, ctx.round, rounds.tie_reasons())
        training = r.store.training_results(ctx.run_id, ctx.round)
        names = rounds.training_metric_names()
        r.store.write(round_statistics(ctx, labels, training, names))


def eval_judge(store: Store, cfg: RunConfig, run_id: str) -> str:
    """The fixed judge: `evaluation.judge_model`, else the run's initial model."""
    if cfg.evaluation.judge_model is None:
        return store.first_round_model(run_id)
    judge = resolve_model(cfg.evaluation.judge_model)
    store.write({"models": [judge.record("judge")]})
    return judge.model_id


RUNNERS = {"answers": answers, "yardstick": yardstick, "benchmark": benchmark, "compare": compare}
