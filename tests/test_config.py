from pathlib import Path

import pytest

from pipeline.config import RunConfig, load_config, parse_overrides
from pipeline.errors import ConfigError, PrefloopError
from pipeline.paths import DATA_DIR
from pipeline.rounds import load_inputs

CONFIGS = sorted((DATA_DIR / "configs").glob("*.yaml"))
assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # Every file the config names (prompts, templates, descriptors, constitution) loads.
    inputs = load_inputs(cfg)
    assert inputs.train_prompts and len(inputs.heldout_prompts) == cfg.prompts.heldout


ACCELERATE = sorted((DATA_DIR / "configs" / "accelerate").glob("*.yaml"))


def test_the_accelerate_configs_are_there():
    assert [p.name for p in ACCELERATE] == [
        "deepspeed_zero2.yaml",
        "multi_gpu.yaml",
        "single_gpu.yaml",
    ]


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    import yaml

    cfg = yaml.safe_load(path.read_text())
    assert cfg["num_processes"] >= 1 and "distributed_type" in cfg, path


def test_layering_defaults_yaml_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: r1\ntraining:\n  beta: 0.2\n  epochs: 2\n")
    cfg = load_config(path, ["training.beta=0.5", "engine.kind=hf", "rlcd.tasks=[helpfulness]"])
    assert cfg.name == "r1"  # yaml
    assert cfg.training.beta == 0.5  # cli beats yaml
    assert cfg.training.epochs == 2  # yaml kept beside a cli override in the same section
    assert cfg.training.learning_rate == 1e-6  # default
    assert cfg.engine.kind == "hf"
    assert cfg.rlcd.tasks == ["helpfulness"]


def _error(tmp_path, text, overrides=None) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_malformed_yaml_names_file_and_line(tmp_path):
    msg = _error(tmp_path, "name: demo\ntraining:\n  beta: [0.1\n")
    assert "bad.yaml:" in msg and "invalid YAML" in msg
    assert ":4:" in msg or ":3:" in msg


def test_unknown_key_names_the_field(tmp_path):
    msg = _error(tmp_path, "training:\n  betta: 0.1\n")
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}: training.betta: unknown key")


def test_wrong_type_names_the_field(tmp_path):
    msg = _error(tmp_path, "rounds: many\n")
    assert "bad.yaml: rounds:" in msg and "integer" in msg


def test_out_of_range_value(tmp_path):
    msg = _error(tmp_path, "cai:\n  revisions: 9\n")
    assert "cai.revisions" in msg


def test_unknown_key_from_set(tmp_path):
    msg = _error(tmp_path, "name: x\n", ["engine.knd=hf"])
    assert "(with --set)" in msg and "engine.knd: unknown key" in msg


def test_missing_file():
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(Path("nope.yaml"))


def test_top_level_not_a_mapping(tmp_path):
    msg = _error(tmp_path, "- a\n- b\n")
    assert "expected a mapping" in msg


def test_no_method_enabled(tmp_path):
    msg = _error(
        tmp_path, "self_reward: {enabled: false}\nrlcd: {enabled: false}\ncai: {enabled: false}\n"
    )
    assert "enable at least one" in msg


def test_parse_overrides_shapes():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true"]) == {"a": {"b": 1, "c": "x"}, "d": True}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["novalue"])


def test_concurrent_runner_needs_remote_engine():
    with pytest.raises(ConfigError, match="runner.workers > 1 and runner.kind ray need engine"):
        load_config(None, ["runner.workers=4"])
    cfg = load_config(None, ["runner.workers=4", "engine.kind=openai"])
    assert cfg.runner.workers == 4


def test_runner_and_server_list_settings():
    remote = ["engine.kind=openai", "engine.base_url=[http://a:8000/v1, http://b:8000/v1]"]
    cfg = load_config(None, [*remote, "runner.kind=ray", "runner.train={num_gpus: 1}"])
    assert cfg.engine.base_urls() == ["http://a:8000/v1", "http://b:8000/v1"]
    assert cfg.runner.address is None  # a Ray instance of the run's own
    assert cfg.runner.generate.remote_options() == {"num_cpus": 1}
    assert cfg.runner.train.remote_options() == {"num_gpus": 1}
    with pytest.raises(ConfigError, match="runner.train: places the training step on a Ray"):
        load_config(None, [*remote, "runner.train={num_gpus: 1}"])
    with pytest.raises(ConfigError, match="runner.address: .*expected auto, host:port"):
        load_config(None, [*remote, "runner.kind=ray", "runner.address=somewhere"])
    with pytest.raises(ConfigError, match="engine.base_url: .*listed twice"):
        load_config(None, ["engine.kind=openai", "engine.base_url=[http://a/v1, http://a/v1]"])


def test_a_cluster_elsewhere_needs_a_prefect_api_it_reaches():
    """Ray nodes on other machines cannot report to a Prefect API on loopback (a run's
    temporary server is one): refused in one line before the first task."""
    from flows.cluster import check_reachable

    remote = ["engine.kind=openai", "engine.base_url=http://a:8000/v1", "runner.kind=ray"]
    cfg = load_config(None, [*remote, "runner.address=10.0.0.5:6379"])
    loopback = "http://127.0.0.1:8123/api"
    with pytest.raises(PrefloopError, match=r"runner.address 10.0.0.5:6379: .*\(10.0.0.7\)"):
        check_reachable(cfg, loopback, ["10.0.0.7"])
    check_reachable(cfg, loopback, [])  # every node on this machine
    check_reachable(cfg, "http://prefect.lan:4200/api", ["10.0.0.7"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"self_reward": {"judge": {"kind": "zz"}}}, "self_reward.judge: unknown kind 'zz'"),
        ({"training": {"steps": ["ppo"]}}, "training.steps.0.kind: unknown kind 'ppo' (known: sft"),
        ({"training": {"steps": ["sft", "ppo"]}}, "training.steps.1.kind: unknown kind 'ppo'"),
        ({"training": {"steps": [{"kind": "dpo", "beta": 0}]}}, "training.steps.0.beta: Input"),
        ({"training": {"steps": [{"beta": 0.2}]}}, "training.steps.0.kind: Field required"),
        ({"training": {"steps": ["dpo", "dpo"]}}, "training.steps: kind 'dpo' appears twice"),
        ({"training": {"steps": ["kto"], "batch_size": 1}}, "training.steps.0: kto needs batch"),
        ({"training": {"steps": [{"kind": "kto", "batch_size": 1}]}}, "training.steps.0: kto"),
        ({"training": {"methods": ["nope"]}}, "training.methods: unknown method 'nope'"),
        ({"self_reward": {"judge": {"samples": 0}}}, "self_reward.judge.samples: Input should"),
    ],
)
def test_registry_names_are_checked_with_their_location(data, message):
    from pipeline.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(data, "c.yaml")
    assert str(err.value).startswith(f"c.yaml: {message}"), str(err.value)


def test_training_steps_inherit_the_shared_settings():
    from pipeline.config import parse_config

    cfg = parse_config(
        {
            "training": {
                "beta": 0.3,
                "learning_rate": 2e-5,
                "sft": {"min_score": 4},
                "steps": ["sft", {"kind": "dpo", "beta": 0.2, "sft": {"best_of_n": True}}],
            }
        }
    )
    sft, dpo = cfg.training.step_list()
    assert (sft.kind, sft.beta, sft.learning_rate) == ("sft", 0.3, 2e-5)
    assert (dpo.kind, dpo.beta, dpo.learning_rate) == ("dpo", 0.2, 2e-5)
    # Nested sections merge key by key: the step's best_of_n beside the shared min_score.
    assert dpo.sft.best_of_n and dpo.sft.min_score == 4 and not sft.sft.best_of_n
    # The default is one DPO step; `steps: []` trains nothing.
    assert [s.kind for s in parse_config({}).training.step_list()] == ["dpo"]
    assert [s.kind for s in parse_config({"training": {"steps": ["rm"]}}).training.step_list()] == [
        "rm"
    ]
    assert parse_config({"training": {"steps": []}}).training.step_list() == []
    # The config round-trips through JSON (as the flow's tasks receive it).
    again = parse_config(cfg.model_dump_json())
    assert [s.model_dump() for s in again.training.step_list()] == [
        s.model_dump() for s in cfg.training.step_list()
    ]


def test_deploy_preflight_refuses_before_registering(tmp_path):
    """prefect.yaml's build step: one line for a missing PREFLOOP_HOME, a folder that is
    not a checkout, and a config with a bad field (file and field named)."""
    from flows.deploy import preflight
    from pipeline.errors import PrefloopError

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(PrefloopError, match="PREFLOOP_HOME is not set"):
        preflight(home=None)
    with pytest.raises(PrefloopError, match="is not a prefloop checkout"):
        preflight(home=str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("self_reward: {n_candidates: 1}\n")
    with pytest.raises(ConfigError, match=rf"{bad}: self_reward.n_candidates"):
        preflight(home=str(root), config=str(bad))


@pytest.mark.parametrize(
    "old, message",
    [
        (
            {"self_reward": {"judge_template": "judge_additive_5pt_prefilled"}},
            "self_reward.judge_template: no longer a setting; use self_reward.judge: "
            "{kind: template, template: NAME}",
        ),
        (
            {"self_reward": {"judge_samples": 2}},
            "self_reward.judge_samples: no longer a setting; use self_reward.judge.samples",
        ),
        (
            {"self_reward": {"judge_sampling": {"max_tokens": 8}}},
            "self_reward.judge_sampling: no longer a setting; use self_reward.judge.sampling",
        ),
        (
            {"self_reward": {"judge_model": "m"}},
            "self_reward.judge_model: no longer a setting; use self_reward.judge.model",
        ),
        (
            {"runner": {"ray_address": "auto"}},
            "runner.ray_address: no longer a setting; use runner.address",
        ),
        (
            {"training": {"kind": "dpo"}},
            "training.kind: no longer a setting; use training.steps: [KIND]",
        ),
    ],
)
def test_an_old_key_names_the_one_to_use(old, message):
    """One way to say each thing: a key of an earlier prefloop is refused in one line that
    names its replacement; it is never read in its old form."""
    from pipeline.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(old, "old.yaml")
    assert str(err.value).startswith(f"old.yaml: {message}"), str(err.value)
