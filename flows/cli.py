"""The `prefloop` command. Errors the user can fix print as one line and exit with 2."""

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from flows.runlog import ERROR_FILE, console, one_line, record_failure
from pipeline.config import load_config
from pipeline.errors import PrefloopError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(no_args_is_help=True, help="Pull, list and resolve models.")
templates_app = typer.Typer(no_args_is_help=True, help="List, show and render prompt templates.")
db_app = typer.Typer(no_args_is_help=True, help="Inspect the database.")
app.add_typer(models_app, name="models")
app.add_typer(templates_app, name="templates")
app.add_typer(db_app, name="db")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override: key.path=value.")]
DbOpt = Annotated[Path | None, typer.Option("--db", help="DuckDB file (default: the config's).")]


def _db_path(db: Path | None, config: Path | None) -> Path:
    return db if db is not None else load_config(config).db_path


# -- models -------------------------------------------------------------------------------


@models_app.command("pull")
def models_pull(force: bool = typer.Option(False, help="Convert again even if present.")):
    """Install the default model (SmolLM2-135M-Instruct) as a Hugging Face checkpoint."""
    from pipeline.models import pull_default

    start = time.perf_counter()
    info, pulled = pull_default(force=force)
    verb = f"pulled in {time.perf_counter() - start:.0f}s" if pulled else "already present"
    typer.echo(f"{info.name}: {verb} at {info.path} (sha256 {info.sha256[:12]})")


@models_app.command("list")
def models_list():
    """Models under data/models/ (any other checkpoint directory works by path)."""
    from pipeline.models import list_models

    models = list_models()
    if not models:
        typer.echo("no models yet; run `prefloop models pull`")
    for m in models:
        typer.echo(f"{m.name}\t{m.sha256[:12]}\t{m.path}")


@models_app.command("resolve")
def models_resolve(
    model: Annotated[
        str, typer.Argument(help="A name under data/models, a path, or org/name[@rev].")
    ],
):
    """Where a model name resolves: its directory, its Hub revision (a commit) when it is a
    Hub id, its content hash and the model id a run stores."""
    from pipeline.models import resolve_model

    info = resolve_model(model)
    typer.echo(f"path     {info.path}")
    if info.repo is not None:
        typer.echo(f"repo     {info.repo}")
        typer.echo(f"revision {info.revision}")
    typer.echo(f"sha256   {info.sha256}")
    typer.echo(f"model id {info.model_id}")


# -- templates ----------------------------------------------------------------------------


def _library(extra: list[Path] | None):
    from pipeline.templates import TemplateLibrary

    return TemplateLibrary(extra)


ExtraDirs = Annotated[list[Path] | None, typer.Option("--dir", help="Extra template directory.")]


@templates_app.command("list")
def templates_list(dirs: ExtraDirs = None):
    lib = _library(dirs)
    for name in lib.names():
        t = lib.get(name)
        parser = t.meta.parser.kind if t.meta.parser else "-"
        typer.echo(f"{name}\t{t.sha256[:12]}\tparser={parser}\tvars={','.join(t.meta.variables)}")


@templates_app.command("show")
def templates_show(name: str, dirs: ExtraDirs = None):
    t = _library(dirs).get(name)
    typer.echo(f"# {t.path} ({t.template_id})")
    typer.echo(t.text)


@templates_app.command("render")
def templates_render(
    name: str,
    var: Annotated[list[str] | None, typer.Option("--var", help="k=v")] = None,
    dirs: ExtraDirs = None,
):
    values = {}
    for item in var or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise PrefloopError(f"--var {item!r}: expected name=value")
        values[key] = value
    typer.echo(_library(dirs).get(name).render(**values))


# -- database -----------------------------------------------------------------------------


@app.command("sql")
def sql(
    query: str,
    db: DbOpt = None,
    config: ConfigOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    write: bool = typer.Option(False, "--write", help="Allow statements that modify the db."),
):
    """Run SQL on the database (read-only unless --write)."""
    from pipeline.store import Store

    if fmt not in ("table", "csv", "json"):
        raise PrefloopError(f"--format {fmt!r}: choose table, csv or json")
    with Store(_db_path(db, config), read_only=not write) as store:
        columns, rows = store.sql(query)
    _print_rows(columns, rows, fmt)


@db_app.command("info")
def db_info(db: DbOpt = None, config: ConfigOpt = None):
    """Tables and views with their row counts."""
    from pipeline.store import Store

    path = _db_path(db, config)
    with Store(path, read_only=True) as store:
        version = store.schema_version()
        counts = store.table_counts()
    typer.echo(f"{path} (schema v{version})")
    _print_rows(["name", "kind", "rows"], counts, "table")


def _print_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    if fmt == "json":
        for row in rows:
            typer.echo(
                json.dumps(dict(zip(columns, row, strict=True)), default=str, ensure_ascii=False)
            )
        return
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
        return
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    typer.echo("  ".join("-" * w for w in widths))
    for r in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    typer.echo(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def _cell(value, width: int = 60) -> str:
    text = "NULL" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


# -- training hand-off --------------------------------------------------------------------

RunOpt = Annotated[str | None, typer.Option("--run", help="Run name (default: the config's).")]
RoundOpt = Annotated[int, typer.Option("--round", help="Round number.")]
JudgeIdOpt = Annotated[
    str | None,
    typer.Option(
        "--judge",
        help="A judge's pairs, built from its scores: its judge id, or what `prefloop "
        "judge --judge` was given.",
    ),
]


def _judge_id(store, run_id: str, round_: int, judge: str) -> str:
    """A judge id of the round as given, or the id a judge spec stores its judgments
    under."""
    from pipeline.rejudge import METHOD, judge_identity, judge_settings_from

    known = store.round_judges(run_id, round_, METHOD)
    return judge if judge in known else judge_identity(judge_settings_from(judge))


KindOpt = Annotated[
    str | None,
    typer.Option("--kind", help="A training kind (sft, dpo, kto, rm); default: the config's step."),
]


def _step_of(cfg, kind: str | None):
    """The training step a command works on: the config's step of `kind` (the shared
    settings as that kind when the config has none), or its only step."""
    from pipeline.training.step import round_steps

    if kind is not None:
        return next(s for s in round_steps(cfg.training, kind) if s.kind == kind)
    steps = cfg.training.step_list()
    if len(steps) != 1:
        have = ", ".join(s.kind for s in steps) or "none"
        raise PrefloopError(f"training steps: {have}; choose one with --kind")
    return steps[0]


@app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    round_: RoundOpt,
    run: RunOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl | parquet | hf")] = "parquet",
    kind: KindOpt = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    judge: JudgeIdOpt = None,
):
    """Write what a training kind trains on, in TRL's own dataset format (train/test
    splits): preference pairs (dpo, rm), `messages` (sft) or prompt/completion/label
    (kto), filtered by the step's training settings and its data window. With --judge,
    the Self-Rewarding pairs that judge's scores make instead (see `prefloop judge`)."""
    from pipeline.store import Store
    from pipeline.training.export import split_pairs, write_dataset
    from pipeline.training.kinds import TRAINING_KINDS
    from pipeline.training.step import export_step

    if fmt not in ("jsonl", "parquet", "hf"):
        raise PrefloopError(f"--format {fmt!r}: expected jsonl, parquet or hf")
    cfg = load_config(config, overrides)
    if judge is not None:
        from pipeline.rejudge import judge_pair_texts

        run_id = run or cfg.name
        with Store(cfg.db_path, read_only=True) as store:
            judge_id = _judge_id(store, run_id, round_, judge)
            rows = judge_pair_texts(store, run_id, round_, judge_id)
        data = split_pairs(rows, cfg.training.heldout_fraction, cfg.seed)
        write_dataset(data, out, fmt)  # type: ignore[arg-type]
        typer.echo(
            f"{out}: {len(data['train'])} train, {len(data['test'])} test pairs ({fmt}) "
            f"by judge {judge_id}"
        )
        return
    step = _step_of(cfg, kind)
    with Store(cfg.db_path, read_only=True) as store:
        counts = export_step(store, step, run or cfg.name, round_, out, cfg.seed, fmt)
    noun = "pairs" if "chosen" in TRAINING_KINDS[step.kind].columns else "examples"
    typer.echo(f"{out}: {counts['train']} train, {counts['test']} test {noun} ({fmt}, {step.kind})")


@app.command("train")
def train(
    round_: RoundOpt,
    run: RunOpt = None,
    kind: Annotated[
        str | None,
        typer.Option("--kind", help="Train this kind's step alone, again if stored."),
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
):
    """Train a round's steps in order (those stored are skipped) and register each
    checkpoint; --kind trains one step, from the policy the earlier steps made."""
    from pipeline.rounds import round_dir
    from pipeline.store import Store
    from pipeline.training.step import round_steps, train_round

    cfg = load_config(config, overrides)
    steps = round_steps(cfg.training, kind)  # an unknown --kind fails here, before the store
    if not steps:
        raise PrefloopError("training steps: none; choose one with --kind")
    run_id = run or cfg.name
    folder = round_dir(cfg.runs_dir, run_id, round_)
    # Not held while training: readers can open the database meanwhile.
    store = Store(cfg.db_path, lock_timeout_s=cfg.db_lock_timeout_s)

    def show(result):
        typer.echo(f"model {result['model_id']} at {result['path']}")
        typer.echo(json.dumps(result["metrics"], indent=2, sort_keys=True))

    done = train_round(store, cfg.training, run_id, round_, folder, cfg.seed, kind, show)
    if not done["trained"]:
        have = ", ".join(s.kind for s in steps)
        typer.echo(f"round {round_}: every step is stored ({have}); --kind K trains one again")


def _print_comparison(comparison: dict, other: str, judge_id: str) -> None:
    typer.echo(f"compare  {other} (a) vs {judge_id} (b), {comparison['prompts']} prompts")
    for name in ("pair_agreement", "kendall_tau", "same_best", "same_worst"):
        typer.echo(f"  {name:<22} {_cell(comparison[name])}")
    for side in ("a", "b"):
        summary = comparison[side]
        scores = summary["scores"]
        spread = (
            f"mean {scores['mean']:.3f} sd {scores['std']:.3f} [{scores['min']:.3f}, "
            f"{scores['max']:.3f}]"
            if scores["n"]
            else "no scores"
        )
        failures = _cell(summary["parse_failure_rate"])
        typer.echo(f"  judge {side}: parse failures {failures}, {spread}")


@app.command("judge")
def judge_cmd(
    round_: RoundOpt,
    judge: Annotated[
        str,
        typer.Option(
            "--judge",
            help="A template name or .j2 path, a reward-model directory, module:function, or "
            "checklist[:mean|min|product].",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", help="The model a template judge runs on (default: the round's)."),
    ] = None,
    against: Annotated[
        str | None,
        typer.Option("--against", help="The judge id to compare with (default: the round's own)."),
    ] = None,
    run: RunOpt = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
):
    """Score a finished round's stored Self-Rewarding candidates with another judge (no
    generation), store its judgments, and compare it with the round's own judge. Resumable
    and idempotent: what the judge has scored is skipped."""
    from pipeline.engines import start_for_role
    from pipeline.rejudge import METHOD, compare_judges, judge_settings_from, rejudge_round
    from pipeline.store import Store

    cfg = load_config(config, overrides)
    run_id = run or cfg.name
    settings = judge_settings_from(judge, model)

    def start(model_path: str, role: str):
        return start_for_role(Path(model_path), cfg.engine, cfg.seed + round_, role)

    store = Store(cfg.db_path, lock_timeout_s=cfg.db_lock_timeout_s)  # held per write
    result = rejudge_round(store, cfg, run_id, round_, settings, start)
    typer.echo(
        f"judge    {result.judge_id}: {result.added} judgments added, {result.already} of "
        f"{result.candidates} candidates already scored; nothing generated"
    )
    judges = store.round_judges(run_id, round_, METHOD)
    other = against or next((j for j in judges if j != result.judge_id), None)
    if other is None:
        typer.echo("compare  no other judge has scored this round")
        return
    comparison, rows = compare_judges(store, run_id, round_, other, result.judge_id)
    store.write({"evaluations": rows})
    _print_comparison(comparison, other, result.judge_id)


@app.command("eval")
def eval_cmd(
    round_: RoundOpt,
    tasks: Annotated[str, typer.Option("--tasks", help="lm-eval tasks, comma-separated.")],
    include_path: Annotated[
        Path | None, typer.Option("--include-path", help="A folder of your own task YAMLs.")
    ] = None,
    limit: Annotated[
        float | None, typer.Option("--limit", help="The first K documents of each task.")
    ] = None,
    run: RunOpt = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
):
    """Run lm-evaluation-harness tasks on a stored round's model (--round 0: the run's
    initial model; N: the model round N trained) and store every metric in `evaluations`
    as `<task>/<metric>`. A task stored for that model already is skipped, so a killed
    call resumes and a repeated one adds nothing. The rest of `evaluation.benchmarks`
    (few-shot, batch size, answer length) and the engine come from the config."""
    from pipeline.evaluation.benchmarks import (
        TaskProblem,
        benchmark_tasks,
        measured_model,
        result_line,
        setup_problem,
    )
    from pipeline.rounds import round_dir
    from pipeline.rows import RoundContext, Rows
    from pipeline.store import Store

    cfg = load_config(config, overrides)
    run_id = run or cfg.name
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    given = {"tasks": names, "include_path": include_path, "limit": limit}
    settings = cfg.evaluation.benchmarks.model_copy(
        update={k: v for k, v in given.items() if v is not None}
    )
    with Store(cfg.db_path, read_only=True) as store:
        model_id = measured_model(store, cfg.training.step_list(), run_id, round_)
        path = store.model(model_id)["path"]
        stored = store.benchmarked(run_id, round_, model_id)
    # The task names themselves are checked by lm-eval's child, before it loads the model.
    problem = setup_problem(settings.include_path) if names else "tasks: none given"
    if problem:
        raise PrefloopError(f"--{problem.replace('include_path', 'include-path', 1)}")
    for task in (t for t in names if t in stored):
        typer.echo(f"benchmark {task} of {model_id} (M_{round_}): already stored")
    ctx = RoundContext(run_id, round_, model_id, cfg.seed)
    folder = round_dir(cfg.runs_dir, run_id, max(round_, 1)) / "benchmarks"

    def measured(task: str, rows: Rows) -> None:  # opened for writing once there is a result
        Store(cfg.db_path, lock_timeout_s=cfg.db_lock_timeout_s).write(rows)
        typer.echo(result_line(task, model_id, round_, rows))

    missing, engine = [t for t in names if t not in stored], cfg.evaluation.engine or cfg.engine
    try:
        if missing:
            benchmark_tasks(ctx, model_id, path, missing, settings, engine, folder, measured)
    except TaskProblem as e:
        raise PrefloopError(f"--{e}") from None


# -- the main job ------------------------------------------------------------------------


def _run_config(config: Path | None, overrides: list[str] | None, judge_template: Path | None):
    if judge_template is not None:  # the Self-Rewarding judge's template
        overrides = [*(overrides or []), f"self_reward.judge.template={judge_template}"]
    return load_config(config, overrides)


JudgeOpt = Annotated[
    Path | None, typer.Option("--judge-template", help="A judge .j2 file to use instead.")
]


@app.command("run")
def run(
    config: ConfigOpt = Path("data/configs/demo.yaml"),
    overrides: SetOpt = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", help="Rounds (default: config).")
    ] = None,
    judge_template: JudgeOpt = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", help="Print every line, tracebacks too (the log file has them all)."
        ),
    ] = False,
):
    """Run the iterative loop: generate pairs with every enabled method, train, repeat.
    Re-running the same command resumes where it stopped. The full log, tracebacks
    included, goes to runs/<run>/logs/; a failure ends with one `error:` line."""
    from flows.runlog import console, start_run_log
    from flows.supervise import is_worker, start_prefect_api, watch_supervisor
    from pipeline.preflight import preflight

    if is_worker():
        watch_supervisor()  # the supervisor killed: this process group goes with it
    cfg = _run_config(config, overrides, judge_template)
    # Prefect's temporary server starts while the inputs are checked; no engine or flow
    # starts before the checks pass.
    prefect_api = start_prefect_api() if is_worker() else None
    inputs = preflight(cfg, str(config))  # every input checked before a flow or an engine
    from flows.cluster import check_runner
    from flows.loop import loop_flow

    check_runner(cfg)  # runner.kind ray without the ray extra installed fails here
    if prefect_api is not None:
        prefect_api()
    global _RUN_LOG
    _RUN_LOG = start_run_log(cfg.runs_dir, cfg.name, verbose)
    say = console()  # the terminal: the run's stdout goes to its log file
    say.write(
        f"prompts  {len(inputs.train_prompts)} for generation, {len(inputs.heldout_prompts)} "
        f"held out, {inputs.duplicate_prompts} duplicates ignored\n"
        f"log      {_RUN_LOG.resolve()}\n"
    )
    result = loop_flow(cfg.model_dump(mode="json"), rounds=rounds, checked=True)
    say.write(
        f"run      {result['run_id']}: {result['rounds']} rounds, final model "
        f"{result['final_model']}\n"
        f"database {Path(result['db_path']).resolve()}\n"
        f"rounds   {Path(cfg.runs_dir).resolve() / cfg.name}\n"
        f"report   {Path(result['report']).resolve()}\n"
        f"inspect  prefloop status --config {config}; prefloop pairs --config {config} "
        "--round 1\n"
    )


@app.command("serve")
def serve(
    cron: Annotated[str, typer.Option("--cron", help='Schedule, e.g. "0 3 * * *".')],
    config: ConfigOpt = Path("data/configs/demo.yaml"),
    overrides: SetOpt = None,
    rounds: Annotated[int | None, typer.Option("--rounds")] = None,
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "prefloop",
):
    """Serve the loop as a Prefect deployment on a cron schedule (blocks; Ctrl-C stops).
    Each scheduled run continues the run with more rounds from its latest model."""
    from flows.cluster import check_runner
    from flows.loop import loop_flow
    from pipeline.preflight import preflight

    cfg = load_config(config, overrides)
    preflight(cfg, str(config))  # a bad config never reaches the deployment
    check_runner(cfg)
    typer.echo(f"serving run {cfg.name!r} on {cron!r}: each run adds {rounds or cfg.rounds} rounds")
    loop_flow.serve(
        name=name,
        cron=cron,
        parameters={
            "config": str(config.resolve()),
            "overrides": overrides or [],
            "rounds": rounds,
            "extend": True,
        },
    )


@app.command("report")
def report_cmd(
    run: RunOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="HTML file to write.")] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
):
    """Write a run's HTML report: win rate, score distributions, length drift, agreement,
    time per stage, and the key numbers (runs/<run>/report.html by default)."""
    from pipeline.report import report_path, write_report

    cfg = load_config(config)
    run_id = run or cfg.name
    page = write_report(_db_path(db, config), run_id, out or report_path(cfg.runs_dir, run_id))
    typer.echo(f"report {page.resolve()}")


@app.command("status")
def status(
    run: RunOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    watch: Annotated[
        float | None,
        typer.Option("--watch", help="Refresh every N seconds until no round is running."),
    ] = None,
):
    """Rounds of each run: status, stages done (batches), pairs per method, trained model;
    for a running round its stage, batch i of n, pairs so far, tokens/s, elapsed time
    and an estimate of what is left. Readable while a run writes."""
    from pipeline.store import Store

    path = _db_path(db, config)
    while True:
        with Store(path, read_only=True) as store:
            rows = store.run_status(run)
            running = store.running_rounds(run)
        if watch:
            typer.echo("\033[2J\033[H", nl=False)  # clear the terminal
        if not rows:
            typer.echo("no rounds yet" + (f" for run {run!r}" if run else ""))
        else:
            _print_rows(list(rows[0]), [tuple(r.values()) for r in rows], "table")
        live = [_live_line(r) for r in running]
        for line in live:
            typer.echo(line)
        if not watch or not any(line.startswith("running") for line in live):
            return
        time.sleep(watch)


def _live_line(r: dict) -> str:
    """One line for a round that is not finished: running (its process is alive) or
    stopped (resume it with the same command). In a training step, what its trainer
    reported: step i of n, its loss and the time it has left at its own pace."""
    from datetime import datetime

    from pipeline.progress import alive, duration, round_progress

    plan = json.loads(r["plan_json"] or "{}")
    name = f"{r['run_id']} round {r['round']}"
    if not alive(plan.get("pid")):
        return f"stopped  {name}: not running (run the same command to resume)"
    p = round_progress(plan, r["done"], r["pairs"], r["started_at"], datetime.now())
    where = p["stage"] + (f" batch {p['batch']} of {p['batches']}" if p["batch"] else "")
    trainer = _trainer_progress(r.get("snapshot_dir"), p["stage"])
    pairs = ", ".join(f"{m} {n}" for m, n in p["pairs"].items()) or "none yet"
    speed = f"{p['tokens_per_s']:.0f} tok/s" if p["tokens_per_s"] else "- tok/s"
    return (
        f"running  {name}: {trainer or where} | pairs {pairs} | {speed} | elapsed "
        f"{duration(p['elapsed_s'])} | about {duration(p['left_s'])} left"
    )


def _trainer_progress(folder: str | None, stage: str) -> str | None:
    """`train_dpo: step 12 of 40, loss 0.61, about 1m20s left` from the file the training
    child writes in the round's folder; None outside a training step or before it wrote."""
    from pipeline.progress import training_progress
    from pipeline.training.kinds import TRAINING_KINDS, train_stage
    from pipeline.training.launch import progress_file, read_progress

    kind = next((k for k in TRAINING_KINDS if train_stage(k) == stage), None)
    if folder is None or kind is None:
        return None
    record = read_progress(progress_file(Path(folder), kind))
    return f"{stage}: {training_progress(record, time.time())}" if record else None


@app.command("prompts")
def prompts_cmd(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    round_: Annotated[int, typer.Option("--round", help="The round whose draw to list.")] = 1,
    limit: Annotated[int, typer.Option("--limit", help="List at most this many.")] = 20,
):
    """The prompts a round would draw (`prompts.per_round` of them, by seed and round), each
    with its source (a file, or a dataset and split), after the counts per source."""
    from collections import Counter

    from pipeline.rounds import load_inputs, round_prompts

    cfg = load_config(config, overrides)
    inputs = load_inputs(cfg)
    sources = Counter(p.source for p in inputs.train_prompts)
    typer.echo(
        f"prompts  {len(inputs.train_prompts)} for generation "
        f"({', '.join(f'{n} from {s}' for s, n in sources.items())}), "
        f"{len(inputs.heldout_prompts)} held out, {inputs.duplicate_prompts} duplicates ignored"
    )
    drawn = round_prompts(inputs, cfg, round_)
    typer.echo(
        f"round {round_} draws {len(drawn)}"
        + (f", the first {limit}:" if len(drawn) > limit else ":")
    )
    width = max((len(p.source) for p in drawn[:limit]), default=0)
    for p in drawn[:limit]:
        task = f" [{p.task}]" if p.task else ""
        typer.echo(f"{p.source:<{width}}  {p.prompt_id[:8]}{task}  {_cell(p.text, 90)}")


@app.command("pairs")
def pairs(
    run: RunOpt = None,
    round_: Annotated[int | None, typer.Option("--round")] = None,
    method: Annotated[str | None, typer.Option("--method")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 5,
    db: DbOpt = None,
    config: ConfigOpt = None,
    judge: JudgeIdOpt = None,
):
    """Read pairs: prompt, chosen, rejected, scores and labels. With --judge (and
    --round), the Self-Rewarding pairs that judge's scores make, as a variant: the pairs
    the round trained on are not changed."""
    from pipeline.store import Store

    run_id = run or load_config(config).name
    with Store(_db_path(db, config), read_only=True) as store:
        if judge is not None:
            from pipeline.rejudge import judge_pair_texts

            if round_ is None:
                raise PrefloopError("--judge needs --round: a judge's pairs are per round")
            judge_id = _judge_id(store, run_id, round_, judge)
            found = judge_pair_texts(store, run_id, round_, judge_id)
            rows = [{**r, "flagged": False, "flag_reason": None} for r in found][:limit]
        else:
            rows = store.pair_texts(run_id, round_, method, limit)
    if not rows:
        typer.echo("no pairs match")
    for r in rows:
        label = f"margin {r['margin']:.2f}" if r["margin"] is not None else ""
        if r["soft_label"] is not None:
            label += f" soft label {r['soft_label']:.2f}"
        flag = f"  FLAGGED ({r['flag_reason']})" if r["flagged"] else ""
        typer.echo(
            f"== round {r['round']} {r['method']}/{r['variant']} {r['pair_id'][:8]} {label}{flag}"
        )
        typer.echo(f"prompt:   {_cell(r['prompt'], 300)}")
        typer.echo(f"chosen:   {_cell(r['chosen'], 300)}")
        typer.echo(f"rejected: {_cell(r['rejected'], 300)}")


@app.command("docs")
def docs_cmd(
    check: bool = typer.Option(False, "--check", help="Only say whether a page is stale."),
):
    """Regenerate the pages made from the code and the kept results: docs/configuration.md
    (every config key) and the tables of docs/experiments.md (bench/results/*.jsonl)."""
    from pipeline import reference

    if check:
        stale = [str(p) for p in reference.stale_pages()]
        if stale:
            raise PrefloopError(f"{', '.join(stale)}: stale; run `prefloop docs`")
        typer.echo("docs up to date")
        return
    changed = reference.write_pages()
    typer.echo("\n".join(f"wrote {p}" for p in changed) or "docs up to date")


_RUN_LOG: Path | None = None  # the running `prefloop run`'s log file


def main() -> None:
    # Library progress bars would interleave with the flow's own progress lines.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow it
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network
    # A run without PREFECT_API_URL starts a temporary server; Prefect gives it 20 s,
    # which a machine busy loading a model (or compiling vLLM's graphs) can overrun.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows.supervise import is_worker, supervise

    if len(sys.argv) > 1 and sys.argv[1] == "run" and not is_worker():
        raise SystemExit(supervise(sys.argv[1:]))
    try:
        app()
    except PrefloopError as e:
        _fail(e, f"error: {e}" if _RUN_LOG is None else f"error: {one_line(str(e))}")
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # the supervisor says so, last
    except Exception as e:
        if _RUN_LOG is None:
            raise
        _fail(e, f"error: {type(e).__name__}: {one_line(str(e))}")


def _fail(exc: BaseException, line: str) -> None:
    """One line, last: printed here, or handed to the supervisor to print after every
    process of the run has ended (so nothing can print after it)."""
    target = os.environ.get(ERROR_FILE)

    def say(text: str) -> None:
        if target:
            Path(target).write_text(text + "\n")
        else:
            typer.echo(text, file=console(err=True))

    if _RUN_LOG is None:  # before the run started: nothing else to end
        say(line)
        if not target:
            raise SystemExit(2)
    else:
        record_failure(_RUN_LOG, exc)
        typer.echo(f"log      {_RUN_LOG.resolve()} (the full traceback)", file=console(err=True))
        say(line)
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: Prefect's exit hooks and DuckDB's leak report would print
    # after the error line, and tearing down with Prefect's temporary server still being
    # started in its thread (flows/supervise.py) aborted the process; the supervisor ends
    # what this process started.
    os._exit(2)


if __name__ == "__main__":
    main()
