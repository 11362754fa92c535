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
from pipeline.judging.parsing import OK, JudgeItem, Sample, parse_score, score_parser
from pipeline.rows import sampling_from
from pipeline.schema import SamplingConfig, StrictModel
from pipeline.templates import ScoreParser, Template, TemplateLibrary

# What a judge template is rendered with.
JUDGE_VARS = ("instruction", "response")


class TemplateJudgeConfig(StrictModel):
    # LLM-as-a-Judge: a template read by a model.
    kind: Literal["template"] = "template"
    # The judge template (a name in prompts/ or a .j2 path); its parser comes with it.
    template: str = "judge_additive_5pt"
    # Free-form judges: readings per answer, averaged over the ones that parse.
    samples: int = Field(3, ge=1)
    # How free-form judgments are sampled.
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
        # On its own model the judge is another judge than the same template on the
        # round's model: its id and key name the model (the round's own stays the template).
        own = cfg.model is not None
        self.judge_id = f"{template.template_id}|{model_id}" if own else template.template_id
        self.key = f"{template.sha256}|{model_id}" if own else template.sha256
        self.model_id = model_id
        if self.parser.prefix is None:
            self.params = sampling_from(cfg.sampling, n=cfg.samples)
            self.sampling: dict[str, Any] = self.params.record()
        else:
            self.sampling = {"prefix": self.parser.prefix, "expected_over": self.parser.labels}
            if self.parser.suffix:
                self.sampling["suffix"] = self.parser.suffix

    def score(self, items: Sequence[JudgeItem]) -> list[list[Sample]]:
        conversations = [
            [
                {
                    "role": "user",
                    "content": self.template.render(
                        instruction=it.instruction, response=it.response
                    ),
                }
            ]
            for it in items
        ]
        if self.parser.prefix is None:
            outputs = self.engine.generate(conversations, self.params)
            return [
                [Sample(*_parsed(c.text, c.finish_reason, self.parser)) for c in completions]
                for completions in outputs
            ]
        prefixes = [self.parser.prefix] * len(conversations)
        probs = label_probs(
            self.engine, conversations, self.parser.continuations, prefixes, single_token=False
        )
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
