"""What each training kind trains on, as a `datasets.DatasetDict` in TRL's own formats.

- Preference pairs (dpo, rm): prompt (the conversation up to the user's last turn), chosen
  and rejected (one assistant message each), plus pair_id, method, variant, margin and
  soft_label.
- Conversations (sft): messages (the prompt's conversation and the answer), plus its id,
  round, method and source.
- Unpaired answers (kto): prompt, completion (one assistant message) and label (desirable
  or not), plus the answer's id, its pair and source.
- Prompts (grpo, rloo): prompt (the conversation up to the user's last turn), plus its id
  and the round that drew it; the trainer samples the answers itself.

The data window is one round or every round so far (`training.data`); every row appears
once. TRL's trainers read the files this writes with no glue, and apply the tokenizer's
own chat template, the one the engines render with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import PrefloopError
from pipeline.hashing import row_id

if TYPE_CHECKING:  # `datasets` (pandas, pyarrow) is imported where a dataset is built, so
    # that reading the registry (every CLI command, the run's supervisor) stays light.
    from datasets import Dataset, DatasetDict, Features

Format = Literal["jsonl", "parquet", "hf"]
# A kind's columns: name -> a `datasets.Value` type, or MESSAGES (a chat: role, content).
Columns = Mapping[str, str]
MESSAGES = "messages"
PAIR_COLUMNS: Columns = {
    "pair_id": "string",
    "method": "string",
    "variant": "string",
    "prompt": MESSAGES,
    "chosen": MESSAGES,
    "rejected": MESSAGES,
    "margin": "float64",
    "soft_label": "float64",
}


def features(columns: Columns) -> Features:
    """The `datasets` schema of a kind's columns."""
    from datasets import Features, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    return Features({n: List(message) if t == MESSAGES else Value(t) for n, t in columns.items()})


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


def is_heldout(key: str, fraction: float, seed: int) -> bool:
    """A row's split depends only on its id and the seed: adding rows never moves one."""
    return int(row_id("heldout", seed, key), 16) / 16**32 < fraction


def split_examples(
    examples: Sequence[dict[str, Any]],
    columns: Columns,
    fraction: float,
    seed: int,
    group: str,
) -> DatasetDict:
    """train/test by a hash of each example's `group` column (a pair's two KTO examples
    go together). With a fraction above 0 and at least two groups, at least one is held
    out (so held-out metrics always exist)."""
    groups = sorted({e[group] for e in examples})
    test_groups = {g for g in groups if is_heldout(g, fraction, seed)}
    if fraction > 0 and not test_groups and len(groups) >= 2:
        test_groups = {min(groups, key=lambda g: row_id("heldout", seed, g))}
    test = [e for e in examples if e[group] in test_groups]
    train = [e for e in examples if e[group] not in test_groups]
    from datasets import DatasetDict

    return DatasetDict({"train": _dataset(train, columns), "test": _dataset(test, columns)})


def split_pairs(rows: Sequence[dict[str, Any]], fraction: float, seed: int) -> DatasetDict:
    """Pairs as TRL preference examples, train/test by pair id; each pair once."""
    unique = {r["pair_id"]: r for r in rows}
    examples = [to_example(r) for r in unique.values()]
    return split_examples(examples, PAIR_COLUMNS, fraction, seed, group="pair_id")


def _dataset(examples: list[dict[str, Any]], columns: Columns) -> Dataset:
    from datasets import Dataset

    # from_list drops the schema of an empty list; from_dict keeps it.
    values = {name: [e[name] for e in examples] for name in columns}
    return Dataset.from_dict(values, features=features(columns))


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


def _rows_in(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def read_dataset(path: Path, columns: Columns | None = PAIR_COLUMNS) -> DatasetDict:
    """What `write_dataset` wrote, in any of its formats (`columns`: the kind's columns,
    which an empty JSON Lines split cannot tell; None reads them from the files). An empty
    split (nothing held out) comes back empty, or absent when its columns are unknown:
    `datasets` cannot build a split from a file with no rows."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(path)
    if (path / "dataset_dict.json").is_file():
        return load_from_disk(path)
    for ext, builder in (("parquet", "parquet"), ("jsonl", "json")):
        files = {
            s: path / f"{s}.{ext}" for s in ("train", "test") if (path / f"{s}.{ext}").is_file()
        }
        if not files:
            continue
        full = {s: str(f) for s, f in files.items() if _rows_in(f) > 0}
        schema = None if columns is None else features(columns)
        data = load_dataset(builder, data_files=full, features=schema) if full else DatasetDict()
        for split, f in files.items():
            if split in data:
                continue
            if columns is None and ext == "parquet":
                import pyarrow.parquet as pq

                data[split] = Dataset(pq.read_table(f))
            elif columns is not None:
                data[split] = _dataset([], columns)
        return data
    raise PrefloopError(
        f"{path}: no exported data here (train.parquet, train.jsonl or a saved dataset)"
    )


def first_round(training: Any, round_: int) -> int:
    """The first round a step's data window covers (`training.data`)."""
    return 1 if training.data == "all" else round_


def preference_pairs(store: Any, training: Any, run_id: str, round_: int, seed: int) -> DatasetDict:
    """The window's pairs, filtered as the training settings say (methods, min_margin,
    exclude_flagged), split train/test by pair id."""
    rows = store.training_pairs(
        run_id,
        round_,
        training.methods,
        training.min_margin,
        training.exclude_flagged,
        since=first_round(training, round_),
    )
    return split_pairs(rows, training.heldout_fraction, seed)


# -- SFT: conversations (TRL's conversational language-modelling format) ---------------------

SFT_COLUMNS: Columns = {
    "example_id": "string",  # the answer's generation id
    "round": "int64",
    "method": "string",
    "source": "string",  # revision | best_of_n
    "messages": MESSAGES,
}


def _conversation(messages_json: str, answer: str) -> list[dict[str, str]]:
    return [*json.loads(messages_json), {"role": "assistant", "content": answer}]


def sft_conversations(
    store: Any, training: Any, run_id: str, round_: int, seed: int
) -> DatasetDict:
    """The window's CAI revisions and, with `sft.best_of_n`, each Self-Rewarding prompt's
    best-scored candidate (ties: the lowest generation id) when it clears `sft.min_score`;
    each answer once, split by its id."""
    since, settings = first_round(training, round_), training.sft
    examples: dict[str, dict[str, Any]] = {}
    if settings.revisions:
        for r in store.sft_revisions(run_id, round_, since, training.methods):
            examples[r["generation_id"]] = {
                "example_id": r["generation_id"],
                "round": r["round"],
                "method": r["method"],
                "source": "revision",
                "messages": _conversation(r["messages_json"], r["completion"]),
            }
    if settings.best_of_n and (training.methods is None or "self_reward" in training.methods):
        best: dict[tuple[int, str], dict[str, Any]] = {}
        for c in store.scored_candidates(run_id, round_, since):
            key = (c["round"], c["prompt_id"])
            if key not in best or c["mean_score"] > best[key]["mean_score"]:
                best[key] = c  # rows come in generation-id order: ties keep the first
        for c in best.values():
            if settings.min_score is None or c["mean_score"] >= settings.min_score:
                examples.setdefault(
                    c["generation_id"],
                    {
                        "example_id": c["generation_id"],
                        "round": c["round"],
                        "method": "self_reward",
                        "source": "best_of_n",
                        "messages": _conversation(c["messages_json"], c["text"]),
                    },
                )
    rows = sorted(examples.values(), key=lambda e: e["example_id"])
    return split_examples(rows, SFT_COLUMNS, training.heldout_fraction, seed, "example_id")


# -- KTO: unpaired desirable / undesirable answers ------------------------------------------

KTO_COLUMNS: Columns = {
    "example_id": "string",  # the answer's generation id
    "group_id": "string",  # its pair's id (the split keeps a pair together)
    "pair_id": "string",  # None for a scored candidate outside any pair
    "method": "string",
    "source": "string",  # pair | scored
    "prompt": MESSAGES,
    "completion": MESSAGES,
    "label": "bool",
}


def unpaired_examples(
    store: Any, training: Any, run_id: str, round_: int, seed: int
) -> DatasetDict:
    """Each training pair's chosen answer as desirable and its rejected one as
    undesirable; then scored Self-Rewarding candidates in no pair, by the `kto`
    thresholds. Each answer once; a pair's two examples share a split."""
    since, settings = first_round(training, round_), training.kto
    examples: dict[str, dict[str, Any]] = {}

    def add(gid, group, pair_id, method, source, messages_json, text, label):
        examples.setdefault(
            gid,
            {
                "example_id": gid,
                "group_id": group,
                "pair_id": pair_id,
                "method": method,
                "source": source,
                "prompt": json.loads(messages_json),
                "completion": [{"role": "assistant", "content": text}],
                "label": label,
            },
        )

    pairs = store.training_pairs(
        run_id, round_, training.methods, training.min_margin, training.exclude_flagged, since
    )
    for p in pairs:
        pid, msgs = p["pair_id"], p["messages_json"]
        add(p["chosen_generation_id"], pid, pid, p["method"], "pair", msgs, p["chosen"], True)
        add(p["rejected_generation_id"], pid, pid, p["method"], "pair", msgs, p["rejected"], False)
    low, high = settings.undesirable_max_score, settings.desirable_min_score
    if (low is not None or high is not None) and (
        training.methods is None or "self_reward" in training.methods
    ):
        for c in store.scored_candidates(run_id, round_, since):
            score, label = c["mean_score"], None
            if high is not None and score >= high:
                label = True
            elif low is not None and score <= low:
                label = False
            if label is not None:
                gid = c["generation_id"]
                add(gid, gid, None, "self_reward", "scored", c["messages_json"], c["text"], label)
    rows = sorted(examples.values(), key=lambda e: e["example_id"])
    return split_examples(rows, KTO_COLUMNS, training.heldout_fraction, seed, "group_id")


# -- Online RL: the round's prompts (TRL's conversational prompt-only format) ---------------

PROMPT_COLUMNS: Columns = {
    "prompt_id": "string",
    "round": "int64",  # the round that drew it
    "prompt": MESSAGES,
}


def round_prompts(store: Any, training: Any, run_id: str, round_: int, seed: int) -> DatasetDict:
    """The prompts the window's rounds drew (the draw every method of the round answers),
    each once (its latest round), split by prompt id."""
    examples: dict[str, dict[str, Any]] = {}
    for r in store.drawn_prompts(run_id, first_round(training, round_), round_):
        examples[r["prompt_id"]] = {
            "prompt_id": r["prompt_id"],
            "round": r["round"],
            "prompt": json.loads(r["messages_json"]),
        }
    rows = sorted(examples.values(), key=lambda e: e["prompt_id"])
    return split_examples(rows, PROMPT_COLUMNS, training.heldout_fraction, seed, "prompt_id")
