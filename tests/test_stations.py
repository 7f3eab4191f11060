"""Station dispatch rules on random fleets: limits hold, nothing is invented, LLF order."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from evgrid.envs import fleet as fl
from evgrid.envs import stations as st


def _brute_water_fill(r: np.ndarray, cap: float) -> np.ndarray:
    if r.sum() <= cap:
        return r
    lo, hi = 0.0, float(r.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if np.minimum(r, mid).sum() > cap else (mid, hi)
    return np.minimum(r, lo)


@settings(max_examples=200, deadline=None)
@given(seed=hst.integers(0, 2**32 - 1), n=hst.integers(0, 40), m=hst.integers(1, 6))
def test_equal_share_is_water_filling(seed, n, m):
    rng = np.random.default_rng(seed)
    req = rng.uniform(0, 11, n) * (rng.random(n) < 0.85)
    stn = rng.integers(0, m, n)
    cap = rng.uniform(0, 80, m)
    out = st.equal_share(req, stn, cap)
    assert (out >= -1e-12).all() and (out <= req + 1e-9).all()
    for s in range(m):
        sel = stn == s
        assert out[sel].sum() <= max(cap[s], 0) + 1e-7
        np.testing.assert_allclose(out[sel], _brute_water_fill(req[sel], cap[s]), atol=1e-6)


def _ref_equal_share(req: np.ndarray, stn: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Per station, ascending requests: λ is the first candidate (cap - Σ smaller) / n_left that a request
    reaches; sums exact (Fraction), so λ is correctly rounded."""
    out = req.copy()
    total = np.bincount(stn, req, cap.shape[0])  # summed in row order, as the function's within-cap test
    for s in range(cap.shape[0]):
        idx = np.flatnonzero(stn == s)
        if total[s] <= cap[s]:
            continue
        r = np.sort(req[idx])
        served = Fraction(0)
        lam = np.inf  # the float total exceeds the cap by rounding only: everyone is served
        for k, x in enumerate(r):
            cand = (Fraction(float(cap[s])) - served) / (len(r) - k)
            if x >= cand:
                lam = float(cand)
                break
            served += Fraction(float(x))
        out[idx] = np.minimum(req[idx], max(lam, 0.0))
    return out


def _random_fleet(rng, n, m, levels, skew):
    """Requests with zeros (and many ties for ``levels``), stations with empty ones (``m`` plus a few
    never used) and one huge station for ``skew``, caps around each station's total incl. 0 and exact."""
    if levels:
        req = rng.choice([0.0, 3.7, 7.4, 11.0, 22.0], n) * rng.choice([0.8, 1.0], n)
    else:
        req = rng.uniform(0, 22, n) * (rng.random(n) < 0.85)
    stn = rng.integers(0, m, n)
    if skew:
        stn = np.where(rng.random(n) < 0.8, 0, stn)
    n_st = m + int(rng.integers(0, 3))
    total = np.bincount(stn, req, n_st)
    cap = total * rng.uniform(0, 1.3, n_st)
    cap[rng.random(n_st) < 0.15] = 0.0
    exact = rng.random(n_st) < 0.1
    cap[exact] = total[exact]
    return req, stn, cap


@settings(max_examples=300, deadline=None)
@given(seed=hst.integers(0, 2**32 - 1), n=hst.integers(0, 300), m=hst.integers(1, 12), levels=hst.booleans(),
       skew=hst.booleans(), max_passes=hst.sampled_from([1, 2, 16]))
def test_equal_share_matches_sorted_reference(seed, n, m, levels, skew, max_passes):
    rng = np.random.default_rng(seed)
    req, stn, cap = _random_fleet(rng, n, m, levels, skew)
    out = st.equal_share(req, stn, cap)
    if n:  # the kernel with few passes left: the sort that bounds slow inputs must agree too
        out2 = np.empty(n)
        assert st._equal_share_kernel(req, stn, cap, out2, max_passes) == 0
        np.testing.assert_array_equal(out2 == req, out == req)
        np.testing.assert_allclose(out2, out, rtol=1e-13, atol=0)
    ref = _ref_equal_share(req, stn, cap)
    assert (out >= 0).all() and (out <= req).all()
    got = np.bincount(stn, out, cap.shape[0])
    total = np.bincount(stn, req, cap.shape[0])
    for s in range(cap.shape[0]):
        sel = stn == s
        tol = 1e-12 * max(cap[s], total[s], 1e-300)
        np.testing.assert_allclose(out[sel], ref[sel], rtol=1e-12, atol=tol)
        assert got[s] <= cap[s] + tol
        assert abs(got[s] - min(total[s], cap[s])) <= tol


def test_equal_share_ties_zero_caps_and_exits():
    req = np.array([5.0, 5.0, 5.0, 0.0, 8.0, 2.0, 7.0])
    stn = np.array([0, 0, 0, 0, 1, 1, 3])
    out = st.equal_share(req, stn, np.array([12.0, 0.0, 50.0, 7.0]))
    np.testing.assert_allclose(out, [4.0, 4.0, 4.0, 0.0, 0.0, 0.0, 7.0], rtol=1e-15)
    # everyone within the limit: a copy of the requests
    cap = np.array([100.0, 100.0, 0.0, 100.0])
    out = st.equal_share(req, stn, cap)
    np.testing.assert_array_equal(out, req)
    assert out is not req
    assert st.equal_share(np.zeros(0), np.zeros(0, dtype=np.int64), cap).shape == (0,)
    # a huge station, most of it served (λ is then a small difference of large sums): exact to a few ulps
    rng = np.random.default_rng(3)
    req = rng.uniform(0, 22, 20_000)
    stn = np.zeros(20_000, dtype=np.int64)
    for share in (0.9, 0.99999):
        cap = np.array([share * req.sum()])
        out = st.equal_share(req, stn, cap)
        np.testing.assert_allclose(out, _ref_equal_share(req, stn, cap), rtol=1e-14)


@pytest.mark.parametrize("stn", [np.array([0]), np.array([0, -1]), np.array([0, 3])])
def test_equal_share_rejects_stations_it_cannot_index(stn):
    """The kernel indexes without bounds checks: a wrong length or an out-of-range station is refused first."""
    with pytest.raises(ValueError, match="station: expected"):
        st.equal_share(np.array([1.0, 2.0]), stn, np.array([1.0, 1.0, 1.0]))


def _ref_llf(req, stn, cap, frac, c, e, always_on=None):
    """Per station, Python's sort by (-urgency, e, row); the first round(fraction * n), and those always_on
    marks, charge while their running sum (in that order) stays within the limit."""
    urg = [(-1.0 if ci <= 0 else (ci / ei if ei > 0 else np.inf)) for ci, ei in zip(c, e)]
    out = np.zeros(len(req))
    for s in range(cap.shape[0]):
        rows = sorted(np.flatnonzero(stn == s), key=lambda i: (-urg[i], e[i], i))
        n_on = int(np.rint(frac[s] * len(rows)))
        cum = 0.0
        for i in [i for k, i in enumerate(rows) if k < n_on or (always_on is not None and always_on[i])]:
            cum += req[i]
            if cum <= cap[s] * (1 + 1e-12):
                out[i] = req[i]
    return out


@settings(max_examples=300, deadline=None)
@given(seed=hst.integers(0, 2**32 - 1), n=hst.integers(0, 300), m=hst.integers(1, 12), levels=hst.booleans(),
       skew=hst.booleans(), forced=hst.booleans())
def test_llf_matches_sorted_reference(seed, n, m, levels, skew, forced):
    rng = np.random.default_rng(seed)
    req, stn, cap = _random_fleet(rng, n, m, levels, skew)
    frac = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], cap.shape[0])
    c = rng.integers(-2, 12, n)
    e = rng.integers(-3, 20, n)
    always_on = rng.random(n) < 0.2 if forced else None  # the deadline shield's EVs
    out = st.llf_dispatch(req, stn, cap, frac, c, e, always_on)
    np.testing.assert_array_equal(out, _ref_llf(req, stn, cap, frac, c, e, always_on))


@settings(max_examples=200, deadline=None)
@given(seed=hst.integers(0, 2**32 - 1), n=hst.integers(0, 40), m=hst.integers(1, 5))
def test_llf_on_off_respects_limit_fraction_and_order(seed, n, m):
    rng = np.random.default_rng(seed)
    req = rng.uniform(1, 11, n)
    stn = rng.integers(0, m, n)
    cap = rng.uniform(0, 60, m)
    frac = rng.choice([0.0, 0.25, 0.5, 1.0], m)
    c = rng.integers(0, 8, n)
    e = rng.integers(0, 12, n)
    out = st.llf_dispatch(req, stn, cap, frac, c, e)
    on = out > 0
    # on/off: full request or nothing
    assert np.allclose(out[on], req[on])
    for s in range(m):
        sel = stn == s
        assert out[sel].sum() <= cap[s] + 1e-9
        assert on[sel].sum() <= round(frac[s] * sel.sum())
        # nobody idles while a less urgent EV of the same station charges (urgency c/e, ties smaller e)
        urg = np.where(e > 0, c / np.maximum(e, 1), np.inf)
        urg = np.where(c > 0, urg, -1.0)
        if on[sel].any() and (~on[sel]).any():
            worst_on = min(zip(-urg[sel & on], e[sel & on]), key=lambda x: (-x[0], -x[1]))
            for u, ee, r in zip(urg[sel & ~on], e[sel & ~on], req[sel & ~on]):
                more_urgent = (u, -ee) > (-worst_on[0], -worst_on[1])
                # an idle more-urgent EV is only allowed when it did not fit under the limit
                if more_urgent:
                    assert r > cap[s] - out[sel].sum() + 1e-9 or on[sel].sum() >= round(frac[s] * sel.sum())


def test_llf_prefers_urgent_then_short_stay():
    req = np.full(4, 10.0)
    stn = np.zeros(4, dtype=np.int64)
    c = np.array([2, 4, 4, 1])
    e = np.array([8, 5, 4, 10])
    out = st.llf_dispatch(req, stn, np.array([20.0]), np.array([1.0]), c, e)
    # urgencies 0.25, 0.8, 1.0, 0.1: EVs 2 and 1 charge
    np.testing.assert_array_equal(out > 0, [False, True, True, False])


def test_count_matrix_counts_every_ev_once():
    rng = np.random.default_rng(1)
    c = rng.integers(0, 30, 500)
    e = rng.integers(0, 60, 500)
    stn = rng.integers(0, 4, 500)
    n = st.count_matrix(c, e, stn, 4, 8, 16)
    assert n.shape == (4, 9, 17)
    np.testing.assert_array_equal(n.sum(axis=(1, 2)), np.bincount(stn, minlength=4))
    assert n[:, 8, :].sum() == (np.minimum(c, 8) == 8).sum()


def test_charge_slots_round_up():
    c = fl.charge_slots(np.array([0.0, 1.0, 1.575, 1.576]), np.array([7.0] * 4), np.array([0.9] * 4), 0.25)
    np.testing.assert_array_equal(c, [0, 1, 1, 2])


@pytest.mark.parametrize("field,value", [("n_station", 0), ("ports", 0), ("p_max_kw", -1.0), ("dispatch", "fifo"),
                                         ("fraction_levels", (0.5, 1.5)), ("c_max", 0), ("e_max", 2),
                                         ("buses", (1, 2))])
def test_station_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        st.StationConfig(**{field: value})
