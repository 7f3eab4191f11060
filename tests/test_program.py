"""The sparse program layer the OPF is built on: expressions against dense numpy, optima known in closed form
on every solver, statuses, integrality, and re-solving after :meth:`Program.fix`."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from evgrid.grid.program import Program, Quadratic, stack

SOLVERS = ("HIGHS", "CLARABEL", "SCS")


def _dense(e, n):
    M = e.M.toarray()
    return np.pad(M, ((0, 0), (0, n - M.shape[1]))), e.c


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_affine_arithmetic_matches_dense_numpy(seed):
    rng = np.random.default_rng(seed)
    p = Program()
    x, y = p.var(4), p.var(3)
    X, Y = np.eye(7)[:4], np.eye(7)[4:]
    A = sp.random(4, 3, density=0.6, random_state=rng, format="csr")
    a, c = rng.normal(size=4), rng.normal(size=4)
    e = 2.0 * x - a * (A @ y) + c - (x / 3.0)
    z = rng.normal(size=7)
    M, k = _dense(e, 7)
    want = 2 * X @ z - a * (A.toarray() @ Y @ z) + c - X @ z / 3
    assert np.allclose(M @ z + k, want)
    idx = np.array([3, 0, 0])
    M2, k2 = _dense(e[idx], 7)
    assert np.allclose(M2 @ z + k2, want[idx])
    M3, k3 = _dense(stack([e, y]).sum(), 7)
    assert np.allclose(M3 @ z + k3, want.sum() + z[4:].sum())
    M4, k4 = _dense(c - x, 7)  # ndarray on the left defers to the expression
    assert np.allclose(M4 @ z + k4, c - z[:4])


@pytest.mark.parametrize("solver", SOLVERS)
def test_lp_optimum_on_every_solver(solver):
    # max x + 2y s.t. x + y <= 4, x <= 3, y <= 2.5, x, y >= 0: y = 2.5, x = 1.5, value 6.5
    p = Program()
    x = p.var(2, lb=0.0, ub=[3.0, 2.5])
    p.le(x.sum(), 4.0)
    p.minimize([Quadratic(-(np.array([1.0, 2.0]) * x).sum())])
    assert p.solve(solver) == "optimal"
    assert np.allclose(p.x, [1.5, 2.5], atol=1e-4)
    assert p.objective.value(p.x) == pytest.approx(-6.5, abs=1e-4)


@pytest.mark.parametrize("solver", SOLVERS)
def test_qp_optimum_on_every_solver(solver):
    # min (x - 3)² + (y + 1)² s.t. x + y == 1: x = 2.5, y = -1.5
    p = Program()
    x = p.var(2)
    p.eq(x.sum(), 1.0)
    p.minimize([Quadratic(squares=[(1.0, x - np.array([3.0, -1.0]))])])
    assert p.solve(solver) == "optimal"
    assert np.allclose(p.x, [2.5, -1.5], atol=1e-4)
    assert p.objective.value(p.x) == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("solver", ("CLARABEL", "SCS"))
def test_second_order_cones(solver):
    # min t0 + t1 s.t. ||(3, 4)|| <= t0, ||(x, 1)|| <= t1 with x free: t0 = 5, x = 0, t1 = 1
    p = Program()
    t, x = p.var(2), p.var(1)
    p.soc(t, stack([p.var(1, 3.0, 3.0), x]), np.array([4.0, 1.0]) + 0.0 * t)
    p.minimize([Quadratic(t.sum())])
    assert p.solve(solver) == "optimal"
    assert np.allclose(p.x[:2], [5.0, 1.0], atol=1e-3)


def test_highs_refuses_cones_and_conic_solvers_refuse_integers():
    p = Program()
    t = p.var(1)
    p.soc(t, t)
    with pytest.raises(ValueError, match="HiGHS solves no second-order cones"):
        p.solve("HIGHS")
    q = Program()
    q.var(1, 0, 3, integer=True)
    with pytest.raises(ValueError, match="integer variables need HIGHS"):
        q.solve("CLARABEL")


def test_integer_variables_take_whole_values():
    # max x s.t. 2 x <= 5, x integer: 2 (the relaxation: 2.5)
    p = Program()
    x = p.var(1, 0.0, 10.0, integer=True)
    p.le(2.0 * x, 5.0)
    p.minimize([Quadratic(-x.sum())])
    assert p.solve("HIGHS") == "optimal" and p.x[0] == pytest.approx(2.0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_and_unbounded_are_statuses(solver):
    p = Program()
    x = p.var(1, lb=0.0)
    p.le(x, -1.0)
    assert p.solve(solver) == "infeasible" and p.x is None
    q = Program()
    y = q.var(1)
    q.le(y, 5.0)
    q.minimize([Quadratic(y.sum())])
    assert q.solve(solver) in ("unbounded", "infeasible")


@pytest.mark.parametrize("solver", ("HIGHS", "CLARABEL"))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_resolving_after_fix_equals_a_fresh_program(solver, seed):
    """The OPF's AC rounds re-solve after fixing constants: the cached matrices (and Clarabel's reused
    factorisation structure) give what a program built from scratch with those constants gives."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(0.5, 2.0, (3, 5))
    cost = rng.uniform(0.1, 1.0, 5)

    def build(k0):
        p = Program()
        x = p.var(5, 0.0, 1.0)
        k = p.var(3, k0, k0)  # constants as fixed variables
        p.ge(A @ x, k)
        p.minimize([Quadratic((cost * x).sum(), [(0.1, x)])])
        return p, k

    p, k = build(np.full(3, 0.5))
    assert p.solve(solver) == "optimal"
    new = rng.uniform(0.2, 1.5, 3)
    p.fix(k, new)
    assert p.solve(solver) == "optimal"
    fresh, _ = build(new)
    assert fresh.solve(solver) == "optimal"
    assert np.allclose(p.x, fresh.x, atol=1e-6)
