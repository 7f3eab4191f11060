"""The in-process grid service (:class:`evgrid.grid.service.LocalGrid`) and its warm-start policy."""

from __future__ import annotations

import numpy as np
import pytest

from evgrid.grid.service import LocalGrid, WarmStarts
from tests.grid_service_conformance import GridServiceConformance, case, heavy_request, requests


class TestLocalGrid(GridServiceConformance):
    @pytest.fixture
    def service(self, case):
        return LocalGrid(case.feeders, case.grid)


def test_local_grid_needs_a_grid_config():
    with pytest.raises(TypeError, match="grid: expected a GridConfig"):
        LocalGrid(case("ieee33").feeders, {"feeder": "ieee33"})


def test_warm_starts_keep_converged_batches_of_the_same_size_lru_bounded():
    c = case("ieee33")
    grid = LocalGrid(c.feeders, c.grid)
    fd = c.feeders[0]
    rng = np.random.default_rng(0)
    flows = [grid.solvers[0].backend.solve(*requests(fd, b, rng)[:2]) for b in (2, 2, 3)]
    warm = WarmStarts(max_size=2)
    for key, flow in zip("abc", flows):
        warm.put(key, flow)
    assert len(warm) == 2 and warm.get("a", 2) is None  # the least recently used went
    assert warm.get("b", 2) is flows[1] and warm.get("b", 3) is None  # another batch size: cold
    warm.put("b", grid.solvers[0].backend.solve(*heavy_request(fd)[:2]))  # not converged: dropped
    assert warm.get("b", 2) is None and len(warm) == 1
    assert warm.drop_where(lambda key: key != "c") == 1 and len(warm) == 0
    with pytest.raises(ValueError, match=r"max_size: expected an integer in \[1, inf\]"):
        WarmStarts(0)


def test_flex_gen_may_be_left_out():
    """Callers without generation to curtail (``flex_gen_kw`` None) get what zeros give."""
    c = case("ieee33_pv")
    rng = np.random.default_rng(1)
    a, b = LocalGrid(c.feeders, c.grid), LocalGrid(c.feeders, c.grid)
    for _ in range(2):
        p, q, fc, fv, _fg = requests(c.feeders[0], 3, rng)
        got, want = a.solve(0, p, q, fc, fv), b.solve(0, p, q, fc, fv, np.zeros_like(p))
        np.testing.assert_array_equal(got.flow.vm_pu, want.flow.vm_pu)
        assert not got.gen_curtail_kw.any()
