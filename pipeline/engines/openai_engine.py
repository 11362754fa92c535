"""OpenAI-compatible HTTP engine, e.g. `vllm serve` on GPU nodes: the way past one machine.

Prompts are rendered here with the local copy of the model's tokenizer and sent as token
ids to the completions API, so a remote server sees exactly what a local engine would.
`engine.base_url` may list several servers of the same model: requests are spread by
load and a server that stops answering is left out until it answers again
(pipeline/engines/servers.py).
"""

import contextvars
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.engines.base import Completion, EngineBase, Sampling, hashed_seed
from pipeline.engines.servers import ServerPool
from pipeline.errors import EngineError
from pipeline.schema import EngineConfig

TOP_LOGPROBS = 20  # vLLM's default `max_logprobs`: the most a server returns per token
TOKEN_ID = "token_id:"  # how `return_tokens_as_token_ids` names a token


@dataclass
class OpenAIEngine(EngineBase):
    kind = "openai"  # what the run's console calls it
    pool: ServerPool | None = None
    served_model: str = ""
    max_concurrency: int = 16  # requests in flight per server

    @classmethod
    def start(
        cls, model_path: Path, cfg: EngineConfig, seed: int, tokenizer_dir: Path | None = None
    ) -> "OpenAIEngine":
        """`tokenizer_dir`: where the model's tokenizer files are, when not in
        `model_path` (a task on a machine without the model: flows/engines.py)."""
        from transformers import AutoTokenizer

        return cls(
            model_path=model_path,
            seed=seed,
            max_model_len=cfg.max_model_len,
            tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir or model_path),
            pool=open_pool(cfg),
            served_model=cfg.served_model_name or str(model_path),
            max_concurrency=cfg.max_concurrency,
        )

    def ping(self) -> None:
        """Fail at once, with one line, when a server in `base_url` does not answer."""
        self.pool.ping()

    def server_stats(self) -> dict[str, dict]:
        return self.pool.snapshot()

    def _post(self, body: dict) -> dict:
        return self.pool.post("/completions", body)

    def _map(self, fn, items: list) -> list:
        # Each request runs in a copy of the caller's context: its stage's tally counts it.
        with ThreadPoolExecutor(self.max_concurrency * len(self.pool.servers)) as pool:
            futures = [pool.submit(contextvars.copy_context().run, fn, x) for x in items]
            return [f.result() for f in futures]

    def _generate_ids(self, prompts: list[list[int]], params: Sampling) -> list[list[Completion]]:
        def one(indexed: tuple[int, list[int]]) -> list[Completion]:
            i, ids = indexed
            body = {
                "model": self.served_model,
                "prompt": ids,
                "n": params.n,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_tokens": min(params.max_tokens, self.max_model_len - len(ids)),
                # Distinct per request but reproducible under the run's seed.
                "seed": hashed_seed(self.seed, i),
                # Each choice's token ids (vLLM), only to count its tokens exactly:
                # re-tokenizing the text can give another count. Asking `logprobs: 0` for
                # the same made generation ~6% slower on vLLM-CPU (docs/cluster.md).
                "return_token_ids": True,
            }
            if params.stop:
                body["stop"] = list(params.stop)
            choices = sorted(self._post(body)["choices"], key=lambda c: c["index"])
            return [
                Completion(
                    c["text"],
                    _n_tokens(c) or len(self.encode(c["text"])),
                    c.get("finish_reason") or "stop",
                )
                for c in choices
            ]

        return self._map(one, list(enumerate(prompts)))

    def _label_logprobs(self, prompts: list[list[int]], label_ids: list[int]) -> list[list[float]]:
        # One request per prompt for the next token's top log-probabilities, keyed by token
        # id (vLLM's `return_tokens_as_token_ids`): the raw numbers an echoed prompt gives,
        # without a request per label and without the server scoring every prompt position
        # (docs/benchmarks.md, bench/peers.py). A label outside the top TOP_LOGPROBS is
        # read exactly: the prompt echoed with the label appended.
        def top(ids: list[int]) -> dict[int, float]:
            body = {
                "model": self.served_model,
                "prompt": ids,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": TOP_LOGPROBS,
                "return_tokens_as_token_ids": True,
            }
            [found] = self._post(body)["choices"][0]["logprobs"]["top_logprobs"]
            return {
                int(k.removeprefix(TOKEN_ID)): float(v)
                for k, v in found.items()
                if k.startswith(TOKEN_ID)
            }

        def echoed(item: tuple[list[int], int]) -> float:
            ids, label = item
            body = {
                "model": self.served_model,
                "prompt": ids + [label],
                "max_tokens": 1,
                "temperature": 0.0,
                "echo": True,
                "logprobs": 0,
            }
            logprobs = self._post(body)["choices"][0]["logprobs"]["token_logprobs"]
            return float(logprobs[len(ids)])

        tops = self._map(top, prompts)
        missing = [(i, label) for i, t in enumerate(tops) for label in label_ids if label not in t]
        exact = self._map(echoed, [(prompts[i], label) for i, label in missing])
        for (i, label), logprob in zip(missing, exact, strict=True):
            tops[i][label] = logprob
        return [[t[label] for label in label_ids] for t in tops]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def open_pool(cfg: EngineConfig) -> ServerPool:
    """The servers of `engine.base_url`, with the API key from `engine.api_key_env`."""
    urls = cfg.base_urls()
    if not urls:
        raise EngineError(
            "engine.base_url: required for engine.kind openai (e.g. http://127.0.0.1:8000/v1)"
        )
    headers = {}
    key = os.environ.get(cfg.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return ServerPool.open(urls, headers, cfg.timeout_s, cfg.max_concurrency, cfg.max_retries)


def _n_tokens(choice: dict) -> int | None:
    """The choice's token count from the ids a vLLM server returns, or its log-probability
    tokens; None from a server that sends neither (the text is encoded then)."""
    tokens = choice.get("token_ids") or (choice.get("logprobs") or {}).get("tokens")
    return len(tokens) if tokens is not None else None
