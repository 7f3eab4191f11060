"""The oracle: perfect-foresight plans replayed through the simulator (evgrid.agents.oracle)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from evgrid.agents import oracle as orc
from evgrid.agents.baselines import rule_overrides
from evgrid.config import ConfigError
from evgrid.envs import routing as rt
from evgrid.envs.config import load_config
from evgrid.envs.market import CarbonConfig, stepped_carbon_cost
from evgrid.envs.sim import Sim
from evgrid.evaluate import evaluate_baselines, rule_episodes

# a small day on IEEE 33: two zones, four stations, 80 EVs (half with V2G)
SMALL = {"fleet": {"n_ev": 80}, "stations": {"n_station": 4, "ports": 40, "p_max_kw": 150.0},
         "grid": {"n_zones": 2}}


def _cfg(name: str = "quickstart", **over):
    return load_config(name, _merge(SMALL, over))


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def _plan(cfg, seed: int = 0):
    sim = Sim(orc.oracle_config(cfg), 1)
    sim.reset(seed)
    life = orc._first_pass(sim, seed)
    return sim, life, orc.plan_episode(sim, life)


def test_replay_settles_at_the_planned_cost_and_beats_every_rule():
    """The plan's objective prices zone purchases and the stepped carbon cost as the market settles them, so the
    replay's operator cost equals it; and no rule baseline runs the same day cheaper or with less unmet energy."""
    cfg = _cfg()
    row, plan = next(orc.oracle_episodes(cfg, [3]))
    assert row["operator_cost"] == pytest.approx(plan.objective, rel=2e-3)
    assert row["voltage_violations"] == 0 and row["curtailed_kwh"] == pytest.approx(0.0, abs=1e-6)
    for policy in ("uncontrolled", "tou", "llf"):
        rule = next(rule_episodes(load_config(cfg, rule_overrides(policy, routed=False)), [3]))
        assert row["operator_cost"] <= rule["operator_cost"] + 1e-6, policy
        assert row["unmet_kwh"] <= rule["unmet_kwh"] + 1e-6, policy


def test_the_lazy_method_plans_the_same_day_at_the_same_cost():
    """``oracle.method: lazy`` adds the network's rows as the plan breaks them: the same optimum as the direct
    model (two zones' purchases, the stepped carbon cost, the unmet energy's price)."""
    direct = _plan(_cfg())[2]
    lazy = _plan(_cfg(oracle={"method": "lazy"}))[2]
    assert lazy.objective == pytest.approx(direct.objective, rel=1e-6)
    assert all(r.solver == "HIGHS" for r in lazy.results)


def test_peak_valley_objective_flattens_the_load_below_every_rule():
    cfg = _cfg(oracle={"objective": "peak_valley"})
    row, _ = next(orc.oracle_episodes(cfg, [1]))
    for policy in ("uncontrolled", "tou"):
        rule = next(rule_episodes(load_config(cfg, rule_overrides(policy, routed=False)), [1]))
        assert row["peak_valley_kw"] <= rule["peak_valley_kw"] + 1e-6, policy


def test_the_replay_keeps_every_session_and_station_within_its_bounds(tmp_path):
    cfg = _cfg(fleet={"v2g_share": 0.5})
    sim, life, plan = _plan(cfg, seed=2)
    s = sim.day.sessions
    sim.reset(2)
    station_kw = np.zeros((sim.n_steps, sim.layout.n_station))
    while sim.t < sim.n_steps:
        rec = sim.step(orc.actions(plan, sim))
        i = rec.plugged
        assert np.all(rec.p_ev_kw <= s.p_ch_max_kw[i] + 1e-6)
        assert np.all(-rec.p_ev_kw <= np.where(s.v2g[i], s.p_dis_max_kw[i], 0.0) + 1e-6)
        np.add.at(station_kw[rec.t], rec.ev_station, np.maximum(rec.p_ev_kw, 0.0))
        assert rec.cut_ev_kw.sum() == pytest.approx(0.0, abs=1e-6)  # enforcement never had to step in
    assert station_kw.max() <= cfg.stations.p_max_kw + 1e-6
    # sessions.parquet of the replay: SOC inside [v2g floor or 0, 1]; each EV got what the plan promised
    next(orc.oracle_episodes(cfg, [2], log_dir=tmp_path))
    t = pq.read_table(tmp_path / "sessions.parquet").to_pandas()
    plugged = t[t.plug_step >= 0]
    assert (plugged.soc_final <= 1 + 1e-9).all() and (plugged.soc_final >= -1e-9).all()
    v2g = plugged[plugged.v2g & (plugged.e_v2g_kwh > 0)]
    assert (v2g.soc_final >= np.minimum(cfg.fleet.v2g_soc_min, v2g.soc_arrive) - 1e-6).all()
    # an EV short of its target when it left could not have got more in the time it was plugged in
    gone = plugged[(plugged.status == "departed") & (plugged.unmet_kwh > 1e-6)]
    i = gone.session.to_numpy()
    reach = (gone.soc_arrive * gone.cap_kwh + s.eta_ch[i] * s.p_ch_max_kw[i] * sim.dt_h
             * (gone.depart_step - gone.plug_step))
    assert (gone.soc_final * gone.cap_kwh >= reach - 1e-6).all()


def test_uninterruptible_sessions_charge_in_one_block_from_their_chosen_start():
    cfg = load_config("seed001", {"fleet": {"n_ev": 90, "station_counts": [30, 30, 30]}})
    sim, life, plan = _plan(cfg)
    for i in np.flatnonzero(plan.start_step >= 0):
        on = np.flatnonzero(plan.p_kw[i] > 1e-9)
        assert on[0] == plan.start_step[i] and np.all(np.diff(on) == 1)
        assert life.plug_step[i] <= on[0] and on[-1] < max(life.dep_step[i], on[0] + 1) + 1
        assert np.all(plan.p_kw[i, on[:-1]] == pytest.approx(sim.day.sessions.p_ch_max_kw[i]))
    row, _ = next(orc.oracle_episodes(cfg, [0]))
    uncontrolled = next(rule_episodes(load_config(cfg, rule_overrides("uncontrolled", routed=False)), [0]))
    assert row["operator_cost"] < uncontrolled["operator_cost"]


def test_load_dependent_routing_keeps_the_plans_stations():
    cfg = load_config("seed002", {"fleet": {"n_ev": 120}, "grid": {"city_networks": 2},
                                  "stations": {"n_station": 2}})
    sim, life, plan = _plan(cfg)
    sim.reset(0, stations=np.where(plan.planned, life.station, -1))
    while sim.t < sim.n_steps:
        sim.step(orc.actions(plan, sim))
    came = orc.Lifecycle.of(sim)
    assert not came.differs(life).any()


@pytest.mark.parametrize("day", [0, 1])
def test_spatial_balance_spreads_the_networks_less_than_greedy_with_no_ev_past_its_target(day):
    """Seed 002's oracle: greedy's LBMS day planned again for the least mean std of the networks' loads."""
    cfg = load_config("seed002", {"fleet": {"n_ev": 150}, "oracle": {"objective": "spatial_balance"}})
    sim, life, plan = _plan(cfg, day)
    s = sim.day.sessions
    stored = s.eta_ch * plan.p_kw.sum(axis=1) * sim.dt_h
    wanted = np.maximum(s.soc_target - life.soc_arrive, 0.0) * s.cap_kwh
    assert np.all(stored <= wanted + 1e-4)
    row, _ = next(orc.oracle_episodes(cfg, [day]))
    greedy = next(rule_episodes(load_config(cfg, {"agents": {"station": "rule"}}), [day]))
    assert row["spatial_std_kw"] < greedy["spatial_std_kw"]
    assert row["unmet_kwh"] <= greedy["unmet_kwh"] + 1e-3
    assert row["voltage_violations"] == 0 and row["curtailed_kwh"] == pytest.approx(0.0, abs=1e-6)


def test_spatial_balance_needs_several_networks():
    with pytest.raises(ValueError, match="oracle.objective: spatial_balance .* 1 feeder"):
        _plan(_cfg(oracle={"objective": "spatial_balance"}))


def test_evaluate_runs_the_oracle_beside_the_rules(tmp_path):
    rows = evaluate_baselines(_cfg(), ["oracle", "uncontrolled"], 1, out_dir=tmp_path, progress=False)
    assert [r["policy"] for r in rows] == ["oracle", "uncontrolled"]
    assert (tmp_path / "metrics.parquet").exists()
    assert rows[0]["operator_cost"] < rows[1]["operator_cost"]
    price = _cfg().reward.ev_unmet_per_kwh
    for r in rows:  # what the oracle's plan minimises, charged to every policy alike
        assert r["cost_with_unmet"] == pytest.approx(r["operator_cost"] + price * r["unmet_kwh"])
    assert rows[0]["cost_with_unmet"] < rows[1]["cost_with_unmet"]
    with pytest.raises(ConfigError, match="policy: expected one or more of .*oracle"):
        evaluate_baselines(_cfg(), ["optimal"], 1, out_dir=None, progress=False)


@pytest.mark.parametrize("over, match", [
    ({"oracle": {"objective": "profit"}}, "oracle.objective"),
    ({"oracle": {"soft": ["targets"]}}, "oracle.soft"),
    ({"oracle": {"v_margin_pu": 0.2}}, "oracle.v_margin_pu"),
    ({"oracle": {"rounds": 0}}, "oracle.rounds"),
    ({"oracle": {"solver": "GUROBI"}}, "oracle.solver"),
    ({"oracle": {"method": "lazy", "formulation": "socp"}}, "oracle.*method: lazy needs formulation lindistflow"),
    ({"oracle": {"method": "lazy", "soft": ["voltage_pu"]}}, "oracle.*method lazy .* cannot soften voltage_pu"),
    ({"oracle": {"unmet_price_per_kwh": -1.0}}, "oracle.unmet_price_per_kwh"),
])
def test_bad_oracle_settings_name_the_field(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config("quickstart", over)


def test_presetting_stations_checks_them():
    sim = Sim(load_config("seed002", {"fleet": {"n_ev": 20}}), 1)
    with pytest.raises(ValueError, match="stations: expected 20 global station numbers"):
        sim.reset(0, stations=np.full(5, -1))
    with pytest.raises(ValueError, match="stations: expected"):
        sim.reset(0, stations=np.full(20, 99))


def test_stepped_carbon_cost_is_the_maximum_of_its_lines():
    rng = np.random.default_rng(0)
    for _ in range(20):
        base = rng.uniform(1, 500)
        c = CarbonConfig(base_price_per_t=base, sell_price_per_t=rng.uniform(0, base), step_t=rng.uniform(1, 100),
                         growth=rng.uniform(0, 2), n_tiers=int(rng.integers(1, 8)))
        x = rng.uniform(-300, 1000, 200)
        lines = np.max([a * x + b for a, b in c.cost_lines()], axis=0)
        np.testing.assert_allclose(lines, stepped_carbon_cost(x, c), rtol=1e-12, atol=1e-7)


def test_trip_is_the_distance_to_each_requests_own_station():
    rng = np.random.default_rng(1)
    pos, xy = rng.uniform(0, 10, (50, 2)), rng.uniform(0, 10, (50, 2))
    for metric in ("euclidean", "manhattan"):
        cfg = rt.RoutingConfig(metric=metric, speed_kmh=40.0, consumption_kwh_per_km=0.2)
        travel_h, e_kwh = rt.trip(pos, xy, cfg)
        d = np.diagonal(rt.distance_km(pos, xy, metric))
        np.testing.assert_allclose(travel_h, d / 40.0)
        np.testing.assert_allclose(e_kwh, d * 0.2)
    with pytest.raises(ValueError, match="to_xy_km"):
        rt.trip(pos, xy[:3], rt.RoutingConfig())


def test_routing_chooses_every_station_a_plan_did_not():
    """With routing configured, a station the fleet scenario drew is not preset: routing picks every one."""
    cfg = load_config("quickstart", {"fleet": {"n_ev": 60}, "routing": {"policy": "nearest"}})
    sim = Sim(cfg, 1)
    sim.reset(0)
    drawn = sim.day.sessions.station
    assert (drawn >= 0).all() and (sim.fleet.station[sim.fleet.status == 0] == -1).all()
    while sim.t < sim.n_steps:
        sim.step()
    routed = sim.fleet.plug_step >= 0
    pos, xy = sim.day.sessions.pos_km[routed], sim.layout.station_xy_km
    # the nearest station is reachable whenever any is, and the fallback otherwise
    assert (sim.fleet.station[routed] == np.argmin(rt.distance_km(pos, xy), axis=1)).all()
    assert (sim.fleet.station[routed] != drawn[routed]).any()


@pytest.mark.slow  # about 30 s: nine policies on a day
def test_the_seed002_room_tool_measures_every_policy_on_the_same_day():
    """``tools/seed002_room.py``: the README's table of station control against the oracle."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "tools" / "seed002_room.py"
    spec = importlib.util.spec_from_file_location("seed002_room", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    res = tool.measure(150, range(0, 1))
    assert len(res) == 9 and all(np.isfinite(v).all() for v in res.values())
    assert res["oracle"][0] < res["greedy"][0]
    assert res["oracle"][1] == pytest.approx(res["greedy"][1], abs=1e-3)  # the same energy, moved in time
