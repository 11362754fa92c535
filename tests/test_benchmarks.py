"""Standard benchmarks through lm-evaluation-harness: in the loop on M_0 and every M_t,
and afterwards with `prefloop eval`, on task definitions with local data that the tests
write (no network: an IFEval task scored by lm-eval's own IFEval code, and a small
generate_until task)."""

import json
import re
from pathlib import Path

import pytest
from helpers import QUICK, prefloop, tiny_config, write_config, write_round

from pipeline.evaluation.benchmarks import SOURCE, benchmark_rows, summarize
from pipeline.rows import RoundContext
from pipeline.store import Store

IFEVAL_DOCS = [  # instructions whose checks need no nltk data (none count sentences)
    ("Write a short note about tea. Do not use any commas.", "punctuation:no_comma", {}),
    ("Describe a river in all lowercase letters.", "change_case:english_lowercase", {}),
    (
        "Name three fruits in fewer than 20 words.",
        "length_constraints:number_words",
        {"relation": "less than", "num_words": 20},
    ),
    ("Say hello without any capital letters.", "change_case:english_lowercase", {}),
]
ARITH_DOCS = [("2 + 2 =", "4"), ("3 + 5 =", "8"), ("10 - 7 =", "3")]


def write_tasks(folder: Path) -> Path:
    """A task folder for lm-eval's TaskManager: `ifeval_local` includes lm-eval's shipped
    ifeval.yaml and points it at a local file; `arith_local` is a task of its own, and
    `arith_fewshot` the same with two examples before each question."""
    import lm_eval.tasks

    folder.mkdir(parents=True, exist_ok=True)
    shipped = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    docs = [
        {"key": i, "prompt": p, "instruction_id_list": [kind], "kwargs": [kwargs]}
        for i, (p, kind, kwargs) in enumerate(IFEVAL_DOCS)
    ]
    (folder / "ifeval.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "ifeval_local.yaml").write_text(
        f"include: {shipped}\ntask: ifeval_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    train: {folder / 'ifeval.jsonl'}\n"
    )
    arith = [{"question": q, "answer": a} for q, a in ARITH_DOCS]
    (folder / "arith.jsonl").write_text("".join(json.dumps(d) + "\n" for d in arith))
    (folder / "arith_local.yaml").write_text(
        "task: arith_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'arith.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
    (folder / "arith_fewshot.yaml").write_text(
        "include: arith_local.yaml\ntask: arith_fewshot\nnum_fewshot: 2\nfewshot_split: test\n"
    )
    return folder


# simple_evaluate's results, as lm-eval 0.4.13 returns them (cut to what is read).
RESULTS = {
    "results": {
        "ifeval": {
            "alias": "ifeval",
            "prompt_level_strict_acc,none": 0.25,
            "prompt_level_strict_acc_stderr,none": 0.25,
            "inst_level_strict_acc,none": 0.5,
            "inst_level_strict_acc_stderr,none": "N/A",
        },
        "gsm8k": {
            "exact_match,strict-match": 0.1,
            "exact_match_stderr,strict-match": 0.03,
            "exact_match,flexible-extract": 0.2,
            "exact_match_stderr,flexible-extract": 0.04,
        },
    },
    "configs": {"ifeval": {"task": "ifeval", "num_fewshot": 0}, "gsm8k": {"task": "gsm8k"}},
    "versions": {"ifeval": 4.0, "gsm8k": 3.0},
    "n-shot": {"ifeval": 0, "gsm8k": 5},
    "n-samples": {"ifeval": {"original": 541, "effective": 4}, "gsm8k": {"effective": 10}},
    "lm_eval_version": "0.4.13",
}


def test_every_metric_is_stored_with_its_stderr_count_and_task_hash():
    from pipeline.evaluation.benchmarks import BenchmarkSpec

    summary = summarize(RESULTS)
    spec = BenchmarkSpec(["ifeval"], "hf", "m", {}, {"ifeval": "out.json"}, "p", limit=4)
    rows = benchmark_rows(RoundContext("r", 1, "m@1", 0), "m@1", "ifeval", summary, spec)
    found = {e["metric"]: (e["value"], json.loads(e["details_json"])) for e in rows["evaluations"]}
    assert set(found) == {
        "ifeval/prompt_level_strict_acc",
        "ifeval/inst_level_strict_acc",
        "gsm8k/exact_match,strict-match",
        "gsm8k/exact_match,flexible-extract",
    }
    value, d = found["ifeval/prompt_level_strict_acc"]
    assert value == 0.25 and d["stderr"] == 0.25 and d["n"] == 4 and d["source"] == SOURCE
    assert d["lm_eval_version"] == "0.4.13" and d["task_version"] == 4.0 and d["limit"] == 4
    assert d["model"] == "m@1" and d["requested"] == "ifeval" and len(d["task_config_hash"]) == 16
    assert found["ifeval/inst_level_strict_acc"][1]["stderr"] is None  # lm-eval's "N/A"
    assert found["gsm8k/exact_match,flexible-extract"][1]["stderr"] == 0.04
    hashes = {d["task_config_hash"] for _, d in found.values()}
    assert len(hashes) == 2  # one per task's config
    again = benchmark_rows(RoundContext("r", 1, "m@1", 0), "m@1", "ifeval", summary, spec)
    assert [e["evaluation_id"] for e in again["evaluations"]] == [
        e["evaluation_id"] for e in rows["evaluations"]
    ]  # the same measurement stored again adds nothing


@pytest.mark.slow
def test_a_run_and_prefloop_eval_store_lm_eval_metrics(tmp_path, tiny_model_dir, chromium):
    """A one-round run with `evaluation.benchmarks` measures M_0 and M_1 on a local
    IFEval task; `prefloop eval` adds a task for M_1 (skipping the stored one), adds
    nothing when repeated, and measures M_0 on vLLM. The report's benchmark section
    shows them in Chromium."""
    tasks = write_tasks(tmp_path / "tasks")
    benchmarks = {"tasks": ["ifeval_local"], "include_path": str(tasks), "max_gen_toks": 16}
    cfg = tiny_config(
        tmp_path,
        tiny_model_dir,
        **{
            **QUICK,
            "name": "bench",
            "rounds": 1,
            "evaluation": {"enabled": False, "benchmarks": benchmarks},
        },
    )
    path = write_config(cfg, tmp_path / "bench.yaml")
    out = prefloop("run", "--config", path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "benchmark ifeval_local of " in out.stderr
    metric = "ifeval_local/prompt_level_strict_acc"
    db = Path(cfg["db_path"])
    with Store(db, read_only=True) as store:
        rows = store.query(
            "SELECT round, value, details_json FROM evaluations WHERE metric = ?", [metric]
        )
        m1 = store.sql("SELECT model_id FROM models WHERE kind = 'policy' AND round = 1")[1][0][0]
    by_round = {r["round"]: json.loads(r["details_json"]) for r in rows}
    assert sorted(by_round) == [0, 1], rows
    assert by_round[1]["model"] == m1 != by_round[0]["model"]
    for d in by_round.values():
        assert d["n"] == len(IFEVAL_DOCS) and isinstance(d["stderr"], float)
        assert d["lm_eval_version"].startswith("0.4") and d["backend"] == "hf"

    def evaluate(round_, *extra):
        done = prefloop(
            "eval", "--config", path, "--round", round_, "--include-path", tasks, *extra
        )
        assert done.returncode == 0, done.stderr[-3000:]
        with Store(db, read_only=True) as store:
            return done.stdout, store.sql("SELECT count(*) FROM evaluations")[1][0][0]

    said, count = evaluate(1, "--tasks", "ifeval_local,arith_local")
    assert re.search(r"benchmark ifeval_local of .* \(M_1\): already stored", said), said
    assert re.search(r"benchmark arith_local of .* \(M_1\): arith_local/exact_match ", said), said
    said, again = evaluate(1, "--tasks", "ifeval_local,arith_local")
    assert again == count and said.count("already stored") == 2
    said, _ = evaluate(
        0,
        "--tasks",
        "arith_local,arith_fewshot",
        "--set",
        "engine.kind=vllm",
        "--set",
        "engine.cpu_kv_cache_gib=0.5",
        "--set",
        "engine.max_model_len=512",
    )
    with Store(db, read_only=True) as store:
        arith = store.query(
            "SELECT metric, round, details_json->>'backend' AS backend, "
            "details_json->>'n' AS n, details_json->>'num_fewshot' AS shots FROM evaluations "
            "WHERE metric LIKE 'arith_%/exact_match' ORDER BY round, metric"
        )
    assert [
        (a["metric"].split("/")[0], a["round"], a["backend"], a["n"], a["shots"]) for a in arith
    ] == [
        ("arith_fewshot", 0, "vllm", "3", "2"),
        ("arith_local", 0, "vllm", "3", "0"),
        ("arith_local", 1, "hf", "3", "0"),
    ]
    # M_0's two tasks ran in one child: one spec, one log, one model load.
    specs = list((Path(cfg["runs_dir"]) / "bench").rglob("M0-*.spec.json"))
    assert sorted(json.loads(p.read_text())["tasks"] for p in specs) == [
        ["arith_local", "arith_fewshot"],
        ["ifeval_local"],
    ]

    report = prefloop("report", "--config", path, "--out", tmp_path / "report.html")
    assert report.returncode == 0, report.stderr
    dom = chromium.dom(tmp_path / "report.html", tmp_path / "dom")
    section = dom[dom.index('<section id="benchmarks">') :]
    section = section[: section.index("</section>")]
    assert 'data-plot="benchmarks"' in section
    for name in (metric, "arith_local/exact_match"):
        assert f"<code>{name}</code>" in section
    assert "<th>M_0</th><th>M_1</th>" in section and "(n=4)" in section and "(n=3)" in section


@pytest.mark.slow
def test_eval_refuses_before_running_anything(tmp_path, tiny_model_dir):
    """On a stored round: an unknown task, a round that is not stored, one line each
    and nothing added to the database."""
    cfg = tiny_config(tmp_path, tiny_model_dir, name="b", rounds=1)
    with Store(cfg["db_path"]) as store:
        write_round(store, tiny_model_dir, "b", n=2)
    path = write_config(cfg, tmp_path / "b.yaml")
    before = Path(cfg["db_path"]).read_bytes()
    for args, message in (
        (
            ["--round", "1", "--tasks", "no_such_task"],
            "error: --tasks: unknown lm-eval task 'no_such_task'",
        ),
        (["--round", "3", "--tasks", "ifeval"], "error: --round 3: run b has no round 3 stored"),
    ):
        out = prefloop("eval", "--config", path, *args)
        assert out.returncode == 2, out.stderr
        [line] = out.stderr.strip().splitlines()
        assert line.startswith(message), line
    assert Path(cfg["db_path"]).read_bytes() == before
