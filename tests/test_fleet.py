"""Session generators and battery physics: bounds, energy, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from evgrid.envs import fleet as fl
from evgrid.grid.profiles import TouTariff


@pytest.mark.parametrize("scenario", fl.SCENARIOS)
def test_generators_are_seeded_sorted_and_physical(scenario):
    cfg = fl.FleetConfig(scenario=scenario, n_ev=2000)
    a = fl.generate(cfg, np.random.default_rng(7), n_station=3)
    b = fl.generate(cfg, np.random.default_rng(7), n_station=3)
    for name in ("t_request_h", "cap_kwh", "soc0", "p_ch_max_kw", "station"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.n == 2000
    assert (np.diff(a.t_request_h) >= 0).all()
    assert ((a.soc0 > 0) & (a.soc0 < 1)).all()
    assert (a.p_dis_max_kw <= a.p_ch_max_kw + 1e-12).all()
    assert (a.stay_h > 0).all()
    if scenario == "city_requests":
        assert (a.station == -1).all()
        assert ((a.pos_km >= 0) & (a.pos_km <= 10)).all()
    else:
        assert set(np.unique(a.station)) <= {0, 1, 2}


def test_household_valley_matches_seed_001():
    s = fl.generate(fl.FleetConfig(scenario="household_valley", n_ev=20000), np.random.default_rng(0), n_station=3)
    assert np.allclose(s.cap_kwh, 50.0) and np.allclose(s.soc_target, 1.0)
    assert s.p_ch_max_kw.min() >= 3.5 and s.p_ch_max_kw.max() <= 7.0
    assert abs(s.t_request_h.mean() - 19.0) < 0.05
    assert abs(s.soc0.mean() - 0.4) < 0.01
    assert np.allclose(s.t_depart_h, 32.0)


def test_station_weights_shape_the_assignment():
    cfg = fl.FleetConfig(scenario="household_valley", n_ev=55000, station_weights=(179, 225, 146))
    s = fl.generate(cfg, np.random.default_rng(3), n_station=3)
    share = np.bincount(s.station) / s.n
    np.testing.assert_allclose(share, np.array([179, 225, 146]) / 550, atol=0.01)
    with pytest.raises(ValueError, match="station_weights"):
        fl.generate(cfg, np.random.default_rng(3), n_station=4)


@settings(max_examples=100, deadline=None)
@given(seed=hst.integers(0, 2**32 - 1), n=hst.integers(1, 200), dt_h=hst.sampled_from([0.25, 0.5, 1.0]))
def test_power_bounds_keep_soc_in_range_and_conserve_energy(seed, n, dt_h):
    rng = np.random.default_rng(seed)
    soc = rng.uniform(0, 1, n)
    cap = rng.uniform(20, 100, n)
    p_ch = rng.uniform(3, 50, n)
    p_dis = p_ch * rng.uniform(0, 1, n)
    eta_c = rng.uniform(0.8, 1.0, n)
    eta_d = rng.uniform(0.8, 1.0, n)
    v2g = rng.random(n) < 0.5
    ch = fl.charge_limit_kw(soc, cap, p_ch, eta_c, dt_h)
    dis = fl.discharge_limit_kw(soc, cap, p_dis, eta_d, v2g, 0.3, dt_h)
    assert (ch >= 0).all() and (ch <= p_ch + 1e-12).all()
    assert (dis >= 0).all() and (dis <= p_dis + 1e-12).all() and (dis[~v2g] == 0).all()
    p = np.where(rng.random(n) < 0.5, ch * rng.uniform(0, 1, n), -dis * rng.uniform(0, 1, n))
    new = fl.soc_after(soc, p, cap, eta_c, eta_d, dt_h)
    assert (new >= -1e-12).all() and (new <= 1 + 1e-12).all()
    # discharge never goes below the V2G floor it started above
    assert (new[p < 0] >= np.minimum(soc[p < 0], 0.3) - 1e-12).all()
    # battery energy = grid energy x efficiency (charging) or / efficiency (discharging)
    e_batt = (new - soc) * cap
    e_grid = p * dt_h
    np.testing.assert_allclose(e_batt, np.where(p >= 0, e_grid * eta_c, e_grid / eta_d), atol=1e-9)


def test_user_category_from_tariff_periods():
    tariff = TouTariff()  # valley 0-8, peak 8-12 and 17-21
    cat = fl.user_category(np.array([13.0, 22.0, 9.0, 18.0]), np.array([16.0, 31.0, 11.0, 31.0]), tariff)
    np.testing.assert_array_equal(cat, [0, 1, 2, 3])


@pytest.mark.parametrize("field,value", [("scenario", "commute"), ("n_ev", 0), ("mix", (0.5, 0.5, 0.5)),
                                         ("cap_kwh", (80.0, 40.0)), ("eta_charge", 1.2), ("soc_target", -0.1),
                                         ("v2g_share", 2.0), ("uninterruptible", "yes"), ("station_weights", ())])
def test_fleet_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        fl.FleetConfig(**{field: value})


@settings(max_examples=60, deadline=None)
@given(seed=hst.integers(0, 2**32 - 1), n=hst.integers(1, 300), dt_h=hst.sampled_from([0.25, 1.0]))
def test_simulator_kernels_compute_the_fleet_formulas(seed, n, dt_h):
    """The simulator's compiled per-EV passes (learned requests; settling after the power flow) compute the
    fleet's battery formulas (inlined there, ufuncs here) and the request and cost rules as numpy does: same
    values on random fleets, so the two cannot drift apart."""
    from evgrid.envs import sim as sm

    rng = np.random.default_rng(seed)
    N = n + 20  # sessions; idx picks the plugged ones
    idx = np.sort(rng.choice(N, n, replace=False))
    soc = rng.uniform(0, 1, N)
    cap, p_ch, eta_ch, eta_dis = rng.uniform(20, 90, N), rng.uniform(3, 22, N), rng.uniform(0.85, 1, N), \
        rng.uniform(0.85, 1, N)
    p_dis, target, v2g = p_ch * rng.uniform(0, 1, N), rng.uniform(0.5, 1, N), rng.random(N) < 0.5
    mode, frac = rng.integers(0, 3, N), rng.uniform(0, 1, N)
    p_ch_av, p_dis_av, need, req = sm._learned_requests(idx, mode, frac, soc, target, cap, p_ch, p_dis,
                                                        eta_ch, eta_dis, v2g, 0.2, dt_h)
    ch = np.minimum(p_ch[idx], np.maximum(1.0 - soc[idx], 0.0) * cap[idx] / (eta_ch[idx] * dt_h))
    dis = np.where(v2g[idx], np.minimum(p_dis[idx], np.maximum(soc[idx] - 0.2, 0.0) * cap[idx] * eta_dis[idx] / dt_h),
                   0.0)
    np.testing.assert_array_equal(p_ch_av, ch)
    np.testing.assert_array_equal(p_dis_av, dis)
    np.testing.assert_array_equal(ch, fl.charge_limit_kw(soc[idx], cap[idx], p_ch[idx], eta_ch[idx], dt_h))
    np.testing.assert_array_equal(dis, fl.discharge_limit_kw(soc[idx], cap[idx], p_dis[idx], eta_dis[idx], v2g[idx],
                                                             0.2, dt_h))
    np.testing.assert_array_equal(need, np.maximum(target[idx] - soc[idx], 0) * cap[idx])
    m, f = mode[idx], frac[idx]
    want = np.where(m == sm.CHARGE, f * p_ch[idx], np.where(m == sm.DISCHARGE, -f * p_dis[idx], 0.0))
    np.testing.assert_array_equal(req, np.clip(want, -dis, ch))

    # settling: 4 buses x 2 envs; curtailment and added V2G shared pro rata at each bus
    lin = rng.integers(0, 8, n)
    charge, spare = np.maximum(req, 0.0), np.maximum(dis + np.minimum(req, 0.0), 0.0)
    flex_c, flex_v = np.bincount(lin, charge, 8), np.bincount(lin, spare, 8)
    curtail, v2g_add = flex_c * rng.uniform(0, 1, 8), flex_v * rng.uniform(0, 1, 8)
    price = rng.uniform(0.1, 0.6, n)
    state = [soc.copy(), np.zeros(N, bool), np.zeros(N), np.zeros(N), np.zeros(N), np.zeros(N), np.zeros(N)]
    p, cut, cost, e_batt = sm._settle(idx, lin, req, charge, spare, flex_c, flex_v, curtail, v2g_add, price, 0.8,
                                      dt_h, cap, eta_ch, eta_dis, *state)
    share_c = np.divide(charge, flex_c[lin], out=np.zeros(n), where=flex_c[lin] > 0)
    share_v = np.divide(spare, flex_v[lin], out=np.zeros(n), where=flex_v[lin] > 0)
    np.testing.assert_array_equal(cut, curtail[lin] * share_c)
    np.testing.assert_array_equal(p, req - cut - v2g_add[lin] * share_v)
    e_batt_want = np.where(p >= 0, p * eta_ch[idx], p / eta_dis[idx]) * dt_h
    np.testing.assert_array_equal(state[0][idx], soc[idx] + e_batt_want / cap[idx])
    np.testing.assert_array_equal(state[0][idx], fl.soc_after(soc[idx], p, cap[idx], eta_ch[idx], eta_dis[idx], dt_h))
    e = p * dt_h
    np.testing.assert_array_equal(cost, np.where(e >= 0, e * price, e * price * 0.8))
    np.testing.assert_array_equal(e_batt, np.abs(e_batt_want))
    assert (state[1][idx] == (p > 1e-9)).all() and not state[1][np.setdiff1d(np.arange(N), idx)].any()
    np.testing.assert_array_equal(state[2][idx], e)  # grid energy
    np.testing.assert_array_equal(state[3][idx], np.maximum(-e, 0.0))  # V2G energy
    np.testing.assert_array_equal(state[6][idx], p)  # last power


def test_household_valley_honours_the_configured_battery_and_charger():
    cfg = fl.FleetConfig(scenario="household_valley", n_ev=400, cap_kwh=(60.0, 75.0), p_charge_kw=(10.0, 11.0))
    s = fl.generate(cfg, np.random.default_rng(0), n_station=3)
    assert (s.cap_kwh >= 60.0).all() and (s.cap_kwh <= 75.0).all() and s.cap_kwh.std() > 1.0
    assert (s.p_ch_max_kw >= 10.0).all() and (s.p_ch_max_kw <= 11.0).all()
    # unset, the scenario's own: seed 001's 50 kWh and 3.5-7 kW
    s = fl.generate(fl.FleetConfig(scenario="household_valley", n_ev=400), np.random.default_rng(0), n_station=3)
    assert (s.cap_kwh == 50.0).all() and s.p_ch_max_kw.min() >= 3.5 and s.p_ch_max_kw.max() <= 7.0


@settings(max_examples=20, deadline=None)
@given(seed=hst.integers(0, 2**32 - 1), counts=hst.lists(hst.integers(0, 200), min_size=1, max_size=6))
def test_station_counts_are_exact(seed, counts):
    if sum(counts) == 0:
        counts = counts[:-1] + [1]
    cfg = fl.FleetConfig(n_ev=sum(counts), station_counts=tuple(counts))
    s = fl.generate(cfg, np.random.default_rng(seed), n_station=len(counts))
    np.testing.assert_array_equal(np.bincount(s.station, minlength=len(counts)), counts)


def test_station_counts_must_add_up_and_exclude_weights():
    with pytest.raises(ValueError, match=r"station_counts: expected counts summing to n_ev = 10"):
        fl.FleetConfig(n_ev=10, station_counts=(3, 3))
    with pytest.raises(ValueError, match="station_counts: give station_counts or station_weights"):
        fl.FleetConfig(n_ev=6, station_counts=(3, 3), station_weights=(1.0, 1.0))
