"""Reading judge outputs with the parser a template declares (never a parser in code)."""

import re
from functools import lru_cache

from pipeline.templates import ChoiceParser, ScoreParser

OK = "ok"
NO_MATCH = "no_match"
OUT_OF_RANGE = "out_of_range"
NOT_A_NUMBER = "not_a_number"


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


def parse_choice(text: str, parser: ChoiceParser) -> tuple[str | None, str]:
    """The last label the pattern finds in generated text (chain-of-thought judges)."""
    if parser.pattern is None:
        raise ValueError("this choice template has no `pattern`; read it with choice_probs")
    matches = [m.strip() for m in _compiled(parser.pattern).findall(text)]
    labels = [m for m in matches if m in parser.labels]
    if not labels:
        return None, NO_MATCH
    return labels[-1], OK
