"""DPO with TRL's DPOTrainer (child process). The policy starts from the step's model (the
round's, or the previous step's); the reference is that model unless the spec names
another (`training.reference`)."""

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from pipeline.training.common import (
    load_policy,
    load_splits,
    lora_config,
    run_trainer,
    trainer_args,
)

# Held-out metrics DPOTrainer reports, as stored in training_runs.metrics_json.
EVAL_KEYS = {
    "eval_loss": "heldout_loss",
    "eval_rewards/accuracies": "heldout_reward_accuracy",
    "eval_rewards/margins": "heldout_reward_margin",
}


def train_dpo(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    t = spec["training"]
    cuda = spec["device"] == "cuda"
    train, test = load_splits(spec["data_dir"])
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    model = load_policy(spec["base_model"], cuda)
    ref = spec.get("reference_model")
    ref_model = load_policy(ref, cuda) if ref and ref != spec["base_model"] else None
    loss_type = t["loss_type"] or "sigmoid"
    args = DPOConfig(**trainer_args(spec, out), beta=t["beta"], loss_type=[loss_type])
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=lora_config(spec, "CAUSAL_LM"),
    )
    metrics: dict[str, Any] = {"train_pairs": len(train), "heldout_pairs": len(test or [])}
    return run_trainer(trainer, spec, out, tokenizer, EVAL_KEYS, metrics)
