"""Judge functions over the verifiable-instruction checkers, for `self_reward.judge:
{kind: function, function: pipeline.verifiable.judge:score}`.

A prompt's checks are looked up by its text in the shipped prompt files (the training
pool, its 400 more prompts and the seen held-out split); a prompt that is not there (a
self-instructed one, or one of the unseen split) gets no score, so it never makes a pair.

`score` looks at the instructions only, so it pays an answer that drops the request for
the format (four "* This is a point." lines for "exactly 4 bullet points").
`score_on_topic` pays nothing to an answer that does not mention its topic
(`checks.on_topic`), so best vs worst cannot prefer one.
"""

from functools import lru_cache

from pipeline.verifiable.checks import follows, on_topic
from pipeline.verifiable.prompts import HELDOUT_FILE, MORE_FILE, TRAIN_FILE, read


@lru_cache(maxsize=1)
def rows() -> dict:
    """prompt text -> its row ({"checks", "topic"}) in the shipped prompt files."""
    return {**read(TRAIN_FILE), **read(MORE_FILE), **read(HELDOUT_FILE)}


def score(prompt: str, answer: str) -> float | None:
    """1 when the answer follows every instruction as written, 0.5 when it follows them
    only leniently (IFEval's loose reading), else the share of instructions followed
    strictly, halved: a graded score, so best vs worst has something to tell apart."""
    row = rows().get(prompt)
    if row is None:
        return None
    specs = row["checks"]
    strict = follows(answer, specs)
    if all(strict):
        return 1.0
    if all(follows(answer, specs, loose=True)):
        return 0.5
    return 0.5 * sum(strict) / len(strict)


def score_on_topic(prompt: str, answer: str) -> float | None:
    """`score`, and 0 for an answer that does not mention its prompt's topic."""
    row = rows().get(prompt)
    if row is None:
        return None
    return score(prompt, answer) if on_topic(answer, row["topic"]) else 0.0


def strict(prompt: str, answer: str) -> bool | None:
    """Whether the answer follows every instruction as written."""
    row = rows().get(prompt)
    return None if row is None else all(follows(answer, row["checks"]))
