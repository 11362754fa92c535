"""What the evaluation reads: a round's pairs with texts, held-out answers, the labels
behind the pair statistics (typed: `RoundLabels`), trainer metrics."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.store.connection import PAIRS_WITH_TEXTS, Connection


@dataclass(frozen=True)
class RoundLabels:
    """A round's labels as the pair statistics read them."""

    # One row per pair: method, margin, chosen_chars, rejected_chars, seen_before (the same
    # method and variant had a pair for this prompt in an earlier round).
    pairs: list[dict[str, Any]]
    ties: dict[str, int]  # per method: pairs not formed because the sides were equal
    judge_counts: dict[str, tuple[int, int]]  # per method: (labels asked, did not parse)
    judge_variance: dict[str, float | None]  # per method: mean variance of judge samples


class EvaluationQueries(Connection):
    def evaluation_pairs(self, run_id: str, round_: int) -> list[dict[str, Any]]:
        """A round's pairs with the prompt, both texts and their finish reasons."""
        return self.query(
            "SELECT p.pair_id, p.method, p.variant, p.prompt_id, pr.text AS prompt, "
            "pr.messages_json, p.chosen_generation_id, p.rejected_generation_id, "
            "c.text AS chosen, r.text AS rejected, c.finish_reason AS chosen_finish_reason, "
            "r.finish_reason AS rejected_finish_reason "
            f"{PAIRS_WITH_TEXTS} WHERE p.run_id = ? AND p.round = ? ORDER BY p.pair_id",
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

    def round_labels(
        self, run_id: str, round_: int, tie_reasons: Mapping[str, Sequence[str]]
    ) -> "RoundLabels":
        """What the pair statistics of a round are computed from, in four queries.
        `tie_reasons`: per method, the discard reasons that mean its two sides were equal."""
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
        ties: dict[str, int] = {}
        for method, reason, n in self._run(
            "SELECT method, reason, count(*) FROM discards WHERE run_id = ? AND round = ? "
            "GROUP BY ALL",
            [run_id, round_],
        ):
            if reason in tie_reasons.get(method, ()):
                ties[method] = ties.get(method, 0) + n
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
        return RoundLabels(pairs, ties, counts, dict(variance))

    def training_results(self, run_id: str, round_: int) -> list[dict[str, Any]]:
        return self.query(
            "SELECT kind, output_model_id, metrics_json FROM training_runs WHERE run_id = ? "
            "AND round = ? AND status = 'finished' ORDER BY kind",
            [run_id, round_],
        )

    def answer_lengths(self, run_id: str) -> dict[int, dict[str, float]]:
        """Per round: the yardstick's answers' mean length and share cut off at max_tokens
        (`tokens`, `cut`), and the pairs' mean chosen and rejected length."""
        lengths: dict[int, dict[str, float]] = {}
        for r in self.query(
            "SELECT round, avg(n_tokens) AS tokens, avg((finish_reason = 'length')::INT) AS cut "
            "FROM generations WHERE run_id = ? AND method = 'evaluation' AND role = 'yardstick' "
            "GROUP BY round",
            [run_id],
        ):
            lengths.setdefault(r.pop("round"), {}).update(r)
        for r in self.query(
            "SELECT p.round, avg(c.n_tokens) AS chosen, avg(r.n_tokens) AS rejected "
            f"{PAIRS_WITH_TEXTS} WHERE p.run_id = ? GROUP BY p.round",
            [run_id],
        ):
            lengths.setdefault(r.pop("round"), {}).update(r)
        return lengths

    def benchmarked(self, run_id: str, round_: int, model_id: str) -> set[str]:
        """The lm-eval tasks (as asked for) stored for this model as this round's."""
        rows = self._run(
            "SELECT DISTINCT details_json->>'requested' FROM evaluations WHERE run_id = ? "
            "AND round = ? AND details_json->>'source' = 'lm-eval' "
            "AND details_json->>'model' = ?",
            [run_id, round_, model_id],
        )
        return {r[0] for r in rows}

    def evaluations(self, run_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT round, metric, method, value, details_json FROM evaluations "
            "WHERE run_id = ? ORDER BY round, metric, method",
            [run_id],
        )
