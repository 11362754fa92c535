"""The engine interface: batched chat generation and label probabilities.

Every engine renders conversations with the model's own tokenizer chat template, here, so
all engines see the same token ids for the same request. Engines implement two
token-level calls (`_generate_ids`, `_label_logprobs`); the shared parts (rendering,
context-length checks, option-token checks, normalisation, token accounting) live once
in `EngineBase`.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import EngineError
from pipeline.hashing import row_id

Conversation = list[dict[str, str]]

# finish_reason for a request that was not run because its prompt does not fit the context.
PROMPT_TOO_LONG = "prompt_too_long"


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        return asdict(self)


def hashed_seed(*parts: Any) -> int:
    """A sampling seed from what the samples must follow from alone (the engine's seed and
    a request's index in its call, or a whole call), so that they depend neither on the
    batch around them nor on what the engine drew before. 60 bits of a hash, not seed +
    index, because vLLM gives a request's n samples the seeds s, s+1, ..., which
    neighbouring requests would share."""
    return int(row_id(*parts)[:15], 16)


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finish_reason: str


@dataclass
class TokenCounter:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0


class Engine(Protocol):
    """What methods use. `generate` returns `n` completions per conversation, in order."""

    model_path: Path
    seed: int
    max_model_len: int
    counter: TokenCounter

    def generate(
        self,
        conversations: Sequence[Conversation],
        params: Sampling,
        assistant_prefixes: Sequence[str] | None = None,
    ) -> list[list[Completion]]: ...

    def choice_probs(
        self,
        conversations: Sequence[Conversation],
        options: Sequence[str],
        prefix: str | Sequence[str] = "",
    ) -> list[list[float]]: ...

    def render(self, conversation: Conversation, assistant_prefix: str = "") -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def close(self) -> None: ...


@dataclass
class EngineBase:
    """Shared behaviour; subclasses set `tokenizer` and implement the two token calls."""

    model_path: Path
    seed: int
    max_model_len: int
    tokenizer: Any = None
    counter: TokenCounter = field(default_factory=TokenCounter)

    # -- to implement ---------------------------------------------------------------------

    def _generate_ids(self, prompts: list[list[int]], params: Sampling) -> list[list[Completion]]:
        raise NotImplementedError

    def _label_logprobs(self, prompts: list[list[int]], label_ids: list[int]) -> list[list[float]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- shared ---------------------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render(self, conversation: Conversation, assistant_prefix: str = "") -> str:
        """The model's chat template with the generation prompt, plus an optional start of
        the assistant's reply (e.g. "The answer is: (")."""
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # a template error is the model's, name it
            raise EngineError(f"{self.model_path}: chat template failed: {e}") from None
        return text + assistant_prefix

    def encode(self, text: str) -> list[int]:
        # The chat template already writes every special token.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(
        self,
        conversations: Sequence[Conversation],
        params: Sampling,
        assistant_prefixes: Sequence[str] | None = None,
    ) -> list[list[Completion]]:
        prefixes = assistant_prefixes or [""] * len(conversations)
        prompts = [
            self.encode(self.render(c, p)) for c, p in zip(conversations, prefixes, strict=True)
        ]
        # A prompt that leaves no room for one new token is skipped, not sent: the caller
        # records it (finish_reason PROMPT_TOO_LONG) instead of the whole batch failing.
        fits = [i for i, ids in enumerate(prompts) if len(ids) < self.max_model_len]
        out: list[list[Completion]] = [
            [Completion("", 0, PROMPT_TOO_LONG)] * params.n for _ in prompts
        ]
        if fits:
            results = self._generate_ids([prompts[i] for i in fits], params)
            for i, completions in zip(fits, results, strict=True):
                out[i] = completions
            self.counter.prompt_tokens += sum(len(prompts[i]) for i in fits)
            self.counter.completion_tokens += sum(c.n_tokens for r in results for c in r)
            self.counter.requests += len(fits)
        return out

    def choice_probs(
        self,
        conversations: Sequence[Conversation],
        options: Sequence[str],
        prefix: str | Sequence[str] = "",
    ) -> list[list[float]]:
        """Normalised next-token probabilities of single-token `options` after the
        assistant `prefix` (one for all conversations, or one each, e.g. a judge's own
        reasoning)."""
        if len(options) < 2:
            raise EngineError("choice_probs needs at least two options")
        return self.continuation_probs(conversations, options, prefix, single_token=True)

    def continuation_probs(
        self,
        conversations: Sequence[Conversation],
        continuations: Sequence[str],
        prefix: str | Sequence[str] = "",
        *,
        single_token: bool = False,
    ) -> list[list[float]]:
        """Normalised probabilities of complete continuations of the assistant `prefix`,
        each one or more tokens ("7]]", "100]]"): the product of its tokens' probabilities.

        The continuations' tokens form a trie; each node is one `_label_logprobs` call over
        all conversations, so a shared start ("1" of "1]]", "10]]", "100]]") is asked once
        and the calls of one conversation share its prompt (vLLM's prefix cache).
        """
        prefixes = [prefix] * len(conversations) if isinstance(prefix, str) else list(prefix)
        prompts, sequences = [], None
        for conversation, start in zip(conversations, prefixes, strict=True):
            text = self.render(conversation, start)
            found = continuation_tokens(self.encode, text, continuations, single_token)
            if sequences is None:
                sequences = found
            elif found != sequences:
                raise EngineError(
                    f"labels {list(continuations)} tokenize differently across prompts; end "
                    "the prefix with a character that separates them (e.g. '(')"
                )
            prompts.append(self.encode(text))
        if not prompts:
            return []
        longest = max(len(s) for s in sequences)
        too_long = [i for i, ids in enumerate(prompts) if len(ids) + longest > self.max_model_len]
        if too_long:
            raise EngineError(
                f"choice prompt {too_long[0]} has {len(prompts[too_long[0]])} tokens, over "
                f"max_model_len {self.max_model_len}"
            )
        children: dict[tuple[int, ...], list[int]] = {}
        for seq in sequences:
            for k, token in enumerate(seq):
                kids = children.setdefault(seq[:k], [])
                if token not in kids:
                    kids.append(token)
        logprob: dict[tuple[int, ...], list[float]] = {}  # node + token -> per prompt
        for node, kids in children.items():
            rows = self._label_logprobs([ids + list(node) for ids in prompts], kids)
            for j, token in enumerate(kids):
                logprob[(*node, token)] = [row[j] for row in rows]
            self.counter.prompt_tokens += sum(len(ids) + len(node) for ids in prompts)
            self.counter.requests += len(prompts)
        return [
            _normalise(
                [sum(logprob[seq[: k + 1]][i] for k in range(len(seq))) for seq in sequences]
            )
            for i in range(len(prompts))
        ]


def continuation_tokens(
    encode: Callable[[str], list[int]],
    text: str,
    continuations: Sequence[str],
    single_token: bool = False,
) -> list[tuple[int, ...]]:
    """The tokens each continuation adds after `text`, checked to be readable: each starts
    exactly where `text` ends (no merge with its last token), and none is the start of
    another (else "1" would also count the start of "10"). Only the tokenizer is needed, so
    the pre-flight runs this before any engine starts."""
    base = encode(text)
    found = []
    for cont in continuations:
        full = encode(text + cont)
        added = tuple(full[len(base) :])
        merged = full[: len(base)] != base or not added
        if single_token and (merged or len(added) != 1):
            raise EngineError(
                f"option {cont!r} is not exactly one token after the prompt's end "
                f"({text[-20:]!r}); use single-token labels such as A/B and a prefix that "
                "ends where the label starts"
            )
        if merged:
            raise EngineError(
                f"label {cont!r} does not start where the prompt ends ({text[-20:]!r}): the "
                "tokenizer merges them; end the prefix where the label starts"
            )
        found.append(added)
    for i, a in enumerate(found):
        for j, b in enumerate(found):
            if i != j and b[: len(a)] == a:
                raise EngineError(
                    f"label {continuations[i]!r} reads as the start of label "
                    f"{continuations[j]!r} (tokens {list(a)} begin {list(b)}); declare a "
                    "`suffix` that closes the score (e.g. ']]' or a newline)"
                )
    return found


def _normalise(logprobs: Sequence[float]) -> list[float]:
    top = max(logprobs)
    if top == -math.inf:
        return [1.0 / len(logprobs)] * len(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut generated text at the first stop string (engines without native stop support)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
