"""One training step of a round: snapshot its data, train in a child, register the model."""

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import PrefloopError
from pipeline.hashing import row_id, sha256_dir
from pipeline.models import MANIFEST, NOT_HASHED
from pipeline.schema import TrainingConfig
from pipeline.store import Store
from pipeline.training.export import write_dataset
from pipeline.training.kinds import TRAINING_KINDS
from pipeline.training.launch import TrainSpec, cuda_available, run_training


def export_round(
    store: Store,
    training: TrainingConfig,
    run_id: str,
    round_: int,
    out: Path,
    seed: int,
    fmt: str = "parquet",
    kind: str | None = None,
) -> dict[str, int]:
    """What the training kind trains on from round `round_`, written under `out` in its
    trainer's dataset format; rows per split."""
    data = TRAINING_KINDS[kind or training.kind].data(store, training, run_id, round_, seed)
    write_dataset(data, out, fmt)  # type: ignore[arg-type]
    return {split: len(ds) for split, ds in data.items()}


def train_round(
    store: Store,
    training: TrainingConfig,
    run_id: str,
    round_: int,
    folder: Path,
    seed: int,
    kind: str | None = None,
) -> dict[str, Any]:
    """Train on round `round_`'s data from the round's model, in a child process; register
    and return the new model's row. `folder` is the round's snapshot folder (the exported
    data and the checkpoint go there). Nothing is stored unless training succeeded."""
    name = kind or training.kind
    entry = TRAINING_KINDS[name]
    info = store.round_info(run_id, round_)
    if info is None:
        raise PrefloopError(f"{store.path}: run {run_id!r} has no round {round_}")
    base = store.model(info["model_id"])
    if base is None:
        raise PrefloopError(
            f"{store.path}: model {info['model_id']} of round {round_} is not registered"
        )
    reference = None
    if entry.uses_reference and training.reference == "initial":
        first = store.model(store.first_round_model(run_id) or "")
        reference = first["path"] if first else None

    data_dir = folder / "pairs"
    counts = export_round(store, training, run_id, round_, data_dir, seed, kind=name)
    if counts["train"] == 0:
        raise PrefloopError(
            f"run {run_id!r} round {round_}: nothing to train {name} on after the training "
            f"filters (methods={training.methods}, min_margin={training.min_margin}, "
            f"exclude_flagged={training.exclude_flagged})"
        )
    device = "cuda" if cuda_available() else "cpu"
    spec = TrainSpec(
        kind=name,
        trainer=entry.trainer,
        base_model=base["path"],
        data_dir=str(data_dir),
        output_dir=str(folder / f"model-{name}"),
        training=training.model_dump(mode="json"),
        reference_model=reference,
        seed=seed + round_,
        device=device,
    )
    metrics = run_training(spec, training.accelerate_config)

    out = Path(spec.output_dir)
    sha = sha256_dir(out, exclude=NOT_HASHED)
    (out / MANIFEST).write_text(
        json.dumps({"sha256": sha, "parent": base["model_id"], "kind": name})
    )
    model_id = f"{run_id}-r{round_}-{name}@{sha[:12]}"
    model_row = {
        "model_id": model_id,
        "parent_model_id": base["model_id"],
        "path": str(out.resolve()),
        "sha256": sha,
        "kind": "policy" if entry.produces == "policy" else "reward",
        "run_id": run_id,
        "round": round_,
    }
    store.write(
        {
            "models": [model_row],
            "training_runs": [
                {
                    "training_run_id": row_id(run_id, round_, name, sha),
                    "run_id": run_id,
                    "round": round_,
                    "kind": name,
                    "base_model_id": base["model_id"],
                    "reference_model_id": (
                        store.first_round_model(run_id) if reference else base["model_id"]
                    )
                    if entry.uses_reference
                    else None,
                    "output_model_id": model_id,
                    "config_json": json.dumps(asdict(spec), sort_keys=True, default=str),
                    "metrics_json": json.dumps(metrics, sort_keys=True),
                    "status": "finished",
                    "finished_at": datetime.now(UTC).replace(tzinfo=None),
                }
            ],
        }
    )
    return {**model_row, "metrics": metrics, "pairs": counts}
