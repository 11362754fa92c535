"""Prefect flows: the loop over rounds, and one round.

A round runs the stages of its plan (pipeline/plan.py) in order: self-instruct, each
enabled method batch by batch on one shared engine, agreement, held-out answers, then
(every engine stopped) the training steps, then the trained model's evaluation. The
round t+1 generates with the model round t's last policy step made.

Resume: every batch's rows and its `stage_metrics` row land in one transaction, so a
batch is either done (skipped on re-run) or absent (redone); a training step's row and
its `stage_metrics` row land together too. Only this process writes to DuckDB; a task
gets what it needs in its arguments (the round's loaded inputs, engine specs) and
returns rows.
"""

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import evaluate, stage
from flows.cluster import ray_session, task_runner
from flows.round import Round
from pipeline import report
from pipeline.config import RunConfig, load_config, parse_config
from pipeline.errors import PrefloopError
from pipeline.hashing import sha256_text
from pipeline.models import resolve_model
from pipeline.plan import SELF_INSTRUCT, Stage
from pipeline.preflight import preflight
from pipeline.rounds import load_inputs
from pipeline.store import Store

RUNNERS = {**stage.RUNNERS, **evaluate.RUNNERS}


def run_stage_batches(r: Round, s: Stage) -> None:
    """Every batch of the stage that is not stored yet. Method batches run side by side
    (submitted); anything else first stores them, as it may read their rows."""
    if s.kind != "method":
        r.drain()
    if not s.uses_engines:
        r.stop_engines()
    for batch in range(s.batches):
        if (s.name, batch) not in r.done:
            RUNNERS[s.kind](r, s, batch)


def run_round(r: Round) -> None:
    """The round's stages in order. Self-instruct runs first and the plan is written
    again with the prompts it made, since the methods' batches follow from them."""
    r.write_plan()
    first = r.stages()[0]
    if first.name == SELF_INSTRUCT:
        run_stage_batches(r, first)
    r.generated = stage.generated_prompts(r)  # [] when no method takes them
    r.write_plan()
    for s in r.stages():
        if s.name != SELF_INSTRUCT:
            run_stage_batches(r, s)
    r.drain()


@flow(name="prefloop-round", flow_run_name="{run_id}-round-{round_}")
def round_flow(config_json: str, run_id: str, round_: int, model_id: str) -> str:
    """One round; returns the model id the next round generates with."""
    r = Round(config_json, run_id, round_, model_id)
    if not r.open():
        return r.next_model()
    try:
        run_round(r)
    finally:
        r.stop_engines()  # a crash must not leak an engine's memory either
    evaluate.statistics(r)
    return r.close()


def prepare_run(cfg: RunConfig, checked: bool = False) -> dict[str, Any]:
    """The pre-flight (unless the caller has just run it: `checked`), then register the
    run and its base model; before any engine starts."""
    inputs = load_inputs(cfg) if checked else preflight(cfg, cfg.name)
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
    checked: bool = False,
) -> dict[str, Any]:
    """Run `rounds` rounds (default: the config's); round t+1 generates with the model
    round t registered. `config` is a YAML path (read at run time, so a deployment picks
    up edits) or a config mapping. With `extend`, the rounds come after the run's last
    finished round: each scheduled run of a deployment continues the loop. `checked`: the
    caller ran the pre-flight on this config just before (`prefloop run`); a
    deployment's run checks again."""
    logger = get_run_logger()
    cfg = _resolve_config(config, overrides)
    n = rounds or cfg.rounds
    run = prepare_run(cfg, checked)
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
