"""OpenAI-compatible HTTP engine, e.g. `vllm serve` on GPU nodes: the way past one machine.

Prompts are rendered here with the local copy of the model's tokenizer and sent as token
ids to the completions API, so a remote server sees exactly what a local engine would.
"""

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline.engines.base import Completion, EngineBase, Sampling
from pipeline.errors import EngineError, TransientEngineError
from pipeline.schema import EngineConfig

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass
class OpenAIEngine(EngineBase):
    base_url: str = ""
    served_model: str = ""
    client: httpx.Client | None = None
    max_concurrency: int = 16
    max_retries: int = 4

    @classmethod
    def start(cls, model_path: Path, cfg: EngineConfig, seed: int) -> "OpenAIEngine":
        from transformers import AutoTokenizer

        if not cfg.base_url:
            raise EngineError(
                "engine.base_url: required for engine.kind openai (e.g. http://127.0.0.1:8000/v1)"
            )
        headers = {}
        key = os.environ.get(cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        client = httpx.Client(
            base_url=cfg.base_url.rstrip("/"),
            timeout=cfg.timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=cfg.max_concurrency),
        )
        return cls(
            model_path=model_path,
            seed=seed,
            max_model_len=cfg.max_model_len,
            tokenizer=AutoTokenizer.from_pretrained(model_path),
            base_url=cfg.base_url,
            served_model=cfg.served_model_name or str(model_path),
            client=client,
            max_concurrency=cfg.max_concurrency,
            max_retries=cfg.max_retries,
        )

    def ping(self) -> None:
        """Fail at once, with one line, when nothing answers at `base_url`."""
        try:
            self.client.get("/models", timeout=10.0).raise_for_status()
        except httpx.HTTPError as e:
            raise EngineError(
                f"engine.base_url: {self.base_url} does not answer ({e}); is the server running?"
            ) from None

    def _post(self, body: dict) -> dict:
        """POST /completions; retries timeouts, dropped connections, 429 and 5xx with
        jittered backoff."""
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self.client.post("/completions", json=body)
            except httpx.TransportError as e:
                # Mid-run, a refused or dropped connection is a server restarting or gone:
                # retried here and by the flow. A wrong URL is caught before the run (`ping`).
                if last:
                    raise TransientEngineError(
                        f"{self.base_url}: {_transport_failure(e)} after "
                        f"{self.max_retries + 1} tries ({e}); "
                        "is the server running?"
                    ) from None
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in _RETRY_STATUS or last:
                    kind = (
                        TransientEngineError
                        if response.status_code in _RETRY_STATUS
                        else EngineError
                    )
                    raise kind(
                        f"{self.base_url}: HTTP {response.status_code}: {response.text[:200]}"
                    )
            time.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _map(self, fn, items: list) -> list:
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(fn, items))

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
                "seed": self.seed + i,
                # Asked only to count each choice's tokens exactly (re-tokenizing the text
                # can give another count).
                "logprobs": 0,
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
        # Exact log-probabilities: echo each prompt with the label appended and read the
        # label's prompt logprob (top-k next-token lists may miss a label).
        def one(item: tuple[list[int], int]) -> float:
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

        flat = self._map(one, [(ids, label) for ids in prompts for label in label_ids])
        k = len(label_ids)
        return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _n_tokens(choice: dict) -> int | None:
    tokens = (choice.get("logprobs") or {}).get("tokens")
    return len(tokens) if tokens is not None else None


def _transport_failure(e: httpx.TransportError) -> str:
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.ConnectError):
        return "cannot connect"
    return "lost the connection"
