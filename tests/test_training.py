"""Training hand-off: export round-trips, DPO (full and LoRA), a reward model, SFT and KTO
on the tiny model in a child process, chained steps, the data window, registration, and
a failing child."""

import json
import time
from pathlib import Path

import pytest
from datasets import load_dataset
from helpers import GOOD, REVISED, write_round
from transformers import AutoTokenizer

from pipeline.config import RunConfig
from pipeline.engines import Sampling, start_engine
from pipeline.hashing import sha256_dir
from pipeline.models import NOT_HASHED, resolve_model
from pipeline.progress import training_left_s, training_progress
from pipeline.rounds import round_dir
from pipeline.schema import EngineConfig
from pipeline.store import Store
from pipeline.training.export import PAIR_COLUMNS, read_dataset, split_pairs, write_dataset
from pipeline.training.kinds import TRAINING_KINDS
from pipeline.training.launch import TrainingError, progress_file, read_progress
from pipeline.training.step import export_step, train_round, train_step

RUN = "train-test"


def _write_round(store: Store, model_dir, **kw) -> None:
    write_round(store, model_dir, RUN, **kw)


def _cfg(tmp_path, **training) -> RunConfig:
    base = {
        "learning_rate": 1e-3,
        "epochs": 3,
        "batch_size": 4,
        "max_length": 128,
        "heldout_fraction": 0.25,
    }
    return RunConfig(
        name=RUN,
        db_path=tmp_path / "db.duckdb",
        runs_dir=tmp_path / "runs",
        training={**base, **training},
    )


def _train(store: Store, cfg: RunConfig, kind: str | None = None) -> dict:
    """One step of `kind` (default: the config's only step) on round 1."""
    folder = round_dir(cfg.runs_dir, RUN, 1)
    [step] = [s for s in cfg.training.step_list() if kind is None or s.kind == kind] or [
        cfg.training.step_list()[0].model_copy(update={"kind": kind})
    ]
    return train_step(store, step, RUN, 1, folder, cfg.seed)


@pytest.mark.slow
def test_export_round_trips(tmp_path, tiny_model_dir, tiny_engine):
    cfg = _cfg(tmp_path)
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir)
        rows = store.training_pairs(RUN, 1)
        assert len(rows) == 23  # the flagged pair is left out
        assert len(store.training_pairs(RUN, 1, exclude_flagged=False)) == 24
        assert store.training_pairs(RUN, 1, methods=["cai"]) == []
        assert len(store.training_pairs(RUN, 1, min_margin=2.5)) == 0
    data = split_pairs(rows, 0.25, seed=0)
    assert len(data["train"]) + len(data["test"]) == 23 and len(data["test"]) >= 1
    # The split depends only on the pair id: dropping pairs never moves the others.
    smaller = split_pairs(rows[5:], 0.25, seed=0)
    assert set(smaller["test"]["pair_id"]) == set(data["test"]["pair_id"]) - {
        r["pair_id"] for r in rows[:5]
    }
    for fmt in ("jsonl", "parquet", "hf"):
        out = tmp_path / fmt
        write_dataset(data, out, fmt)
        if fmt == "hf":
            from datasets import load_from_disk

            back = load_from_disk(out)
        else:
            back = load_dataset(str(out))  # no glue: the file names are the splits
        for split in ("train", "test"):
            assert back[split].to_list() == data[split].to_list(), fmt
    example = data["train"][0]
    assert example["prompt"][-1]["role"] == "user"
    assert example["chosen"] == [{"role": "assistant", "content": GOOD}]
    # TRL applies the tokenizer's chat template to `prompt`: the very text the engine
    # rendered when it generated the answers.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    trl_prompt = tok.apply_chat_template(
        example["prompt"], tokenize=False, add_generation_prompt=True
    )
    assert trl_prompt == tiny_engine.render(example["prompt"])


@pytest.mark.slow
def test_dpo_full_learns_and_registers(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path)
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir)
        result = _train(store, cfg, "dpo")
        m = result["metrics"]
        assert m["heldout_reward_accuracy"] > 0.5
        assert m["heldout_reward_margin"] > m["heldout_reward_margin_before"]
        assert m["steps"] > 0 and m["train_pairs"] + m["heldout_pairs"] == 23
        [row] = store.query("SELECT * FROM training_runs")
        assert row["output_model_id"] == result["model_id"] and row["status"] == "finished"
        assert (
            json.loads(row["metrics_json"])["heldout_reward_accuracy"]
            == m["heldout_reward_accuracy"]
        )
        model = store.model(result["model_id"])
        assert model["parent_model_id"] == store.round_info(RUN, 1)["model_id"]
        assert model["round"] == 1 and model["kind"] == "policy"
    # The snapshot training read is in the round folder, next to the checkpoint, and so is
    # the child's last progress record: every step done, its last loss.
    folder = tmp_path / "runs" / RUN / "round-1"
    assert (folder / "data-dpo" / "train.parquet").is_file()
    progress = read_progress(progress_file(folder, "dpo"))
    assert progress["phase"] == "saving the model"
    assert progress["step"] == progress["steps"] == m["steps"]
    assert progress["loss"] == m["final_step_loss"]
    # The next round's engine serves the checkpoint.
    assert resolve_model(model["path"]).sha256 == model["sha256"]
    with start_engine(model["path"], EngineConfig(kind="hf"), seed=0) as engine:
        [[out]] = engine.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_tokens=8))
        assert out.n_tokens > 0


@pytest.mark.slow
def test_dpo_lora_saves_merged_checkpoint(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, lora={"r": 4, "alpha": 8}, reference="initial", epochs=1)
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, n=8)
        result = _train(store, cfg, "dpo")
    path = result["path"]
    from pathlib import Path

    files = {p.name for p in Path(path).iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files  # merged
    with start_engine(path, EngineConfig(kind="hf"), seed=0) as engine:
        [[out]] = engine.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_tokens=4))
        assert out.finish_reason in {"stop", "length"}


@pytest.mark.slow
def test_reward_model_with_soft_labels(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, steps=["rm"], epochs=2)
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, soft=True)
        result = _train(store, cfg)
        m = result["metrics"]
        assert 0.0 <= m["heldout_pairwise_accuracy"] <= 1.0
        assert m["soft_labels"] > 0 and not m["uses_margin"]
        assert store.model(result["model_id"])["kind"] == "reward"


@pytest.mark.slow
def test_failing_child_reports_log_and_changes_nothing(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, loss_type="no-such-loss")
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, n=6)
        before = store.table_counts()
        with pytest.raises(TrainingError) as err:
            _train(store, cfg, "dpo")
        assert "exit code" in str(err.value) and "no-such-loss" in str(err.value)
        assert store.table_counts() == before
    folder = tmp_path / "runs" / RUN / "round-1"
    assert not (folder / "model-dpo").exists() and not (folder / "model-dpo.partial").exists()


@pytest.mark.slow
def test_export_counts(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, heldout_fraction=0.0)
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, n=5)
        [step] = cfg.training.step_list()
        assert export_step(store, step, RUN, 1, tmp_path / "x", cfg.seed, "jsonl") == {
            "train": 4,
            "test": 0,
        }
        # Nothing held out: the empty split reads back empty, in both formats, and a step
        # trains on it (the child reads its parquet snapshot without known columns).
        for fmt, columns in (("jsonl", PAIR_COLUMNS), ("parquet", None)):
            export_step(store, step, RUN, 1, tmp_path / fmt, cfg.seed, fmt)
            back = read_dataset(tmp_path / fmt, columns)
            assert (len(back["train"]), len(back["test"])) == (4, 0), fmt
        result = _train(store, cfg.model_copy(update={}), "dpo")
        assert result["metrics"]["heldout_pairs"] == 0 and result["metrics"]["steps"] > 0


def test_training_progress_in_words(tmp_path):
    """What the console and `prefloop status` say about a training child: its phase, or
    step i of n with the latest loss and the time left at its own pace so far."""
    from transformers import TrainerControl, TrainerState

    from pipeline.training.common import Progress

    path = tmp_path / "model-dpo.progress.json"
    assert read_progress(path) is None
    callback = Progress(str(path))
    callback.update(phase="held-out numbers before training")
    assert training_progress(read_progress(path), 0.0) == "held-out numbers before training"
    state, control = TrainerState(max_steps=40), TrainerControl()
    callback.on_train_begin(None, state, control)
    assert training_progress(read_progress(path), time.time()) == "step 0 of 40"
    record = {**read_progress(path), "train_started": 100.0}
    record.update(step=10, updated=120.0, loss=0.61234)
    assert training_progress(record, 125.0) == "step 10 of 40, loss 0.6123, about 0m55s left"
    assert training_left_s(record, 500.0) == 0.0  # overdue, never negative
    state.global_step = 11
    callback.on_log(None, state, control, logs={"loss": 0.5})
    assert read_progress(path)["step"] == 11 and read_progress(path)["loss"] == 0.5
    Progress(str(path), main_process=False).update(phase="saving the model")
    assert read_progress(path)["step"] == 11  # only the main process writes
    path.write_text('{"phase": "trai')  # a torn write reads as nothing yet
    assert read_progress(path) is None


def test_launcher_uses_accelerate_on_cuda(tmp_path):
    from pipeline.training.launch import ACCELERATE_DEFAULT, command

    spec = tmp_path / "s.json"
    cpu = command(spec, "cpu", None)
    assert cpu[1:] == ["-m", "pipeline.training.worker", str(spec)]
    cuda = command(spec, "cuda", None)
    assert cuda[1:5] == [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_DEFAULT),
    ]
    assert cuda[-3:] == ["-m", "pipeline.training.worker", str(spec)]
    mine = tmp_path / "zero2.yaml"
    assert command(spec, "cuda", mine)[4] == str(mine)
    assert ACCELERATE_DEFAULT.is_file()


@pytest.mark.slow
def test_cli_export_status_pairs_train(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    import yaml

    cfg = _cfg(tmp_path, epochs=1)
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, n=8)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    def cli(*args):
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args, "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    assert "5 train, 2 test pairs (jsonl, dpo)" in cli(
        "export", "--round", "1", "--format", "jsonl", "--out", str(tmp_path / "x")
    )
    assert len(load_dataset(str(tmp_path / "x"))["train"]) == 5
    shown = cli("pairs", "--round", "1", "--limit", "2")
    assert shown.count("chosen:   " + GOOD) == 2 and "rejected: no" in shown
    assert "model train-test-r1-dpo@" in cli("train", "--round", "1", "--kind", "dpo")
    status = cli("status")
    assert "train-test-r1-dpo@" in status and "self_reward:8" in status


@pytest.mark.slow
def test_sft_data_revisions_and_best_of_n(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, steps=[{"kind": "sft", "sft": {"best_of_n": True, "min_score": 4}}])
    [step] = cfg.training.step_list()
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, n=6, cai=True)
        data = export_step(store, step, RUN, 1, tmp_path / "sft", cfg.seed, "jsonl")
        assert data["train"] + data["test"] == 12  # 6 revisions + 6 best candidates
        back = load_dataset(str(tmp_path / "sft"))
        rows = back["train"].to_list() + back["test"].to_list()
        answers = {r["source"]: r["messages"][-1]["content"] for r in rows}
        # The round's own judge picks the best (GOOD); the later re-judge does not count.
        assert answers == {"revision": REVISED, "best_of_n": GOOD}
        assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
        assert all(r["messages"][-2]["role"] == "user" for r in rows)
        # A threshold above every best score leaves the revisions only.
        high = step.model_copy(update={"sft": step.sft.model_copy(update={"min_score": 6})})
        assert sum(export_step(store, high, RUN, 1, tmp_path / "h", 0).values()) == 6


@pytest.mark.slow
def test_sft_step_lowers_heldout_loss(tmp_path, tiny_model_dir):
    """And logs to tensorboard (`report_to`) in the checkpoint's logs/, which its content
    hash leaves out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, steps=["sft"], epochs=2, report_to=["tensorboard"])
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, n=12, cai=True)
        result = _train(store, cfg)
        m = result["metrics"]
        assert m["heldout_examples"] >= 1 and m["train_examples"] + m["heldout_examples"] == 12
        assert m["heldout_loss"] < m["heldout_loss_before"]
        model = store.model(result["model_id"])
        assert model["kind"] == "policy" and result["model_id"].startswith(f"{RUN}-r1-sft@")
    [events] = {f.parent for f in Path(model["path"], "logs").rglob("events.out.tfevents.*")}
    board = EventAccumulator(str(events))
    board.Reload()
    assert len(board.Scalars("train/loss")) == m["steps"]
    assert sha256_dir(Path(model["path"]), exclude=NOT_HASHED) == model["sha256"]
    with start_engine(model["path"], EngineConfig(kind="hf"), seed=0) as engine:
        [[out]] = engine.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_tokens=4))
        assert out.n_tokens > 0


@pytest.mark.slow
def test_kto_data_and_step(tmp_path, tiny_model_dir):
    cfg = _cfg(
        tmp_path,
        steps=[{"kind": "kto", "kto": {"desirable_min_score": 5, "undesirable_max_score": 1}}],
    )
    [step] = cfg.training.step_list()
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, n=12, cai=True)
        data = TRAINING_KINDS["kto"].data(store, step, RUN, 1, cfg.seed)
        rows = data["train"].to_list() + data["test"].to_list()
        # 11 unflagged pairs give 22 answers; the flagged pair's two candidates come back
        # as scored candidates (5 desirable, 1 not); each answer once.
        assert len(rows) == 24 and len({r["example_id"] for r in rows}) == 24
        assert sum(r["label"] for r in rows) == 12
        assert {r["source"] for r in rows} == {"pair", "scored"}
        # A pair's two answers share a split.
        for split in ("train", "test"):
            pairs = [r["pair_id"] for r in data[split].to_list() if r["pair_id"]]
            assert all(pairs.count(p) == 2 for p in pairs)
        assert data["test"].num_rows >= 2
        result = _train(store, cfg)
        m = result["metrics"]
        assert m["desirable"] + m["undesirable"] == m["train_examples"]
        assert 0.0 <= m["heldout_reward_accuracy"] <= 1.0 and m["heldout_pairs"] >= 1
        assert m["heldout_loss"] is not None and m["steps"] > 0
        [run] = store.query("SELECT * FROM training_runs")
        assert run["kind"] == "kto" and run["reference_model_id"] == run["base_model_id"]
        assert store.model(result["model_id"])["kind"] == "policy"


@pytest.mark.slow
def test_steps_chain_and_resume_after_a_failed_step(tmp_path, tiny_model_dir):
    """[sft, dpo, rm]: SFT from the round's model, DPO from (and against) the SFT model,
    the reward model beside them. A failing DPO step leaves SFT stored and nothing of
    itself; the rerun trains DPO and RM only."""
    bad = _cfg(tmp_path, steps=["sft", {"kind": "dpo", "loss_type": "no-such-loss"}, "rm"])
    good = _cfg(tmp_path, steps=["sft", "dpo", "rm"], epochs=1)
    folder = round_dir(bad.runs_dir, RUN, 1)
    with Store(bad.db_path) as store:
        _write_round(store, tiny_model_dir, n=8, cai=True)
        base = store.round_info(RUN, 1)["model_id"]
        with pytest.raises(TrainingError, match="no-such-loss"):
            train_round(store, bad.training, RUN, 1, folder, bad.seed)
        [sft] = store.query("SELECT * FROM training_runs")
        assert sft["kind"] == "sft" and sft["step"] == 0 and sft["base_model_id"] == base
        assert not (folder / "model-dpo").exists() and not (folder / "model-dpo.partial").exists()
        assert {r["stage"] for r in store.query("SELECT stage FROM stage_metrics")} == {"train_sft"}

        done = train_round(store, good.training, RUN, 1, folder, good.seed)
        assert [r["step"] for r in done["trained"]] == ["dpo", "rm"]
        runs = {r["kind"]: r for r in store.query("SELECT * FROM training_runs")}
        assert [runs[k]["step"] for k in ("sft", "dpo", "rm")] == [0, 1, 2]
        sft_model = runs["sft"]["output_model_id"]
        assert runs["dpo"]["base_model_id"] == sft_model
        assert runs["dpo"]["reference_model_id"] == sft_model
        assert store.model(runs["dpo"]["output_model_id"])["parent_model_id"] == sft_model
        assert runs["rm"]["base_model_id"] == runs["dpo"]["output_model_id"]
        assert store.model(runs["rm"]["output_model_id"])["kind"] == "reward"
        # The scorer does not move the policy: the next round gets the DPO model.
        assert done["policy"] == runs["dpo"]["output_model_id"]
        assert train_round(store, good.training, RUN, 1, folder, good.seed)["trained"] == []
        for kind in ("sft", "dpo", "rm"):
            assert (folder / f"data-{kind}" / "train.parquet").is_file()


@pytest.mark.slow
def test_reference_round_and_initial(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, steps=["sft", {"kind": "dpo", "reference": "round"}], epochs=1)
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, n=6, cai=True)
        train_round(store, cfg.training, RUN, 1, round_dir(cfg.runs_dir, RUN, 1), cfg.seed)
        runs = {r["kind"]: r for r in store.query("SELECT * FROM training_runs")}
        assert runs["dpo"]["base_model_id"] == runs["sft"]["output_model_id"]
        assert runs["dpo"]["reference_model_id"] == store.round_info(RUN, 1)["model_id"]
        spec = json.loads(runs["dpo"]["config_json"])
        assert spec["reference_model"] == store.model(runs["sft"]["base_model_id"])["path"]


@pytest.mark.slow
def test_data_window_all_rounds_each_pair_once(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, data="all", heldout_fraction=0.2)
    [step] = cfg.training.step_list()
    one = step.model_copy(update={"data": "round"})
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, n=10, round_=1)
        _write_round(store, tiny_model_dir, n=10, round_=2)
        per_round = {
            r: set(TRAINING_KINDS["dpo"].data(store, one, RUN, r, 0)["train"]["pair_id"])
            | set(TRAINING_KINDS["dpo"].data(store, one, RUN, r, 0)["test"]["pair_id"])
            for r in (1, 2)
        }
        data = TRAINING_KINDS["dpo"].data(store, step, RUN, 2, 0)
        ids = list(data["train"]["pair_id"]) + list(data["test"]["pair_id"])
        assert len(ids) == len(set(ids)) == 18  # 9 unflagged pairs per round
        assert set(ids) == per_round[1] | per_round[2]
        # A pair keeps its split when later rounds join the window.
        r1 = TRAINING_KINDS["dpo"].data(store, one, RUN, 1, 0)
        assert set(r1["test"]["pair_id"]) <= set(data["test"]["pair_id"])
        # Round 1 with `all` is round 1 alone.
        assert sum(export_step(store, step, RUN, 1, tmp_path / "w", 0).values()) == 9
        # Round 2's step trains on the union, and its snapshot holds exactly that.
        folder = round_dir(cfg.runs_dir, RUN, 2)
        result = train_step(store, step, RUN, 2, folder, cfg.seed)
        assert result["metrics"]["train_pairs"] + result["metrics"]["heldout_pairs"] == 18
        snap = load_dataset(str(folder / "data-dpo"))
        assert sorted([*snap["train"]["pair_id"], *snap["test"]["pair_id"]]) == sorted(ids)
        [run] = store.query("SELECT config_json FROM training_runs")
        assert json.loads(run["config_json"])["extra"]["rounds"] == [1, 2]


def test_a_steps_held_out_numbers_in_words():
    """The console line of a finished step: before -> after where measured before."""
    from flows.stage import held_out_words

    metrics = {"heldout_loss": 0.7539, "heldout_loss_before": 0.6931, "heldout_pairs": 6}
    metrics |= {"heldout_reward_accuracy": 0.125, "train_loss": 0.7}
    assert held_out_words(metrics) == "loss 0.693 -> 0.754, reward_accuracy 0.125"
    assert held_out_words({"train_loss": 1.0}) == "none"
