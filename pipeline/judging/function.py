"""The function kind (`kind: function`): a Python callable named `module:function` takes
the prompt and the answer and returns a number (True / False count as 1 / 0), or None
when it cannot tell. Rule-based and verifiable rewards, as TRL's reward functions are; no
model.

Its judge id carries a hash of the function's source, so a changed rule is a new judge.
"""

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pipeline.errors import ConfigError, PrefloopError
from pipeline.hashing import sha256_text
from pipeline.judging.parsing import NOT_A_NUMBER, OK, JudgeItem, Sample
from pipeline.schema import StrictModel
from pipeline.templates import TemplateLibrary

NO_SCORE = "no_score"


class FunctionJudgeConfig(StrictModel):
    # A Python rule scores each answer.
    kind: Literal["function"] = "function"
    function: str  # "package.module:function"


def import_function(name: str, where: str = "judge.function") -> Callable[[str, str], Any]:
    """The callable `module:function`, imported now; a wrong name is one line naming it."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: {name!r} is not `module:function`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {module_name!r} has no function {attr!r}")
    return fn


def code_hash(fn: Callable) -> str:
    try:
        return sha256_text(inspect.getsource(fn))
    except (OSError, TypeError):  # no source (a builtin, a C extension): its name
        return sha256_text(f"{fn.__module__}:{fn.__qualname__}")


def load(cfg: FunctionJudgeConfig, library: TemplateLibrary) -> Callable:
    return import_function(cfg.function)


class FunctionJudge:
    model_id = None
    template = None

    def __init__(self, cfg: FunctionJudgeConfig, fn: Callable, engine: Any, model_id: Any):
        self.name, self.fn = cfg.function, fn
        digest = code_hash(fn)
        self.judge_id = f"{cfg.function}@{digest[:12]}"
        self.key = digest
        self.sampling: dict[str, Any] = {"function": cfg.function, "code_sha256": digest}

    def score(self, items: Sequence[JudgeItem]) -> list[list[Sample]]:
        return [[self._one(item.instruction, item.response)] for item in items]

    def _one(self, prompt: str, answer: str) -> Sample:
        value = self.fn(prompt, answer)
        if value is None:
            return Sample(None, None, NO_SCORE)
        if isinstance(value, bool):  # a check that passed or failed: 1 or 0
            value = float(value)
        if not isinstance(value, int | float):
            raise PrefloopError(
                f"judge function {self.name}: returned {type(value).__name__} "
                f"{value!r:.40}; return a number, or None when it cannot tell"
            )
        if math.isnan(value) or math.isinf(value):
            return Sample(None, None, NOT_A_NUMBER)
        return Sample(None, float(value), OK)
