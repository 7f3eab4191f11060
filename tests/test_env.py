"""EVGrid-v0: PettingZoo API and seed tests on every registered configuration x EV view,
determinism, physics invariants on the live simulator, bad actions."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst
from pettingzoo.test import parallel_api_test, parallel_seed_test

import evgrid
from evgrid.agents.baselines import BaselinePolicy
from evgrid.config import ConfigError
from evgrid.envs.config import load_config
from evgrid.envs.ev_grid import EVGridVectorEnv
from evgrid.envs.sim import DEPARTED, PLUGGED, TRUNCATED, Sim, SimActions

EXPERIMENTS = sorted((Path(__file__).parent.parent / "evgrid" / "experiments").glob("*.yaml"))
# small and short, so each API test runs a whole episode in a second or two
SMALL = {"n_steps": 40, "start_hour": 14.0, "fleet": {"n_ev": 60}, "stations": {"ports": 30}}


def small_env(config=None, ev_view="grouped", **extra):
    over = {**SMALL, **extra}
    cfg = load_config(config)
    if cfg.fleet.station_counts is not None:  # exact counts must add up to the smaller fleet
        n, counts = over["fleet"]["n_ev"], np.asarray(cfg.fleet.station_counts)
        split = np.floor(n * counts / counts.sum()).astype(int)
        split[0] += n - split.sum()
        over["fleet"] = {**over["fleet"], "station_counts": split.tolist()}
    if ev_view != "grouped" and cfg.agents.operator == "rule" and cfg.agents.station == "rule":
        # a study whose only agents are grouped EVs: learn its stations instead, so the view has live agents
        over["agents"] = {"station": "learned"}
    return evgrid.make("EVGrid-v0", config, ev_view=ev_view, **over)


@pytest.mark.parametrize("ev_view", ["individual", "grouped", "rule"])
@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_pettingzoo_parallel_api(config, ev_view):
    env = small_env(config, ev_view)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EV ids that never arrive are neither terminated nor truncated
        parallel_api_test(env, num_cycles=200)


@pytest.mark.parametrize("ev_view", ["individual", "grouped", "rule"])
@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_pettingzoo_parallel_seed(config, ev_view):
    parallel_seed_test(lambda: small_env(config, ev_view), num_cycles=50)


def test_evs_arrive_and_leave_in_the_individual_view():
    env = small_env(ev_view="individual")
    obs, _ = env.reset(seed=3)
    seen, gone = set(), set()
    policy = BaselinePolicy("random", env, seed=0)
    while env.agents:
        prev = set(env.agents)
        obs, rew, term, trunc, _ = env.step(policy.act(obs))
        new = {a for a in env.agents if a.startswith("ev_")} - prev
        assert not (new & gone), "an EV id came back"
        seen |= {a for a in env.agents if a.startswith("ev_")}
        gone |= {a for a, t in term.items() if t}
        for a in gone:
            assert a not in env.agents
    assert len(seen) > 10 and len(gone) > 0


@pytest.mark.parametrize("ev_view", ["grouped", "individual"])
def test_ev_features_are_the_documented_quantities(ev_view):
    """Each EV's observation (computed by a compiled pass) against the quantities the EV feature declarations
    name, in numpy from the simulator's arrays, after every step of an evening with uninterruptible sessions."""
    from evgrid.envs.views.features import EV
    from evgrid.grid.profiles import VALLEY

    env = small_env(ev_view=ev_view, fleet={"n_ev": 60, "uninterruptible": True})
    obs, _ = env.reset(seed=5)
    policy = BaselinePolicy("random", env, seed=2)
    vec, sim = env.vec, env.vec.sim
    lay, tariff = sim.layout, env.cfg.market.tariff
    prices = np.array([tariff.valley_price_per_kwh, tariff.offpeak_price_per_kwh, tariff.peak_price_per_kwh])
    checked = 0
    while env.agents:
        obs, *_ = env.step(policy.act(obs))
        if not env.agents:
            break
        s, fleet = sim.day.sessions, sim.fleet
        if ev_view == "grouped":
            owner = vec.slots.owner  # (station, slot) -> session, -1 empty
            occ = owner >= 0
            idx = owner[occ]
            got = np.concatenate([obs[f"evs_{j}"]["evs"][occ[j]] for j in range(lay.n_station)])
        else:
            idx = sim.plugged()
            got = np.array([obs[f"ev_{k}"] for k in fleet.ev_index[idx]]).reshape(idx.size, len(EV))
        t, t_next = sim.t, min(sim.t + 1, sim.n_steps - 1)
        bus = lay.station_bus[fleet.station[idx] % lay.n_station]
        zone = lay.zone_of_bus[bus]
        c, e = sim.slots(idx)
        need = np.maximum(s.soc_target[idx] - fleet.soc[idx], 0.0) * s.cap_kwh[idx]
        want = dict(
            soc=fleet.soc[idx], soc_target=s.soc_target[idx], need_share=need / s.cap_kwh[idx],
            hours_left_per_day=(fleet.dep_step[idx] - t) * sim.dt_h / 24.0, p_ch_max_per_50kw=s.p_ch_max_kw[idx] / 50.0,
            p_dis_max_per_50kw=s.p_dis_max_kw[idx] / 50.0, v2g=s.v2g[idx], price_now=sim.retail_price()[0, zone],
            price_next=sim.prices.next[0, zone] * prices[sim.day.period[t_next]],
            bus_vm_pu=vec.last_rec.vm_pu[0, bus], laxity=c / np.maximum(e, 1), uninterruptible_on=fleet.started[idx],
            valley=np.full(idx.size, float(sim.day.period[t] == VALLEY)))
        assert set(want) == set(EV.names)
        assert got.shape == (idx.size, len(EV))
        np.testing.assert_array_equal(got, np.column_stack([want[n] for n in EV.names]).astype(np.float32))
        checked += idx.size
    assert checked > 100


def _rollout(seed, view="grouped", log_dir=None):
    env = small_env(ev_view=view, log_dir=log_dir)
    obs, _ = env.reset(seed=seed)
    policy = BaselinePolicy("random", env, seed=11)
    traj = []
    while env.agents:
        act = policy.act(obs)
        obs, rew, term, trunc, _ = env.step(act)
        traj.append((sorted(obs), {a: np.asarray(o["evs"] if isinstance(o, dict) else o).copy()
                                   for a, o in obs.items()}, dict(rew)))
    env.close()
    return traj


def test_same_seed_same_trajectory_and_parquet(tmp_path):
    a = _rollout(5, log_dir=str(tmp_path / "a"))
    b = _rollout(5, log_dir=str(tmp_path / "b"))
    assert len(a) == len(b)
    for (ka, oa, ra), (kb, ob, rb) in zip(a, b):
        assert ka == kb and ra == rb
        for k in ka:
            np.testing.assert_array_equal(oa[k], ob[k])
    for name in ("steps", "sessions"):
        ta = pq.read_table(tmp_path / "a" / f"{name}.parquet")
        tb = pq.read_table(tmp_path / "b" / f"{name}.parquet")
        # pandas' equals treats NaN (unmet energy of sessions that never arrived) as equal
        assert ta.num_rows > 0 and ta.to_pandas().equals(tb.to_pandas())
    c = _rollout(6)
    assert any(ra != rc for (_, _, ra), (_, _, rc) in zip(a, c))


def test_parquet_logs_have_the_documented_columns(tmp_path):
    from evgrid.io import SESSION_COLUMNS, STEP_COLUMNS

    _rollout(1, log_dir=str(tmp_path))
    for name, documented in (("steps", STEP_COLUMNS), ("sessions", SESSION_COLUMNS)):
        schema = pq.read_schema(tmp_path / f"{name}.parquet")
        assert schema.names == list(documented)
        for field in schema:  # every column carries its unit and where it is measured
            assert field.metadata[b"unit"].decode() == documented[field.name][0]
            assert field.metadata[b"description"]
    steps = pq.read_table(tmp_path / "steps.parquet").to_pandas()
    sessions = pq.read_table(tmp_path / "sessions.parquet").to_pandas()
    assert len(steps) == SMALL["n_steps"] and len(sessions) == SMALL["fleet"]["n_ev"]
    # grid side vs battery side: a session that only charged drew eta_charge^-1 times what it stored
    only_charged = (sessions.e_v2g_kwh == 0) & (sessions.e_delivered_kwh > 1.0)
    assert only_charged.sum() > 5
    ch = sessions[only_charged]
    np.testing.assert_allclose(ch.e_stored_kwh, ch.e_delivered_kwh * 0.9, rtol=1e-9)


def test_seed001_puts_its_stations_at_the_papers_nodes_with_exact_counts():
    sim = Sim(load_config("seed001"))
    lay = sim.layout
    assert lay.feeders[0].numbers[lay.station_bus].tolist() == [5, 9, 13]
    for seed in (0, 1, 2):
        sim.reset(seed)
        assert np.bincount(sim.fleet.station, minlength=3).tolist() == [179, 225, 146]
    with pytest.raises(ConfigError, match=r"stations\.buses: 15 is not a bus of feeder 'feeder14'.*1-14"):
        load_config("seed001", {"stations": {"buses": [5, 9, 15]}})


def test_pv_beyond_the_export_limit_is_curtailed_recorded_and_charged(tmp_path):
    """Seed 003's PV sites on a lightly loaded IEEE 33 that may not export: the output the feeder cannot
    take is curtailed, logged, and costs the operators ``curtailment_cost_per_kwh``."""
    from evgrid.evaluate import EpisodeMetrics

    rule = {"operator": "rule", "station": "rule", "ev_view": "rule"}
    cfg = load_config("quickstart", {"grid": {"der": True, "base_load_scale": 0.2, "export_limit_kw": 0.0},
                                     "agents": rule, "fleet": {"n_ev": 100}})
    sim = Sim(cfg, n_env=2)
    sim.reset(0)
    metrics = EpisodeMetrics(sim)
    curtailed_kwh = 0.0
    while sim.t < sim.n_steps:
        rec = sim.step()
        metrics.add(rec)
        ok = rec.converged
        assert (-rec.feeder_load_kw[ok] <= 1e-3).all(), "the feeder exported past its limit"
        cut = rec.res_curtail_kw.sum(axis=1) * sim.dt_h
        np.testing.assert_allclose(rec.zone_cost.curtailment_cost.sum(axis=1),
                                   cfg.market.curtailment_cost_per_kwh * cut, rtol=1e-12, atol=1e-12)
        curtailed_kwh += cut.sum()
    assert curtailed_kwh > 1000.0
    # the same day without the limit exports instead and pays nothing for curtailment
    free = Sim(load_config(cfg, {"grid": {"export_limit_kw": None}}), n_env=2)
    free.reset(0)
    free_metrics = EpisodeMetrics(free)
    while free.t < free.n_steps:
        free_metrics.add(free.step())
    assert free_metrics.op_cost.sum() < metrics.op_cost.sum()


@settings(max_examples=5, deadline=None)
@given(seed=hst.integers(0, 2**31 - 1))
def test_sim_physics_invariants_on_random_actions(seed):
    cfg = load_config(None, {**SMALL, "fleet": {"n_ev": 400}, "stations": {"ports": 80,
                                                "p_max_kw": 150.0}, "grid": {"base_load_scale": 0.9}})
    sim = Sim(cfg, n_env=3)
    sim.reset(seed)
    rng = np.random.default_rng(seed)
    fleet, n_st, n = sim.fleet, sim.layout.n_station, sim.day.sessions.n
    soc_prev = fleet.soc.copy()
    while sim.t < sim.n_steps:
        act = SimActions(price_multiplier=rng.uniform(0.5, 1.5, (3, sim.layout.n_zone)),
                         station_fraction=rng.uniform(0, 1, 3 * n_st),
                         ev_mode=rng.integers(0, 3, n), ev_power=rng.uniform(0, 1, n))
        idx = sim.plugged()
        p_ch, p_dis = sim.bounds(idx)
        rec = sim.step(act)
        p = rec.p_ev_kw
        np.testing.assert_array_equal(rec.plugged, idx)
        assert (p <= p_ch + 1e-9).all() and (p >= -p_dis - 1e-9).all()
        assert ((fleet.soc >= -1e-12) & (fleet.soc <= 1 + 1e-12)).all()
        # station limits hold for the charging sum
        load = np.bincount(fleet.station[idx], np.maximum(p, 0), 3 * n_st)
        assert (load <= cfg.stations.p_max_kw + 1e-6).all()
        # only plugged EVs change their SOC (travel energy, with routing, is the only other change: none here)
        other = np.setdiff1d(np.arange(n), idx)
        assert not (fleet.soc[other] != soc_prev[other]).any()
        # battery side: the SOC moved by the energy the step put through each battery
        moved = (fleet.soc[idx] - soc_prev[idx]) * sim.day.sessions.cap_kwh[idx]
        np.testing.assert_allclose(np.abs(moved), rec.e_batt_kwh, rtol=1e-9, atol=1e-9)
        soc_prev = fleet.soc.copy()
        assert np.isfinite(rec.vm_pu[rec.converged]).all()
        # curtailment is a reduction, never an addition
        assert (rec.curtail_kw >= -1e-9).all() and (rec.res_curtail_kw >= -1e-9).all()
        # energy balance: power from the upstream grid = net zone loads + losses
        ok = rec.converged
        np.testing.assert_allclose(rec.feeder_load_kw[ok].sum(axis=1),
                                   rec.zone_load_kw[ok].sum(axis=1) + rec.loss_kw[ok], rtol=1e-6, atol=1e-3)
    # no EV leaves with more energy than its charger could have given it
    s = sim.day.sessions
    done = np.isin(fleet.status, (DEPARTED, TRUNCATED))
    steps = np.maximum(fleet.dep_step - fleet.plug_step, 0)
    gained = (fleet.soc - fleet.soc_arrive) * s.cap_kwh
    assert (gained[done] <= s.p_ch_max_kw[done] * s.eta_ch[done] * steps[done] * sim.dt_h + 1e-6).all()
    assert not (fleet.status == PLUGGED).any()


def test_limits_bring_voltages_back_when_evs_cause_the_violation():
    over = {**SMALL, "fleet": {"n_ev": 600, "v2g_share": 0.0}, "stations": {"ports": 200, "p_max_kw": 2000.0},
            "grid": {"base_load_scale": 0.5}, "agents": {"operator": "rule", "station": "rule", "ev_view": "rule"}}
    free = Sim(load_config(None, {**over, "grid": {"base_load_scale": 0.5,
                                                                      "enforce_limits": False}}))
    held = Sim(load_config(None, over))
    free.reset(0)
    held.reset(0)
    v_free = v_held = 0
    cut = 0.0
    while free.t < free.n_steps:
        a, b = free.step(), held.step()
        v_free += int(a.violations_enforced.sum())
        v_held += int(b.violations_enforced.sum())
        # without enforcement the dispatch is what the grid sees
        assert (a.violations == a.violations_enforced).all()
        cut += float(b.curtail_kw.sum())
    assert v_free > 0, "the scenario should overload the feeder without enforcement"
    assert v_held < v_free / 10 and cut > 0


def test_individual_evs_with_rule_levels_run_the_idle_steps_inside_reset_and_step():
    """Individual EVs, operators and stations on their rules: the steps with no EV plugged in (no agent to act)
    run inside reset and step, so `agents` is empty only at the end and `step_records` covers the whole day;
    in a vector env one environment may have no agent while another has some."""
    rules = {"n_steps": 24, "start_hour": 16.0, "fleet": {"n_ev": 10}, "stations": {"ports": 40},
             "agents": {"operator": "rule", "station": "rule"}}
    env = evgrid.make("EVGrid-v0", "quickstart", ev_view="individual", **rules)
    obs, _ = env.reset(seed=0)
    records, calls = len(env.step_records), 0
    policy = BaselinePolicy("random", env, seed=0)
    while env.agents:
        assert set(obs) >= set(env.agents)
        obs, *_ = env.step(policy.act(obs))
        records += len(env.step_records)
        calls += 1
    assert env.sim.t == records == 24 and calls < records, "no idle stretch was skipped"
    # a day with no EV at all (the night) runs inside reset
    night = evgrid.make("EVGrid-v0", "quickstart", ev_view="individual", **{**rules, "start_hour": 0.0})
    obs, _ = night.reset(seed=0)
    assert obs == {} and night.agents == [] and len(night.step_records) == 24
    vec = EVGridVectorEnv("quickstart", 2, ev_view="individual", **rules)
    vec.reset(seed=0)
    one_empty = 0
    while any(vec.agents):
        one_empty += sum(not agents for agents in vec.agents)
        vec.step([{a: vec.action_space(a).sample() for a in agents} for agents in vec.agents])
    assert one_empty > 0 and vec.sim.t == 24


@pytest.mark.parametrize("bad,match", [
    ({"fleet": {"n_ev": -1}}, "fleet.n_ev"),
    ({"grid": {"v_min_pu": 1.3}}, "grid.v_min_pu"),
    ({"agents": {"ev_view": "crowd"}}, "agents.ev_view"),
    ({"fleet": {"colour": "red"}}, "fleet.colour"),
    ({"stations": {"dispatch": "fifo"}}, "stations.dispatch"),
])
def test_bad_config_names_the_field(bad, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        evgrid.make("EVGrid-v0", None, **bad)


def test_bad_actions_name_the_agent():
    env = small_env(ev_view="grouped")
    obs, _ = env.reset(seed=0)
    act = BaselinePolicy("uncontrolled", env).act(obs)
    bad = dict(act)
    bad["operator_0"] = np.array([np.nan], np.float32)
    with pytest.raises(ValueError, match="operator_0"):
        env.step(bad)
    bad = dict(act)
    bad["station_1"] = 99
    with pytest.raises(ValueError, match="station_1"):
        env.step(bad)
    bad = dict(act)
    del bad["evs_0"]
    with pytest.raises(ValueError, match="evs_0"):
        env.step(bad)


def test_state_is_global_and_finite():
    env = small_env()
    obs, _ = env.reset(seed=0)
    s0 = env.state()
    env.step(BaselinePolicy("uncontrolled", env).act(obs))
    s1 = env.state()
    assert s0.shape == s1.shape and np.isfinite(s1).all()
    assert s1.shape[0] > env.sim.layout.n_bus


@pytest.mark.parametrize("dispatch", ["equal", "llf", "cap"])
def test_station_actions_act_on_dispatch(dispatch):
    cfg = load_config(None, {**SMALL, "stations": {"ports": 30, "dispatch": dispatch, "p_max_kw": 300.0},
                             "grid": {"enforce_limits": False}, "fleet": {"n_ev": 200, "v2g_share": 0.0}})
    sim = Sim(cfg)
    sim.reset(2)
    n_st = sim.layout.n_station
    frac = np.tile([0.0, 0.5], n_st // 2)
    for _ in range(30):
        idx = sim.plugged()
        rec = sim.step(SimActions(station_fraction=frac))
        p = rec.p_ev_kw
        stn = sim.fleet.station[idx]
        assert (p[frac[stn] == 0.0] <= 1e-9).all(), "a station at fraction 0 let an EV charge"
        half = frac[stn] == 0.5
        if dispatch == "equal":
            assert (np.bincount(stn, p, n_st) <= 150.0 + 1e-6).all()
        elif dispatch == "cap":
            assert (p[half] <= 0.5 * sim.day.sessions.p_ch_max_kw[idx][half] + 1e-9).all()
        else:
            on = np.bincount(stn, p > 1e-9, n_st)
            n = np.bincount(stn, minlength=n_st)
            assert (on <= np.rint(frac * n) + 1e-9).all()
