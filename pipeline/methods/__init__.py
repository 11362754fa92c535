"""The AI-feedback methods and their registry, `METHODS`.

A method is a function of (engine, what it loaded, prompts, round context, its settings,
its judge) -> `Rows` (table name -> row dicts) that the caller stores in one transaction
per batch. None of them opens the database or imports Prefect.

An entry says everything the rest of the code needs to know about a method; adding one is
one module with its settings class and one entry here. The run config gets a section of
the entry's name (`self_reward:`), the round runs every enabled entry batch by batch.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.engines.base import Engine
from pipeline.judging import Judge
from pipeline.methods import cai, rlcd, self_reward
from pipeline.methods.common import MethodConfig
from pipeline.rows import RoundContext, Rows
from pipeline.seeds import Prompt
from pipeline.templates import TemplateLibrary

RunFn = Callable[[Engine, Any, Sequence[Prompt], RoundContext, Any, Judge | None], Rows]


@dataclass(frozen=True)
class Method:
    config: type[MethodConfig]  # its section of the run config; `enabled` turns it on
    run: RunFn  # one batch: (engine, loaded, prompts, ctx, settings, judge) -> rows
    # Templates and YAML resources it reads, checked before any engine starts; what this
    # returns travels with each batch (so a batch can run on another machine).
    load: Callable[[Any, TemplateLibrary], Any] = lambda cfg, library: None
    # How it turns generations into pairs, stored on the round.
    record_policy: Callable[[Any], dict[str, Any]] = lambda cfg: {}
    # Discard reasons that mean "both sides were equally good" (the tie rate).
    tie_reasons: tuple[str, ...] = ()
    # Its `judge:` settings (a judge kind), if it scores answers with a judge.
    judge: Callable[[Any], Any] | None = None
    # Its self-instruct settings, if the round's self-instructed prompts feed it.
    self_instruct: Callable[[Any], Any] | None = None


def _self_reward(engine, loaded, prompts, ctx, cfg, judge) -> Rows:
    return self_reward.run_self_reward(engine, judge, prompts, ctx, cfg)


METHODS: dict[str, Method] = {
    "self_reward": Method(
        config=self_reward.SelfRewardConfig,
        run=_self_reward,
        record_policy=self_reward.record_policy,
        tie_reasons=("tie",),
        judge=lambda cfg: cfg.judge,
        self_instruct=lambda cfg: cfg.self_instruct,
    ),
    "rlcd": Method(
        config=rlcd.RlcdConfig,
        run=rlcd.run,
        load=rlcd.load,
        record_policy=rlcd.record_policy,
        tie_reasons=("identical",),
    ),
    "cai": Method(
        config=cai.CaiConfig,
        run=cai.run,
        load=cai.load,
        record_policy=cai.record_policy,
        tie_reasons=("identical", "unchanged_revision", "tie"),
    ),
}
