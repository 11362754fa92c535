"""Prompts from `datasets`: a Hub dataset, a local parquet / json / jsonl / csv file, or a
folder `save_to_disk` wrote (`prompts.datasets`). Each row gives one prompt: a text column,
or a column of chat messages cut after their last user turn. Errors are one line naming
the entry and what it has (its splits, its columns)."""

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.seeds import Prompt, check_messages

FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
DEFAULT_COLUMNS = ("prompt", "messages")  # tried in order when the entry names none


def dataset_label(index: int, source: Any) -> str:
    """How errors and `prefloop prompts` name an entry: `prompts.datasets[0] (path)`."""
    return f"prompts.datasets[{index}] ({source.path})"


def load_dataset_prompts(source: Any, index: int = 0) -> list[Prompt]:
    """The entry's prompts, in the dataset's order (its first `limit` rows)."""
    label = dataset_label(index, source)
    data = _split(source, label)
    text, messages = _column(source, data.column_names, label)
    if source.limit is not None:
        data = data.select(range(min(source.limit, len(data))))
    origin = f"{Path(source.path).name}:{source.split}"
    prompts = []
    for row, value in enumerate(data[text or messages]):
        where = f"{label}: row {row}"
        if text is not None:
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: {text!r} must be a non-empty string")
            prompts.append(Prompt.user(value, task=source.task, source=origin))
        else:
            prompts.append(
                Prompt.from_messages(
                    _up_to_last_user(value, where), task=source.task, source=origin
                )
            )
    return prompts


def _split(source: Any, label: str):
    """The entry's split as a `datasets.Dataset`."""
    import datasets

    path = Path(source.path)
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                kinds = ", ".join(FILE_BUILDERS)
                raise ConfigError(f"{label}: a data file must be one of {kinds}")
            loaded = datasets.load_dataset(builder, data_files={"train": str(path)})
        else:
            loaded = datasets.load_dataset(source.path, source.name)
    except ConfigError:
        raise
    except Exception as e:  # not found, offline and not cached, unreadable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{label}: cannot load it: {first}") from None
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if source.split not in loaded:
        raise ConfigError(f"{label}: no split {source.split!r}; it has {', '.join(loaded)}")
    return loaded[source.split]


def _column(source: Any, columns: list[str], label: str) -> tuple[str | None, str | None]:
    """(text column, messages column): the one the entry names, else `prompt`, else
    `messages`."""
    named = source.column or source.messages_column
    if named is None:
        found = next((c for c in DEFAULT_COLUMNS if c in columns), None)
        if found is None:
            raise ConfigError(
                f"{label}: no column 'prompt' or 'messages' (name one with column or "
                f"messages_column); it has {', '.join(columns)}"
            )
        return (found, None) if found == "prompt" else (None, found)
    if named not in columns:
        raise ConfigError(f"{label}: no column {named!r}; it has {', '.join(columns)}")
    return (named, None) if source.column else (None, named)


def _up_to_last_user(messages: Any, where: str) -> list[dict[str, str]]:
    """A chat row's conversation up to and including its last user turn."""
    check_messages(messages, where)
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise ConfigError(f"{where}: the conversation has no user turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages[: last + 1]]
