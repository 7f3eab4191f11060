"""Station dispatch rules on random fleets: limits hold, nothing is invented, LLF order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

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
    c = st.charge_slots(np.array([0.0, 1.0, 1.575, 1.576]), np.array([7.0] * 4), np.array([0.9] * 4), 0.25)
    np.testing.assert_array_equal(c, [0, 1, 1, 2])


@pytest.mark.parametrize("field,value", [("n_station", 0), ("ports", 0), ("p_max_kw", -1.0), ("dispatch", "fifo"),
                                         ("fraction_levels", (0.5, 1.5)), ("c_max", 0), ("e_max", 2),
                                         ("buses", (1, 2))])
def test_station_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        st.StationConfig(**{field: value})
