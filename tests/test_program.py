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
    assert p.dual_objective == pytest.approx(-6.5, abs=1e-4), "strong duality: the dual bound meets the optimum"


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
    if solver == "HIGHS":  # its QP duals are not read (the OPF's QPs go to Clarabel or to solve_cuts)
        assert p.dual_objective is None
    else:
        assert p.dual_objective == pytest.approx(0.5, abs=1e-4)


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


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_cutting_planes_reach_the_qp_optimum_with_rows_added_only_once_broken(seed):
    """min Σ w_k (x_k - a_k)² + c·x over x in [0, 10]^n with Σ x >= s, and rows x_k <= u_k that ``separate``
    adds only when broken: the cutting-plane solve meets Clarabel's optimum of the program with every row
    from the start."""
    rng = np.random.default_rng(seed)
    n = 6
    w, a, c = rng.uniform(0.5, 2.0, n), rng.uniform(0, 8, n), rng.uniform(-1, 1, n)
    u, s = rng.uniform(2, 9, n), rng.uniform(5, 20)

    def build(all_rows: bool):
        p = Program()
        x = p.var(n, 0.0, 10.0)
        p.ge(x.sum(), s)
        if all_rows:
            p.le(x, u)
        p.minimize([Quadratic((c * x).sum(), [(wk, x[[k]] - a[k]) for k, wk in enumerate(w)])])
        return p, x

    added = []

    def separate(v):
        k = np.flatnonzero(v[:n] > u + 1e-9)
        added.extend(k)
        return [(x[k], u[k])] if k.size else []

    ref, _ = build(True)
    ref.solve("CLARABEL", {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10})
    p, x = build(False)
    assert p.solve_cuts(separate, rel_gap=1e-9) == "optimal"
    truth = lambda v: float(np.sum(w * (v[:n] - a) ** 2) + c @ v[:n])  # noqa: E731
    assert truth(p.x) == pytest.approx(truth(ref.x), rel=1e-6, abs=1e-7)
    assert (p.x[:n] <= u + 1e-6).all() and p.x[:n].sum() >= s - 1e-6
    assert len(set(added)) == len(added), "a row is added once"
    assert ref.dual_objective == pytest.approx(truth(ref.x), rel=1e-7, abs=1e-7)
    # the last relaxation's dual bound is below the optimum, and within the gap asked of the solution
    assert p.dual_objective <= truth(ref.x) + 1e-7
    assert p.objective_at(p.x) - p.dual_objective <= 1e-9 * abs(p.objective_at(p.x)) + 1e-7
    assert not p.objective.squares, "the squares became epigraphs under tangents"


def test_cutting_planes_report_an_infeasible_cut_program():
    p = Program()
    x = p.var(2, 0.0, 5.0)
    p.ge(x.sum(), 5.2)
    p.minimize([Quadratic(x.sum())])
    assert p.solve_cuts(lambda v: [(x[[0]], np.array([0.5]))] if v[0] > 0.5 + 1e-9 else []) == "optimal"
    assert p.x[0] <= 0.5 + 1e-9 and p.x[:2].sum() == pytest.approx(5.2)
    q = Program()
    y = q.var(2, 0.0, 5.0)
    q.ge(y.sum(), 5.2)
    q.minimize([Quadratic(y.sum())])
    assert q.solve_cuts(lambda v: [(y.sum(), np.array([5.0]))] if v[:2].sum() > 5.0 else []) == "infeasible"
