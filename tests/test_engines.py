"""Each engine on the same requests, with a tiny random model and the real tokenizer."""

from pathlib import Path

import pytest
import torch
from helpers import CHOICE, CONVERSATIONS, FakeOpenAIServer, check_completions

from pipeline.engines import PROMPT_TOO_LONG, Sampling, engine_problem, start_engine
from pipeline.engines.vllm_engine import CPU_BLOCK_SIZE
from pipeline.errors import EngineError, TransientEngineError
from pipeline.schema import EngineConfig

pytestmark = pytest.mark.slow  # every test here starts an engine


@pytest.mark.parametrize("engine_name", ["hf_engine", "vllm_engine"])
def test_generate_n_samples(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    before = engine.counter.completion_tokens
    results = engine.generate(CONVERSATIONS, Sampling(n=3, temperature=1.0, max_tokens=12))
    check_completions(results, n=3, max_tokens=12)
    assert engine.counter.completion_tokens - before == sum(c.n_tokens for r in results for c in r)
    # A random model almost never repeats itself over 12 sampled tokens.
    assert len({c.text for c in results[0]}) > 1


@pytest.mark.parametrize("engine_name", ["hf_engine", "vllm_engine"])
def test_choice_probs_sum_to_one(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    probs = engine.choice_probs(CHOICE, ["A", "B"], prefix="The answer is: (")
    assert len(probs) == 3
    for row in probs:
        assert len(row) == 2 and abs(sum(row) - 1) < 1e-6 and all(0 <= p <= 1 for p in row)


def test_engines_agree_on_label_probabilities(hf_engine, vllm_engine):
    """Same rendering, same token ids: both engines see the same distribution."""
    prompts = [[{"role": "user", "content": f"Pick one, case {i}."}] for i in range(4)]
    hf = hf_engine.choice_probs(prompts, ["A", "B"], prefix="(")
    vl = vllm_engine.choice_probs(prompts, ["A", "B"], prefix="(")
    for a, b in zip(hf, vl, strict=True):
        assert a[0] == pytest.approx(b[0], abs=2e-3)


@pytest.mark.parametrize("engine_name", ["hf_engine", "vllm_engine"])
def test_multi_token_option_is_refused(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    with pytest.raises(EngineError, match="not exactly one token"):
        engine.choice_probs(CHOICE, ["Answer A", "Answer B"], prefix="(")


def test_prefix_that_merges_with_label_is_refused(hf_engine):
    # "The answer is:" + "A" tokenizes as ":A"-style merges for many tokenizers or not;
    # a label glued to a word is never one clean token after the prompt.
    with pytest.raises(EngineError, match="not exactly one token"):
        hf_engine.choice_probs(CHOICE, ["nswer", "B"], prefix="The a")


@pytest.mark.parametrize("engine_name", ["hf_engine", "vllm_engine"])
def test_too_long_prompt_is_skipped_not_fatal(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    long = [{"role": "user", "content": "word " * 600}]
    results = engine.generate([CONVERSATIONS[0], long], Sampling(n=2, max_tokens=4))
    assert results[1] == results[1][:1] * 2 and results[1][0].finish_reason == PROMPT_TOO_LONG
    assert results[0][0].n_tokens > 0


NUMBERS = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(12)]


def _texts(results):
    return [[c.text for c in r] for r in results]


@pytest.mark.parametrize("engine_name", ["hf_engine", "vllm_engine"])
def test_the_same_call_gives_the_same_samples(request, engine_name):
    """A run's samples follow from its seed and its requests, not from what the engine
    drew before: the same call twice on one engine gives the same answers, and different
    prompts still get different ones."""
    engine = request.getfixturevalue(engine_name)
    params = Sampling(n=2, temperature=1.0, max_tokens=12)
    first = _texts(engine.generate(NUMBERS, params))
    engine.generate(CONVERSATIONS, params)  # draws in between
    assert _texts(engine.generate(NUMBERS, params)) == first
    assert len({r[0] for r in first}) > 1


def test_vllm_answers_do_not_depend_on_the_rest_of_the_batch(vllm_engine):
    """Each request has its own seed (from the run's and its index), so what vLLM batches
    with it, which depends on timing when requests stream in, changes nothing. With only
    the engine's seed, two runs of one config and seed gave other answers."""
    params = Sampling(n=2, temperature=1.0, max_tokens=12)
    alone = _texts(vllm_engine.generate(NUMBERS, params))
    batched = _texts(vllm_engine.generate(NUMBERS + NUMBERS[::-1], params))
    assert batched[: len(NUMBERS)] == alone


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM-CPU's prefill scheduling")
def test_vllm_cpu_survives_seeded_requests_whose_prefills_overflow_a_step(vllm_engine):
    """Prompts that together exceed a step's token budget (4096 on CPU): with chunked
    prefill one of them would be split, and vLLM-CPU's worker dies rewinding that
    request's own generator ("CPU Generator does not use offset")."""
    convs = [[{"role": "user", "content": f"{i} " + "word " * 300}] for i in range(24)]
    results = vllm_engine.generate(convs, Sampling(n=2, temperature=1.0, max_tokens=4))
    assert all(c.n_tokens > 0 for r in results for c in r)
    config = vllm_engine.llm.llm_engine.vllm_config.scheduler_config
    assert not config.enable_chunked_prefill and config.max_num_batched_tokens < 24 * 300


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU engine's block size")
def test_vllm_cpu_uses_small_kv_blocks_and_refuses_what_its_attention_cannot_run(
    vllm_engine, tiny_model_dir
):
    """32-token blocks, so the prefix cache reuses more of a judge prompt (bench/stages.py);
    a size vLLM-CPU's attention cannot run is refused before the engine starts."""
    assert vllm_engine.llm.llm_engine.vllm_config.cache_config.block_size == CPU_BLOCK_SIZE == 32
    cfg = EngineConfig(kind="vllm", block_size=16)
    assert engine_problem(cfg) == "block_size: vLLM-CPU's attention needs a multiple of 32, got 16"
    with pytest.raises(EngineError, match=r"^engine\.block_size: .* got 16$"):
        start_engine(tiny_model_dir, cfg, seed=0)
    assert engine_problem(EngineConfig(kind="vllm", block_size=64)) is None
    assert engine_problem(EngineConfig(kind="hf", block_size=16)) is None


def test_rendering_uses_the_models_chat_template(hf_engine):
    text = hf_engine.render(CONVERSATIONS[1], assistant_prefix="(")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n(")


# -- OpenAI-compatible engine -------------------------------------------------------------


def test_openai_refused_port_is_a_clear_error(tiny_model_dir, free_port):
    """Before a run, a wrong URL fails at once; mid-run, a refused connection is retried
    and then raised as a transient fault (the flow retries the batch, then fails it)."""
    cfg = EngineConfig(kind="openai", base_url=f"http://127.0.0.1:{free_port}/v1", max_retries=1)
    with start_engine(tiny_model_dir, cfg, seed=0) as engine:
        with pytest.raises(EngineError, match="does not answer .*is the server running"):
            engine.ping()
        with pytest.raises(TransientEngineError, match="cannot connect after 2 tries"):
            engine.generate(CONVERSATIONS, Sampling(max_tokens=4))


def test_openai_retries_5xx_then_succeeds(tiny_model_dir):
    server = FakeOpenAIServer(failures=2)
    try:
        cfg = EngineConfig(kind="openai", base_url=server.url, max_retries=3, max_concurrency=1)
        with start_engine(tiny_model_dir, cfg, seed=0) as engine:
            [[a, b]] = engine.generate(CONVERSATIONS[:1], Sampling(n=2, max_tokens=4))
        assert a.text == b.text == "ok"
        assert server.hits == 3  # two 503s, then success
        assert isinstance(server.bodies[0]["prompt"], list)  # token ids, rendered locally
    finally:
        server.stop()


def test_default_model_answers_through_vllm(default_model_dir):
    cfg = EngineConfig(kind="vllm", max_model_len=1024, cpu_kv_cache_gib=1)
    with start_engine(default_model_dir, cfg, seed=0) as engine:
        [[answer]] = engine.generate(
            CONVERSATIONS[:1], Sampling(n=1, temperature=0.0, max_tokens=24)
        )
        scratch = Path(engine.scratch)  # vLLM's sockets: here, not loose in the temp dir
        assert any(p.is_socket() for p in scratch.iterdir()), list(scratch.iterdir())
    assert "Paris" in answer.text
    assert not scratch.exists()
