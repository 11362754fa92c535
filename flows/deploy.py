"""`prefect deploy` runs this as the build step of prefect.yaml, before it registers a
deployment: the same pre-flight as `prefloop run`, so a bad config fails the deploy with
one line and never reaches a worker."""

import contextlib
import os
from pathlib import Path
from typing import Any

from pipeline.config import load_config
from pipeline.errors import PrefloopError
from pipeline.preflight import preflight as check

DEFAULT_CONFIG = "data/configs/demo.yaml"


def preflight(home: str | None = None, config: str | None = None) -> dict[str, Any]:
    """Check `config` (relative to `home`, the folder the worker runs in; default
    data/configs/demo.yaml) as the worker will read it; returns its absolute path for the
    deployment's parameters (`{{ preflight.config }}`)."""
    if not home or "{{" in home:
        raise PrefloopError(
            "prefect.yaml: PREFLOOP_HOME is not set (the prefloop checkout the worker runs "
            "in); e.g. PREFLOOP_HOME=$PWD prefect deploy --name nightly"
        )
    folder = Path(home).resolve()
    if not (folder / "flows" / "loop.py").is_file():
        raise PrefloopError(f"prefect.yaml: PREFLOOP_HOME={home} is not a prefloop checkout")
    path = Path(config or DEFAULT_CONFIG)
    with _cwd(folder):  # the config's relative paths, as the worker will resolve them
        cfg = load_config(path)
        check(cfg, str(path))
    return {"config": str((folder / path).resolve()), "run": cfg.name}


@contextlib.contextmanager
def _cwd(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)
