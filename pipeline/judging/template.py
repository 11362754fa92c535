"""The LLM-as-a-Judge kind (`kind: template`): a model scores an answer with a Jinja2
template whose front matter declares how to read the score.

Free-form: the judge writes a justification and a score line, sampled `samples` times, each
parsed with the template's pattern. Prefilled (the parser has a `prefix`): the reply starts
with the prefix and the score is the expected value over the next-token probabilities of
the scale's labels: one deterministic reading.
"""

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from pipeline.engines.base import PROMPT_TOO_LONG, Engine
from pipeline.judging.labels import label_probs
from pipeline.judging.parsing import OK, Sample, parse_score, score_parser
from pipeline.rows import sampling_from
from pipeline.schema import SamplingConfig, StrictModel
from pipeline.templates import ScoreParser, Template, TemplateLibrary

# What a judge template is rendered with.
JUDGE_VARS = ("instruction", "response")


class TemplateJudgeConfig(StrictModel):
    kind: Literal["template"] = "template"
    template: str = "judge_additive_5pt"
    # Free-form judges: readings per answer, averaged over the ones that parse.
    samples: int = Field(3, ge=1)
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=256)
    # None = the round's own model judges (Self-Rewarding); else a model name or path.
    model: str | None = None


def load(cfg: TemplateJudgeConfig, library: TemplateLibrary) -> Template:
    """The judge template, checked: a score parser (named first, so a template of the
    wrong kind says so) and no variable beyond instruction and response."""
    template = library.get(cfg.template)
    score_parser(template)
    return template.expect("judge", JUDGE_VARS)


class TemplateJudge:
    def __init__(
        self,
        cfg: TemplateJudgeConfig,
        template: Template,
        engine: Engine | None,
        model_id: str | None,
    ) -> None:
        if engine is None:
            raise ValueError("a template judge needs an engine")
        self.cfg, self.template, self.engine = cfg, template, engine
        self.parser = score_parser(template)
        self.judge_id = template.template_id
        self.key = template.sha256
        self.model_id = model_id
        if self.parser.prefix is None:
            self.params = sampling_from(cfg.sampling, n=cfg.samples)
            self.sampling: dict[str, Any] = self.params.record()
        else:
            self.sampling = {"prefix": self.parser.prefix, "expected_over": self.parser.labels}

    def score(self, items: Sequence[tuple[str, str]]) -> list[list[Sample]]:
        conversations = [
            [{"role": "user", "content": self.template.render(instruction=i, response=r)}]
            for i, r in items
        ]
        if self.parser.prefix is None:
            outputs = self.engine.generate(conversations, self.params)
            return [
                [Sample(*_parsed(c.text, c.finish_reason, self.parser)) for c in completions]
                for completions in outputs
            ]
        prefixes = [self.parser.prefix] * len(conversations)
        probs = label_probs(self.engine, conversations, self.parser.labels, prefixes)
        return [[Sample(*expected_score(p, self.parser))] for p in probs]


def _parsed(text: str, finish_reason: str, parser: ScoreParser) -> tuple[str, float | None, str]:
    if finish_reason == PROMPT_TOO_LONG:
        return text, None, PROMPT_TOO_LONG
    return (text, *parse_score(text, parser))


def expected_score(probs: list[float] | None, parser: ScoreParser) -> tuple[str, float | None, str]:
    """The expected score over the scale's labels, with the distribution as raw output."""
    if probs is None:
        return "", None, PROMPT_TOO_LONG
    values = [float(label) for label in parser.labels]
    score = sum(v * p for v, p in zip(values, probs, strict=True))
    raw = json.dumps({"probs": dict(zip(parser.labels, [round(p, 6) for p in probs], strict=True))})
    return raw, score, OK
