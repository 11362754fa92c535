"""What `prefloop run` shows and keeps. Its terminal gets prefloop's own lines (a batch
stored, an engine started, a training step's progress), anyone's errors, without
tracebacks, and ends with one `error: ...` line when the run fails. The run's log file
(`<runs_dir>/<run>/logs/<time>.log`) gets everything: tracebacks, Prefect's task states,
and all that vLLM, torch and the engines' processes print (their file descriptors 1 and 2
point at it). `--verbose` leaves the terminal as it was: everything, tracebacks too."""

import copy
import logging
import os
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

ERROR_FILE = "PREFLOOP_ERROR_FILE"  # set by the supervisor: where the worker leaves its line
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OURS = tuple(str(Path(__file__).resolve().parents[1] / pkg) for pkg in ("pipeline", "flows"))
_CONSOLE: dict[str, TextIO] = {}  # "out" / "err": the terminal, once fds 1 and 2 are the log


def console(err: bool = False) -> TextIO:
    """Where a line for the person watching goes: the terminal, even after the run's file
    descriptors were pointed at its log file."""
    return _CONSOLE.get("err" if err else "out") or (sys.stderr if err else sys.stdout)


def start_run_log(runs_dir: Path, run_id: str, verbose: bool = False) -> Path:
    """Send every log record (INFO and up, with tracebacks) to a new file in the run's
    folder. Unless `verbose`, the console shows prefloop's own records and others' errors
    in one line each, and whatever else writes to this process's stdout and stderr (and
    its children's: vLLM's engine processes) goes to that file. Prefect's loggers
    propagate to the root logger, where its console handler is."""
    folder = Path(runs_dir) / run_id / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    logging.getLogger("prefloop").setLevel(logging.INFO)  # engines, training progress
    if not verbose:
        _point_output_at(path)
        root.handlers = [_Quiet(h) if _is_console(h) else h for h in root.handlers]
    root.addHandler(handler)  # propagated records reach it whatever the root's level
    return path


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def _point_output_at(path: Path) -> None:
    """Keep the terminal (as `console()`), then point file descriptors 1 and 2 at the log
    file, appending: what libraries print, here and in the processes started from now on,
    lands there."""
    if _CONSOLE:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    _CONSOLE["out"] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    _CONSOLE["err"] = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class _Quiet(logging.Handler):
    """A console handler that shows prefloop's own records and anyone's errors, each
    without its traceback (the log file has it): Prefect logs a failed task's and flow's
    traceback at ERROR, twice; its task states and vLLM's records stay in the file."""

    def __init__(self, inner: logging.StreamHandler) -> None:
        super().__init__(inner.level)
        self.inner = inner
        inner.setStream(console(err=True))
        if hasattr(inner, "console"):  # Prefect's handler prints through rich
            inner.console.file = console(err=True)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR and not record.pathname.startswith(_OURS):
            return
        shown = copy.copy(record)
        text = record.getMessage().split("\nTraceback (most recent call last)")[0]
        # An exception's repr with its detail ("...:\\n  | ...") as one short line.
        head = text.split("\\n")[0].split("\n")[0]
        shown.msg = head + (" ..." if head != text else "")
        shown.args, shown.exc_info, shown.exc_text, shown.stack_info = None, None, None, None
        self.inner.handle(shown)


def one_line(message: str) -> str:
    """An error message as one line: its first line, and the last line of any detail (a
    training child's exception)."""
    lines = [ln.strip().lstrip("| ").strip() for ln in message.strip().splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) <= 1:
        return lines[0] if lines else message.strip()
    return f"{lines[0]} ... {lines[-1]}"


def record_failure(log: Path | None, exc: BaseException) -> None:
    """The full traceback into the run's log file."""
    if log is None:
        return
    with open(log, "a", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(exc)))
