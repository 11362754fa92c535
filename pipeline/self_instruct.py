"""Self-instruct (Self-Rewarding's new prompts): the model writes new prompts from few-shot
examples of seed and earlier generated prompts; near-duplicates (ROUGE-L) and prompts too
short or too long are discarded with their reason. It makes prompts, not pairs: the round
runs it once before the methods whose settings hold a `self_instruct` section.
"""

from collections import Counter
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from pipeline.engines.base import Completion, Engine
from pipeline.hashing import row_id
from pipeline.rows import RoundContext, Rows, generation_row, sampling_from, unusable
from pipeline.schema import SamplingConfig, StrictModel
from pipeline.seeds import Prompt
from pipeline.templates import Template, TemplateLibrary

# The stored rows keep the method name they always had: self-instruct began as
# Self-Rewarding's first step, and resumed runs find their rows under it.
OWNER = "self_reward"


class SelfInstructConfig(StrictModel):
    # Write new prompts each round before the methods that take them.
    enabled: bool = False
    # New prompts asked for per round (near-duplicates and bad ones are dropped).
    new_prompts: int = Field(16, ge=0)
    # Seed prompts shown as examples per request.
    seed_shots: int = Field(6, ge=0)
    # Earlier generated prompts shown per request (seeds fill in while there are none).
    generated_shots: int = Field(2, ge=0)
    # How new prompts are sampled (the paper: T 0.6, top-p 0.9).
    sampling: SamplingConfig = SamplingConfig(temperature=0.6, top_p=0.9, max_tokens=128)
    # A new prompt with ROUGE-L above this against any other is a near-duplicate.
    rouge_l_max: float = Field(0.7, ge=0.0, le=1.0)
    # Shorter new prompts are dropped.
    min_words: int = Field(3, ge=1)
    # Longer new prompts are dropped.
    max_words: int = Field(150, ge=1)
    # The self-instruct template (a name in prompts/ or a .j2 path).
    template: str = "self_instruct"


def load(cfg: SelfInstructConfig, library: TemplateLibrary) -> Template:
    return library.get(cfg.template).expect("self-instruct", ["examples"])


def write_new_prompts(
    engine: Engine,
    template: Template,
    seeds: Sequence[Prompt],
    generated: Sequence[Prompt],
    ctx: RoundContext,
    cfg: SelfInstructConfig,
    batch: int = 0,
) -> tuple[list[Prompt], Rows]:
    """Few-shot self-instruct: each request shows `seed_shots` seed prompts and
    `generated_shots` earlier generated ones (seeds fill in while there are none), and the
    model writes one new prompt. Near-duplicates (ROUGE-L over `rouge_l_max` against any
    existing prompt or one accepted earlier in the batch), and too short or too long
    prompts are discarded with their reason."""
    rows = Rows()
    if cfg.new_prompts == 0 or not seeds:
        return [], rows
    shots = cfg.seed_shots + cfg.generated_shots
    requests: list[str] = []
    for i in range(cfg.new_prompts):
        rng = ctx.rng(OWNER, "self_instruct", batch, i)
        from_generated = rng.sample(list(generated), min(cfg.generated_shots, len(generated)))
        pool = list(seeds)
        from_seeds = rng.sample(pool, min(shots - len(from_generated), len(pool)))
        examples = [p.text for p in from_seeds + from_generated]
        rng.shuffle(examples)
        requests.append(template.render(examples=examples))
    params = sampling_from(cfg.sampling)
    outputs = engine.generate([[{"role": "user", "content": r}] for r in requests], params)

    index = NearDuplicateIndex(cfg.rouge_l_max)
    for p in [*seeds, *generated]:
        index.add(p.text)
    accepted: list[Prompt] = []
    for i, (request, [completion]) in enumerate(zip(requests, outputs, strict=True)):
        text = completion.text.strip().strip("\"'").strip()
        request_id = row_id(ctx.run_id, ctx.round, "self_instruct_request", batch, i)
        gen = generation_row(
            ctx,
            OWNER,
            request_id,
            "instruction",
            0,
            Completion(text, completion.n_tokens, completion.finish_reason),
            params,
            template=template,
            meta={"request": request},
        )
        rows.add("generations", gen)
        reason = _prompt_problem(text, completion, cfg, index)
        if reason:
            rows.discard(ctx, OWNER, "self_instruct", gen["generation_id"], *reason)
            continue
        index.add(text)
        prompt = Prompt.user(text, source="self_instruct", generation_id=gen["generation_id"])
        accepted.append(prompt)
        rows.add("prompts", prompt.record(ctx.run_id, ctx.round))
    return accepted, rows


def _prompt_problem(
    text: str, completion: Completion, cfg: SelfInstructConfig, index: "NearDuplicateIndex"
) -> tuple[str, Any] | None:
    if unusable(completion):
        return unusable(completion), None
    n_words = len(text.split())
    if completion.finish_reason == "length" or n_words > cfg.max_words:
        return "too_long", f"{n_words} words, finish {completion.finish_reason}"
    if n_words < cfg.min_words:
        return "too_short", f"{n_words} words"
    score = index.nearest_above(text)
    if score is not None:
        return "near_duplicate", f"ROUGE-L {score:.3f} > {cfg.rouge_l_max}"
    return None


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
