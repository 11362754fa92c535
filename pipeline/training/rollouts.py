"""An online RL step's rollouts: what its training child recorded (every sampled answer
and the reward judge's reading of it) and the `generations` and `judgments` rows the
parent stores with the step, in the same transaction as its model and training run.

A rollout's generation row has `method` = the step's kind, `role` = its phase
(`heldout_before`, `rollout`, `heldout_after`), `train_step` = the optimizer step that
trained on it (0 before training, the last step after) and the step's model; the
`rollouts` view joins each to its prompt and reward.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.hashing import row_id
from pipeline.rows import RoundContext

ROLLOUTS_FILE = "rollouts.jsonl"  # one line per answer: phase, step, prompt, text, samples
JUDGE_FILE = "reward_judge.json"  # the reward judge's provenance


def reward_of(scores: Sequence[float | None]) -> float | None:
    """An answer's reward: the mean of the judge's readings that gave a score (None when
    none did: TRL leaves it out of the group's statistics)."""
    valid = [s for s in scores if s is not None]
    return sum(valid) / len(valid) if valid else None


def rollout_rows(
    checkpoint: Path, ctx: RoundContext, kind: str, training_run_id: str, sampling: dict
) -> dict[str, list[dict[str, Any]]]:
    """The rows of every rollout a finished step recorded in its checkpoint folder."""
    path = Path(checkpoint) / ROLLOUTS_FILE
    if not path.is_file():
        return {}
    judge = json.loads((Path(checkpoint) / JUDGE_FILE).read_text())
    group = sampling["num_generations"]
    sampling_json = json.dumps(sampling, sort_keys=True)
    judge_sampling = json.dumps(judge["sampling"], sort_keys=True)
    template = judge["template"]
    generations, judgments = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        where = (r["phase"], r["step"], r["call"], r["index"])
        gid = row_id(ctx.run_id, ctx.round, kind, r["prompt_id"], training_run_id, *where)
        generations.append(
            {
                "generation_id": gid,
                "run_id": ctx.run_id,
                "round": ctx.round,
                "method": kind,
                "prompt_id": r["prompt_id"],
                "model_id": ctx.model_id,
                "role": r["phase"],
                "sample_idx": r["index"] % group,
                "text": r["text"],
                "n_tokens": r["n_tokens"],
                "finish_reason": r["finish_reason"],
                "sampling_json": sampling_json,
                "seed": ctx.seed,
                "train_step": r["step"],
                "meta_json": json.dumps({"training_run_id": training_run_id, "call": r["call"]}),
            }
        )
        for k, (raw, score, status) in enumerate(r["samples"]):
            judgments.append(
                {
                    "judgment_id": row_id(ctx.run_id, ctx.round, kind, gid, judge["key"], k),
                    "run_id": ctx.run_id,
                    "round": ctx.round,
                    "method": kind,
                    "generation_id": gid,
                    "sample_idx": k,
                    "model_id": judge["model_id"],
                    "judge_id": judge["judge_id"],
                    "template_id": template["template_id"] if template else None,
                    "raw_output": raw,
                    "score": score,
                    "parse_status": status,
                    "sampling_json": judge_sampling,
                    "seed": ctx.seed,
                }
            )
    return {
        "generations": generations,
        "judgments": judgments,
        "templates": [template] if template else [],
    }
