"""The `prefloop` command as a user runs it: a subprocess, real files, exit codes."""

import json
import subprocess
import sys

import pytest

from pipeline.store import SCHEMA_VERSION, Store


def prefloop(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "p.duckdb"
    with Store(path) as store:
        store.insert(
            "runs", [{"run_id": "r", "config_json": "{}", "config_sha256": "h", "seed": 0}]
        )
    return path


def test_sql_reads_in_every_format(db):
    out = prefloop("sql", "SELECT run_id, seed FROM runs", "--db", db)
    assert out.returncode == 0, out.stderr
    assert "run_id" in out.stdout and "(1 row)" in out.stdout
    out = prefloop("sql", "SELECT run_id FROM runs", "--db", db, "--format", "json")
    assert json.loads(out.stdout) == {"run_id": "r"}
    out = prefloop("sql", "SELECT run_id FROM runs", "--db", db, "--format", "csv")
    assert out.stdout.splitlines() == ["run_id", "r"]


def test_sql_refuses_writes_without_flag(db):
    out = prefloop("sql", "DELETE FROM runs", "--db", db)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "read-only" in out.stderr and "--write" in out.stderr
    assert (
        prefloop(
            "sql", "SELECT count(*) AS n FROM runs", "--db", db, "--format", "json"
        ).stdout.strip()
        == '{"n": 1}'
    )
    assert prefloop("sql", "DELETE FROM runs", "--db", db, "--write").returncode == 0


def test_db_info_lists_tables(db):
    out = prefloop("db", "info", "--db", db)
    assert out.returncode == 0, out.stderr
    assert f"schema v{SCHEMA_VERSION}" in out.stdout
    assert "pair_texts" in out.stdout and "runs" in out.stdout


def test_bad_config_is_one_line_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  kind: tpu\n")
    out = prefloop("run", "--config", bad)
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {bad}: engine.kind:")
    assert out.stderr.strip().count("\n") == 0


def test_templates_commands():
    listing = prefloop("templates", "list")
    assert "judge_additive_5pt" in listing.stdout
    rendered = prefloop(
        "templates",
        "render",
        "judge_additive_5pt",
        "--var",
        "instruction=Say hi",
        "--var",
        "response=hi",
    )
    assert rendered.returncode == 0 and "Say hi" in rendered.stdout
    missing = prefloop("templates", "render", "judge_additive_5pt", "--var", "instruction=x")
    assert missing.returncode == 2 and "missing variable 'response'" in missing.stderr


def test_models_list(default_model_dir):
    out = prefloop("models", "list")
    assert out.returncode == 0 and "smollm2-135m-instruct" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--judge-template", "nowhere/judge.j2"], "template 'nowhere/judge.j2' not found"),
        (["--set", "cai.constitution=missing.yaml"], "missing.yaml: file not found"),
        (
            [
                "--set",
                "rlcd.tasks=[helpfulness, nosuchtask]",
                "--set",
                "rlcd.default_task=helpfulness",
            ],
            "nosuchtask.yaml: file not found",
        ),
        (
            ["--set", "self_reward.judge_template=choice_ab"],
            "needs a front-matter `parser` of kind score",
        ),
        (["--set", "prompts.heldout=500"], "prompts.heldout: 500 held-out prompts leave none"),
        (["--set", "model=/no/such/model"], "no such directory or model name"),
    ],
)
def test_run_refuses_bad_input_before_any_work(tmp_path, args, message):
    db_file = tmp_path / "kept.duckdb"
    with Store(db_file) as store:
        store.insert(
            "runs", [{"run_id": "old", "config_json": "{}", "config_sha256": "x", "seed": 0}]
        )
    out = prefloop(
        "run",
        "--config",
        "data/configs/demo.yaml",
        "--set",
        f"db_path={db_file}",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        *args,
    )
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert "Traceback" not in out.stderr and "prefect" not in out.stdout.lower()
    with Store(db_file, read_only=True) as store:  # stored data untouched
        assert store.query("SELECT run_id FROM runs") == [{"run_id": "old"}]
    assert not (tmp_path / "runs").exists()


def test_empty_and_duplicate_prompt_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    out = prefloop(
        "run",
        "--set",
        f"prompts.files=[{empty}]",
        "--set",
        "prompts.heldout=0",
        "--set",
        f"db_path={tmp_path / 'x.duckdb'}",
    )
    assert out.returncode == 2 and f"{empty}: no prompts" in out.stderr
    assert not (tmp_path / "x.duckdb").exists()

    from pipeline.config import load_config
    from pipeline.rounds import load_inputs

    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"prompt": "Hi"}\n{"prompt": "Hi"}\n{"prompt": "Bye"}\n')
    inputs = load_inputs(load_config(None, [f"prompts.files=[{twice}]"]))
    assert [p.text for p in inputs.train_prompts] == ["Hi", "Bye"]
    assert inputs.duplicate_prompts == 1
