"""The judge-free yardstick: a model's held-out instruction-following accuracy on the
verifiable-instruction prompts (`evaluation.yardstick`), greedy, checked by code. No
judge of the model's own takes part, so no self-judging can bend it.

Four numbers, as IFEval reports them: prompt-level (every instruction of a prompt
followed) and instruction-level (each instruction on its own), strict and loose, each
with its count and a 95% Wilson interval (for instruction level the interval treats
instructions as independent, which two of one prompt are not quite).
"""

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.engines.base import Engine
from pipeline.evaluation.metrics import evaluation_row
from pipeline.evaluation.stages import greedy_answers
from pipeline.rows import RoundContext, Rows
from pipeline.seeds import Prompt
from pipeline.verifiable.checks import follows

METRICS = (
    "ifeval_prompt_strict",
    "ifeval_prompt_loose",
    "ifeval_instruction_strict",
    "ifeval_instruction_loose",
)
Z95 = 1.959964


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy(
    answers: Sequence[str], specs: Sequence[Sequence[Mapping[str, Any]]]
) -> dict[str, tuple[float, dict[str, Any]]]:
    """metric -> (value, details) over answers to prompts with these check specs."""
    out: dict[str, tuple[float, dict[str, Any]]] = {}
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for loose in (False, True):
        reading = "loose" if loose else "strict"
        results = [follows(a, s, loose) for a, s in zip(answers, specs, strict=True)]
        levels = {
            "prompt": [all(r) for r in results],
            "instruction": [x for r in results for x in r],
        }
        for level, hits in levels.items():
            k, n = sum(hits), len(hits)
            lo, hi = wilson(k, n)
            out[f"ifeval_{level}_{reading}"] = (
                k / n if n else float("nan"),
                {"followed": k, "n": n, "ci95": [round(lo, 4), round(hi, 4)]},
            )
        if not loose:
            for r, s in zip(results, specs, strict=True):
                for ok, spec in zip(r, s, strict=True):
                    per_type[spec["type"]][0] += ok
                    per_type[spec["type"]][1] += 1
    out["ifeval_prompt_strict"][1]["per_type"] = {t: v for t, v in sorted(per_type.items())}
    return out


def instruction_following(
    engine: Engine,
    prompts: Sequence[tuple[Prompt, Sequence[Mapping[str, Any]]]],
    ctx: RoundContext,
    model_id: str,
    cfg: Any,
) -> Rows:
    """`model_id` (the engine's model) answers every yardstick prompt greedily; its
    answers and the four accuracies, stored under `ctx.round` (the round whose model it
    is: 0 for the run's initial model)."""
    rows = greedy_answers(engine, [p for p, _ in prompts], ctx, model_id, cfg.sampling, "yardstick")
    for prompt, _ in prompts:
        rows.add("prompts", prompt.record(ctx.run_id, ctx.round, split="yardstick"))
    answers = [g["text"] for g in rows["generations"]]
    for metric, (value, details) in accuracy(answers, [s for _, s in prompts]).items():
        rows.add(
            "evaluations",
            evaluation_row(ctx, metric, value, key=(model_id,), model=model_id, **details),
        )
    return rows
