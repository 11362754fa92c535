"""The `prefloop` command. Errors the user can fix print as one line and exit with 2."""

import csv
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import load_config
from pipeline.errors import PrefloopError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(no_args_is_help=True, help="Pull and list models.")
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


@app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    round_: RoundOpt,
    run: RunOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl | parquet | hf")] = "parquet",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
):
    """Write a round's pairs in TRL's conversational format (train/test splits), filtered
    by the config's training.methods / min_margin / exclude_flagged."""
    from pipeline.store import Store
    from pipeline.training.step import export_round

    if fmt not in ("jsonl", "parquet", "hf"):
        raise PrefloopError(f"--format {fmt!r}: expected jsonl, parquet or hf")
    cfg = load_config(config, overrides)
    with Store(cfg.db_path, read_only=True) as store:
        counts = export_round(store, cfg, run or cfg.name, round_, out, fmt)
    typer.echo(f"{out}: {counts['train']} train, {counts['test']} test pairs ({fmt})")


@app.command("train")
def train(
    round_: RoundOpt,
    run: RunOpt = None,
    kind: Annotated[str | None, typer.Option("--kind", help="dpo | rm")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
):
    """Train on a round's pairs (DPO or reward model) and register the checkpoint."""
    from pipeline.store import Store
    from pipeline.training.step import train_round

    if kind not in (None, "dpo", "rm"):
        raise PrefloopError(f"--kind {kind!r}: expected dpo or rm")
    cfg = load_config(config, overrides)
    with Store(cfg.db_path) as store:
        result = train_round(store, cfg, run or cfg.name, round_, kind)
    typer.echo(f"model {result['model_id']} at {result['path']}")
    typer.echo(json.dumps(result["metrics"], indent=2, sort_keys=True))


# -- smoke job ----------------------------------------------------------------------------


@app.command("smoke")
def smoke(config: ConfigOpt = Path("data/configs/demo.yaml"), overrides: SetOpt = None):
    """Load the config, open the store, render the judge template and answer one prompt."""
    from flows.smoke import run_smoke

    cfg = load_config(config, overrides)
    run_smoke(cfg, echo=typer.echo)


def main() -> None:
    try:
        app()
    except PrefloopError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
