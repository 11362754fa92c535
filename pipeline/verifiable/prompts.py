"""The verifiable-instruction prompt set, written for prefloop: requests on everyday topics,
each with one to three instructions code can check, and the check spec of each. The
wording (topics, request forms, each instruction's phrasing) is in prompts/*.yaml.

    .venv/bin/python -m pipeline.verifiable.prompts     # (re)writes the four files below

Built from instruction types x topics x request forms with fixed seeds, so the files are
reproducible (a test regenerates them and compares):
- 800 prompts in prompts/verifiable.yaml's wording, split by a hash of each text: those
  held out are the yardstick's "seen" split (data/prompts/verifiable_heldout.jsonl), the
  rest start the training pool (data/prompts/verifiable_train.jsonl);
- 400 more training prompts (data/prompts/verifiable_more.jsonl) in
  prompts/verifiable_more.yaml's wording: other topics, a second phrasing of every
  instruction, longer requests, most with two or three instructions; a config adds them
  to its pool by listing the file in `prompts.files`;
- the "unseen" split (data/prompts/verifiable_unseen.jsonl) in
  prompts/verifiable_unseen.yaml's wording, whose topics, request forms, phrasings and
  word lists appear in neither of the others: it measures whether a gain generalizes.
Each line is {"prompt": text, "checks": [{"type": ..., **args}, ...], "topic": topic}; the
topic (optional in a user's file) lets the yardstick tell whether an answer still
addresses its request (`checks.on_topic`).
"""

import json
import random
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from pipeline.errors import ConfigError
from pipeline.hashing import row_id
from pipeline.paths import DATA_DIR, PROMPTS_DIR
from pipeline.seeds import Prompt, load_prompts
from pipeline.verifiable.checks import CHECKS, check, topic_words


class Checked(NamedTuple):
    """A yardstick prompt: its text, its instructions' check specs, and its topic (None
    where the file gives none)."""

    prompt: Prompt
    checks: list[dict[str, Any]]
    topic: str | None


SEEN = "seen"  # the yardstick split in the training pool's wording (the other: "unseen")
SEED = 20231114  # IFEval's arXiv date; any fixed number would do
PROMPTS = 800
TWO_INSTRUCTIONS = 0.3  # share of prompts that combine two instructions
HELDOUT = 0.4
TRAIN_FILE = DATA_DIR / "prompts" / "verifiable_train.jsonl"
HELDOUT_FILE = DATA_DIR / "prompts" / "verifiable_heldout.jsonl"
UNSEEN_FILE = DATA_DIR / "prompts" / "verifiable_unseen.jsonl"
MORE_FILE = DATA_DIR / "prompts" / "verifiable_more.jsonl"
UNSEEN_PROMPTS = 300  # about the seen split's size

WORDING = PROMPTS_DIR / "verifiable.yaml"
UNSEEN_WORDING = PROMPTS_DIR / "verifiable_unseen.yaml"
MORE_WORDING = PROMPTS_DIR / "verifiable_more.yaml"  # training only
MORE_PROMPTS = 400

Instruction = tuple[str, dict[str, Any]]


@lru_cache(maxsize=4)
def wording(path: Path = WORDING) -> dict[str, Any]:
    """Topics, request forms, word lists and each instruction's wording."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _plural(n: int) -> str:
    return "s" if n > 1 else ""


def _sample(kind: str, rng: random.Random, w: dict[str, Any]) -> Instruction:
    """One instruction of a type: its wording (from `w`, a wording file's contents) and
    its check spec, with the parameters drawn by `rng`."""
    say = w["instructions"]
    if kind == "word_count":
        if rng.random() < 0.5:
            n = rng.choice([30, 40, 50, 60])
            return say["word_count_max"].format(n=n), {"type": kind, "max": n - 1}
        n = rng.choice([50, 80, 100])
        return say["word_count_min"].format(n=n), {"type": kind, "min": n}
    if kind in ("bullet_count", "paragraphs", "placeholders", "highlights"):
        n = rng.choice({"bullet_count": [2, 3, 4, 5], "paragraphs": [2, 3]}.get(kind, [1, 2, 3]))
        return say[kind].format(n=n, s=_plural(n)), {"type": kind, "n": n}
    if kind == "keywords":
        chosen = rng.sample(w["keywords"], rng.choice([1, 2]))
        quoted = " and ".join(f'"{x}"' for x in chosen)
        agree = "" if len(chosen) > 1 else "s"  # the word appears / the words appear
        return say[kind].format(words=quoted, s=_plural(len(chosen)), v=agree), {
            "type": kind,
            "words": chosen,
        }
    if kind == "forbidden_words":
        first, second = rng.sample(w["forbidden_words"], 2)
        return say[kind].format(first=first, second=second), {
            "type": kind,
            "words": [first, second],
        }
    if kind == "ending":
        phrase = rng.choice(w["endings"])
        return say[kind].format(phrase=phrase), {"type": kind, "phrase": phrase}
    if kind == "starts_with":
        word = rng.choice(w["first_words"])
        return say[kind].format(word=word), {"type": kind, "word": word}
    if kind == "postscript":
        return say[kind], {"type": kind, "marker": "P.S."}
    return say[kind], {"type": kind}


TYPES = [
    "word_count", "bullet_count", "lowercase", "uppercase", "no_commas", "keywords",
    "forbidden_words", "ending", "starts_with", "title", "paragraphs", "json_format",
    "ascii_only", "quotation", "postscript", "placeholders", "highlights",
]  # fmt: skip

# Pairs that cannot both hold (or make each other's check meaningless).
CONFLICTS = {
    frozenset(p)
    for p in [
        ("lowercase", "uppercase"),
        ("json_format", "bullet_count"),
        ("json_format", "paragraphs"),
        ("json_format", "title"),
        ("json_format", "quotation"),
        ("json_format", "ending"),
        ("json_format", "starts_with"),
        ("json_format", "postscript"),
        ("json_format", "highlights"),
        ("quotation", "ending"),
        ("quotation", "starts_with"),
        ("quotation", "postscript"),
        ("ending", "postscript"),
        ("bullet_count", "paragraphs"),
        ("uppercase", "keywords"),
        ("uppercase", "starts_with"),
        ("uppercase", "postscript"),
        ("lowercase", "starts_with"),
        ("lowercase", "postscript"),
        ("lowercase", "ending"),
        ("uppercase", "ending"),
        ("title", "starts_with"),
        ("title", "quotation"),
    ]
}


def _compatible(kinds: list[str]) -> list[str]:
    """The instruction types that can join these in one prompt."""
    return [
        t
        for t in TYPES
        if t not in kinds and all(frozenset((k, t)) not in CONFLICTS for k in kinds)
    ]


def build(
    n: int = PROMPTS,
    seed: int = SEED,
    path: Path = WORDING,
    two: float = TWO_INSTRUCTIONS,
    three: float = 0.0,
) -> list[dict[str, Any]]:
    """n prompts in the wording of `path`, each instruction type used about equally often
    (types cycle in a shuffled order), topics and request forms drawn by the seed; each
    text once. A share `two` of them have a second instruction, and a share `three` of
    those a third."""
    rng = random.Random(seed)
    w = wording(path)
    rows, seen = [], set()
    order: list[str] = []
    while len(rows) < n:
        if not order:
            order = TYPES[:]
            rng.shuffle(order)
        first = order.pop()
        kinds = [first]
        if rng.random() < two:
            kinds.append(rng.choice(_compatible(kinds)))
            if three and rng.random() < three:
                kinds.append(rng.choice(_compatible(kinds)))
        topic = rng.choice(w["topics"])
        request = rng.choice(w["requests"]).format(topic=topic)
        if "json_format" in kinds:
            request = w["instructions"]["json_request"].format(topic=topic)
        parts = [_sample(k, rng, w) for k in kinds]
        text = " ".join([request, *(wording for wording, _ in parts)])
        if text in seen:
            continue
        seen.add(text)
        rows.append({"prompt": text, "checks": [spec for _, spec in parts], "topic": topic})
    return rows


def is_heldout(text: str) -> bool:
    return int(row_id("verifiable-heldout", SEED, text), 16) / 16**32 < HELDOUT


def build_more() -> list[dict[str, Any]]:
    """The rest of the training pool: prompts in prompts/verifiable_more.yaml's wording,
    longer, most with two or three instructions."""
    return build(MORE_PROMPTS, SEED + 2, MORE_WORDING, two=0.7, three=0.4)


def build_unseen() -> list[dict[str, Any]]:
    """The unseen split: prompts in prompts/verifiable_unseen.yaml's wording alone."""
    return build(UNSEEN_PROMPTS, SEED + 1, UNSEEN_WORDING)


def _lines(rows: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"


def write(rows: list[dict[str, Any]], train: Path = TRAIN_FILE, heldout: Path = HELDOUT_FILE):
    for path, keep in ((train, False), (heldout, True)):
        path.write_text(_lines([r for r in rows if is_heldout(r["prompt"]) == keep]))


def load_checked(path: Path, limit: int | None = None) -> list[Checked]:
    """A file of prompts with their check specs and topics, each spec checked now (a known
    type, the arguments its checker takes) and each topic a non-empty string where given:
    an error names the file, the line and the field."""
    prompts = load_prompts(path)[:limit]
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = []
    for lineno, (prompt, line) in enumerate(zip(prompts, lines, strict=False), start=1):
        row = json.loads(line)
        specs, topic = row.get("checks"), row.get("topic")
        if topic is not None and (not isinstance(topic, str) or not topic.strip()):
            raise ConfigError(f"{path}:{lineno}: topic: expected a non-empty string, got {topic!r}")
        if topic is not None and not topic_words(topic):
            raise ConfigError(
                f"{path}:{lineno}: topic: {topic!r} has no word that says what it is about"
            )
        where = f"{path}:{lineno}: checks"
        if not isinstance(specs, list) or not specs:
            raise ConfigError(f"{where}: expected a non-empty list of {{type, ...}} objects")
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict) or spec.get("type") not in CHECKS:
                raise ConfigError(
                    f"{where}[{i}].type: expected one of {', '.join(CHECKS)}, got "
                    f"{spec.get('type') if isinstance(spec, dict) else spec!r}"
                )
            try:
                check("", spec)
            except TypeError as e:
                raise ConfigError(f"{where}[{i}]: {e}") from None
        out.append(Checked(prompt, specs, topic))
    return out


def read(path: Path) -> dict[str, dict[str, Any]]:
    """prompt text -> its row ({"checks", "topic"}), for every prompt of a file."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["prompt"]] = row
    return out


def main(make: Callable[[], list[dict[str, Any]]] = build) -> None:
    rows = make()
    write(rows)
    held = sum(is_heldout(r["prompt"]) for r in rows)
    print(f"{len(rows)} prompts: {len(rows) - held} in {TRAIN_FILE}, {held} in {HELDOUT_FILE}")
    for path, extra in ((MORE_FILE, build_more()), (UNSEEN_FILE, build_unseen())):
        path.write_text(_lines(extra))
        print(f"{len(extra)} prompts in {path}")


if __name__ == "__main__":
    main()
