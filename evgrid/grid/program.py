"""Sparse linear, quadratic and second-order-cone programs assembled straight into solver matrices.

The OPF's rows are large sparse blocks (one row per step and node, per session and step), which numpy and scipy
build in a few vectorised operations.  A modelling layer such as cvxpy re-derives the same matrices through its
expression tree: ~25 ms for a single-period OPF on IEEE 33 and ~0.5 s for a day of 3,000 EVs, more than the
solver itself takes on the small problem.  Here an affine expression is a sparse matrix over the program's
variables plus a constant, and :meth:`Program.solve` hands the stacked rows to HiGHS, Clarabel or SCS in their
own formats, with variable bounds as HiGHS's column bounds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

log = logging.getLogger(__name__)

# Clarabel's default (faer, multithreaded) factorises the OPF's KKT systems ~10x slower than QDLDL on 2 cores;
# iterative refinement took 1.4 ms of a single-period OPF's 2.5 ms solve on IEEE 33 and moved its optimum by
# 2e-9 (relative); the OPF turns it back on when Clarabel reports a numerical error
DEFAULT_SETTINGS = {"CLARABEL": {"direct_solve_method": "qdldl", "iterative_refinement_enable": False},
                    "HIGHS": {"output_flag": False},
                    "SCS": {"verbose": False}}
OPTIMAL = ("optimal", "optimal_inaccurate")


class Affine:
    """``M @ x + c``: ``m`` rows over the first ``M.shape[1]`` variables of a :class:`Program` (variables
    added later have zero coefficients).  Arithmetic with scalars, (m,) arrays and (k, m) matrices (``A @ e``)
    is row-wise, as for a vector of length ``m``."""

    # ndarray op Affine -> Affine's reflected operator, not an elementwise object array; and no __len__, so that
    # numpy (and scipy's sparse @) see a scalar object, not a sequence, and defer to __rmatmul__
    __array_ufunc__ = None

    def __init__(self, M: sp.csr_matrix, c: npt.NDArray[np.float64]) -> None:
        self.M, self.c = M, c

    @property
    def size(self) -> int:
        return self.c.size

    def at(self, x: np.ndarray) -> np.ndarray:
        """The rows' values at the variables ``x`` (a program's solution, or longer)."""
        return self.M @ x[: self.M.shape[1]] + self.c

    def _pair(self, other: Affine) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        n = max(self.M.shape[1], other.M.shape[1])
        return _widen(self.M, n), _widen(other.M, n)

    def __add__(self, other) -> Affine:
        if isinstance(other, Affine):
            a, b = self._pair(other)
            return Affine((a + b).tocsr(), self.c + other.c)
        return Affine(self.M, self.c + _vec(other, self.size))

    __radd__ = __add__

    def __neg__(self) -> Affine:
        return Affine(-self.M, -self.c)

    def __sub__(self, other) -> Affine:
        return self + (-other)

    def __rsub__(self, other) -> Affine:
        return (-self) + other

    def __mul__(self, a) -> Affine:
        if np.ndim(a) == 0:
            return Affine(self.M * float(a), self.c * float(a))
        a = _vec(a, self.size)
        M = self.M.copy()
        M.data *= np.repeat(a, np.diff(M.indptr))  # row scaling in place of a diagonal product (~10x faster)
        return Affine(M, self.c * a)

    __rmul__ = __mul__

    def __truediv__(self, a: float) -> Affine:
        return self * (1.0 / a)

    def __rmatmul__(self, A) -> Affine:
        A = sp.csr_matrix(A)
        if A.shape[1] != self.size:
            raise ValueError(f"matrix with {A.shape[1]} columns applied to an expression of {self.size} rows")
        return Affine((A @ self.M).tocsr(), np.asarray(A @ self.c, dtype=float).reshape(-1))

    def __getitem__(self, rows) -> Affine:
        idx = np.arange(self.size)[rows]
        return Affine(self.M[idx], self.c[idx])

    def sum(self) -> Affine:
        return Affine(sp.csr_matrix(self.M.sum(axis=0)), np.array([self.c.sum()]))


def stack(parts: list[Affine]) -> Affine:
    """The rows of ``parts`` one after the other."""
    n = max(p.M.shape[1] for p in parts)
    return Affine(sp.vstack([_widen(p.M, n) for p in parts], format="csr"), np.concatenate([p.c for p in parts]))


def _widen(M: sp.csr_matrix, n: int) -> sp.csr_matrix:
    if M.shape[1] == n:
        return M
    return sp.csr_matrix((M.data, M.indices, M.indptr), shape=(M.shape[0], n))


def _diff(lhs, rhs) -> Affine:
    return lhs - rhs if isinstance(lhs, Affine) else -(rhs - lhs)


def _vec(a, m: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(a, dtype=float), (m,))


@dataclass
class Quadratic:
    """``lin`` (one row) plus ``sum_k w_k ||e_k||²``: an objective term."""

    lin: Affine | None = None
    squares: list[tuple[float, Affine]] = field(default_factory=list)

    def value(self, x: np.ndarray) -> float:
        v = float(self.lin.at(x).sum()) if self.lin is not None else 0.0
        return v + sum(w * float(np.sum(e.at(x) ** 2)) for w, e in self.squares)




class Program:
    """Variables in blocks with bounds (and integrality), rows ``expr == 0`` and ``expr <= 0``, second-order
    cones, and a convex quadratic objective; :meth:`solve` sets :attr:`status` (cvxpy's words: ``optimal``,
    ``optimal_inaccurate``, ``infeasible``, ``unbounded``, ``solver_error``) and :attr:`x`."""

    def __init__(self) -> None:
        self.n = 0
        self._lb: list[np.ndarray] = []
        self._ub: list[np.ndarray] = []
        self._int: list[np.ndarray] = []
        self._eq: list[Affine] = []
        self._le: list[Affine] = []
        self._soc: list[list[Affine]] = []
        self.objective = Quadratic()
        self.status: str | None = None
        self.x: np.ndarray | None = None
        # the solver's dual objective at its last solution: a lower bound on the optimum (None: no duals, e.g. a
        # mixed-integer program); for solve_cuts, the bound of its last relaxation, which bounds the program too
        self.dual_objective: float | None = None
        # the stacked matrices, kept while only bounds change (fix): the OPF's AC rounds re-solve for free
        self._stacked: tuple | None = None
        self._conic_rows: tuple | None = None
        self._last_clarabel: tuple | None = None  # (A, settings, solver) of the last Clarabel solve
        # HiGHS's model of the last solve while it holds every row and column (bounds follow fix): the next
        # HiGHS solve starts from its basis
        self._h = None
        self._h_settings: dict | None = None
        # (w, e, z, tangent points): solve_cuts's epigraphs z >= e², each with the points of its tangents so far
        self._squares: list[tuple[float, Affine, Affine, list[np.ndarray]]] = []

    def var(self, n: int, lb=-np.inf, ub=np.inf, integer: bool = False) -> Affine:
        self._changed()
        n0, self.n = self.n, self.n + int(n)
        self._lb.append(np.broadcast_to(np.asarray(lb, dtype=float), (n,)).copy())
        self._ub.append(np.broadcast_to(np.asarray(ub, dtype=float), (n,)).copy())
        self._int.append(np.full(n, integer))
        M = sp.csr_matrix((np.ones(n), n0 + np.arange(n), np.arange(n + 1)), shape=(n, n0 + n))
        return Affine(M, np.zeros(n))

    def fix(self, x: Affine, values) -> None:
        """Fix the variables of ``x`` (a block from :meth:`var`) at ``values``: a model's constants that change
        between solves (the OPF's AC corrections) without rebuilding its rows."""
        lb, ub = np.concatenate(self._lb), np.concatenate(self._ub)
        idx = x.M.indices
        lb[idx] = ub[idx] = values
        self._lb, self._ub = [lb], [ub]
        if self._h is not None:
            self._h.changeColsBounds(idx.size, idx.astype(np.int32), lb[idx], ub[idx])

    def _changed(self) -> None:
        self._stacked = self._conic_rows = self._last_clarabel = self._h = None

    def eq(self, lhs, rhs=0.0) -> None:
        self._changed()
        self._eq.append(_diff(lhs, rhs))

    def le(self, lhs, rhs=0.0) -> None:
        self._changed()
        self._le.append(_diff(lhs, rhs))

    def ge(self, lhs, rhs=0.0) -> None:
        self.le(rhs, lhs)

    def soc(self, t: Affine, *xs: Affine) -> None:
        """``||(xs[0][k], xs[1][k], ...)|| <= t[k]`` for every row k."""
        self._changed()
        self._soc.append([t, *xs])

    def minimize(self, terms: list[Quadratic]) -> None:
        self._changed()
        lin = [q.lin for q in terms if q.lin is not None]
        self.objective = Quadratic(stack([e.sum() for e in lin]).sum() if lin else None,
                                   [s for q in terms for s in q.squares])

    @property
    def is_lp(self) -> bool:
        return not self.objective.squares and not self._soc

    @property
    def is_mixed_integer(self) -> bool:
        return any(i.any() for i in self._int)

    def value(self, e: Affine) -> np.ndarray:
        return e.at(self.x)

    # ------------------------------------------------------------------------------------------ solving

    def _matrices(self):
        """Cost ``q``, constant, the upper triangle of ``P`` (objective ``x'Px/2 + q'x``), the rows ``A``, ``b``
        and how many of them are equalities."""
        if self._stacked is None:
            self._stacked = self._stack()
        return self._stacked

    def _stack(self):
        n = self.n
        lin = self.objective.lin
        q = np.zeros(n)
        const = 0.0
        if lin is not None:
            q[: lin.M.shape[1]] = lin.M.toarray().reshape(-1)
            const = float(lin.c[0])
        P = sp.csc_matrix((n, n))
        for w, e in self.objective.squares:
            M = _widen(e.M, n)
            P = P + 2 * w * (M.T @ M)
            q += 2 * w * (M.T @ e.c)
            const += w * float(e.c @ e.c)
        # rows: the equalities, then the inequalities, as ``A x (= or <=) b``
        rows = self._eq + self._le
        A = _widen(stack(rows).M, n) if rows else sp.csr_matrix((0, n))
        b = -np.concatenate([r.c for r in rows]) if rows else np.zeros(0)
        return q, const, sp.triu(P, format="csc"), A, b, sum(r.size for r in self._eq)

    def solve(self, solver: str, settings: dict | None = None) -> str:
        settings = {**DEFAULT_SETTINGS.get(solver, {}), **(settings or {})}
        if self._soc and solver == "HIGHS":
            raise ValueError("solver: HiGHS solves no second-order cones; use CLARABEL or SCS")
        if self.is_mixed_integer and solver != "HIGHS":
            raise ValueError(f"solver: integer variables need HIGHS, got {solver}")
        self.dual_objective = None
        try:
            {"HIGHS": self._highs, "CLARABEL": self._clarabel, "SCS": self._scs}[solver](settings)
        except (ValueError, ArithmeticError, RuntimeError) as e:  # a solver's own failure: the status says it
            log.info("solver %s: %s", solver, e)
            self.status, self.x = "solver_error", None
        return self.status

    def solve_cuts(self, separate, rel_gap: float = 1e-7, max_rounds: int = 100,
                   settings: dict | None = None) -> str:
        """HiGHS by cutting planes, each round re-solved from the last basis.  The rows ``separate(x)`` returns
        (``[(lhs, rhs), ...]``, each meaning ``lhs <= rhs``; empty where ``x`` breaks none) join the program;
        each squared objective term ``w e_k²`` becomes an epigraph variable under tangents of ``e_k²``, one more
        at each solution's ``e_k`` while the tangents understate the objective by more than ``rel_gap`` of it.
        The result is optimal for the whole program to within that gap (and the solver's tolerances).  The
        program keeps the rows and tangents (a later solve starts from them) and no longer has quadratic terms."""
        # tangents of terms whose squares are small (MW² of a tie deviation, ~1e-3) sit within HiGHS's default
        # tolerance (1e-7) of each other: at 1e-9 the optimum moved from 2e-6 to 4e-8 of Clarabel's (IEEE 33,
        # 300 EVs, a flat tie target) at no cost in time
        settings = {**DEFAULT_SETTINGS["HIGHS"], "primal_feasibility_tolerance": 1e-9,
                    "dual_feasibility_tolerance": 1e-9, **(settings or {})}
        if self._soc:
            raise ValueError("solver: HiGHS solves no second-order cones; use CLARABEL or SCS")
        self._epigraphs()
        self.dual_objective = None
        h = self._highs(settings, duals=False)
        for _ in range(max_rounds):
            if self.status != "optimal":
                return self.status
            cuts = separate(self.x) + self._tangents(self.x, rel_gap)
            if not cuts:
                self.dual_objective = _highs_dual_objective(h)
                return self.status
            rows = stack([_diff(lhs, rhs) for lhs, rhs in cuts])
            for lhs, rhs in cuts:
                self.le(lhs, rhs)
            A = _widen(rows.M, self.n).tocsr()
            h.addRows(A.shape[0], np.full(A.shape[0], -highs_inf()), -rows.c, A.nnz, A.indptr[:-1].astype(np.int32),
                      A.indices.astype(np.int32), A.data)
            self._h = h  # it holds the rows just added
            with quiet_stdout():
                h.run()
            self._read_highs(h)
        log.warning("cutting planes: still cutting after %d rounds", max_rounds)
        self.status, self.x = "solver_error", None
        return self.status

    def _epigraphs(self) -> None:
        """Each row k of each squared term ``w ||e||²``: a variable z_k >= e_k², tangents at 0 and across the
        range the variables' bounds give e_k; the objective then prices ``w z``."""
        if not self.objective.squares:
            return
        lin = self.objective.lin
        for w, e in self.objective.squares:
            z = self.var(e.size, lb=0.0)
            lo, hi = _range(e, np.concatenate(self._lb), np.concatenate(self._ub))
            points = np.linspace(np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0), 9)
            self._squares.append((w, e, z, list(points)))
            for c in points:
                self.le(2 * c * e - z, c * c)
            lin = (w * z.sum()) if lin is None else lin + w * z.sum()
        self.objective = Quadratic(lin)

    def _tangents(self, x: np.ndarray, rel_gap: float) -> list[tuple[Affine, np.ndarray]]:
        """Tangents at ``x``'s ``e_k`` of the squared terms, where the tangents understate the objective by more
        than ``rel_gap`` of it (none otherwise).  The understatement is measured from the tangents themselves,
        ``min_c (e_k - c)²``, not from z_k, which the solver holds to its tolerance only."""
        if not self._squares:
            return []
        values = [e.at(x) for _, e, _, _ in self._squares]
        under = [w * np.nanmin([(v - c) ** 2 for c in points], axis=0)
                 for (w, _, _, points), v in zip(self._squares, values)]
        total = sum(float(u.sum()) for u in under)
        allowed = rel_gap * max(abs(self.objective_at(x)), 1e-9)
        if total <= allowed:
            return []
        per_row = allowed / sum(e.size for _, e, _, _ in self._squares)
        cuts = []
        for (w, e, z, points), u, v in zip(self._squares, under, values):
            k = u > per_row
            if k.any():
                c = np.where(k, v, np.nan)
                points.append(c)  # nan where no tangent is added: nanmin skips it
                cuts.append((2 * c[k] * e[k] - z[k], c[k] ** 2))
        return cuts

    def _highs(self, settings: dict, duals: bool = True):
        integer = np.concatenate(self._int) if self.n else np.zeros(0, bool)
        if self._h is not None and self._h_settings == settings:
            # only bounds moved since the last solve (fix: the OPF's AC rounds): from its basis
            h = self._h
            with quiet_stdout():
                h.run()
        else:
            h = self._highs_model(settings, integer)
        self._read_highs(h)
        # an LP's dual objective; a QP's would need the Hessian's term (the OPF's QPs go to Clarabel or solve_cuts)
        linear = not integer.any() and not self.objective.squares
        self.dual_objective = _highs_dual_objective(h) if duals and linear and self.status == "optimal" else None
        return h

    def _highs_model(self, settings: dict, integer: np.ndarray):
        """A HiGHS model of the program, solved."""
        import highspy

        q, const, P, A, rhs, n_eq = self._matrices()
        A = A.tocsc()
        inf = highs_inf()
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = self.n, A.shape[0]
        lp.col_cost_, lp.offset_ = q, const
        lp.col_lower_ = np.concatenate(self._lb) if self.n else np.zeros(0)
        lp.col_upper_ = np.concatenate(self._ub) if self.n else np.zeros(0)
        lp.row_lower_ = np.where(np.arange(A.shape[0]) < n_eq, rhs, -inf)
        lp.row_upper_ = rhs
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
        if integer.any():
            lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                               for i in integer]
        model = highspy.HighsModel()
        model.lp_ = lp
        if P.nnz:
            L = P.T.tocsc()  # HiGHS reads the lower triangle
            model.hessian_.dim_ = self.n
            model.hessian_.format_ = highspy.HessianFormat.kTriangular
            model.hessian_.start_, model.hessian_.index_, model.hessian_.value_ = L.indptr, L.indices, L.data
        with quiet_stdout():
            h = highspy.Highs()  # its banner, printed here
            for k, v in settings.items():
                h.setOptionValue(k, v)
            h.passModel(model)
            h.run()
        self._h, self._h_settings = h, settings
        return h

    def _read_highs(self, h) -> None:
        import highspy

        S = highspy.HighsModelStatus
        self.status = {S.kOptimal: "optimal", S.kInfeasible: "infeasible", S.kUnbounded: "unbounded",
                       S.kUnboundedOrInfeasible: "infeasible"}.get(h.getModelStatus(), "solver_error")
        self.x = np.asarray(h.getSolution().col_value, dtype=float) if self.status == "optimal" else None

    def _conic(self):
        """Clarabel's and SCS's form: ``A x + s = b``, ``s`` in zero, nonnegative and second-order cones, with
        finite variable bounds as nonnegative rows."""
        q, _, P, A_rows, b_rows, n_eq_rows = self._matrices()
        n = self.n
        lb, ub = (np.concatenate(b) if n else np.zeros(0) for b in (self._lb, self._ub))
        fixed = lb == ub  # one equality row, not two opposite inequalities
        masks = (fixed, np.isfinite(lb) & ~fixed, np.isfinite(ub) & ~fixed)
        fx, lo, hi = (np.flatnonzero(m) for m in masks)
        cached = self._conic_rows
        if cached is None or not all(np.array_equal(a, b) for a, b in zip(cached[0], masks)):
            I = sp.identity(n, format="csr")
            blocks, b_soc, soc_dims = [I[fx], A_rows, -I[lo], I[hi]], [], []
            for parts in self._soc:
                k, d = parts[0].size, len(parts)
                # row j of cone i is parts[j][i]: interleave so that each cone's rows are consecutive
                e = stack(parts)
                order = (np.arange(d)[None, :] * k + np.arange(k)[:, None]).reshape(-1)
                blocks.append(-_widen(e.M, n)[order])
                b_soc.append(e.c[order])
                soc_dims += [d] * k
            cached = self._conic_rows = (masks, sp.vstack(blocks, format="csc"), b_soc, soc_dims)
        _, A, b_soc, soc_dims = cached
        b = np.concatenate([lb[fx], b_rows, -lb[lo], ub[hi], *b_soc])
        n_eq = fx.size + n_eq_rows
        n_le = A_rows.shape[0] - n_eq_rows + lo.size + hi.size
        return q, P, A, b, n_eq, n_le, soc_dims

    def _clarabel(self, settings: dict) -> None:
        import clarabel

        q, P, A, b, n_eq, n_le, soc_dims = self._conic()
        last = self._last_clarabel
        if last is not None and last[0] is A and last[1] == settings and last[2].is_data_update_allowed():
            # only bounds moved (fix): keep the solver's factorisation structure and scaling, a new right-hand side
            solver = last[2]
            solver.update(b=b)
        else:
            cones = [c(d) for c, d in ((clarabel.ZeroConeT, n_eq), (clarabel.NonnegativeConeT, n_le)) if d]
            cones += [clarabel.SecondOrderConeT(d) for d in soc_dims]
            s = clarabel.DefaultSettings()
            s.verbose = False
            for k, v in settings.items():
                setattr(s, k, v)
            solver = clarabel.DefaultSolver(P, q, A, b, cones, s)
            self._last_clarabel = (A, settings, solver)
        sol = solver.solve()
        st = str(sol.status)
        self.status = {"Solved": "optimal", "AlmostSolved": "optimal_inaccurate", "PrimalInfeasible": "infeasible",
                       "AlmostPrimalInfeasible": "infeasible", "DualInfeasible": "unbounded",
                       "AlmostDualInfeasible": "unbounded"}.get(st, "solver_error")
        self.x = np.asarray(sol.x, dtype=float) if self.status in OPTIMAL else None
        self.dual_objective = float(sol.obj_val_dual) + self._matrices()[1] if self.x is not None else None

    def _scs(self, settings: dict) -> None:
        import scs

        q, P, A, b, n_eq, n_le, soc_dims = self._conic()
        data = {"P": P, "A": A, "b": b, "c": q}
        sol = scs.SCS(data, {"z": n_eq, "l": n_le, "q": soc_dims}, **settings).solve()
        st = sol["info"]["status"]
        self.status = {"solved": "optimal", "solved_inaccurate": "optimal_inaccurate", "infeasible": "infeasible",
                       "infeasible_inaccurate": "infeasible", "unbounded": "unbounded",
                       "unbounded_inaccurate": "unbounded"}.get(st, "solver_error")
        self.x = np.asarray(sol["x"], dtype=float) if self.status in OPTIMAL else None
        self.dual_objective = float(sol["info"]["dobj"]) + self._matrices()[1] if self.x is not None else None

    def objective_at(self, x: np.ndarray) -> float:
        """The objective at ``x``, squared terms exact (:meth:`solve_cuts`'s epigraph variables replaced by them)."""
        v = self.objective.value(x)
        for w, e, z, _ in self._squares:
            v += w * float((e.at(x) ** 2).sum() - z.at(x).sum())
        return v


def _highs_dual_objective(h) -> float:
    """The LP dual objective of HiGHS's solution (its sign convention: a positive dual prices a lower bound)."""
    lp, sol = h.getLp(), h.getSolution()
    total = float(lp.offset_)
    for duals, lo, hi in ((sol.row_dual, lp.row_lower_, lp.row_upper_), (sol.col_dual, lp.col_lower_, lp.col_upper_)):
        d, lo, hi = (np.asarray(a, dtype=float) for a in (duals, lo, hi))
        bound = np.where(d > 0, lo, hi)
        # a dual of the wrong sign at an infinite bound is solver noise within its tolerance, not a price
        total += float(d @ np.where(np.isfinite(bound), bound, 0.0))
    return total


def highs_inf() -> float:
    import highspy

    return highspy.kHighsInf


def _range(e: Affine, lb: np.ndarray, ub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The least and greatest value of each row of ``e`` over the variables' bounds (±inf where unbounded)."""
    M = _widen(e.M, lb.size).tocsr()
    pos, neg = M.maximum(0), M.minimum(0)
    return e.c + _bounded(pos, lb) + _bounded(neg, ub), e.c + _bounded(pos, ub) + _bounded(neg, lb)


def _bounded(M: sp.csr_matrix, b: np.ndarray) -> np.ndarray:
    """``M @ b`` where an infinite bound under a nonzero coefficient gives that row ±inf (never nan)."""
    finite = np.isfinite(b)
    out = M @ np.where(finite, b, 0.0)
    Mi = M[:, ~finite]
    if Mi.nnz:
        sign = Mi @ np.sign(b[~finite])  # coefficients are of one sign in M: no cancelling
        out = np.where(Mi.getnnz(axis=1) > 0, np.sign(sign) * np.inf, out)
    return out


@contextlib.contextmanager
def quiet_stdout():
    """HiGHS's C++ core prints a banner on file descriptor 1 whatever its options say; JSON output on stdout
    (``evgrid bench opf --json``) must stay clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
