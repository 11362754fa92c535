"""Entry point of the training child process: `python -m pipeline.training.worker SPEC`.

The spec names the kind's trainer as `module:function`; only that module is imported."""

import importlib
import json
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["output_dir"])
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    module, _, function = spec["trainer"].partition(":")
    train = getattr(importlib.import_module(module), function)
    metrics = train(spec, partial)
    print("metrics " + json.dumps(metrics, sort_keys=True), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
