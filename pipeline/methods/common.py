"""What the methods share beyond the row contract (pipeline/rows.py): their settings' base
class, and the YAML resources they read from prompts/ (RLCD descriptors, constitutions)."""

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ConfigError
from pipeline.hashing import sha256_file
from pipeline.paths import PROMPTS_DIR
from pipeline.schema import StrictModel, format_validation_error, read_yaml

M = TypeVar("M", bound=BaseModel)


class MethodConfig(StrictModel):
    """A method's section of the run config (`self_reward:`, `rlcd:`, ...)."""

    # Run this method each round.
    enabled: bool = True


class Resource(BaseModel):
    """Base of the YAML resources (descriptor files, constitutions): unknown keys are
    errors, and a loaded resource is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def load_resource(name_or_path: str, model: type[M], subdir: str = "") -> tuple[M, str]:
    """A YAML file validated as `model`, by name under prompts/<subdir> or by path; returns
    it with its content hash. Errors name the file and the field."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROMPTS_DIR / subdir / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (a name in prompts/{subdir} or a YAML path)")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return model.model_validate(data), sha256_file(path)
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from None
