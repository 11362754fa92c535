"""Verifiable instructions: instructions whose compliance code can check (the IFEval idea,
Zhou et al. 2023). Each checker is a pure function `(response, **args) -> bool`; a prompt's
check spec is a list of `{"type": name, **args}`.

Strict: the response as written. Loose (as in IFEval): the instruction counts as followed
when the check passes on any of a few lenient variants of the response: markdown
emphasis (`*`) removed, its first line dropped (a preamble such as "Sure, here it is:"),
its last line dropped (a sign-off), or both, alone or together.
"""

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)?")
_BULLET = re.compile(r"^\s*(?:[*\-\u2022]|\d+[.)])\s+\S", re.MULTILINE)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def word_count(response: str, min: int | None = None, max: int | None = None) -> bool:
    n = len(words(response))
    return (min is None or n >= min) and (max is None or n <= max)


def bullet_count(response: str, n: int) -> bool:
    """Exactly n bullet points (markdown `*`, `-`, a bullet or a numbered item a line)."""
    return len(_BULLET.findall(response)) == n


def lowercase(response: str) -> bool:
    return any(c.isalpha() for c in response) and response == response.lower()


def uppercase(response: str) -> bool:
    return any(c.isalpha() for c in response) and response == response.upper()


def no_commas(response: str) -> bool:
    return "," not in response and "\uff0c" not in response


def _has_word(response: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", response, re.IGNORECASE) is not None


def keywords(response: str, words: Sequence[str]) -> bool:
    """Every keyword appears (as a whole word, any case)."""
    return all(_has_word(response, w) for w in words)


def forbidden_words(response: str, words: Sequence[str]) -> bool:
    return not any(_has_word(response, w) for w in words)


def ending(response: str, phrase: str) -> bool:
    """Ends with the exact phrase (trailing spaces and a closing quote aside)."""
    return response.strip().rstrip('"').rstrip().lower().endswith(phrase.strip().lower())


def starts_with(response: str, word: str) -> bool:
    first = words(response.strip().lstrip("\"'*#"))
    return bool(first) and first[0].lower() == word.lower()


def title(response: str) -> bool:
    """A title in double angular brackets, such as <<the quiet sea>>."""
    return re.search(r"<<[^\n<>]*[A-Za-z0-9][^\n<>]*>>", response) is not None


def paragraphs(response: str, n: int) -> bool:
    """Exactly n paragraphs, separated by blank lines."""
    parts = [p for p in re.split(r"\n\s*\n", response.strip()) if p.strip()]
    return len(parts) == n


def json_format(response: str) -> bool:
    """The whole response is JSON (a ```json fence around it is allowed)."""
    text = response.strip()
    fence = re.fullmatch(r"```(?:json|JSON)?\s*\n?(.*?)\n?```", text, re.DOTALL)
    if fence:
        text = fence.group(1).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return bool(text)


def ascii_only(response: str) -> bool:
    """Only ASCII characters (English letters, digits, plain punctuation)."""
    return bool(response.strip()) and all(ord(c) < 128 for c in response)


def quotation(response: str) -> bool:
    """The whole response wrapped in double quotation marks."""
    text = response.strip()
    return len(text) > 2 and text[0] == '"' and text[-1] == '"'


def postscript(response: str, marker: str = "P.S.") -> bool:
    """A postscript starting with the marker, on a line of its own."""
    return (
        re.search(rf"^\s*{re.escape(marker)}", response, re.MULTILINE | re.IGNORECASE) is not None
    )


def placeholders(response: str, n: int) -> bool:
    """At least n placeholders in square brackets, such as [address]."""
    return len(re.findall(r"\[[^\[\]\n]+\]", response)) >= n


def highlights(response: str, n: int) -> bool:
    """At least n sections highlighted with markdown, such as *a highlighted section*."""
    return len(re.findall(r"\*[^\n*]+\*", response)) >= n


# Words of a topic that do not say what it is about: function words, and words so
# common that an answer on any topic may use them.
_NOT_TOPICAL = frozenset([
    "a", "an", "the", "of", "how", "why", "what", "to", "for", "in", "on", "at", "and",
    "with", "through", "about", "make", "do", "does", "is", "are", "it", "its", "from",
    "we", "you", "few", "day", "small", "old", "new", "first", "life", "home", "work",
    "works", "short", "busy", "stay", "forms", "sends", "becomes", "change", "before",
    "while", "history", "importance", "benefits", "job", "keeping", "saving", "making",
    "starting", "staying", "writing", "planning", "training", "learning",
])  # fmt: skip


def _forms(word: str) -> set[str]:
    """A word and what is left of it without a plural or -ing/-ed ending: a crude stem
    that lets "vaccine" meet "vaccines" and "start" meet "starting"."""
    forms = {word}
    for suffix, put in (("ies", "y"), ("es", ""), ("s", ""), ("ing", ""), ("ed", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            forms.add(word[: -len(suffix)] + put)
    return forms


def topic_words(topic: str) -> list[str]:
    """The words of a topic that say what it is about."""
    return [w for w in words(topic.lower()) if w not in _NOT_TOPICAL]


def on_topic(response: str, topic: str) -> bool:
    """Whether the response mentions its topic: one of the topic's own words, in any of
    their forms. Not an instruction a prompt gives, so not in CHECKS: a judge-free sign
    that an answer still addresses its request, which no format check looks at (an
    answer of four "* This is a point." lines follows "exactly 4 bullet points")."""
    wanted = {f for w in topic_words(topic) for f in _forms(w)}
    return any(_forms(w) & wanted for w in words(response.lower()))


CHECKS: dict[str, Callable[..., bool]] = {
    "word_count": word_count,
    "bullet_count": bullet_count,
    "lowercase": lowercase,
    "uppercase": uppercase,
    "no_commas": no_commas,
    "keywords": keywords,
    "forbidden_words": forbidden_words,
    "ending": ending,
    "starts_with": starts_with,
    "title": title,
    "paragraphs": paragraphs,
    "json_format": json_format,
    "ascii_only": ascii_only,
    "quotation": quotation,
    "postscript": postscript,
    "placeholders": placeholders,
    "highlights": highlights,
}


def loose_variants(response: str) -> list[str]:
    """The response and IFEval's lenient variants of it."""
    lines = response.split("\n")
    cut = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return cut + [v.replace("*", "") for v in cut]


def check(response: str, spec: Mapping[str, Any], loose: bool = False) -> bool:
    """Whether the response follows one instruction (`{"type": ..., **args}`)."""
    args = {k: v for k, v in spec.items() if k != "type"}
    fn = CHECKS[spec["type"]]
    if not loose:
        return fn(response, **args)
    return any(fn(v, **args) for v in loose_variants(response) if v)


def kind(spec: Mapping[str, Any]) -> str:
    """The instruction's kind for per-kind tallies: its type, with a word-count bound
    split by direction ("at least N words" and "at most N words" pull a model's length
    opposite ways, so one number for both hides what a round did)."""
    if spec["type"] != "word_count":
        return spec["type"]
    bounds = [b for b in ("min", "max") if spec.get(b) is not None]
    if len(bounds) == 1:
        return f"word_count_{bounds[0]}"
    return "word_count_range" if bounds else "word_count"


def follows(response: str, specs: Sequence[Mapping[str, Any]], loose: bool = False) -> list[bool]:
    """Per instruction of a prompt, whether the response follows it."""
    return [check(response, s, loose) for s in specs]
