"""What a training step reads: pairs with their prompt and texts, CAI's revisions, and
Self-Rewarding's scored candidates, over one round or every round up to it."""

from collections.abc import Sequence
from typing import Any

from pipeline.store.connection import PAIRS_WITH_TEXTS, Connection


class TrainingQueries(Connection):
    def training_pairs(
        self,
        run_id: str,
        round_: int,
        methods: Sequence[str] | None = None,
        min_margin: float | None = None,
        exclude_flagged: bool = True,
        since: int | None = None,
    ) -> list[dict[str, Any]]:
        """Pairs of rounds `since`..`round_` (default: `round_` alone) with the prompt's
        messages and both texts, in pair_id order. `min_margin` keeps pairs whose margin
        is at least that (pairs without a margin, i.e. labelled by construction or by AI
        feedback, are kept)."""
        where = ["p.run_id = ?", "p.round BETWEEN ? AND ?"]
        params: list[Any] = [run_id, round_ if since is None else since, round_]
        if methods is not None:
            where.append("list_contains(?, p.method)")
            params.append(list(methods))
        if min_margin is not None:
            where.append("(p.margin IS NULL OR p.margin >= ?)")
            params.append(min_margin)
        if exclude_flagged:
            where.append("NOT p.flagged")
        return self.query(
            "SELECT p.pair_id, p.round, p.method, p.variant, p.prompt_id, pr.messages_json, "
            "p.chosen_generation_id, c.text AS chosen, p.rejected_generation_id, "
            "r.text AS rejected, p.margin, p.soft_label "
            f"{PAIRS_WITH_TEXTS} WHERE {' AND '.join(where)} ORDER BY p.pair_id",
            params,
        )

    def sft_revisions(
        self, run_id: str, round_: int, since: int, methods: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """The stored SFT rows (CAI's final revisions) of rounds `since`..`round_`."""
        where = "s.run_id = ? AND s.round BETWEEN ? AND ?"
        params: list[Any] = [run_id, since, round_]
        if methods is not None:
            where += " AND list_contains(?, s.method)"
            params.append(list(methods))
        return self.query(
            "SELECT s.generation_id, s.round, s.method, s.prompt_id, pr.messages_json, "
            "g.text AS completion FROM sft_examples s "
            "JOIN prompts pr ON pr.run_id = s.run_id AND pr.prompt_id = s.prompt_id "
            "JOIN generations g ON g.generation_id = s.generation_id "
            f"WHERE {where} ORDER BY s.generation_id",
            params,
        )

    def scored_candidates(self, run_id: str, round_: int, since: int) -> list[dict[str, Any]]:
        """Self-Rewarding candidates of rounds `since`..`round_` with their mean score by
        each round's own judge (its first; a later `prefloop judge` does not count)."""
        return self.query(
            "WITH own AS (SELECT round, arg_min(judge_id, created_at) AS judge_id "
            "  FROM judgments WHERE run_id = ? AND method = 'self_reward' "
            "  AND round BETWEEN ? AND ? GROUP BY round) "
            "SELECT s.generation_id, s.round, g.prompt_id, pr.messages_json, g.text, "
            "s.mean_score, s.judge_id FROM candidate_scores s JOIN own USING (round, judge_id) "
            "JOIN generations g ON g.generation_id = s.generation_id "
            "JOIN prompts pr ON pr.run_id = g.run_id AND pr.prompt_id = g.prompt_id "
            "WHERE s.run_id = ? AND s.method = 'self_reward' AND s.mean_score IS NOT NULL "
            "ORDER BY s.generation_id",
            [run_id, since, round_, run_id],
        )

    def drawn_prompts(self, run_id: str, since: int, round_: int) -> list[dict[str, Any]]:
        """The prompts rounds `since`..`round_` drew, with their messages, in round then
        prompt-id order (a prompt drawn twice comes twice)."""
        return self.query(
            "SELECT d.round, d.prompt_id, pr.messages_json FROM round_prompts d "
            "JOIN prompts pr ON pr.run_id = d.run_id AND pr.prompt_id = d.prompt_id "
            "WHERE d.run_id = ? AND d.round BETWEEN ? AND ? ORDER BY d.round, d.prompt_id",
            [run_id, since, round_],
        )
