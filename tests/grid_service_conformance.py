"""Conformance tests every grid service (:class:`evgrid.grid.service.GridService`) must pass.

A service's test module subclasses :class:`GridServiceConformance` and defines the fixture ``service``:
the service for ``case.grid`` (whose feeders are ``case.feeders``), fresh for each test.  ``cases``
names the grid configurations it serves (default: all of :data:`CASES`).  The base class is not
collected on its own (its name does not start with ``Test``).

What a service must do is what :class:`~evgrid.grid.service.FeederSolver` does for one request:
``backend.solve`` warm-started from the key's last solution of the same batch size (none after a
reset, after a batch with a non-converged scenario, or for another batch size), then ``enforce``.
:func:`reference` writes that out independently and the answers must agree to the last bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evgrid.grid.config import GridConfig
from evgrid.grid.feeders import Feeder
from evgrid.grid.flow.base import FlowResult
from evgrid.grid.service import FeederSolver, GridSolution, build_feeders

CASES = {
    "ieee33": GridConfig(),
    # seed 003's PV and wind on IEEE 33, exporting at most 200 kW: midday output curtailed
    "ieee33_pv": GridConfig(der=True, export_limit_kw=200.0),
    "city2": GridConfig(feeder="city", city_networks=2),
    "ieee33_unenforced": GridConfig(enforce_limits=False),
}
_FLOW_FIELDS = ("vm_pu", "va_deg", "line_loading", "trafo_loading", "loss_kw", "slack_p_kw", "slack_q_kvar",
                "converged", "iterations")


@dataclass(frozen=True)
class Case:
    name: str
    grid: GridConfig
    feeders: list[Feeder]


@functools.cache
def case(name: str) -> Case:
    """Feeders are immutable once built: build each case's once per session."""
    return Case(name, CASES[name], build_feeders(CASES[name]).feeders)


def requests(feeder: Feeder, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw of a random batch, each scenario an evening
    (base load 0.6..1.3 x nominal, EV charging up to 250 kW at ~40 % of buses: under-voltage, charging
    curtailed) or a midday (load 0.1..0.6 x nominal, little charging, PV / wind at 60..100 % of their
    rating: over-voltage and export, output curtailed); V2G up to 40 kW.  Generation sits at the feeder's
    DER sites, elsewhere at ~20 % of buses."""
    shape = (batch, feeder.n_bus)
    midday = rng.random((batch, 1)) < 0.5
    level = np.where(midday, rng.uniform(0.1, 0.6, (batch, 1)), rng.uniform(0.6, 1.3, (batch, 1)))
    level = level * rng.uniform(0.8, 1.2, shape)
    flex_c = rng.uniform(0.0, 250.0, shape) * (rng.random(shape) < 0.4) * np.where(midday, 0.2, 1.0)
    flex_v = rng.uniform(0.0, 40.0, shape)
    gen_max = np.zeros(feeder.n_bus)
    sites = [k for k, kind in enumerate(feeder.der_kind) if kind in ("pv", "wind")]
    if sites:
        np.add.at(gen_max, feeder.der_bus[sites], feeder.der_p_max_kw[sites])
    else:
        gen_max = 300.0 * (rng.random(feeder.n_bus) < 0.2)
    flex_g = gen_max * np.where(midday, rng.uniform(0.6, 1.0, (batch, 1)), rng.uniform(0.0, 0.2, (batch, 1)))
    p = feeder.base_p_kw * level + flex_c - flex_g
    return p, feeder.base_q_kvar * level, flex_c, flex_v, flex_g


def heavy_request(feeder: Feeder) -> tuple[np.ndarray, ...]:
    """Two scenarios, the second far past voltage collapse with nothing to curtail: it cannot converge."""
    p = np.stack([feeder.base_p_kw, np.maximum(feeder.base_p_kw, 100.0) * 200.0])
    q = np.stack([feeder.base_q_kvar, p[1] * 0.5])
    zero = np.zeros_like(p)
    return p, q, zero, zero, zero


class Reference:
    """One feeder solved as the contract says, written out: the last converged batch warm-starts the next
    of the same size."""

    def __init__(self, feeder: Feeder, grid: GridConfig) -> None:
        self.solver = FeederSolver(feeder, grid)
        self.last: FlowResult | None = None

    def reset(self) -> None:
        self.last = None

    def solve(self, *arrays: np.ndarray) -> GridSolution:
        last = self.last
        init = last if last is not None and last.batch == arrays[0].shape[0] else None
        flow = self.solver.backend.solve(arrays[0], arrays[1], init=init)
        sol = self.solver.enforce(*arrays, flow)
        self.last = sol.flow if sol.flow.converged.all() else None
        return sol


def assert_identical(got: GridSolution, want: GridSolution, where: str = "") -> None:
    """Equal to the last bit (NaN where NaN), the flow's warm-start state aside."""
    for name in _FLOW_FIELDS:
        np.testing.assert_array_equal(getattr(got.flow, name), getattr(want.flow, name), err_msg=f"{where}{name}")
    for name in ("curtail_kw", "v2g_kw", "gen_curtail_kw", "vm_dispatch_pu"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"{where}{name}")


def assert_physical(sol: GridSolution, arrays: tuple[np.ndarray, ...], tol_kw: float = 1e-6) -> None:
    """Enforcement within its levers' bounds; slack power = net load after enforcement + losses."""
    p, _, flex_c, flex_v, flex_g = arrays
    for name, x, cap in (("curtail_kw", sol.curtail_kw, flex_c), ("v2g_kw", sol.v2g_kw, flex_v),
                         ("gen_curtail_kw", sol.gen_curtail_kw, flex_g)):
        assert (x >= 0.0).all(), f"{name} < 0"
        assert (x <= cap + 1e-9 * np.maximum(cap, 1.0)).all(), f"{name} above its flexibility"
    c = sol.flow.converged
    p_after = p - sol.curtail_kw - sol.v2g_kw + sol.gen_curtail_kw
    scale = 1.0 + np.abs(p_after[c]).sum(1)
    np.testing.assert_allclose(sol.flow.slack_p_kw[c], p_after[c].sum(1) + sol.flow.loss_kw[c], rtol=0,
                               atol=tol_kw * scale.max())
    assert (sol.flow.loss_kw[c] >= -1e-6).all()
    assert np.isfinite(sol.flow.vm_pu[c]).all() and np.isnan(sol.flow.vm_pu[~c]).all()


class GridServiceConformance:
    cases: tuple[str, ...] = tuple(CASES)
    max_examples = 12

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", [case(n) for n in self.cases], ids=list(self.cases))

    def test_single_requests_equal_the_feeder_solver_bit_for_bit(self, service, case):
        """Consecutive steps (warm), a batch-size change (cold), a non-converged batch (the next is cold), a
        reset (cold): on every feeder, every answer is the reference's to the last bit."""
        rng = np.random.default_rng(11)
        refs = [Reference(f, case.grid) for f in case.feeders]
        plan = [3, 3, 3, 1, 1, "heavy", 2, 2, "reset", 2, 2]
        warm_used = 0
        for t, step in enumerate(plan):
            if step == "reset":
                service.reset()
                for ref in refs:
                    ref.reset()
                continue
            for f, (fd, ref) in enumerate(zip(case.feeders, refs)):
                arrays = heavy_request(fd) if step == "heavy" else requests(fd, step, rng)
                got = service.submit(f, *arrays).result()
                warm_used += ref.last is not None and ref.last.batch == arrays[0].shape[0]
                assert_identical(got, ref.solve(*arrays), f"step {t} feeder {f}: ")
        assert warm_used >= 4 * len(case.feeders), "the plan must exercise warm starts"

    def test_reset_makes_the_next_solve_cold(self, service, case):
        rng = np.random.default_rng(12)
        fd = case.feeders[-1]
        f = len(case.feeders) - 1
        first, second = requests(fd, 4, rng), requests(fd, 4, rng)
        service.submit(f, *first).result()
        service.reset()
        cold = Reference(fd, case.grid)
        assert_identical(service.submit(f, *second).result(), cold.solve(*second))

    def test_another_batch_size_starts_cold(self, service, case):
        rng = np.random.default_rng(13)
        fd = case.feeders[0]
        service.submit(0, *requests(fd, 4, rng)).result()
        other = requests(fd, 5, rng)
        assert_identical(service.submit(0, *other).result(), Reference(fd, case.grid).solve(*other))

    def test_result_shapes(self, service, case):
        rng = np.random.default_rng(14)
        for f, fd in enumerate(case.feeders):
            sol = service.submit(f, *requests(fd, 3, rng)).result()
            assert isinstance(sol, GridSolution) and isinstance(sol.flow, FlowResult)
            for x in (sol.flow.vm_pu, sol.flow.va_deg, sol.curtail_kw, sol.v2g_kw, sol.gen_curtail_kw,
                      sol.vm_dispatch_pu):
                assert x.shape == (3, fd.n_bus)
            assert sol.flow.line_loading.shape == (3, fd.n_line)
            assert sol.flow.trafo_loading.shape == (3, fd.n_trafo)
            for x in (sol.flow.loss_kw, sol.flow.slack_p_kw, sol.flow.slack_q_kvar, sol.flow.converged,
                      sol.flow.iterations):
                assert x.shape == (3,)
            assert sol.flow.converged.dtype == np.bool_

    def test_physics_on_random_requests(self, service, case):
        """Enforcement within bounds and energy balance on random batches, warm and cold; enforcement
        must have acted (curtailing charging, and generation where the feeder has PV)."""
        acted = {"curtail_kw": 0.0, "v2g_kw": 0.0, "gen_curtail_kw": 0.0}

        @settings(max_examples=self.max_examples, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.integers(0, 2 ** 32 - 1), st.integers(1, 6), st.booleans())
        def check(seed, batch, reset):
            rng = np.random.default_rng(seed)
            if reset:
                service.reset()
            for f, fd in enumerate(case.feeders):
                arrays = requests(fd, batch, rng)
                sol = service.submit(f, *arrays).result()
                assert_physical(sol, arrays)
                for name in acted:
                    acted[name] += float(getattr(sol, name).sum())

        check()
        if case.grid.enforce_limits:
            assert acted["curtail_kw"] > 0 and acted["v2g_kw"] > 0
            assert acted["gen_curtail_kw"] > 0 or not case.grid.der
        else:
            assert not any(acted.values())

    def test_nonconvergence_is_data(self, service, case):
        for f, fd in enumerate(case.feeders):
            sol = service.submit(f, *heavy_request(fd)).result()
            assert sol.flow.converged.tolist() == [True, False]
            assert np.isnan(sol.flow.vm_pu[1]).all() and np.isnan(sol.flow.slack_p_kw[1])
            assert np.isfinite(sol.flow.vm_pu[0]).all()

    def test_bad_input_names_the_field(self, service, case):
        fd = case.feeders[0]
        good = requests(fd, 2, np.random.default_rng(15))
        names = ("p_kw", "q_kvar", "flex_charge_kw", "flex_v2g_kw", "flex_gen_kw")

        def bad(i: int, x: np.ndarray) -> tuple[np.ndarray, ...]:
            return tuple(x if j == i else a for j, a in enumerate(good))

        for i, name in enumerate(names):
            with pytest.raises(ValueError, match=rf"{name}: expected shape"):
                service.submit(0, *bad(i, good[i][:, :-1])).result()
            nan = good[i].copy()
            nan[1, 2] = np.nan
            with pytest.raises(ValueError, match=rf"{name}: expected finite"):
                service.submit(0, *bad(i, nan)).result()
        with pytest.raises(ValueError, match=r"q_kvar: expected shape \(2, \d+\) like p_kw"):
            service.submit(0, *bad(1, good[1][:1])).result()
        for i, name in enumerate(names[2:], start=2):
            neg = good[i].copy()
            neg[0, 1] = -1.0
            with pytest.raises(ValueError, match=rf"{name}: expected values >= 0"):
                service.submit(0, *bad(i, neg)).result()
        for f in (len(case.feeders), -1, 0.5):
            with pytest.raises(ValueError, match=rf"f: expected an integer in \[0, {len(case.feeders) - 1}\]"):
                service.submit(f, *good).result()
        # and the service carries on
        assert service.submit(0, *good).result().flow.converged.all()
