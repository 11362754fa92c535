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
    out = prefloop("smoke", "--config", bad)
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


def test_smoke_job_with_a_tiny_model(tmp_path, tiny_model_dir):
    """The smoke job end to end: config, store, template, engine (transformers here)."""
    out = prefloop(
        "smoke",
        "--config",
        "data/configs/demo.yaml",
        "--set",
        f"model={tiny_model_dir}",
        "--set",
        "engine.kind=hf",
        "--set",
        f"db_path={tmp_path / 's.duckdb'}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "answer" in out.stdout and "score" in out.stdout
    with Store(tmp_path / "s.duckdb", read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM templates")[0]["n"] == 1
        assert store.query("SELECT count(*) AS n FROM models")[0]["n"] == 1
