"""Verifiable instructions: every checker accepts a compliant answer and rejects a
violating one, strictly and loosely; the loose reading forgives a preamble, a sign-off
and markdown emphasis, as IFEval's does; the prompt set is reproducible and splits by a
fixed seed; the judge function scores by the checks; the yardstick counts prompts,
instructions and kinds of instruction."""

import json
from itertools import combinations
from pathlib import Path

import pytest
from helpers import tiny_config

from pipeline.evaluation.yardstick import accuracy, wilson
from pipeline.paths import REPO_ROOT
from pipeline.recipes import sql_recipes
from pipeline.verifiable import prompts
from pipeline.verifiable.checks import CHECKS, check, follows, kind, on_topic, topic_words
from pipeline.verifiable.judge import score, score_on_topic, strict

PREAMBLE = "Sure! Here is my answer:\n"
SIGNOFF = "\nHope This Helps, Friend!"

# type: (spec, compliant, violating, compliant only after a preamble or sign-off is cut)
CASES = {
    "word_count": (
        {"type": "word_count", "max": 5},
        "Bees make honey from nectar.",
        "Bees make honey from the nectar of flowers.",
        "Bees make honey.\nThat is all I will say about bees.",
    ),
    "word_count_min": (
        {"type": "word_count", "min": 6},
        "Bees make honey from flower nectar daily.",
        "Bees make honey.",
        None,
    ),
    "bullet_count": (
        {"type": "bullet_count", "n": 2},
        "* first point\n* second point",
        "* first point\nand nothing more",
        "Here you go:\n* first point\n* second point\n* a stray third",
    ),
    "lowercase": (
        {"type": "lowercase"},
        "bees make honey from nectar.",
        "Bees make honey from nectar.",
        PREAMBLE + "bees make honey from nectar.",
    ),
    "uppercase": (
        {"type": "uppercase"},
        "BEES MAKE HONEY.",
        "BEES make honey.",
        PREAMBLE + "BEES MAKE HONEY.",
    ),
    "no_commas": (
        {"type": "no_commas"},
        "Bees make honey and wax.",
        "Bees make honey, wax and more.",
        "Well, here it is.\nBees make honey and wax.",
    ),
    "keywords": (
        {"type": "keywords", "words": ["quiet", "simple"]},
        "A Quiet life is a simple one.",
        "A quiet life is an easy one.",
        None,
    ),
    "forbidden_words": (
        {"type": "forbidden_words", "words": ["very", "nice"]},
        "It was a pleasant day.",
        "It was a very pleasant day.",
        "It was a pleasant day.\nVery nice of you to ask!",
    ),
    "ending": (
        {"type": "ending", "phrase": "Thank you."},
        "Bees make honey. Thank you.",
        "Thank you. Bees make honey.",
        "Bees make honey. Thank you." + SIGNOFF,
    ),
    "starts_with": (
        {"type": "starts_with", "word": "Imagine"},
        "Imagine a hive full of bees.",
        "Picture a hive full of bees.",
        PREAMBLE + "Imagine a hive full of bees.",
    ),
    "title": (
        {"type": "title"},
        "<<The Busy Hive>>\nBees make honey.",
        "The Busy Hive\nBees make honey.",
        None,
    ),
    "paragraphs": (
        {"type": "paragraphs", "n": 2},
        "Bees make honey.\n\nThey also make wax.",
        "Bees make honey. They also make wax.",
        "Bees make honey.\n\nThey also make wax.\n\nBye.",
    ),
    "json_format": (
        {"type": "json_format"},
        '```json\n{"insect": "bee", "makes": ["honey", "wax"]}\n```',
        'The insect is a bee: {"makes": "honey"}',
        PREAMBLE + '{"insect": "bee"}',
    ),
    "ascii_only": (
        {"type": "ascii_only"},
        "Bees make honey.",
        "Bees make honey \u2014 caf\u00e9 style \U0001f41d",
        "Bees make honey.\n\U0001f41d",
    ),
    "quotation": (
        {"type": "quotation"},
        '"Bees make honey."',
        "Bees make honey.",
        PREAMBLE + '"Bees make honey."',
    ),
    "postscript": (
        {"type": "postscript", "marker": "P.S."},
        "Bees make honey.\nP.S. They also dance.",
        "Bees make honey. They also dance.",
        None,
    ),
    "placeholders": (
        {"type": "placeholders", "n": 2},
        "Dear [name], the hive at [address] is ready.",
        "Dear [name], the hive is ready.",
        None,
    ),
    "highlights": (
        {"type": "highlights", "n": 1},
        "Bees make *honey* from nectar.",
        "Bees make honey from nectar.",
        None,
    ),
}


def test_every_type_has_a_case():
    assert {spec["type"] for spec, *_ in CASES.values()} == set(CHECKS)
    assert len(CHECKS) >= 12


@pytest.mark.parametrize("name", sorted(CASES))
def test_checker_accepts_compliant_and_rejects_violating(name):
    spec, good, bad, loose_only = CASES[name]
    for loose in (False, True):
        assert check(good, spec, loose), (name, loose, good)
        assert not check(bad, spec, loose), (name, loose, bad)
    if loose_only is not None:
        assert not check(loose_only, spec), (name, "strict should refuse", loose_only)
        assert check(loose_only, spec, loose=True), (name, "loose should accept", loose_only)


def test_loose_forgives_markdown_emphasis_and_follows_lists():
    spec = {"type": "starts_with", "word": "Imagine"}
    assert not check("**Note:**\nImagine this.", spec) and check(
        "**Note:**\nImagine this.", spec, True
    )
    assert follows("bees, honey", [{"type": "lowercase"}, {"type": "no_commas"}]) == [True, False]


def test_yardstick_counts_prompts_instructions_and_kinds():
    at_most, at_least = {"type": "word_count", "max": 3}, {"type": "word_count", "min": 3}
    assert [kind(at_most), kind(at_least), kind({"type": "word_count", "min": 1, "max": 9})] == [
        "word_count_max",
        "word_count_min",
        "word_count_range",
    ]
    assert kind({"type": "lowercase"}) == "lowercase"
    assert kind({"type": "word_count"}) == "word_count"
    specs = [[at_most, {"type": "lowercase"}], [at_least], [at_least, {"type": "no_commas"}]]
    answers = ["bees hum", "Bees hum.", "*Bees, they hum softly*"]
    got = accuracy(answers, specs)
    # strict: prompt 1 follows both, prompt 2 is too short, prompt 3 has a comma
    value, details = got["ifeval_prompt_strict"]
    assert (details["followed"], details["n"]) == (1, 3) and value == 1 / 3
    assert details["ci95"] == [round(b, 4) for b in wilson(1, 3)]
    value, details = got["ifeval_instruction_strict"]
    assert (details["followed"], details["n"]) == (3, 5)
    assert details["per_kind"] == {
        "lowercase": [1, 1],
        "no_commas": [0, 1],
        "word_count_max": [1, 1],
        "word_count_min": [1, 2],
    }
    # loose cuts nothing that adds a word or removes the comma
    assert got["ifeval_prompt_loose"][1]["followed"] == 1
    assert "ifeval_on_topic" not in got  # no topics given
    topics = ["how bees make honey", "the water cycle", "how bees make honey"]
    got = accuracy(answers, specs, topics)
    # answers 1 and 3 mention bees, answer 2 is off topic; only answer 1 is also strict
    assert got["ifeval_on_topic"][1]["followed"] == 2
    assert got["ifeval_prompt_strict_on_topic"][1]["followed"] == 1
    assert "ifeval_on_topic" not in accuracy(answers, specs, [*topics[:2], None])
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35 and wilson(0, 0) == (0.0, 1.0)


def test_on_topic_needs_a_word_of_the_topic_in_any_form():
    assert topic_words("how vaccines work") == ["vaccines"]
    assert topic_words("starting a vegetable garden") == ["vegetable", "garden"]
    assert on_topic("A vaccine trains the body.", "how vaccines work")
    assert on_topic("Gardens need sun.", "starting a vegetable garden")
    assert on_topic("BEES!", "how bees make honey")
    assert not on_topic("Start with soil.", "starting a vegetable garden")  # not topical
    assert not on_topic("* This is a point.\n* This is a point.", "why the ocean is salty")
    assert not on_topic("Honeycomb", "how bees make honey")  # a whole word, not a prefix
    for row in prompts.build():  # every shipped topic has a word that says what it is
        assert row["topic"] in row["prompt"] and topic_words(row["topic"])


def test_prompt_set_is_reproducible_and_split_by_a_fixed_seed():
    rows = prompts.build()
    assert len(rows) >= 400 and len({r["prompt"] for r in rows}) == len(rows)
    assert rows == prompts.build()  # the seed fixes it
    types = [s["type"] for r in rows for s in r["checks"]]
    assert set(types) == set(CHECKS) and min(types.count(t) for t in CHECKS) >= 20
    assert sum(len(r["checks"]) == 2 for r in rows) >= 100  # some combine two
    for r in rows:
        if len(r["checks"]) == 2:
            pair = frozenset(s["type"] for s in r["checks"])
            assert pair not in prompts.CONFLICTS and len(pair) == 2
    # The shipped files are exactly the generator's output, split by the fixed seed.
    shipped = {
        path: [json.loads(line) for line in path.read_text().splitlines()]
        for path in (prompts.TRAIN_FILE, prompts.HELDOUT_FILE)
    }
    train, held = shipped[prompts.TRAIN_FILE], shipped[prompts.HELDOUT_FILE]
    assert sorted(train + held, key=lambda r: r["prompt"]) == sorted(
        rows, key=lambda r: r["prompt"]
    )
    assert all(prompts.is_heldout(r["prompt"]) for r in held)
    assert not any(prompts.is_heldout(r["prompt"]) for r in train)
    assert 250 <= len(held) <= 400


def _wording_items(w: dict) -> set[str]:
    """Every topic, request form, listed word and instruction phrasing of a wording file."""
    lists = [w[k] for k in ("topics", "requests", "keywords", "forbidden_words", "endings")]
    items = {x.lower() for xs in [*lists, w["first_words"]] for x in xs}
    return items | {v.lower() for v in w["instructions"].values()}


def test_unseen_split_shares_no_wording_with_training_and_is_reproducible():
    unseen = prompts.wording(prompts.UNSEEN_WORDING)
    for path in (prompts.WORDING, prompts.MORE_WORDING):  # both wordings that train
        seen = prompts.wording(path)
        assert set(seen["instructions"]) == set(unseen["instructions"])  # the same kinds
        assert not _wording_items(seen) & _wording_items(unseen), path
        trained = {w for t in seen["topics"] for w in topic_words(t)}
        for topic in unseen["topics"]:  # no topic word of training either
            assert not set(topic_words(topic)) & trained, (path, topic)
    rows = prompts.build_unseen()
    assert rows == prompts.build_unseen() and len(rows) == prompts.UNSEEN_PROMPTS
    shipped = [json.loads(line) for line in prompts.UNSEEN_FILE.read_text().splitlines()]
    assert shipped == rows
    types = [s["type"] for r in rows for s in r["checks"]]
    assert set(types) == set(CHECKS) and min(types.count(t) for t in CHECKS) >= 10
    training = {**prompts.read(prompts.TRAIN_FILE), **prompts.read(prompts.MORE_FILE)}
    for r in rows:
        assert r["prompt"] not in training and r["topic"] in r["prompt"]
        assert topic_words(r["topic"]) and "{" not in r["prompt"]
    loaded = prompts.load_checked(prompts.UNSEEN_FILE)  # a valid yardstick file
    assert [c.checks for c in loaded] == [r["checks"] for r in rows]


def test_more_training_prompts_are_longer_and_reproducible():
    more = prompts.build_more()
    assert more == prompts.build_more() and len(more) == prompts.MORE_PROMPTS
    shipped = [json.loads(line) for line in prompts.MORE_FILE.read_text().splitlines()]
    assert shipped == more
    counts = [len(r["checks"]) for r in more]
    assert counts.count(3) >= 80 and counts.count(1) <= 160  # most carry two or three
    for r in more:
        types = [s["type"] for s in r["checks"]]
        assert len(set(types)) == len(types)
        assert not any(frozenset(p) in prompts.CONFLICTS for p in combinations(types, 2))
    seen = set(prompts.read(prompts.TRAIN_FILE)) | set(prompts.read(prompts.HELDOUT_FILE))
    assert not seen & {r["prompt"] for r in more}
    assert score(more[0]["prompt"], "x") is not None  # the function judge knows them


def test_judge_function_scores_by_the_checks():
    row = next(r for r in prompts.build() if [s["type"] for s in r["checks"]] == ["lowercase"])
    assert score(row["prompt"], "all lower case here.") == 1.0
    assert score(row["prompt"], "Sure!\nall lower case here.") == 0.5  # loose only
    assert score(row["prompt"], "Not Lower.") == 0.0
    assert strict(row["prompt"], "all lower.") is True
    assert score("a prompt that is not in the set", "x") is None
    # on topic or nothing: the same answers, with and without the topic's word
    row = next(r for r in prompts.build() if [s["type"] for s in r["checks"]] == ["lowercase"])
    word = topic_words(row["topic"])[0]
    assert score_on_topic(row["prompt"], f"all about {word}.") == 1.0
    assert score_on_topic(row["prompt"], "all lower case here.") == 0.0
    assert score(row["prompt"], "all lower case here.") == 1.0
    assert score_on_topic("a prompt that is not in the set", "x") is None


@pytest.mark.slow
def test_loop_with_function_judge_and_yardstick(harness, tmp_path, tiny_model_dir):
    """Two tiny rounds on the verifiable prompts, Self-Rewarding judged by the checkers:
    candidates scored by the function judge, pairs, and the yardstick of M_0, M_1 and M_2
    in `evaluations` (four accuracies each, with counts and intervals) and the report."""
    from flows.loop import loop_flow
    from pipeline.store import Store

    cfg = tiny_config(
        tmp_path,
        tiny_model_dir,
        name="verifiable",
        prompts={"files": [str(prompts.TRAIN_FILE)], "per_round": 12, "heldout": 0},
        self_reward={
            "n_candidates": 4,
            "sampling": {"temperature": 1.0, "max_tokens": 12},
            # verifiable.yaml's score_on_topic would give the tiny model's gibberish 0
            # everywhere, so no pair: the checkers alone, the same path
            "judge": {"kind": "function", "function": "pipeline.verifiable.judge:score"},
            "length_control_gap": 0,  # as verifiable.yaml
            "self_instruct": {"enabled": False},
        },
        rlcd={"enabled": False},
        cai={"enabled": False},
        training={"data": "all"},  # round 2 may find no pair of its own in gibberish
        evaluation={
            "agreement": False,
            "yardstick": {"enabled": True, "limit": 6, "sampling": {"max_tokens": 12}},
        },
    )
    result = loop_flow(cfg)
    with Store(cfg["db_path"], read_only=True) as store:
        [[judged, scores]] = store.sql(
            "SELECT count(*), count(DISTINCT score) FROM judgments "
            "WHERE judge_id LIKE 'pipeline.verifiable.judge:score@%'"
        )[1]
        assert judged == 2 * 12 * 4 and scores >= 2
        assert store.pair_counts("verifiable", 1)["self_reward"] >= 1
        evals = {
            (e["round"], e["metric"]): e
            for e in store.evaluations("verifiable")
            if e["metric"].startswith("ifeval_")
        }
        models = {0: store.round_info("verifiable", 1)["model_id"]}
        models[1] = store.round_info("verifiable", 2)["model_id"]
        models[2] = result["final_model"]
        for t in (0, 1, 2):
            for metric in (
                "ifeval_prompt_strict",
                "ifeval_prompt_loose",
                "ifeval_instruction_strict",
                "ifeval_instruction_loose",
            ):
                e = evals[(t, metric)]
                d = json.loads(e["details_json"])
                assert d["model"] == models[t], (t, metric)
                assert 0.0 <= d["ci95"][0] <= e["value"] <= d["ci95"][1] <= 1.0
                assert d["n"] >= 6 and d["followed"] == round(e["value"] * d["n"])
            strict_p = evals[(t, "ifeval_prompt_strict")]["value"]
            assert strict_p <= evals[(t, "ifeval_prompt_loose")]["value"]
        [[answers]] = store.sql("SELECT count(*) FROM generations WHERE role = 'yardstick'")[1]
        assert answers == 3 * 6
        # the unseen split (the default beside the seen one): its own answers and metrics
        [[unseen]] = store.sql("SELECT count(*) FROM generations WHERE role = 'yardstick/unseen'")[
            1
        ]
        assert unseen == 3 * 6
        unseen_texts = set(prompts.read(prompts.UNSEEN_FILE))
        [[stored]] = store.sql(
            "SELECT list(text) FROM prompts WHERE split = 'yardstick/unseen' AND round = 0"
        )[1]
        assert len(stored) == 6 and set(stored) <= unseen_texts
        for t in (0, 1, 2):
            e = next(
                x
                for x in store.evaluations("verifiable")
                if (x["round"], x["metric"]) == (t, "unseen/ifeval_prompt_strict")
            )
            d = json.loads(e["details_json"])
            assert d["model"] == models[t] and d["n"] == 6
        # docs/evaluation.md's recipe: both splits of every model
        recipes = dict(sql_recipes((REPO_ROOT / "docs" / "evaluation.md",)))
        [recipe] = [q for name, q in recipes.items() if name.startswith("The yardstick's two")]
        found = store.query(recipe)
        assert len(found) == 6 and {r["round"] for r in found} == {0, 1, 2}
        lengths = store.answer_lengths("verifiable")  # what bench/improvement.py prints beside them
        assert sorted(lengths) == [0, 1, 2]
        for t, length in lengths.items():
            assert 0 < length["tokens"] <= 12 and 0.0 <= length["cut"] <= 1.0, (t, length)
            if t and sum(store.pair_counts("verifiable", t).values()):
                assert length["chosen"] > 0 and length["rejected"] > 0, (t, length)
        for t in (0, 1, 2):
            # the shipped prompts give topics: on topic, and strict and on topic
            both = evals[(t, "ifeval_prompt_strict_on_topic")]["value"]
            assert both <= evals[(t, "ifeval_on_topic")]["value"]
            assert both <= evals[(t, "ifeval_prompt_strict")]["value"]
            d = json.loads(evals[(t, "ifeval_instruction_strict")]["details_json"])
            assert sum(n for _, n in d["per_kind"].values()) == d["n"]
            assert sum(k for k, _ in d["per_kind"].values()) == d["followed"]
    page = Path(result["report"]).read_text()
    assert 'data-plot="yardstick"' in page and "instruction following" in page
    assert "prompt-level strict and on topic" in page  # drawn with the other four
    assert "prompt-level strict (unseen)" in page and "instruction following, unseen" in page
    # the per-kind table: one row per kind measured, a cell per model M_0..M_2
    table = page[page.index('<table id="instruction-kinds">') :]
    table = table[: table.index("</table>")]
    kinds = json.loads(evals[(0, "ifeval_instruction_strict")]["details_json"])["per_kind"]
    for k in kinds:
        assert f"<code>{k}</code>" in table
    assert table.count("<th>M_") == 3


@pytest.mark.slow
def test_loops_without_an_outside_judge_run_as_shipped(harness, tmp_path, tiny_model_dir):
    """verifiable_combined.yaml as shipped (the checklist judge, RLCD's and Constitutional
    AI's instruction-following files, SFT then DPO), at tiny sizes for one round: each
    method's rows and pairs, both steps, and both yardstick splits of M_0 and M_1. The
    rlcd, cai and checklist configs are each one of its method sections."""
    import yaml

    from flows.loop import loop_flow
    from pipeline.store import Store

    shipped = yaml.safe_load((REPO_ROOT / "data/configs/verifiable_combined.yaml").read_text())
    for name in ("rlcd", "cai", "checklist"):  # the single-method loops are its parts
        alone = yaml.safe_load((REPO_ROOT / f"data/configs/verifiable_{name}.yaml").read_text())
        method = "self_reward" if name == "checklist" else name
        assert alone[method] == shipped[method]
    tiny = {"max_tokens": 8}
    cfg = {
        **shipped,
        "name": "nojudge",
        "db_path": str(tmp_path / "db.duckdb"),
        "runs_dir": str(tmp_path / "runs"),
        "model": str(tiny_model_dir),
        "rounds": 1,
        "engine": {"kind": "hf", "batch_size": 4, "max_model_len": 1024},
        "prompts": {**shipped["prompts"], "per_round": 4},
        "self_reward": {**shipped["self_reward"], "n_candidates": 3, "sampling": tiny},
        "rlcd": {**shipped["rlcd"], "sampling": tiny},
        "cai": {**shipped["cai"], "sampling": tiny},
        "training": {**shipped["training"], "batch_size": 2, "max_length": 128, "epochs": 1},
    }
    stick = cfg["evaluation"]["yardstick"]
    cfg["evaluation"]["yardstick"] = {**stick, "limit": 3, "sampling": tiny}
    loop_flow(cfg)
    with Store(cfg["db_path"], read_only=True) as store:
        [[checklist]] = store.sql(
            "SELECT count(*) FROM judgments WHERE judge_id LIKE '%judge_checklist_prefilled%"
            "|checklist:mean'"
        )[1]
        assert checklist == 4 * 3  # every candidate read, one score each
        [[critiques]] = store.sql("SELECT count(*) FROM critiques")[1]
        assert critiques == 4
        pairs = store.pair_counts("nojudge", 1)
        assert pairs["rlcd"] == 4 and pairs["cai"] >= 1
        steps = [r["kind"] for r in store.training_results("nojudge", 1)]
        assert sorted(steps) == ["dpo", "sft"]
        stored = store.query(
            "SELECT round, metric FROM evaluations WHERE metric IN "
            "('ifeval_prompt_strict', 'unseen/ifeval_prompt_strict') ORDER BY ALL"
        )
        assert [(r["round"], r["metric"]) for r in stored] == [
            (t, m) for t in (0, 1) for m in ("ifeval_prompt_strict", "unseen/ifeval_prompt_strict")
        ]
