"""What `prefloop run` shows and keeps: its terminal gets Prefect's log lines without
tracebacks and ends with one `error: ...` line when the run fails; the run's log file
(`<runs_dir>/<run>/logs/<time>.log`) gets everything, tracebacks included."""

import copy
import logging
import os
import traceback
from datetime import UTC, datetime
from pathlib import Path

ERROR_FILE = "PREFLOOP_ERROR_FILE"  # set by the supervisor: where the worker leaves its line
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def start_run_log(runs_dir: Path, run_id: str, verbose: bool = False) -> Path:
    """Send every log record (INFO and up, with tracebacks) to a new file in the run's
    folder, and strip tracebacks from the console unless `verbose`. Prefect's loggers
    propagate to the root logger, where its console handler is."""
    folder = Path(runs_dir) / run_id / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    if not verbose:
        root.handlers = [
            _OneLine(h)
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            else h
            for h in root.handlers
        ]
    root.addHandler(handler)  # propagated records reach it whatever the root's level
    return path


class _OneLine(logging.Handler):
    """A console handler that shows each record without its traceback (the log file has
    it): Prefect logs a failed task's and flow's traceback at ERROR, twice."""

    def __init__(self, inner: logging.Handler) -> None:
        super().__init__(inner.level)
        self.inner = inner

    def emit(self, record: logging.LogRecord) -> None:
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
