"""Station selection (seed 002): nearest, LBMS, participation, chunking, validation."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evgrid.envs import routing as rt
from evgrid.envs.routing import RoutingConfig, distance_km, lbms, nearest, range_km, route, station_layout

log = logging.getLogger(__name__)


def _requests(rng: np.random.Generator, n: int, area_km: float = 10.0):
    pos = rng.uniform(0.0, area_km, (n, 2))
    soc = rng.uniform(0.0, 1.0, n)
    cap = rng.uniform(20.0, 80.0, n)
    return pos, soc, cap


@st.composite
def scenes(draw):
    """Random requests, stations, loads and ranges (some ranges short enough to exclude stations)."""
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, 40))
    m = draw(st.integers(1, 12))
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0.0, 10.0, (n, 2))
    xy = rng.uniform(0.0, 10.0, (m, 2))
    # integer loads make ties likely, which exercises the tie rule
    load = rng.integers(0, 5, m).astype(float) if draw(st.booleans()) else rng.normal(500.0, 200.0, m)
    rk = rng.uniform(0.0, 12.0, n)
    return pos, xy, load, rk


# ------------------------------------------------------------------ geometry

def test_distance_euclidean_and_manhattan():
    pos = np.array([[0.0, 0.0], [3.0, 4.0]])
    xy = np.array([[0.0, 0.0], [3.0, 0.0]])
    np.testing.assert_allclose(distance_km(pos, xy), [[0.0, 3.0], [5.0, 4.0]])
    np.testing.assert_allclose(distance_km(pos, xy, metric="manhattan"), [[0.0, 3.0], [7.0, 4.0]])


def test_station_layout_deterministic_and_random():
    for n in (1, 2, 3, 5, 9, 10, 50):
        xy = station_layout(n, 10.0)
        assert xy.shape == (n, 2)
        assert ((xy > 0) & (xy < 10.0)).all()
        assert len({tuple(p) for p in xy.round(9)}) == n  # no two stations on one spot
        np.testing.assert_array_equal(xy, station_layout(n, 10.0))
    np.testing.assert_allclose(station_layout(1, 10.0), [[5.0, 5.0]])
    a = station_layout(7, 4.0, np.random.default_rng(1))
    b = station_layout(7, 4.0, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert ((a >= 0) & (a <= 4.0)).all()


def test_range_is_soc_times_full_range():
    cfg = RoutingConfig(consumption_kwh_per_km=0.2)
    np.testing.assert_allclose(range_km([0.5, 0.0, 1.0], [40.0, 40.0, 60.0], cfg), [100.0, 0.0, 300.0])
    cfg = RoutingConfig(consumption_kwh_per_km=0.2, reserve_soc=0.1)
    np.testing.assert_allclose(range_km([0.5, 0.05], [40.0, 40.0], cfg), [80.0, 0.0])


# ------------------------------------------------------------------ selection

@settings(max_examples=60, deadline=None)
@given(scenes())
def test_nearest_is_argmin_distance(scene):
    pos, xy, _, rk = scene
    d = distance_km(pos, xy)
    np.testing.assert_array_equal(nearest(pos, xy), np.argmin(d, axis=1))
    got = nearest(pos, xy, rk)
    reach = d <= rk[:, None]
    for i in range(len(pos)):  # reference by plain loop over a small case
        if reach[i].any():
            assert reach[i, got[i]]
            assert d[i, got[i]] == d[i][reach[i]].min()
        else:
            assert got[i] == np.argmin(d[i])


@settings(max_examples=60, deadline=None)
@given(scenes())
def test_lbms_least_loaded_reachable(scene):
    pos, xy, load, rk = scene
    d = distance_km(pos, xy)
    reach = d <= rk[:, None]
    got = lbms(pos, rk, xy, load)
    for i in range(len(pos)):
        j = got[i]
        if reach[i].any():
            assert reach[i, j], "an unreachable station was chosen although a reachable one exists"
            assert load[j] == load[reach[i]].min()
            tied = reach[i] & (load == load[j])
            assert d[i, j] == d[i][tied].min()  # ties in load: the nearer one
        else:
            assert j == np.argmin(d[i])


def test_lbms_tie_goes_to_nearer():
    xy = np.array([[0.0, 0.0], [5.0, 0.0], [1.0, 0.0]])
    load = np.array([100.0, 50.0, 50.0])
    assert lbms([[0.0, 0.0]], [10.0], xy, load).tolist() == [2]
    # station 2 out of range: the least-loaded reachable is 0
    assert lbms([[-2.0, 0.0]], [2.5], xy, load).tolist() == [0]


def test_per_request_loads():
    rng = np.random.default_rng(3)
    pos, soc, cap = _requests(rng, 500)
    xy = station_layout(6, 10.0)
    load = rng.uniform(0.0, 1000.0, (500, 6))
    cfg = RoutingConfig(policy="lbms", consumption_kwh_per_km=0.01)  # long range: everything reachable
    r = route(pos, np.ones(500), cap, xy, load, cfg)
    np.testing.assert_array_equal(r.station, np.argmin(load, axis=1))
    # a shared (m,) load equals the same row repeated
    row = load[0]
    a = route(pos, soc, cap, xy, row, cfg).station
    b = route(pos, soc, cap, xy, np.tile(row, (500, 1)), cfg).station
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ route

def test_participation_zero_is_nearest_reachable():
    rng = np.random.default_rng(0)
    pos, soc, cap = _requests(rng, 2000)
    xy = station_layout(9, 10.0)
    load = rng.uniform(0.0, 1000.0, 9)
    base = RoutingConfig(consumption_kwh_per_km=0.5)
    rk = range_km(soc, cap, base)
    want = nearest(pos, xy, rk)
    for cfg in (RoutingConfig(policy="lbms", participation=0.0, consumption_kwh_per_km=0.5), base):
        r = route(pos, soc, cap, xy, load, cfg, np.random.default_rng(1))
        np.testing.assert_array_equal(r.station, want)
        assert not r.followed.any()
    assert not r.reachable.all() and r.reachable.any()  # the scene exercises both cases


def test_participation_one_all_follow():
    rng = np.random.default_rng(0)
    pos, soc, cap = _requests(rng, 2000)
    xy = station_layout(9, 10.0)
    load = rng.uniform(0.0, 1000.0, 9)
    cfg = RoutingConfig(policy="lbms", participation=1.0)
    r = route(pos, soc, cap, xy, load, cfg)  # no rng needed: nothing is random
    assert r.followed.all()
    np.testing.assert_array_equal(r.station, lbms(pos, range_km(soc, cap, cfg), xy, load))


def test_participation_share():
    rng = np.random.default_rng(0)
    pos, soc, cap = _requests(rng, 20_000)
    xy = station_layout(9, 10.0)
    load = rng.uniform(0.0, 1000.0, 9)
    cfg = RoutingConfig(policy="lbms", participation=0.3)
    r = route(pos, soc, cap, xy, load, cfg, np.random.default_rng(5))
    assert abs(r.followed.mean() - 0.3) < 0.02
    rk = range_km(soc, cap, cfg)
    np.testing.assert_array_equal(r.station[r.followed], lbms(pos, rk, xy, load)[r.followed])
    np.testing.assert_array_equal(r.station[~r.followed], nearest(pos, xy, rk)[~r.followed])
    # same seed, same draws
    r2 = route(pos, soc, cap, xy, load, cfg, np.random.default_rng(5))
    np.testing.assert_array_equal(r.followed, r2.followed)


def test_trip_quantities():
    rng = np.random.default_rng(2)
    pos, soc, cap = _requests(rng, 1000)
    xy = station_layout(5, 10.0)
    cfg = RoutingConfig(policy="lbms", participation=0.5, speed_kmh=40.0, consumption_kwh_per_km=0.2)
    r = route(pos, soc, cap, xy, np.arange(5.0), cfg, np.random.default_rng(0))
    d = distance_km(pos, xy)[np.arange(1000), r.station]
    np.testing.assert_allclose(r.distance_km, d)
    np.testing.assert_allclose(r.travel_h, d / 40.0)
    np.testing.assert_allclose(r.e_travel_kwh, d * 0.2)
    assert r.station.dtype == np.int64 and r.followed.dtype == bool and r.reachable.dtype == bool
    # a reachable trip never needs more energy than the battery holds
    assert (r.e_travel_kwh[r.reachable] <= soc[r.reachable] * cap[r.reachable] + 1e-9).all()
    np.testing.assert_array_equal(r.reachable, (distance_km(pos, xy) <= range_km(soc, cap, cfg)[:, None]).any(1))


def test_empty_batch():
    cfg = RoutingConfig(policy="lbms", participation=0.5)
    r = route(np.zeros((0, 2)), np.zeros(0), np.zeros(0), station_layout(3, 10.0), np.zeros(3), cfg,
              np.random.default_rng(0))
    assert r.station.shape == (0,) and r.travel_h.shape == (0,)


@pytest.mark.parametrize("metric", ["euclidean", "manhattan"])
@pytest.mark.parametrize("per_request", [False, True])
def test_chunking_matches_unchunked(metric, per_request, monkeypatch):
    rng = np.random.default_rng(4)
    n, m = 3001, 7
    pos, soc, cap = _requests(rng, n)
    xy = station_layout(m, 10.0, rng)
    load = rng.integers(0, 4, (n, m) if per_request else m).astype(float)
    cfg = RoutingConfig(policy="lbms", participation=0.6, consumption_kwh_per_km=0.4, metric=metric)
    full = route(pos, soc, cap, xy, load, cfg, np.random.default_rng(9), chunk_elements=10**9)
    for ce in (1, 5, 7, 100, 1000):
        part = route(pos, soc, cap, xy, load, cfg, np.random.default_rng(9), chunk_elements=ce)
        for name in ("station", "distance_km", "travel_h", "e_travel_kwh", "followed", "reachable"):
            np.testing.assert_array_equal(getattr(part, name), getattr(full, name), err_msg=f"{name} ce={ce}")
    # the module-level default is used when no chunk size is given
    monkeypatch.setattr(rt, "CHUNK_ELEMENTS", 50)
    part = route(pos, soc, cap, xy, load, cfg, np.random.default_rng(9))
    np.testing.assert_array_equal(part.station, full.station)
    rk = range_km(soc, cap, cfg)
    np.testing.assert_array_equal(lbms(pos, rk, xy, load, metric=metric, chunk_elements=3),
                                  lbms(pos, rk, xy, load, metric=metric, chunk_elements=10**9))
    np.testing.assert_array_equal(nearest(pos, xy, rk, metric=metric, chunk_elements=3),
                                  nearest(pos, xy, rk, metric=metric, chunk_elements=10**9))


def test_large_batch_runs():
    rng = np.random.default_rng(0)
    n, m = 100_000, 20
    pos, soc, cap = _requests(rng, n)
    xy = station_layout(m, 10.0)
    load = rng.uniform(0.0, 1000.0, m)
    cfg = RoutingConfig(policy="lbms", participation=0.7)
    t0 = time.perf_counter()
    r = route(pos, soc, cap, xy, load, cfg, np.random.default_rng(1))
    log.info("route: %d requests x %d stations in %.3f s", n, m, time.perf_counter() - t0)
    assert r.station.shape == (n,) and ((r.station >= 0) & (r.station < m)).all()


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("field, value", [
    ("policy", "random"), ("participation", 1.5), ("participation", -0.1), ("speed_kmh", 0.0),
    ("consumption_kwh_per_km", -1.0), ("area_km", 0.0), ("reserve_soc", 1.0), ("metric", "chebyshev"),
    ("speed_kmh", float("nan")),
])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        RoutingConfig(**{field: value})


def test_input_validation_names_argument():
    cfg = RoutingConfig(policy="lbms", participation=0.5)
    rng = np.random.default_rng(0)
    pos, soc, cap = np.zeros((3, 2)), np.full(3, 0.5), np.full(3, 50.0)
    xy, load = station_layout(4, 10.0), np.zeros(4)
    cases = {
        "pos_km": dict(pos_km=np.zeros((3, 3))),
        "soc": dict(soc=np.array([0.5, 1.2, 0.1])),
        "cap_kwh": dict(cap_kwh=np.array([50.0, 0.0, 50.0])),
        "station_xy_km": dict(station_xy_km=np.zeros((0, 2))),
        "load_kw": dict(load_kw=np.zeros(5)),
        "rng": dict(rng=None),
        "cfg": dict(cfg={"policy": "lbms"}),
    }
    args = dict(pos_km=pos, soc=soc, cap_kwh=cap, station_xy_km=xy, load_kw=load, cfg=cfg, rng=rng)
    for name, bad in cases.items():
        with pytest.raises(ValueError, match=rf"^{name}: "):
            route(**{**args, **bad})
    with pytest.raises(ValueError, match=r"^pos_km: expected finite"):
        route(**{**args, "pos_km": np.array([[0.0, np.nan]] * 3)})
    with pytest.raises(ValueError, match=r"^load_kw: expected finite"):
        route(**{**args, "load_kw": np.array([0.0, np.inf, 0.0, 0.0])})
    with pytest.raises(ValueError, match=r"^soc: expected shape"):
        route(**{**args, "soc": np.full(2, 0.5)})
    with pytest.raises(ValueError, match=r"^range_km: "):
        lbms(pos, [1.0, -1.0, 2.0], xy, load)
    with pytest.raises(ValueError, match=r"^chunk_elements: "):
        nearest(pos, xy, chunk_elements=0)
    with pytest.raises(ValueError, match=r"^metric: "):
        distance_km(pos, xy, metric="l3")
    with pytest.raises(ValueError, match=r"^n_station: "):
        station_layout(0, 10.0)
