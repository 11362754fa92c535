"""The pre-flight: everything a run will need, checked before Prefect or an engine starts.

`prefloop run`, `prefloop serve` (before it registers a deployment: a bad config never
reaches a worker) and the loop flow itself all call `preflight`, so a mistake is one line
naming the file and the field, and the database is left as it was.
"""

from pipeline.config import RunConfig
from pipeline.engines import engine_problem, start_engine
from pipeline.errors import ConfigError
from pipeline.models import ModelInfo, resolve_model
from pipeline.rounds import RoundInputs, judge_models, load_inputs
from pipeline.store import Store


def preflight(cfg: RunConfig, source: str = "config", *, ping: bool = True) -> RoundInputs:
    """Check every input file, every model the run names, the engines' settings (and that
    a remote engine answers, with `ping`), and that the database can be written; returns
    the loaded inputs."""
    inputs = load_inputs(cfg)
    model = resolve_model(cfg.model)
    for other in (*judge_models(cfg).values(), cfg.evaluation.judge_model):
        if other is not None:
            resolve_model(other)
    for name, engine in (("engine", cfg.engine), ("evaluation.engine", cfg.evaluation.engine)):
        if engine is None:
            continue
        problem = engine_problem(engine)
        if problem:
            raise ConfigError(f"{source}: {name}.{problem}")
        if ping and engine.kind == "openai":  # a wrong URL fails here, at once
            _ping(model, engine, cfg.seed)
    with Store(cfg.db_path):  # held by another writer, or from a newer prefloop: fail here
        pass
    return inputs


def _ping(model: ModelInfo, engine, seed: int) -> None:
    with start_engine(model.path, engine, seed) as remote:
        remote.ping()
