"""A round's stages, in the order they run: the one list that the flow runs, that the round
stores as its plan (`rounds.plan_json`, read by `prefloop status` and by the report, which
orders each round's time by it), and that resume checks: a stage's batch is done when its
`stage_metrics` row is stored.

A stage has a name (its `stage_metrics.stage`), a kind (what runs it), a number of
batches, and, for the stages that answer with a model, whose model: the round's before
training (`round`), the run's initial model (`initial`) or the one training made
(`trained`).
"""

from dataclasses import dataclass
from typing import Literal

from pipeline.config import RunConfig
from pipeline.evaluation.metrics import WIN_RATE as WIN_RATE_METRIC
from pipeline.rounds import RoundInputs, method_takes_generated, self_instruct_settings
from pipeline.training.kinds import produces_policy, train_stage

# Stage names that are not a method's or a training step's.
SELF_INSTRUCT = "self_instruct"
AGREEMENT = "agreement"
YARDSTICK_BASE = "yardstick_base"
HELDOUT = "heldout"
HELDOUT_NEW = "heldout_new"
YARDSTICK = "yardstick"
BENCHMARKS_BASE = "benchmarks_base"
BENCHMARKS = "benchmarks"
WIN_RATE = WIN_RATE_METRIC  # the stage is named for what it stores
FLOW = "flow"  # the flow's own time (store work, engine shutdowns); one row per attempt

Kind = Literal[
    "self_instruct", "method", "agreement", "answers", "yardstick", "benchmark", "train", "compare"
]
Model = Literal["round", "initial", "trained"]


@dataclass(frozen=True)
class Stage:
    name: str
    kind: Kind
    batches: int = 1
    method: str | None = None  # kind method: which one
    step: str | None = None  # kind train: the training kind
    model: Model = "round"  # kinds answers, yardstick and benchmark: whose answers

    @property
    def uses_engines(self) -> bool:
        """Training and lm-eval's own model need the memory: every engine is stopped
        before a train or benchmark stage."""
        return self.kind not in ("train", "benchmark")


def compares_models(cfg: RunConfig, inputs: RoundInputs) -> bool:
    """Whether the round measures M_t+1 against M_t on the held-out prompts: evaluation
    on, a policy trained, and held-out prompts to answer."""
    trains_policy = any(produces_policy(s.kind) for s in cfg.training.step_list())
    return cfg.evaluation.enabled and trains_policy and bool(inputs.heldout_prompts)


def round_plan(
    cfg: RunConfig, inputs: RoundInputs, round_: int, seeds: int, generated: int | None = None
) -> list[Stage]:
    """The round's stages in order. `seeds`: the round's seed prompts; `generated`: the
    self-instructed prompts made (None before self-instruct ran: as many as asked for)."""
    instruct = self_instruct_settings(cfg)
    if generated is None:
        generated = instruct.new_prompts if instruct else 0
    stages = [Stage(SELF_INSTRUCT, "self_instruct")] if instruct else []
    for method in cfg.enabled_methods():
        n = seeds + (generated if method_takes_generated(cfg, method) else 0)
        batches = -(-n // cfg.engine.batch_size)
        stages.append(Stage(method, "method", batches=batches, method=method))
    evaluation = cfg.evaluation
    compare = compares_models(cfg, inputs)
    if evaluation.enabled and evaluation.agreement:
        stages.append(Stage(AGREEMENT, "agreement"))
    if inputs.yardstick and round_ == 1:  # M_0, once per run, while its engine is up
        stages.append(Stage(YARDSTICK_BASE, "yardstick", model="initial"))
    if compare:
        stages.append(Stage(HELDOUT, "answers", model="round"))
    # lm-eval's tasks, one batch each, where no engine is up: M_0 before training, M_t after.
    tasks = len(evaluation.benchmarks.tasks)
    if tasks and round_ == 1:
        stages.append(Stage(BENCHMARKS_BASE, "benchmark", batches=tasks, model="initial"))
    stages += [Stage(train_stage(s.kind), "train", step=s.kind) for s in cfg.training.step_list()]
    if tasks:
        stages.append(Stage(BENCHMARKS, "benchmark", batches=tasks, model="trained"))
    if compare:
        stages.append(Stage(HELDOUT_NEW, "answers", model="trained"))
    if inputs.yardstick:
        stages.append(Stage(YARDSTICK, "yardstick", model="trained"))
    if compare:
        stages.append(Stage(WIN_RATE, "compare"))
    return stages
