"""The DuckDB connection: opened per use so readers are never locked out for long (with
bounded waits and one-line errors for a locked or newer file), forward migrations, and
atomic batch writes that skip ids already stored."""

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
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


def _open_error(path: Path, err: duckdb.Error, waited: float = 0.0) -> StoreError:
    text = str(err)
    if _locked(err):
        pid = _LOCK_PID.search(text)
        holder = f" (PID {pid.group(1)})" if pid else ""
        after = f" for {waited:.0f} s" if waited else ""
        return StoreError(
            f"{path}: database is in use by another process{holder}{after}; DuckDB lets one "
            "writer or several readers open it at a time: wait for it to finish (or raise "
            "db_lock_timeout_s), or point db_path at another file"
        )
    return StoreError(f"{path}: cannot open database: {text.splitlines()[0]}")


def _locked(err: duckdb.Error) -> bool:
    text = str(err)
    return "Could not set lock" in text or "Conflicting lock" in text


# A reader (`prefloop sql`, status, report, export) that arrives during a write waits up
# to this long for the writer to let go; writes take milliseconds to seconds.
READER_WAIT_S = 30.0


class Connection:
    """One DuckDB file, opened only while it is used.

    DuckDB lets one process open a file read-write, or several read-only, never both at
    once. So a store holds no connection between uses: each query and each write (a
    batch's transaction) opens the file, does its work and closes it, and readers can
    open it in between. Inside `with store:` (or `store.session()`) one connection serves
    the whole block: for a command that reads a few things, or a sequence of writes.

    Opening retries while another process holds the file, up to `lock_timeout_s` (logging
    once, through `on_wait`, which process holds it), then fails with one clear error.
    """

    def __init__(
        self,
        path: Path | str,
        read_only: bool = False,
        migrations: Sequence[Sequence[str]] = MIGRATIONS,
        lock_timeout_s: float | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._migrations = migrations
        self._keys: dict[str, tuple[str, ...]] = {}
        self._con: duckdb.DuckDBPyConnection | None = None
        self._held: list[AbstractContextManager] = []
        self.lock_timeout_s = READER_WAIT_S if lock_timeout_s is None else lock_timeout_s
        self.on_wait = on_wait or logging.getLogger("prefloop.store").warning
        if read_only and not self.path.exists():
            raise StoreError(f"{self.path}: no database here yet; run `prefloop run` first")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.session():
            self._check_and_migrate()

    def __enter__(self) -> "Connection":
        held = self.session()
        held.__enter__()
        self._held.append(held)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._held.pop().__exit__(None, None, None)

    def close(self) -> None:
        while self._held:
            self._held.pop().__exit__(None, None, None)

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The open connection (inside `with store:` or `store.session()`)."""
        if self._con is None:
            raise StoreError(f"{self.path}: no open connection; use `with store:` for raw SQL")
        return self._con

    @contextmanager
    def session(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One connection for the block (the open one, if a session is already open)."""
        if self._con is not None:
            yield self._con
            return
        self._con = self._connect()
        try:
            yield self._con
        finally:
            con, self._con = self._con, None
            con.close()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        config = {"autoinstall_known_extensions": "false", "autoload_known_extensions": "true"}
        start = time.monotonic()
        delay, told = 0.02, False
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=self.read_only, config=config)
            except duckdb.Error as e:
                waited = time.monotonic() - start
                if not _locked(e):
                    raise _open_error(self.path, e) from None
                if not told and waited + delay > 1.0:  # a write's milliseconds need no line
                    pid = _LOCK_PID.search(str(e))
                    holder = f"PID {pid.group(1)}" if pid else "another process"
                    self.on_wait(
                        f"{self.path}: {holder} holds the database; waiting up to "
                        f"{self.lock_timeout_s:.0f} s for it to close"
                    )
                    told = True
                if waited + delay > self.lock_timeout_s:
                    raise _open_error(self.path, e, waited) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- schema ---------------------------------------------------------------------------

    def _run(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        # DuckDB 2 refuses new work while a result is unfinished; always drain it.
        with self.session() as con:
            return con.execute(sql, params or []).fetchall()

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
        with self.session():
            self._run("BEGIN TRANSACTION")
            try:
                yield
                self._run("COMMIT")
            except duckdb.Error as e:
                self._rollback()
                raise StoreError(
                    f"{self.path}: writing failed, the batch was rolled back and earlier "
                    f"batches are intact: {str(e).splitlines()[0]}"
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
        with self.session() as con:
            con.register("__batch", rows)
            result = self._run(f"INSERT INTO {table} BY NAME SELECT * FROM __batch b{where}")
            con.unregister("__batch")  # on failure, the rollback drops it
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
        with self.session() as con:
            cur = con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
