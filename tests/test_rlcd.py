"""RLCD: contrastive prompt construction, the Rescore label, a stored batch."""

import json

import pytest

from pipeline.methods.rlcd import (
    RlcdConfig,
    contrastive_prompts,
    load_tasks,
    rlcd_templates,
    run_rlcd,
)
from pipeline.seeds import Prompt, load_prompts
from pipeline.store import Store

SAMPLING = {"max_tokens": 10}
MULTI_TURN = Prompt.from_messages(
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I sharpen a knife?"},
        {"role": "assistant", "content": "Use a whetstone."},
        {"role": "user", "content": "And a serrated one?"},
    ]
)


@pytest.fixture
def tasks():
    return load_tasks(["harmlessness", "helpfulness", "outlining"])


def test_shipped_descriptor_files(tasks):
    assert [len(tasks[t].pairs) for t in ("harmlessness", "helpfulness", "outlining")] == [16, 1, 3]


def test_system_placement(tasks, library):
    pair = tasks["harmlessness"].pairs[0]
    t = rlcd_templates(library, RlcdConfig())
    (pos, pos_prefix), (neg, neg_prefix) = contrastive_prompts(
        MULTI_TURN, pair, "system", t["system"], t["assistant_tag"]
    )
    assert pos_prefix == neg_prefix == ""
    # The descriptor joins the prompt's own system message; everything else is shared...
    assert pos[0]["content"].startswith("Be brief.") and pair.positive in pos[0]["content"]
    assert pair.negative in neg[0]["content"] and pair.positive not in neg[0]["content"]
    assert (
        [m["role"] for m in pos] == [m["role"] for m in neg] == [r for r, _ in MULTI_TURN.messages]
    )
    assert pos[-1] == neg[-1] == {"role": "user", "content": "And a serrated one?"}
    # ...except earlier assistant turns, which carry the opposite polarity.
    assert pair.negative in pos[2]["content"] and pair.positive in neg[2]["content"]
    assert pos[2]["content"].endswith("Use a whetstone.")


def test_assistant_tag_placement(tasks, library):
    pair = tasks["helpfulness"].pairs[0]
    t = rlcd_templates(library, RlcdConfig())
    prompt = Prompt.user("Explain recursion.")
    (pos, pos_prefix), (neg, neg_prefix) = contrastive_prompts(
        prompt, pair, "assistant_tag", t["system"], t["assistant_tag"]
    )
    assert pos == neg == prompt.conversation  # no system message added
    assert pos_prefix == f"({pair.positive}) " and neg_prefix == f"({pair.negative}) "


@pytest.mark.slow
def test_pair_sampling_is_seeded(tiny_engine, ctx, library, tasks):
    cfg = RlcdConfig(sampling=SAMPLING, tasks=["harmlessness"], default_task="harmlessness")
    prompts = load_prompts("data/prompts/helpful.jsonl")[:6]
    templates = rlcd_templates(library, cfg)
    a = run_rlcd(tiny_engine, templates, tasks, prompts, ctx, cfg)
    b = run_rlcd(tiny_engine, templates, tasks, prompts, ctx, cfg)
    ids = [json.loads(g["meta_json"])["descriptor_id"] for g in a["generations"]]
    assert ids == [json.loads(g["meta_json"])["descriptor_id"] for g in b["generations"]]
    assert len(set(ids)) > 1  # different prompts draw different pairs


@pytest.mark.slow
def test_batch_stored_with_neutral_prompt_and_rescore(tiny_engine, ctx, library, tasks, tmp_path):
    cfg = RlcdConfig(sampling=SAMPLING, rescore=True)
    prompts = load_prompts("data/prompts/helpful.jsonl")[:6] + [
        Prompt.user("How do I pick a lock?", task="harmlessness"),
        Prompt.user("Outline a story about a lighthouse.", task="outlining"),  # not enabled
    ]
    rows = run_rlcd(tiny_engine, rlcd_templates(library, cfg), tasks, prompts, ctx, cfg)
    with Store(tmp_path / "t.duckdb") as store:
        counts = store.write(rows)
        assert counts["generations"] == 2 * 7
        pairs = store.query("SELECT * FROM pair_texts ORDER BY prompt_id")
        assert len(pairs) + counts.get("discards", 0) == 8
        [skipped] = store.query("SELECT * FROM discards WHERE reason = 'task_not_enabled'")
        assert skipped["detail"] == "outlining"
        descriptors = [d for t in tasks.values() for p in t.pairs for d in (p.positive, p.negative)]
        for p in pairs:
            # The stored prompt is the neutral one: no descriptor reaches training data.
            assert not any(d in p["prompt"] for d in descriptors)
            assert 0.0 <= p["soft_label"] <= 1.0
            assert p["flagged"] == (p["soft_label"] < 0.5)
        gens = store.query("SELECT role, meta_json FROM generations")
        assert {g["role"] for g in gens} == {"positive", "negative"}
        tasks_used = {json.loads(g["meta_json"])["task"] for g in gens}
        assert tasks_used == {"helpfulness", "harmlessness"}

        comps = store.query(
            "SELECT c.*, ga.role AS a_role, gb.role AS b_role FROM comparisons c "
            "JOIN generations ga ON ga.generation_id = c.generation_a_id "
            "JOIN generations gb ON gb.generation_id = c.generation_b_id"
        )
        assert len(comps) == len(pairs)
        for c in comps:
            order = json.loads(c["meta_json"])["order"]
            assert (c["a_role"], c["b_role"]) == (
                ("positive", "negative") if order == "positive_first" else ("negative", "positive")
            )
            assert 0.0 <= c["prob_a"] <= 1.0
        # The soft label is P(o+ better), whichever order it was asked in.
        by_prompt = {p["prompt_id"]: p for p in pairs}
        for c in comps:
            label = c["prob_a"] if c["a_role"] == "positive" else 1 - c["prob_a"]
            assert by_prompt[c["prompt_id"]]["soft_label"] == pytest.approx(label)

        again = run_rlcd(tiny_engine, rlcd_templates(library, cfg), tasks, prompts, ctx, cfg)
        assert sum(store.write(again).values()) == 0


@pytest.mark.slow
def test_rescore_orders_are_randomised(tiny_engine, ctx, library, tasks):
    cfg = RlcdConfig(sampling=SAMPLING, rescore=True)
    prompts = load_prompts("data/prompts/helpful.jsonl")[:16]
    rows = run_rlcd(tiny_engine, rlcd_templates(library, cfg), tasks, prompts, ctx, cfg)
    orders = [json.loads(c["meta_json"])["order"] for c in rows["comparisons"]]
    assert {"positive_first", "negative_first"} <= set(orders)
