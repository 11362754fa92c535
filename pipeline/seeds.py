"""Prompts: the row every method starts from, and the seed prompt files (JSONL).

A file holds one prompt a line, as {"prompt": str} or {"messages": [...]}, with an
optional "task" (e.g. "harmlessness": RLCD picks its descriptor file by it).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.engines.base import Conversation
from pipeline.errors import ConfigError
from pipeline.hashing import row_id

_ROLES = {"system", "user", "assistant"}
_TASK = r"^[a-z][a-z0-9_]*$"


@dataclass(frozen=True)
class Prompt:
    """A conversation that ends with the user's turn; its id is a hash of the messages, so
    the same prompt has the same id in every round and run."""

    messages: tuple[tuple[str, str], ...]
    task: str | None = None
    source: str = "seed"
    generation_id: str | None = None  # the generation that wrote it (self-instruct)

    @classmethod
    def from_messages(cls, messages: Conversation, **kw: Any) -> "Prompt":
        return cls(tuple((m["role"], m["content"]) for m in messages), **kw)

    @classmethod
    def user(cls, text: str, **kw: Any) -> "Prompt":
        return cls((("user", text),), **kw)

    @property
    def prompt_id(self) -> str:
        return row_id("prompt", self.messages)

    @property
    def conversation(self) -> Conversation:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def text(self) -> str:
        """The last user turn: what a judge is shown as the request."""
        return self.messages[-1][1]

    def record(self, run_id: str, round_: int, split: str = "train") -> dict[str, Any]:
        return {
            "run_id": run_id,
            "prompt_id": self.prompt_id,
            "round": round_,
            "source": self.source,
            "split": split,
            "task": self.task,
            "text": self.text,
            "messages_json": json.dumps(self.conversation),
            "generation_id": self.generation_id,
        }


def load_prompts(path: Path) -> list[Prompt]:
    """Prompts from a JSONL file; an error names the file and line."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: prompts file not found") from None
    prompts: list[Prompt] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: not UTF-8 (byte {e.start})") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        prompts.append(_prompt(path, lineno, row))
    return prompts


def load_prompt_file(path: Path) -> list[Conversation]:
    return [p.conversation for p in load_prompts(path)]


def _prompt(path: Path, lineno: int, row: object) -> Prompt:
    where = f"{path}:{lineno}"
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected an object with 'prompt' or 'messages'")
    task = row.get("task")
    if task is not None and not (isinstance(task, str) and re.match(_TASK, task)):
        raise ConfigError(f"{where}: 'task' must be a lower-case name such as harmlessness")
    source = Path(path).name
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
        return Prompt.user(row["prompt"], task=task, source=source)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: expected 'prompt' (string) or 'messages' (non-empty list)")
    check_messages(messages, where)
    if messages[-1]["role"] != "user":
        raise ConfigError(f"{where}: the last message must be the user's")
    return Prompt.from_messages(messages, task=task, source=source)


def check_messages(messages: Any, where: str) -> None:
    """A non-empty list of {role: system/user/assistant, content: str}."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: messages must be a non-empty list")
    for m in messages:
        if not (
            isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)
        ):
            raise ConfigError(
                f"{where}: each message needs a role (system/user/assistant) and string content"
            )
