"""What the tests share, in one place (a test module never imports another): the run config
builder, a stored round of rows, a stand-in OpenAI-compatible server, waiting on a
condition, running `prefloop` as a user does, and finding the processes a test started.
Fixtures are in conftest.py."""

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from pipeline.hashing import row_id
from pipeline.models import resolve_model
from pipeline.seeds import load_prompts
from pipeline.store import Store

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Every process the suite starts inherits this marker (`run_mark()` extends it for one
# run); at the end, none may be alive.
SESSION_MARK = "PREFLOOP_TEST_SESSION"
LOOPBACK = {"127.0.0.1", "::1"}

# Requests every engine test sends: two chats, and an A/B question.
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
]
CHOICE = [[{"role": "user", "content": "Which is better, (A) or (B)?"}]] * 3


def check_completions(results, n: int, max_tokens: int) -> None:
    """`n` completions per conversation, each with text, 1..max_tokens tokens, a finish."""
    assert len(results) == len(CONVERSATIONS)
    for completions in results:
        assert len(completions) == n
        for c in completions:
            assert isinstance(c.text, str)
            assert 0 < c.n_tokens <= max_tokens
            assert c.finish_reason in ("stop", "length")


# -- configs ---------------------------------------------------------------------------------


def tiny_config(tmp: Path, model: Path, **over: Any) -> dict:
    """A run of the tiny model in `tmp`: two rounds of every method at tiny sizes on the
    transformers engine, DPO between them, evaluation on. Each keyword replaces a
    top-level value, or, for a section, the keys it gives (`training={"steps": []}`)."""
    cfg: dict[str, Any] = {
        "name": "flowtest",
        "db_path": str(tmp / "db.duckdb"),
        "runs_dir": str(tmp / "runs"),
        "model": str(model),
        "rounds": 2,
        "engine": {"kind": "hf", "batch_size": 4},
        "prompts": {
            "files": ["data/prompts/helpful.jsonl", "data/prompts/red_team.jsonl"],
            "per_round": 6,
            "heldout": 4,
        },
        "self_reward": {
            "judge": {"kind": "template", "template": "judge_additive_5pt_prefilled"},
            "sampling": {"max_tokens": 8},
            "self_instruct": {
                "enabled": True,
                "new_prompts": 3,
                "min_words": 1,
                "sampling": {"max_tokens": 16},
            },
        },
        "rlcd": {"sampling": {"max_tokens": 8}, "rescore": True},
        "cai": {"sampling": {"max_tokens": 8}},
        "training": {"learning_rate": 1e-4, "batch_size": 4, "max_length": 128},
        "evaluation": {"sampling": {"max_tokens": 8}},
    }
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


# A quick loop: Self-Rewarding scored by a rule (tests/judge_rules.py) and RLCD, no
# self-instruct, no CAI, no evaluation; batches of 2 prompts.
QUICK = {
    "engine": {"batch_size": 2},
    "prompts": {"files": ["data/prompts/helpful.jsonl"], "per_round": 6, "heldout": 0},
    "self_reward": {
        "n_candidates": 3,
        "sampling": {"temperature": 1.0, "max_tokens": 12},
        "judge": {"kind": "function", "function": "judge_rules:word_count"},
        "self_instruct": {"enabled": False},
    },
    "rlcd": {"tasks": ["helpfulness"], "sampling": {"max_tokens": 12}, "rescore": False},
    "cai": {"enabled": False},
    "training": {"epochs": 1, "batch_size": 2, "max_length": 96},
    "evaluation": {"enabled": False},
}


def write_config(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


# -- a stored round --------------------------------------------------------------------------

GOOD = "Sure! Here is a clear, friendly and complete answer to your question."
BAD = "no"
REVISED = "Here is a careful, harmless and helpful answer, revised after a critique."


def _generation(run: str, round_: int, model_id: str, p, method: str, role: str, idx: int, text):
    return {
        "generation_id": row_id(run, round_, p.prompt_id, method, idx),
        "run_id": run,
        "round": round_,
        "method": method,
        "prompt_id": p.prompt_id,
        "model_id": model_id,
        "role": role,
        "sample_idx": idx,
        "text": text,
        "sampling_json": "{}",
        "seed": 0,
    }


def _judgment(run: str, round_: int, model_id: str, gid: str, judge: str, score: float) -> dict:
    return {
        "judgment_id": row_id(gid, judge),
        "run_id": run,
        "round": round_,
        "method": "self_reward",
        "generation_id": gid,
        "sample_idx": 0,
        "model_id": model_id,
        "template_id": judge,
        "judge_id": judge,
        "raw_output": "",
        "score": score,
        "parse_status": "ok",
        "sampling_json": "{}",
        "seed": 0,
    }


def write_round(
    store: Store,
    model_dir: Path,
    run: str,
    n: int = 24,
    soft: bool = False,
    round_: int = 1,
    cai: bool = False,
) -> None:
    """A stored round of `run` on `model_dir`'s model: an easy preference (the same good
    answer over the same curt one) on the seed prompts, the first pair flagged. `soft`:
    RLCD pairs with soft labels instead of scored Self-Rewarding ones. With `cai`, each
    prompt also has a CAI revision (an `sft_examples` row) and its two candidates are
    scored by the round's judge (GOOD 5, BAD 1); a later judge scores them the other way."""
    model = resolve_model(model_dir)
    store.write({"models": [model.record("base")]})
    if store.round_info(run, round_) is None:
        store.upsert_round(run, round_, model.model_id)
    seeds = load_prompts(ROOT / "data/prompts/helpful.jsonl")
    prompts = (seeds + load_prompts(ROOT / "data/prompts/red_team.jsonl"))[:n]
    keys = ("prompts", "round_prompts", "generations", "pairs", "sft_examples")
    rows: dict[str, list] = {k: [] for k in keys}
    rows["judgments"], rejudged = [], []
    where = (run, round_, model.model_id)
    for i, p in enumerate(prompts):
        rows["prompts"].append(p.record(run, round_))
        rows["round_prompts"].append({"run_id": run, "round": round_, "prompt_id": p.prompt_id})
        gens = [
            _generation(*where, p, "self_reward", "candidate", k, t)
            for k, t in enumerate((GOOD, BAD))
        ]
        rows["generations"] += gens
        ids = [g["generation_id"] for g in gens]
        rows["pairs"].append(
            {
                "pair_id": row_id(run, round_, "pair", p.prompt_id),
                "run_id": run,
                "round": round_,
                "method": "rlcd" if soft else "self_reward",
                "variant": "test",
                "prompt_id": p.prompt_id,
                "chosen_generation_id": ids[0],
                "rejected_generation_id": ids[1],
                "margin": None if soft else 2.0,
                "soft_label": (0.6 + 0.4 * (i % 2)) if soft else None,
                "flagged": i == 0,
                "flag_reason": "test" if i == 0 else None,
                "model_id": model.model_id,
            }
        )
        if cai:
            revision = _generation(*where, p, "cai", "revision", 0, REVISED)
            rows["generations"].append(revision)
            rows["sft_examples"].append(
                {
                    "sft_id": row_id(revision["generation_id"], "sft"),
                    "run_id": run,
                    "round": round_,
                    "method": "cai",
                    "prompt_id": p.prompt_id,
                    "generation_id": revision["generation_id"],
                }
            )
            rows["judgments"] += [
                _judgment(*where, ids[0], "own", 5.0),
                _judgment(*where, ids[1], "own", 1.0),
            ]
            rejudged += [
                _judgment(*where, ids[0], "later", 0.0),
                _judgment(*where, ids[1], "later", 9.0),
            ]
    store.write(rows)
    if rejudged:
        store.write({"judgments": rejudged})


# -- a stand-in OpenAI-compatible server -----------------------------------------------------


class FakeOpenAIServer:
    """A completions endpoint on a loopback port: answers "ok" to each of a request's `n`
    samples after `delay` seconds, after first failing `failures` requests with a 503.
    Keeps every request body it received."""

    def __init__(self, port: int = 0, delay: float = 0.02, failures: int = 0) -> None:
        self.delay, self.failures, self.bodies = delay, failures, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802  (/models)
                self._send(200, {"data": [{"id": "tiny"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                if outer.failures > 0:
                    outer.failures -= 1
                    self._send(503, {"error": "busy"})
                    return
                time.sleep(outer.delay)
                n = body.get("n", 1)
                choices = [{"index": i, "text": "ok", "finish_reason": "stop"} for i in range(n)]
                self._send(200, {"choices": choices, "usage": {"completion_tokens": n}})

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd: http.server.ThreadingHTTPServer | None = http.server.ThreadingHTTPServer(
            ("127.0.0.1", port), Handler
        )
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def hits(self) -> int:
        return len(self.bodies)

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


# -- waiting ---------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    every: float = 0.2,
) -> Any:
    """Until `condition()` returns something true (returned); fails naming `what` after
    `timeout` seconds, or as soon as `proc` (a run being watched) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {_output(proc)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _output(proc: subprocess.Popen) -> str:
    """The end of what a watched process wrote: its pipe, or its log file."""
    if proc.stdout is not None:
        return proc.stdout.read()[-3000:]
    log = getattr(proc, "log_path", None)
    return Path(log).read_text(errors="replace")[-3000:] if log else ""


# -- prefloop as a user runs it --------------------------------------------------------------


def prefloop(
    *args: Any, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """A `prefloop` command, to its end (tests/ on the path, for the judge rules)."""
    env = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def run_mark() -> str:
    """A marker for one run's processes, within the suite's."""
    return f"{os.environ[SESSION_MARK]}/{uuid.uuid4().hex[:8]}"


def start_run(
    config: Path | dict,
    tmp: Path,
    *extra: str,
    own_prefect: bool = False,
    sigint_ignored: bool = False,
    new_session: bool = False,
) -> tuple[subprocess.Popen, str]:
    """`prefloop run` as a user starts it, with its own process marker, its output on a
    pipe; reporting to the suite's Prefect API, or with `own_prefect` to a temporary
    server of the run's own. `sigint_ignored`: as a shell script's `... &` starts it;
    `new_session`: in a process group of its own (to kill the whole tree)."""
    if isinstance(config, dict):
        config = write_config(config, tmp / f"{config['name']}-{uuid.uuid4().hex[:6]}.yaml")
    mark = run_mark()
    env = {**os.environ, "PYTHONPATH": str(TESTS), SESSION_MARK: mark}
    if own_prefect:  # its temporary server reuses the home's migrated database
        env["PREFECT_API_URL"] = ""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=_ignore_sigint if sigint_ignored else None,
        start_new_session=new_session,
    )
    return proc, mark


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


# -- processes -------------------------------------------------------------------------------


def _environ(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
        return {}


def _living() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "create_time", "status"]):
        if p.pid != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def _cmd(p: psutil.Process) -> str:
    return " ".join(p.info["cmdline"] or [])[:200] or p.name()


def marked_processes(mark: str = "", since: float | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of live processes the suite (or, with `mark`, one run) started:
    those whose environment carries the marker, those in a session such a process is in
    (vLLM renames its processes and so overwrites their environment), and with `since`,
    any vLLM process started since then that descends from this process or is an orphan."""
    wanted = mark or os.environ[SESSION_MARK]
    procs = _living()
    marked = set()
    for p in procs:
        value = _environ(p).get(SESSION_MARK, "")
        if value == wanted or value.startswith(wanted + "/"):
            marked.add(p.pid)
    sessions = {_sid(p.pid) for p in procs if p.pid in marked} - {os.getsid(0), None}
    own_tracker = [  # this process's multiprocessing resource tracker ends with it
        p.pid
        for p in procs
        if p.info["ppid"] == os.getpid() and "multiprocessing.resource_tracker" in _cmd(p)
    ]
    return [
        (p.pid, _cmd(p))
        for p in procs
        if p.pid not in own_tracker
        and (p.pid in marked or _sid(p.pid) in sessions or _vllm_since(p, since, marked))
    ]


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _vllm_since(p: psutil.Process, since: float | None, marked: set[int]) -> bool:
    """A vLLM process started since `since` that is an orphan or descends from this suite;
    one whose parents lead to another live program (a benchmark beside the suite) is
    that program's."""
    if since is None or not _cmd(p).startswith("VLLM::") or p.info["create_time"] < since:
        return False
    try:
        parents = p.parents()
    except psutil.NoSuchProcess:
        return False
    for parent in parents:
        if parent.pid == os.getpid() or parent.pid in marked:
            return True
        if not _cmd_of(parent).startswith("VLLM::"):
            return parent.pid == 1 or os.getpid() in {q.pid for q in parent.parents()}
    return True


def _cmd_of(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def alive(pids) -> list[int]:
    """Which of these processes are still running (zombies are not)."""
    running = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
    return running


def kill_and_expect_gone(proc: subprocess.Popen, run: dict[int, str], within_s: float) -> None:
    """`kill -9` of `proc` alone; within `within_s` none of `run`'s processes (pid ->
    command line) may be alive. Any that are get killed after the check."""
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not alive(run), within_s, "the run's processes to end")
        assert alive(run) == [], {pid: run[pid] for pid in alive(run)}
    finally:
        for pid in alive(run):
            os.kill(pid, signal.SIGKILL)


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses of every TCP socket these processes listen on."""
    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.add(c.laddr.ip)
    return found
