"""Fixtures (the default model, a tiny random model with the real tokenizer, engines on it,
the suite's Prefect API, Chromium) and the suite's rules: what counts as slow, and that no
process it started outlives it. Shared helpers are in tests/helpers.py."""

import contextlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import SESSION_MARK, marked_processes

from pipeline.engines.local_server import free_port as _free_port
from pipeline.models import DEFAULT_MODEL, MODELS_DIR

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Every process the suite starts inherits this marker; at the end, none may be alive.
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


@pytest.fixture(scope="session")
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


@pytest.fixture(autouse=True)
def _prefect_for_slow_tests(request):
    """A slow test (a flow, a `prefloop run` it starts) reports to the suite's Prefect
    API; the fast tests never start it."""
    if "slow" in request.keywords:
        request.getfixturevalue("prefect_api")


@pytest.fixture
def harness(prefect_api):
    """Flows in the test process report to the suite's Prefect API."""
    yield


SESSION_START = time.time()


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


# Fixtures that start a model, an engine, a server or Prefect: a test that uses one is
# slow, and says so (`-m "not slow"` is the fast inner loop).
SLOW_FIXTURES = {
    "tiny_model_dir",
    "default_model_dir",
    "tiny_engine",
    "hf_engine",
    "vllm_engine",
    "harness",
    "prefect_api",
    "chromium",
}


def pytest_collection_modifyitems(config, items):
    unmarked = [
        f"{item.nodeid} (uses {', '.join(sorted(SLOW_FIXTURES & set(item.fixturenames)))})"
        for item in items
        if SLOW_FIXTURES & set(item.fixturenames) and "slow" not in item.keywords
    ]
    if unmarked:
        raise pytest.UsageError("mark these tests slow:\n  " + "\n  ".join(unmarked))
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
    return _free_port()


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


class Chromium:
    """Debian's Chromium, headless, on local files: the DOM after the page loaded, or a
    screenshot (a PNG)."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    )

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def _run(self, path: Path, tmp: Path, *args: str, fragment: str = "") -> str:
        import subprocess

        url = path.resolve().as_uri() + (f"#{fragment}" if fragment else "")
        out = subprocess.run(
            [self.binary, *self.FLAGS, f"--user-data-dir={tmp}", *args, url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    def dom(self, path: Path, tmp: Path, fragment: str = "") -> str:
        return self._run(path, tmp, "--dump-dom", fragment=fragment)

    def screenshot(self, path: Path, tmp: Path, size: str = "1200,2400", fragment: str = ""):
        tmp.mkdir(parents=True, exist_ok=True)
        png = tmp / f"{path.stem}.png"
        self._run(path, tmp, f"--screenshot={png}", f"--window-size={size}", fragment=fragment)
        return png


@pytest.fixture(scope="session")
def chromium() -> Chromium:
    """Chromium (`make test` installs Debian's package)."""
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium package")
    return Chromium(binary)
