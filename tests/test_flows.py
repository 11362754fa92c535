"""The Prefect flows, for real: two rounds with the tiny model, resume after SIGKILL, and
the demo end to end (deployments: tests/test_deploy.py; remote servers and Ray:
tests/test_cluster.py)."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from helpers import ROOT, finish, start_run, tiny_config, write_config

from pipeline.plan import round_plan
from pipeline.recipes import sql_recipes
from pipeline.store import Store


@pytest.mark.slow
def test_two_rounds(harness, tmp_path, tiny_model_dir, chromium):
    from flows.loop import loop_flow

    cfg = tiny_config(tmp_path, tiny_model_dir)
    result = loop_flow(cfg)
    assert result["rounds"] == 2
    with Store(cfg["db_path"], read_only=True) as store:
        status = {r["round"]: r for r in store.run_status("flowtest")}
        assert [status[t]["status"] for t in (1, 2)] == ["finished", "finished"]
        for t in (1, 2):
            counts = store.pair_counts("flowtest", t)
            assert set(counts) == {"self_reward", "rlcd", "cai"}, counts
        # Each round trained a model; round 2 generated with round 1's.
        trained = {
            r["round"]: r["output_model_id"] for r in store.query("SELECT * FROM training_runs")
        }
        assert set(trained) == {1, 2}
        assert status[2]["model_id"] == trained[1]
        gen_models = store.query(
            "SELECT DISTINCT round, model_id FROM generations WHERE method <> 'evaluation' "
            "ORDER BY round"
        )
        assert gen_models == [
            {"round": 1, "model_id": status[1]["model_id"]},
            {"round": 2, "model_id": trained[1]},
        ]
        assert result["final_model"] == trained[2]
        assert store.model(trained[2])["parent_model_id"] == trained[1]
        # Per-stage metrics: every batch of the round's stored plan, in its order.
        stages = store.query("SELECT DISTINCT stage FROM stage_metrics WHERE round = 1")
        assert {s["stage"] for s in stages} == {
            *("self_instruct", "self_reward", "rlcd", "cai"),
            *("heldout", "agreement", "train_dpo", "heldout_new", "win_rate", "flow"),
        }
        [r1] = store.query("SELECT plan_json FROM rounds WHERE round = 1")
        planned = [name for name, _ in json.loads(r1["plan_json"])["stages"]]
        assert planned == [
            *("self_instruct", "self_reward", "rlcd", "cai", "agreement", "heldout"),
            *("train_dpo", "heldout_new", "win_rate"),
        ]
        done = store.done_batches("flowtest", 1)
        for name, batches in json.loads(r1["plan_json"])["stages"]:
            assert {(name, b) for b in range(batches)} <= done, name
        # Each round is evaluated: M_t+1 against M_t by the run's initial model as judge.
        evals = store.evaluations("flowtest")
        metrics = {(e["round"], e["metric"], e["method"]) for e in evals}
        for t in (1, 2):
            for metric in ("win_rate", "order_flip_rate", "implicit_reward_accuracy"):
                assert (t, metric, None) in metrics, metric
            for method in ("self_reward", "rlcd", "cai"):
                for metric in ("pairs", "tie_rate", "length_ratio", "duplicate_prompt_rate"):
                    assert (t, metric, method) in metrics, (metric, method)
                assert (t, "agreement_pairwise", method) in metrics
            assert (t, "agreement_self_judge", "rlcd") in metrics
        [win] = [e for e in evals if e["metric"] == "win_rate" and e["round"] == 2]
        details = json.loads(win["details_json"])
        assert details["old_model"] == trained[1] and details["new_model"] == trained[2]
        assert details["judge_model"] == status[1]["model_id"]
        assert (
            details["prompts"] == 4
            and details["wins"] + details["ties"] + details["losses"]
            == 2 * 4 - details["unanswered"]
        )
        [r1] = store.query("SELECT * FROM rounds WHERE round = 1")
        assert set(json.loads(r1["pair_policy_json"])) == {"self_reward", "rlcd", "cai"}
        heldout = store.query("SELECT count(*) AS n FROM prompts WHERE split = 'heldout'")
        assert heldout[0]["n"] == 4
        [[n_gen_prompts]] = store.sql(
            "SELECT count(*) FROM generations g JOIN prompts p USING (prompt_id) "
            "WHERE p.split = 'heldout' AND g.method <> 'evaluation'"
        )[1]
        assert n_gen_prompts == 0  # held-out prompts never reach the methods
        # Every SQL recipe in docs/sql.md runs on a real run's database and finds rows.
        for name, statement in sql_recipes():
            columns, rows = store.sql(statement)
            assert columns, name
            if "flagged" not in statement:  # no RLCD pair need be flagged
                assert rows, f"SQL recipe {name!r} found nothing"
    page = Path(result["report"]).read_text()
    for section in ("key-numbers", "win-rate", "scores", "length", "agreement", "time"):
        assert f'id="{section}"' in page
    assert "plotsRendered" not in page  # no script for a test
    assert 'id="pairs"' in page  # the pairs explorer
    dom = chromium.dom(Path(result["report"]), tmp_path / "chromium")
    drawn = set(re.findall(r'<svg class="plot" data-plot="([^"]+)"', dom))
    assert drawn == {"win_rate", "scores", "length", "agreement", "time"}
    snap = Path(r1["snapshot_dir"])
    assert (snap / "config.json").is_file() and (snap / "data-dpo" / "train.parquet").is_file()

    # Running again does nothing new.
    with Store(cfg["db_path"], read_only=True) as store:
        before = store.table_counts()
    loop_flow(cfg)
    with Store(cfg["db_path"], read_only=True) as store:
        assert store.table_counts() == before


def _config_files(tmp_path: Path, model: Path, over: dict, names) -> dict:
    """One config file per name (batch size 2), each with its own database: name ->
    (path, config)."""
    runs = {}
    for name in names:
        cfg = tiny_config(tmp_path / name, model, **over)
        cfg["engine"]["batch_size"] = 2
        runs[name] = (write_config(cfg, tmp_path / f"{name}.yaml"), cfg)
    return runs


# Tables whose rows a run produces; their counts do not depend on timing.
CONTENT_TABLES = (
    "prompts",
    "generations",
    "judgments",
    "comparisons",
    "critiques",
    "pairs",
    "sft_examples",
    "discards",
    "training_runs",
    "models",
    "evaluations",
)


def _content(db: str) -> dict:
    with Store(db, read_only=True) as store:
        counts = {t: store.sql(f"SELECT count(*) FROM {t}")[1][0][0] for t in CONTENT_TABLES}
        pair_ids = {r[0] for r in store.sql("SELECT pair_id FROM pairs")[1]}
        batches = store.done_batches("flowtest", 1) | {
            (f"r2:{s}", b) for s, b in store.done_batches("flowtest", 2)
        }
        models = [r[0] for r in store.sql("SELECT model_id FROM models ORDER BY model_id")[1]]
    batches = {b for b in batches if "flow" not in b[0]}  # one row per attempt of a round
    return {"counts": counts, "pair_ids": pair_ids, "batches": batches, "models": models}


def _batch_lines(lines) -> list[tuple[str, str, str]]:
    """(round, stage, batch) of each batch the run's log says it stored."""
    found = (re.search(r"round (\d+) (\S+) +batch (\d+)/\d+: ", line) for line in lines)
    return [m.groups() for m in found if m]


def _stored_batches(db: str) -> set[tuple]:
    """Each stored batch with the time it was written (a batch run again gets a new one)."""
    with Store(db, read_only=True) as store:
        rows = store.sql(
            "SELECT round, stage, batch, created_at FROM stage_metrics WHERE stage <> 'flow'"
        )[1]
    return set(rows)


@pytest.mark.slow
def test_chaos_five_sigkills_equal_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """The tiny-model loop (2 rounds, DPO, evaluation) killed with SIGKILL at 5 random
    moments and re-run each time ends with the same database content as a run that was
    never interrupted: the same pair ids, the same rows, the same trained models. No
    stored batch is run again (each batch's line is printed once over all the runs, and
    the rows stored before a kill are untouched at the end)."""
    import random

    over = {"prompts": {"per_round": 4, "heldout": 2}}
    runs = _config_files(tmp_path, tiny_model_dir, over, ("whole", "chaos"))

    path, cfg = runs["whole"]
    out = finish(start_run(path, tmp_path)[0])
    assert "final model" in out, out[-3000:]
    whole = _content(cfg["db_path"])

    path, cfg = runs["chaos"]
    rng = random.Random(20261123)
    kills, printed, kept = [], [], set()
    while len(kills) < 5:
        # Kill the whole process tree (the flow, its Prefect server, a training child)
        # after a random number of progress lines and a random extra delay.
        proc, _ = start_run(path, tmp_path, new_session=True)
        lines, wait_lines, delay = [], rng.randint(0, 3), rng.uniform(0.0, 4.0)
        for line in proc.stdout:
            lines.append(line)
            if " batch " in line or "training" in line:
                wait_lines -= 1
            if wait_lines < 0:
                break
        assert proc.poll() is None, "the run finished before 5 kills: " + "".join(lines)[-2000:]
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        lines += proc.stdout.readlines()  # what it printed before the kill landed
        last = next((x for x in reversed(lines) if " batch " in x or "training" in x), "")
        assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
        kills.append(last.strip()[-100:])
        printed += _batch_lines(lines)
        if Path(cfg["db_path"]).exists():
            kept |= _stored_batches(cfg["db_path"])
    out = finish(start_run(path, tmp_path)[0])
    assert "final model" in out, out[-3000:]
    printed += _batch_lines(out.splitlines())
    assert len(printed) == len(set(printed)), sorted(printed)  # none ran twice
    assert kept and kept <= _stored_batches(cfg["db_path"]), kills
    chaos = _content(cfg["db_path"])
    assert chaos["pair_ids"] == whole["pair_ids"], kills
    assert chaos["counts"] == whole["counts"], kills
    assert chaos["batches"] == whole["batches"], kills
    assert chaos["models"] == whole["models"], "trained weights differ"


@pytest.mark.slow
def test_end_to_end_smollm2_on_vllm(tmp_path, default_model_dir):
    """`prefloop run` as a user runs it: SmolLM2 through the vLLM engine, every method,
    the demo's SFT then DPO, one round (small sizes to keep the suite short)."""
    pytest.importorskip("vllm")
    import yaml

    cfg = yaml.safe_load((ROOT / "data/configs/demo.yaml").read_text())
    cfg.update(db_path=str(tmp_path / "e2e.duckdb"), runs_dir=str(tmp_path / "runs"), rounds=1)
    cfg["engine"]["kind"] = "vllm"
    cfg["prompts"].update(per_round=3, heldout=3)
    cfg["evaluation"]["sampling"]["max_tokens"] = 32
    cfg["self_reward"]["self_instruct"]["new_prompts"] = 2
    for method in ("self_reward", "rlcd", "cai"):
        cfg[method]["sampling"]["max_tokens"] = 32
    cfg["training"].update(epochs=1, max_length=192)
    out = finish(start_run(write_config(cfg, tmp_path / "e2e.yaml"), tmp_path)[0])
    assert "final model demo-r1-dpo@" in out, out[-4000:]
    assert "tok/s" in out
    with Store(cfg["db_path"], read_only=True) as store:
        assert set(store.pair_counts("demo", 1)) == {"self_reward", "rlcd", "cai"}
        [judged] = store.query("SELECT count(*) AS n, count(score) AS scored FROM judgments")
        assert judged["n"] > 0 and judged["scored"] == judged["n"]  # prefilled judge
        # The demo's CAI recipe: SFT, then DPO from the SFT model.
        sft, dpo = store.query("SELECT * FROM training_runs ORDER BY step")
        assert (sft["kind"], dpo["kind"]) == ("sft", "dpo")
        assert dpo["base_model_id"] == sft["output_model_id"]
        assert all(json.loads(t["metrics_json"])["steps"] > 0 for t in (sft, dpo))


def test_only_transient_faults_are_retried():
    from prefect.states import Failed

    from flows.stage import _transient
    from pipeline.errors import EngineError, TemplateError, TransientEngineError

    def retried(exc):
        return _transient(None, None, Failed(data=exc))

    assert retried(TransientEngineError("HTTP 503"))
    assert retried(TimeoutError("read timed out"))
    assert not retried(EngineError("option 'Answer A' is not exactly one token"))
    assert not retried(TemplateError("missing variable"))
    assert not retried(KeyError("bug"))


def test_the_plan_lists_a_rounds_stages_in_order(tmp_path):
    """One list of a round's stages: what the flow runs, stores as the plan and resumes
    by. Self-instruct and the methods first, agreement and M_0's yardstick while the
    round's engine is up, held-out answers, M_0's benchmarks, every training step in
    order, then the trained model's benchmarks, answers, yardstick and win rate."""
    from pipeline.config import parse_config
    from pipeline.rounds import load_inputs

    cfg = parse_config(
        tiny_config(
            tmp_path,
            Path("unused"),
            engine={"batch_size": 4},
            training={"steps": ["sft", "dpo", "rm"]},
            evaluation={
                "yardstick": {"enabled": True, "limit": 3},
                "benchmarks": {"tasks": ["ifeval", "gsm8k"]},
            },
        )
    )
    inputs = load_inputs(cfg)
    plan = round_plan(cfg, inputs, round_=1, seeds=6)
    assert [(s.name, s.batches) for s in plan] == [
        ("self_instruct", 1),
        ("self_reward", 3),  # 6 seeds + 3 self-instructed prompts, in batches of 4
        ("rlcd", 2),
        ("cai", 2),
        ("agreement", 1),
        ("yardstick_base", 1),
        ("heldout", 1),
        ("benchmarks_base", 2),  # a task a batch, with every engine stopped
        ("train_sft", 1),
        ("train_dpo", 1),
        ("train_rm", 1),
        ("benchmarks", 2),
        ("heldout_new", 1),
        ("yardstick", 1),
        ("win_rate", 1),
    ]
    assert [s.name for s in round_plan(cfg, inputs, 2, 6, generated=1)][:6] == [
        "self_instruct", "self_reward", "rlcd", "cai", "agreement", "heldout"
    ]  # fmt: skip
    assert round_plan(cfg, inputs, 2, 6, generated=1)[1].batches == 2
    quiet = cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": []})})
    names = [s.name for s in round_plan(quiet, inputs, 1, 6)]
    assert "heldout" not in names and "win_rate" not in names  # nothing trained to compare
