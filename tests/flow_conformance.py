"""Conformance tests every power-flow backend must pass.

A backend's test module subclasses :class:`BackendConformance` and sets
``make_backend`` (and, for slow backends, smaller budgets); the base class is
not collected on its own (its name does not start with ``Test``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from evgrid.grid.feeders import FEEDERS
from evgrid.grid.flow.base import FlowResult
from tests.conftest import feeder


class BackendConformance:
    make_backend = None  # callable(feeder) -> PowerFlowBackend
    feeders = FEEDERS
    max_examples = 30
    max_batch = 8

    def backend(self, name):
        return type(self).make_backend(feeder(name))

    @pytest.fixture(params=FEEDERS)
    def name(self, request):
        if request.param not in self.feeders:
            pytest.fail(f"{request.param} not declared for this backend")  # pragma: no cover
        return request.param

    def test_result_shapes(self, name):
        f = feeder(name)
        r = self.backend(name).solve(np.tile(f.base_p_kw, (3, 1)), np.tile(f.base_q_kvar, (3, 1)))
        assert isinstance(r, FlowResult)
        assert r.vm_pu.shape == r.va_deg.shape == (3, f.n_bus)
        assert r.line_loading.shape == (3, f.n_line)
        assert r.trafo_loading.shape == (3, f.n_trafo)
        for x in (r.loss_kw, r.slack_p_kw, r.slack_q_kvar, r.converged, r.iterations):
            assert x.shape == (3,)
        assert r.converged.dtype == np.bool_ and r.converged.all()

    def test_base_case_matches_pandapower_tables(self, name):
        """The feeder's own loads (no DER) solved by the backend equal pandapower's results on the net."""
        f = feeder(name)
        r = self.backend(name).solve(f.base_p_kw[None], f.base_q_kvar[None])
        net = f.net
        np.testing.assert_allclose(r.vm_pu[0], net.res_bus.vm_pu.loc[f.bus_ids], atol=1e-6)
        np.testing.assert_allclose(r.va_deg[0], net.res_bus.va_degree.loc[f.bus_ids], atol=1e-4)
        np.testing.assert_allclose(r.line_loading[0], net.res_line.loading_percent.loc[f.line_ids] / 100, atol=1e-5)
        if f.n_trafo:
            np.testing.assert_allclose(r.trafo_loading[0], net.res_trafo.loading_percent.loc[f.trafo_ids] / 100,
                                       atol=1e-5)
        assert r.slack_p_kw[0] == pytest.approx(net.res_ext_grid.p_mw.sum() * 1e3, abs=1e-2)

    def test_invariants_on_random_injections(self, name):
        f = feeder(name)
        be = self.backend(name)

        @settings(max_examples=self.max_examples, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.integers(1, self.max_batch).flatmap(lambda b: st.tuples(
            arrays(np.float64, (b, f.n_bus), elements=st.floats(-1.0, 2.0)),
            arrays(np.float64, (b, f.n_bus), elements=st.floats(-0.5, 2.0)))))
        def check(scale):
            sp, sq = scale
            p = sp * np.maximum(f.base_p_kw, 50.0)  # generation where the scale is negative
            q = sq * np.maximum(f.base_q_kvar, 20.0)
            r = be.solve(p, q)
            c = r.converged
            assert c.any(), "moderate injections must converge"
            assert np.isfinite(r.vm_pu[c]).all() and np.isfinite(r.va_deg[c]).all()
            assert (r.vm_pu[c] > 0).all()
            # energy balance: what the slack delivers = sum of net loads + losses
            np.testing.assert_allclose(r.slack_p_kw[c], p[c].sum(1) + r.loss_kw[c], rtol=0, atol=1e-6)
            assert (r.loss_kw[c] >= -1e-6).all()
            assert (r.line_loading[c] >= 0).all()
            assert np.isnan(r.vm_pu[~c]).all()

        check()

    def test_batch_equals_scenarios_solved_alone(self, name):
        f = feeder(name)
        be = self.backend(name)
        rng = np.random.default_rng(7)
        s = rng.uniform(0, 2, (5, f.n_bus))
        p, q = f.base_p_kw * s, f.base_q_kvar * s
        r = be.solve(p, q)
        for b in range(5):
            rb = be.solve(p[b:b + 1], q[b:b + 1])
            np.testing.assert_allclose(rb.vm_pu[0], r.vm_pu[b], atol=1e-7)
            np.testing.assert_allclose(rb.slack_p_kw[0], r.slack_p_kw[b], atol=1e-4)

    def test_nonconvergence_is_data(self, name):
        f = feeder(name)
        be = self.backend(name)
        heavy = np.maximum(f.base_p_kw, 100.0) * 200.0  # far past voltage collapse
        p = np.stack([f.base_p_kw, heavy])
        q = np.stack([f.base_q_kvar, heavy * 0.5])
        r = be.solve(p, q)
        assert r.converged.tolist() == [True, False]
        assert np.isnan(r.vm_pu[1]).all() and np.isnan(r.slack_p_kw[1])
        assert np.isfinite(r.vm_pu[0]).all()

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_non_finite_input_names_the_field(self, name, bad):
        f = feeder(name)
        be = self.backend(name)
        p = np.tile(f.base_p_kw, (2, 1))
        q = np.tile(f.base_q_kvar, (2, 1))
        p_bad = p.copy()
        p_bad[1, 3] = bad
        with pytest.raises(ValueError, match=r"p_kw: expected finite values.*scenario 1, bus position 3"):
            be.solve(p_bad, q)
        q_bad = q.copy()
        q_bad[0, 2] = bad
        with pytest.raises(ValueError, match=r"q_kvar: expected finite"):
            be.solve(p, q_bad)

    def test_wrong_shape_names_the_field(self, name):
        f = feeder(name)
        be = self.backend(name)
        with pytest.raises(ValueError, match=rf"p_kw: expected shape \(batch, {f.n_bus}\)"):
            be.solve(f.base_p_kw, f.base_q_kvar)  # 1-D: batch axis missing
        with pytest.raises(ValueError, match="p_kw: expected shape"):
            be.solve(np.zeros((2, f.n_bus + 1)), np.zeros((2, f.n_bus + 1)))
        with pytest.raises(ValueError, match="q_kvar: expected shape"):
            be.solve(np.zeros((2, f.n_bus)), np.zeros((3, f.n_bus)))
        with pytest.raises(ValueError, match="empty batch"):
            be.solve(np.zeros((0, f.n_bus)), np.zeros((0, f.n_bus)))
