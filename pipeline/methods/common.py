"""What every method shares: the round context, the row container, generation rows."""

import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.config import format_validation_error, read_yaml
from pipeline.engines.base import PROMPT_TOO_LONG, Completion, Conversation, Engine, Sampling
from pipeline.errors import ConfigError, TemplateError
from pipeline.hashing import row_id, sha256_file
from pipeline.paths import PROMPTS_DIR
from pipeline.seeds import Prompt
from pipeline.templates import ChoiceParser, Template

M = TypeVar("M", bound=BaseModel)
# What a preference question (RLCD-Rescore, RL-CAI feedback) is rendered with.
PREFERENCE_VARS = ("instruction", "response_a", "response_b", "principle")


class Resource(BaseModel):
    """Base of the YAML resources (descriptor files, constitutions): unknown keys are
    errors, and a loaded resource is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class RoundContext:
    """Where rows come from: ids built from these make re-runs insert nothing new."""

    run_id: str
    round: int
    model_id: str  # the model generating this round's answers
    seed: int

    def rng(self, *parts: Any) -> random.Random:
        """A generator seeded by the run's seed and `parts` (e.g. a method and a prompt id):
        the same draw on every re-run, independent of batch order."""
        return random.Random(row_id(self.seed, self.run_id, self.round, *parts))


class Rows(defaultdict):
    """Table name -> rows to insert. `Store.write(rows)` stores them in one transaction."""

    def __init__(self) -> None:
        super().__init__(list)

    def add(self, table: str, *rows: dict[str, Any]) -> None:
        self[table].extend(rows)

    def merge(self, other: "Rows") -> "Rows":
        for table, rows in other.items():
            self[table].extend(rows)
        return self

    def discard(
        self, ctx: RoundContext, method: str, stage: str, item_id: str, reason: str, detail=None
    ) -> None:
        self.add(
            "discards",
            {
                "run_id": ctx.run_id,
                "round": ctx.round,
                "method": method,
                "stage": stage,
                "item_id": item_id,
                "reason": reason,
                "detail": None if detail is None else str(detail)[:2000],
            },
        )

    def counts(self) -> dict[str, int]:
        return {table: len(rows) for table, rows in sorted(self.items()) if rows}


def generation_row(
    ctx: RoundContext,
    method: str,
    prompt_id: str,
    role: str,
    sample_idx: int,
    completion: Completion,
    params: Sampling,
    *,
    template: Template | None = None,
    parent_id: str | None = None,
    meta: dict[str, Any] | None = None,
    key: tuple = (),
    model_id: str | None = None,
) -> dict[str, Any]:
    """One generated text with its provenance. `key` adds what else tells it apart (a CAI
    step); the id never depends on the text, so a re-run maps onto the stored row."""
    return {
        "generation_id": row_id(ctx.run_id, ctx.round, method, prompt_id, role, sample_idx, *key),
        "run_id": ctx.run_id,
        "round": ctx.round,
        "method": method,
        "prompt_id": prompt_id,
        "model_id": model_id or ctx.model_id,
        "template_id": template.template_id if template else None,
        "role": role,
        "sample_idx": sample_idx,
        "parent_generation_id": parent_id,
        "text": completion.text,
        "n_tokens": completion.n_tokens,
        "finish_reason": completion.finish_reason,
        "sampling_json": json.dumps(params.record(), sort_keys=True),
        "seed": ctx.seed,
        "meta_json": json.dumps(meta, sort_keys=True) if meta else None,
    }


def pair_row(
    ctx: RoundContext,
    method: str,
    variant: str,
    prompt: Prompt,
    chosen_id: str,
    rejected_id: str,
    **fields: Any,
) -> dict[str, Any]:
    return {
        "pair_id": row_id(ctx.run_id, ctx.round, method, variant, prompt.prompt_id),
        "run_id": ctx.run_id,
        "round": ctx.round,
        "method": method,
        "variant": variant,
        "prompt_id": prompt.prompt_id,
        "chosen_generation_id": chosen_id,
        "rejected_generation_id": rejected_id,
        "model_id": ctx.model_id,
        "flagged": False,
        **fields,
    }


def sampling_from(cfg: Any, n: int = 1) -> Sampling:
    """Engine sampling parameters from a config's `SamplingConfig`."""
    return Sampling(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)


def unusable(completion: Completion) -> str | None:
    """Why a completion cannot be used as an answer, or None."""
    if completion.finish_reason == PROMPT_TOO_LONG:
        return "prompt_too_long"
    if not completion.text.strip():
        return "empty"
    return None


def normalise_text(text: str) -> str:
    return " ".join(text.split()).casefold()


# -- ROUGE-L (self-instruct's near-duplicate filter) -------------------------------------


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.casefold()).split()


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 between two texts on lower-cased word tokens."""
    wa, wb = _words(a), _words(b)
    if not wa or not wb:
        return 0.0
    lcs = _lcs(wa, wb)
    return 0.0 if lcs == 0 else 2 * lcs / (len(wa) + len(wb))


class NearDuplicateIndex:
    """Finds texts with ROUGE-L above a threshold against everything added so far.

    The LCS is bounded by the shared word multiset, which rules out almost every pair
    before the quadratic LCS runs (self-instruct compares each new prompt to hundreds).
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._items: list[tuple[list[str], Counter]] = []

    def add(self, text: str) -> None:
        words = _words(text)
        self._items.append((words, Counter(words)))

    def nearest_above(self, text: str) -> float | None:
        """The first ROUGE-L score over the threshold, or None if the text is new enough."""
        words = _words(text)
        if not words:
            return None
        bag = Counter(words)
        for other, other_bag in self._items:
            total = len(words) + len(other)
            if 2 * min(len(words), len(other)) / total <= self.threshold:
                continue
            if 2 * sum((bag & other_bag).values()) / total <= self.threshold:
                continue
            score = 2 * _lcs(words, other) / total
            if score > self.threshold:
                return score
        return None


# -- YAML resources in prompts/ (RLCD descriptors, constitutions) ---------------------------


def load_resource(name_or_path: str, model: type[M], subdir: str = "") -> tuple[M, str]:
    """A YAML file validated as `model`, by name under prompts/<subdir> or by path; returns
    it with its content hash. Errors name the file and the field."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROMPTS_DIR / subdir / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (a name in prompts/{subdir} or a YAML path)")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return model.model_validate(data), sha256_file(path)
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from None


# -- multiple-choice labels (RLCD-Rescore, RL-CAI feedback) --------------------------------


def choice_parser(template: Template) -> ChoiceParser:
    parser = template.meta.parser
    if not isinstance(parser, ChoiceParser):
        raise TemplateError(
            f"{template.path}: a preference-question template needs a front-matter `parser` "
            "of kind choice (labels, prefix)"
        )
    return parser


def ask_choices(
    engine: Engine,
    template: Template,
    questions: Sequence[dict[str, Any]],
    reasoning_params: Sampling | None = None,
) -> tuple[list[list[float] | None], list[str | None]]:
    """Label probabilities for each question (the template's variables), in one call.

    With a chain-of-thought template (`reasoning_prefix`), the judge first writes its
    reasoning in one generate call; the label is then read after that reasoning.
    Returns the probabilities (None where the question does not fit the context) and the
    reasoning texts (None without reasoning).
    """
    parser = choice_parser(template)
    conversations = [[{"role": "user", "content": template.render(**q)}] for q in questions]
    reasoning: list[str | None] = [None] * len(conversations)
    if parser.reasoning_prefix is not None:
        base = reasoning_params or Sampling(temperature=0.0, max_tokens=256)
        # The reasoning stops where the answer would start; the label is read from there.
        params = replace(base, n=1, stop=(parser.prefix.strip(),) if parser.prefix else ())
        outputs = engine.generate(
            conversations, params, [parser.reasoning_prefix] * len(conversations)
        )
        reasoning = [out[0].text.strip() for out in outputs]
        prefixes = [f"{parser.reasoning_prefix} {r}\n{parser.prefix}" for r in reasoning]
    else:
        prefixes = [parser.prefix] * len(conversations)
    return label_probs(engine, conversations, parser.labels, prefixes), reasoning


def label_probs(
    engine: Engine,
    conversations: Sequence[Conversation],
    labels: Sequence[str],
    prefixes: Sequence[str],
) -> list[list[float] | None]:
    """`engine.choice_probs`, with None for a question too long for the context instead
    of a failed batch."""
    probs: list[list[float] | None] = [None] * len(conversations)
    fits = [
        i
        for i, (c, p) in enumerate(zip(conversations, prefixes, strict=True))
        if len(engine.encode(engine.render(c, p))) < engine.max_model_len
    ]
    if fits:
        got = engine.choice_probs(
            [conversations[i] for i in fits], labels, [prefixes[i] for i in fits]
        )
        for i, row in zip(fits, got, strict=True):
            probs[i] = row
    return probs
