"""The multi-machine path on loopback: two `vllm serve` processes of the tiny model behind
one engine, a Ray cluster (head bound to 127.0.0.1, started from a folder with no
checkout in it) running the round's tasks and its training step, and one of the two
servers killed mid-round. Each run is the real `prefloop run`; results are compared with
the thread runner's for the same seeds."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    CHOICE,
    CONVERSATIONS,
    check_completions,
    finish,
    kill_and_expect_gone,
    marked_processes,
    start_run,
    tiny_config,
    write_config,
)

from pipeline.engines import Sampling, start_engine
from pipeline.engines.local_server import (
    launch_vllm_server,
    server_down,
    stop_server,
    wait_vllm_server,
)
from pipeline.schema import EngineConfig
from pipeline.store import Store

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """Two OpenAI-compatible servers of the tiny model, started side by side."""
    logs = tmp_path_factory.mktemp("servers")
    launched = [launch_vllm_server(tiny_model_dir, logs) for _ in range(2)]
    try:
        for proc, url in launched:
            wait_vllm_server(proc, url)
        yield launched
    finally:
        for proc, _ in launched:
            stop_server(proc)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head` on 127.0.0.1, run from an empty folder: its workers' working
    directory has no prompts, templates or models, so a task that read one by a relative
    path would fail."""
    import socket

    elsewhere = tmp_path_factory.mktemp("ray-node")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Ray 2.60 turns token authentication on for `ray start` and finds the token in
    # ~/.ray, which other Ray processes on the machine rewrite: the loopback test cluster
    # runs without it, and so does every client of it (the flow runs inherit this).
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port)]
    start += ["--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"]
    out = subprocess.run(start, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    try:
        yield {"address": f"127.0.0.1:{port}", "cwd": elsewhere}
    finally:
        subprocess.run([RAY, "stop", "--force"], cwd=elsewhere, env=env, capture_output=True)
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before


def _config(tmp_path: Path, model: Path, name: str, urls: list[str], runner: dict) -> Path:
    cfg = tiny_config(
        tmp_path / name,
        model,
        name="cluster",
        rounds=1,
        prompts={"per_round": 6, "heldout": 0},
        self_reward={
            "judge": {"kind": "template", "template": "judge_additive_5pt_prefilled"},
            "sampling": {"max_tokens": 8},
            "self_instruct": {"enabled": False},
        },
        cai={"enabled": False},
        evaluation={"enabled": False},
        runner=runner,
    )
    cfg["engine"] = {
        "kind": "openai",
        "base_url": urls,
        "served_model_name": "tiny",
        "max_model_len": 512,
        "batch_size": 2,
        "max_retries": 2,
    }
    return write_config(cfg, tmp_path / f"{name}.yaml")


def _run(path: Path, tmp_path: Path, timeout: float = 600) -> str:
    proc, _ = start_run(path, tmp_path)
    out = finish(proc, timeout)
    assert proc.returncode == 0 and "final model" in out, out[-4000:]
    return out


def _run_killing(path: Path, tmp_path: Path, server, when) -> tuple[int, str]:
    """`prefloop run`; kills the server's process group at the first output line for
    which `when(line)` holds; returns the exit code and the output."""
    proc, _ = start_run(path, tmp_path)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if when(line):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            break
    seen += proc.stdout.readlines()
    proc.wait(timeout=600)
    return proc.returncode, "".join(seen)


def _content(path: Path) -> dict:
    db = json.loads(path.read_text())["db_path"]
    with Store(db, read_only=True) as store:
        pairs = store.query("SELECT pair_id, method FROM pairs ORDER BY pair_id")
        generations = store.query("SELECT count(*) AS n FROM generations")[0]["n"]
        models = [r["model_id"] for r in store.query("SELECT model_id FROM models")]
        servers = [
            json.loads(r["servers_json"])
            for r in store.query(
                "SELECT servers_json FROM stage_metrics WHERE stage IN ('self_reward', 'rlcd') "
                "ORDER BY stage, batch"
            )
        ]
        training = store.query("SELECT metrics_json FROM training_runs")
    return {
        "pair_ids": [p["pair_id"] for p in pairs],
        "counts": {m: sum(p["method"] == m for p in pairs) for m in ("self_reward", "rlcd")},
        "generations": generations,
        "models": sorted(models),
        "servers": servers,
        "training": [json.loads(t["metrics_json"]) for t in training],
    }


def test_openai_engine_against_vllm_serve(tiny_model_dir, servers, hf_engine):
    """Through one server: samples as asked, and label probabilities equal to a local
    forward pass (the echoed prompt log-probs)."""
    cfg = EngineConfig(
        kind="openai", base_url=servers[0][1], served_model_name="tiny", max_model_len=512
    )
    with start_engine(tiny_model_dir, cfg, seed=0) as engine:
        results = engine.generate(CONVERSATIONS, Sampling(n=2, temperature=1.0, max_tokens=8))
        check_completions(results, n=2, max_tokens=8)
        # Counted from the token ids the server returns: a choice cut at the limit has
        # exactly max_tokens, whatever its text re-encodes to.
        cut = [c for r in results for c in r if c.finish_reason == "length"]
        assert cut and all(c.n_tokens == 8 for c in cut)
        probs = engine.choice_probs(CHOICE[:2], ["A", "B"], prefix="(")
        # Two labels among the server's top 20 next tokens (read from that list) and one
        # outside it (read by echoing the prompt with it): both equal a local forward pass.
        ids = engine.encode(engine.render(CHOICE[0], "("))
        body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "logprobs": 20}
        top = engine._post({**body, "return_tokens_as_token_ids": True})
        ranked = top["choices"][0]["logprobs"]["top_logprobs"][0]
        inside = [int(k.split(":")[1]) for k in sorted(ranked, key=ranked.get)[-2:]]
        outside = next(i for i in range(1000) if f"token_id:{i}" not in ranked)
        labels = [*inside, outside]
        got = engine._label_logprobs([ids], labels)
    reference = hf_engine.choice_probs(CHOICE[:2], ["A", "B"], prefix="(")
    for got_probs, want in zip(probs, reference, strict=True):
        assert got_probs[0] == pytest.approx(want[0], abs=2e-3)
    # Log-probabilities near -10 (a random model): 1e-2 is a 1% difference in probability;
    # the server's last-position logits and a local forward pass differ by ~4e-3.
    assert got[0] == pytest.approx(hf_engine._label_logprobs([ids], labels)[0], abs=1e-2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, servers):
    """The thread runner's round (two workers) on both servers."""
    tmp = tmp_path_factory.mktemp("threads")
    path = _config(tmp, tiny_model_dir, "threads", [u for _, u in servers], {"workers": 2})
    _run(path, tmp)
    return _content(path)


def test_round_on_ray_equals_the_thread_runner(
    tmp_path, tiny_model_dir, servers, ray_cluster, reference
):
    cwd = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, ray; ray.init(address=os.environ['A'], log_to_driver=False); "
            "print(ray.get(ray.remote(lambda: os.getcwd()).remote()))",
        ],
        env={**os.environ, "A": ray_cluster["address"]},
        capture_output=True,
        text=True,
        timeout=600,  # a Ray worker's first start is slow on a loaded 2-core machine
    )
    assert cwd.returncode == 0 and cwd.stdout.strip(), cwd.stdout[-1000:] + cwd.stderr[-2000:]
    assert Path(cwd.stdout.strip().splitlines()[-1]) == ray_cluster["cwd"], cwd.stderr[-2000:]

    runner = {
        "kind": "ray",
        "address": ray_cluster["address"],
        "generate": {"num_cpus": 0.5},
        # Ray caps a task's threads at its CPUs (OMP_NUM_THREADS): with both cores, the
        # child trains with the thread count of a local child, so to the same weights.
        "train": {"num_cpus": 2},
    }
    path = _config(tmp_path, tiny_model_dir, "ray", [u for _, u in servers], runner)
    _run(path, tmp_path)
    got = _content(path)
    assert reference["counts"]["self_reward"] > 0 and reference["counts"]["rlcd"] > 0
    assert got["pair_ids"] == reference["pair_ids"]
    assert got["counts"] == reference["counts"]
    assert got["generations"] == reference["generations"]
    # The training step ran as a Ray task and trained the same weights.
    assert [bool(t.get("ray_node")) for t in got["training"]] == [True]
    assert not reference["training"][0].get("ray_node")
    assert got["models"] == reference["models"]
    # Both servers took requests, and each batch says how many per server.
    for run in (got, reference):
        totals = {}
        for batch in run["servers"]:
            for s in batch:
                totals[s["server"]] = totals.get(s["server"], 0) + s["requests"]
        assert set(totals) == {u for _, u in servers} and min(totals.values()) > 0, totals
    # The cluster is still up: the run joined it and left it running.
    status = subprocess.run(
        [RAY, "status", "--address", ray_cluster["address"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr[-2000:]


def test_killing_a_ray_run_leaves_nothing_behind(tmp_path, tiny_model_dir, servers):
    """`kill -9` of `prefloop run` with a Ray instance of its own and no Prefect server
    configured: the Ray workers report to the flow's temporary Prefect server (they start
    none of their own), and a few seconds later no process of the run is alive."""
    path = _config(tmp_path, tiny_model_dir, "raykill", [u for _, u in servers], {"kind": "ray"})
    cfg = json.loads(path.read_text())
    cfg["training"] = {"steps": []}
    cfg["runner"]["generate"] = {"num_cpus": 0.5}
    proc, mark = start_run(cfg, tmp_path, own_prefect=True)
    try:
        seen = []
        for line in proc.stdout:  # a batch ran as a Ray task and was stored
            seen.append(line)
            if " batch 1/" in line:
                break
        assert proc.poll() is None, "".join(seen)[-3000:]
        run = {pid: cmd for pid, cmd in marked_processes(mark) if pid != proc.pid}
        assert any("raylet" in cmd for cmd in run.values()), run
        servers_started = [cmd for cmd in run.values() if "prefect.server" in cmd]
        assert len(servers_started) == 1, run  # the flow's own, none per Ray worker
        kill_and_expect_gone(proc, run, within_s=30)
        # A client killed mid-request leaves the servers answering.
        assert [server_down(p, u) for p, u in servers] == [None, None]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_server_killed_mid_round(tmp_path, tiny_model_dir, servers, reference):
    """One of the two servers dies after the first batch: the round completes on the
    other with exactly the reference's pairs, and the log names the dead server."""
    (victim, dead), (_, alive_url) = servers
    assert [server_down(p, u) for p, u in servers] == [None, None]  # both, before the kill
    path = _config(tmp_path, tiny_model_dir, "killed", [dead, alive_url], {"workers": 2})
    cfg = json.loads(path.read_text())
    cfg["training"] = {"steps": []}  # the pairs are what the kill could lose
    write_config(cfg, path)
    code, out = _run_killing(path, tmp_path, victim, lambda line: " batch 1/" in line)
    assert code == 0 and "final model" in out, out[-4000:]
    assert f"server {dead} stopped answering" in out, out[-4000:]
    got = _content(path)
    assert got["pair_ids"] == reference["pair_ids"]
    assert got["generations"] == reference["generations"]
    # Batches run ahead of the flow's writes, so a batch stored after the kill may have
    # finished before it: the pool's record shows the server down in some batch, and the
    # other server answering.
    rows = [{s["server"]: s for s in batch} for batch in got["servers"]]
    assert any(not r[dead]["up"] for r in rows), rows
    assert sum(r[alive_url]["requests"] for r in rows) > 0, rows


def test_no_server_left_stops_the_round_with_one_line(tmp_path, tiny_model_dir, servers):
    """After the first test killed one server, the other dies mid-round too: the engine
    retries, the flow retries the batch, then the run stops with one line naming both;
    the batches finished before stay stored and the round is not marked finished."""
    (first, dead), (last, url) = servers
    if first.poll() is None:  # run on its own: the first server goes now
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert server_down(last, url) is None, server_down(last, url)  # the one left answers
    path = _config(tmp_path, tiny_model_dir, "none-left", [dead, url], {"workers": 1})
    cfg = json.loads(path.read_text())
    cfg["self_reward"]["enabled"] = False
    cfg["training"] = {"steps": []}
    cfg["engine"]["max_retries"] = 1
    write_config(cfg, path)
    # The next batch after the first finds no server.
    code, out = _run_killing(path, tmp_path, last, lambda x: "rlcd" in x and "batch 1/3" in x)
    assert code == 2, out[-3000:]
    [error] = [line for line in out.splitlines() if line.startswith("error: ")]
    assert "none of the 2 servers answers" in error and dead in error and url in error, error
    # The flow retried the batch twice: said on the console, and Prefect's own lines in
    # the run's log file.
    assert out.count("; retrying it") >= 2, out[-3000:]
    log = next(ln.split()[1] for ln in out.splitlines() if ln.startswith("log "))
    assert Path(log).read_text().count("Retry ") >= 2, "the flow did not retry the batch"
    with Store(cfg["db_path"], read_only=True) as store:
        done = store.done_batches("cluster", 1)
        assert ("rlcd", 0) in done and ("rlcd", 2) not in done
        assert store.pair_counts("cluster", 1)["rlcd"] > 0  # batch 0's pairs are kept
        assert store.round_info("cluster", 1)["status"] != "finished"
