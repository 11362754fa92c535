"""Entry point of the training child process: `python -m pipeline.training.worker SPEC`."""

import json
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["output_dir"])
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "dpo":
        from pipeline.training.dpo import train_dpo

        metrics = train_dpo(spec, partial)
    elif spec["kind"] == "rm":
        from pipeline.training.reward import train_reward

        metrics = train_reward(spec, partial)
    else:
        raise ValueError(f"unknown training kind {spec['kind']!r}")
    print("metrics " + json.dumps(metrics, sort_keys=True), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
