"""Evaluation metrics on hand-made rows with known answers, and the engine stages on the
tiny model."""

import json

import pytest

from pipeline.evaluation.metrics import (
    agreement,
    length_ratio,
    pair_statistics,
    training_metrics,
    verdict,
    win_rate,
)
from pipeline.evaluation.stages import compare_models, heldout_answers, relabel_pairs
from pipeline.judging.template import TemplateJudge, TemplateJudgeConfig
from pipeline.schema import EvaluationConfig
from pipeline.seeds import Prompt
from pipeline.store import RoundLabels
from pipeline.training.kinds import TRAINING_KINDS


def test_verdict_band():
    assert verdict(0.9, 0.05) == 1.0
    assert verdict(0.1, 0.05) == 0.0
    assert verdict(0.54, 0.05) == 0.5 and verdict(0.46, 0.05) == 0.5
    assert verdict(None, 0.05) is None


def test_win_rate_counts_ties_as_half_and_flips():
    p_new = {
        "win": [0.9, 0.8],  # new wins in both orders
        "loss": [0.2, 0.1],  # new loses in both orders
        "flip": [0.9, 0.1],  # the judge always picks A: position bias
        "tie": [0.5, 0.52],  # both within the band
    }
    r = win_rate(p_new, band=0.05, identical=["same"])
    # verdicts: 1,1, 0,0, 1,0, .5,.5, and .5,.5 for the identical answers: 4 + 2 = 6 of 10
    assert (r["wins"], r["losses"], r["ties"]) == (3, 3, 4)
    assert r["win_rate"] == pytest.approx(5 / 10)
    assert r["flip_rate"] == pytest.approx(1 / 4)
    assert r["prompts"] == 5 and r["identical"] == 1


def test_win_rate_one_order_unanswered():
    r = win_rate({"a": [0.9, None], "b": [0.7, 0.8]}, band=0.0)
    assert r["win_rate"] == 1.0 and r["unanswered"] == 1
    assert r["flip_rate"] == 0.0  # only "b" was answered in both orders
    assert win_rate({}, 0.05)["win_rate"] is None


def test_agreement_over_decided_pairs():
    r = agreement([1.0, 1.0, 0.0, 0.5, None])
    assert r["agreement"] == pytest.approx(2 / 3)
    assert (r["agree"], r["disagree"], r["ties"], r["unlabelled"]) == (2, 1, 1, 1)
    assert agreement([0.5, None])["agreement"] is None


def test_length_ratio():
    pairs = [
        {"chosen_chars": 300, "rejected_chars": 100},
        {"chosen_chars": 100, "rejected_chars": 100},
    ]
    r = length_ratio(pairs)
    assert r["length_ratio"] == pytest.approx(200 / 100)
    assert r["chosen_longer"] == 0.5
    assert length_ratio([])["length_ratio"] is None


def test_pair_statistics():
    pairs = [
        {"method": "sr", "margin": 2.0, "chosen_chars": 10, "rejected_chars": 5, "seen_before": 0},
        {"method": "sr", "margin": 1.0, "chosen_chars": 10, "rejected_chars": 5, "seen_before": 1},
        {
            "method": "rlcd",
            "margin": None,
            "chosen_chars": 4,
            "rejected_chars": 8,
            "seen_before": 0,
        },
    ]
    stats = pair_statistics(
        RoundLabels(
            pairs,
            ties={"sr": 2, "cai": 1},
            judge_counts={"sr": (10, 3)},
            judge_variance={"sr": 0.25},
        )
    )
    sr = {k: v for k, (v, _) in stats["sr"].items()}
    assert sr["pairs"] == 2
    assert sr["tie_rate"] == pytest.approx(2 / 4)
    assert sr["parse_failure_rate"] == pytest.approx(0.3)
    assert sr["mean_margin"] == pytest.approx(1.5)
    assert sr["judge_variance"] == 0.25
    assert sr["length_ratio"] == pytest.approx(2.0)
    assert sr["duplicate_prompt_rate"] == 0.5
    rlcd = {k: v for k, (v, _) in stats["rlcd"].items()}
    assert rlcd["length_ratio"] == 0.5 and rlcd["mean_margin"] is None
    assert rlcd["parse_failure_rate"] is None  # nothing was asked
    # A method that formed no pair still shows its ties.
    assert stats["cai"]["tie_rate"][0] == 1.0 and stats["cai"]["pairs"][0] == 0


def test_training_metrics():
    metrics = {
        "heldout_reward_accuracy": 0.75,
        "heldout_reward_accuracy_before": 0.5,
        "heldout_reward_margin": 0.1,
        "heldout_pairs": 4,
    }
    out = training_metrics(TRAINING_KINDS["dpo"].metrics, metrics)
    assert out["implicit_reward_accuracy"] == (0.75, {"before": 0.5, "pairs": 4, "examples": None})
    assert out["implicit_reward_margin"][0] == 0.1
    rm = TRAINING_KINDS["rm"].metrics
    assert training_metrics(rm, {"heldout_pairwise_accuracy": 0.6, "heldout_pairs": 2}) == {
        "rm_pairwise_accuracy": (0.6, {"before": None, "pairs": 2, "examples": None})
    }


@pytest.mark.slow
def test_compare_models_on_the_tiny_model(tiny_engine, ctx, library):
    """Both orders asked for every differing answer; identical answers are ties unasked."""
    cfg = EvaluationConfig(sampling={"max_tokens": 8})
    prompts = [Prompt.user("Name a colour."), Prompt.user("Name a fruit.")]
    old = heldout_answers(tiny_engine, prompts, ctx, "old@1", cfg)["generations"]
    assert [g["model_id"] for g in old] == ["old@1", "old@1"]
    old_by = {g["prompt_id"]: g for g in old}
    new_by = {
        p.prompt_id: {**old_by[p.prompt_id], "generation_id": "n" + p.prompt_id[:4]}
        for p in prompts
    }
    new_by[prompts[0].prompt_id]["text"] = "Blue."
    new_by[prompts[0].prompt_id]["model_id"] = "new@2"
    rows = compare_models(
        tiny_engine, library.get("judge_pairwise"), prompts, old_by, new_by, ctx, "judge@0", cfg
    )
    orders = [json.loads(c["meta_json"])["order"] for c in rows["comparisons"]]
    assert orders == ["new_first", "old_first"]
    assert all(0.0 <= c["prob_a"] <= 1.0 for c in rows["comparisons"])
    [win] = [e for e in rows["evaluations"] if e["metric"] == "win_rate"]
    details = json.loads(win["details_json"])
    assert details["identical"] == 1 and details["prompts"] == 2
    assert details["wins"] + details["losses"] + details["ties"] == 4
    assert 0.0 <= win["value"] <= 1.0


@pytest.mark.slow
def test_relabel_pairs_on_the_tiny_model(tiny_engine, ctx, library):
    prompt = Prompt.user("Say hi.")
    base = {
        "prompt_id": prompt.prompt_id,
        "prompt": prompt.text,
        "messages_json": json.dumps(prompt.conversation),
        "chosen_finish_reason": "stop",
        "rejected_finish_reason": "stop",
    }
    pairs = [
        {
            **base,
            "pair_id": "p1",
            "method": "rlcd",
            "variant": "contrast",
            "chosen_generation_id": "c1",
            "rejected_generation_id": "r1",
            "chosen": "Hi there!",
            "rejected": "Go away.",
        },
        {
            **base,
            "pair_id": "p2",
            "method": "self_reward",
            "variant": "best_worst",
            "chosen_generation_id": "c2",
            "rejected_generation_id": "r2",
            "chosen": "Hello!",
            "rejected": "No.",
        },
    ]
    template = library.get("judge_additive_5pt_prefilled")
    judge = TemplateJudge(TemplateJudgeConfig(), template, tiny_engine, ctx.model_id)
    rows = relabel_pairs(
        tiny_engine,
        judge,
        "self_reward",
        library.get("judge_pairwise"),
        pairs,
        ctx,
        EvaluationConfig(),
    )
    metrics = {(e["metric"], e["method"]) for e in rows["evaluations"]}
    # The self-judge does not re-label Self-Rewarding's own pairs; the pairwise judge does.
    assert metrics == {
        ("agreement_self_judge", "rlcd"),
        ("agreement_pairwise", "rlcd"),
        ("agreement_pairwise", "self_reward"),
    }
    assert {j["generation_id"] for j in rows["judgments"]} == {"c1", "r1"}
    assert {j["method"] for j in rows["judgments"]} == {"evaluation"}
    assert len(rows["comparisons"]) == 4  # two pairs, both orders
