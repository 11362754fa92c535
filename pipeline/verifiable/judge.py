"""Judge functions over the verifiable-instruction checkers, for `self_reward.judge:
{kind: function, function: pipeline.verifiable.judge:score}`.

A prompt's checks are looked up by its text in the shipped prompt files (the training
pool and the held-out set); a prompt that is not there (a self-instructed one) gets no
score, so it never makes a pair.
"""

from functools import lru_cache

from pipeline.verifiable.checks import follows
from pipeline.verifiable.prompts import HELDOUT_FILE, TRAIN_FILE, read


@lru_cache(maxsize=1)
def _specs() -> dict:
    return {**read(TRAIN_FILE), **read(HELDOUT_FILE)}


def score(prompt: str, answer: str) -> float | None:
    """1 when the answer follows every instruction as written, 0.5 when it follows them
    only leniently (IFEval's loose reading), else the share of instructions followed
    strictly, halved: a graded score, so best vs worst has something to tell apart."""
    specs = _specs().get(prompt)
    if specs is None:
        return None
    strict = follows(answer, specs)
    if all(strict):
        return 1.0
    if all(follows(answer, specs, loose=True)):
        return 0.5
    return 0.5 * sum(strict) / len(strict)


def strict(prompt: str, answer: str) -> bool | None:
    """Whether the answer follows every instruction as written."""
    specs = _specs().get(prompt)
    return None if specs is None else all(follows(answer, specs))
