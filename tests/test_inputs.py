"""Bad input, fuzzed: actions outside their spaces and malformed configs get an error naming the agent or the
dotted field and what is expected, and a refused step leaves the environment where it was."""

from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

import evgrid
from evgrid.agents.baselines import BaselinePolicy
from evgrid.config import ConfigError, keyword_overrides
from evgrid.envs.config import EnvConfig, load_config

SMALL = {"n_steps": 12, "start_hour": 17.0, "fleet": {"n_ev": 60}, "stations": {"ports": 30}}

# values that lie outside each kind of space (gymnasium's contains says no)
NOT_A_BOX1 = [{}, "abc", 1.0, np.ones((1, 1), np.float32), "1.0", np.array([np.nan], np.float32),
              np.array([9.0], np.float32), None, True, np.ones(2, np.float32), ["1.0"]]
NOT_DISCRETE = [1.5, np.array([1]), True, -1, 99, "a", None, {}, np.float64(1.0), [0]]


def _not_an_ev_action(slots: int | None) -> list:
    n = 1 if slots is None else slots
    ok_mode = np.int64(0) if slots is None else np.zeros(n, np.int64)
    ok_power = np.ones(n, np.float32)
    return [
        {"mode": ok_mode, "power": ok_power, "extra": 1},
        {"mode": ok_mode},
        {"mode": ok_mode + 3, "power": ok_power},
        {"mode": np.asarray(ok_mode, float), "power": ok_power},
        {"mode": ok_mode, "power": ok_power * 1.5},
        {"mode": ok_mode, "power": np.full((1, n), 0.5, np.float32)},
        {"mode": ok_mode, "power": np.full(n, np.nan, np.float32)},
        [ok_mode, ok_power],
        "x",
        None,
    ]


_ENVS: dict = {}


def _env(view: str, operator_action: str):
    key = (view, operator_action)
    if key not in _ENVS:
        _ENVS[key] = evgrid.make("EVGrid-v0", "quickstart", ev_view=view,
                                 agents={"operator_action": operator_action}, **SMALL)
    return _ENVS[key]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(view=hst.sampled_from(["grouped", "individual"]), level=hst.booleans(), data=hst.data())
def test_actions_outside_their_space_are_refused_naming_the_agent(view, level, data):
    env = _env(view, "level" if level else "multiplier")
    obs, _ = env.reset(seed=data.draw(hst.integers(0, 3)))
    policy = BaselinePolicy("random", env, seed=0)
    for _ in range(data.draw(hst.integers(0, 6))):  # somewhere into the evening, EVs plugged
        obs, *_ = env.step(policy.act(obs))
    acts = policy.act(obs)
    agent = data.draw(hst.sampled_from(sorted(env.agents)))
    kind = agent.split("_")[0]
    if kind == "operator":
        bad_values = NOT_DISCRETE if level else NOT_A_BOX1
    elif kind == "station":
        bad_values = NOT_DISCRETE
    else:
        bad_values = _not_an_ev_action(None if kind == "ev" else env.vec.n_slots)
    bad = data.draw(hst.sampled_from(range(len(bad_values))))
    t, soc = env.sim.t, env.sim.fleet.soc.copy()
    with pytest.raises(ValueError, match=rf"'{agent}'.*expected") as err:
        env.step({**acts, agent: bad_values[bad]})
    assert len(str(err.value)) < 400
    assert env.sim.t == t and np.array_equal(env.sim.fleet.soc, soc), "a refused step moved the simulator"
    env.step(acts)  # still usable


def test_whole_action_batches_of_the_wrong_kind_are_refused_briefly():
    env = _env("grouped", "multiplier")
    env.reset(seed=0)
    for bad in (list(range(1000)), "abc", None):
        with pytest.raises(ValueError, match=r"^actions: expected a dict") as err:
            env.step(bad)
        assert len(str(err.value)) < 200
    with pytest.raises(ValueError, match=r"^actions: 12345 is not a live agent"):
        env.step({12345: 0})


# ---------------------------------------------------------------------- configs

def _fields(cls) -> list[tuple[str, typing.Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


SECTIONS = [name for name, tp in _fields(EnvConfig) if dataclasses.is_dataclass(typing.get_args(tp)[0]
                                                                                 if typing.get_args(tp) else tp)]
FUZZ_VALUES = [5, -1, 0, "abc", [1, 2], {"a": 1}, None, 1e9, True, math.nan, [], 2.5, "1.0"]


def _section_class(name: str):
    tp = typing.get_type_hints(EnvConfig)[name]
    return next(a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a))


@settings(max_examples=300, deadline=None)
@given(data=hst.data())
def test_any_bad_config_value_is_a_config_error_naming_its_field(data):
    section = data.draw(hst.sampled_from(SECTIONS + ["name", "seed", "dt_min", "n_steps", "log_dir", "start_hour"]))
    value = data.draw(hst.sampled_from(FUZZ_VALUES))
    if section in SECTIONS:
        field = data.draw(hst.sampled_from([n for n, _ in _fields(_section_class(section))]))
        override, path = {section: {field: value}}, f"{section}.{field}"
        if data.draw(hst.booleans()):  # a whole section as a scalar
            override, path = {section: value}, section
    else:
        override, path = {section: value}, section
    try:
        load_config("quickstart", override)
    except ConfigError as e:
        # the message names the dotted field (or a section whose fields another one constrains)
        assert str(e).startswith((path, section)), f"{override} -> {e}"
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{override}: {type(e).__name__} instead of a ConfigError: {e}")


@pytest.mark.parametrize("override,field", [
    ({"grid": 5}, "grid"), ({"agents": "rule"}, "agents"), ({"fleet": {"cap_kwh": 60}}, "fleet.cap_kwh"),
    ({"stations": {"fraction_levels": 5}}, "stations.fraction_levels"), ({"log_dir": 5}, "log_dir"),
    ({"name": [1, 2]}, "name"), ({"grid": {"n_zones": 40}}, "grid.n_zones"),
])
def test_the_audited_config_cases_name_their_field(override, field):
    with pytest.raises(ConfigError, match=rf"^{field}: expected"):
        load_config("quickstart", override)


def test_a_yaml_syntax_error_is_a_config_error_with_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ngrid:\n  feeder: [ieee33\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.yaml' is not valid YAML at line \d"):
        load_config(path)


def test_keyword_overrides_merge_field_by_field_in_any_order():
    env = evgrid.make("EVGrid-v0", None, ev_view="rule", agents={"station": "learned"}, **SMALL)
    assert env.cfg.agents.ev_view == "rule" and env.cfg.agents.station == "learned"
    cfg = load_config(None, keyword_overrides({"fleet__v2g_share": 0.1, "fleet": {"n_ev": 50}}))
    assert cfg.fleet.v2g_share == 0.1 and cfg.fleet.n_ev == 50
    cfg = load_config(None, keyword_overrides({"fleet": {"n_ev": 50}, "fleet__v2g_share": 0.1}))
    assert cfg.fleet.v2g_share == 0.1 and cfg.fleet.n_ev == 50
    with pytest.raises(ConfigError, match=r"^agents\.ev_view: given twice"):
        keyword_overrides({"ev_view": "rule", "agents": {"ev_view": "grouped"}})
