"""Deployments on a real Prefect server on loopback: `prefloop serve`, and the shipped
prefect.yaml through `prefect deploy` and a process worker (`prefect worker start`). A
bad config fails the deploy in its pre-flight and never reaches the work pool."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, tiny_config, wait_until, write_config

from pipeline.engines.local_server import free_port
from pipeline.store import Store

pytestmark = pytest.mark.slow

PREFECT = [sys.executable, "-m", "prefect"]


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _start(cmd: list[str], env: dict, log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """A long-lived process with its output in a log file: a pipe nobody reads fills up
    (64 KiB) and then blocks the process's next write, which froze the Prefect server's
    API mid-suite. A failure shows the log's end (`wait_until`)."""
    out = open(log, "w")  # noqa: SIM115  (closed by _end)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = log  # type: ignore[attr-defined]
    proc.log_file = out  # type: ignore[attr-defined]
    return proc


def _end(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log_file.close()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port; yields the environment that points
    a client at it."""
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api}
    # The API alone: both tests trigger their run themselves.
    server = _start(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        + ["--no-services", "--analytics-off"],
        env,
        home / "server.log",
    )
    try:
        wait_until(lambda: _answers(f"{api}/health"), 180, "the Prefect server", server)
        yield {"api": api, "env": env}
    finally:
        _end(server)


def _wait_final(api: str, run_id, proc: subprocess.Popen, timeout: float = 600):
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def final_state():
        # A server busy with the worker's own writes on 2 loaded cores can miss one
        # read's timeout (seen once in a full suite): poll again until the deadline.
        try:
            state = c.read_flow_run(run_id).state
        except httpx.TimeoutException:
            return None
        return state if state is not None and state.is_final() else None

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        return wait_until(final_state, timeout, "the flow run to finish", proc, every=2)


def _config(tmp_path: Path, tiny_model_dir: Path, name: str) -> tuple[Path, dict]:
    cfg = tiny_config(tmp_path, tiny_model_dir, name=name, rounds=1, training={"steps": []})
    cfg["self_reward"]["self_instruct"]["enabled"] = False
    return write_config(cfg, tmp_path / f"{name}.yaml"), cfg


def test_served_deployment_runs(prefect_server, tmp_path, tiny_model_dir):
    """`prefloop serve` registers the deployment; a triggered run completes and leaves its
    rounds in the store."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    path, cfg = _config(tmp_path, tiny_model_dir, "served")
    served = _start(
        [sys.executable, "-m", "flows.cli", "serve", "--config", str(path)]
        + ["--cron", "0 0 1 1 *", "--name", "test"],
        prefect_server["env"],
        tmp_path / "serve.log",
    )
    try:

        def triggered():  # the deployment appears once `serve` has registered it
            try:
                return run_deployment("prefloop-loop/test", timeout=0)
            except Exception:
                return None

        with temporary_settings(updates={PREFECT_API_URL: prefect_server["api"]}):
            run = wait_until(triggered, 120, "the served deployment", served, every=2)
        state = _wait_final(prefect_server["api"], run.id, served)
        assert state.is_completed(), state
        with Store(cfg["db_path"], read_only=True) as store:
            assert store.last_finished_round("served") == 1
            assert set(store.pair_counts("served", 1)) == {"self_reward", "rlcd", "cai"}
    finally:
        _end(served)


def _prefect(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PREFECT, "--no-prompt", *args],
        cwd=ROOT,  # where prefect.yaml is
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_process_worker_runs_the_deployed_round(prefect_server, tmp_path, tiny_model_dir):
    """The shipped prefect.yaml: `prefect deploy` runs the pre-flight first (a config with
    a bad field fails the deploy with prefloop's one line and registers nothing); a good
    one is deployed to a process work pool, and `prefect worker start --pool` picks up the
    triggered run and completes the round."""
    env = {**prefect_server["env"], "PREFLOOP_HOME": str(ROOT)}
    pool = "prefloop-test"
    made = _prefect(["work-pool", "create", pool, "--type", "process"], env)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]

    bad, bad_cfg = _config(tmp_path / "bad", tiny_model_dir, "bad")
    bad_cfg["self_reward"]["n_candidates"] = 1
    write_config(bad_cfg, bad)
    deploy = ["deploy", "--name", "nightly", "--pool", pool, "--param", "rounds=1"]
    refused = _prefect(deploy, {**env, "PREFLOOP_CONFIG": str(bad)})
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0, out[-3000:]
    assert "self_reward.n_candidates" in out and str(bad) in out, out[-3000:]
    listed = _prefect(["deployment", "ls"], env)
    assert "nightly" not in listed.stdout, listed.stdout  # nothing reached the pool

    path, cfg = _config(tmp_path / "good", tiny_model_dir, "worker")
    deployed = _prefect(deploy, {**env, "PREFLOOP_CONFIG": str(path)})
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    triggered = _prefect(["deployment", "run", "prefloop-loop/nightly"], env)
    assert triggered.returncode == 0, triggered.stdout[-2000:] + triggered.stderr[-2000:]
    run_id = next(
        line.split("UUID:")[1].strip().strip("'\"")
        for line in triggered.stdout.splitlines()
        if "UUID:" in line
    )
    worker = _start(
        [*PREFECT, "worker", "start", "--pool", pool, "--limit", "1"],
        env,
        tmp_path / "worker.log",
        cwd=tmp_path,  # the pull step moves the run into PREFLOOP_HOME
    )
    try:
        state = _wait_final(prefect_server["api"], run_id, worker)
        assert state.is_completed(), state
    finally:
        _end(worker)
    with Store(cfg["db_path"], read_only=True) as store:
        assert store.last_finished_round("worker") == 1
        assert set(store.pair_counts("worker", 1)) == {"self_reward", "rlcd", "cai"}
