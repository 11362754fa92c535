"""What a training step reads: a round's pairs with their prompt and texts."""

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
            f"{PAIRS_WITH_TEXTS} WHERE {' AND '.join(where)} ORDER BY p.pair_id",
            params,
        )
