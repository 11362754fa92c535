"""Reading judge outputs with the parser a template declares (never a parser in code)."""

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from pipeline.errors import TemplateError
from pipeline.templates import ChoiceParser, ScoreParser, Template

OK = "ok"
NO_MATCH = "no_match"
OUT_OF_RANGE = "out_of_range"
NOT_A_NUMBER = "not_a_number"


class JudgeItem(NamedTuple):
    """What a judge reads: the request (the last user turn), the answer, and the whole
    conversation before the answer (a reward model scores it in full)."""

    instruction: str
    response: str
    conversation: list[dict[str, str]]


@dataclass(frozen=True)
class Sample:
    """One reading of one answer by a judge: its raw output (if it wrote one), the score
    (None when it could not be read: never a sentinel) and the parse status."""

    raw: str | None
    score: float | None
    status: str


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def parse_score(text: str, parser: ScoreParser) -> tuple[float | None, str]:
    """The last match of the parser's pattern, as a number on the parser's scale.

    Returns (score, status); score is None unless status is "ok". Out-of-range values are
    clamped or rejected as the template declares.
    """
    matches = _compiled(parser.pattern).findall(text)
    if not matches:
        return None, NO_MATCH
    try:
        value = float(matches[-1])
    except ValueError:
        return None, NOT_A_NUMBER
    if value != value:  # NaN
        return None, NOT_A_NUMBER
    if not parser.min <= value <= parser.max:
        if parser.out_of_range == "invalid":
            return None, OUT_OF_RANGE
        value = min(max(value, parser.min), parser.max)
    return value, OK


def score_parser(template: Template) -> ScoreParser:
    """The template's score parser; a template of another kind is refused by name."""
    return _declared(template, ScoreParser, "a judge template", "score (pattern, min, max)")


def choice_parser(template: Template) -> ChoiceParser:
    """The template's choice parser; a template of another kind is refused by name."""
    return _declared(
        template, ChoiceParser, "a preference-question template", "choice (labels, prefix)"
    )


def _declared(template: Template, kind: type, role: str, needs: str):
    parser = template.meta.parser
    if not isinstance(parser, kind):
        raise TemplateError(
            f"{template.path}: {role} needs a front-matter `parser` of kind {needs}"
        )
    return parser
