"""How far a running round is, from what it stored: its plan (batches per stage, in
order), the stages' metrics rows so far, and its pairs. Pure functions: `prefloop status`
reads the rows, these say what they mean."""

import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any


def plan_record(stages: Sequence[tuple[str, int]], pid: int | None = None) -> dict[str, Any]:
    """What a round stores as its plan: (stage, batches) in the order they run."""
    return {"stages": [[name, total] for name, total in stages], "pid": pid or os.getpid()}


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def round_progress(
    plan: Mapping[str, Any],
    done: Mapping[str, Mapping[str, float]],
    pairs: Mapping[str, int],
    started_at: datetime,
    now: datetime,
) -> dict[str, Any]:
    """`done`: per stage, {batches, wall_s, completion_tokens} stored so far. Returns the
    current stage and batch, pairs per method, generated tokens/s, elapsed seconds and
    an estimate of the seconds left (the stages' mean batch time so far; None before any
    batch has finished)."""
    stages = [(name, int(total)) for name, total in plan.get("stages", [])]
    current, batch, total = None, None, None
    for name, n in stages:
        got = int(done.get(name, {}).get("batches", 0))
        if got < n:
            current, batch, total = name, got + 1, n
            break
    walls = [d["wall_s"] / d["batches"] for d in done.values() if d.get("batches")]
    per_batch = sum(walls) / len(walls) if walls else None
    left_batches = sum(max(0, n - int(done.get(name, {}).get("batches", 0))) for name, n in stages)
    wall = sum(d.get("wall_s", 0.0) for d in done.values())
    tokens = sum(d.get("completion_tokens", 0) or 0 for d in done.values())
    return {
        "stage": current or "finishing",
        "batch": batch,
        "batches": total,
        "pairs": dict(sorted(pairs.items())),
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "elapsed_s": (now - started_at).total_seconds(),
        "left_s": per_batch * left_batches if per_batch is not None else None,
    }


def progress_bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done}/{total}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def training_left_s(record: Mapping[str, Any], now: float) -> float | None:
    """Seconds the training child's trainer has left at its own pace so far (None before
    its first step, or outside the training phase)."""
    step, steps, began = record.get("step") or 0, record.get("steps"), record.get("train_started")
    if record.get("phase") != "training" or not step or not steps or began is None:
        return None
    pace = (record["updated"] - began) / step
    return max(0.0, pace * (steps - step) - (now - record["updated"]))


def training_progress(record: Mapping[str, Any], now: float) -> str:
    """What a training child reported, as words: `step 12 of 40, loss 0.612, about 1m20s
    left` while it trains, else its phase (`held-out loss before training`, `saving`)."""
    if record.get("phase") != "training":
        return str(record.get("phase", "starting"))
    text = f"step {record.get('step', 0)} of {record.get('steps', '?')}"
    if record.get("loss") is not None:
        text += f", loss {record['loss']:.4g}"
    left = training_left_s(record, now)
    return text + (f", about {duration(left)} left" if left is not None else "")
