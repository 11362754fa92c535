"""The reward-model kind (`kind: reward_model`): a Bradley-Terry reward model scores each
answer, one deterministic reading per answer, batched.

`model` is a sequence-classification checkpoint (a directory or a name under data/models/)
or `latest`: the reward model the run trained in its most recent earlier round (the
iterative recipe: the round-t reward model scores round t+1's candidates). Until one
exists, the `fallback` judge scores instead.
"""

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import field_validator

from pipeline.engines.scorer import check_reward_model
from pipeline.errors import ConfigError
from pipeline.judging.parsing import OK, JudgeItem, Sample
from pipeline.models import resolve_model
from pipeline.schema import StrictModel
from pipeline.templates import TemplateLibrary

LATEST = "latest"
TOO_LONG = "prompt_too_long"


class RewardModelJudgeConfig(StrictModel):
    # A Bradley-Terry reward model scores each answer.
    kind: Literal["reward_model"] = "reward_model"
    # A sequence-classification checkpoint (directory or name), or `latest`: the run's newest.
    model: str
    # The judge used while `model: latest` has no reward model yet (any other judge kind).
    fallback: Any = None

    @field_validator("fallback", mode="before")
    @classmethod
    def _fallback(cls, value: Any) -> Any:
        if value is None or isinstance(value, StrictModel):
            return value
        from pipeline.judging import JUDGES

        if not isinstance(value, dict):
            raise ValueError("expected a judge mapping with a `kind`")
        kind = value.get("kind", "template")
        if kind not in JUDGES:
            raise ValueError(f"unknown kind {kind!r} (known: {', '.join(JUDGES)})")
        settings = JUDGES[kind].config.model_validate({**value, "kind": kind})
        if getattr(settings, "model", None) == LATEST:
            raise ValueError("a fallback judge cannot itself wait for the latest reward model")
        return settings


def load(cfg: RewardModelJudgeConfig, library: TemplateLibrary) -> dict[str, Any]:
    """Check a fixed reward model now; with `latest`, a fallback is needed for the rounds
    before one is trained, and its files are loaded here too."""
    from pipeline.judging import load_judge

    if cfg.model != LATEST:
        check_reward_model(resolve_model(cfg.model).path)
    elif cfg.fallback is None:
        raise ConfigError(
            "judge.fallback: `model: latest` needs a fallback judge for the rounds before a "
            "reward model is trained (e.g. {kind: template, template: ...})"
        )
    return {"fallback": load_judge(cfg.fallback, library) if cfg.fallback else None}


class RewardModelJudge:
    template = None
    sampling: dict[str, Any] = {"kind": "reward_model"}

    def __init__(self, cfg: RewardModelJudgeConfig, loaded: Any, engine: Any, model_id: str | None):
        if engine is None:
            raise ValueError("a reward_model judge needs a reward-model scorer")
        self.scorer = engine
        self.model_id = model_id
        if model_id is None:
            raise ValueError("a reward_model judge needs the reward model's id")
        self.judge_id = self.key = model_id

    def score(self, items: Sequence[JudgeItem]) -> list[list[Sample]]:
        conversations = [
            [*item.conversation, {"role": "assistant", "content": item.response}] for item in items
        ]
        rewards = self.scorer.score(conversations)
        return [
            [Sample(None, r, OK) if r is not None else Sample(None, None, TOO_LONG)]
            for r in rewards
        ]
