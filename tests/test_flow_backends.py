"""Every backend against the conformance suite, plus backend-specific behaviour."""

from __future__ import annotations

import copy

import numpy as np
import pandapower as pp
import pytest

from evgrid.grid.feeders import MeshedFeederError, feeder_from_net
from evgrid.grid.flow import PandapowerBackend, SweepBackend, make_backend
from tests.conftest import feeder
from tests.flow_conformance import BackendConformance


class TestSweepBackend(BackendConformance):
    make_backend = SweepBackend


class TestSweepBackendThreaded(BackendConformance):
    make_backend = staticmethod(lambda f: SweepBackend(f, threads=2))
    max_examples = 10
    max_batch = 40  # > one chunk, so the parallel kernel runs


class TestPandapowerBackend(BackendConformance):
    make_backend = PandapowerBackend
    max_examples = 8  # runpp costs ~20 ms a scenario
    max_batch = 3


def test_warm_start_converges_to_the_same_solution_in_fewer_sweeps():
    f = feeder("ieee33")
    be = SweepBackend(f)
    rng = np.random.default_rng(3)
    s = rng.uniform(0, 2, (64, f.n_bus))
    s2 = s * rng.uniform(0.97, 1.03, s.shape)
    first = be.solve(f.base_p_kw * s, f.base_q_kvar * s)
    cold = be.solve(f.base_p_kw * s2, f.base_q_kvar * s2)
    warm = be.solve(f.base_p_kw * s2, f.base_q_kvar * s2, init=first)
    np.testing.assert_allclose(warm.vm_pu, cold.vm_pu, atol=2e-7)
    assert warm.iterations.mean() < cold.iterations.mean()


def test_warm_start_state_must_match_the_batch():
    f = feeder("ieee33")
    be = SweepBackend(f)
    r = be.solve(np.tile(f.base_p_kw, (2, 1)), np.tile(f.base_q_kvar, (2, 1)))
    with pytest.raises(ValueError, match="init: warm start from a batch of 2"):
        be.solve(np.tile(f.base_p_kw, (3, 1)), np.tile(f.base_q_kvar, (3, 1)), init=r)


def test_sweep_options_are_validated():
    f = feeder("ieee33")
    with pytest.raises(ValueError, match="tol_pu"):
        SweepBackend(f, tol_pu=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        SweepBackend(f, max_iter=0)
    with pytest.raises(ValueError, match="threads"):
        SweepBackend(f, threads=0)
    with pytest.raises(ValueError, match="backend: unknown backend 'newton'"):
        make_backend(f, "newton")


def _meshed_ieee33():
    net = copy.deepcopy(feeder("ieee33").net)
    net.line.loc[net.line.index[~net.line.in_service][0], "in_service"] = True  # close one tie line
    return net


def test_meshed_feeder_is_rejected_naming_the_loop_and_falls_back_to_pandapower():
    f = feeder_from_net(_meshed_ieee33(), "ieee33_meshed")
    assert f.tree is None and "loop through bus" in f.mesh_error
    with pytest.raises(MeshedFeederError, match=r"loop through bus \d+ -> .* -> bus \d+"):
        SweepBackend(f)
    be = make_backend(f, "auto")
    assert isinstance(be, PandapowerBackend)
    r = be.solve(f.base_p_kw[None], f.base_q_kvar[None])
    assert r.converged[0]
    # the closed tie raises the lowest voltage compared with the radial feeder
    radial = feeder("ieee33")
    assert r.vm_pu.min() > SweepBackend(radial).solve(radial.base_p_kw[None], radial.base_q_kvar[None]).vm_pu.min()


def test_open_switch_leaves_a_radial_feeder():
    """CIGRE MV's open switches S1-S3 make its ring radial; closing one meshes it."""
    assert feeder("cigre_mv").tree is not None
    net = copy.deepcopy(feeder("cigre_mv").net)
    net.switch.loc[net.switch.name == "S1", "closed"] = True
    pp.runpp(net)
    assert feeder_from_net(net, "cigre_closed").tree is None
