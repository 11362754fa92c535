"""A run as a user lives with it: the database stays readable while it writes, a reader
holding it makes the run wait (not fail, not lose a batch), a failure ends in one line, and
no process outlives the run, whether it ends, fails, is interrupted or is killed."""

import json
import os
import re
import signal
import time
from pathlib import Path

import duckdb
import pytest
from helpers import (
    LOOPBACK,
    QUICK,
    finish,
    kill_and_expect_gone,
    listening_addresses,
    marked_processes,
    prefloop,
    start_run,
    tiny_config,
    wait_until,
)

from pipeline.errors import StoreError
from pipeline.store import Store

pytestmark = pytest.mark.slow
COUNTED = ("generations", "judgments", "pairs", "stage_metrics", "prompts")


def config(tmp: Path, model: Path, **over) -> dict:
    """Two quick rounds (Self-Rewarding scored by a rule, RLCD) with DPO between; a
    section given here changes the keys it names."""
    merged = {
        k: {**QUICK[k], **v} if k in QUICK and isinstance(v, dict) else v for k, v in over.items()
    }
    return tiny_config(tmp, model, name="live", **{**QUICK, **merged})


def snapshot(db: Path) -> dict:
    with Store(db, read_only=True) as store:
        pair_ids = sorted(p for (p,) in store.sql("SELECT pair_id FROM pairs")[1])
        counts = {name: n for name, kind, n in store.table_counts() if kind == "table"}
    counts.pop("schema_version", None)
    return {"pair_ids": pair_ids, "counts": counts}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, prefect_api):
    """The same run with no reader and no interruption: what every test must end with."""
    from flows.loop import loop_flow

    tmp = tmp_path_factory.mktemp("baseline")
    cfg = config(tmp, tiny_model_dir)
    loop_flow(cfg)
    return snapshot(Path(cfg["db_path"]))


def batches_stored(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with Store(db, read_only=True, lock_timeout_s=1) as store:
            return store.sql("SELECT count(*) FROM stage_metrics")[1][0][0]
    except StoreError:
        return 0


def test_readers_query_throughout_a_run(tmp_path, tiny_model_dir, uninterrupted):
    """Another process queries the database every half second while a two-round run
    writes it: at least 95% of the queries answer (the others waited out their short
    retry), no count ever goes down, the running round is seen, `prefloop status` names
    it while `prefloop sql` reads, and the final database equals the
    uninterrupted run's."""
    cfg = config(tmp_path, tiny_model_dir)
    db = Path(cfg["db_path"])
    proc, mark = start_run(cfg, tmp_path)
    answered, missed, seen_running = 0, 0, []
    last = dict.fromkeys(COUNTED, 0)
    status = sql = None
    while proc.poll() is None:
        if status is None and last["generations"] > 0:  # once, mid-run
            status = prefloop("status", "--db", str(db))
            sql = prefloop(
                "sql", "SELECT count(*) AS n FROM generations", "--db", str(db), "--format", "json"
            )
        if db.exists():
            try:
                with Store(db, read_only=True, lock_timeout_s=2) as store:
                    counts = {t: store.sql(f"SELECT count(*) FROM {t}")[1][0][0] for t in COUNTED}
                    running = store.running_rounds("live")
                answered += 1
                for t in COUNTED:
                    assert counts[t] >= last[t], (t, counts[t], last[t])
                last = counts
                seen_running += [r["round"] for r in running]
            except StoreError as e:
                if "in use by another process" not in str(e):
                    raise
                missed += 1
        time.sleep(0.5)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert answered >= 20, (answered, missed)  # the run lasted long enough to be read
    assert answered / (answered + missed) >= 0.95, (answered, missed)
    assert set(seen_running) == {1, 2}
    assert status is not None and status.returncode == 0, status and status.stderr
    [line] = [ln for ln in status.stdout.splitlines() if ln.startswith(("running", "stopped"))]
    assert line.startswith("running  live round ") and "tok/s" in line and "elapsed" in line
    assert sql.returncode == 0 and json.loads(sql.stdout)["n"] > 0, sql.stderr
    after = prefloop("status", "--db", str(db))
    assert "running" not in after.stdout and "finished" in after.stdout
    assert snapshot(db) == uninterrupted
    assert marked_processes(mark) == []


def test_a_reader_holding_the_file_makes_the_run_wait(tmp_path, tiny_model_dir, uninterrupted):
    """A read-only DuckDB connection held open across batch boundaries: the run logs that
    it waits and for whom, continues when the reader closes, and loses nothing."""
    cfg = config(tmp_path, tiny_model_dir)
    db = Path(cfg["db_path"])
    proc, _ = start_run(cfg, tmp_path)
    wait_until(lambda: batches_stored(db) >= 1, 300, "the first batch", proc)
    held_from = batches_stored(db)
    reader = duckdb.connect(str(db), read_only=True)
    waiting = f"PID {os.getpid()} holds the database; waiting up to 300 s"
    # Held until the run's log says it waits for this reader, however long a batch takes.
    logs = Path(cfg["runs_dir"]) / cfg["name"] / "logs"
    wait_until(
        lambda: any(waiting in f.read_text() for f in logs.glob("*.log")), 300, waiting, proc
    )
    assert reader.execute("SELECT count(*) FROM stage_metrics").fetchone()[0] == held_from
    reader.close()
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert waiting in out, out[-3000:]
    assert snapshot(db) == uninterrupted


def test_a_failed_run_ends_in_one_line(tmp_path, tiny_model_dir):
    """A training step that crashes mid-round: the last line is `error: ...`, nothing says
    "leaked", the run's log file holds the traceback; --verbose prints it too. No process
    of the run is left."""
    training = {"steps": [{"kind": "dpo", "loss_type": "no-such-loss"}], "batch_size": 2}
    prompts = {"files": ["data/prompts/helpful.jsonl"], "per_round": 4, "heldout": 0}
    cfg = config(tmp_path, tiny_model_dir, rounds=1, training=training, prompts=prompts)
    for verbose in (False, True):
        proc, mark = start_run(cfg, tmp_path, *(["--verbose"] if verbose else []))
        out = finish(proc)
        assert proc.returncode == 2, out[-3000:]
        lines = out.strip().splitlines()
        assert lines[-1].startswith("error: training (dpo) failed with exit code 1"), lines[-3:]
        assert "Unknown loss type: no-such-loss" in lines[-1]
        assert "leaked" not in out.lower()
        [log] = [ln.split()[1] for ln in lines if ln.startswith("log") and "traceback" in ln]
        assert "Traceback (most recent call last)" in Path(log).read_text()
        assert ("Traceback (most recent call last)" in out) == verbose
        frames = [ln for ln in lines if ln.lstrip().startswith('File "')]
        assert bool(frames) == verbose, frames[:3]
        assert marked_processes(mark) == []


def test_killing_prefloop_run_leaves_no_engine_behind(tmp_path, tiny_model_dir):
    """`kill -9` of the `prefloop run` process alone (not its group) while a vLLM engine
    is up: a few seconds later no engine, server or trainer of the run is alive, and the
    run's scratch directory, where vLLM's processes keep their sockets, is gone."""
    engine = {"kind": "vllm", "batch_size": 2, "max_model_len": 512, "cpu_kv_cache_gib": 0.5}
    cfg = config(tmp_path, tiny_model_dir, rounds=1, engine=engine)
    proc, mark = start_run(cfg, tmp_path, own_prefect=True)  # its Prefect server too
    wait_until(
        lambda: any("EngineCore" in cmd for _, cmd in marked_processes(mark)),
        400,
        "vLLM's EngineCore",
        proc,
    )
    run = {pid: cmd for pid, cmd in marked_processes(mark) if pid != proc.pid}
    assert any("EngineCore" in cmd for cmd in run.values()), run
    [worker] = [pid for pid, cmd in run.items() if "flows.cli run" in cmd]
    environ = dict(
        v.split("=", 1) for v in Path(f"/proc/{worker}/environ").read_text().split("\0") if v
    )
    scratch = Path(environ["PREFLOOP_SCRATCH"])
    [engine_dir] = scratch.glob("vllm-*")
    assert any(p.is_socket() for p in engine_dir.iterdir()), list(engine_dir.iterdir())
    kill_and_expect_gone(proc, run, within_s=10)  # the `prefloop run` process alone
    assert not scratch.exists(), list(scratch.rglob("*"))


def test_ctrl_c_stops_the_run_and_everything_it_started(tmp_path, tiny_model_dir):
    """SIGINT to `prefloop run` (what Ctrl-C sends): the run stops, says so in its last
    line, leaves no process (its own temporary Prefect server included), and the same
    command resumes it to the end. Everything the run started listens on loopback only.
    Started with SIGINT ignored (a script's `&` does that, and Python then keeps ignoring
    it), `kill -INT` stops it all the same."""
    cfg = config(tmp_path, tiny_model_dir, rounds=1, training={"steps": []})
    db = Path(cfg["db_path"])
    proc, mark = start_run(cfg, tmp_path, own_prefect=True, sigint_ignored=True)
    seen = []
    for line in proc.stdout:  # the run's own line for its first stored batch: at once
        seen.append(line)
        if " batch 1/" in line:
            break
    run = [pid for pid, _ in marked_processes(mark)]
    listening = listening_addresses(set(run))
    assert listening and listening <= LOOPBACK, listening  # the server's port at least
    proc.send_signal(signal.SIGINT)
    out = "".join(seen) + finish(proc, timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("error: interrupted; run the same command")
    assert marked_processes(mark) == []
    again, _ = start_run(cfg, tmp_path)
    out = finish(again)
    assert again.returncode == 0, out[-3000:]
    with Store(db, read_only=True) as store:
        assert store.sql("SELECT status FROM rounds")[1] == [("finished",)]


def test_kill_between_training_steps_resumes_the_missing_step(tmp_path, tiny_model_dir):
    """`kill -9` of `prefloop run` once a round's SFT step is stored and its DPO step has
    started: the same command then trains DPO alone (from the stored SFT model), and
    the SFT step is neither trained nor stored again."""
    cfg = config(
        tmp_path,
        tiny_model_dir,
        rounds=1,
        cai={"enabled": True, "revisions": 1, "sampling": {"max_tokens": 12}, "feedback": False},
        training={"steps": ["sft", "dpo"]},
    )
    db = Path(cfg["db_path"])

    def sft_stored():
        try:
            with Store(db, read_only=True, lock_timeout_s=1) as store:
                return store.query("SELECT * FROM training_runs WHERE kind = 'sft'")
        except StoreError:
            return []

    proc, mark = start_run(cfg, tmp_path)
    [sft] = wait_until(sft_stored, 400, "the SFT step's row", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until(lambda: not marked_processes(mark), 15, "the killed run's processes to end")
    with Store(db, read_only=True) as store:
        assert store.sql("SELECT kind FROM training_runs")[1] == [("sft",)]
    again, _ = start_run(cfg, tmp_path)
    out = finish(again)
    assert again.returncode == 0, out[-3000:]
    assert "dpo training" in out and "sft training" not in out
    with Store(db, read_only=True) as store:
        runs = {r["kind"]: r for r in store.query("SELECT * FROM training_runs")}
        assert set(runs) == {"sft", "dpo"}
        assert runs["sft"]["finished_at"] == sft["finished_at"]
        assert runs["dpo"]["base_model_id"] == sft["output_model_id"]
        [[n]] = store.sql("SELECT count(*) FROM stage_metrics WHERE stage = 'train_sft'")[1]
        assert n == 1
        assert store.sql("SELECT status FROM rounds")[1] == [("finished",)]


def test_status_and_console_follow_the_trainer(tmp_path, tiny_model_dir):
    """While a round's DPO step trains, `prefloop status` says the trainer's own step i of
    n, its loss and the time it has left, from what the training child writes; the
    console says it too, shows one line per engine start and none of the libraries' own
    lines or Prefect's task states, which are all in the run's log file."""
    training = {"steps": ["dpo"], "epochs": 10, "batch_size": 1}
    cfg = config(tmp_path, tiny_model_dir, rounds=1, training=training)
    db = Path(cfg["db_path"])
    proc, mark = start_run(cfg, tmp_path)
    seen: list[str] = []

    def trainer_step() -> bool:
        out = prefloop("status", "--db", str(db)).stdout
        seen.extend(ln for ln in out.splitlines() if "train_dpo: step " in ln)
        step = seen and re.search(r"train_dpo: step (\d+) of (\d+)", seen[-1])
        return bool(step) and 0 < int(step[1]) < int(step[2])

    wait_until(trainer_step, 400, "the trainer's step in `prefloop status`", proc, every=1)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    line = seen[-1]
    assert line.startswith("running  live round 1: train_dpo: step "), line
    assert re.search(r"step \d+ of \d+, loss [0-9.]+, about \d+m\d\ds left \|", line), line
    assert re.search(r"training dpo: step \d+ of \d+, loss", out), out[-3000:]
    assert re.search(r"engine hf started for \S+ \(generate\) in \d+s", out), out[-3000:]
    assert "Finished in state" not in out and "Beginning flow run" not in out, out[-3000:]
    [log] = [ln.split()[1] for ln in out.splitlines() if ln.startswith("log ")]
    assert "Finished in state Completed()" in Path(log).read_text()
    assert marked_processes(mark) == []
