"""The `prefloop` command as a user runs it: a subprocess, real files, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import prefloop

from pipeline.store import SCHEMA_VERSION, Store

pytestmark = pytest.mark.slow  # every test runs `prefloop` as a subprocess


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


def test_the_command_and_the_checks_load_no_ml_library():
    """`prefloop status`, `sql` or a config error answer in well under a second: the CLI,
    the config with its registries and the pre-flight import neither torch, transformers,
    datasets, vLLM nor Prefect (each a second or more); those load where they run."""
    heavy = ("torch", "transformers", "datasets", "vllm", "prefect", "trl")
    code = (
        "import sys, flows.cli, pipeline.preflight; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


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
            ["--set", "self_reward.judge.template=choice_ab"],
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


JUDGE_HEAD = (
    "{#---\nvariables: [instruction, response]\n"
    "parser: {kind: score, pattern: 'S: (\\d)', min: 0, max: 5}\n---#}\n"
)


def _file(name: str, content: str | bytes):
    def make(tmp):
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return make


def _config(content: str):
    return lambda tmp: ["--config", _file("c.yaml", content)(tmp)]


def _judge(content: str):
    return lambda tmp: ["--judge-template", _file("j.j2", content)(tmp)]


def _prompts(content: bytes):
    return lambda tmp: ["--set", f"prompts.files=[{_file('p.jsonl', content)(tmp)}]"]


def _yardstick(content: str):
    def make(tmp):
        path = _file("y.jsonl", content)(tmp)
        return _config(f"evaluation:\n  yardstick:\n    enabled: true\n    prompts: {path}\n")(tmp)

    return make


def _dataset_column(tmp):
    """A parquet file of questions, and a config that reads a `prompt` column from it."""
    _file("q.jsonl", '{"question": "Why?", "id": 1}\n')(tmp)
    return _config(f"prompts:\n  datasets: [{{path: {tmp / 'q.jsonl'}, column: prompt}}]\n")(tmp)


def _model(tmp):
    (tmp / "m").mkdir()
    return ["--set", f"model={tmp / 'm'}"]


# The README's bad-input matrix (section "Bad input"), row by row: what the user gives,
# and the one line they see. Each runs `prefloop run` against a database holding an
# earlier run, which must come out byte for byte unchanged.
MATRIX = [
    ("malformed YAML", _config("rounds: 2\nengine: [kind: hf\n"), "c.yaml:3:1: invalid YAML"),
    (
        "unknown config key",
        _config("engine:\n  knd: hf\n"),
        "c.yaml (with --set): engine.knd: unknown key",
    ),
    (
        "a key of an earlier prefloop",
        _config("self_reward:\n  judge_template: judge_additive_5pt_prefilled\n"),
        "c.yaml (with --set): self_reward.judge_template: no longer a setting; use "
        "self_reward.judge: {kind: template, template: NAME}",
    ),
    (
        "wrong type",
        _config("rounds: many\n"),
        "c.yaml (with --set): rounds: Input should be a valid integer",
    ),
    (
        "missing template variable",
        _judge(JUDGE_HEAD.replace("response]", "response, rubric]") + "{{ rubric }}"),
        "j.j2: variables: 'rubric' is not given to a judge template",
    ),
    (
        "template syntax error",
        _judge(JUDGE_HEAD + "{% if instruction %}"),
        "j.j2:5: template syntax",
    ),
    (
        "template escaping the sandbox",
        _judge(JUDGE_HEAD + "{{ instruction.__class__.__mro__ }}"),
        "j.j2: blocked by the sandbox",
    ),
    (
        "judge template without a parser",
        _judge("{#---\nvariables: [instruction, response]\n---#}\n{{ instruction }}"),
        "j.j2: a judge template needs a front-matter `parser` of kind score",
    ),
    (
        "prompts file with invalid JSON",
        _prompts(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n'),
        "p.jsonl:3: invalid JSON",
    ),
    ("non-UTF-8 bytes", _prompts(b'{"prompt": "a"}\n{"prompt": "\xff"}\n'), "p.jsonl:2: not UTF-8"),
    ("empty prompts", _prompts(b"\n\n"), "p.jsonl: no prompts"),
    ("model directory not a model", _model, "no config.json"),
    (
        "dataset without the column named",
        _dataset_column,
        "q.jsonl): no column 'prompt'; it has question, id",
    ),
    (
        "Hub id not in the cache, offline",
        lambda tmp: ["--set", "model=prefloop-test/not-cached@v1"],
        "model 'prefloop-test/not-cached@v1': not in the Hugging Face cache",
    ),
    (
        "prefilled labels the tokenizer cannot read",
        _judge((Path(__file__).parent / "data" / "judge_percent_unreadable.j2").read_text()),
        "j.j2: label '1' reads as the start of label '10'",
    ),
    (
        "judge function that cannot be imported",
        _config("self_reward:\n  judge: {kind: function, function: 'no_such_module:score'}\n"),
        "self_reward.judge.function: cannot import 'no_such_module'",
    ),
    (
        "reward model that is not a reward model",
        _config("self_reward:\n  judge: {kind: reward_model, model: smollm2-135m-instruct}\n"),
        "not a reward model (architectures: LlamaForCausalLM)",
    ),
    (
        "engine context beyond the model's",
        _config("engine:\n  kind: vllm\n  max_model_len: 100000\n"),
        "c.yaml: engine.max_model_len: 100000 is more than smollm2-135m-instruct's context "
        "(max_position_embeddings 8192)",
    ),
    (
        "latest reward model without a fallback judge",
        _config("self_reward:\n  judge: {kind: reward_model, model: latest}\n"),
        "self_reward.judge.fallback: `model: latest` needs a fallback judge",
    ),
    (
        "training step with nothing to train on",
        _config("cai:\n  enabled: false\ntraining:\n  steps: [sft, dpo]\n"),
        "c.yaml: training.steps.0: sft has nothing to train on: it reads cai, and the enabled "
        "methods kept by training.methods are rlcd, self_reward",
    ),
    (
        "training logs to an integration transformers does not know",
        _config("training:\n  report_to: [tensorbored]\n"),
        "c.yaml: training.report_to: 'tensorbored' is not one of azure_ml, clearml,",
    ),
    (
        "kto with a batch of one",
        _config("training:\n  steps: [kto]\n  batch_size: 1\n"),
        "c.yaml (with --set): training.steps.0: kto needs batch_size >= 2",
    ),
    (
        "yardstick prompt with an unknown check",
        _yardstick('{"prompt": "Hi", "checks": [{"type": "rhymes"}]}\n'),
        "y.jsonl:1: checks[0].type: expected one of word_count, bullet_count",
    ),
    (
        "yardstick check missing an argument",
        _yardstick('{"prompt": "Hi", "checks": [{"type": "bullet_count"}]}\n'),
        "y.jsonl:1: checks[0]: bullet_count() missing 1 required positional argument: 'n'",
    ),
    (
        "yardstick prompt whose topic is not text",
        _yardstick('{"prompt": "Hi", "checks": [{"type": "lowercase"}], "topic": 3}\n'),
        "y.jsonl:1: topic: expected a non-empty string, got 3",
    ),
    (
        "yardstick topic made of function words only",
        _yardstick('{"prompt": "Hi", "checks": [{"type": "lowercase"}], "topic": "how to"}\n'),
        "y.jsonl:1: topic: 'how to' has no word that says what it is about",
    ),
    (
        "checklist judge on a template that does not read yes/no",
        _config(
            "self_reward:\n  judge: {kind: checklist, template: judge_additive_5pt_prefilled}\n"
        ),
        "judge_additive_5pt_prefilled.j2: parser: a checklist question is prefilled",
    ),
    (
        "yardstick split named like the seen one",
        _config("evaluation:\n  yardstick:\n    splits: {seen: a.jsonl}\n"),
        "c.yaml (with --set): evaluation.yardstick.splits: 'seen': a split name is lower-case",
    ),
    (
        "yardstick split whose file is not there",
        _config("evaluation:\n  yardstick:\n    enabled: true\n    splits: {new: nope.jsonl}\n"),
        "nope.jsonl: prompts file not found",
    ),
    (
        "benchmark task lm-eval does not know",
        _config("evaluation:\n  benchmarks:\n    tasks: [ifevall]\n"),
        "c.yaml: evaluation.benchmarks.tasks: unknown lm-eval task 'ifevall' (lm-eval 0.4",
    ),
    (
        "benchmark task folder that does not exist",
        _config("evaluation:\n  benchmarks:\n    tasks: [x]\n    include_path: /no/tasks\n"),
        "c.yaml: evaluation.benchmarks.include_path: /no/tasks: no such folder",
    ),
    pytest.param(
        "engine setting the engine refuses",
        _config("engine:\n  kind: vllm\n  block_size: 48\n"),
        "c.yaml: engine.block_size: vLLM-CPU's attention needs a multiple of 32, got 48",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU engine's limit"),
    ),
]


@pytest.mark.parametrize(
    ("case", "make_args", "message"), MATRIX, ids=[getattr(m, "values", m)[0] for m in MATRIX]
)
def test_bad_input_matrix(tmp_path, case, make_args, message):
    db_file = tmp_path / "kept.duckdb"
    with Store(db_file) as store:
        store.insert(
            "runs", [{"run_id": "old", "config_json": "{}", "config_sha256": "x", "seed": 0}]
        )
    before = db_file.read_bytes()
    args = make_args(tmp_path)
    config = [] if "--config" in args else ["--config", "data/configs/demo.yaml"]
    out = prefloop(
        "run",
        *config,
        *args,
        "--set",
        f"db_path={db_file}",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        "--set",
        "prompts.heldout=0",
    )
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert db_file.read_bytes() == before
    assert not (tmp_path / "runs").exists()


def test_database_held_by_another_writer_or_newer(tmp_path):
    """The database rows of the matrix: another writer holds it, or a newer prefloop wrote
    it. One line each, and the file is not touched."""
    db_file = tmp_path / "kept.duckdb"
    with Store(db_file):
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, duckdb; c = duckdb.connect(sys.argv[1]); "
            "print('ready', flush=True); time.sleep(60)",
            str(db_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        out = prefloop("run", "--set", f"db_path={db_file}", "--set", f"runs_dir={tmp_path}/r")
        assert out.returncode == 2
        notice, line = out.stderr.strip().splitlines()  # it waited 10 s, and said so
        assert f"PID {holder.pid} holds the database; waiting up to 10 s" in notice, notice
        assert line.startswith("error: ") and "in use by another process (PID" in line, line
    finally:
        holder.kill()
        holder.wait()
    with Store(db_file) as store:
        store.con.execute("INSERT INTO schema_version (version) VALUES (99)").fetchall()
    before = db_file.read_bytes()
    out = prefloop("run", "--set", f"db_path={db_file}", "--set", f"runs_dir={tmp_path}/r")
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert "database schema v99 is newer than this prefloop" in line, line
    assert db_file.read_bytes() == before
