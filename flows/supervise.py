"""`prefloop run` as a supervisor and a worker, so that no process outlives the run.

The command the user starts (the supervisor) starts the run itself (the worker) in a new
process group; every process the run starts (vLLM's EngineCore and workers, the training
child, Prefect's temporary server) is in that group. Then:

- the worker exits (done or failed): the supervisor kills whatever is left in the group;
- Ctrl-C or SIGTERM to the supervisor: the worker is interrupted (it stops its engines),
  given a grace period, then the group is killed;
- the supervisor is killed (`kill -9` of its PID): the worker's watchdog sees its parent
  gone within half a second and kills the whole group, itself included.

The run's scratch directory (`PREFLOOP_SCRATCH`: the worker's error line, the files
vLLM's processes leave in the temp directory) is removed by the supervisor at the end, or
by the watchdog before it kills the group.

The supervisor does no work of its own, so a SIGKILL can only land on it or the worker.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flows.runlog import ERROR_FILE
from pipeline.paths import SCRATCH_ENV

WORKER_OF = "PREFLOOP_WORKER_OF"  # in the worker's environment: the supervisor's PID
GRACE_S = 20.0


def is_worker() -> bool:
    return WORKER_OF in os.environ


def supervise(argv: list[str]) -> int:
    """Run `prefloop <argv>` as the worker and wait for it; returns its exit code. The
    run's scratch directory (the worker's error line, the engines' leftovers) goes with
    it."""
    scratch = tempfile.mkdtemp(prefix="prefloop-run-")
    error_file = Path(scratch) / "error.txt"
    error_file.touch()
    env = {**os.environ, WORKER_OF: str(os.getpid()), ERROR_FILE: str(error_file)}
    env[SCRATCH_ENV] = scratch
    worker = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *argv],
        env=env,
        start_new_session=True,
        preexec_fn=_interruptible,  # the worker stops its engines on the SIGINT it is sent
    )
    try:
        return _wait(worker)
    finally:
        line = error_file.read_text()
        shutil.rmtree(scratch, ignore_errors=True)
        if line:  # the worker's one error line, printed when nothing else can print
            sys.stderr.write(line)
            sys.stderr.flush()


def _wait(worker: subprocess.Popen) -> int:

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    # A process started in the background by a shell inherits SIGINT ignored, and Python
    # then leaves it ignored: `kill -INT` must stop the run however it was started.
    signal.signal(signal.SIGINT, interrupted)
    try:
        return worker.wait()
    except KeyboardInterrupt:
        _signal_group(worker.pid, signal.SIGINT)  # the worker stops its engines
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
            worker.wait(GRACE_S)
        sys.stderr.write("error: interrupted; run the same command to resume where it stopped\n")
        return 130
    finally:
        _signal_group(worker.pid, signal.SIGKILL)  # anything the worker left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(5)


def watch_supervisor() -> None:
    """In the worker: end the whole process group when the supervisor is gone."""
    supervisor = int(os.environ[WORKER_OF])

    def watch() -> None:
        while True:
            if os.getppid() != supervisor:  # nobody is left to remove the scratch directory
                shutil.rmtree(os.environ.get(SCRATCH_ENV, ""), ignore_errors=True)
                os.killpg(os.getpgrp(), signal.SIGKILL)
            time.sleep(0.5)

    threading.Thread(target=watch, name="prefloop-watchdog", daemon=True).start()


def start_prefect_api() -> Callable[[], None]:
    """Start the temporary Prefect API server that a run without PREFECT_API_URL gets, in
    a thread, so that its start (a uvicorn process: ~5 s on 2 cores) overlaps the
    pre-flight checks instead of following them. Returns the wait for it, which raises
    what the start raised; the flow then finds it running. A configured server, or
    ephemeral mode switched off, starts nothing. Only in the worker: a run that fails its
    checks leaves the server to the supervisor's end of the process group."""
    failed: list[BaseException] = []

    def start() -> None:
        try:
            from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

            if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
                return
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()  # the instance get_client() uses, started
        except BaseException as e:  # noqa: BLE001 (raised where the run waits for it)
            failed.append(e)

    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return wait


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python's own handler, if it was ignored


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
