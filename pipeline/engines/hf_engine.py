"""transformers engine: batched `generate` with left padding; the fallback and reference."""

import gc
from dataclasses import dataclass
from pathlib import Path

from pipeline.engines.base import Completion, EngineBase, Sampling, hashed_seed, truncate_at_stop
from pipeline.schema import EngineConfig


@dataclass
class HfEngine(EngineBase):
    kind = "hf"  # what the run's console calls it
    model: object = None
    batch_size: int = 16

    @classmethod
    def start(cls, model_path: Path, cfg: EngineConfig, seed: int) -> "HfEngine":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch_dtype(cfg.dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        return cls(
            model_path=model_path,
            seed=seed,
            max_model_len=cfg.max_model_len,
            tokenizer=tokenizer,
            model=model,
            # Sequences per forward pass; bounds memory, not the caller's batch.
            batch_size=max(1, min(cfg.batch_size, 32)),
        )

    def _padded(self, prompts: list[list[int]]):
        import torch

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = [[pad] * (width - len(p)) + p for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        device = self.model.device
        return torch.tensor(ids, device=device), torch.tensor(mask, device=device)

    def _generate_ids(self, prompts: list[list[int]], params: Sampling) -> list[list[Completion]]:
        import torch

        # The call's seed comes from the run's seed and the request itself, not from a call
        # counter: a resumed run redoes a batch exactly as an uninterrupted run did it.
        torch.manual_seed(hashed_seed(self.seed, prompts, params.record()))
        eos = set(_as_list(self.model.generation_config.eos_token_id))
        eos.add(self.tokenizer.eos_token_id)
        per_step = max(1, self.batch_size // params.n)
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), per_step):
            chunk = prompts[start : start + per_step]
            input_ids, mask = self._padded(chunk)
            sample = params.temperature > 0
            with torch.no_grad():
                generated = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    do_sample=sample,
                    temperature=params.temperature if sample else None,
                    top_p=params.top_p if sample else None,
                    top_k=None,
                    max_new_tokens=min(params.max_tokens, self.max_model_len - input_ids.shape[1]),
                    num_return_sequences=params.n,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=sorted(eos),
                )
            new = generated[:, input_ids.shape[1] :].tolist()
            for i in range(len(chunk)):
                out.append(
                    [
                        self._completion(t, eos, params)
                        for t in new[i * params.n : (i + 1) * params.n]
                    ]
                )
        return out

    def _completion(self, tokens: list[int], eos: set[int], params: Sampling) -> Completion:
        end = next((i for i, t in enumerate(tokens) if t in eos), None)
        finish = "length" if end is None else "stop"
        tokens = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, stopped = truncate_at_stop(text, params.stop)
        if stopped:
            finish = "stop"
            tokens = self.encode(text)
        return Completion(text, len(tokens), finish)

    def _label_logprobs(self, prompts: list[list[int]], label_ids: list[int]) -> list[list[float]]:
        import torch

        rows: list[list[float]] = []
        for start in range(0, len(prompts), self.batch_size):
            input_ids, mask = self._padded(prompts[start : start + self.batch_size])
            with torch.no_grad():
                # Only the last position's logits: the LM head over every position would
                # cost vocabulary x length for one row used.
                out = self.model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1)
                logits = out.logits[:, -1, :]
            logprobs = torch.log_softmax(logits.float(), dim=-1)[:, label_ids]
            rows.extend(logprobs.tolist())
        return rows

    def close(self) -> None:
        if self.model is not None:
            self.model = None
            gc.collect()


def torch_dtype(name: str, device: str):
    """The engine's `dtype` setting as a torch dtype; `auto` is bf16 on CUDA, else fp32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
