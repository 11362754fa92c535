"""Supervised fine-tuning with TRL's SFTTrainer (child process), on conversations: CAI's
revisions (SL-CAI) and, when asked, Self-Rewarding's best candidates (RAFT). The loss
covers the whole conversation, TRL's default for the `messages` format (SmolLM2's chat
template has no generation markers for an assistant-only loss). Held-out loss before and
after says whether it learned."""

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from pipeline.training.common import (
    load_policy,
    load_splits,
    lora_config,
    run_trainer,
    trainer_args,
)

EVAL_KEYS = {"eval_loss": "heldout_loss"}


def train_sft(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    cuda = spec["device"] == "cuda"
    train, test = load_splits(spec["data_dir"])
    train = train.select_columns(["messages"])
    test = test.select_columns(["messages"]) if test is not None else None
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    model = load_policy(spec["base_model"], cuda)
    args = SFTConfig(**trainer_args(spec, out), packing=False)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=lora_config(spec, "CAUSAL_LM"),
    )
    metrics: dict[str, Any] = {"train_examples": len(train), "heldout_examples": len(test or [])}
    return run_trainer(trainer, spec, out, tokenizer, EVAL_KEYS, metrics)
