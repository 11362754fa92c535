"""The run configuration: one YAML file, validated as `RunConfig`, overridden with
`--set key.path=value`.

Layering is defaults < YAML < CLI. The shared sections (engine, prompts, training, runner,
evaluation) are built in `pipeline/schema.py`; each method of the registry adds its own
section under its name (`self_reward:`, `rlcd:`, `cai:`), validated by its settings class,
so a new method needs no edit here. Unknown keys are rejected everywhere. Relative paths
are relative to the working directory.
"""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError
from pipeline.methods import METHODS
from pipeline.methods.common import MethodConfig
from pipeline.schema import (
    EngineConfig,
    EvaluationConfig,
    PromptsConfig,
    RunnerConfig,
    StepSettings,
    StrictModel,
    TrainingConfig,
    format_validation_error,
    merge,
    parse_overrides,
    read_yaml,
)
from pipeline.training.kinds import TRAINING_KINDS

__all__ = ["RunConfig", "load_config", "parse_config", "parse_overrides"]


def _known_methods(methods: list[str] | None) -> list[str] | None:
    for name in methods or []:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return methods


def _known_step_kind(kind: str) -> str:
    if kind not in TRAINING_KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(TRAINING_KINDS)})")
    return kind


def _kind_limits(step: TrainingConfig) -> None:
    """Settings a kind's trainer would refuse only after its child started."""
    if step.kind == "kto" and step.batch_size < 2 and step.loss_type != "apo_zero_unpaired":
        raise ValueError(
            "kto needs batch_size >= 2 (its KL estimate pairs each answer with another "
            "prompt's in the same batch)"
        )
    if TRAINING_KINDS[step.kind].online:
        if step.reward is None:
            raise ValueError(
                f"{step.kind} needs a reward judge: reward: {{kind: function, function: "
                "module:function}, {kind: reward_model, model: latest} or a template judge"
            )
        group = getattr(step, step.kind).num_generations
        if step.batch_size * step.gradient_accumulation_steps % group:
            raise ValueError(
                f"{step.kind} counts its batch in answers: batch_size x "
                f"gradient_accumulation_steps ({step.batch_size} x "
                f"{step.gradient_accumulation_steps}) must be a multiple of "
                f"{step.kind}.num_generations ({group})"
            )


class RunStepConfig(TrainingConfig):
    # The step's training kind: a name in pipeline/training/kinds.py.
    kind: Annotated[str, AfterValidator(_known_step_kind)]
    methods: Annotated[list[str] | None, AfterValidator(_known_methods)] = None

    @model_validator(mode="after")
    def _limits(self) -> "RunStepConfig":
        _kind_limits(self)
        return self


class RunTrainingConfig(StepSettings):
    # Train on these methods' rows only (None: every method's).
    methods: Annotated[list[str] | None, AfterValidator(_known_methods)] = None
    # The round's training steps in order, each a kind plus the settings it overrides
    # (`[sft, dpo]`, or `[{kind: sft, epochs: 2}, {kind: dpo, beta: 0.2}]`); `[]` trains
    # nothing. A policy step starts from the previous policy step's model.
    steps: list[RunStepConfig] = Field(default_factory=lambda: ["dpo"], validate_default=True)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps_inherit(cls, steps: Any, info: ValidationInfo) -> Any:
        """Each step is the shared settings above it with its own on top (nested sections
        merge key by key), so an error keeps its place: `training.steps.1.beta`."""
        if not isinstance(steps, list):
            return steps
        shared = {
            k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
            for k, v in info.data.items()
        }
        out = []
        for step in steps:
            if isinstance(step, str):
                step = {"kind": step}
            out.append(merge(shared, step) if isinstance(step, dict) else step)
        return out

    @field_validator("steps")
    @classmethod
    def _each_kind_once(cls, steps: list[RunStepConfig]) -> list[RunStepConfig]:
        kinds = [s.kind for s in steps]
        for kind in kinds:
            if kinds.count(kind) > 1:
                raise ValueError(f"kind {kind!r} appears twice (a round trains a kind once)")
        return steps

    def step_list(self) -> list[TrainingConfig]:
        """The round's steps in order ([] = no training)."""
        return list(self.steps)


class RunConfig(StrictModel):
    """A run. Besides these fields it has one section per registered method, by name
    (`cfg.self_reward`, or `cfg.method("self_reward")`)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    # The run's name: its rows, folder and models carry it; a new name is a new run.
    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # The DuckDB file every row goes to (several runs may share one).
    db_path: Path = Path("data/prefloop.duckdb")
    # Where each round leaves its folder: config, data snapshots, checkpoints, report.
    runs_dir: Path = Path("data/runs")
    # The initial policy: a name under data/models/, a checkpoint directory, or a Hugging
    # Face Hub id (`org/name`, `org/name@revision`) from huggingface_hub's cache.
    model: str = "smollm2-135m-instruct"
    # Rounds `prefloop run` runs (--rounds overrides).
    rounds: int = Field(1, ge=1)
    # How long a write waits for readers holding the database (a DuckDB client, a
    # `prefloop sql` left open) before the run fails with one line naming the holder.
    db_lock_timeout_s: float = Field(300.0, gt=0)
    # Seeds every draw (prompts per round, samples, principles, splits).
    seed: int = 0
    # How the models run: vllm, hf (transformers) or openai servers.
    engine: EngineConfig = EngineConfig()
    # The seed prompts and how many each round draws.
    prompts: PromptsConfig = PromptsConfig()
    # The round's training steps and the settings they share.
    training: RunTrainingConfig = RunTrainingConfig()
    # Where batch tasks run: threads, or Ray.
    runner: RunnerConfig = RunnerConfig()
    # What is measured after each round.
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="wrap")
    @classmethod
    def _method_sections(cls, data: Any, handler: Any) -> "RunConfig":
        """Every key that is not a field above is a method's section: validated by that
        method's settings class (errors keep their location: `rlcd.sampling.top_p`), and
        an unknown key is an error like any other."""
        if isinstance(data, RunConfig):
            return data
        if not isinstance(data, dict):
            return handler(data)
        fields = {k: v for k, v in data.items() if k in cls.model_fields}
        sections = _sections_model().model_validate(
            {k: v for k, v in data.items() if k not in cls.model_fields}
        )
        cfg = handler(fields)
        cfg.__pydantic_extra__ = {name: getattr(sections, name) for name in METHODS}
        return cfg

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if (self.runner.workers > 1 or self.runner.kind == "ray") and self.engine.kind != "openai":
            raise ValueError(
                "runner.workers > 1 and runner.kind ray need engine.kind openai (local engines "
                "are one per process)"
            )
        if self.runner.train is not None and self.runner.kind != "ray":
            raise ValueError(
                "runner.train: places the training step on a Ray node; needs runner.kind ray"
            )
        online = any(TRAINING_KINDS[s.kind].online for s in self.training.step_list())
        if not self.enabled_methods() and not online:
            raise ValueError(
                f"enable at least one of {', '.join(METHODS)} (or train an online RL kind, "
                f"{', '.join(k for k, v in TRAINING_KINDS.items() if v.online)}, alone)"
            )
        return self

    def method(self, name: str) -> MethodConfig:
        return self.__pydantic_extra__[name]

    def enabled_methods(self) -> list[str]:
        """Names of the enabled methods, in registry order."""
        extra = self.__pydantic_extra__ or {}
        return [m for m in METHODS if m in extra and extra[m].enabled]


def _sections_model() -> type[BaseModel]:
    return _sections_for(tuple((name, m.config) for name, m in METHODS.items()))


@lru_cache(maxsize=8)
def _sections_for(entries: tuple[tuple[str, type[MethodConfig]], ...]) -> type[BaseModel]:
    """A model with one field per registered method (rebuilt when the registry changes)."""
    fields: dict[str, Any] = {name: (cls, Field(default_factory=cls)) for name, cls in entries}
    return create_model("MethodSections", __base__=StrictModel, **fields)


def parse_config(data: dict[str, Any] | str, source: str = "config") -> RunConfig:
    """A config mapping, or its JSON (as tasks receive it), validated; errors are one line."""
    try:
        if isinstance(data, str):
            return RunConfig.model_validate_json(data)
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < YAML file < `--set` overrides, validated as one RunConfig."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        loaded = read_yaml(Path(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        data = loaded
    if overrides:
        data = merge(data, parse_overrides(overrides))
        source = f"{source} (with --set)"
    return parse_config(data, source)
