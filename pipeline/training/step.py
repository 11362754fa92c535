"""One training step of a round: snapshot the pairs, train in a child, register the model."""

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import PrefloopError
from pipeline.hashing import row_id, sha256_dir
from pipeline.models import MANIFEST, NOT_HASHED
from pipeline.store import Store
from pipeline.training.export import split_pairs, write_dataset
from pipeline.training.launch import TrainSpec, cuda_available, run_training


def round_dir(cfg: RunConfig, run_id: str, round_: int) -> Path:
    return Path(cfg.runs_dir) / run_id / f"round-{round_}"


def export_round(
    store: Store, cfg: RunConfig, run_id: str, round_: int, out: Path, fmt: str = "parquet"
) -> dict:
    """The round's pairs, filtered as `cfg.training` says, written under `out`."""
    t = cfg.training
    rows = store.training_pairs(run_id, round_, t.methods, t.min_margin, t.exclude_flagged)
    data = split_pairs(rows, t.heldout_fraction, cfg.seed)
    write_dataset(data, out, fmt)  # type: ignore[arg-type]
    return {split: len(ds) for split, ds in data.items()}


def train_round(
    store: Store, cfg: RunConfig, run_id: str, round_: int, kind: str | None = None
) -> dict[str, Any]:
    """Train on round `round_`'s pairs from the round's model; register and return the new
    model's row. Nothing is written to the store unless training succeeded."""
    kind = kind or cfg.training.kind
    info = store.round_info(run_id, round_)
    if info is None:
        raise PrefloopError(f"{store.path}: run {run_id!r} has no round {round_}")
    base = store.model(info["model_id"])
    if base is None:
        raise PrefloopError(
            f"{store.path}: model {info['model_id']} of round {round_} is not registered"
        )
    reference = None
    if cfg.training.reference == "initial":
        first = store.model(store.first_round_model(run_id) or "")
        reference = first["path"] if first else None

    folder = round_dir(cfg, run_id, round_)
    data_dir = folder / "pairs"
    counts = export_round(store, cfg, run_id, round_, data_dir)
    if counts["train"] == 0:
        raise PrefloopError(
            f"run {run_id!r} round {round_}: no pairs to train on after the training filters "
            f"(methods={cfg.training.methods}, min_margin={cfg.training.min_margin}, "
            f"exclude_flagged={cfg.training.exclude_flagged})"
        )
    device = "cuda" if cuda_available() else "cpu"
    spec = TrainSpec(
        kind=kind,
        base_model=base["path"],
        data_dir=str(data_dir),
        output_dir=str(folder / f"model-{kind}"),
        training=cfg.training.model_dump(mode="json"),
        reference_model=reference,
        seed=cfg.seed + round_,
        device=device,
    )
    metrics = run_training(spec, cfg.training.accelerate_config)

    out = Path(spec.output_dir)
    sha = sha256_dir(out, exclude=NOT_HASHED)
    (out / MANIFEST).write_text(
        json.dumps({"sha256": sha, "parent": base["model_id"], "kind": kind})
    )
    model_id = f"{run_id}-r{round_}-{kind}@{sha[:12]}"
    model_row = {
        "model_id": model_id,
        "parent_model_id": base["model_id"],
        "path": str(out.resolve()),
        "sha256": sha,
        "kind": "policy" if kind == "dpo" else "reward",
        "run_id": run_id,
        "round": round_,
    }
    store.write(
        {
            "models": [model_row],
            "training_runs": [
                {
                    "training_run_id": row_id(run_id, round_, kind, sha),
                    "run_id": run_id,
                    "round": round_,
                    "kind": kind,
                    "base_model_id": base["model_id"],
                    "reference_model_id": (
                        store.first_round_model(run_id) if reference else base["model_id"]
                    )
                    if kind == "dpo"
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
