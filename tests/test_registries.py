"""Each registry takes a new entry from this file alone: a throwaway method, judge kind and
training kind are added here (and nowhere else) and run through real rounds of the
tiny-model loop. A batch also runs from its arguments alone, in another directory."""

import builtins
import io
import json
import pickle
import shutil
from pathlib import Path
from typing import Literal

import pytest
from helpers import TESTS, tiny_config

from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError
from pipeline.judging import JUDGES, JudgeKind, Sample
from pipeline.methods import METHODS, Method
from pipeline.methods.common import MethodConfig
from pipeline.rows import Rows, generation_row, pair_row, sampling_from
from pipeline.schema import SamplingConfig, StrictModel
from pipeline.store import Store
from pipeline.training import export
from pipeline.training.common import load_splits
from pipeline.training.kinds import TRAINING_KINDS, TrainingKind


def tiny(tmp_path: Path, model: Path, **over) -> dict:
    """One round of the tiny model with every shipped method off, no training, no
    evaluation: each test turns on what it adds."""
    off = {"enabled": False}
    base = {"name": "registry", "rounds": 1, "training": {"steps": []}}
    base.update(self_reward=off, rlcd=off, cai=off, evaluation=off)
    base["prompts"] = {"files": ["data/prompts/helpful.jsonl"], "per_round": 4, "heldout": 0}
    return tiny_config(tmp_path, model, **{**base, **over})


# -- a method -------------------------------------------------------------------------------


class LongestConfig(MethodConfig):
    enabled: bool = False
    answers: int = 3
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, max_tokens=12)


def run_longest(engine, loaded, prompts, ctx, cfg: LongestConfig, judge) -> Rows:
    """A few answers per prompt; the longest is chosen over the shortest."""
    params = sampling_from(cfg.sampling, n=cfg.answers)
    outputs = engine.generate([p.conversation for p in prompts], params)
    rows = Rows()
    rows.add("prompts", *(p.record(ctx.run_id, ctx.round) for p in prompts))
    for prompt, completions in zip(prompts, outputs, strict=True):
        gens = [
            generation_row(ctx, "longest", prompt.prompt_id, "answer", k, c, params)
            for k, c in enumerate(completions)
        ]
        rows.add("generations", *gens)
        ranked = sorted(gens, key=lambda g: len(g["text"]))
        if len(ranked[0]["text"]) == len(ranked[-1]["text"]):
            rows.discard(ctx, "longest", "pairs", prompt.prompt_id, "tie")
            continue
        chosen, rejected = ranked[-1]["generation_id"], ranked[0]["generation_id"]
        rows.add("pairs", pair_row(ctx, "longest", "longer", prompt, chosen, rejected))
    return rows


@pytest.mark.slow
def test_a_new_method_is_one_entry(harness, tmp_path, tiny_model_dir, monkeypatch):
    from flows.loop import loop_flow

    monkeypatch.setitem(
        METHODS,
        "longest",
        Method(
            config=LongestConfig,
            run=run_longest,
            record_policy=lambda cfg: {"rule": "longest_over_shortest"},
            tie_reasons=("tie",),
        ),
    )
    with pytest.raises(ConfigError, match=r"c.yaml: longest.answerz: unknown key"):
        parse_config({"longest": {"answerz": 2}}, "c.yaml")
    cfg = tiny(
        tmp_path,
        tiny_model_dir,
        longest={"enabled": True},
        evaluation={"enabled": True, "sampling": {"max_tokens": 8}},
    )
    loop_flow(cfg)
    with Store(cfg["db_path"], read_only=True) as store:
        assert store.last_finished_round("registry") == 1
        assert set(store.pair_counts("registry", 1)) == {"longest"}
        for p in store.query("SELECT * FROM pair_texts"):
            assert len(p["chosen"]) > len(p["rejected"])
        [r1] = store.query("SELECT pair_policy_json FROM rounds")
        assert json.loads(r1["pair_policy_json"]) == {"longest": {"rule": "longest_over_shortest"}}
        stages = {s for s, _ in store.done_batches("registry", 1)}
        assert {"longest", "agreement", "flow"} <= stages
        metrics = {(e["metric"], e["method"]) for e in store.evaluations("registry")}
        assert {("pairs", "longest"), ("tie_rate", "longest")} <= metrics
        assert ("agreement_pairwise", "longest") in metrics


# -- a judge kind ---------------------------------------------------------------------------


class WordsJudgeConfig(StrictModel):
    kind: Literal["words"] = "words"
    per_word: float = 1.0


class WordsJudge:
    """Scores an answer by its word count: a rule, no model."""

    judge_id = "words"
    key = "words-v1"
    model_id = None
    template = None
    sampling: dict = {}

    def __init__(self, cfg: WordsJudgeConfig) -> None:
        self.per_word = cfg.per_word

    def score(self, items):
        return [[Sample(None, self.per_word * len(it.response.split()), "ok")] for it in items]


@pytest.mark.slow
def test_a_new_judge_kind_is_one_entry(harness, tmp_path, tiny_model_dir, monkeypatch):
    from flows.loop import loop_flow

    monkeypatch.setitem(
        JUDGES,
        "words",
        JudgeKind(
            config=WordsJudgeConfig,
            load=lambda cfg, library: None,
            build=lambda cfg, loaded, engine, model_id: WordsJudge(cfg),
            needs_engine=False,
        ),
    )
    sr = {
        "enabled": True,
        "n_candidates": 3,
        "sampling": {"temperature": 1.0, "max_tokens": 12},
        "judge": {"kind": "words", "per_word": 2.0},
    }
    cfg = tiny(tmp_path, tiny_model_dir, self_reward=sr)
    loop_flow(cfg)
    with Store(cfg["db_path"], read_only=True) as store:
        judged = store.query(
            "SELECT j.*, g.text FROM judgments j JOIN generations g USING (generation_id)"
        )
        assert judged and {j["judge_id"] for j in judged} == {"words"}
        for j in judged:
            assert j["template_id"] is None and j["model_id"] is None and j["raw_output"] is None
            assert j["score"] == 2.0 * len(j["text"].split())
        pairs = store.query("SELECT * FROM pair_texts WHERE method = 'self_reward'")
        assert pairs
        for p in pairs:
            assert len(p["chosen"].split()) > len(p["rejected"].split())
        [r1] = store.query("SELECT pair_policy_json FROM rounds")
        policy = json.loads(r1["pair_policy_json"])["self_reward"]
        assert policy["judge"] == {"kind": "words", "per_word": 2.0}


# -- a training kind ------------------------------------------------------------------------


def train_copy(spec: dict, out: Path) -> dict:
    """The throwaway trainer (run in the training child): the base model copied unchanged,
    and the metrics a kind reports."""
    train, test = load_splits(spec["data_dir"])
    for f in Path(spec["base_model"]).iterdir():
        if f.is_file() and f.name != "prefloop-model.json":
            shutil.copy(f, out / f.name)
    metrics = {
        "train_pairs": len(train),
        "heldout_pairs": len(test or []),
        "heldout_copy_accuracy": 1.0,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


@pytest.mark.slow
def test_a_new_training_kind_is_one_entry(harness, tmp_path, tiny_model_dir, monkeypatch):
    from flows.loop import loop_flow

    monkeypatch.setitem(
        TRAINING_KINDS,
        "copy",
        TrainingKind(
            trainer=f"{__name__}:train_copy",
            data=export.preference_pairs,
            produces="policy",
            metrics={"heldout_copy_accuracy": "copy_accuracy"},
        ),
    )
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the child imports this file's trainer
    cfg = tiny(
        tmp_path,
        tiny_model_dir,
        rounds=2,
        prompts={"files": ["data/prompts/helpful.jsonl"], "per_round": 4, "heldout": 2},
        rlcd={"sampling": {"max_tokens": 8}, "rescore": False},
        training={"steps": ["copy"], "heldout_fraction": 0.25},
        evaluation={"enabled": True, "agreement": False, "sampling": {"max_tokens": 8}},
    )
    result = loop_flow(cfg)
    with Store(cfg["db_path"], read_only=True) as store:
        runs = {r["round"]: r for r in store.query("SELECT * FROM training_runs")}
        assert {r["kind"] for r in runs.values()} == {"copy"} and set(runs) == {1, 2}
        assert runs[1]["reference_model_id"] is None  # the kind trains against no reference
        # A policy kind: round 2 generates with round 1's model, and it is registered.
        assert store.round_info("registry", 2)["model_id"] == runs[1]["output_model_id"]
        assert store.model(runs[1]["output_model_id"])["kind"] == "policy"
        assert result["final_model"] == runs[2]["output_model_id"]
        evals = {(e["round"], e["metric"]): e for e in store.evaluations("registry")}
        assert evals[1, "copy_accuracy"]["value"] == 1.0
        assert (1, "win_rate") in evals and (2, "win_rate") in evals
        stages = {s for s, _ in store.done_batches("registry", 1)}
        assert {"train_copy", "heldout", "heldout_new", "win_rate"} <= stages


# -- tasks that carry what they need --------------------------------------------------------


@pytest.mark.slow
def test_a_batch_runs_from_its_arguments_in_another_directory(
    tmp_path, tiny_engine, ctx, monkeypatch
):
    """The round's loaded inputs travel with a batch (pickled, as a task runner on another
    machine sends them) and every method runs from them without opening a file."""
    from pipeline import rounds

    cfg = load_config(
        Path("data/configs/demo.yaml"),
        [
            "self_reward.sampling.max_tokens=6",
            "rlcd.sampling.max_tokens=6",
            "cai.sampling.max_tokens=6",
        ],
    )
    inputs = rounds.load_inputs(cfg)
    blob = pickle.dumps(inputs)
    monkeypatch.chdir(tmp_path)  # data/ and prompts/ are not here

    opened = []

    def no_files(*args, **kw):
        opened.append(args[:1])
        raise AssertionError(f"a batch opened a file: {args[:1]}")

    for owner, name in ((Path, "open"), (Path, "read_text"), (Path, "read_bytes")):
        monkeypatch.setattr(owner, name, no_files)
    monkeypatch.setattr(builtins, "open", no_files)
    monkeypatch.setattr(io, "open", no_files)
    carried = pickle.loads(blob)
    prompts = carried.train_prompts[:2]
    for method in cfg.enabled_methods():
        rows = rounds.run_batch(method, tiny_engine, carried, prompts, ctx, cfg)
        assert rows["generations"], method
    assert opened == []
