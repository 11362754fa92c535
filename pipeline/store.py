"""DuckDB store: schema, forward migrations, idempotent batch writes, read-only queries.

All SQL of the library lives here. Table and column names are the public SQL interface
(users and the README's recipes query them): extend them, do not rename them.

Writes go through Arrow batches with `ON CONFLICT DO NOTHING` on deterministic ids, so a
re-run of finished work inserts nothing. DuckDB admits one writer process; only the flow
process opens the store for writing.
"""

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.errors import StoreError

# Each migration moves the schema from version i to i + 1. Append, never edit: a database
# in the field at version i runs every statement after it, in one transaction.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY,
            config_json VARCHAR NOT NULL,
            config_sha256 VARCHAR NOT NULL,
            seed BIGINT NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE rounds (
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            model_id VARCHAR NOT NULL,
            status VARCHAR NOT NULL DEFAULT 'started',
            pair_policy_json VARCHAR,
            snapshot_dir VARCHAR,
            started_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            finished_at TIMESTAMP,
            PRIMARY KEY (run_id, round)
        )""",
        """CREATE TABLE models (
            model_id VARCHAR PRIMARY KEY,
            parent_model_id VARCHAR,
            path VARCHAR NOT NULL,
            sha256 VARCHAR NOT NULL,
            kind VARCHAR NOT NULL DEFAULT 'policy',
            run_id VARCHAR,
            round INTEGER,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE templates (
            template_id VARCHAR PRIMARY KEY,
            name VARCHAR NOT NULL,
            sha256 VARCHAR NOT NULL,
            path VARCHAR NOT NULL,
            text VARCHAR NOT NULL,
            metadata_json VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE prompts (
            run_id VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            source VARCHAR NOT NULL,
            split VARCHAR NOT NULL DEFAULT 'train',
            text VARCHAR NOT NULL,
            messages_json VARCHAR NOT NULL,
            generation_id VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (run_id, prompt_id)
        )""",
        """CREATE TABLE generations (
            generation_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            model_id VARCHAR NOT NULL,
            template_id VARCHAR,
            role VARCHAR NOT NULL,
            sample_idx INTEGER NOT NULL,
            parent_generation_id VARCHAR,
            text VARCHAR NOT NULL,
            n_tokens INTEGER,
            finish_reason VARCHAR,
            sampling_json VARCHAR NOT NULL,
            seed BIGINT NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        # score is NULL when the judge output did not parse: never a sentinel value.
        """CREATE TABLE judgments (
            judgment_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            generation_id VARCHAR NOT NULL,
            sample_idx INTEGER NOT NULL,
            model_id VARCHAR NOT NULL,
            template_id VARCHAR NOT NULL,
            raw_output VARCHAR NOT NULL,
            score DOUBLE,
            parse_status VARCHAR NOT NULL,
            sampling_json VARCHAR NOT NULL,
            seed BIGINT NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        # Pairwise AI labels (RLCD-Rescore, RL-CAI feedback, evaluation): prob_a is the
        # normalised probability that answer A is better, in the order asked.
        """CREATE TABLE comparisons (
            comparison_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            generation_a_id VARCHAR NOT NULL,
            generation_b_id VARCHAR NOT NULL,
            model_id VARCHAR NOT NULL,
            template_id VARCHAR NOT NULL,
            principle_id VARCHAR,
            prob_a DOUBLE,
            raw_output VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE critiques (
            critique_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            prompt_id VARCHAR NOT NULL,
            step INTEGER NOT NULL,
            principle_id VARCHAR NOT NULL,
            input_generation_id VARCHAR NOT NULL,
            critique VARCHAR NOT NULL,
            revision_generation_id VARCHAR,
            model_id VARCHAR NOT NULL,
            template_id VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE pairs (
            pair_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            chosen_generation_id VARCHAR NOT NULL,
            rejected_generation_id VARCHAR NOT NULL,
            chosen_score DOUBLE,
            rejected_score DOUBLE,
            margin DOUBLE,
            soft_label DOUBLE,
            flagged BOOLEAN NOT NULL DEFAULT false,
            flag_reason VARCHAR,
            model_id VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        # Rejections are data: every dropped candidate, tie or failed parse, with its reason.
        """CREATE TABLE discards (
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            stage VARCHAR NOT NULL,
            item_id VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            detail VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (run_id, round, method, stage, item_id, reason)
        )""",
        """CREATE TABLE training_runs (
            training_run_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            kind VARCHAR NOT NULL,
            base_model_id VARCHAR NOT NULL,
            reference_model_id VARCHAR,
            output_model_id VARCHAR,
            config_json VARCHAR NOT NULL,
            metrics_json VARCHAR,
            status VARCHAR NOT NULL,
            started_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            finished_at TIMESTAMP
        )""",
        """CREATE TABLE evaluations (
            evaluation_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            metric VARCHAR NOT NULL,
            method VARCHAR,
            value DOUBLE,
            details_json VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE stage_metrics (
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            stage VARCHAR NOT NULL,
            batch INTEGER NOT NULL,
            n_items INTEGER NOT NULL,
            wall_s DOUBLE NOT NULL,
            prompt_tokens BIGINT,
            completion_tokens BIGINT,
            tokens_per_s DOUBLE,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (run_id, round, stage, batch)
        )""",
        """CREATE VIEW pair_texts AS
        SELECT p.pair_id, p.run_id, p.round, p.method, p.prompt_id,
               pr.text AS prompt, c.text AS chosen, r.text AS rejected,
               p.chosen_score, p.rejected_score, p.margin, p.soft_label,
               p.flagged, p.flag_reason
        FROM pairs p
        JOIN prompts pr ON pr.run_id = p.run_id AND pr.prompt_id = p.prompt_id
        JOIN generations c ON c.generation_id = p.chosen_generation_id
        JOIN generations r ON r.generation_id = p.rejected_generation_id""",
    ],
    # v2: method provenance (RLCD descriptors, CAI principles) on generations, the pair's
    # variant within its method, prompt tasks, and CAI's SFT rows.
    [
        "DROP VIEW pair_texts",
        "ALTER TABLE generations ADD COLUMN meta_json VARCHAR",
        "ALTER TABLE pairs ADD COLUMN variant VARCHAR",
        "ALTER TABLE prompts ADD COLUMN task VARCHAR",
        "ALTER TABLE comparisons ADD COLUMN meta_json VARCHAR",
        """CREATE TABLE sft_examples (
            sft_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            generation_id VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE VIEW pair_texts AS
        SELECT p.pair_id, p.run_id, p.round, p.method, p.variant, p.prompt_id,
               pr.text AS prompt, c.text AS chosen, r.text AS rejected,
               p.chosen_score, p.rejected_score, p.margin, p.soft_label,
               p.flagged, p.flag_reason, p.model_id
        FROM pairs p
        JOIN prompts pr ON pr.run_id = p.run_id AND pr.prompt_id = p.prompt_id
        JOIN generations c ON c.generation_id = p.chosen_generation_id
        JOIN generations r ON r.generation_id = p.rejected_generation_id""",
        # Self-Rewarding's per-candidate score: the mean and variance of the valid samples.
        """CREATE VIEW candidate_scores AS
        SELECT generation_id, run_id, round, method, template_id,
               count(*) AS samples, count(score) AS valid,
               avg(score) AS mean_score, var_pop(score) AS score_variance
        FROM judgments
        GROUP BY ALL""",
        """CREATE VIEW sft_texts AS
        SELECT s.sft_id, s.run_id, s.round, s.method, s.prompt_id, pr.messages_json,
               pr.text AS prompt, g.text AS completion
        FROM sft_examples s
        JOIN prompts pr ON pr.run_id = s.run_id AND pr.prompt_id = s.prompt_id
        JOIN generations g ON g.generation_id = s.generation_id""",
    ],
    # v3: time a task spent before its stage's work (engine start), so a round's wall time
    # splits into stages, set-up and orchestration.
    [
        "ALTER TABLE stage_metrics ADD COLUMN setup_s DOUBLE",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)
# A pair with its prompt (pr) and both generations (c: chosen, r: rejected).
_PAIRS_WITH_TEXTS = (
    "FROM pairs p "
    "JOIN prompts pr ON pr.run_id = p.run_id AND pr.prompt_id = p.prompt_id "
    "JOIN generations c ON c.generation_id = p.chosen_generation_id "
    "JOIN generations r ON r.generation_id = p.rejected_generation_id"
)
_LOCK_PID = re.compile(r"\(PID (\d+)\)")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


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


class Store:
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

    def __enter__(self) -> "Store":
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
        if not _IDENT.match(table):
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

    def upsert_round(self, run_id: str, round_: int, model_id: str, **fields: Any) -> None:
        self.insert("rounds", [{"run_id": run_id, "round": round_, "model_id": model_id}])
        if fields:
            names = sorted(fields)
            for name in names:
                if not _IDENT.match(name):
                    raise ValueError(f"not a column name: {name!r}")
            assignments = ", ".join(f"{n} = ?" for n in names)
            self._run(
                f"UPDATE rounds SET {assignments} WHERE run_id = ? AND round = ?",
                [fields[n] for n in names] + [run_id, round_],
            )

    def register_run(self, run_id: str, config: dict[str, Any], config_sha256: str, seed: int):
        """Record a run; a different config under an existing run name is refused."""
        rows = self._run("SELECT config_sha256 FROM runs WHERE run_id = ?", [run_id])
        if rows and rows[0][0] != config_sha256:
            raise StoreError(
                f"{self.path}: run {run_id!r} exists with a different config; resume it "
                "with the same config or choose a new name (--set name=...)"
            )
        self.insert(
            "runs",
            [
                {
                    "run_id": run_id,
                    "config_json": json.dumps(config, sort_keys=True, default=str),
                    "config_sha256": config_sha256,
                    "seed": seed,
                }
            ],
        )

    # -- reads ----------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        cur = self.con.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def sql(self, statement: str) -> tuple[list[str], list[tuple]]:
        """A user's query (`prefloop sql`): returns column names and rows."""
        try:
            cur = self.con.execute(statement)
        except duckdb.InvalidInputException as e:
            if "read-only mode" in str(e):
                raise StoreError(
                    f"{self.path}: prefloop sql is read-only; this statement writes "
                    "(pass --write to allow it)"
                ) from None
            raise StoreError(f"{self.path}: {str(e).splitlines()[0]}") from None
        except duckdb.Error as e:
            raise StoreError(f"{self.path}: {str(e).splitlines()[0]}") from None
        rows = cur.fetchall()
        return [d[0] for d in cur.description or []], rows

    def table_counts(self) -> list[tuple[str, str, int]]:
        """(name, 'table' | 'view', rows) for every table and view in the main schema."""
        objects = self._run(
            "SELECT table_name, table_type FROM information_schema.tables "
            "WHERE table_schema = 'main' ORDER BY table_type, table_name"
        )
        return [
            (
                name,
                "view" if kind == "VIEW" else "table",
                self._run(f'SELECT count(*) FROM "{name}"')[0][0],
            )
            for name, kind in objects
        ]

    def model(self, model_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM models WHERE model_id = ?", [model_id])
        return rows[0] if rows else None

    # -- training hand-off ----------------------------------------------------------------

    def training_pairs(
        self,
        run_id: str,
        round_: int,
        methods: Sequence[str] | None = None,
        min_margin: float | None = None,
        exclude_flagged: bool = True,
    ) -> list[dict[str, Any]]:
        """A round's pairs with the prompt's messages and both texts, in pair_id order.
        `min_margin` keeps pairs whose margin is at least that (pairs without a margin,
        i.e. labelled by construction or by AI feedback, are kept)."""
        where = ["p.run_id = ?", "p.round = ?"]
        params: list[Any] = [run_id, round_]
        if methods is not None:
            where.append("list_contains(?, p.method)")
            params.append(list(methods))
        if min_margin is not None:
            where.append("(p.margin IS NULL OR p.margin >= ?)")
            params.append(min_margin)
        if exclude_flagged:
            where.append("NOT p.flagged")
        return self.query(
            "SELECT p.pair_id, p.method, p.variant, pr.messages_json, c.text AS chosen, "
            "r.text AS rejected, p.margin, p.soft_label "
            f"{_PAIRS_WITH_TEXTS} WHERE {' AND '.join(where)} ORDER BY p.pair_id",
            params,
        )

    def round_info(self, run_id: str, round_: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM rounds WHERE run_id = ? AND round = ?", [run_id, round_])
        return rows[0] if rows else None

    def first_round_model(self, run_id: str) -> str | None:
        rows = self.query(
            "SELECT model_id FROM rounds WHERE run_id = ? ORDER BY round LIMIT 1", [run_id]
        )
        return rows[0]["model_id"] if rows else None

    # -- resume keys and progress (the flows' questions) ------------------------------------

    def done_batches(self, run_id: str, round_: int) -> set[tuple[str, int]]:
        """(stage, batch) already stored: a batch's rows and its metrics land together."""
        rows = self._run(
            "SELECT stage, batch FROM stage_metrics WHERE run_id = ? AND round = ?",
            [run_id, round_],
        )
        return {(stage, batch) for stage, batch in rows}

    def generated_prompts(self, run_id: str, round_: int, earlier: bool = False) -> list[dict]:
        """Self-instructed prompts of a round (or of every earlier round)."""
        op = "<" if earlier else "="
        return self.query(
            "SELECT * FROM prompts WHERE run_id = ? AND source = 'self_instruct' "
            f"AND round {op} ? ORDER BY prompt_id",
            [run_id, round_],
        )

    def pair_counts(self, run_id: str, round_: int) -> dict[str, int]:
        rows = self._run(
            "SELECT method, count(*) FROM pairs WHERE run_id = ? AND round = ? "
            "GROUP BY method ORDER BY method",
            [run_id, round_],
        )
        return dict(rows)

    def finished_training(self, run_id: str, round_: int, kind: str) -> str | None:
        """The model a finished training step of this round produced, if any."""
        rows = self._run(
            "SELECT output_model_id FROM training_runs WHERE run_id = ? AND round = ? "
            "AND kind = ? AND status = 'finished' ORDER BY finished_at DESC LIMIT 1",
            [run_id, round_, kind],
        )
        return rows[0][0] if rows else None

    def run_status(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Per run and round: status, model, stages done (batches), pairs per method."""
        return self.query(
            "SELECT r.run_id, r.round, r.status, r.model_id, "
            "(SELECT string_agg(stage || ':' || n, ' ' ORDER BY stage) FROM (SELECT stage, "
            " count(*) AS n FROM stage_metrics s WHERE s.run_id = r.run_id AND s.round = r.round "
            " GROUP BY stage)) AS stages, "
            "(SELECT string_agg(method || ':' || n, ' ' ORDER BY method) FROM (SELECT method, "
            " count(*) AS n FROM pairs p WHERE p.run_id = r.run_id AND p.round = r.round "
            " GROUP BY method)) AS pairs, "
            "(SELECT output_model_id FROM training_runs t WHERE t.run_id = r.run_id "
            " AND t.round = r.round AND t.status = 'finished' LIMIT 1) AS trained_model "
            "FROM rounds r WHERE ? IS NULL OR r.run_id = ? ORDER BY r.run_id, r.round",
            [run_id, run_id],
        )

    def pair_texts(
        self, run_id: str, round_: int | None, method: str | None, limit: int
    ) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM pair_texts WHERE run_id = ? AND (? IS NULL OR round = ?) "
            "AND (? IS NULL OR method = ?) ORDER BY round, method, pair_id LIMIT ?",
            [run_id, round_, round_, method, method, limit],
        )

    def last_finished_round(self, run_id: str) -> int:
        [(last,)] = self._run(
            "SELECT coalesce(max(round), 0) FROM rounds WHERE run_id = ? AND status = 'finished'",
            [run_id],
        )
        return int(last)

    # -- evaluation and report ------------------------------------------------------------

    def evaluation_pairs(self, run_id: str, round_: int) -> list[dict[str, Any]]:
        """A round's pairs with the prompt, both texts and their finish reasons."""
        return self.query(
            "SELECT p.pair_id, p.method, p.variant, p.prompt_id, pr.text AS prompt, "
            "pr.messages_json, p.chosen_generation_id, p.rejected_generation_id, "
            "c.text AS chosen, r.text AS rejected, c.finish_reason AS chosen_finish_reason, "
            "r.finish_reason AS rejected_finish_reason "
            f"{_PAIRS_WITH_TEXTS} WHERE p.run_id = ? AND p.round = ? ORDER BY p.pair_id",
            [run_id, round_],
        )

    def heldout_answers(self, run_id: str, round_: int, model_id: str) -> dict[str, dict]:
        """The evaluation's held-out answers of one model in one round, by prompt id."""
        rows = self.query(
            "SELECT * FROM generations WHERE run_id = ? AND round = ? AND method = 'evaluation' "
            "AND role = 'heldout' AND model_id = ?",
            [run_id, round_, model_id],
        )
        return {r["prompt_id"]: r for r in rows}

    def pair_statistics_input(
        self, run_id: str, round_: int, tie_reasons: Sequence[str]
    ) -> dict[str, Any]:
        """What `evaluation.pair_statistics` needs about a round, in four queries."""
        pairs = self.query(
            "SELECT p.method, p.margin, length(c.text) AS chosen_chars, "
            "length(r.text) AS rejected_chars, EXISTS (SELECT 1 FROM pairs e "
            " WHERE e.run_id = p.run_id AND e.round < p.round AND e.method = p.method "
            " AND e.variant IS NOT DISTINCT FROM p.variant AND e.prompt_id = p.prompt_id) "
            " AS seen_before "
            "FROM pairs p "
            "JOIN generations c ON c.generation_id = p.chosen_generation_id "
            "JOIN generations r ON r.generation_id = p.rejected_generation_id "
            "WHERE p.run_id = ? AND p.round = ?",
            [run_id, round_],
        )
        ties = self._run(
            "SELECT method, count(*) FROM discards WHERE run_id = ? AND round = ? "
            "AND list_contains(?, reason) GROUP BY method",
            [run_id, round_, list(tie_reasons)],
        )
        # Labels asked per method: judge samples (Self-Rewarding) and A/B questions.
        judged = self._run(
            "SELECT method, count(*), count(*) FILTER (WHERE score IS NULL) FROM judgments "
            "WHERE run_id = ? AND round = ? AND method <> 'evaluation' GROUP BY method "
            "UNION ALL "
            "SELECT method, count(*), count(*) FILTER (WHERE prob_a IS NULL) FROM comparisons "
            "WHERE run_id = ? AND round = ? AND method <> 'evaluation' GROUP BY method",
            [run_id, round_, run_id, round_],
        )
        counts: dict[str, tuple[int, int]] = {}
        for method, asked, failed in judged:
            before = counts.get(method, (0, 0))
            counts[method] = (before[0] + asked, before[1] + failed)
        variance = self._run(
            "SELECT method, avg(score_variance) FROM candidate_scores "
            "WHERE run_id = ? AND round = ? AND method <> 'evaluation' GROUP BY method",
            [run_id, round_],
        )
        return {
            "pairs": pairs,
            "ties": dict(ties),
            "judge_counts": counts,
            "judge_variance": dict(variance),
        }

    def training_results(self, run_id: str, round_: int) -> list[dict[str, Any]]:
        return self.query(
            "SELECT kind, output_model_id, metrics_json FROM training_runs WHERE run_id = ? "
            "AND round = ? AND status = 'finished' ORDER BY kind",
            [run_id, round_],
        )

    def evaluations(self, run_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT round, metric, method, value, details_json FROM evaluations "
            "WHERE run_id = ? ORDER BY round, metric, method",
            [run_id],
        )

    def report_data(self, run_id: str) -> dict[str, list[dict[str, Any]]]:
        """Everything the HTML report plots, per round."""
        return {
            "rounds": self.query(
                "SELECT round, model_id, status, started_at, finished_at, "
                "epoch(finished_at - started_at) AS wall_s FROM rounds WHERE run_id = ? "
                "ORDER BY round",
                [run_id],
            ),
            "evaluations": self.evaluations(run_id),
            "scores": self.query(
                "SELECT round, mean_score FROM candidate_scores WHERE run_id = ? "
                "AND method = 'self_reward' AND mean_score IS NOT NULL ORDER BY round",
                [run_id],
            ),
            "pairs": self.query(
                "SELECT round, method, count(*) AS n, avg(margin) AS margin, "
                "avg(soft_label) AS soft_label, count(*) FILTER (WHERE flagged) AS flagged "
                "FROM pairs WHERE run_id = ? GROUP BY ALL ORDER BY round, method",
                [run_id],
            ),
            "stages": self.query(
                "SELECT round, stage, count(*) AS batches, sum(wall_s) AS wall_s, "
                "coalesce(sum(setup_s), 0) AS setup_s, sum(prompt_tokens) AS prompt_tokens, "
                "sum(completion_tokens) AS completion_tokens FROM stage_metrics "
                "WHERE run_id = ? GROUP BY ALL ORDER BY round, stage",
                [run_id],
            ),
        }
