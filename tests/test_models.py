import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import QUICK, prefloop, tiny_config, write_config

from pipeline.errors import ModelError
from pipeline.hashing import sha256_dir
from pipeline.models import MANIFEST, pull_default, resolve_model
from pipeline.store import Store

HUB_REPO = "prefloop-test/tiny-chat"


def hub_cache(cache: Path, model_dir: Path, repo: str = HUB_REPO) -> str:
    """huggingface_hub's own cache layout holding `model_dir`'s files as `repo`'s main
    branch: blobs by content, snapshots/<commit>/ linking to them, refs/main. Returns the
    commit."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copy(f, blob)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return commit


def _files_only_model(folder: Path) -> Path:
    """What `check_model_dir` asks of a checkpoint, without weights worth loading."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_a_hub_id_resolves_from_the_cache_offline(tmp_path, monkeypatch):
    """`org/name`, `org/name@main` and `org/name@<commit>` resolve to the cached snapshot
    with the Hub offline, recording repo and commit; one line for what is not cached."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # the suite never reaches the Hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = hub_cache(tmp_path / "hub", _files_only_model(tmp_path / "m"))
    for spec in (HUB_REPO, f"{HUB_REPO}@main", f"{HUB_REPO}@{commit}"):
        info = resolve_model(spec)
        assert (info.repo, info.revision) == (HUB_REPO, commit), spec
        assert (
            info.path
            == tmp_path / "hub" / "models--prefloop-test--tiny-chat" / "snapshots" / commit
        )
        assert info.sha256 == sha256_dir(tmp_path / "m")
        assert info.model_id == f"{HUB_REPO}@{info.sha256[:12]}"
        assert info.record("base")["revision"] == commit
    for spec, why in (
        ("prefloop-test/not-cached", "not in the Hugging Face cache"),
        (f"{HUB_REPO}@v2", "not in the Hugging Face cache"),
    ):
        with pytest.raises(ModelError, match=why) as e:
            resolve_model(spec)
        assert str(e.value).startswith(f"model '{spec}': ") and "\n" not in str(e.value)
        assert "HF_HUB_OFFLINE=1" in str(e.value)
    local = resolve_model(_files_only_model(tmp_path / "org"))  # a directory wins
    assert local.repo is None and local.revision is None


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


@pytest.mark.slow
def test_a_round_on_a_hub_id_offline(tmp_path, tiny_model_dir):
    """A run on `org/name` from a local Hub cache with HF_HUB_OFFLINE=1: the base model's
    row keeps repo, commit and hash, the engines load the snapshot, DPO trains from it;
    `prefloop models resolve` says where the id points."""
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    commit = hub_cache(tmp_path / "hub", tiny_model_dir)
    resolved = prefloop("models", "resolve", HUB_REPO, env=env)
    assert resolved.returncode == 0, resolved.stderr
    lines = dict(
        line.split(maxsplit=1) for line in resolved.stdout.replace("model id", "id").splitlines()
    )
    assert lines["revision"] == commit and lines["repo"] == HUB_REPO
    assert Path(lines["path"]).is_relative_to(tmp_path / "hub")
    cfg = tiny_config(tmp_path, HUB_REPO, name="hub", **{**QUICK, "rounds": 1})
    out = prefloop("run", "--config", write_config(cfg, tmp_path / "hub.yaml"), env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    with Store(tmp_path / "db.duckdb", read_only=True) as store:
        [base] = store.query("SELECT * FROM models WHERE kind = 'base'")
        assert (base["repo"], base["revision"]) == (HUB_REPO, commit)
        assert base["model_id"] == lines["id"] and base["path"] == lines["path"]
        [trained] = store.query("SELECT * FROM models WHERE kind = 'policy'")
        assert trained["parent_model_id"] == base["model_id"]
        [used] = store.query(
            "SELECT count(*) AS n FROM generations WHERE model_id = ?", [base["model_id"]]
        )
        assert used["n"] > 0
