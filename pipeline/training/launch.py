"""Run a training job in a child process and read back what it produced.

The child gets a JSON spec and writes the checkpoint and `metrics.json`; the parent never
imports TRL. A crash in the child (out of memory, a bad hyper-parameter) surfaces as one
error with the child's last log lines, and leaves no half-written checkpoint behind.
"""

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.errors import PrefloopError
from pipeline.paths import DATA_DIR
from pipeline.progress import training_progress
from pipeline.training.worker import error_file

ACCELERATE_DEFAULT = DATA_DIR / "configs" / "accelerate" / "single_gpu.yaml"
LOG_TAIL = 15
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PROGRESS_EVERY_S = 15.0  # how often the parent logs the child's progress, at most
log = logging.getLogger("prefloop.training")


class TrainingError(PrefloopError):
    pass


@dataclass
class TrainSpec:
    kind: str  # a name in the training-kind registry
    trainer: str  # its trainer, "module:function" (imported in the child only)
    base_model: str  # path of the policy to start from
    data_dir: str  # train/test files written by export.write_dataset
    output_dir: str  # the checkpoint; written via output_dir + ".partial"
    training: dict[str, Any]  # TrainingConfig.model_dump()
    reference_model: str | None = None  # None = the base model (TRL's default)
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto (cuda where the child runs has it)
    extra: dict[str, Any] = field(default_factory=dict)
    progress_file: str = ""  # where the child reports its progress ("" = nowhere)


def checkpoint_dir(folder: Path, kind: str) -> Path:
    """Where a round's step of `kind` leaves its model (under the round's folder)."""
    return Path(folder) / f"model-{kind}"


def progress_file(folder: Path, kind: str) -> Path:
    """Where that step's training child reports its progress: the phase, trainer step i
    of n, the latest loss. `prefloop status` and the run's console read it."""
    out = checkpoint_dir(folder, kind)
    return out.with_name(out.name + ".progress.json")


def read_progress(path: Path | str) -> dict[str, Any] | None:
    """The child's latest progress record; None before its first (or a torn read)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def command(spec_path: Path, device: str, accelerate_config: Path | None) -> list[str]:
    """`accelerate launch` with a config file on CUDA (multi-GPU, DeepSpeed come from that
    file); plain python on CPU."""
    worker = ["-m", "pipeline.training.worker", str(spec_path)]
    if device != "cuda":
        return [sys.executable, *worker]
    config = accelerate_config or ACCELERATE_DEFAULT
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        *worker,
    ]


def die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the process that started it dies, so a killed run
    never leaves a trainer writing into the folder its resumed run trains into."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: an orphan finishes on its own; the resumed run still starts clean


def child_failed(what: str, code: int | None, log_path: Path) -> str:
    """`<what> failed with exit code N; last log lines from LOG:` and the log's end."""
    tail = log_path.read_text(errors="replace").strip().splitlines()[-LOG_TAIL:]
    return f"{what} failed with exit code {code}; last log lines from {log_path}:\n" + "\n".join(
        f"  | {line}" for line in tail
    )


def run_child(
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    tick: Callable[[], None] | None = None,
    every_s: float = PROGRESS_EVERY_S,
    timeout_s: float | None = None,
) -> int:
    """Run a child to its end, its output in `log_path`, dying with this process; call
    `tick()` every `every_s` while it runs. It is killed when this process is
    interrupted, when `tick` raises, or past `timeout_s` (TimeoutExpired). Its exit code."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
        )
        try:
            while True:
                left = every_s if deadline is None else deadline - time.monotonic()
                try:
                    return proc.wait(max(0.0, min(every_s, left)))
                except subprocess.TimeoutExpired:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                if tick is not None:
                    tick()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _progress_reporter(spec: TrainSpec) -> Callable[[], None]:
    """Logs what the child reported, when that changed."""
    last = None

    def report() -> None:
        nonlocal last
        record = read_progress(spec.progress_file) if spec.progress_file else None
        if record and (record.get("phase"), record.get("step")) != last:
            last = (record.get("phase"), record.get("step"))
            log.info("training %s: %s", spec.kind, training_progress(record, time.time()))

    return report


def run_training(
    spec: TrainSpec, accelerate_config: Path | None = None, timeout_s: float | None = None
) -> dict:
    """Train in a child process; returns the child's metrics. The checkpoint appears at
    `spec.output_dir` only when the child finished."""
    if spec.device == "auto":  # decided on the machine that trains (a Ray node, maybe)
        spec = replace(spec, device="cuda" if cuda_available() else "cpu")
    out = Path(spec.output_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / f"{out.name}.spec.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=2, default=str))
    log_path = out.parent / f"{out.name}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = command(spec_path, spec.device, accelerate_config)
    error = error_file(out)
    error.unlink(missing_ok=True)
    if spec.progress_file:
        Path(spec.progress_file).unlink(missing_ok=True)  # a killed attempt's
    try:
        code = run_child(cmd, env, log_path, _progress_reporter(spec), timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
        raise TrainingError(f"training timed out after {timeout_s:.0f}s; log: {log_path}") from None
    if code != 0:
        shutil.rmtree(partial, ignore_errors=True)
        if error.is_file():
            raise TrainingError(f"training ({spec.kind}): {error.read_text()} (log: {log_path})")
        raise TrainingError(child_failed(f"training ({spec.kind})", code, log_path))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    metrics = json.loads((out / "metrics.json").read_text())
    return {**metrics, "device": spec.device, "host": socket.gethostname()}
