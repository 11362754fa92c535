import json

import pytest

from pipeline.errors import ModelError
from pipeline.hashing import sha256_dir
from pipeline.models import MANIFEST, pull_default, resolve_model


@pytest.mark.slow
def test_pull_is_a_noop_when_present(default_model_dir):
    info, pulled = pull_default()
    assert not pulled
    assert info.path == default_model_dir.resolve()
    manifest = json.loads((default_model_dir / MANIFEST).read_text())
    assert manifest["sha256"] == info.sha256 == sha256_dir(default_model_dir, exclude=(MANIFEST,))


@pytest.mark.slow
def test_converted_checkpoint_answers_in_transformers(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    assert "quantization_config" not in model.config.to_dict()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_any_checkpoint_directory_is_a_model(tiny_model_dir):
    info = resolve_model(tiny_model_dir)
    assert info.path == tiny_model_dir.resolve()
    assert info.model_id.startswith(f"{tiny_model_dir.name}@")
    assert resolve_model(str(tiny_model_dir)).sha256 == info.sha256


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "model directory not found|no such directory"),
        (lambda d: d.mkdir(), "no config.json"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "no weights"),
    ],
)
def test_bad_model_directories(tmp_path, setup, message):
    target = tmp_path / "m"
    setup(target)
    with pytest.raises(ModelError, match=message):
        resolve_model(target)
