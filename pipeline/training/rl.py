"""Online RL with TRL's GRPOTrainer and RLOOTrainer (child process), against any judge.

The step's `reward` judge is built here by the code every method uses (`build_judge`):
a function, a reward model on a scorer engine, or a template read by a transformers
engine on its model (the step's starting model when the judge names none). TRL calls it as
a reward function; every call's answers and rewards are appended to the checkpoint's
`rollouts.jsonl`, which the parent stores as `generations` and `judgments` rows with the
step (this process never opens the database).

Held-out prompts are rolled out and rewarded before and after training (TRL's evaluate):
`heldout_reward_before` -> `heldout_reward` says whether the reward moved on prompts the
step did not train on.
"""

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, TrainerCallback

from pipeline.errors import PrefloopError
from pipeline.judging import JUDGES, Judge, JudgeItem, build_judge, load_judge
from pipeline.schema import EngineConfig, kind_settings
from pipeline.templates import TemplateLibrary
from pipeline.training.common import (
    load_policy,
    load_splits,
    lora_config,
    run_trainer,
    trainer_args,
)
from pipeline.training.rollouts import JUDGE_FILE, ROLLOUTS_FILE, reward_of

EVAL_KEYS = {"eval_reward": "heldout_reward", "eval_kl": "heldout_kl"}
# Phases of a rollout, stored as its generation's `role`.
BEFORE, TRAIN, AFTER = "heldout_before", "rollout", "heldout_after"


class RewardError(PrefloopError):
    pass


def build_reward(spec: dict[str, Any]) -> Judge:
    """The step's reward judge, on the engine its kind runs on (none for a function)."""
    reward = spec["extra"]["reward"]
    settings = kind_settings(JUDGES, lambda kind: kind.config, "template", reward["settings"])
    loaded = load_judge(settings, TemplateLibrary())
    kind, engine = JUDGES[settings.kind], None
    if kind.needs_engine:
        from pipeline.engines import GENERATE, SCORE, start_for_role

        role = SCORE if kind.scorer else GENERATE
        engine = start_for_role(
            Path(reward["model_path"]), EngineConfig(kind="hf"), spec["seed"], role
        )
    return build_judge(settings, loaded, engine, reward["model_id"])


def last_user_turn(conversation: Sequence[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(conversation) if m["role"] == "user")


class RecordedReward(TrainerCallback):
    """A TRL reward function over a judge that records every answer it scores, in which
    phase (held-out before, training, held-out after) and at which optimizer step."""

    __name__ = "reward"  # TRL logs it as rewards/reward/mean

    def __init__(
        self, judge: Judge, out: Path, eos_ids: set[int], max_tokens: int, metrics: dict
    ) -> None:
        self.judge, self.path = judge, out / ROLLOUTS_FILE
        self.eos_ids, self.max_tokens = eos_ids, max_tokens
        self.phase, self.calls = BEFORE, 0
        self.metrics = metrics  # the step's metrics: what training did is added at its end
        (out / JUDGE_FILE).write_text(json.dumps(judge_record(judge), sort_keys=True))

    def on_train_begin(self, args, state, control, **kwargs):
        self.phase = TRAIN

    def on_train_end(self, args, state, control, **kwargs):
        self.phase = AFTER
        self.metrics.update(train_metrics(state.log_history))

    def __call__(self, prompts, completions, completion_ids, trainer_state, **columns):
        items = [
            JudgeItem(last_user_turn(p), c[-1]["content"], list(p))
            for p, c in zip(prompts, completions, strict=True)
        ]
        try:
            samples = self.judge.score(items)
        except PrefloopError:
            raise
        except Exception as e:  # the user's rule: one line that names it
            raise RewardError(
                f"reward {self.judge.judge_id}: raised {type(e).__name__}: {e}"
            ) from None
        step = trainer_state.global_step + (1 if self.phase == TRAIN else 0)
        answers = zip(items, completion_ids, columns["prompt_id"], samples, strict=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for i, (item, ids, prompt_id, judged) in enumerate(answers):
                record = {
                    "phase": self.phase,
                    "step": step,
                    "call": self.calls,
                    "index": i,
                    "prompt_id": prompt_id,
                    "text": item.response,
                    "n_tokens": len(ids),
                    "finish_reason": self.finish_reason(ids),
                    "samples": [[s.raw, s.score, s.status] for s in judged],
                }
                f.write(json.dumps(record) + "\n")
        self.calls += 1
        return [reward_of([s.score for s in judged]) for judged in samples]

    def finish_reason(self, ids: list[int]) -> str:
        if ids and ids[-1] in self.eos_ids:
            return "stop"
        return "length" if len(ids) >= self.max_tokens else "stop"


def judge_record(judge: Judge) -> dict[str, Any]:
    """The judge's provenance, for its `judgments` rows (and its template's row)."""
    return {
        "judge_id": judge.judge_id,
        "key": judge.key,
        "model_id": judge.model_id,
        "template": judge.template.record() if judge.template is not None else None,
        "sampling": judge.sampling,
    }


def use_vllm(generation: str, cuda: bool) -> bool:
    """TRL samples with vLLM inside the trainer (colocate mode) on CUDA only."""
    if generation == "vllm" and not cuda:
        raise PrefloopError("generation: vllm inside the trainer needs CUDA; use transformers")
    installed = importlib.util.find_spec("vllm") is not None
    return generation == "vllm" or (generation == "auto" and cuda and installed)


def rl_args(spec: dict[str, Any], out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The trainer config shared by GRPO and RLOO."""
    cuda = spec["device"] == "cuda"
    args = trainer_args(spec, out)
    args.pop("max_length")
    vllm = use_vllm(settings["generation"], cuda)
    group = settings["num_generations"]
    return {
        **args,
        # One held-out batch holds whole groups of answers to a prompt.
        "per_device_eval_batch_size": group * max(1, args["per_device_train_batch_size"] // group),
        "max_steps": settings["max_steps"] or -1,
        "num_generations": settings["num_generations"],
        "max_completion_length": settings["max_completion_length"],
        "beta": settings["beta"],
        "temperature": settings["temperature"],
        "top_p": settings["top_p"],
        "epsilon": settings["epsilon"],
        "num_iterations": settings["num_iterations"],
        "use_vllm": vllm,
        **({"vllm_mode": "colocate"} if vllm else {}),
        "eval_strategy": "no",
    }


def train_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The training reward at the first and last step, and the mean KL to the start."""
    logged = [h for h in log_history if "reward" in h and "loss" in h]
    kls = [h["kl"] for h in logged if h.get("kl") is not None]
    return {
        "first_step_reward": logged[0]["reward"] if logged else None,
        "last_step_reward": logged[-1]["reward"] if logged else None,
        "mean_kl": sum(kls) / len(kls) if kls else None,
    }


def train_online(spec: dict[str, Any], out: Path, kind: str) -> dict[str, Any]:
    if kind == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    settings = spec["training"][kind]
    cuda = spec["device"] == "cuda"
    train, test = load_splits(spec["data_dir"])
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    metrics: dict[str, Any] = {"train_prompts": len(train), "heldout_prompts": len(test or [])}
    reward = RecordedReward(
        build_reward(spec),
        out,
        {tokenizer.eos_token_id, *([tokenizer.pad_token_id] if tokenizer.pad_token_id else [])},
        settings["max_completion_length"],
        metrics,
    )
    metrics["reward_judge"] = reward.judge.judge_id
    trainer = Trainer(
        model=load_policy(spec["base_model"], cuda),
        reward_funcs=[reward],
        args=Config(**rl_args(spec, out, settings)),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        callbacks=[reward],
        peft_config=lora_config(spec, "CAUSAL_LM"),
    )
    return run_trainer(trainer, spec, out, tokenizer, EVAL_KEYS, metrics)


def train_grpo(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    return train_online(spec, out, "grpo")


def train_rloo(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    return train_online(spec, out, "rloo")
