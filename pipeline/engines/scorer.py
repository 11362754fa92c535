"""A reward model as an engine: a Hugging Face sequence-classification checkpoint with one
output scores (conversation, answer) in batches, through the model's own chat template.

The text is tokenized exactly as TRL's RewardTrainer tokenizes a training pair (the whole
conversation, answer included, through `apply_chat_template`), so a reward model that
`training.kind: rm` trained scores answers the way it learned to.
"""

import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.engines.base import Conversation, TokenCounter
from pipeline.engines.hf_engine import torch_dtype
from pipeline.errors import EngineError, ModelError
from pipeline.schema import EngineConfig


def check_reward_model(path: Path) -> None:
    """A reward model is a sequence-classification checkpoint with one output; refused
    before any engine starts otherwise (a causal LM would get a random head)."""
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        found = ", ".join(architectures) or "none"
        raise ModelError(
            f"{path}: not a reward model (architectures: {found}); a reward_model judge needs "
            "a sequence-classification checkpoint, e.g. what `training.kind: rm` trains"
        )
    labels = config.get("num_labels", len(config.get("id2label") or {}) or 2)
    if labels != 1:
        raise ModelError(f"{path}: a reward model has one output (num_labels 1), this has {labels}")


@dataclass
class RewardScorer:
    kind = "reward_model"  # what the run's console calls it
    model_path: Path
    seed: int
    max_model_len: int
    tokenizer: object = None
    model: object = None
    batch_size: int = 16
    counter: TokenCounter = field(default_factory=TokenCounter)

    @classmethod
    def start(cls, model_path: Path, cfg: EngineConfig, seed: int) -> "RewardScorer":
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_reward_model(model_path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch_dtype(cfg.dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(
            model_path=model_path,
            seed=seed,
            max_model_len=cfg.max_model_len,
            tokenizer=tokenizer,
            model=model.to(device).eval(),
            batch_size=max(1, min(cfg.batch_size, 32)),
        )

    def encode_conversation(self, conversation: Conversation) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def score(self, conversations: Sequence[Conversation]) -> list[float | None]:
        """The reward of each conversation's last (assistant) turn; None where it does not
        fit `max_model_len`. Batches are sorted by length so padding stays small."""
        import torch

        if self.model is None:
            raise EngineError(f"{self.model_path}: the reward model was closed")
        ids = [self.encode_conversation(c) for c in conversations]
        out: list[float | None] = [None] * len(ids)
        fits = sorted(
            (i for i, seq in enumerate(ids) if len(seq) <= self.max_model_len),
            key=lambda i: -len(ids[i]),
        )
        pad = self.model.config.pad_token_id
        device = self.model.device
        for start in range(0, len(fits), self.batch_size):
            chunk = fits[start : start + self.batch_size]
            width = len(ids[chunk[0]])
            batch = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in chunk])
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in chunk])
            with torch.no_grad():
                logits = self.model(input_ids=batch.to(device), attention_mask=mask.to(device))
            for i, value in zip(chunk, logits.logits[:, 0].float().tolist(), strict=True):
                out[i] = value
            self.counter.prompt_tokens += sum(len(ids[i]) for i in chunk)
        self.counter.requests += len(fits)
        return out

    def close(self) -> None:
        if self.model is not None:
            self.model = None
            gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
