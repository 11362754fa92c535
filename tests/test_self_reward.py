"""Self-Rewarding: score parsing, pair selection, template swap, a batch with the tiny
model stored in DuckDB."""

import pytest

from pipeline.judging import judge_candidates
from pipeline.judging.pairs import PairPolicy, Scored, select_pair
from pipeline.judging.parsing import parse_score
from pipeline.judging.template import TemplateJudge
from pipeline.methods.self_reward import SelfRewardConfig, run_self_reward
from pipeline.seeds import Prompt, load_prompts
from pipeline.self_instruct import (
    NearDuplicateIndex,
    SelfInstructConfig,
    rouge_l,
    write_new_prompts,
)
from pipeline.store import Store
from pipeline.templates import ScoreParser, TemplateLibrary


def template_judge(template, cfg, engine, model_id):
    """The Self-Rewarding judge as a round builds it: the config's settings, this template."""
    return TemplateJudge(cfg.judge, template, engine, model_id)


FIVE = ScoreParser(kind="score", pattern=r"Score:\s*\**\s*(-?\d+(?:\.\d+)?)", min=0, max=5)
STRICT = FIVE.model_copy(update={"out_of_range": "invalid"})


@pytest.mark.parametrize(
    "text, parser, expected",
    [
        ("Good answer.\nScore: 4", FIVE, (4.0, "ok")),
        ("Score: 2 at first... on reflection\nScore: 3", FIVE, (3.0, "ok")),  # last wins
        ("Score: 3.5", FIVE, (3.5, "ok")),
        ("Score: **4**", FIVE, (4.0, "ok")),
        ("Score: 7", FIVE, (5.0, "ok")),  # clamped
        ("Score: -2", FIVE, (0.0, "ok")),
        ("Score: 7", STRICT, (None, "out_of_range")),
        ("I would give it four points.", FIVE, (None, "no_match")),
        ("", FIVE, (None, "no_match")),
        ("Score: four\x00\ufffd!!", FIVE, (None, "no_match")),
        ("Score: ", FIVE, (None, "no_match")),
    ],
)
def test_parse_score(text, parser, expected):
    assert parse_score(text, parser) == expected


def s(gid, *scores, length=10):
    return Scored(gid, tuple(scores), length)


def test_best_vs_worst():
    sel = select_pair([s("a", 3, 4), s("b", 1), s("c", 2, 2, 2)], PairPolicy())
    assert (sel.chosen.generation_id, sel.rejected.generation_id) == ("a", "b")
    assert sel.margin == pytest.approx(2.5)


@pytest.mark.parametrize(
    "candidates, reason",
    [
        ([s("a", 3), s("b", 3), s("c", 3)], "tie"),
        ([s("a"), s("b"), s("c")], "fewer_than_2_scored"),  # every judge output unparsed
        ([s("a", 4), s("b"), s("c")], "fewer_than_2_scored"),  # one valid
        ([], "fewer_than_2_scored"),
    ],
)
def test_no_pair(candidates, reason):
    sel = select_pair(candidates, PairPolicy())
    assert (sel.chosen, sel.reason) == (None, reason)


def test_parse_failure_is_never_rejected():
    # "b" has no valid score: it must not become the rejected side as if it scored 0.
    sel = select_pair([s("a", 4), s("b"), s("c", 2)], PairPolicy())
    assert (sel.chosen.generation_id, sel.rejected.generation_id) == ("a", "c")


def test_min_margin():
    cands = [s("a", 3.5), s("b", 3)]
    assert select_pair(cands, PairPolicy(min_margin=1.0)).reason == "below_margin"
    assert select_pair(cands, PairPolicy(min_margin=0.5)).reason is None


def test_length_control_prefers_shorter_within_gap():
    cands = [s("long", 4.0, length=300), s("short", 3.8, length=50), s("low", 1, length=40)]
    assert select_pair(cands, PairPolicy()).chosen.generation_id == "long"
    sel = select_pair(cands, PairPolicy(length_control_gap=0.5))
    assert sel.chosen.generation_id == "short"
    assert sel.rejected.generation_id == "low"
    # The gap spans every score: no answer is clearly better, so no pair.
    assert select_pair(cands, PairPolicy(length_control_gap=5)).reason == "tie"


def test_swapped_template_changes_parsing_without_code(library):
    """A 1-10 judge writing `Rating: [[n]]` is a template file; no code knows its format."""
    shipped = library.get("judge_additive_5pt").meta.parser
    swapped = library.get("judge_rating_10").meta.parser
    text = "Solid, but long-winded.\nRating: [[7]]"
    assert parse_score(text, swapped) == (7.0, "ok")
    assert parse_score(text, shipped) == (None, "no_match")
    assert parse_score("Rating: [[11]]", swapped) == (None, "out_of_range")
    assert parse_score("Score: 4", swapped) == (None, "no_match")


@pytest.mark.slow
def test_swapped_template_through_the_judge(tiny_engine, ctx, library):
    judge = library.get("judge_rating_10")
    cfg = SelfRewardConfig(judge={"samples": 2, "sampling": {"max_tokens": 8}})
    prompt = Prompt.user("Name a prime number.")
    cands = [
        {
            "generation_id": "g1",
            "prompt_id": prompt.prompt_id,
            "text": "7",
            "finish_reason": "stop",
        },
        {
            "generation_id": "g2",
            "prompt_id": prompt.prompt_id,
            "text": " ",
            "finish_reason": "stop",
        },
    ]
    judged_by = template_judge(judge, cfg, tiny_engine, ctx.model_id)
    rows = judge_candidates(judged_by, [prompt], cands, ctx, "self_reward")
    assert {j["template_id"] for j in rows["judgments"]} == {judge.template_id}
    assert [j["sample_idx"] for j in rows["judgments"]] == [0, 1]  # only the usable one
    assert [(d["item_id"], d["reason"]) for d in rows["discards"]] == [("g2", "empty")]
    for j in rows["judgments"]:
        assert (j["score"], j["parse_status"]) == parse_score(j["raw_output"], judge.meta.parser)


def test_rouge_l_and_near_duplicates():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("a b c d", "x y z") == 0.0
    assert rouge_l("a b c d", "a c") == pytest.approx(2 * 2 / 6)
    index = NearDuplicateIndex(0.7)
    index.add("Explain why the sky is blue in two sentences.")
    assert index.nearest_above("Explain why the sky is blue, in two short sentences.") > 0.7
    assert index.nearest_above("Write a haiku about autumn leaves.") is None


@pytest.mark.slow
def test_self_instruct_filters_and_stores(tiny_engine, ctx):
    seeds = load_prompts("data/prompts/helpful.jsonl")
    cfg = SelfInstructConfig(
        enabled=True, new_prompts=6, min_words=1, max_words=40, sampling={"max_tokens": 24}
    )
    template = TemplateLibrary().get("self_instruct")
    new, rows = write_new_prompts(tiny_engine, template, seeds, [], ctx, cfg)
    assert len(rows["generations"]) == 6
    kept = {p.generation_id for p in new}
    dropped = {d["item_id"] for d in rows["discards"]}
    # Every request either became a prompt or was discarded with a reason.
    assert kept | dropped == {g["generation_id"] for g in rows["generations"]}
    assert not kept & dropped
    assert all(
        d["reason"] in {"too_long", "too_short", "near_duplicate", "empty"}
        for d in rows["discards"]
    )
    assert all(p.source == "self_instruct" for p in new)
    # A generated prompt that repeats a seed is a near-duplicate.
    copy = seeds[0].text
    index = NearDuplicateIndex(cfg.rouge_l_max)
    index.add(copy)
    assert index.nearest_above(copy) == 1.0


@pytest.mark.slow
def test_batch_in_the_store_is_idempotent(tiny_engine, ctx, tmp_path):
    library = TemplateLibrary()
    judge = library.get("judge_additive_5pt_prefilled")
    cfg = SelfRewardConfig(n_candidates=4, sampling={"max_tokens": 12})
    prompts = load_prompts("data/prompts/helpful.jsonl")[:4]

    rows = run_self_reward(
        tiny_engine, template_judge(judge, cfg, tiny_engine, ctx.model_id), prompts, ctx, cfg
    )
    with Store(tmp_path / "t.duckdb") as store:
        first = store.write(rows)
        assert first["generations"] == 16
        assert first["judgments"] == len(rows["judgments"]) > 0
        assert first["pairs"] >= 1
        pairs = store.query("SELECT * FROM pair_texts")
        for p in pairs:
            assert p["method"] == "self_reward" and p["variant"] == "best_vs_worst"
            assert p["chosen_score"] > p["rejected_score"]
            assert p["prompt"] in {x.text for x in prompts}
        # chosen = the best mean score of its prompt's candidates, rejected = the worst.
        [[mismatched]] = store.sql(
            "SELECT count(*) FROM pairs p JOIN (SELECT g.prompt_id, max(s.mean_score) AS hi, "
            "min(s.mean_score) AS lo FROM candidate_scores s JOIN generations g USING "
            "(generation_id) GROUP BY g.prompt_id) m USING (prompt_id) "
            "WHERE abs(p.chosen_score - m.hi) > 1e-9 OR abs(p.rejected_score - m.lo) > 1e-9"
        )[1]
        assert mismatched == 0
        # Provenance: each pair's sides are candidates of its prompt, judged by the template.
        [[orphans]] = store.sql(
            "SELECT count(*) FROM pairs p JOIN generations g "
            "ON g.generation_id IN (p.chosen_generation_id, p.rejected_generation_id) "
            "WHERE g.prompt_id <> p.prompt_id OR g.role <> 'candidate'"
        )[1]
        assert orphans == 0
        scores = store.query("SELECT * FROM candidate_scores")
        assert len(scores) == 16 and all(r["template_id"] == judge.template_id for r in scores)

        again = run_self_reward(
            tiny_engine, template_judge(judge, cfg, tiny_engine, ctx.model_id), prompts, ctx, cfg
        )
        assert sum(store.write(again).values()) == 0
        assert store.query("SELECT count(*) AS n FROM pairs")[0]["n"] == first["pairs"]


@pytest.mark.slow
def test_unparsed_free_form_judgments_are_stored_not_paired(tiny_engine, ctx):
    judge = TemplateLibrary().get("judge_additive_5pt")
    cfg = SelfRewardConfig(
        sampling={"max_tokens": 8}, judge={"samples": 2, "sampling": {"max_tokens": 8}}
    )
    prompts = load_prompts("data/prompts/helpful.jsonl")[:2]
    rows = run_self_reward(
        tiny_engine, template_judge(judge, cfg, tiny_engine, ctx.model_id), prompts, ctx, cfg
    )
    # A random model never writes "Score: n": every sample is kept, unparsed, and no pair
    # is made from parse failures.
    assert len(rows["judgments"]) == 2 * 4 * 2
    assert all(j["score"] is None and j["parse_status"] == "no_match" for j in rows["judgments"])
    assert rows["pairs"] == []
    assert {d["reason"] for d in rows["discards"]} == {"fewer_than_2_scored"}


@pytest.mark.slow
def test_a_separate_judge_model_is_recorded(tiny_engine, ctx):
    """`self_reward.judge.model`: judgments name the judge's model, candidates the policy."""
    judge = TemplateLibrary().get("judge_additive_5pt_prefilled")
    cfg = SelfRewardConfig(n_candidates=2, sampling={"max_tokens": 6})
    prompts = load_prompts("data/prompts/helpful.jsonl")[:2]
    rows = run_self_reward(
        tiny_engine, template_judge(judge, cfg, tiny_engine, "judge@123"), prompts, ctx, cfg
    )
    assert {j["model_id"] for j in rows["judgments"]} == {"judge@123"}
    assert {g["model_id"] for g in rows["generations"]} == {ctx.model_id}
