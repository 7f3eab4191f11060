"""Stationary storage (evgrid.envs.storage): its physics on random inputs, the simulator's energy balance and
settlement with it, the operator's observation and action, the TOU rule, the oracle, bad configs, and that a
config without storage runs exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from evgrid.agents import oracle as orc
from evgrid.agents.baselines import BaselinePolicy, rule_overrides
from evgrid.config import ConfigError
from evgrid.envs import fleet as fl
from evgrid.envs import storage as sg
from evgrid.envs.config import load_config
from evgrid.envs.ev_grid import EVGridEnv
from evgrid.envs.market import purchase_price_per_kwh
from evgrid.envs.sim import Sim, SimActions
from evgrid.envs.views import features as ft
from evgrid.grid.profiles import OFFPEAK, PEAK, VALLEY

DT_H = 0.25
UNIT = {"e_kwh": 400.0, "p_max_kw": 200.0, "eta_ch": 0.95, "eta_dis": 0.9, "soc_min": 0.1, "soc_max": 0.9,
        "soc0": 0.5}
# a small day on IEEE 33 with two zones, one unit each; operators learned, the rest on rules
SMALL = {"n_steps": 32, "start_hour": 0.0, "fleet": {"n_ev": 60}, "grid": {"n_zones": 2},
         "stations": {"n_station": 4, "ports": 30, "p_max_kw": 150.0}, "storage": UNIT,
         "agents": {"operator": "learned", "station": "rule", "ev_view": "rule"}}
REFERENCE = Path(__file__).parent / "data" / "no_storage_run.json"


def _cfg(**over):
    return load_config("quickstart", {**SMALL, **over})


def _units(n: int = 1) -> sg.StorageUnits:
    """``n`` units rated as UNIT."""
    return sg.StorageUnits(bus=np.zeros(n, np.int64), zone=np.zeros(n, np.int64),
                           **{k: np.full(n, v) for k, v in UNIT.items()})


# ---------------------------------------------------------------------- physics


@hst.composite
def _units_and_state(draw):
    n_env, n = draw(hst.integers(1, 3)), draw(hst.integers(1, 5))
    reals = lambda lo, hi: hst.lists(hst.floats(lo, hi), min_size=n, max_size=n).map(np.array)  # noqa: E731
    soc_min = draw(reals(0.0, 0.45))
    soc_max = soc_min + draw(reals(0.05, 0.5))
    units = sg.StorageUnits(bus=np.zeros(n, np.int64), zone=np.zeros(n, np.int64), e_kwh=draw(reals(1.0, 1e4)),
                            p_max_kw=draw(reals(0.0, 1e3)), eta_ch=draw(reals(0.5, 1.0)),
                            eta_dis=draw(reals(0.5, 1.0)), soc_min=soc_min, soc_max=soc_max, soc0=soc_min)
    u = np.array(draw(hst.lists(hst.floats(0.0, 1.0), min_size=n_env * n, max_size=n_env * n))).reshape(n_env, n)
    soc = soc_min + u * (soc_max - soc_min)
    req = np.array(draw(hst.lists(hst.floats(-3e3, 3e3), min_size=n_env * n, max_size=n_env * n)))
    return units, soc, req.reshape(n_env, n)


@settings(max_examples=200, deadline=None)
@given(_units_and_state())
def test_a_step_keeps_power_and_soc_within_bounds_and_conserves_energy(case):
    units, soc, req = case
    out = sg.step(units, soc, req, DT_H)
    p_ch, p_dis = sg.limits_kw(units, soc, DT_H)
    # power: within the rating and the SOC window's headroom, and the request wherever that fits
    assert (np.abs(out.p_kw) <= units.p_max_kw + 1e-12).all()
    assert ((out.p_kw <= p_ch) & (out.p_kw >= -p_dis)).all()
    inside = (req <= p_ch) & (req >= -p_dis)
    np.testing.assert_array_equal(out.p_kw[inside], req[inside])
    np.testing.assert_array_equal(out.limited_kw, req - out.p_kw)
    assert (np.sign(out.limited_kw) * np.sign(req) >= 0).all()  # held back toward 0, never pushed past it
    # SOC stays in its window (to rounding)
    assert (out.soc >= units.soc_min - 1e-12).all() and (out.soc <= units.soc_max + 1e-12).all()
    # energy: grid energy x efficiency = energy into the cells = the SOC's change x capacity
    grid_kwh = out.p_kw * DT_H
    cells = np.where(grid_kwh >= 0, grid_kwh * units.eta_ch, grid_kwh / units.eta_dis)
    np.testing.assert_allclose(out.e_batt_kwh, cells, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose((out.soc - soc) * units.e_kwh, out.e_batt_kwh, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(out.e_batt_kwh, fl.battery_kwh(out.p_kw, units.eta_ch, units.eta_dis, DT_H))


def test_a_full_unit_takes_nothing_and_an_empty_one_gives_nothing():
    soc = np.array([[0.9], [0.1]])
    out = sg.step(_units(), soc, np.array([[50.0], [-50.0]]), DT_H)
    np.testing.assert_array_equal(out.p_kw, [[0.0], [0.0]])
    np.testing.assert_array_equal(out.limited_kw, [[50.0], [-50.0]])
    np.testing.assert_array_equal(out.soc, soc)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_set_point_is_an_error(bad):
    units, soc = _units(2), np.full((1, 2), 0.5)
    with pytest.raises(ValueError, match="storage set-point: expected finite kW"):
        sg.step(units, soc, np.array([[bad, 0.0]]), DT_H)
    with pytest.raises(ValueError, match=r"shape \(1, 2\)"):
        sg.step(units, soc, np.zeros((1, 3)), DT_H)


# ---------------------------------------------------------------------- config and placement


@pytest.mark.parametrize("bad,match", [
    ({"e_kwh": 0.0}, r"storage\.e_kwh: expected a finite number in \(0.0"),
    ({"p_max_kw": -1.0}, r"storage\.p_max_kw: .*\[0.0, 100000.0\]"),
    ({"eta_ch": 1.2}, r"storage\.eta_ch: .*\[0.5, 1.0\]"),
    ({"eta_dis": "high"}, r"storage\.eta_dis"),
    ({"soc_min": 0.6, "soc_max": 0.5, "soc0": 0.55}, r"storage\.soc_max: expected a state of charge above soc_min"),
    ({"soc0": 0.95}, r"storage\.soc0: .*\[0.1, 0.9\]"),
    ({"levels": [0.5, 2.0]}, r"storage\.levels"),
    ({"buses": []}, r"storage\.buses: expected one or more"),
    ({"buses": [99]}, r"storage\.buses: 99 is not a bus of feeder 'ieee33'.*1-33"),
    ({"colour": "red"}, r"storage\.colour: unknown key"),
])
def test_bad_storage_config_names_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config("quickstart", {"storage": {**UNIT, **bad}})


def test_bad_storage_rule_names_the_field():
    with pytest.raises(ConfigError, match=r"agents\.storage_rule: expected one of 'idle', 'tou'"):
        load_config("quickstart", {"agents": {"storage_rule": "arbitrage"}})


def test_one_unit_per_zone_at_its_most_loaded_bus_or_one_per_listed_bus():
    lay = Sim(_cfg()).layout
    units = lay.storage
    np.testing.assert_array_equal(units.zone, np.arange(lay.n_zone))
    np.testing.assert_array_equal(lay.zone_of_bus[units.bus], units.zone)
    for z, b in enumerate(units.bus):
        assert lay.base_p_kw[b] == lay.base_p_kw[lay.zone_of_bus == z].max()
    listed = Sim(_cfg(storage={**UNIT, "buses": [18, 33, 18]})).layout
    feeder = listed.feeders[0]
    np.testing.assert_array_equal(listed.storage.bus, [feeder.position_of(b) for b in (18, 33, 18)])
    assert listed.storage.n == 3 and (listed.storage.e_kwh == 400.0).all()


def test_seed000_has_one_unit_per_zone():
    sim = Sim(load_config("seed000"))
    assert sim.layout.storage.n == sim.layout.n_zone == 4


# ---------------------------------------------------------------------- simulator


def test_sim_with_storage_conserves_energy_and_settles_it_at_the_zone_purchase_price():
    """Random set-points, many beyond the bounds: the SOC moves by the cells' energy, the tie line carries zone
    loads plus losses, and the operator's purchase differs from an idle-storage twin by the storage's energy at
    the zone's purchase price."""
    cfg = _cfg(n_steps=48, grid={"n_zones": 2, "base_load_scale": 0.4})
    sim, twin = Sim(cfg, n_env=2), Sim(cfg, n_env=2)
    sim.reset(3)
    twin.reset(3)
    units, rng = sim.layout.storage, np.random.default_rng(3)
    limited = 0.0
    while sim.t < sim.n_steps:
        soc = sim.fleet.storage_soc.copy()
        set_kw = rng.uniform(-1.5, 1.5, (2, units.n)) * units.p_max_kw
        rec = sim.step(SimActions(storage_kw=set_kw))
        ref = twin.step(SimActions(storage_kw=np.zeros((2, units.n))))
        np.testing.assert_array_equal(sim.fleet.storage_soc, rec.storage_soc)
        np.testing.assert_allclose((rec.storage_soc - soc) * units.e_kwh, rec.storage_e_kwh, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(rec.storage_p_kw + rec.storage_limited_kw, set_kw, rtol=1e-15, atol=1e-12)
        limited += np.abs(rec.storage_limited_kw).sum()
        assert (rec.storage_soc >= 0.1 - 1e-12).all() and (rec.storage_soc <= 0.9 + 1e-12).all()
        ok = rec.converged
        np.testing.assert_allclose(rec.feeder_load_kw[ok].sum(axis=1),
                                   rec.zone_load_kw[ok].sum(axis=1) + rec.loss_kw[ok], rtol=1e-6, atol=1e-3)
        # no limit enforcement acts on this light day: the zone loads differ by exactly the storage's power
        assert not rec.curtail_kw.any() and not ref.curtail_kw.any() and not rec.v2g_add_kw.any()
        store_zone = units.by_zone(rec.storage_p_kw, sim.layout.n_zone)
        np.testing.assert_allclose(rec.zone_load_kw - ref.zone_load_kw, store_zone, atol=1e-9)
        price = purchase_price_per_kwh(rec.period, cfg.market)
        np.testing.assert_allclose(rec.zone_cost.purchase_cost - ref.zone_cost.purchase_cost,
                                   price * store_zone * sim.dt_h, atol=1e-9)
    assert limited > 0  # the test asked beyond the bounds


def test_storage_resets_to_soc0():
    sim = Sim(_cfg())
    sim.reset(0)
    sim.step(SimActions(storage_kw=np.full((1, 2), 200.0)))
    assert (sim.fleet.storage_soc > 0.5).all()
    sim.reset(1)
    np.testing.assert_array_equal(sim.fleet.storage_soc, [[0.5, 0.5]])


def test_idle_storage_changes_nothing_and_a_config_without_storage_runs_as_before():
    """An idle unit adds exactly 0 kW to its bus: the day is the one without storage, bit for bit.  And the
    config without storage reproduces the run stored before storage existed (``_reference_run``)."""
    base = load_config("seed000", {"n_steps": 24, "fleet": {"n_ev": 80}})
    runs = []
    for storage in (None, {}):
        sim = Sim(load_config(base, {"storage": storage}))
        sim.reset(5)
        runs.append([sim.step() for _ in range(sim.n_steps)])
    assert runs[1][0].storage_p_kw.shape == (1, 4)
    for a, b in zip(*runs):
        for name in ("feeder_load_kw", "vm_pu", "zone_load_kw", "p_ev_kw", "loss_kw"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        np.testing.assert_array_equal(a.zone_cost.total, b.zone_cost.total)
    # the run stored from the code before storage (same machine: compared to rounding, not bit for bit, so a
    # platform's last-bit differences in the power flow do not fail it)
    ref, got = json.loads(REFERENCE.read_text()), _reference_run()
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, atol=1e-9, err_msg=key)


def _reference_run() -> dict:
    """What ``tests/data/no_storage_run.json`` stores: seed 000 without storage, two environments, random price,
    station and EV actions (regenerate with ``json.dump(_reference_run(), ...)`` only on purpose)."""
    # the shield came after the reference: random EV actions as they were then
    cfg = load_config("seed000", {"storage": None, "n_steps": 48, "start_hour": 12.0, "fleet": {"n_ev": 120},
                                  "agents": {"ev_shield": "none"}})
    sim = Sim(cfg, n_env=2)
    sim.reset(7)
    rng = np.random.default_rng(7)
    n, nz, nst = sim.day.sessions.n, sim.layout.n_zone, sim.layout.n_station
    out: dict = {"feeder_load_kw": [], "operator_cost": [], "vm_sum": []}
    while sim.t < sim.n_steps:
        act = SimActions(price_multiplier=rng.uniform(0.5, 1.5, (2, nz)), station_fraction=rng.uniform(0, 1, 2 * nst),
                         ev_mode=rng.integers(0, 3, n), ev_power=rng.uniform(0, 1, n))
        rec = sim.step(act)
        out["feeder_load_kw"].append(rec.feeder_load_kw.sum(axis=1).tolist())
        out["operator_cost"].append(rec.zone_cost.total.sum(axis=1).tolist())
        out["vm_sum"].append(np.nansum(rec.vm_pu, axis=1).tolist())
    out["soc_sum"] = float(sim.fleet.soc.sum())
    return out


# ---------------------------------------------------------------------- operators: observation, action, rules


def test_operator_sees_its_zones_storage_and_its_set_point_reaches_the_injections():
    env = EVGridEnv(_cfg())
    n_op = len(ft.OPERATOR)
    assert env.observation_space("operator_0").shape == (n_op + len(ft.OPERATOR_STORAGE),)
    space = env.action_space("operator_0")
    assert space.shape == (2,) and space.low[1] == -1.0 and space.high[1] == 1.0
    obs, _ = env.reset(seed=2)
    col = {name: n_op + i for i, name in enumerate(ft.OPERATOR_STORAGE.names)}
    assert obs["operator_0"][col["storage_soc"]] == pytest.approx(0.5)
    assert obs["operator_0"][col["storage_charge_av"]] == pytest.approx(1.0)  # 200 kW fits the window
    shares = {"operator_0": 0.5, "operator_1": -0.25}
    obs, *_ = env.step({a: np.array([1.0, s], np.float32) for a, s in shares.items()})
    rec = env.last_rec
    np.testing.assert_allclose(rec.storage_p_kw, [[100.0, -50.0]])
    np.testing.assert_array_equal(rec.storage_limited_kw, 0.0)
    soc = 0.5 + np.array([100.0 * 0.95, -50.0 / 0.9]) * DT_H / 400.0
    np.testing.assert_allclose(rec.storage_soc, [soc])
    np.testing.assert_allclose([obs[f"operator_{z}"][col["storage_soc"]] for z in (0, 1)], soc, rtol=1e-6)
    # the injection at the units' buses carries the set-point: the tie line draws it (plus its losses)
    twin = EVGridEnv(_cfg())
    twin.reset(seed=2)
    twin.step({a: np.array([1.0, 0.0], np.float32) for a in shares})
    extra = rec.feeder_load_kw.sum() - twin.last_rec.feeder_load_kw.sum()
    assert extra == pytest.approx(50.0, rel=0.05)


def test_out_of_range_storage_shares_and_level_pairs_name_the_agent():
    env = EVGridEnv(_cfg())
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions\['operator_1'\]: storage share: expected finite values in \[-1, 1"):
        env.step({"operator_0": np.array([1.0, 0.0], np.float32), "operator_1": np.array([1.0, 1.5], np.float32)})
    with pytest.raises(ValueError, match=r"actions\['operator_0'\]: expected \(price multiplier, storage share\)"):
        env.step({"operator_0": np.array([1.0], np.float32), "operator_1": np.array([1.0, 0.0], np.float32)})
    lv = EVGridEnv(_cfg(agents={**SMALL["agents"], "operator_action": "level"}))
    n_price = len(lv.cfg.market.price_levels)
    assert lv.action_space("operator_0").nvec.tolist() == [n_price, 5]
    lv.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions\['operator_0'\]: expected \(price level, storage level\)"):
        lv.step({"operator_0": np.int64(0), "operator_1": np.array([0, 4])})
    lv.step({"operator_0": np.array([0, 0]), "operator_1": np.array([0, 4])})  # levels -1 and +1 of p_max
    np.testing.assert_allclose(lv.last_rec.storage_p_kw, [[-200.0, 200.0]])


def test_without_storage_the_operator_spaces_are_unchanged():
    env = EVGridEnv(_cfg(storage=None))
    assert env.observation_space("operator_0").shape == (len(ft.OPERATOR),)
    assert env.action_space("operator_0").shape == (1,)
    lv = EVGridEnv(_cfg(storage=None, agents={**SMALL["agents"], "operator_action": "level"}))
    assert lv.action_space("operator_0").shape == ()


def test_tou_rule_charges_in_the_valley_and_discharges_in_the_peak():
    cfg = load_config(_cfg(n_steps=96), rule_overrides("tou", routed=False))
    assert cfg.agents.storage_rule == "tou"
    assert load_config(_cfg(), rule_overrides("uncontrolled", routed=False)).agents.storage_rule == "idle"
    sim = Sim(cfg)
    sim.reset(0)
    charged = discharged = 0.0
    while sim.t < sim.n_steps:
        soc = sim.fleet.storage_soc.copy()
        p_ch, p_dis = sg.limits_kw(sim.layout.storage, soc, sim.dt_h)
        rec = sim.step()
        want = {VALLEY: p_ch, PEAK: -p_dis, OFFPEAK: np.zeros_like(soc)}[rec.period]
        np.testing.assert_array_equal(rec.storage_p_kw, want)  # as fast as the bounds allow, never beyond
        np.testing.assert_array_equal(rec.storage_limited_kw, 0.0)
        charged += (rec.storage_p_kw > 0).sum() * (rec.period == VALLEY)
        discharged += (rec.storage_p_kw < 0).sum() * (rec.period == PEAK)
    assert charged > 0 and discharged > 0


def test_baseline_policies_set_the_storage_from_the_period():
    env = EVGridEnv(_cfg())
    obs, _ = env.reset(seed=0)
    o = obs["operator_0"].copy()
    valley, peak = ft.OPERATOR.index("valley"), ft.OPERATOR.index("peak")
    o[[valley, peak]] = [1.0, 0.0]
    tou, unc = BaselinePolicy("tou", env), BaselinePolicy("uncontrolled", env)
    np.testing.assert_array_equal(tou._operator(o), [1.0, 1.0])
    np.testing.assert_array_equal(unc._operator(o), [1.0, 0.0])
    o[[valley, peak]] = [0.0, 1.0]
    np.testing.assert_array_equal(tou._operator(o), [1.0, -1.0])
    assert env.action_space("operator_0").contains(tou._operator(o))


# ---------------------------------------------------------------------- oracle


def test_oracle_with_storage_is_no_dearer_and_its_replay_follows_the_plan():
    with_storage = _cfg(n_steps=96, agents={"operator": "rule", "station": "rule", "ev_view": "rule"})
    without = load_config(with_storage, {"storage": None})
    (row, plan), (row0, plan0) = next(orc.oracle_episodes(with_storage, [3])), next(orc.oracle_episodes(without, [3]))
    assert plan.storage_kw.shape == (2, 96) and plan0.storage_kw.shape == (0, 96)
    assert np.abs(plan.storage_kw).max() > 10.0  # the storage is used
    assert plan.objective <= plan0.objective + 1e-6
    assert row["operator_cost"] <= row0["operator_cost"] + 1e-6
    assert row["operator_cost"] == pytest.approx(plan.objective, rel=2e-3)
    # the replay sets each unit to its planned power, which fits the unit's bounds, and ends no emptier
    sim = Sim(orc.oracle_config(with_storage))
    sim.reset(3)
    while sim.t < sim.n_steps:
        planned = plan.storage_kw[:, sim.t]
        rec = sim.step(orc.actions(plan, sim))
        np.testing.assert_allclose(rec.storage_p_kw[0], planned, atol=1e-6)
        assert np.abs(rec.storage_limited_kw).max() < 1e-6
    assert (sim.fleet.storage_soc >= 0.5 - 1e-6).all()


# ---------------------------------------------------------------------- RLlib


def test_rllib_adapter_and_ppo_modules_take_the_storage_set_point():
    """The operators' (multiplier, share) Box passes RLlib's checks, PPO's modules get it, and the clipping of
    a Gaussian sample keeps the share in [-1, 1]; DQN, which needs one discrete action, is refused."""
    from ray.rllib.utils.pre_checks.env import check_multiagent_environments

    from evgrid.agents.rllib.algos import TrainConfig, algo_config, check_run
    from evgrid.agents.rllib.env import RLlibEVGrid, clip_action

    env = RLlibEVGrid({"config": _cfg(n_steps=8)})
    check_multiagent_environments(env)
    env.reset(seed=0)
    space = env.action_spaces["operator_0"]
    _, rew, *_ = env.step({a: clip_action(np.array([1.0, 3.0]), space) for a in env.agents})
    assert np.isfinite(list(rew.values())).all()
    np.testing.assert_allclose(env.env.last_rec.storage_p_kw, [[200.0, 200.0]])
    specs = algo_config(_cfg(), TrainConfig()).rl_module_spec.rl_module_specs
    assert specs["operator"].action_space.shape == (2,)
    assert specs["operator"].observation_space.shape == (len(ft.operator_features(True)),)
    level = _cfg(agents={**SMALL["agents"], "operator_action": "level"})
    with pytest.raises(ConfigError, match="with storage an operator picks a"):
        check_run(level, TrainConfig(algorithm="DQN"))
    check_run(load_config(level, {"storage": None}), TrainConfig(algorithm="DQN"))
