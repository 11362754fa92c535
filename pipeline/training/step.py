"""A round's training steps: for each, snapshot its data in the round's folder, train in a
child process, register the model with its parent. Policy steps chain (`[sft, dpo]`: DPO
starts from the SFT model); a scorer step (`rm`) leaves the policy as it is. A step whose
`training_runs` row exists is not trained again, so a run killed between two steps
resumes at the missing one."""

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import PrefloopError
from pipeline.hashing import row_id, sha256_dir
from pipeline.judging import JUDGES, load_judge, plan_judge
from pipeline.judging.reward_model import LATEST
from pipeline.models import MANIFEST, NOT_HASHED, format_model_id, resolve_model
from pipeline.rows import RoundContext, stage_metrics_row
from pipeline.schema import TrainingConfig
from pipeline.store import Store
from pipeline.templates import TemplateLibrary
from pipeline.training.export import first_round, write_dataset
from pipeline.training.kinds import TRAINING_KINDS, stored_policy, train_stage
from pipeline.training.launch import TrainSpec, checkpoint_dir, progress_file, run_training
from pipeline.training.rollouts import rollout_rows


def export_step(
    store: Store,
    step: TrainingConfig,
    run_id: str,
    round_: int,
    out: Path,
    seed: int,
    fmt: str = "parquet",
) -> dict[str, int]:
    """What the step's kind trains on in its data window ending at `round_`, written
    under `out` in its trainer's dataset format; rows per split."""
    data = TRAINING_KINDS[step.kind].data(store, step, run_id, round_, seed)
    write_dataset(data, out, fmt)  # type: ignore[arg-type]
    return {split: len(ds) for split, ds in data.items()}


def _reference(store: Store, step: TrainingConfig, run_id: str, round_: int, start: str):
    """The model id of the step's frozen reference (`training.reference`)."""
    if step.reference == "initial":
        return store.first_round_model(run_id) or start
    if step.reference == "round":
        return store.round_info(run_id, round_)["model_id"]
    return start


def _start_and_reference(
    store: Store, step: TrainingConfig, run_id: str, round_: int, start_model_id: str | None
) -> tuple[dict, str | None, dict | None]:
    """The step's starting model row (None: the round's model), its reference model id
    (None for a kind without one) and that model's row when it differs from the start."""
    info = store.round_info(run_id, round_)
    if info is None:
        raise PrefloopError(f"{store.path}: run {run_id!r} has no round {round_}")
    start_id = start_model_id or info["model_id"]
    base = store.model(start_id)
    if base is None:
        raise PrefloopError(f"{store.path}: model {start_id} of round {round_} is not registered")
    reference_id = None
    if TRAINING_KINDS[step.kind].uses_reference:
        reference_id = _reference(store, step, run_id, round_, start_id)
    reference = store.model(reference_id) if reference_id not in (None, start_id) else None
    return base, reference_id, reference


def load_reward(reward: Any, library: TemplateLibrary, scorer_before: bool) -> Any:
    """An online step's reward judge's files, read and checked. `model: latest` after a
    scorer step of the same round (`[rm, grpo]`) needs no fallback: a reward model exists
    by the time the online step runs."""
    latest = reward.kind == "reward_model" and reward.model == LATEST
    if latest and reward.fallback is None and scorer_before:
        return {"fallback": None}
    return load_judge(reward, library)


def scorer_before(steps: list, index: int) -> bool:
    """Whether a step before `index` trains a scorer (a reward model)."""
    return any(TRAINING_KINDS[s.kind].produces == "scorer" for s in steps[:index])


def reward_plan(store: Store, step: TrainingConfig, run_id: str, round_: int, base: dict):
    """An online step's reward judge as its child builds it (settings with `latest`
    resolved to the run's newest reward model, this round's included; the model it runs
    on and that model's id), and the models rows to register for it."""
    if step.reward is None:
        raise PrefloopError(f"training: a {step.kind} step needs a `reward` judge")
    loaded = load_reward(step.reward, TemplateLibrary(), scorer_before=True)  # checked before
    latest = store.latest_scorer(run_id, round_ + 1)  # this round's reward model included
    waits = step.reward.kind == "reward_model" and step.reward.model == LATEST
    if waits and latest is None and step.reward.fallback is None:
        raise PrefloopError(
            f"run {run_id!r} round {round_}: {step.kind}'s reward is the latest reward model "
            "and none is trained yet (put an rm step before it, or give a fallback judge)"
        )
    plan = plan_judge(step.reward, loaded, latest)
    path, model_id, models = plan.model_path, plan.model_id, []
    if JUDGES[plan.settings.kind].needs_engine:
        if path is None:  # the judge reads with the step's own starting model
            path, model_id = base["path"], base["model_id"]
        elif model_id is None:
            judge = resolve_model(path)
            path, model_id = str(judge.path), judge.model_id
            models.append(judge.record("judge"))
    settings = plan.settings.model_dump(mode="json")
    return {"settings": settings, "model_path": path, "model_id": model_id}, models


def _registered(
    store: Store,
    spec: TrainSpec,
    base: dict,
    reference_id: str | None,
    where: tuple[str, int, int],
    metrics: dict,
    rows: int,
    wall: float,
    extra_models: list[dict] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """Hash and register a finished step's checkpoint: its models row, its training_runs
    row, its stage_metrics row and an online step's rollouts, in one transaction (the step
    is done or it is not)."""
    run_id, round_, index = where
    out = Path(spec.output_dir)
    sha = sha256_dir(out, exclude=NOT_HASHED)
    (out / MANIFEST).write_text(
        json.dumps({"sha256": sha, "parent": base["model_id"], "kind": spec.kind})
    )
    model_id = format_model_id(f"{run_id}-r{round_}-{spec.kind}", sha)
    produces = TRAINING_KINDS[spec.kind].produces
    model_row = {
        "model_id": model_id,
        "parent_model_id": base["model_id"],
        "path": str(out.resolve()),
        "sha256": sha,
        "kind": "policy" if produces == "policy" else "reward",
        "run_id": run_id,
        "round": round_,
    }
    training_row = {
        "training_run_id": row_id(run_id, round_, spec.kind, sha),
        "run_id": run_id,
        "round": round_,
        "step": index,
        "kind": spec.kind,
        "base_model_id": base["model_id"],
        "reference_model_id": reference_id,
        "output_model_id": model_id,
        "config_json": json.dumps(asdict(spec), sort_keys=True, default=str),
        "metrics_json": json.dumps(metrics, sort_keys=True),
        "status": "finished",
        "finished_at": datetime.now(UTC).replace(tzinfo=None),
    }
    trained = RoundContext(run_id, round_, model_id, spec.seed)
    metrics_row = stage_metrics_row(trained, train_stage(spec.kind), 0, rows, wall)
    tables: dict[str, list] = {
        "models": [*extra_models, model_row],
        "training_runs": [training_row],
        "stage_metrics": [metrics_row],
    }
    if TRAINING_KINDS[spec.kind].online:
        sampling = spec.training[spec.kind]
        rollouts = rollout_rows(out, trained, spec.kind, training_row["training_run_id"], sampling)
        tables = {**rollouts, **tables}
    store.write(tables)
    return model_row


def train_step(
    store: Store,
    step: TrainingConfig,
    run_id: str,
    round_: int,
    folder: Path,
    seed: int,
    start_model_id: str | None = None,
    index: int = 0,
    launch: Callable[[TrainSpec, Path | None], dict] = run_training,
) -> dict[str, Any]:
    """Train one step on round `round_`'s data window from `start_model_id` (None: the
    round's model), in a child process (`launch`: here, or a Ray task on another node);
    register and return the new model's row. The data snapshot and the checkpoint go in
    `folder`. Nothing is stored unless training succeeded."""
    name = step.kind
    base, reference_id, reference = _start_and_reference(
        store, step, run_id, round_, start_model_id
    )
    begin = time.perf_counter()
    data_dir = folder / f"data-{name}"
    counts = export_step(store, step, run_id, round_, data_dir, seed)
    if counts["train"] == 0:
        raise PrefloopError(
            f"run {run_id!r} round {round_}: nothing to train {name} on after the training "
            f"filters (data={step.data}, methods={step.methods}, min_margin={step.min_margin}, "
            f"exclude_flagged={step.exclude_flagged})"
        )
    extra: dict[str, Any] = {"rounds": [first_round(step, round_), round_]}
    judge_models: list[dict] = []
    if TRAINING_KINDS[name].online:
        extra["reward"], judge_models = reward_plan(store, step, run_id, round_, base)
    spec = TrainSpec(
        kind=name,
        trainer=TRAINING_KINDS[name].trainer,
        base_model=base["path"],
        data_dir=str(data_dir),
        output_dir=str(checkpoint_dir(folder, name)),
        training=step.model_dump(mode="json"),
        reference_model=reference["path"] if reference else None,
        seed=seed + round_,
        device="auto",  # where the child runs: cuda if that machine has it
        extra=extra,
        progress_file=str(progress_file(folder, name)),
    )
    metrics = launch(spec, step.accelerate_config)
    wall = time.perf_counter() - begin
    where = (run_id, round_, index)
    model_row = _registered(
        store, spec, base, reference_id, where, metrics, counts["train"], wall, judge_models
    )
    return {**model_row, "step": name, "metrics": metrics, "rows": counts, "wall_s": wall}


def round_steps(training: Any, only: str | None = None) -> list[TrainingConfig]:
    """The round's steps; with `only`, the step of that kind (the shared settings as one
    step of that kind when the config has none)."""
    steps = training.step_list()
    if only is None:
        return steps
    if only not in TRAINING_KINDS:
        raise PrefloopError(f"--kind {only!r}: expected one of {', '.join(TRAINING_KINDS)}")
    if any(s.kind == only for s in steps):
        return steps
    shared = training.model_dump(exclude={"steps"})
    return [TrainingConfig.model_validate({**shared, "kind": only})]


def train_next_step(
    store: Store,
    training: Any,
    kind: str,
    run_id: str,
    round_: int,
    folder: Path,
    seed: int,
    launch: Callable[[TrainSpec, Path | None], dict] = run_training,
) -> dict[str, Any]:
    """Train the round's step of `kind` from the policy its earlier stored steps made (the
    round's model when they made none): what the flow runs for a `train_<kind>` stage."""
    steps = training.step_list()
    index = [s.kind for s in steps].index(kind)
    start = store.round_info(run_id, round_)["model_id"]
    policy = stored_policy(store, steps[:index], run_id, round_, start)
    return train_step(store, steps[index], run_id, round_, folder, seed, policy, index, launch)


def train_round(
    store: Store,
    training: Any,
    run_id: str,
    round_: int,
    folder: Path,
    seed: int,
    only: str | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    launch: Callable[[TrainSpec, Path | None], dict] = run_training,
) -> dict[str, Any]:
    """Train the round's steps in order (`training.step_list()`), each policy step from
    the previous one's model; a step already stored is skipped. With `only`, train that
    kind's step alone (again, if stored), from the policy the earlier stored steps made.
    Returns the policy the next round generates with and the steps trained now."""
    info = store.round_info(run_id, round_)
    if info is None:
        raise PrefloopError(f"{store.path}: run {run_id!r} has no round {round_}")
    policy, trained = info["model_id"], []
    for index, step in enumerate(round_steps(training, only)):
        output = store.finished_training(run_id, round_, step.kind)
        if (only is None and output is None) or step.kind == only:
            result = train_step(store, step, run_id, round_, folder, seed, policy, index, launch)
            output = result["model_id"]
            trained.append(result)
            if on_step is not None:
                on_step(result)
        if output is not None and TRAINING_KINDS[step.kind].produces == "policy":
            policy = output
    return {"policy": policy, "trained": trained}
