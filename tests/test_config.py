"""Configuration: every YAML in experiments/ loads; unknown keys and bad values name their path."""

from __future__ import annotations

from pathlib import Path

import pytest

from evgrid.config import ConfigError, from_dict, parse_overrides, to_dict
from evgrid.envs.config import EnvConfig, load_config

EXPERIMENTS = sorted((Path(__file__).parent.parent / "evgrid" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_yaml_validates_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, EnvConfig)
    assert from_dict(EnvConfig, to_dict(cfg)) == cfg


def test_overrides_parse_and_win():
    cfg = load_config(EXPERIMENTS[0], ["fleet.n_ev=123", "agents.ev_view=individual", "grid.v_min_pu=0.94"])
    assert cfg.fleet.n_ev == 123 and cfg.agents.ev_view == "individual" and cfg.grid.v_min_pu == 0.94
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize("over,path", [
    (["fleet.n_ev=0"], "fleet.n_ev"),
    (["grid.feeder=ieee34"], "grid.feeder"),
    (["market.price_multiplier_min=-1"], "market.price_multiplier_min"),
    (["routing.policy=teleport"], "routing.policy"),
    (["fleet.sessions=3"], "fleet.sessions"),
    (["dt_min=7"], "dt_min"),
    (["stations.buses=[1, 2]"], "stations.buses"),
    (["reward.ev_cost=-1"], "reward.ev_cost"),
])
def test_bad_values_fail_with_their_dotted_path(over, path):
    with pytest.raises(ConfigError) as info:
        load_config(None, over)
    assert str(info.value).startswith(path), str(info.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["fleet.n_ev"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("experiments/nope.yaml")


def test_cluster_examples_parse_and_point_at_real_configs():
    import yaml

    root = Path(__file__).parent.parent
    up = yaml.safe_load((root / "experiments/cluster/ray-up.yaml").read_text())
    job = yaml.safe_load((root / "experiments/cluster/rayjob.yaml").read_text())
    assert up["cluster_name"] == "evgrid" and any("ray start --head" in c for c in up["head_start_ray_commands"])
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"].startswith("2.60")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["evgrid", "train"] and (root / entry[2]).is_file() and "--address" in entry
