"""A Bradley-Terry reward model with TRL's RewardTrainer (child process), on a
sequence-classification head over the policy's base. The margin column and soft labels
are used when the pairs have them."""

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from pipeline.training.common import load_splits, lora_config, run_trainer, trainer_args

EVAL_KEYS = {"eval_loss": "heldout_loss", "eval_accuracy": "heldout_pairwise_accuracy"}


class SoftLabelCollator(DataCollatorForPreference):
    def torch_call(self, examples):
        batch = super().torch_call(examples)
        if "soft_label" in examples[0]:
            batch["soft_label"] = torch.tensor(
                [e["soft_label"] for e in examples], dtype=torch.float
            )
        return batch


class SoftLabelRewardTrainer(RewardTrainer):
    """RewardTrainer whose loss takes a soft label y = P(chosen is better):
    -(y log s(d) + (1 - y) log s(-d)), d = r_chosen - r_rejected - margin. With y = 1 this
    is TRL's loss exactly; the CAI paper found soft labels beat hard ones for RMs."""

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "soft_label"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        soft = inputs.pop("soft_label", None)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if soft is not None:
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            d = chosen - rejected - inputs.get("margin", 0.0)
            loss = -(
                soft * nn.functional.logsigmoid(d) + (1 - soft) * nn.functional.logsigmoid(-d)
            ).mean()
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean(
                    (chosen + rejected) ** 2
                )
        return (loss, outputs) if return_outputs else loss


def _prepare(ds, use_margin: bool):
    """Hard pairs get soft label 1; margins are used only when every pair has one."""
    if ds is None:
        return None
    ds = ds.map(lambda e: {"soft_label": 1.0 if e["soft_label"] is None else e["soft_label"]})
    drop = ["pair_id", "method", "variant"] + ([] if use_margin else ["margin"])
    return ds.remove_columns(drop)


def train_reward(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    cuda = spec["device"] == "cuda"
    train, test = load_splits(spec["data_dir"])
    use_margin = all(m is not None for m in train["margin"])
    train, test = _prepare(train, use_margin), _prepare(test, use_margin)
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["base_model"], num_labels=1, dtype=torch.bfloat16 if cuda else torch.float32
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(**trainer_args(spec, out), remove_unused_columns=False)
    trainer = SoftLabelRewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        data_collator=SoftLabelCollator(pad_token_id=tokenizer.pad_token_id),
        peft_config=lora_config(spec, "SEQ_CLS"),
    )
    metrics: dict[str, Any] = {
        "train_pairs": len(train),
        "heldout_pairs": len(test or []),
        "uses_margin": use_margin,
        "soft_labels": sum(1 for y in train["soft_label"] if y != 1.0),
    }
    return run_trainer(trainer, spec, out, tokenizer, EVAL_KEYS, metrics, before=False)
