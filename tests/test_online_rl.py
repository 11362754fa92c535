"""Online RL (grpo, rloo) on the tiny model: each kind trains on the round's prompts in a
child process against a reward judge of each kind, registers its model, and stores every
rollout and its reward with the step; a killed step is trained again whole; a reward that
raises fails the step with one line and stores nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import QUICK, tiny_config, write_round

from pipeline.config import RunConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.recipes import sql_recipes
from pipeline.rounds import load_inputs, round_dir
from pipeline.store import Store
from pipeline.training.launch import TrainingError
from pipeline.training.rollouts import ROLLOUTS_FILE
from pipeline.training.step import train_round

RUN = "rl-test"
WORDS = {"kind": "function", "function": "judge_rules:word_count"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _rules_in_the_child(monkeypatch):
    """The training child imports the reward rules (tests/judge_rules.py) by name."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))


def _cfg(tmp_path: Path, *steps: dict, **rl) -> RunConfig:
    online = {"num_generations": 2, "max_steps": 2, "max_completion_length": 12, **rl}
    return RunConfig(
        name=RUN,
        db_path=tmp_path / "db.duckdb",
        runs_dir=tmp_path / "runs",
        training={
            "learning_rate": 1e-4,
            "batch_size": 4,
            "max_length": 128,
            "heldout_fraction": 0.25,
            "grpo": online,
            "rloo": online,
            "steps": list(steps),
        },
    )


def _train(store: Store, cfg: RunConfig) -> dict:
    return train_round(store, cfg.training, RUN, 1, round_dir(cfg.runs_dir, RUN, 1), cfg.seed)


def _rollouts(store: Store, kind: str) -> list[dict]:
    return store.query("SELECT * FROM rollouts WHERE kind = ? ORDER BY generation_id", [kind])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_a_step_trains_registers_and_stores_every_rollout(tmp_path, tiny_model_dir, kind):
    cfg = _cfg(tmp_path, {"kind": kind, "reward": WORDS})
    with Store(cfg.db_path) as store:
        write_round(store, tiny_model_dir, RUN, n=8)
        base = store.round_info(RUN, 1)["model_id"]
        done = _train(store, cfg)
        [run] = store.query("SELECT * FROM training_runs")
        model = store.model(run["output_model_id"])
        assert done["policy"] == model["model_id"] and model["parent_model_id"] == base
        metrics = json.loads(run["metrics_json"])
        assert metrics["train_prompts"] == 6 and metrics["heldout_prompts"] == 2
        assert metrics["steps"] == 2 and metrics["mean_kl"] is not None
        assert metrics["reward_judge"].startswith("judge_rules:word_count@")
        rows = _rollouts(store, kind)
        phases = {p: [r for r in rows if r["phase"] == p] for p in ("heldout_before", "rollout")}
        after = [r for r in rows if r["phase"] == "heldout_after"]
        # batch_size 4 answers per step, 2 per prompt; 2 held-out prompts x 2 before and after.
        assert len(phases["rollout"]) == 8 and {r["step"] for r in phases["rollout"]} == {1, 2}
        assert len(phases["heldout_before"]) == 4 and len(after) == 4
        assert {r["step"] for r in after} == {2} and {r["model_id"] for r in rows} == {
            model["model_id"]
        }
        for r in rows:  # the reward is the rule's reading of the stored text
            assert r["reward"] == float(len(r["completion"].split()))
            assert r["judge_id"] == metrics["reward_judge"] and r["parse_status"] == "ok"
        first = [r["reward"] for r in phases["rollout"] if r["step"] == 1]
        assert metrics["first_step_reward"] == pytest.approx(sum(first) / len(first))
        before = [r["reward"] for r in phases["heldout_before"]]
        assert metrics["heldout_reward_before"] == pytest.approx(sum(before) / len(before))
        drawn = {r["prompt_id"] for r in store.query("SELECT prompt_id FROM round_prompts")}
        assert {r["prompt_id"] for r in rows} <= drawn
        groups: dict = {}
        for r in phases["rollout"]:
            groups.setdefault((r["step"], r["prompt_id"]), []).append(r["sample_idx"])
        assert all(sorted(v) == [0, 1] for v in groups.values())
        # Trained once: the rerun finds the step stored.
        assert _train(store, cfg)["trained"] == []


@pytest.mark.slow
def test_rewards_from_a_reward_model_and_a_template_judge(tmp_path, tiny_model_dir):
    """[rm, grpo] with `model: latest`: GRPO against the reward model the round just
    trained (the seeds' RLHF recipe); then rloo against a prefilled template read by the
    step's own starting model."""
    latest = {"kind": "reward_model", "model": "latest"}  # no fallback: rm comes first
    template = {"kind": "template", "template": "judge_additive_5pt_prefilled"}
    cfg = _cfg(
        tmp_path,
        {"kind": "rm", "epochs": 1},
        {"kind": "grpo", "reward": latest},
        {"kind": "rloo", "reward": template},
    )
    assert load_inputs(cfg).rewards["grpo"] == {"fallback": None}  # the pre-flight's read
    with Store(cfg.db_path) as store:
        write_round(store, tiny_model_dir, RUN, n=8)
        _train(store, cfg)
        runs = {r["kind"]: r for r in store.query("SELECT * FROM training_runs")}
        scorer = runs["rm"]["output_model_id"]
        grpo = _rollouts(store, "grpo")
        assert grpo and {r["judge_id"] for r in grpo} == {scorer}
        assert all(r["reward"] is not None for r in grpo)
        judged = store.query("SELECT DISTINCT model_id FROM judgments WHERE method = 'grpo'")
        assert judged == [{"model_id": scorer}]
        rloo = _rollouts(store, "rloo")
        start = runs["rloo"]["base_model_id"]  # the GRPO model: rloo starts from it
        assert start == runs["grpo"]["output_model_id"]
        [template_id] = {r["judge_id"] for r in rloo}
        assert template_id.startswith("judge_additive_5pt_prefilled@")
        assert all(1.0 <= r["reward"] <= 5.0 for r in rloo)
        models = store.query("SELECT DISTINCT model_id FROM judgments WHERE method = 'rloo'")
        assert models == [{"model_id": start}]
        assert store.query("SELECT 1 FROM templates WHERE template_id = ?", [template_id])


@pytest.mark.slow
def test_a_reward_that_raises_fails_the_step_in_one_line(tmp_path, tiny_model_dir):
    raising = {"kind": "function", "function": "judge_rules:raises"}
    wrong = {"kind": "function", "function": "judge_rules:wrong_type"}
    with Store(tmp_path / "db.duckdb") as store:
        write_round(store, tiny_model_dir, RUN, n=8)
        for reward, said in ((raising, "raised KeyError: "), (wrong, "returned str 'high'")):
            cfg = _cfg(tmp_path, {"kind": "grpo", "reward": reward})
            with pytest.raises(TrainingError) as failed:
                _train(store, cfg)
            message = str(failed.value)
            assert "\n" not in message and said in message and "training (grpo)" in message
            assert store.query("SELECT * FROM training_runs") == []
            assert store.query("SELECT * FROM generations WHERE method = 'grpo'") == []
            folder = round_dir(cfg.runs_dir, RUN, 1)
            assert not (folder / "model-grpo").exists()
            assert not (folder / "model-grpo.partial").exists()


KILLED = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
from helpers import QUICK, tiny_config, write_round
from pathlib import Path
from pipeline.config import RunConfig
from pipeline.store import Store
from pipeline.training.step import train_round
cfg = RunConfig.model_validate_json({cfg!r})
with Store(cfg.db_path) as store:
    write_round(store, {model!r}, {run!r}, n=8)
    train_round(store, cfg.training, {run!r}, 1, Path({folder!r}), cfg.seed)
"""


@pytest.mark.slow
def test_killed_mid_step_the_same_call_trains_it_again(tmp_path, tiny_model_dir):
    """SIGKILL to the process training the step, once the trainer has stored rollouts of
    its first step: the trainer dies with it, nothing of the step is stored, and the same
    call trains it again from the round's model, storing one attempt's rollouts."""
    cfg = _cfg(tmp_path, {"kind": "grpo", "reward": WORDS}, max_steps=8)
    folder = round_dir(cfg.runs_dir, RUN, 1)
    script = KILLED.format(
        tests=str(ROOT / "tests"),
        root=str(ROOT),
        cfg=cfg.model_dump_json(),
        model=str(tiny_model_dir),
        run=RUN,
        folder=str(folder),
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    recorded = folder / "model-grpo.partial" / ROLLOUTS_FILE
    try:
        deadline = time.monotonic() + 300
        while '"rollout"' not in (recorded.read_text() if recorded.is_file() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, "no rollout recorded"
            time.sleep(0.2)
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 30
    while [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]:
        assert time.monotonic() < deadline, "the trainer outlived the process that started it"
        time.sleep(0.2)
    with Store(cfg.db_path) as store:
        assert store.query("SELECT * FROM training_runs") == []
        assert store.query("SELECT * FROM generations WHERE method = 'grpo'") == []
        done = _train(store, cfg)
        [trained] = done["trained"]
        assert trained["parent_model_id"] == store.round_info(RUN, 1)["model_id"]
        rows = [r for r in _rollouts(store, "grpo") if r["phase"] == "rollout"]
        assert len(rows) == 8 * 4 and sorted({r["step"] for r in rows}) == list(range(1, 9))


def test_online_settings_are_checked_before_anything_runs(tmp_path):
    base = {"prompts": {"files": ["data/prompts/helpful.jsonl"]}}
    with pytest.raises(ConfigError, match=r"training.steps.0: grpo needs a reward judge"):
        parse_config({**base, "training": {"steps": ["grpo"]}})
    with pytest.raises(ConfigError, match=r"multiple of rloo.num_generations \(4\)"):
        parse_config(
            {**base, "training": {"steps": [{"kind": "rloo", "reward": WORDS, "batch_size": 6}]}}
        )
    # An online step alone needs no method: it trains on the round's prompts.
    off = {m: {"enabled": False} for m in ("self_reward", "rlcd", "cai")}
    grpo = {"kind": "grpo", "reward": WORDS}
    alone = parse_config({**base, **off, "training": {"steps": [grpo]}})
    assert alone.enabled_methods() == []
    with pytest.raises(ConfigError, match="enable at least one of"):
        parse_config({**base, **off, "training": {"steps": ["dpo"]}})
    alone_latest = {"kind": "grpo", "reward": {"kind": "reward_model", "model": "latest"}}
    cfg = parse_config({**base, **off, "training": {"steps": [alone_latest]}})
    with pytest.raises(ConfigError, match=r"^training.steps.0.reward.fallback: "):
        load_inputs(cfg)
    # The reward judge's files are read with the inputs: a wrong name is one line, placed.
    bad = {"kind": "grpo", "reward": {"kind": "function", "function": "judge_rules:nothing"}}
    cfg = parse_config({**base, **off, "training": {"steps": [bad]}})
    with pytest.raises(ConfigError, match=r"^training.steps.0.reward.function: .*no function"):
        load_inputs(cfg)


@pytest.mark.slow
def test_a_loop_of_online_rl_alone(harness, tmp_path, tiny_model_dir):
    """Two rounds with no method, GRPO on each round's draw against a rule: round 2
    generates with round 1's GRPO model and trains from it; its yardstick is measured."""
    from flows.loop import loop_flow

    off = {m: {"enabled": False} for m in ("self_reward", "rlcd", "cai")}
    step = {"kind": "grpo", "reward": WORDS}
    online = {"num_generations": 2, "max_steps": 2, "max_completion_length": 8}
    over = {
        **QUICK,
        **off,
        "name": "online",
        "training": {"steps": [step], "batch_size": 4, "max_length": 96, "grpo": online},
        "evaluation": {
            "enabled": True,
            "agreement": False,
            "yardstick": {"enabled": True, "limit": 4, "sampling": {"max_tokens": 8}},
        },
    }
    cfg = tiny_config(tmp_path, tiny_model_dir, **over)
    loop_flow(cfg)
    with Store(cfg["db_path"], read_only=True) as store:
        rounds = store.query("SELECT round, model_id, status FROM rounds ORDER BY round")
        runs = store.query("SELECT round, base_model_id, output_model_id FROM training_runs")
        runs = sorted(runs, key=lambda r: r["round"])
        assert [r["status"] for r in rounds] == ["finished", "finished"]
        assert rounds[1]["model_id"] == runs[0]["output_model_id"] == runs[1]["base_model_id"]
        for round_ in (1, 2):
            drawn = store.query("SELECT prompt_id FROM round_prompts WHERE round = ?", [round_])
            seen = store.query(
                "SELECT DISTINCT prompt_id FROM rollouts WHERE round = ? AND phase = 'rollout'",
                [round_],
            )
            assert len(drawn) == 6 and {r["prompt_id"] for r in seen} <= {
                r["prompt_id"] for r in drawn
            }
        assert store.query("SELECT count(*) AS n FROM pairs") == [{"n": 0}]
        yardstick = store.query(
            "SELECT DISTINCT round FROM evaluations "
            "WHERE metric = 'ifeval_prompt_strict' ORDER BY 1"
        )
        assert [r["round"] for r in yardstick] == [0, 1, 2]
        # docs/training.md's recipes over rollouts run on this run and find rows.
        recipes = sql_recipes((ROOT / "docs" / "training.md",))
        assert len(recipes) == 2
        for name, statement in recipes:
            assert store.sql(statement)[1], f"SQL recipe {name!r} found nothing"
