"""Run a training job in a child process and read back what it produced.

The child gets a JSON spec and writes the checkpoint and `metrics.json`; the parent never
imports TRL. A crash in the child (out of memory, a bad hyper-parameter) surfaces as one
error with the child's last log lines, and leaves no half-written checkpoint behind.
"""

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.errors import PrefloopError
from pipeline.paths import DATA_DIR

ACCELERATE_DEFAULT = DATA_DIR / "configs" / "accelerate" / "single_gpu.yaml"
LOG_TAIL = 15
PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the process that started it dies, so a killed run
    never leaves a trainer writing into the folder its resumed run trains into."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: an orphan finishes on its own; the resumed run still starts clean


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
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout_s,
                preexec_fn=_die_with_parent,
            )
        except subprocess.TimeoutExpired:
            raise TrainingError(
                f"training timed out after {timeout_s:.0f}s; log: {log_path}"
            ) from None
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-LOG_TAIL:]
        raise TrainingError(
            f"training ({spec.kind}) failed with exit code {proc.returncode}; last log lines "
            f"from {log_path}:\n" + "\n".join(f"  | {line}" for line in tail)
        )
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    metrics = json.loads((out / "metrics.json").read_text())
    return {**metrics, "device": spec.device, "host": socket.gethostname()}
