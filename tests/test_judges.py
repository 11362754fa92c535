"""Judge kinds behind one interface: prefilled template scales of any size (multi-token
labels) on every engine, reward models, rule functions; the loop scoring with the reward
model it trained; re-judging a stored round and comparing judges."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import QUICK, TESTS, prefloop, tiny_config

from pipeline.engines.scorer import RewardScorer
from pipeline.errors import PrefloopError, TemplateError
from pipeline.judging import JUDGES, JudgeItem, build_judge, judge_candidates, load_judge
from pipeline.judging.checklist import requirements
from pipeline.judging.compare import compare_scores, kendall_tau_b
from pipeline.judging.pairs import PairPolicy, Scored, select_pair
from pipeline.methods.self_reward import SelfRewardConfig, run_self_reward
from pipeline.preflight import check_labels
from pipeline.schema import EngineConfig
from pipeline.seeds import load_prompts
from pipeline.store import Store
from pipeline.templates import TemplateLibrary

ITEMS = [
    JudgeItem("Name a fruit.", "An apple.", [{"role": "user", "content": "Name a fruit."}]),
    JudgeItem("What is 2+2?", "It is 4, of course.", [{"role": "user", "content": "What is 2+2?"}]),
]


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory, tiny_model_dir):
    """A tiny random LlamaForSequenceClassification (one output) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-rm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig.from_pretrained(tiny_model_dir, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def template_judge(name: str, engine):
    library = TemplateLibrary([TESTS / "data"])
    settings = JUDGES["template"].config(template=name)
    return build_judge(settings, load_judge(settings, library), engine, "tiny@0")


# -- prefilled scales ----------------------------------------------------------------------


@pytest.mark.slow
def test_continuation_probs_are_products_of_token_probabilities(hf_engine):
    """P(label) is the product of its tokens' probabilities after the prefix, normalised
    over the labels: checked against one plain forward pass per label."""
    conversation = [{"role": "user", "content": "Rate it."}]
    labels = ["7]]", "10]]", "100]]"]
    [probs] = hf_engine.continuation_probs([conversation], labels, "Rating: [[")
    prompt = hf_engine.encode(hf_engine.render(conversation, "Rating: [["))
    totals = []
    for label in labels:
        ids = hf_engine.encode(hf_engine.render(conversation, "Rating: [[") + label)
        with torch.no_grad():
            logits = hf_engine.model(torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        totals.append(sum(logp[k - 1, ids[k]].item() for k in range(len(prompt), len(ids))))
    expected = [math.exp(t) / sum(math.exp(u) for u in totals) for t in totals]
    assert probs == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_single_token_scale_reads_as_before(hf_engine):
    """The shipped 0-5 prefilled judge: one reading of the next token after the prefix,
    the softmax of the labels' logits (one call, no trie)."""
    conversation = [{"role": "user", "content": "Rate it."}]
    labels = [str(i) for i in range(6)]
    requests = hf_engine.counter.requests
    [probs] = hf_engine.continuation_probs([conversation], labels, "Score: ")
    assert hf_engine.counter.requests - requests == 1
    text = hf_engine.render(conversation, "Score: ")
    ids = hf_engine.encode(text)
    label_ids = [hf_engine.encode(text + label)[-1] for label in labels]
    with torch.no_grad():
        logits = hf_engine.model(torch.tensor([ids])).logits[0, -1].float()
    expected = torch.softmax(logits[label_ids], dim=-1).tolist()
    assert probs == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("template", "low", "high"),
    [("judge_score_10_prefilled", 1, 10), ("judge_percent_prefilled", 0, 100)],
)
@pytest.mark.slow
def test_prefilled_scales_agree_across_engines(hf_engine, vllm_engine, template, low, high):
    """A 1-10 and a 0-100 prefilled scale (multi-token labels): scores inside the declared
    range, the same on transformers and vLLM within 1e-3."""
    got = {}
    for name, engine in (("hf", hf_engine), ("vllm", vllm_engine)):
        samples = template_judge(template, engine).score(ITEMS)
        got[name] = [s[0].score for s in samples]
        for [sample] in samples:
            assert sample.status == "ok" and low <= sample.score <= high
            probs = json.loads(sample.raw)["probs"]
            assert len(probs) == high - low + 1 and sum(probs.values()) == pytest.approx(1, 1e-4)
    assert got["hf"] == pytest.approx(got["vllm"], abs=1e-3)


@pytest.mark.slow
def test_unreadable_labels_are_named_in_the_preflight(default_model_dir):
    """0-100 with nothing closing the score: "1" is the start of "10" in SmolLM2's
    tokenizer. The check needs only the tokenizer and names the template and the label."""
    library = TemplateLibrary([TESTS / "data"])
    with pytest.raises(TemplateError) as e:
        check_labels(library.get("judge_percent_unreadable"), str(default_model_dir))
    assert "judge_percent_unreadable.j2: label '1' reads as the start of label '10'" in str(e.value)
    check_labels(library.get("judge_percent_prefilled"), str(default_model_dir))
    check_labels(library.get("judge_score_10_prefilled"), str(default_model_dir))


# -- reward models -------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_model_scores_as_a_plain_forward(tiny_rm_dir):
    """Batched, padded scoring equals one unpadded forward per text through the RM's chat
    template; a text over max_model_len gets no score instead of failing the batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    conversations = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Explain gravity to a child in a few sentences."},
            {"role": "assistant", "content": "Things pull on each other; Earth pulls hardest."},
        ],
        [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}],
    ]
    cfg = EngineConfig(kind="hf", max_model_len=256, batch_size=2)
    with RewardScorer.start(tiny_rm_dir, cfg, seed=0) as scorer:
        scores = scorer.score(conversations)
    assert scores[2] is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    for conversation, score in zip(conversations[:2], scores[:2], strict=True):
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)
        with torch.no_grad():
            plain = model(torch.tensor([ids["input_ids"]])).logits[0, 0].item()
        assert score == pytest.approx(plain, abs=1e-4)


@pytest.mark.slow
def test_a_causal_lm_is_not_a_reward_model(tiny_model_dir):
    with pytest.raises(PrefloopError, match="not a reward model"):
        load_judge(JUDGES["reward_model"].config(model=str(tiny_model_dir)), TemplateLibrary())


@pytest.mark.slow
def test_reward_model_judge_in_self_rewarding(tiny_engine, tiny_rm_dir, ctx):
    settings = JUDGES["reward_model"].config(model=str(tiny_rm_dir))
    loaded = load_judge(settings, TemplateLibrary())
    cfg = SelfRewardConfig(n_candidates=3, sampling={"max_tokens": 8, "temperature": 1.0})
    prompts = load_prompts(Path("data/prompts/helpful.jsonl"))[:3]
    with RewardScorer.start(tiny_rm_dir, EngineConfig(kind="hf"), seed=0) as scorer:
        judge = build_judge(settings, loaded, scorer, "tiny-rm@1")
        rows = run_self_reward(tiny_engine, judge, prompts, ctx, cfg)
    judged = rows["judgments"]
    assert judged and {j["judge_id"] for j in judged} == {"tiny-rm@1"}
    assert all(j["template_id"] is None and j["raw_output"] is None for j in judged)
    assert all(isinstance(j["score"], float) for j in judged)
    assert rows["pairs"]  # random rewards are never tied


# -- checklist -----------------------------------------------------------------------------


def test_checklist_requirements_are_the_requests_sentences():
    request = (
        'Describe a rainy day. Finish with the exact phrase "That is all for today." '
        "Add a postscript starting with P.S. Use exactly 2 bullet points, such as:\n"
        "* This is a point."
    )
    assert requirements(request) == [
        "Describe a rainy day.",
        'Finish with the exact phrase "That is all for today."',
        "Add a postscript starting with P.S.",
        "Use exactly 2 bullet points, such as:\n* This is a point.",
    ]
    assert requirements("Why is the sky blue?") == ["Why is the sky blue?"]
    assert requirements("Tell me about X. Sign off with a P.S. line.") == [
        "Tell me about X.",
        "Sign off with a P.S. line.",
    ]


def test_checklist_template_must_read_yes_or_no():
    settings = JUDGES["checklist"].config(template="judge_additive_5pt_prefilled")
    with pytest.raises(TemplateError, match=r"judge_additive_5pt_prefilled.j2: parser: .*0, max 1"):
        load_judge(settings, TemplateLibrary())


@pytest.mark.slow
def test_checklist_judge_reads_each_requirement_and_combines(hf_engine, ctx):
    library = TemplateLibrary()
    items = [
        JudgeItem(
            "Describe rain. Answer in lowercase. Do not use commas.",
            "rain falls from clouds.",
            [{"role": "user", "content": "Describe rain."}],
        ),
        ITEMS[0],
    ]
    scores = {}
    for combine in ("mean", "min", "product"):
        settings = JUDGES["checklist"].config(combine=combine)
        judge = build_judge(settings, load_judge(settings, library), hf_engine, "tiny@0")
        assert judge.judge_id.endswith(f"|checklist:{combine}")
        samples = judge.score(items)
        assert [len(s) for s in samples] == [1, 1]
        readings = [json.loads(s[0].raw) for s in samples]
        assert [len(r) for r in readings] == [3, 1]  # one question per sentence
        assert readings[0][1]["requirement"] == "Answer in lowercase."
        yes = [[r["yes"] for r in read] for read in readings]
        assert all(0.0 < y < 1.0 for ys in yes for y in ys)
        scores[combine] = [s[0].score for s in samples]
        assert all(s[0].status == "ok" for s in samples)
    assert scores["mean"][0] == pytest.approx(sum(yes[0]) / 3, abs=1e-5)
    assert scores["min"][0] == pytest.approx(min(yes[0]), abs=1e-5)
    assert scores["product"][0] == pytest.approx(math.prod(yes[0]), abs=1e-5)
    assert scores["mean"][1] == scores["min"][1] == pytest.approx(yes[1][0], abs=1e-5)
    # In Self-Rewarding: its judgments carry its id; the template is stored with them.
    settings = JUDGES["checklist"].config()
    judge = build_judge(settings, load_judge(settings, library), hf_engine, "tiny@0")
    cfg = SelfRewardConfig(n_candidates=2, sampling={"max_tokens": 8, "temperature": 1.0})
    prompts = load_prompts(Path("data/prompts/verifiable_train.jsonl"))[:2]
    rows = run_self_reward(hf_engine, judge, prompts, ctx, cfg)
    assert {j["judge_id"] for j in rows["judgments"]} == {judge.judge_id}
    assert {t["name"] for t in rows["templates"]} == {"judge_checklist_prefilled"}


# -- functions -----------------------------------------------------------------------------


def test_function_judge(ctx):
    settings = JUDGES["function"].config(function="judge_rules:has_digit")
    judge = build_judge(settings, load_judge(settings, TemplateLibrary()), None, None)
    assert judge.judge_id.startswith("judge_rules:has_digit@") and judge.model_id is None
    assert [s[0].score for s in judge.score(ITEMS)] == [0.0, 1.0]
    none = JUDGES["function"].config(function="judge_rules:undecided")
    [[sample]] = build_judge(none, load_judge(none, None), None, None).score(ITEMS[:1])
    assert sample.score is None and sample.status == "no_score"
    wrong = JUDGES["function"].config(function="judge_rules:wrong_type")
    with pytest.raises(PrefloopError, match="judge_rules:wrong_type: returned str"):
        build_judge(wrong, load_judge(wrong, None), None, None).score(ITEMS[:1])
    # A changed rule is another judge: the id carries the code's hash.
    other = JUDGES["function"].config(function="judge_rules:word_count")
    assert build_judge(other, load_judge(other, None), None, None).judge_id != judge.judge_id
    candidates = [
        {"generation_id": "g1", "prompt_id": p, "text": "4", "finish_reason": "stop"}
        for p in [load_prompts(Path("data/prompts/helpful.jsonl"))[0].prompt_id]
    ]
    prompts = load_prompts(Path("data/prompts/helpful.jsonl"))[:1]
    [row] = judge_candidates(judge, prompts, candidates, ctx, "self_reward")["judgments"]
    assert row["judge_id"] == judge.judge_id and row["score"] == 1.0


# -- pair strategies -----------------------------------------------------------------------


def _s(gid, score, length=10):
    return Scored(gid, (score,), length)


def test_best_vs_random_rejects_a_lower_scored_answer():
    import random

    cands = [_s("a", 5), _s("b", 1), _s("c", 3), _s("d", 5)]
    seen = set()
    for seed in range(20):
        sel = select_pair(cands, PairPolicy(strategy="best_vs_random"), random.Random(seed))
        assert sel.chosen.generation_id == "a" and sel.rejected.generation_id in {"b", "c"}
        seen.add(sel.rejected.generation_id)
    assert seen == {"b", "c"}  # a random other, not always the worst


def test_length_penalised_pairs():
    """score - 0.1 * tokens: a long 5 (5 - 8 = -3) loses to a short 4 (4 - 0.5 = 3.5)."""
    cands = [_s("long5", 5, 80), _s("short4", 4, 5), _s("mid2", 2, 20)]
    sel = select_pair(cands, PairPolicy(strategy="length_penalised", length_penalty=0.1))
    assert (sel.chosen.generation_id, sel.rejected.generation_id) == ("short4", "long5")
    assert sel.margin == pytest.approx(3.5 - (-3.0))
    plain = select_pair(cands, PairPolicy())
    assert (plain.chosen.generation_id, plain.rejected.generation_id) == ("long5", "mid2")


# -- comparing judges ----------------------------------------------------------------------


def test_kendall_tau_b():
    assert kendall_tau_b([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    # x = 1,2,2 ; y = 1,2,3: C = 2, D = 0, ties in x = 1 -> 2 / sqrt(2 * 3)
    assert kendall_tau_b([1, 2, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))


def test_compare_scores_by_hand():
    """Prompt p: a orders (g1 > g2 > g3), b orders (g1 > g3 > g2): of 3 candidate pairs 2
    agree; tau = 1/3; same best, different worst. Prompt q: g5 has no score from b."""
    cands = [
        {"generation_id": g, "prompt_id": p}
        for g, p in [("g1", "p"), ("g2", "p"), ("g3", "p"), ("g4", "q"), ("g5", "q")]
    ]
    a = {"g1": 3.0, "g2": 2.0, "g3": 1.0, "g4": 1.0, "g5": 2.0}
    b = {"g1": 9.0, "g2": 1.0, "g3": 5.0, "g4": 1.0, "g5": None}
    samples_a = {g: (1, 1) for g in a}
    samples_b = {**{g: (1, 1) for g in b}, "g5": (0, 1)}
    result = compare_scores(cands, a, b, samples_a, samples_b)
    assert result["prompts"] == 1 and result["candidate_pairs"] == 3
    assert result["pair_agreement"] == pytest.approx(2 / 3)
    assert result["kendall_tau"] == pytest.approx(1 / 3)
    assert (result["same_best"], result["same_worst"]) == (1.0, 0.0)
    assert result["a"]["parse_failure_rate"] == 0
    assert result["b"]["parse_failure_rate"] == pytest.approx(0.2)
    assert result["b"]["scores"]["n"] == 4 and result["b"]["scores"]["max"] == 9.0


# -- the loop and the CLI ------------------------------------------------------------------


def tiny_loop(tmp_path: Path, model: Path, **over) -> dict:
    """One quick round: Self-Rewarding alone, scored by a rule, nothing trained."""
    base = {**QUICK, "name": "judges", "rounds": 1}
    base.update(rlcd={"enabled": False}, training={"steps": []})
    return tiny_config(tmp_path, model, **{**base, **over})


@pytest.mark.slow
def test_the_loop_scores_with_the_reward_model_it_trained(harness, tmp_path, tiny_model_dir):
    """Round 1: no reward model yet, so the fallback (a rule) judges, and `training.kind:
    rm` trains one. Round 2: the candidates are scored by round 1's reward model."""
    from flows.loop import loop_flow

    sr = tiny_loop(tmp_path, tiny_model_dir)["self_reward"]
    sr["judge"] = {"kind": "reward_model", "model": "latest", "fallback": sr["judge"]}
    training = {"steps": ["rm"], "epochs": 1, "batch_size": 2, "max_length": 128}
    cfg = tiny_loop(tmp_path, tiny_model_dir, rounds=2, self_reward=sr, training=training)
    loop_flow(cfg)
    with Store(cfg["db_path"], read_only=True) as store:
        rms = store.query("SELECT model_id, round FROM models WHERE kind = 'reward' ORDER BY round")
        assert [r["round"] for r in rms] == [1, 2]  # each round trains one
        rm = rms[0]
        judges = {
            r["round"]: r["judge_id"]
            for r in store.query("SELECT DISTINCT round, judge_id FROM judgments")
        }
        assert judges[1].startswith("judge_rules:word_count@")
        assert judges[2] == rm["model_id"]
        [(n2,)] = store.sql("SELECT count(*) FROM pairs WHERE round = 2")[1]
        assert n2 > 0
        policies = {
            r["round"]: json.loads(r["pair_policy_json"])["self_reward"]["judge_used"]
            for r in store.query("SELECT round, pair_policy_json FROM rounds")
        }
        assert policies[1] == {"kind": "function", "model_id": None}
        assert policies[2] == {"kind": "reward_model", "model_id": rm["model_id"]}


def test_a_rejudge_names_the_checklist_judge_and_its_combine():
    from pipeline.rejudge import judge_settings_from

    assert judge_settings_from("checklist").combine == "mean"
    settings = judge_settings_from("checklist:product", model="m")
    assert (settings.kind, settings.combine, settings.model) == ("checklist", "product", "m")
    with pytest.raises(PrefloopError, match=r"--judge checklist:max: combine must be one of"):
        judge_settings_from("checklist:max")
    assert judge_settings_from("pipeline.verifiable.judge:score").kind == "function"


@pytest.mark.slow
def test_rejudge_a_finished_round(harness, tmp_path, tiny_model_dir, tiny_rm_dir):
    """`prefloop judge` scores a finished round's stored candidates with another judge
    (a prefilled template, a reward model) without generating; a second call adds
    nothing; the judge's pairs are a variant next to the pairs the round trained on; the
    comparison lands in `evaluations`."""
    from flows.loop import loop_flow

    cfg = tiny_loop(tmp_path, tiny_model_dir)
    loop_flow(cfg)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(cfg))

    def counts():
        with Store(cfg["db_path"], read_only=True) as store:
            return {
                t: store.sql(f"SELECT count(*) FROM {t}")[1][0][0]
                for t in ("generations", "judgments", "pairs")
            }

    before = counts()
    template = str(TESTS / "data" / "judge_percent_prefilled.j2")
    out = prefloop("judge", "--config", str(config), "--round", "1", "--judge", template)
    assert out.returncode == 0, out.stderr[-3000:]
    after = counts()
    assert after["generations"] == before["generations"] and after["pairs"] == before["pairs"]
    assert after["judgments"] == 2 * before["judgments"]  # one reading per candidate, as the rule
    assert "judge_pair_agreement" not in out.stderr and "pair_agreement" in out.stdout

    again = prefloop("judge", "--config", str(config), "--round", "1", "--judge", template)
    assert again.returncode == 0 and "0 judgments added" in again.stdout, again.stdout
    assert counts() == after

    rm = prefloop("judge", "--config", str(config), "--round", "1", "--judge", str(tiny_rm_dir))
    assert rm.returncode == 0, rm.stderr[-3000:]
    assert counts()["judgments"] == 3 * before["judgments"]
    checklist = prefloop(
        "judge", "--config", str(config), "--round", "1", "--judge", "checklist:min"
    )
    assert checklist.returncode == 0, checklist.stderr[-3000:]
    assert "|checklist:min" in checklist.stdout and "pair_agreement" in checklist.stdout
    assert counts()["judgments"] == 4 * before["judgments"]

    with Store(cfg["db_path"], read_only=True) as store:
        judges = store.query(
            "SELECT judge_id, count(*) AS n, min(score) AS lo, max(score) AS hi "
            "FROM judgments GROUP BY judge_id ORDER BY judge_id"
        )
        assert len(judges) == 4
        [percent] = [j for j in judges if j["judge_id"].startswith("judge_percent_prefilled@")]
        assert 0 <= percent["lo"] <= percent["hi"] <= 100
        metrics = {
            r["metric"]
            for r in store.query("SELECT metric FROM evaluations WHERE metric LIKE 'judge_%'")
        }
        assert metrics >= {
            "judge_pair_agreement",
            "judge_kendall_tau",
            "judge_same_best",
            "judge_same_worst",
            "judge_parse_failure_rate",
        }
        [(rows,)] = store.sql(
            "SELECT count(*) FROM candidate_scores WHERE judge_id LIKE 'judge_percent%'"
        )[1]
        assert rows == before["judgments"]
        percent_id = percent["judge_id"]

    pairs = prefloop("pairs", "--config", str(config), "--round", "1", "--judge", percent_id)
    assert pairs.returncode == 0, pairs.stderr[-2000:]
    assert f"self_reward/best_vs_worst/judge={percent_id}" in pairs.stdout
    export = prefloop(
        "export", "--config", str(config), "--round", "1", "--judge", template,
        "--out", str(tmp_path / "ex"), "--format", "jsonl",
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    from datasets import load_dataset

    data = load_dataset(str(tmp_path / "ex"))
    assert {f"best_vs_worst/judge={percent_id}"} == set(data["train"]["variant"])
    with Store(cfg["db_path"], read_only=True) as store:
        assert counts() == {**after, "judgments": 4 * before["judgments"]}
        assert store.sql("SELECT DISTINCT variant FROM pairs")[1] == [("best_vs_worst",)]

    from pipeline.report import write_report

    page = write_report(cfg["db_path"], "judges", tmp_path / "report.html").read_text()
    assert 'id="judges"' in page and percent_id in page


@pytest.mark.slow
def test_default_model_end_to_end(harness, tmp_path, default_model_dir):
    """SmolLM2 on transformers: a round judged by the 1-10 prefilled template (scores in
    1..10, multi-token "10]]"), then re-judged with the shipped 0-5 prefilled judge and
    compared: no generation, judgments under the new judge, a comparison stored."""
    from flows.loop import loop_flow

    sr = tiny_loop(tmp_path, default_model_dir)["self_reward"]
    sr["judge"] = {"kind": "template", "template": "judge_score_10_prefilled"}
    sr["sampling"]["max_tokens"] = 32
    cfg = tiny_loop(
        tmp_path, default_model_dir, self_reward=sr, prompts={
            "files": ["data/prompts/helpful.jsonl"], "per_round": 3,
        },
    )  # fmt: skip
    loop_flow(cfg)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(cfg))
    out = prefloop(
        "judge", "--config", str(config), "--round", "1", "--judge", "judge_additive_5pt_prefilled"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with Store(cfg["db_path"], read_only=True) as store:
        rows = store.query(
            "SELECT split_part(judge_id, '@', 1) AS judge, count(*) AS n, min(score) AS lo, "
            "max(score) AS hi FROM judgments GROUP BY ALL ORDER BY judge"
        )
        assert [r["judge"] for r in rows] == [
            "judge_additive_5pt_prefilled",
            "judge_score_10_prefilled",
        ]
        five, ten = rows
        assert five["n"] == ten["n"] == 9
        assert 0 <= five["lo"] <= five["hi"] <= 5 and 1 <= ten["lo"] <= ten["hi"] <= 10
        [(generations,)] = store.sql("SELECT count(*) FROM generations")[1]
        assert generations == 9
        [tau] = store.query("SELECT value FROM evaluations WHERE metric = 'judge_kendall_tau'")
        assert tau["value"] is None or -1 <= tau["value"] <= 1
