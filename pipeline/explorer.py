"""The report's pairs explorer: every pair of a run with what made it (its prompt, both
answers, each judge's scores and raw outputs, the RLCD descriptors, the CAI critique and
revision steps, the A/B questions asked about it, the model and template ids), and what
was not kept (discards with their reasons), shaped for the page's own script.

Past `MAX_PAIRS` the page carries a stated sample per round and method (the pairs with
the lowest ids, a fixed choice) and the SQL that reads the rest.
"""

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

MAX_PAIRS = 2000
MAX_DISCARDS = 200  # items listed per (round, method, stage, reason); counts are whole


def _meta(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


def sample(pairs: Sequence[Mapping[str, Any]], limit: int) -> tuple[list, dict[str, Any]]:
    """The pairs the page carries: all of them, or up to `limit` spread evenly over the
    (round, method) groups, each group's lowest pair ids first; with a note of what was
    left out."""
    if len(pairs) <= limit:
        return list(pairs), {"total": len(pairs), "shown": len(pairs), "sampled": False}
    groups: dict[tuple, list] = defaultdict(list)
    for p in sorted(pairs, key=lambda p: p["pair_id"]):
        groups[(p["round"], p["method"])].append(p)
    per_group = max(1, limit // len(groups))
    kept = [p for g in groups.values() for p in g[:per_group]]
    note = {"total": len(pairs), "shown": len(kept), "sampled": True, "per_group": per_group}
    return kept, note


def _side(p: Mapping[str, Any], side: str, judged: Mapping[str, list]) -> dict[str, Any]:
    gid = p[f"{side}_generation_id"]
    return {
        "id": gid,
        "text": p[side],
        "tokens": p[f"{side}_tokens"],
        "finish": p[f"{side}_finish"],
        "template": p[f"{side}_template"],
        "meta": _meta(p[f"{side}_meta"]),
        "judgments": judged.get(gid, []),
    }


def _by_generation(
    judgments: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, list], dict[str, list]]:
    """Per generation: its judgments; per unordered pair of generations: the A/B
    questions asked about the two."""
    judged: dict[str, list] = defaultdict(list)
    for j in judgments:
        judged[j["generation_id"]].append(
            {
                "judge": j["judge_id"],
                "score": j["score"],
                "status": j["parse_status"],
                "raw": j["raw_output"],
            }
        )
    asked: dict[frozenset, list] = defaultdict(list)
    for c in comparisons:
        entry = {
            "prob_a": c["prob_a"],
            "a": c["generation_a_id"],
            "b": c["generation_b_id"],
            "template": c["template_id"],
            "principle": c["principle_id"],
            "raw": c["raw_output"],
            "meta": _meta(c["meta_json"]),
        }
        asked[frozenset((c["generation_a_id"], c["generation_b_id"]))].append(entry)
    return judged, asked


def _critique_chains(critiques: Sequence[Mapping[str, Any]]) -> dict[tuple, list]:
    """Per (round, prompt): its critique and revision steps, in order."""
    chains: dict[tuple, list] = defaultdict(list)
    for c in sorted(critiques, key=lambda c: c["step"]):
        chains[(c["round"], c["prompt_id"])].append(
            {
                "step": c["step"],
                "principle": c["principle_id"],
                "critique": c["critique"],
                "revision": c["revision_generation_id"],
            }
        )
    return chains


def _pair(p: Mapping[str, Any], judged: dict, asked: dict, chains: dict) -> dict[str, Any]:
    chosen, rejected = _side(p, "chosen", judged), _side(p, "rejected", judged)
    return {
        "id": p["pair_id"],
        "round": p["round"],
        "method": p["method"],
        "variant": p["variant"],
        "prompt": p["prompt"],
        "messages": json.loads(p["messages_json"]),
        "model": p["model_id"],
        "margin": p["margin"],
        "soft_label": p["soft_label"],
        "flagged": p["flag_reason"] if p["flagged"] else None,
        "chosen": chosen,
        "rejected": rejected,
        "judges": sorted({j["judge"] for s in (chosen, rejected) for j in s["judgments"]}),
        "critiques": chains.get((p["round"], p["prompt_id"]), []) if p["method"] == "cai" else [],
        "questions": asked.get(frozenset((chosen["id"], rejected["id"])), []),
    }


def explorer_data(
    pairs: Sequence[Mapping[str, Any]],
    judgments: Sequence[Mapping[str, Any]],
    critiques: Sequence[Mapping[str, Any]],
    comparisons: Sequence[Mapping[str, Any]],
    discards: Sequence[Mapping[str, Any]],
    limit: int = MAX_PAIRS,
) -> dict[str, Any]:
    """What the explorer shows, from the store's rows (`Store.explorer_rows`)."""
    kept, note = sample(pairs, limit)
    judged, asked = _by_generation(judgments, comparisons)
    chains = _critique_chains(critiques)
    rows = [_pair(p, judged, asked, chains) for p in kept]
    return {"pairs": rows, "note": note, "discards": discard_summary(discards)}


def discard_summary(discards: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (round, method, stage, reason): how many, and the first items with details."""
    groups: dict[tuple, list] = defaultdict(list)
    for d in discards:
        groups[(d["round"], d["method"], d["stage"], d["reason"])].append(d)
    return [
        {
            "round": r,
            "method": m,
            "stage": s,
            "reason": why,
            "count": len(items),
            "items": [{"id": d["item_id"], "detail": d["detail"]} for d in items[:MAX_DISCARDS]],
        }
        for (r, m, s, why), items in sorted(groups.items())
    ]


def page_json(data: Mapping[str, Any]) -> str:
    """The data as JSON that is safe inside the page's `<script type=application/json>`:
    no generated text can close the element or open a comment."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
