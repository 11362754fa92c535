"""KTO with TRL's KTOTrainer (child process), on unpaired desirable / undesirable answers.
Like DPO it trains against a frozen reference (the step's starting model unless the spec
names another). Its held-out metrics are TRL's eval loss and KL, plus the implicit
reward's pairwise accuracy and margin on held-out pairs (both answers of a pair share a
split), measured the way DPO's are: r = beta * (log pi(y|x) - log pi_ref(y|x))."""

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer
from trl import KTOConfig, KTOTrainer

from pipeline.training.common import (
    load_policy,
    load_splits,
    lora_config,
    run_trainer,
    trainer_args,
)

COLUMNS = ["prompt", "completion", "label"]
EVAL_KEYS = {"eval_loss": "heldout_loss", "eval_kl": "heldout_kl"}


def completion_logp(model, tokenizer, prompt: list, completion: list, max_length: int) -> float:
    """log P(completion | prompt) under `model`, both rendered by the chat template; the
    prompt is cut from the left when the two exceed max_length."""
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    prompt_ids = tokenizer.encode(head, add_special_tokens=False)
    answer_ids = tokenizer.encode(full[len(head) :], add_special_tokens=False)
    ids = (prompt_ids + answer_ids)[-max_length:]
    n = min(len(answer_ids), len(ids) - 1)
    input_ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1)
    targets = input_ids[0, 1:]
    return float(logps[-n:].gather(1, targets[-n:, None]).sum())


def pair_rewards(policy, reference, tokenizer, test, beta: float, max_length: int) -> dict:
    """Implicit-reward accuracy and margin over held-out pairs with both answers."""
    sides: dict[str, dict[bool, float]] = {}
    policy.eval()
    for e in test:
        if e["pair_id"] is None:
            continue
        lp = completion_logp(policy, tokenizer, e["prompt"], e["completion"], max_length)
        ref = completion_logp(reference, tokenizer, e["prompt"], e["completion"], max_length)
        sides.setdefault(e["pair_id"], {})[bool(e["label"])] = beta * (lp - ref)
    margins = [s[True] - s[False] for s in sides.values() if len(s) == 2]
    if not margins:
        return {}
    return {
        "heldout_reward_accuracy": sum(m > 0 for m in margins) / len(margins),
        "heldout_reward_margin": sum(margins) / len(margins),
        "heldout_pairs": len(margins),
    }


def train_kto(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    t = spec["training"]
    cuda = spec["device"] == "cuda"
    train, test = load_splits(spec["data_dir"])
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    model = load_policy(spec["base_model"], cuda)
    ref_path = spec.get("reference_model") or spec["base_model"]
    ref_model = load_policy(ref_path, cuda) if ref_path != spec["base_model"] else None
    args = KTOConfig(
        **trainer_args(spec, out),
        beta=t["beta"],
        loss_type=t["loss_type"] or "kto",
        desirable_weight=t["kto"]["desirable_weight"],
        undesirable_weight=t["kto"]["undesirable_weight"],
    )
    trainer = KTOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train.select_columns(COLUMNS),
        eval_dataset=test.select_columns(COLUMNS) if test is not None else None,
        processing_class=tokenizer,
        peft_config=lora_config(spec, "CAUSAL_LM"),
    )
    labels = train["label"]
    metrics: dict[str, Any] = {
        "train_examples": len(train),
        "heldout_examples": len(test or []),
        "desirable": sum(labels),
        "undesirable": len(labels) - sum(labels),
    }

    def implicit_rewards() -> dict[str, Any]:
        # TRL's own frozen reference when it kept one (not with LoRA, nor after
        # precomputing reference log-probs): loaded once, not twice.
        reference = trainer.ref_model
        if reference is None:
            reference = load_policy(ref_path, cuda).to(trainer.model.device)
        return pair_rewards(trainer.model, reference, tokenizer, test, t["beta"], t["max_length"])

    return run_trainer(trainer, spec, out, tokenizer, EVAL_KEYS, metrics, after=implicit_rewards)
