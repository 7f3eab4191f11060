"""Limit enforcement: fixes what controllable load can fix, reports the rest."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evgrid.grid.feeders import build_feeder
from evgrid.grid.flow import SweepBackend
from evgrid.grid.limits import LimitEnforcer
from tests.conftest import feeder


def _enforcer(name):
    return LimitEnforcer(SweepBackend(feeder(name)))


def _within_limits(f, r):
    return (r.converged & (r.vm_pu >= f.v_min_pu).all(1) & (r.line_loading <= 1.0).all(1)
            & (r.trafo_loading <= 1.0).all(1))


@pytest.mark.parametrize("name", ["ieee33", "feeder14", "cigre_mv"])
def test_restores_limits_whenever_enough_controllable_load_exists(name):
    f = feeder(name)
    enf = _enforcer(name)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**32 - 1), base=st.floats(0.1, 0.7), ev_kw=st.floats(100.0, 3000.0),
           share=st.floats(0.1, 1.0))
    def check(seed, base, ev_kw, share):
        rng = np.random.default_rng(seed)
        B = 16
        ev = rng.uniform(0, 1, (B, f.n_bus)) * (rng.uniform(0, 1, (B, f.n_bus)) < share) * ev_kw
        p0 = np.tile(base * f.base_p_kw, (B, 1))
        q = np.tile(base * f.base_q_kvar, (B, 1))
        e = enf.enforce(p0 + ev, q, ev)
        feasible = _within_limits(f, enf.backend.solve(p0, q))
        assert (e.violations[feasible] == 0).all()
        assert _within_limits(f, e.flow)[feasible].all()
        # never more than what was controllable, never negative
        assert (e.curtail_kw >= 0).all() and (e.curtail_kw <= ev + 1e-9).all()
        np.testing.assert_allclose(e.p_kw, p0 + ev - e.curtail_kw, atol=1e-9)

    check()


def test_nothing_changes_without_violations():
    f = feeder("feeder14")
    enf = _enforcer("feeder14")
    p = np.tile(0.5 * f.base_p_kw, (4, 1))
    q = np.tile(0.5 * f.base_q_kvar, (4, 1))
    flex = np.full_like(p, 10.0)
    flow = enf.backend.solve(p, q)
    e = enf.enforce(p, q, flex, flex, flow=flow)
    assert e.flow is flow
    assert (e.curtail_kw == 0).all() and (e.v2g_kw == 0).all() and (e.rounds == 0).all()
    np.testing.assert_array_equal(e.p_kw, p)


def test_violation_from_base_load_alone_is_reported_not_hidden():
    f = feeder("ieee33")  # nominal Baran-Wu load: lowest voltage 0.913 p.u. < 0.95
    enf = _enforcer("ieee33")
    p, q = f.base_p_kw[None], f.base_q_kvar[None]
    e = enf.enforce(p, q, np.zeros_like(p))
    assert e.undervoltage[0].sum() > 0 and e.violations[0] > 0
    assert (e.curtail_kw == 0).all()
    np.testing.assert_array_equal(e.p_kw, p)


def test_v2g_is_used_only_after_charging_is_curtailed():
    f = feeder("ieee33")
    enf = _enforcer("ieee33")
    p = 0.7 * f.base_p_kw[None]
    q = 0.7 * f.base_q_kvar[None]
    # the lowest voltage sits at bus 17; give buses 14-17 both levers: charging
    # alone cannot lift it (0.941 p.u. without it), full V2G can (0.960 p.u.)
    charge = np.zeros_like(p)
    charge[0, 14:18] = 20.0
    v2g = np.zeros_like(p)
    v2g[0, 14:18] = 300.0
    e = enf.enforce(p + charge, q, charge, v2g)
    assert e.violations[0] == 0
    np.testing.assert_allclose(e.curtail_kw[0, 14:18], 20.0)  # all charging went first
    assert e.v2g_kw.sum() > 0 and (e.v2g_kw <= v2g + 1e-9).all()


def test_line_overload_is_relieved_downstream():
    f = feeder("feeder14")
    enf = _enforcer("feeder14")
    p = 0.3 * f.base_p_kw[None].copy()
    q = 0.3 * f.base_q_kvar[None]
    ev = np.zeros_like(p)
    ev[0, f.bus_position(int(f.net.bus.index[f.net.bus.name == "13"][0]))] = 4000.0  # far above LGJ-50 rating
    r0 = enf.backend.solve(p + ev, q)
    assert r0.line_loading.max() > 1.0
    e = enf.enforce(p + ev, q, ev)
    assert e.overload.sum() == 0 and e.flow.line_loading.max() <= 1.0 + 1e-9
    assert 0 < e.curtail_kw.sum() < 4000.0


def test_bad_flexibility_input_names_the_field():
    f = feeder("feeder14")
    enf = _enforcer("feeder14")
    p, q = f.base_p_kw[None], f.base_q_kvar[None]
    with pytest.raises(ValueError, match="flex_charge_kw: expected values >= 0"):
        enf.enforce(p, q, -np.ones_like(p))
    with pytest.raises(ValueError, match="flex_v2g_kw: expected shape"):
        enf.enforce(p, q, np.zeros_like(p), np.zeros((2, f.n_bus)))
    with pytest.raises(ValueError, match="loading_max"):
        LimitEnforcer(enf.backend, loading_max=0.0)


@pytest.mark.parametrize("limit_kw", [0.0, 300.0])
def test_generation_beyond_the_export_limit_is_curtailed(limit_kw):
    """Random PV on IEEE 33 at light load: wherever curtailing all of it would respect the export limit, the
    enforced flow exports at most the limit, and never more PV is curtailed than there was."""
    f = feeder("ieee33")
    enf = LimitEnforcer(SweepBackend(f), export_limit_kw=limit_kw)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**32 - 1), base=st.floats(0.05, 0.5), pv_kw=st.floats(100.0, 6000.0))
    def check(seed, base, pv_kw):
        rng = np.random.default_rng(seed)
        B = 8
        pv = rng.dirichlet(np.ones(f.n_bus), B) * pv_kw  # (B, n_bus), each scenario pv_kw in all
        p = np.tile(base * f.base_p_kw, (B, 1)) - pv
        q = np.tile(base * f.base_q_kvar, (B, 1))
        e = enf.enforce(p, q, np.zeros_like(p), None, pv)
        assert (e.gen_curtail_kw >= 0).all() and (e.gen_curtail_kw <= pv + 1e-9).all()
        np.testing.assert_allclose(e.p_kw, p + e.gen_curtail_kw, atol=1e-9)
        export = -e.flow.slack_p_kw
        assert (export <= limit_kw + 1e-3).all() == (~e.over_export).all()
        # the scenarios that export at most the limit with all PV gone must end within it
        no_pv = -enf.backend.solve(p + pv, q).slack_p_kw <= limit_kw
        assert (export[no_pv] <= limit_kw + 1e-3).all()
        # nothing is curtailed where nothing was wrong
        r = enf.backend.solve(p, q)
        free = (-r.slack_p_kw <= limit_kw) & (r.vm_pu <= f.v_max_pu).all(1) & (r.line_loading <= 1.0).all(1)
        assert (e.gen_curtail_kw[free] == 0).all()

    check()


def test_overvoltage_from_pv_is_curtailed_near_its_cause():
    """PV at the end of a lateral lifts its voltage above v_max: curtailing there brings it back, and the
    units far from the violation keep more of their output."""
    f = build_feeder("ieee33", v_max_pu=1.02)
    enf = LimitEnforcer(SweepBackend(f))
    p = 0.1 * f.base_p_kw[None].copy()
    q = 0.1 * f.base_q_kvar[None]
    pv = np.zeros_like(p)
    far, near_slack = 17, 1  # bus positions: the end of the main trunk, next to the substation
    pv[0, far] = 1500.0
    pv[0, near_slack] = 1500.0
    assert enf.backend.solve(p - pv, q).vm_pu.max() > 1.02
    e = enf.enforce(p - pv, q, np.zeros_like(p), None, pv)
    assert e.overvoltage.sum() == 0 and e.flow.vm_pu.max() <= 1.02 + 1e-9
    assert e.gen_curtail_kw[0, far] > e.gen_curtail_kw[0, near_slack]
    assert (e.curtail_kw == 0).all()

