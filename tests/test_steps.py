"""Training steps in the loop: two rounds of [sft, dpo] through the real Prefect flow, the
model lineage they register, and `prefloop export` output that TRL's own SFTTrainer and
KTOTrainer read in a script that imports nothing from prefloop."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TESTS, tiny_config, write_config

from pipeline.store import Store

pytestmark = pytest.mark.slow


def _steps_config(tmp_path: Path, model: Path) -> dict:
    """Two tiny rounds whose training is the Constitutional-AI recipe: SFT on the round's
    revisions (and its best Self-Rewarding candidates), then DPO from the SFT model."""
    sft = {"kind": "sft", "learning_rate": 1e-3, "epochs": 3, "sft": {"best_of_n": True}}
    return tiny_config(
        tmp_path,
        model,
        name="steps",
        self_reward={
            "judge": {"kind": "template", "template": "judge_additive_5pt_prefilled"},
            "sampling": {"max_tokens": 8},
            "self_instruct": {"enabled": False},
        },
        training={"heldout_fraction": 0.25, "steps": [sft, "dpo"]},
    )


def test_two_rounds_of_sft_then_dpo(harness, tmp_path, tiny_model_dir):
    from flows.loop import loop_flow

    cfg = _steps_config(tmp_path, tiny_model_dir)
    result = loop_flow(cfg)
    with Store(cfg["db_path"], read_only=True) as store:
        runs = {
            (r["round"], r["kind"]): r
            for r in store.query("SELECT * FROM training_runs WHERE run_id = 'steps'")
        }
        assert set(runs) == {(1, "sft"), (1, "dpo"), (2, "sft"), (2, "dpo")}
        base = store.round_info("steps", 1)["model_id"]
        # base -> r1-sft -> r1-dpo -> r2-sft -> r2-dpo, each registered with its parent.
        chain = [base] + [runs[(t, k)]["output_model_id"] for t in (1, 2) for k in ("sft", "dpo")]
        for parent, child in zip(chain, chain[1:], strict=False):
            assert store.model(child)["parent_model_id"] == parent
        assert [c.split("@")[0] for c in chain[1:]] == [
            "steps-r1-sft",
            "steps-r1-dpo",
            "steps-r2-sft",
            "steps-r2-dpo",
        ]
        # DPO trained against the SFT model it started from.
        assert runs[(1, "dpo")]["reference_model_id"] == chain[1]
        # Round 2 generated with round 1's DPO model; the run ends on round 2's.
        assert store.round_info("steps", 2)["model_id"] == chain[2]
        [[r2_model]] = store.sql(
            "SELECT DISTINCT model_id FROM generations WHERE round = 2 AND method <> 'evaluation'"
        )[1]
        assert r2_model == chain[2] and result["final_model"] == chain[4]
        # SFT learned: held-out loss after is below before, in the round's evaluations.
        evals = {
            (e["round"], e["metric"]): e
            for e in store.evaluations("steps")
            if e["metric"] in ("sft_heldout_loss", "implicit_reward_accuracy")
        }
        for t in (1, 2):
            sft = evals[(t, "sft_heldout_loss")]
            assert sft["value"] < json.loads(sft["details_json"])["before"]
            assert (t, "implicit_reward_accuracy") in evals
        stages = {s for (s,) in store.sql("SELECT DISTINCT stage FROM stage_metrics")[1]}
        assert {"train_sft", "train_dpo"} <= stages
        plan = json.loads(store.round_info("steps", 1)["plan_json"])
        names = [name for name, _ in plan["stages"]]
        assert names.index("train_sft") + 1 == names.index("train_dpo")
    # The report draws the steps with their lineage and held-out numbers.
    page = Path(result["report"]).read_text()
    assert 'id="training"' in page and "held-out loss" in page and chain[3] in page
    snap = Path(cfg["runs_dir"]) / "steps" / "round-1"
    for kind in ("sft", "dpo"):
        assert (snap / f"data-{kind}" / "train.parquet").is_file()
        assert (snap / f"model-{kind}" / "model.safetensors").is_file()

    # Export for each kind in TRL's formats; a script importing nothing from prefloop
    # trains TRL's SFTTrainer and KTOTrainer on them.
    path = tmp_path / "steps.yaml"
    write_config(cfg, path)
    for kind in ("sft", "kto"):
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "export", "--config", str(path), "--round", "1"]
            + ["--kind", kind, "--format", "jsonl", "--out", str(tmp_path / kind)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"({kind}" in out.stdout or f"jsonl, {kind})" in out.stdout
    script = tmp_path / "outside.py"
    script.write_text((TESTS / "data" / "outside_trl.py").read_text())
    out = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "sft")]
        + [str(tmp_path / "kto"), str(tmp_path / "outside-out")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # not the repository: nothing of prefloop is importable by path
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["sft_steps"] > 0 and report["kto_steps"] > 0
    assert report["prefloop_modules"] == []
