"""Configuration: every shipped experiment YAML (evgrid/experiments/) loads, from any directory and from a built
wheel; unknown keys and bad values name their path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evgrid.config import ConfigError, experiment_path, from_dict, parse_overrides, read_yaml, to_dict
from evgrid.envs.config import EnvConfig, load_config

EXPERIMENTS_DIR = Path(__file__).parent.parent / "evgrid" / "experiments"
EXPERIMENTS = sorted(EXPERIMENTS_DIR.glob("*.yaml"))


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
    with pytest.raises(ConfigError, match="fleet.n_ev=\\[.*not a YAML"):
        parse_overrides(["fleet.n_ev=["])
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
    assert entry[:2] == ["evgrid", "train"] and experiment_path(entry[2]).is_file() and "--address" in entry


@pytest.mark.parametrize("name", ["quickstart", "quickstart.yaml", "experiments/quickstart.yaml"])
def test_shipped_experiments_resolve_from_any_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert read_yaml(name) == read_yaml(EXPERIMENTS_DIR / "quickstart.yaml")
    (tmp_path / "quickstart.yaml").write_text("seed: 7\n")  # a file of that name wins
    assert load_config("quickstart.yaml").seed == 7


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built (pip wheel) from a copy of the sources, so the checkout gets no build directories."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(root / "evgrid", src / "evgrid", ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "wheel", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True,
                   timeout=300)
    return next((tmp / "dist").glob("evgrid-*.whl"))


def test_a_built_wheel_ships_the_experiments(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"evgrid/experiments/{p.name}" for p in EXPERIMENTS} | {"evgrid/py.typed"} <= names


@pytest.mark.slow
def test_an_installed_wheel_runs_a_shipped_experiment_from_elsewhere(wheel, tmp_path):
    """Installed into a bare directory, `evgrid evaluate quickstart` works from an unrelated directory."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "install", "--no-deps",
                    "--target", str(tmp_path / "site"), str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "import evgrid.cli, sys; print(evgrid.cli.__file__); "
                           "sys.exit(evgrid.cli.main(sys.argv[1:]))", "evaluate", "quickstart", "n_steps=4",
                           "fleet.n_ev=20", "--policy", "uncontrolled", "--episodes", "1", "--out", "out"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(str(tmp_path / "site")) and (elsewhere / "out" / "metrics.parquet").is_file()
