"""The checklist judge (`kind: checklist`): the request is cut into its sentences, each a
requirement, and the model answers one yes/no question per requirement ("does the answer
meet it?"), read from a prefilled reply as the probability of yes. The readings of one
answer are combined into its score (`combine`): their mean by default.

The judge reads the request's text only, as a user wrote it; it never sees a check spec.
A small model may read one narrow question ("Is the whole answer in lower case?") better
than a holistic 0-5 score of everything at once (Self-Rewarding's rubric), and a request
that asks for three things gets three readings instead of one.
"""

import json
import math
import statistics
from collections.abc import Sequence
from typing import Any, Literal

from pipeline.engines.base import PROMPT_TOO_LONG, Engine
from pipeline.errors import TemplateError
from pipeline.judging.labels import label_probs
from pipeline.judging.parsing import OK, JudgeItem, Sample, score_parser
from pipeline.judging.template import expected_score
from pipeline.schema import StrictModel
from pipeline.templates import Template, TemplateLibrary

# What a checklist template is rendered with.
CHECKLIST_VARS = ("instruction", "response", "requirement")
COMBINE = {"mean": statistics.fmean, "min": min, "product": math.prod}


class ChecklistJudgeConfig(StrictModel):
    # A yes/no reading per requirement of the request, combined.
    kind: Literal["checklist"] = "checklist"
    # The yes/no question (a name in prompts/ or a .j2 path): a prefilled score template
    # on the scale 0-1 that also gets the `requirement`.
    template: str = "judge_checklist_prefilled"
    # How one answer's readings make its score: mean (the expected share of requirements
    # met), min (the least likely one), product (all met, were they independent).
    combine: Literal["mean", "min", "product"] = "mean"
    # None = the round's own model judges (Self-Rewarding); else a model name or path.
    model: str | None = None


def load(cfg: ChecklistJudgeConfig, library: TemplateLibrary) -> Template:
    """The question template, checked: a prefilled score parser on 0-1 and no variable
    beyond instruction, response and requirement."""
    template = library.get(cfg.template)
    parser = score_parser(template)
    if parser.prefix is None or (parser.min, parser.max) != (0, 1):
        raise TemplateError(
            f"{template.path}: parser: a checklist question is prefilled (`prefix`) and "
            f"reads yes/no as 1/0 (min 0, max 1)"
        )
    return template.expect("checklist", CHECKLIST_VARS)


def _ends_sentence(text: str, i: int) -> bool:
    """Whether text[i] ends a sentence: . ! or ? (or a closing quote after one), before
    white space; the last dot of an abbreviation such as P.S. only before a capital."""
    ch = text[i]
    if i + 1 < len(text) and not text[i + 1].isspace():
        return False
    if ch == '"':
        return i > 0 and text[i - 1] in ".!?"
    if ch == "." and i > 1 and text[i - 1].isupper() and text[i - 2] == ".":
        after = text[i + 1 :].lstrip()  # an abbreviation ends a sentence before a capital
        return not after or after[0].isupper()
    return ch in ".!?"


def requirements(request: str) -> list[str]:
    """The request's sentences, in order: each one a requirement. A quoted phrase is never
    cut ("Finish with "That is all." exactly"), nor is a line ending in a colon cut from
    the example after it."""
    text = request.strip()
    out, start, quoted = [], 0, False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        if not quoted and _ends_sentence(text, i):
            out.append(text[start : i + 1].strip())
            start = i + 1
    rest = text[start:].strip()
    return [s for s in [*out, rest] if s]


class ChecklistJudge:
    def __init__(
        self,
        cfg: ChecklistJudgeConfig,
        template: Template,
        engine: Engine | None,
        model_id: str | None,
    ) -> None:
        if engine is None:
            raise ValueError("a checklist judge needs an engine")
        self.cfg, self.template, self.engine = cfg, template, engine
        self.parser = score_parser(template)
        how = f"checklist:{cfg.combine}"
        own = f"|{model_id}" if cfg.model is not None else ""
        self.judge_id = f"{template.template_id}|{how}{own}"
        self.key = f"{template.sha256}|{how}{own}"
        self.model_id = model_id
        self.sampling: dict[str, Any] = {
            "prefix": self.parser.prefix,
            "expected_over": self.parser.labels,
            "combine": cfg.combine,
        }

    def score(self, items: Sequence[JudgeItem]) -> list[list[Sample]]:
        asked: list[tuple[int, str]] = [
            (i, req) for i, it in enumerate(items) for req in requirements(it.instruction)
        ]
        conversations = [
            [
                {
                    "role": "user",
                    "content": self.template.render(
                        instruction=items[i].instruction,
                        response=items[i].response,
                        requirement=req,
                    ),
                }
            ]
            for i, req in asked
        ]
        probs = label_probs(
            self.engine,
            conversations,
            self.parser.continuations,
            [self.parser.prefix] * len(conversations),
            single_token=False,
        )
        readings: list[list[tuple[str, float | None]]] = [[] for _ in items]
        for (i, req), p in zip(asked, probs, strict=True):
            readings[i].append((req, expected_score(p, self.parser)[1]))
        return [[self._combined(r)] for r in readings]

    def _combined(self, readings: list[tuple[str, float | None]]) -> Sample:
        raw = json.dumps(
            [{"requirement": r, "yes": None if p is None else round(p, 6)} for r, p in readings]
        )
        values = [p for _, p in readings]
        if None in values:  # a question too long for the context
            return Sample(raw, None, PROMPT_TOO_LONG)
        return Sample(raw, COMBINE[self.cfg.combine](values), OK)
