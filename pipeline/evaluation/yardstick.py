"""The judge-free yardstick: a model's held-out instruction-following accuracy on the
verifiable-instruction prompts (`evaluation.yardstick`), greedy, checked by code. No
judge of the model's own takes part, so no self-judging can bend it.

Four numbers, as IFEval reports them: prompt-level (every instruction of a prompt
followed) and instruction-level (each instruction on its own), strict and loose, each
with its count and a 95% Wilson interval (for instruction level the interval treats
instructions as independent, which two of one prompt are not quite). Instruction-level
strict also keeps `per_kind`: [followed, n] for each kind of instruction
(`checks.kind`), so a round's gain or loss can be traced to what it learned or lost.

Each split of the yardstick is measured on its own: "seen" (requests in the training
pool's wording) under the metric names below, any other split under `<split>/<metric>`
(the shipped "unseen" split: `unseen/ifeval_prompt_strict`, ...), its answers stored with
the role `yardstick/<split>` beside the seen split's `yardstick`.

Where the prompts give their topics (the shipped ones do), two more: the share of
answers that mention their topic (`checks.on_topic`), and the share that do and follow
every instruction strictly. The checks look at form only, so a model that learns to
answer "exactly 4 bullet points" with four "* This is a point." lines gains on the four
and loses on these two.
"""

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.engines.base import Engine
from pipeline.evaluation.metrics import evaluation_row
from pipeline.evaluation.stages import greedy_answers
from pipeline.rows import RoundContext, Rows
from pipeline.verifiable.checks import follows, kind, on_topic
from pipeline.verifiable.prompts import SEEN, Checked

# The yardstick's metrics (`evaluations.metric`) and how the report labels them.
PROMPT_STRICT = "ifeval_prompt_strict"
PROMPT_LOOSE = "ifeval_prompt_loose"
INSTRUCTION_STRICT = "ifeval_instruction_strict"
INSTRUCTION_LOOSE = "ifeval_instruction_loose"
ON_TOPIC = "ifeval_on_topic"  # where the prompts give topics
STRICT_ON_TOPIC = "ifeval_prompt_strict_on_topic"
LABELS = {
    PROMPT_STRICT: "prompt-level strict",
    PROMPT_LOOSE: "prompt-level loose",
    INSTRUCTION_STRICT: "instruction-level strict",
    INSTRUCTION_LOOSE: "instruction-level loose",
    ON_TOPIC: "answers on topic",
    STRICT_ON_TOPIC: "prompt-level strict and on topic",
}
_LEVELS = {
    ("prompt", False): PROMPT_STRICT,
    ("prompt", True): PROMPT_LOOSE,
    ("instruction", False): INSTRUCTION_STRICT,
    ("instruction", True): INSTRUCTION_LOOSE,
}
Z95 = 1.959964
ROLE = "yardstick"  # the seen split's answers (generations.role)


def split_metric(metric: str, split: str) -> str:
    """A yardstick metric's name in `evaluations` for a split."""
    return metric if split == SEEN else f"{split}/{metric}"


def yardstick_splits(evaluations: Sequence[Mapping[str, Any]]) -> list[str]:
    """The splits other than "seen" that these evaluations rows measured, sorted."""
    suffix = f"/{PROMPT_STRICT}"
    found = {e["metric"] for e in evaluations}
    return sorted(m.removesuffix(suffix) for m in found if m.endswith(suffix))


def split_role(split: str) -> str:
    """The role of a split's answers in `generations`."""
    return ROLE if split == SEEN else f"{ROLE}/{split}"


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _share(hits: Sequence[bool]) -> tuple[float, dict[str, Any]]:
    k, n = sum(hits), len(hits)
    lo, hi = wilson(k, n)
    return k / n if n else float("nan"), {
        "followed": k,
        "n": n,
        "ci95": [round(lo, 4), round(hi, 4)],
    }


def accuracy(
    answers: Sequence[str],
    specs: Sequence[Sequence[Mapping[str, Any]]],
    topics: Sequence[str | None] | None = None,
) -> dict[str, tuple[float, dict[str, Any]]]:
    """metric -> (value, details) over answers to prompts with these check specs; with a
    topic for every prompt, also how many answers mention theirs, alone and together
    with strict prompt-level compliance."""
    out: dict[str, tuple[float, dict[str, Any]]] = {}
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for loose in (False, True):
        results = [follows(a, s, loose) for a, s in zip(answers, specs, strict=True)]
        levels = {
            "prompt": [all(r) for r in results],
            "instruction": [x for r in results for x in r],
        }
        for level, hits in levels.items():
            out[_LEVELS[(level, loose)]] = _share(hits)
        if not loose and topics is not None and all(t is not None for t in topics):
            mentions = [on_topic(a, t) for a, t in zip(answers, topics, strict=True)]
            out[ON_TOPIC] = _share(mentions)
            both = [m and ok for m, ok in zip(mentions, levels["prompt"], strict=True)]
            out[STRICT_ON_TOPIC] = _share(both)
        if not loose:
            for r, s in zip(results, specs, strict=True):
                for ok, spec in zip(r, s, strict=True):
                    per_kind[kind(spec)][0] += ok
                    per_kind[kind(spec)][1] += 1
    out[INSTRUCTION_STRICT][1]["per_kind"] = dict(sorted(per_kind.items()))
    return out


def instruction_following(
    engine: Engine,
    splits: Mapping[str, Sequence[Checked]],
    ctx: RoundContext,
    model_id: str,
    cfg: Any,
) -> Rows:
    """`model_id` (the engine's model) answers every prompt of every yardstick split
    greedily; its answers and each split's accuracies, stored under `ctx.round` (the round
    whose model it is: 0 for the run's initial model)."""
    rows = Rows()
    for split, prompts in splits.items():
        answered = greedy_answers(
            engine, [p.prompt for p in prompts], ctx, model_id, cfg.sampling, split_role(split)
        )
        rows.merge(answered)
        for p in prompts:
            record = p.prompt.record(ctx.run_id, ctx.round, split=split_role(split))
            rows.add("prompts", record)
        answers = [g["text"] for g in answered["generations"]]
        measured = accuracy(answers, [p.checks for p in prompts], [p.topic for p in prompts])
        for metric, (value, details) in measured.items():
            name = split_metric(metric, split)
            row = evaluation_row(ctx, name, value, key=(model_id,), model=model_id, **details)
            rows.add("evaluations", row)
    return rows
