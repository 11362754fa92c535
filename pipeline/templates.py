"""Prompt templates: a sandboxed Jinja2 environment over prompts/ and user directories.

A template declares its metadata in front matter, a Jinja comment at the top of the file:

    {#---
    description: the additive 5-point judge
    variables: [instruction, response]
    parser: {kind: score, pattern: 'Score:\\s*(\\d+(?:\\.\\d+)?)', min: 0, max: 5}
    ---#}

Templates are checked when loaded (syntax, every variable used is declared, parser valid)
and content-hashed so each stored row can name the exact text that produced it.
Generated text only ever enters as a variable's value: it is never rendered as a template.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml
from jinja2 import meta as jinja_meta
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import TemplateError
from pipeline.hashing import sha256_text
from pipeline.paths import PROMPTS_DIR
from pipeline.schema import format_validation_error

SUFFIX = ".j2"
_FRONT_MATTER = re.compile(r"\A\{#-?\s*---\s*\n(.*?)\n\s*---\s*-?#\}", re.DOTALL)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreParser(_Strict):
    """A number read from the judge's text: the last match of `pattern`'s first group."""

    kind: Literal["score"]
    pattern: str
    min: float
    max: float
    # clamp: out-of-range scores are clamped to [min, max]; invalid: they count as unparsed.
    out_of_range: Literal["clamp", "invalid"] = "clamp"
    # Prefilled judges: the reply starts with `prefix` (e.g. "Score: ") and the score is the
    # expected value over the probabilities of the integers min..max (as in G-Eval), each
    # read as a complete continuation: its tokens, then `suffix`, what closes the score in
    # the output format ("]]" after "Rating: [[7"). Without a suffix "1" would also count
    # the start of "10"; a scale whose labels overlap so is refused before the run. Small
    # models that do not follow an output format still give a score.
    prefix: str | None = None
    suffix: str = ""

    @model_validator(mode="after")
    def _check(self) -> "ScoreParser":
        _compile_one_group(self.pattern)
        if self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        if self.prefix is not None and not (
            float(self.min).is_integer() and float(self.max).is_integer()
        ):
            raise ValueError("a prefilled (prefix) score needs integer min and max")
        if self.suffix and self.prefix is None:
            raise ValueError("suffix closes a prefilled score: it needs a prefix")
        return self

    @property
    def labels(self) -> list[str]:
        """The scores a prefilled judge chooses between."""
        return [str(i) for i in range(int(self.min), int(self.max) + 1)]

    @property
    def continuations(self) -> list[str]:
        """Each label as the complete text a prefilled judge's reply continues with."""
        return [label + self.suffix for label in self.labels]


class ChoiceParser(_Strict):
    """A choice between labels (e.g. A/B). `prefix` is the assistant text after which the
    label token is read from next-token probabilities; `pattern` reads a label from
    generated text (chain-of-thought variants)."""

    kind: Literal["choice"]
    labels: list[str] = Field(min_length=2)
    prefix: str = ""
    pattern: str | None = None
    # Chain-of-thought judges: the reasoning is generated after this assistant prefix, and
    # the label is read after the reasoning and `prefix`.
    reasoning_prefix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChoiceParser":
        if self.pattern is not None:
            _compile_one_group(self.pattern)
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        return self


class TemplateMeta(_Strict):
    description: str = ""
    variables: list[str] = []
    parser: ScoreParser | ChoiceParser | None = Field(None, discriminator="kind")


def _compile_one_group(pattern: str) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regex: {e}") from None
    if compiled.groups != 1:
        raise ValueError(f"pattern {pattern!r} must have exactly one capture group")
    return compiled


@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    text: str
    sha256: str
    meta: TemplateMeta
    _compiled: jinja2.Template

    @property
    def template_id(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    def render(self, **variables: Any) -> str:
        missing = [v for v in self.meta.variables if v not in variables]
        if missing:
            raise TemplateError(
                f"{self.path}: missing variable {missing[0]!r} "
                f"(the template declares {', '.join(self.meta.variables)})"
            )
        try:
            return self._compiled.render(**variables).strip()
        except SecurityError as e:
            raise TemplateError(f"{self.path}: blocked by the sandbox: {e}") from None
        except jinja2.UndefinedError as e:
            raise TemplateError(f"{self.path}: {e}") from None

    def expect(self, role: str, provided: Sequence[str]) -> "Template":
        """Check, at load time, that the template needs no variable beyond what its role
        passes it and renders in the sandbox: a swapped template fails before any engine
        starts, not mid-round."""
        extra = [v for v in self.meta.variables if v not in provided]
        if extra:
            raise TemplateError(
                f"{self.path}: variables: {extra[0]!r} is not given to a {role} template "
                f"(it gets {', '.join(provided)})"
            )
        self.render(**{v: f"<{v}>" for v in provided})  # sandbox and undefined errors now
        return self

    def __reduce__(self):
        # Compiled Jinja2 does not pickle; a template travels as its text (to a task on
        # another machine) and is compiled again, in the same sandbox, where it lands.
        return (_from_text, (self.name, self.path, self.text, self.sha256, self.meta))

    def record(self) -> dict[str, Any]:
        """The row the store keeps for this template."""
        return {
            "template_id": self.template_id,
            "name": self.name,
            "sha256": self.sha256,
            "path": str(self.path),
            "text": self.text,
            "metadata_json": self.meta.model_dump_json(),
        }


class TemplateLibrary:
    """Templates by name from prompts/ and extra directories; a path to a file also works."""

    def __init__(self, extra_dirs: list[Path] | None = None) -> None:
        self.dirs = [Path(d) for d in (extra_dirs or [])] + [PROMPTS_DIR]
        for d in self.dirs:
            if not d.is_dir():
                raise TemplateError(f"{d}: template directory not found")
        self.env = _sandbox()
        self._cache: dict[Path, Template] = {}

    def names(self) -> list[str]:
        seen: dict[str, Path] = {}
        for d in reversed(self.dirs):  # user directories shadow the shipped ones
            for p in sorted(d.rglob(f"*{SUFFIX}")):
                seen[p.relative_to(d).as_posix()[: -len(SUFFIX)]] = p
        return sorted(seen)

    def resolve(self, name_or_path: str | Path) -> Path:
        candidate = Path(name_or_path)
        if candidate.suffix == SUFFIX and candidate.is_file():
            return candidate.resolve()
        for d in self.dirs:
            p = d / f"{name_or_path}{SUFFIX}"
            if p.is_file():
                return p.resolve()
        raise TemplateError(
            f"template {str(name_or_path)!r} not found in {', '.join(map(str, self.dirs))} "
            "(give a name from `prefloop templates list` or a path to a .j2 file)"
        )

    def get(self, name_or_path: str | Path) -> Template:
        path = self.resolve(name_or_path)
        if path not in self._cache:
            self._cache[path] = self._load(path)
        return self._cache[path]

    def _load(self, path: Path) -> Template:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TemplateError(f"{path}: not UTF-8 text (byte {e.start})") from None
        meta = _parse_meta(path, text)
        try:
            ast = self.env.parse(text)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{path}:{e.lineno}: template syntax error: {e.message}") from None
        undeclared = sorted(jinja_meta.find_undeclared_variables(ast) - set(meta.variables))
        if undeclared:
            raise TemplateError(
                f"{path}: uses variable {undeclared[0]!r} that its front matter does not "
                "declare (add it to `variables:`)"
            )
        name = path.stem
        for d in self.dirs:
            if path.is_relative_to(d.resolve()):
                name = path.relative_to(d.resolve()).as_posix()[: -len(SUFFIX)]
                break
        return Template(
            name=name,
            path=path,
            text=text,
            sha256=sha256_text(text),
            meta=meta,
            _compiled=self.env.from_string(text),
        )


@lru_cache(maxsize=1)
def _sandbox() -> SandboxedEnvironment:
    return SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )


def _from_text(name: str, path: Path, text: str, sha256: str, meta: TemplateMeta) -> Template:
    return Template(name, path, text, sha256, meta, _sandbox().from_string(text))


def _parse_meta(path: Path, text: str) -> TemplateMeta:
    match = _FRONT_MATTER.match(text)
    if not match:
        return TemplateMeta()
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 2}" if mark else ""  # +1 for 1-based, +1 for the {#--- line
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TemplateError(f"{path}{where}: front matter is not valid YAML: {problem}") from None
    try:
        return TemplateMeta.model_validate(data)
    except ValidationError as e:
        raise TemplateError(format_validation_error(f"{path} front matter", e)) from None
