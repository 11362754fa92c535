"""Shared fixtures: the default model, a tiny random model with the real tokenizer."""

import os
import socket
from pathlib import Path

import pytest

from pipeline.models import DEFAULT_MODEL, MODELS_DIR

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    path = MODELS_DIR / DEFAULT_MODEL
    if not (path / "config.json").is_file():
        pytest.fail(f"{path} missing: run `prefloop models pull` (make test does it)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template.

    Head size 64 keeps it on vLLM-CPU's supported attention shapes.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    """The transformers engine on the tiny model, shared by the method tests."""
    from pipeline.config import EngineConfig
    from pipeline.engines import start_engine

    with start_engine(tiny_model_dir, EngineConfig(kind="hf", max_model_len=2048), seed=0) as e:
        yield e


@pytest.fixture
def ctx():
    from pipeline.methods.common import RoundContext

    return RoundContext(run_id="test", round=1, model_id="tiny@0", seed=0)


@pytest.fixture
def library():
    from pipeline.templates import TemplateLibrary

    return TemplateLibrary([Path(__file__).parent / "data"])


@pytest.fixture(scope="session")
def chromium():
    """Render a local HTML file in headless Chromium (Debian's package; `make test`
    installs it) and return the DOM after its scripts ran."""
    import shutil
    import subprocess

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium package")

    def render(path: Path, tmp: Path) -> str:
        out = subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp}",
                "--dump-dom",
                path.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    return render
