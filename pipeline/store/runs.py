"""Runs, rounds and models: what the loop registers, and the questions it asks to resume
(what is done, what the round generated, which model a step trained)."""

import json
from collections.abc import Callable
from typing import Any

from pipeline.errors import StoreError
from pipeline.store.connection import IDENT, Connection


class RunQueries(Connection):
    def upsert_round(self, run_id: str, round_: int, model_id: str, **fields: Any) -> None:
        self.insert("rounds", [{"run_id": run_id, "round": round_, "model_id": model_id}])
        if fields:
            names = sorted(fields)
            for name in names:
                if not IDENT.match(name):
                    raise ValueError(f"not a column name: {name!r}")
            assignments = ", ".join(f"{n} = ?" for n in names)
            self._run(
                f"UPDATE rounds SET {assignments} WHERE run_id = ? AND round = ?",
                [fields[n] for n in names] + [run_id, round_],
            )

    def register_run(
        self,
        run_id: str,
        config: dict[str, Any],
        config_sha256: str,
        seed: int,
        same: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Record a run; a different config under an existing run name is refused. `same`
        says whether a stored config (a mapping) is this run's (default: equal mappings,
        so key order never matters)."""
        config_json = json.dumps(config, sort_keys=True, default=str)
        rows = self._run("SELECT config_json FROM runs WHERE run_id = ?", [run_id])
        if rows:
            stored = json.loads(rows[0][0])
            if not (same(stored) if same else stored == json.loads(config_json)):
                raise StoreError(
                    f"{self.path}: run {run_id!r} exists with a different config; resume it "
                    "with the same config or choose a new name (--set name=...)"
                )
            return
        self.insert(
            "runs",
            [
                {
                    "run_id": run_id,
                    "config_json": config_json,
                    "config_sha256": config_sha256,
                    "seed": seed,
                }
            ],
        )

    def model(self, model_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM models WHERE model_id = ?", [model_id])
        return rows[0] if rows else None

    def latest_scorer(self, run_id: str, before_round: int) -> dict[str, Any] | None:
        """The reward model the run trained most recently before `before_round`."""
        rows = self.query(
            "SELECT * FROM models WHERE run_id = ? AND round < ? AND kind = 'reward' "
            "ORDER BY round DESC, created_at DESC LIMIT 1",
            [run_id, before_round],
        )
        return rows[0] if rows else None

    def round_info(self, run_id: str, round_: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM rounds WHERE run_id = ? AND round = ?", [run_id, round_])
        return rows[0] if rows else None

    def first_round_model(self, run_id: str) -> str | None:
        rows = self.query(
            "SELECT model_id FROM rounds WHERE run_id = ? ORDER BY round LIMIT 1", [run_id]
        )
        return rows[0]["model_id"] if rows else None

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

    def last_finished_round(self, run_id: str) -> int:
        [(last,)] = self._run(
            "SELECT coalesce(max(round), 0) FROM rounds WHERE run_id = ? AND status = 'finished'",
            [run_id],
        )
        return int(last)
