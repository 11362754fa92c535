"""A round's pairs as a `datasets.DatasetDict` in TRL's conversational preference format.

Columns: prompt (the conversation up to the user's last turn), chosen and rejected (one
assistant message each), plus pair_id, method, variant, margin and soft_label. TRL's
trainers read the files this writes with no glue, and apply the tokenizer's own chat
template, the one the engines render with.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset

from pipeline.errors import PrefloopError
from pipeline.hashing import row_id

Format = Literal["jsonl", "parquet", "hf"]
_MESSAGE = {"role": Value("string"), "content": Value("string")}
FEATURES = Features(
    {
        "pair_id": Value("string"),
        "method": Value("string"),
        "variant": Value("string"),
        "prompt": List(_MESSAGE),
        "chosen": List(_MESSAGE),
        "rejected": List(_MESSAGE),
        "margin": Value("float64"),
        "soft_label": Value("float64"),
    }
)


def to_example(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "pair_id": row["pair_id"],
        "method": row["method"],
        "variant": row["variant"],
        "prompt": json.loads(row["messages_json"]),
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
        "margin": row["margin"],
        "soft_label": row["soft_label"],
    }


def is_heldout(pair_id: str, fraction: float, seed: int) -> bool:
    """A pair's split depends only on its id and the seed: adding pairs never moves one."""
    return int(row_id("heldout", seed, pair_id), 16) / 16**32 < fraction


def split_pairs(rows: Sequence[dict[str, Any]], fraction: float, seed: int) -> DatasetDict:
    """train/test by a hash of the pair id. With a fraction above 0 and at least two
    pairs, at least one is held out (so held-out metrics always exist)."""
    examples = [to_example(r) for r in rows]
    test = [e for e in examples if is_heldout(e["pair_id"], fraction, seed)]
    if fraction > 0 and not test and len(examples) >= 2:
        test = [min(examples, key=lambda e: row_id("heldout", seed, e["pair_id"]))]
    test_ids = {e["pair_id"] for e in test}
    train = [e for e in examples if e["pair_id"] not in test_ids]
    return DatasetDict({"train": _dataset(train), "test": _dataset(test)})


def _dataset(examples: list[dict[str, Any]]) -> Dataset:
    # from_list drops the schema of an empty list; from_dict keeps it.
    columns = {name: [e[name] for e in examples] for name in FEATURES}
    return Dataset.from_dict(columns, features=FEATURES)


def write_dataset(data: DatasetDict, out: Path, fmt: Format) -> list[Path]:
    """train/test files under `out`; `datasets.load_dataset(str(out))` reads them back."""
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        data.save_to_disk(out)
        return [out]
    paths = []
    for split, ds in data.items():
        path = out / f"{split}.{fmt}"
        if fmt == "jsonl":
            ds.to_json(path, lines=True, force_ascii=False)
        else:
            ds.to_parquet(path)
        paths.append(path)
    return paths


def read_dataset(path: Path) -> DatasetDict:
    """What `write_dataset` wrote, in any of its formats."""
    path = Path(path)
    if (path / "dataset_dict.json").is_file():
        from datasets import load_from_disk

        return load_from_disk(path)
    for ext, builder in (("parquet", "parquet"), ("jsonl", "json")):
        files = {
            s: str(path / f"{s}.{ext}")
            for s in ("train", "test")
            if (path / f"{s}.{ext}").is_file()
        }
        if files:
            return load_dataset(builder, data_files=files, features=FEATURES)
    raise PrefloopError(
        f"{path}: no exported pairs here (train.parquet, train.jsonl or a saved dataset)"
    )


def preference_pairs(store: Any, training: Any, run_id: str, round_: int, seed: int) -> DatasetDict:
    """A round's pairs, filtered as the training settings say (methods, min_margin,
    exclude_flagged), split train/test by pair id."""
    rows = store.training_pairs(
        run_id, round_, training.methods, training.min_margin, training.exclude_flagged
    )
    return split_pairs(rows, training.heldout_fraction, seed)
