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
    ch, dis = fl.power_bounds(soc, cap, p_ch, p_dis, eta_c, eta_d, v2g, 0.3, dt_h)
    assert (ch >= 0).all() and (ch <= p_ch + 1e-12).all()
    assert (dis >= 0).all() and (dis <= p_dis + 1e-12).all() and (dis[~v2g] == 0).all()
    p = np.where(rng.random(n) < 0.5, ch * rng.uniform(0, 1, n), -dis * rng.uniform(0, 1, n))
    new = fl.apply_power(soc, p, cap, eta_c, eta_d, dt_h)
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
