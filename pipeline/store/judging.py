"""What re-judging a stored round asks: its candidates, which a judge has already scored,
each judge's scores, and the judges a round has."""

from collections.abc import Sequence
from typing import Any

from pipeline.store.connection import Connection


class JudgingQueries(Connection):
    def round_candidates(self, run_id: str, round_: int, method: str) -> list[dict[str, Any]]:
        """A method's candidate answers of a round, in prompt and sample order."""
        return self.query(
            "SELECT generation_id, prompt_id, text, n_tokens, finish_reason FROM generations "
            "WHERE run_id = ? AND round = ? AND method = ? AND role = 'candidate' "
            "ORDER BY prompt_id, sample_idx",
            [run_id, round_, method],
        )

    def prompts_by_id(self, run_id: str, prompt_ids: Sequence[str]) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM prompts WHERE run_id = ? AND list_contains(?, prompt_id) "
            "ORDER BY prompt_id",
            [run_id, list(prompt_ids)],
        )

    def judged_generations(self, run_id: str, round_: int, method: str, judge_id: str) -> set[str]:
        """Generations this judge has already scored (the resume key of re-judging)."""
        rows = self._run(
            "SELECT DISTINCT generation_id FROM judgments WHERE run_id = ? AND round = ? "
            "AND method = ? AND judge_id = ?",
            [run_id, round_, method, judge_id],
        )
        return {g for (g,) in rows}

    def judge_judgments(
        self, run_id: str, round_: int, method: str, judge_id: str
    ) -> list[dict[str, Any]]:
        return self.query(
            "SELECT generation_id, sample_idx, score, parse_status FROM judgments "
            "WHERE run_id = ? AND round = ? AND method = ? AND judge_id = ? "
            "ORDER BY generation_id, sample_idx",
            [run_id, round_, method, judge_id],
        )

    def round_judges(self, run_id: str, round_: int, method: str) -> list[str]:
        """The judges that scored a round's answers, the round's own first."""
        rows = self._run(
            "SELECT judge_id FROM judgments WHERE run_id = ? AND round = ? AND method = ? "
            "GROUP BY judge_id ORDER BY min(created_at), judge_id",
            [run_id, round_, method],
        )
        return [j for (j,) in rows]
