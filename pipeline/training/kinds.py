"""The training kinds and their registry, `TRAINING_KINDS`.

An entry says what a kind trains on (a dataset builder over the round's rows), what it
produces (the next policy, or a scorer for the judges), which of its trainer's metrics are
copied into `evaluations`, and the function that trains it in the child process, named
`module:function` so the child imports only that (TRL stays out of the flow's process).
Adding a kind is one trainer module and one entry here; `training.kind` takes its name.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from datasets import DatasetDict

from pipeline.training import export

# (store, training settings, run id, round, seed) -> train/test splits.
DatasetFn = Callable[[Any, Any, str, int, int], DatasetDict]


@dataclass(frozen=True)
class TrainingKind:
    trainer: str  # "module:function", called in the child as function(spec, out_dir) -> metrics
    data: DatasetFn  # what it trains on, as TRL's dataset format for its trainer
    # policy: the next round generates with what it trained; scorer: a model that scores
    # answers (registered for the judges), the policy stays.
    produces: Literal["policy", "scorer"]
    # metrics.json key -> evaluations metric, each with its "<key>_before" where measured.
    metrics: Mapping[str, str] = field(default_factory=dict)
    uses_reference: bool = False  # trains against a frozen reference model (DPO)


TRAINING_KINDS: dict[str, TrainingKind] = {
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
    "rm": TrainingKind(
        trainer="pipeline.training.reward:train_reward",
        data=export.preference_pairs,
        produces="scorer",
        metrics={"heldout_pairwise_accuracy": "rm_pairwise_accuracy"},
    ),
}

NO_TRAINING = "none"


def produces_policy(kind: str) -> bool:
    """Whether the model this kind trains is the one the next round generates with."""
    return kind != NO_TRAINING and TRAINING_KINDS[kind].produces == "policy"
