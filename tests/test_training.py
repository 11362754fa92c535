"""Training hand-off: export round-trips, DPO (full and LoRA) and a reward model on the
tiny model in a child process, registration, and a failing child."""

import json

import pytest
from datasets import load_dataset
from transformers import AutoTokenizer

from pipeline.config import RunConfig
from pipeline.engines import Sampling, start_engine
from pipeline.hashing import row_id
from pipeline.models import resolve_model
from pipeline.rounds import round_dir
from pipeline.schema import EngineConfig
from pipeline.seeds import load_prompts
from pipeline.store import Store
from pipeline.training.export import split_pairs, write_dataset
from pipeline.training.launch import TrainingError
from pipeline.training.step import export_round, train_round

RUN = "train-test"
GOOD = "Sure! Here is a clear, friendly and complete answer to your question."
BAD = "no"


def _write_round(store: Store, model_dir, n: int = 24, soft: bool = False) -> None:
    """Round 1 of a run: the tiny model, and an easy preference (the same good answer
    over the same curt one) on the seed prompts."""
    model = resolve_model(model_dir)
    store.write({"models": [model.record("base")]})
    store.upsert_round(RUN, 1, model.model_id)
    prompts = (
        load_prompts("data/prompts/helpful.jsonl") + load_prompts("data/prompts/red_team.jsonl")
    )[:n]
    rows = {"prompts": [], "generations": [], "pairs": []}
    for i, p in enumerate(prompts):
        rows["prompts"].append(p.record(RUN, 1))
        ids = []
        for role, text in (("candidate", GOOD), ("candidate", BAD)):
            gid = row_id(RUN, p.prompt_id, len(ids))
            ids.append(gid)
            rows["generations"].append(
                {
                    "generation_id": gid,
                    "run_id": RUN,
                    "round": 1,
                    "method": "self_reward",
                    "prompt_id": p.prompt_id,
                    "model_id": model.model_id,
                    "role": role,
                    "sample_idx": len(ids) - 1,
                    "text": text,
                    "sampling_json": "{}",
                    "seed": 0,
                }
            )
        rows["pairs"].append(
            {
                "pair_id": row_id(RUN, "pair", p.prompt_id),
                "run_id": RUN,
                "round": 1,
                "method": "rlcd" if soft else "self_reward",
                "variant": "test",
                "prompt_id": p.prompt_id,
                "chosen_generation_id": ids[0],
                "rejected_generation_id": ids[1],
                "margin": None if soft else 2.0,
                "soft_label": (0.6 + 0.4 * (i % 2)) if soft else None,
                "flagged": i == 0,
                "flag_reason": "test" if i == 0 else None,
                "model_id": model.model_id,
            }
        )
    store.write(rows)


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
    folder = round_dir(cfg.runs_dir, RUN, 1)
    return train_round(store, cfg.training, RUN, 1, folder, cfg.seed, kind)


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
    # The snapshot training read is in the round folder, next to the checkpoint.
    assert (tmp_path / "runs" / RUN / "round-1" / "pairs" / "train.parquet").is_file()
    # The next round's engine serves the checkpoint.
    assert resolve_model(model["path"]).sha256 == model["sha256"]
    with start_engine(model["path"], EngineConfig(kind="hf"), seed=0) as engine:
        [[out]] = engine.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_tokens=8))
        assert out.n_tokens > 0


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


def test_reward_model_with_soft_labels(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, kind="rm", epochs=2)
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, soft=True)
        result = _train(store, cfg)
        m = result["metrics"]
        assert 0.0 <= m["heldout_pairwise_accuracy"] <= 1.0
        assert m["soft_labels"] > 0 and not m["uses_margin"]
        assert store.model(result["model_id"])["kind"] == "reward"


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


def test_export_counts(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, heldout_fraction=0.0)
    with Store(cfg.db_path) as store:
        _write_round(store, tiny_model_dir, n=5)
        assert export_round(store, cfg.training, RUN, 1, tmp_path / "x", cfg.seed, "jsonl") == {
            "train": 4,
            "test": 0,
        }


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

    assert "6 train, 1 test pairs (jsonl)" in cli(
        "export", "--round", "1", "--format", "jsonl", "--out", str(tmp_path / "x")
    )
    assert len(load_dataset(str(tmp_path / "x"))["train"]) == 6
    shown = cli("pairs", "--round", "1", "--limit", "2")
    assert shown.count("chosen:   " + GOOD) == 2 and "rejected: no" in shown
    assert "model train-test-r1-dpo@" in cli("train", "--round", "1", "--kind", "dpo")
    status = cli("status")
    assert "train-test-r1-dpo@" in status and "self_reward:8" in status
