"""The training kinds and their registry, `TRAINING_KINDS`.

An entry says what a kind trains on (a dataset builder over the round's rows, and its
columns), what it produces (the next policy, or a scorer for the judges), which of its
trainer's metrics are copied into `evaluations`, and the function that trains it in the
child process, named `module:function` so the child imports only that (TRL stays out of
the flow's process). Adding a kind is one trainer module and one entry here;
`training.kind` and `training.steps` take its name.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.training import export

# (store, training settings, run id, round, seed) -> a `datasets.DatasetDict` of train/test
# splits; `datasets` is imported only when one is built, not to read this registry.
DatasetFn = Callable[[Any, Any, str, int, int], Any]


@dataclass(frozen=True)
class TrainingKind:
    trainer: str  # "module:function", called in the child as function(spec, out_dir) -> metrics
    data: DatasetFn  # what it trains on, as TRL's dataset format for its trainer
    # policy: the next round generates with what it trained; scorer: a model that scores
    # answers (registered for the judges), the policy stays.
    produces: Literal["policy", "scorer"]
    # The columns `data` makes (default: preference pairs).
    columns: export.Columns = field(default_factory=lambda: export.PAIR_COLUMNS)
    # metrics.json key -> evaluations metric, each with its "<key>_before" where measured.
    metrics: Mapping[str, str] = field(default_factory=dict)
    uses_reference: bool = False  # trains against a frozen reference model (DPO, KTO)
    # The methods whose rows it can train on, given the step's settings (None: any
    # method's pairs); the pre-flight refuses a step none of whose sources is enabled.
    sources: Callable[[Any], tuple[str, ...] | None] = lambda step: None
    # Online RL: it trains on the round's prompts (no method's rows), sampling answers in
    # the trainer and scoring them with the step's `reward` judge; each answer and its
    # reward is stored with the step (`generations`, `judgments`).
    online: bool = False


TRAINING_KINDS: dict[str, TrainingKind] = {
    "sft": TrainingKind(
        trainer="pipeline.training.sft:train_sft",
        data=export.sft_conversations,
        columns=export.SFT_COLUMNS,
        produces="policy",
        metrics={"heldout_loss": "sft_heldout_loss"},
        sources=lambda step: ("cai",) * step.sft.revisions + ("self_reward",) * step.sft.best_of_n,
    ),
    "dpo": TrainingKind(
        trainer="pipeline.training.dpo:train_dpo",
        data=export.preference_pairs,
        produces="policy",
        metrics={
            "heldout_reward_accuracy": "implicit_reward_accuracy",
            "heldout_reward_margin": "implicit_reward_margin",
        },
        uses_reference=True,
    ),
    "kto": TrainingKind(
        trainer="pipeline.training.kto:train_kto",
        data=export.unpaired_examples,
        columns=export.KTO_COLUMNS,
        produces="policy",
        metrics={
            "heldout_reward_accuracy": "kto_implicit_reward_accuracy",
            "heldout_reward_margin": "kto_implicit_reward_margin",
        },
        uses_reference=True,
    ),
    "rm": TrainingKind(
        trainer="pipeline.training.reward:train_reward",
        data=export.preference_pairs,
        produces="scorer",
        metrics={"heldout_pairwise_accuracy": "rm_pairwise_accuracy"},
    ),
    "grpo": TrainingKind(
        trainer="pipeline.training.rl:train_grpo",
        data=export.round_prompts,
        columns=export.PROMPT_COLUMNS,
        produces="policy",
        metrics={"heldout_reward": "rl_heldout_reward"},
        online=True,
    ),
    "rloo": TrainingKind(
        trainer="pipeline.training.rl:train_rloo",
        data=export.round_prompts,
        columns=export.PROMPT_COLUMNS,
        produces="policy",
        metrics={"heldout_reward": "rl_heldout_reward"},
        online=True,
    ),
}


def produces_policy(kind: str) -> bool:
    """Whether the model this kind trains is the one the next round generates with."""
    return TRAINING_KINDS[kind].produces == "policy"


def train_stage(kind: str) -> str:
    """The round stage (`stage_metrics.stage`) of a training step of this kind."""
    return f"train_{kind}"


def stored_policy(store, steps: list, run_id: str, round_: int, start: str) -> str:
    """The policy these stored steps of a round hand on: the last stored policy step's
    model, else `start` (the round's model)."""
    policy = start
    for step in steps:
        output = store.finished_training(run_id, round_, step.kind)
        if output is not None and TRAINING_KINDS[step.kind].produces == "policy":
            policy = output
    return policy
