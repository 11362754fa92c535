"""Where a round's tasks run: threads in the flow's process, or Ray tasks on a cluster
(prefect-ray's RayTaskRunner). Ray is imported only when `runner.kind` is ray.

One Ray connection per run (`ray_session`): started or joined before the first round,
shared by every round's task runner, and closed when the run ends. A Ray instance the run
started itself (`runner.address` unset) stops with it; a cluster it joined keeps running.
"""

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect import task
from prefect.cache_policies import NONE

from pipeline.config import RunConfig
from pipeline.errors import PrefloopError
from pipeline.schema import RayResources
from pipeline.training.launch import TrainSpec, run_training

RAY_MISSING = 'runner.kind ray needs the ray extra: .venv/bin/pip install -e ".[ray]"'
# What a Ray worker takes from the flow's environment.
_WORKER_ENV = ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PREFECT_API_URL")


def _ray():
    try:
        import ray
        from prefect_ray import RayTaskRunner  # noqa: F401
    except ImportError:
        raise PrefloopError(RAY_MISSING) from None
    return ray


def check_runner(cfg: RunConfig) -> None:
    """Before any work: the runner's packages are installed."""
    if cfg.runner.kind == "ray":
        _ray()


def flow_api_url() -> str | None:
    """The Prefect API the running flow reports to: the configured server, or the
    temporary one Prefect started for this run when none is configured."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.client is not None:
        return str(ctx.client.api_url)
    return os.environ.get("PREFECT_API_URL") or None


def init_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """`ray.init` arguments: a new local instance on loopback, or the cluster to join."""
    address = cfg.runner.address
    # The workers import prefloop from the same installation; its environment (the
    # offline switches, PYTHONPATH of a checkout) goes with them. They report their task
    # runs to the flow's own API: left unset, each worker would start a temporary Prefect
    # server of its own, which no one stops when the run is killed.
    env = {k: v for k, v in os.environ.items() if k in _WORKER_ENV and v}
    api = flow_api_url()
    if api:
        env["PREFECT_API_URL"] = api
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    if address is None:
        return {
            **kwargs,
            "address": "local",  # a new instance, even where `ray start` made a cluster
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
            "configure_logging": False,
        }
    return {**kwargs, "address": address}


@contextlib.contextmanager
def ray_session(cfg: RunConfig) -> Iterator[None]:
    """The run's Ray connection (nothing for the threads runner)."""
    if cfg.runner.kind != "ray":
        yield
        return
    ray = _ray()
    if ray.is_initialized():  # a caller's own session (a test, a notebook)
        yield
        return
    api = flow_api_url()
    ray.init(**init_kwargs(cfg))
    try:
        check_reachable(cfg, api, _nodes_elsewhere(ray))
        with _api_setting(api):
            yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _api_setting(api: str | None) -> Iterator[None]:
    """prefect-ray hands each task the flow's settings, which take precedence over the
    worker's environment: without a configured server the API URL in them is empty, and
    the worker would start a temporary server of its own. Name the flow's."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not api or PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: api}):
        yield


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _nodes_elsewhere(ray) -> list[str]:
    """Addresses of the cluster's live nodes that are not on this machine."""
    here = set(LOOPBACK)
    with contextlib.suppress(OSError):
        here |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    mine = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here |= {n["NodeManagerAddress"] for n in nodes if n["NodeID"] == mine}
    return sorted({n["NodeManagerAddress"] for n in nodes} - here)


def check_reachable(cfg: RunConfig, api_url: str | None, elsewhere: list[str]) -> None:
    """Ray workers on other machines cannot report to a Prefect API on this machine's
    loopback (the temporary server of a run without PREFECT_API_URL is one): refuse
    before the first task rather than fail in every one."""
    host = urlparse(api_url).hostname if api_url else None
    if elsewhere and host in LOOPBACK:
        raise PrefloopError(
            f"runner.address {cfg.runner.address}: the Ray cluster has nodes on other "
            f"machines ({', '.join(elsewhere)}) that cannot reach the Prefect API at "
            f"{api_url}; set PREFECT_API_URL to a Prefect server every node reaches"
        )


def task_runner(cfg: RunConfig):
    """Threads by default (one worker for local engines), Ray on request."""
    if cfg.runner.kind == "ray":
        _ray()
        from prefect_ray import RayTaskRunner

        # Inside ray_session Ray is up, so the runner joins it and never shuts it down.
        return RayTaskRunner(init_kwargs=init_kwargs(cfg))
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=cfg.runner.workers)


@contextlib.contextmanager
def placed(cfg: RunConfig, resources: RayResources | None) -> Iterator[None]:
    """Tasks submitted inside ask Ray for `resources` (a no-op for threads)."""
    if cfg.runner.kind != "ray" or resources is None or not resources.remote_options():
        yield
        return
    from prefect_ray.context import remote_options

    with remote_options(**resources.remote_options()):
        yield


@task(name="train", task_run_name="train-{spec.kind}", cache_policy=NONE)
def train_task(spec: TrainSpec, accelerate_config: Path | None) -> dict:
    """One training step's child process, on the node Ray placed this task on (its id is
    kept with the step's metrics)."""
    import ray

    metrics = run_training(spec, accelerate_config)
    return {**metrics, "ray_node": ray.get_runtime_context().get_node_id()}


def training_launcher(cfg: RunConfig):
    """How a round's training steps run: a child of the flow's process, or (with
    `runner.train`) a Ray task on a node with those resources."""
    if cfg.runner.kind != "ray" or cfg.runner.train is None:
        return run_training

    def launch(spec: TrainSpec, accelerate_config: Path | None) -> dict:
        with placed(cfg, cfg.runner.train):
            return train_task.submit(spec, accelerate_config).result()

    return launch
