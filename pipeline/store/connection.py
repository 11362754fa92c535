"""The DuckDB connection: opening (with one-line errors for a locked or newer file),
forward migrations, and atomic batch writes that skip ids already stored."""

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.errors import StoreError
from pipeline.store.schema import MIGRATIONS

# A pair with its prompt (pr) and both generations (c: chosen, r: rejected).
PAIRS_WITH_TEXTS = (
    "FROM pairs p "
    "JOIN prompts pr ON pr.run_id = p.run_id AND pr.prompt_id = p.prompt_id "
    "JOIN generations c ON c.generation_id = p.chosen_generation_id "
    "JOIN generations r ON r.generation_id = p.rejected_generation_id"
)
IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_LOCK_PID = re.compile(r"\(PID (\d+)\)")


def _open_error(path: Path, err: duckdb.Error) -> StoreError:
    text = str(err)
    if "Could not set lock" in text or "Conflicting lock" in text:
        pid = _LOCK_PID.search(text)
        holder = f" (PID {pid.group(1)})" if pid else ""
        return StoreError(
            f"{path}: database is in use by another process{holder}; DuckDB allows one "
            "writer: wait for it to finish or point db_path at another file"
        )
    return StoreError(f"{path}: cannot open database: {text.splitlines()[0]}")


class Connection:
    """One DuckDB file. Use as a context manager; `read_only=True` for inspection."""

    def __init__(
        self,
        path: Path | str,
        read_only: bool = False,
        migrations: Sequence[Sequence[str]] = MIGRATIONS,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._migrations = migrations
        self._keys: dict[str, tuple[str, ...]] = {}
        if read_only and not self.path.exists():
            raise StoreError(f"{self.path}: no database here yet; run `prefloop run` first")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        config = {"autoinstall_known_extensions": "false", "autoload_known_extensions": "true"}
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only, config=config)
        except duckdb.Error as e:
            raise _open_error(self.path, e) from None
        try:
            self._check_and_migrate()
        except BaseException:
            self.con.close()
            raise

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    # -- schema ---------------------------------------------------------------------------

    def _run(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        # DuckDB 2 refuses new work while a result is unfinished; always drain it.
        return self.con.execute(sql, params or []).fetchall()

    def schema_version(self) -> int:
        [(exists,)] = self._run(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        )
        if not exists:
            return 0
        [(version,)] = self._run("SELECT max(version) FROM schema_version")
        return int(version or 0)

    def _check_and_migrate(self) -> None:
        current, target = self.schema_version(), len(self._migrations)
        if current > target:
            raise StoreError(
                f"{self.path}: database schema v{current} is newer than this prefloop "
                f"(knows up to v{target}); upgrade prefloop to read it"
            )
        if current == target:
            return
        if self.read_only:
            raise StoreError(
                f"{self.path}: database schema v{current} needs migrating to v{target}; "
                "open it once for writing (any `prefloop run`) to migrate"
            )
        with self.transaction():
            self._run(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, applied_at TIMESTAMP DEFAULT current_timestamp)"
            )
            for version in range(current, target):
                for statement in self._migrations[version]:
                    self._run(statement)
                self._run("INSERT INTO schema_version (version) VALUES (?)", [version + 1])

    # -- writes ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All inserts inside land together or not at all (a batch is atomic). A failed
        write (disk full, file too large) is rolled back and raised as one StoreError;
        what earlier transactions stored is untouched."""
        self._run("BEGIN TRANSACTION")
        try:
            yield
            self._run("COMMIT")
        except duckdb.Error as e:
            self._rollback()
            raise StoreError(
                f"{self.path}: writing failed, the batch was rolled back and earlier batches "
                f"are intact: {str(e).splitlines()[0]}"
            ) from None
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        with suppress(duckdb.TransactionException):  # a failed COMMIT already ended it
            self._run("ROLLBACK")

    def insert(self, table: str, rows: Sequence[dict[str, Any]] | pa.Table) -> int:
        """Insert rows by column name, skipping ids that exist; returns rows inserted.

        Existing ids are skipped by an anti-join on the primary key (1.4x the rows/s of
        `ON CONFLICT DO NOTHING` at 1M rows, bench/store.py). Rows given as dicts are made
        unique by key first; an Arrow table is the bulk path and must hold each id once."""
        if not IDENT.match(table):
            raise ValueError(f"not a table name: {table!r}")
        key = self._primary_key(table)
        if not isinstance(rows, pa.Table):
            if key:  # the first row of each id, in order
                first: dict[tuple, dict[str, Any]] = {}
                for r in rows:
                    first.setdefault(tuple(r.get(k) for k in key), r)
                rows = list(first.values())
            rows = pa.Table.from_pylist(list(rows))
        if rows.num_rows == 0:
            return 0
        new = " AND ".join(f"e.{k} = b.{k}" for k in key)
        where = f" WHERE NOT EXISTS (SELECT 1 FROM {table} e WHERE {new})" if key else ""
        self.con.register("__batch", rows)
        result = self._run(f"INSERT INTO {table} BY NAME SELECT * FROM __batch b{where}")
        self.con.unregister("__batch")  # on failure, the rollback drops it
        return int(result[0][0]) if result else 0

    def _primary_key(self, table: str) -> tuple[str, ...]:
        if table not in self._keys:
            found = self._run(
                "SELECT constraint_column_names FROM duckdb_constraints() "
                "WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'",
                [table],
            )
            self._keys[table] = tuple(found[0][0]) if found else ()
        return self._keys[table]

    def write(self, tables: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, int]:
        """Insert a method's output (table -> rows) in one transaction; rows inserted per
        table. A batch lands whole or not at all, so a crash never leaves half a batch."""
        with self.transaction():
            return {name: self.insert(name, rows) for name, rows in tables.items() if rows}

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        cur = self.con.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
