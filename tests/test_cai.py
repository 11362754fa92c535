"""Constitutional AI: principle sampling, critique-revision, AI feedback labels."""

import json
from collections import Counter

import pytest

from pipeline.errors import ConfigError
from pipeline.methods.cai import (
    CaiConfig,
    ai_feedback,
    cai_templates,
    load_constitution,
    revision_problem,
    run_cai,
    sample_principles,
)
from pipeline.rows import RoundContext
from pipeline.seeds import load_prompts
from pipeline.store import Store

SAMPLING = {"max_tokens": 10}


@pytest.fixture(scope="module")
def constitution():
    return load_constitution("constitution")[0]


@pytest.fixture(scope="module")
def red_team():
    return load_prompts("data/prompts/red_team.jsonl")


def test_shipped_constitution(constitution):
    assert len(constitution.critique_revision) == 16
    assert len(constitution.feedback) == 16
    assert len(constitution.demonstrations) >= 1


def test_principle_sampling_is_seeded_and_covers(constitution, red_team):
    ctx = RoundContext("r", 1, "m", seed=7)
    draws = [sample_principles(constitution, ctx, p.prompt_id, 4) for p in red_team]
    again = [sample_principles(constitution, ctx, p.prompt_id, 4) for p in red_team]
    assert draws == again
    other = RoundContext("r", 1, "m", seed=8)
    assert draws != [sample_principles(constitution, other, p.prompt_id, 4) for p in red_team]
    seen = Counter(p.id for d in draws for p in d)  # 120 draws over 16 principles
    assert set(seen) == {p.id for p in constitution.critique_revision}


def test_bad_constitution_names_file_and_field(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: x\ncritique_revision: [{id: a, critique: c}]\nfeedback: []\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: critique_revision\.0\.revision"):
        load_constitution(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_constitution("no-such-constitution")


@pytest.mark.parametrize(
    "revision, reason",
    [
        ("", "empty_revision"),
        ("  The   original answer. ", "unchanged_revision"),
        ("It is rude.", "echoes_instructions"),  # the critique, again
        ("Sure. Rewrite the reply to be kind. Here it is.", "echoes_instructions"),
        ("A kinder answer.", None),
    ],
)
def test_revision_problems(revision, reason):
    requests = ["Say what is rude.", "Rewrite the reply to be kind."]
    assert revision_problem("The original answer.", "It is rude.", revision, requests) == reason


@pytest.mark.slow
def test_loop_stores_every_step(tiny_engine, ctx, library, constitution, red_team, tmp_path):
    cfg = CaiConfig(revisions=3, sampling=SAMPLING, feedback=False)
    prompts = red_team[:5]
    rows = run_cai(tiny_engine, cai_templates(library, cfg), constitution, prompts, ctx, cfg)
    with Store(tmp_path / "t.duckdb") as store:
        counts = store.write(rows)
        steps = {
            r["prompt_id"]: r["steps"]
            for r in store.query(
                "SELECT prompt_id, list(step ORDER BY step) AS steps FROM critiques "
                "GROUP BY prompt_id"
            )
        }
        dropped_at = {
            r["prompt_id"]: r["step"]
            for r in store.query(
                "SELECT c.prompt_id, c.step FROM critiques c JOIN discards d "
                "ON d.item_id = c.revision_generation_id AND d.stage = 'revision'"
            )
        }
        no_answer = {
            r["item_id"]
            for r in store.query("SELECT item_id FROM discards WHERE stage = 'initial'")
        }
        # A prompt runs K steps unless a revision is dropped, which ends it (and is counted).
        for p in prompts:
            expected = 0 if p.prompt_id in no_answer else dropped_at.get(p.prompt_id, 2) + 1
            assert steps.get(p.prompt_id, []) == list(range(expected))
        revs = store.query("SELECT * FROM generations WHERE role = 'revision'")
        assert len(revs) == sum(len(v) for v in steps.values())
        assert all(json.loads(r["meta_json"])["principle_id"].startswith("cr") for r in revs)
        # Each step revises the previous step's output.
        parent = store.query(
            "SELECT count(*) AS bad FROM critiques c JOIN generations g "
            "ON g.generation_id = c.revision_generation_id "
            "WHERE g.parent_generation_id <> c.input_generation_id"
        )
        assert parent[0]["bad"] == 0
        sft = store.query("SELECT * FROM sft_texts")
        pairs = store.query("SELECT * FROM pair_texts")
        assert len(sft) == len(pairs) == counts.get("sft_examples", 0)
        no_revision = store.query("SELECT * FROM discards WHERE reason = 'no_usable_revision'")
        assert len(pairs) + len(no_revision) == 5
        for p in pairs:
            assert p["variant"] == "revision"
        assert (
            sum(
                store.write(
                    run_cai(
                        tiny_engine, cai_templates(library, cfg), constitution, prompts, ctx, cfg
                    )
                ).values()
            )
            == 0
        )


@pytest.mark.slow
def test_loop_produces_pairs_from_usable_revisions(
    tiny_engine, ctx, library, constitution, red_team
):
    # The random model's revisions are random text: usable, and different from the answer.
    cfg = CaiConfig(revisions=1, sampling={"max_tokens": 6, "temperature": 1.0}, feedback=False)
    rows = run_cai(tiny_engine, cai_templates(library, cfg), constitution, red_team[:6], ctx, cfg)
    assert len(rows["pairs"]) >= 1
    by_id = {g["generation_id"]: g for g in rows["generations"]}
    for p in rows["pairs"]:
        assert by_id[p["chosen_generation_id"]]["role"] == "revision"
        assert by_id[p["rejected_generation_id"]]["role"] == "initial"


@pytest.mark.slow
@pytest.mark.parametrize("cot", [False, True])
def test_ai_feedback_both_orders(tiny_engine, ctx, library, constitution, red_team, cot):
    cfg = CaiConfig(sampling=SAMPLING, feedback_cot=cot)
    template = cai_templates(library, cfg)["feedback"]
    prompts = red_team[:6]
    rows = ai_feedback(tiny_engine, template, constitution, prompts, ctx, cfg)
    comps = rows["comparisons"]
    by_prompt = {}
    for c in comps:
        by_prompt.setdefault(c["prompt_id"], []).append(c)
    for pair_of_questions in by_prompt.values():
        first, second = sorted(pair_of_questions, key=lambda c: json.loads(c["meta_json"])["order"])
        # Both orders asked: the second swaps A and B.
        assert (first["generation_a_id"], first["generation_b_id"]) == (
            second["generation_b_id"],
            second["generation_a_id"],
        )
        assert first["principle_id"] == second["principle_id"]
        for c in (first, second):
            low, high = (0.4, 0.6) if cot else (0.0, 1.0)
            assert low <= c["prob_a"] <= high
            assert (c["raw_output"] is not None) == cot
    for p in rows["pairs"]:
        assert 0.5 < p["soft_label"] <= (0.6 if cot else 1.0)
        [first, second] = by_prompt[p["prompt_id"]]
        first, second = sorted([first, second], key=lambda c: json.loads(c["meta_json"])["order"])
        label_first = (first["prob_a"] + 1 - second["prob_a"]) / 2
        chosen_is_first = p["chosen_generation_id"] == first["generation_a_id"]
        assert p["soft_label"] == pytest.approx(label_first if chosen_is_first else 1 - label_first)
    assert len(rows["pairs"]) + len(rows["discards"]) == len(prompts)
