"""Seed prompt files: JSONL, one prompt a line, as {"prompt": str} or {"messages": [...]}."""

import json
from pathlib import Path

from pipeline.engines.base import Conversation
from pipeline.errors import ConfigError

_ROLES = {"system", "user", "assistant"}


def load_prompt_file(path: Path) -> list[Conversation]:
    """Conversations from a JSONL file; an error names the file and line."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: prompts file not found") from None
    conversations: list[Conversation] = []
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
        conversations.append(_conversation(path, lineno, row))
    return conversations


def _conversation(path: Path, lineno: int, row: object) -> Conversation:
    where = f"{path}:{lineno}"
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected an object with 'prompt' or 'messages'")
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ConfigError(f"{where}: 'prompt' must be a string")
        return [{"role": "user", "content": row["prompt"]}]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: expected 'prompt' (string) or 'messages' (non-empty list)")
    for m in messages:
        if not (
            isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)
        ):
            raise ConfigError(
                f"{where}: each message needs a role (system/user/assistant) and string content"
            )
    if messages[-1]["role"] != "user":
        raise ConfigError(f"{where}: the last message must be the user's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
