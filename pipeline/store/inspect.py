"""The user's questions: `prefloop sql`, `db info`, `status`, `pairs` and the report."""

from typing import Any

import duckdb

from pipeline.errors import StoreError
from pipeline.store.connection import PAIRS_WITH_TEXTS, Connection


class InspectQueries(Connection):
    def sql(self, statement: str) -> tuple[list[str], list[tuple]]:
        """A user's query (`prefloop sql`): returns column names and rows."""
        with self.session() as con:
            return self._sql(con, statement)

    def _sql(self, con, statement: str) -> tuple[list[str], list[tuple]]:
        try:
            cur = con.execute(statement)
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

    def run_status(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Per run and round: status, model, stages done (batches), pairs per method, the
        models its training steps made (in step order)."""
        return self.query(
            "SELECT r.run_id, r.round, r.status, r.model_id, "
            "(SELECT string_agg(stage || ':' || n, ' ' ORDER BY stage) FROM (SELECT stage, "
            " count(*) AS n FROM stage_metrics s WHERE s.run_id = r.run_id AND s.round = r.round "
            " GROUP BY stage)) AS stages, "
            "(SELECT string_agg(method || ':' || n, ' ' ORDER BY method) FROM (SELECT method, "
            " count(*) AS n FROM pairs p WHERE p.run_id = r.run_id AND p.round = r.round "
            " GROUP BY method)) AS pairs, "
            "(SELECT string_agg(output_model_id, ' ' ORDER BY step, finished_at) "
            " FROM training_runs t WHERE t.run_id = r.run_id AND t.round = r.round "
            " AND t.status = 'finished') AS trained "
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

    def report_data(self, run_id: str) -> dict[str, list[dict[str, Any]]]:
        """Everything the HTML report plots, per round."""
        return {
            "rounds": self.query(
                "SELECT round, model_id, status, started_at, finished_at, plan_json, "
                "epoch(finished_at - started_at) AS wall_s FROM rounds WHERE run_id = ? "
                "ORDER BY round",
                [run_id],
            ),
            "evaluations": self.evaluations(run_id),
            # The round's own judge only: a re-judge's scores may be on another scale.
            "scores": self.query(
                "WITH own AS (SELECT round, arg_min(judge_id, created_at) AS judge_id "
                " FROM judgments WHERE run_id = ? AND method = 'self_reward' GROUP BY round) "
                "SELECT c.round, c.mean_score FROM candidate_scores c JOIN own "
                "ON own.round = c.round AND own.judge_id IS NOT DISTINCT FROM c.judge_id "
                "WHERE c.run_id = ? "
                "AND c.method = 'self_reward' AND c.mean_score IS NOT NULL ORDER BY c.round",
                [run_id, run_id],
            ),
            "pairs": self.query(
                "SELECT round, method, count(*) AS n, avg(margin) AS margin, "
                "avg(soft_label) AS soft_label, count(*) FILTER (WHERE flagged) AS flagged "
                "FROM pairs WHERE run_id = ? GROUP BY ALL ORDER BY round, method",
                [run_id],
            ),
            "training": self.query(
                "SELECT round, step, kind, base_model_id, reference_model_id, "
                "output_model_id, metrics_json FROM training_runs "
                "WHERE run_id = ? AND status = 'finished' ORDER BY round, step, finished_at",
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

    def explorer_rows(self, run_id: str) -> dict[str, list[dict[str, Any]]]:
        """What the report's pairs explorer shows: every pair with its prompt, both
        generations (text, tokens, finish, template, meta), the judgments of those
        generations, the run's critiques and A/B questions, and its discards."""
        key = [run_id]
        return {
            "pairs": self.query(
                "SELECT p.pair_id, p.round, p.method, p.variant, p.prompt_id, p.model_id, "
                "p.margin, p.soft_label, p.flagged, p.flag_reason, pr.text AS prompt, "
                "pr.messages_json, p.chosen_generation_id, c.text AS chosen, "
                "c.n_tokens AS chosen_tokens, c.finish_reason AS chosen_finish, "
                "c.template_id AS chosen_template, c.meta_json AS chosen_meta, "
                "p.rejected_generation_id, r.text AS rejected, r.n_tokens AS rejected_tokens, "
                "r.finish_reason AS rejected_finish, r.template_id AS rejected_template, "
                f"r.meta_json AS rejected_meta {PAIRS_WITH_TEXTS} WHERE p.run_id = ? "
                "ORDER BY p.round, p.method, p.pair_id",
                key,
            ),
            "judgments": self.query(
                "SELECT j.generation_id, j.judge_id, j.score, j.parse_status, j.raw_output "
                "FROM judgments j WHERE j.run_id = ? AND j.generation_id IN (SELECT "
                "unnest([chosen_generation_id, rejected_generation_id]) FROM pairs "
                "WHERE run_id = j.run_id) ORDER BY j.generation_id, j.judge_id, j.sample_idx",
                key,
            ),
            "critiques": self.query(
                "SELECT round, prompt_id, step, principle_id, critique, revision_generation_id "
                "FROM critiques WHERE run_id = ? ORDER BY round, prompt_id, step",
                key,
            ),
            "comparisons": self.query(
                "SELECT generation_a_id, generation_b_id, prob_a, template_id, principle_id, "
                "raw_output, meta_json FROM comparisons WHERE run_id = ? "
                "AND method <> 'evaluation' ORDER BY comparison_id",
                key,
            ),
            "discards": self.query(
                "SELECT round, method, stage, reason, item_id, detail FROM discards "
                "WHERE run_id = ? ORDER BY round, method, stage, reason, item_id",
                key,
            ),
        }

    def running_rounds(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Rounds not finished yet, with their plan, what each stage stored so far, and
        their pairs per method."""
        rounds = self.query(
            "SELECT run_id, round, model_id, started_at, plan_json, snapshot_dir FROM rounds "
            "WHERE status <> 'finished' AND (? IS NULL OR run_id = ?) ORDER BY run_id, round",
            [run_id, run_id],
        )
        for r in rounds:
            key = [r["run_id"], r["round"]]
            r["done"] = {
                s["stage"]: s
                for s in self.query(
                    "SELECT stage, count(*) AS batches, sum(wall_s) AS wall_s, "
                    "sum(completion_tokens) AS completion_tokens FROM stage_metrics "
                    "WHERE run_id = ? AND round = ? GROUP BY stage",
                    key,
                )
            }
            r["pairs"] = dict(
                self._run(
                    "SELECT method, count(*) FROM pairs WHERE run_id = ? AND round = ? "
                    "GROUP BY method",
                    key,
                )
            )
        return rounds
