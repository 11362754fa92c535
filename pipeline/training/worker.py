"""Entry point of the training child process: `python -m pipeline.training.worker SPEC`.

The spec names the kind's trainer as `module:function`; only that module is imported. A
prefloop error in training (a reward function that raised) is also written, as one line,
beside the checkpoint, so the parent reports it and not the log's traceback."""

import importlib
import json
import sys
from pathlib import Path

from pipeline.errors import PrefloopError


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["output_dir"])
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    module, _, function = spec["trainer"].partition(":")
    train = getattr(importlib.import_module(module), function)
    try:
        metrics = train(spec, partial)
    except PrefloopError as e:  # a known cause (a reward that raised): one line for the parent
        error_file(out).write_text(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    print("metrics " + json.dumps(metrics, sort_keys=True), flush=True)


def error_file(out: Path) -> Path:
    """Where a child that failed for a known reason says why, in one line."""
    return out.with_name(out.name + ".error")


if __name__ == "__main__":
    main(sys.argv[1])
