"""Several OpenAI-compatible servers behind one engine (pipeline/engines/servers.py): the
spread by load, a dead server left out and its requests retried on the other, taken back
when it answers, and one clear error when none answers. The servers here are small
stand-ins on loopback that answer the completions API with a delay of their own; the real
`vllm serve` pair is in tests/test_cluster.py."""

import logging

import pytest
from helpers import FakeOpenAIServer, wait_until

from pipeline.engines import Sampling, start_engine
from pipeline.engines import servers as servers_module
from pipeline.errors import EngineError, TransientEngineError
from pipeline.schema import EngineConfig

PROMPTS = [[{"role": "user", "content": f"Say {i}."}] for i in range(24)]


@pytest.fixture
def pair():
    made = [FakeOpenAIServer(), FakeOpenAIServer()]
    yield made
    for s in made:
        s.stop()


def _engine(tiny_model_dir, urls, **kw):
    cfg = EngineConfig(
        kind="openai", base_url=urls, served_model_name="tiny", max_concurrency=4, **kw
    )
    return start_engine(tiny_model_dir, cfg, seed=0)


@pytest.mark.slow
def test_requests_spread_by_load(tiny_model_dir, pair):
    """Two equal servers share the work; a slow one gets less of it (fewest in flight)."""
    with _engine(tiny_model_dir, [s.url for s in pair]) as engine:
        engine.ping()
        results = engine.generate(PROMPTS, Sampling(n=2, max_tokens=4))
        stats = engine.server_stats()
    assert all(len(r) == 2 for r in results)
    a, b = (stats[s.url]["requests"] for s in pair)
    assert a + b == len(PROMPTS) and min(a, b) >= len(PROMPTS) // 4, stats
    assert sum(s["completion_tokens"] for s in stats.values()) == 2 * len(PROMPTS)

    pair[1].delay = 0.3  # ten times slower: it holds its requests, so gets fewer
    with _engine(tiny_model_dir, [s.url for s in pair]) as engine:
        engine.generate(PROMPTS, Sampling(max_tokens=4))
        stats = engine.server_stats()
    fast, slow = stats[pair[0].url]["requests"], stats[pair[1].url]["requests"]
    assert fast > 2 * slow, stats


@pytest.mark.slow
def test_a_dead_server_is_left_out_and_taken_back(tiny_model_dir, pair, caplog, monkeypatch):
    monkeypatch.setattr(servers_module, "PROBE_AFTER_S", 0.2)
    port = pair[1].port
    with _engine(tiny_model_dir, [s.url for s in pair], max_retries=0) as engine:
        pair[1].stop()  # gone before the batch: every request must still be answered
        with caplog.at_level(logging.WARNING, logger="prefloop.engines"):
            results = engine.generate(PROMPTS, Sampling(max_tokens=4))
        assert len(results) == len(PROMPTS)
        stats = engine.server_stats()
        dead = pair[1].url
        assert not stats[dead]["up"] and stats[dead]["failures"] >= 1
        assert stats[pair[0].url]["requests"] == len(PROMPTS)
        assert any(
            dead in r.getMessage() and "stopped answering" in r.getMessage() for r in caplog.records
        )

        pair[1] = FakeOpenAIServer(port)  # back on the same port

        def taken_back() -> bool:  # once the probe pause has passed
            engine.generate(PROMPTS[:4], Sampling(max_tokens=4))
            return engine.server_stats()[dead]["up"]

        with caplog.at_level(logging.WARNING, logger="prefloop.engines"):
            wait_until(taken_back, 10, "the server to be taken back", every=0.1)
        assert pair[1].hits > 0
        assert any("answers again" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_no_server_answers_is_one_clear_error(tiny_model_dir, pair, caplog):
    with _engine(tiny_model_dir, [s.url for s in pair], max_retries=1) as engine:
        pair[0].stop()
        with caplog.at_level(logging.WARNING, logger="prefloop.engines"):
            engine.ping()  # one of two answers: the run may start, the other is left out
        assert not engine.server_stats()[pair[0].url]["up"]
        assert pair[0].url in caplog.text
        pair[1].stop()
        with pytest.raises(EngineError, match="does not answer"):
            engine.ping()  # none answers: the pre-flight fails
        with pytest.raises(TransientEngineError, match="none of the 2 servers answers") as e:
            engine.generate(PROMPTS[:2], Sampling(max_tokens=4))
    assert all(s.url in str(e.value) for s in pair)
    assert "\n" not in str(e.value)


def test_base_url_list_is_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="listed twice"):
        EngineConfig(kind="openai", base_url=["http://a/v1", "http://a/v1"])
    with pytest.raises(ValidationError, match="names no server"):
        EngineConfig(kind="openai", base_url=[])


@pytest.mark.slow
def test_each_stage_counts_only_its_own_requests(tiny_model_dir, pair):
    """Two batches on one engine at once (the thread runner's workers): each one's tally
    has its own requests, so stage_metrics.servers_json does not count the other's."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.engines.servers import server_rows, tally

    def stage(n: int) -> list[dict]:
        with tally() as counts:
            engine.generate(PROMPTS[:n], Sampling(max_tokens=4))
        return server_rows(counts, {s.url: True for s in pair}, wall=1.0)

    with _engine(tiny_model_dir, [s.url for s in pair]) as engine, ThreadPoolExecutor(2) as pool:
        small, large = pool.map(stage, [4, 20])
    assert sum(r["requests"] for r in small) == 4
    assert sum(r["requests"] for r in large) == 20
    assert {r["server"] for r in small} == {s.url for s in pair}  # idle ones listed too
