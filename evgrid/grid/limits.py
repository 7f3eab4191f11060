"""Enforce network limits by curtailing controllable EV charging and PV / wind output.

After a solve, where a bus voltage is below ``v_min_pu`` or a line or
transformer is loaded above ``loading_max``, controllable load is reduced and
the batch re-solved, a bounded number of rounds.  Two levers per bus lower its
net load: curtailing EV charging (used first) and raising V2G discharge.  One
lever raises it: curtailing PV / wind output, used where a bus voltage is
above ``v_max_pu``, where a branch carries reverse (exported) power above its
rating, and where the feeder exports more than ``export_limit_kw`` at the
substation (shared pro rata by every unit).  What cannot be fixed (for
example a violation that base load causes on its own) is reported, never
hidden.

How much to curtail comes from LinDistFlow sensitivities on the radial tree:
a load reduction of ``dp`` kW at bus j raises the voltage of bus i by about
``R[i, j] * dp`` (``R[i, j]``: resistance of the path the two buses share, in
p.u. per kW) and lowers the flow of every branch upstream of j by ``dp``.
For a voltage violation at bus i, every bus j that shares its path is
curtailed by a fraction proportional to ``R[i, j] / R[i, i]`` of its
controllable load, so buses electrically close to the violation give most;
for an overloaded branch, every controllable load downstream gives the same
fraction.  Each bus takes the largest fraction any violation asks of it.  Over-voltage
and reverse overloads take the same fractions of the buses' curtailable
generation (a kW of generation curtailed lowers voltages as a kW of load
added).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from evgrid.grid.feeders import MeshedFeederError
from evgrid.grid.flow.base import FlowResult, PowerFlowBackend
from evgrid.validate import as_array, as_batch, check_int, check_real

_ALL = 1e30  # a fraction so large that min(fraction, 1) = 1 wherever it applies
_EXPORT_TOL_KW = 1e-3  # export above the limit by less than this (1 W) is not a violation


@dataclass(frozen=True, eq=False)
class Enforcement:
    """Outcome of :meth:`LimitEnforcer.enforce` for a batch of B scenarios."""

    p_kw: npt.NDArray[np.float64]  # (B, n_bus) net load after enforcement
    flow: FlowResult  # solution at p_kw
    curtail_kw: npt.NDArray[np.float64]  # (B, n_bus) charging curtailed, 0 <= . <= flex_charge_kw
    v2g_kw: npt.NDArray[np.float64]  # (B, n_bus) discharge added, 0 <= . <= flex_v2g_kw
    gen_curtail_kw: npt.NDArray[np.float64]  # (B, n_bus) PV / wind curtailed, 0 <= . <= flex_gen_kw
    undervoltage: npt.NDArray[np.bool_]  # (B, n_bus) still below v_min_pu
    overvoltage: npt.NDArray[np.bool_]  # (B, n_bus) still above v_max_pu
    overload: npt.NDArray[np.bool_]  # (B, n_line + n_trafo) still above loading_max
    over_export: npt.NDArray[np.bool_]  # (B,) still exporting more than export_limit_kw
    rounds: npt.NDArray[np.int64]  # (B,) re-solves spent on the scenario

    @property
    def violations(self) -> npt.NDArray[np.int64]:
        """Remaining violations per scenario (bus, branch and export counts; non-converged counts 1)."""
        n = self.undervoltage.sum(1) + self.overvoltage.sum(1) + self.overload.sum(1) + self.over_export
        return n + (~self.flow.converged)


class LimitEnforcer:
    """Sensitivity-based curtailment on one radial feeder.

    Args:
        backend: the solver used for re-solves (its feeder must be radial:
            the sensitivities come from the radial tree).
        loading_max: largest allowed line/transformer loading (1.0 = rating).
        max_rounds: re-solves per call; remaining violations are reported.
        margin_pu: aim this far inside the voltage limit, so the nonlinear
            re-solve lands inside it (a fraction of it for loading and export).
        export_limit_kw: most power the feeder may send upstream, kW (None: no limit).
    """

    def __init__(self, backend: PowerFlowBackend, *, loading_max: float = 1.0, max_rounds: int = 8,
                 margin_pu: float = 5e-4, export_limit_kw: float | None = None) -> None:
        f = backend.feeder
        if f.tree is None:
            raise MeshedFeederError(f"feeder {f.name!r}: limit sensitivities need a radial feeder; {f.mesh_error}")
        self.loading_max = check_real("loading_max", loading_max, 0.0, 10.0, lo_open=True)
        self.max_rounds = check_int("max_rounds", max_rounds, 1)
        self.margin_pu = check_real("margin_pu", margin_pu, 0.0, 0.05, hi_open=True)
        self.export_limit_kw = (None if export_limit_kw is None
                                else check_real("export_limit_kw", export_limit_kw, 0.0, 1e9))
        self.backend = backend
        self.feeder = f
        t = f.tree
        anc = t.paths()
        nob = t.node_of_bus
        kw_per_pu = t.base_mva * 1e3
        r_node = (anc * t.r_pu) @ anc.T / kw_per_pu  # (n_node, n_node) p.u. voltage per kW
        self._r = np.ascontiguousarray(r_node[np.ix_(nob, nob)])  # (n_bus, n_bus)
        diag = np.diag(self._r).copy()
        diag[diag <= 0] = np.inf  # the slack: nothing to fix there
        self._w = self._r / diag[:, None]  # (n_bus, n_bus) closeness of j to violation i, in [0, 1]
        self._w2r = self._r * self._w  # sensitivity of bus i to j, weighted by closeness
        # down[e, j]: bus j is in the subtree fed through element e
        self._down = anc[np.ix_(nob, t.elem_node)].T.astype(bool)  # (n_elem, n_bus)

    def enforce(
        self,
        p_kw: npt.ArrayLike,
        q_kvar: npt.ArrayLike,
        flex_charge_kw: npt.ArrayLike,
        flex_v2g_kw: npt.ArrayLike | None = None,
        flex_gen_kw: npt.ArrayLike | None = None,
        *,
        flow: FlowResult | None = None,
    ) -> Enforcement:
        """Curtail until limits hold or ``max_rounds`` re-solves are spent.

        Args:
            p_kw, q_kvar: (B, n_bus) net load, load positive.
            flex_charge_kw: (B, n_bus) EV charging included in ``p_kw`` that may be curtailed, >= 0.
            flex_v2g_kw: (B, n_bus) extra discharge the EVs can still give, >= 0.
            flex_gen_kw: (B, n_bus) PV / wind output included in ``p_kw`` (as negative load) that may be
                curtailed, >= 0.
            flow: the solution at ``p_kw`` if the caller has it (saves a solve;
                it also warm-starts the re-solves).
        """
        f = self.feeder
        p = as_batch("p_kw", p_kw, f.n_bus).copy()
        q = as_batch("q_kvar", q_kvar, f.n_bus)
        cap_c = _as_flex("flex_charge_kw", flex_charge_kw, p.shape)
        cap_v = np.zeros_like(p) if flex_v2g_kw is None else _as_flex("flex_v2g_kw", flex_v2g_kw, p.shape)
        cap_g = None if flex_gen_kw is None else _as_flex("flex_gen_kw", flex_gen_kw, p.shape)
        if cap_g is not None and not cap_g.any():
            cap_g = None  # nothing to curtail: the generation lever stays out of the loop
        if flow is None:
            flow = self.backend.solve(p, q)
        elif flow.batch != p.shape[0]:
            raise ValueError(f"flow: expected a result for {p.shape[0]} scenarios, got {flow.batch}")
        curtail = np.zeros_like(p)
        v2g = np.zeros_like(p)
        gen_cut = np.zeros_like(p)
        rounds = np.zeros(p.shape[0], dtype=np.int64)
        for _ in range(self.max_rounds):
            frac, frac_g = self._fractions(flow, p, q, cap_c - curtail + cap_v - v2g,
                                           None if cap_g is None else cap_g - gen_cut)
            todo = frac.max(axis=1) > 0.0
            if frac_g is not None:
                todo |= frac_g.max(axis=1) > 0.0
            if not todo.any():
                break
            avail_c = cap_c - curtail
            dp = frac * (avail_c + cap_v - v2g)
            dc = np.minimum(dp, avail_c)
            curtail += dc
            v2g += dp - dc
            p -= dp
            if frac_g is not None:
                dg = frac_g * (cap_g - gen_cut)
                gen_cut += dg
                p += dg
            rounds += todo
            flow = self.backend.solve(p, q, init=flow if flow.state is not None else None)
        return self._outcome(p, flow, curtail, v2g, gen_cut, rounds)

    def _outcome(self, p, flow: FlowResult, curtail, v2g, gen_cut, rounds) -> Enforcement:
        f = self.feeder
        loading = np.concatenate([flow.line_loading, flow.trafo_loading], axis=1)
        conv = flow.converged[:, None]
        over_export = np.zeros(p.shape[0], dtype=bool)
        if self.export_limit_kw is not None:
            over_export = flow.converged & (-flow.slack_p_kw > self.export_limit_kw + _EXPORT_TOL_KW)
        return Enforcement(
            p_kw=p, flow=flow, curtail_kw=curtail, v2g_kw=v2g, gen_curtail_kw=gen_cut,
            undervoltage=conv & (flow.vm_pu < f.v_min_pu), overvoltage=conv & (flow.vm_pu > f.v_max_pu),
            overload=conv & (loading > self.loading_max), over_export=over_export, rounds=rounds,
        )

    def _fractions(self, flow: FlowResult, p, q, cap, cap_g) -> tuple[np.ndarray, np.ndarray | None]:
        """Share of each bus's remaining controllable load (``cap``) and, where some is left, of its
        curtailable generation (``cap_g``, None: none) to give up, (B, n_bus) each (None: no generation to
        curtail)."""
        frac = np.zeros_like(p)
        # non-converged: likely past voltage collapse; halve the controllable load and retry
        bad = ~flow.converged
        if bad.any():
            frac[bad] = 0.5
        ok = flow.converged
        deficit = np.where(ok[:, None], self.feeder.v_min_pu + self.margin_pu - flow.vm_pu, 0.0)  # (B, n_bus)
        self._voltage_fractions(frac, deficit, cap)
        loading = np.concatenate([flow.line_loading, flow.trafo_loading], axis=1)  # (B, n_elem)
        target = self.loading_max * (1.0 - self.margin_pu)
        over = ok[:, None] & (loading > target)
        frac_g = None
        if cap_g is not None and (cap_g > 0.0).any():
            frac_g = np.zeros_like(p)
            excess = np.where(ok[:, None], flow.vm_pu - (self.feeder.v_max_pu - self.margin_pu), 0.0)
            self._voltage_fractions(frac_g, excess, cap_g)
            self._export_fractions(frac_g, flow, cap_g)
        lb = np.flatnonzero(over.any(axis=1))
        if lb.size:
            self._overload_fractions(frac, frac_g, lb, p, q, loading, over, target, cap, cap_g)
        if frac_g is not None:
            frac_g = np.where(cap_g > 0.0, frac_g, 0.0)
        return np.where(cap > 0.0, frac, 0.0), frac_g

    def _voltage_fractions(self, frac: np.ndarray, deficit: np.ndarray, cap: np.ndarray) -> None:
        """Raise ``frac`` (B, n_bus) in place where buses miss a voltage limit by ``deficit`` p.u. (> 0)."""
        vb = np.flatnonzero((deficit > 0).any(axis=1))
        if not vb.size:
            return
        d = np.maximum(deficit[vb], 0.0)  # (b, i)
        # gamma_i: scale so that sum_j R_ij * gamma_i * w_ij * cap_j = deficit_i
        reach = (cap[vb] @ self._w2r.T)  # (b, i): sum_j R_ij w_ij cap_j
        # no reach: ask everything of every related bus (a big finite number, so 0 * it stays 0)
        gamma = np.where(d > 0, np.divide(d, reach, out=np.full_like(d, _ALL), where=reach > 0), 0.0)
        # fraction asked of bus j: max_i gamma_i * w_ij, at most 1; only the buses with a deficit somewhere
        # (gamma > 0) can set the max (the products are >= 0), which keeps it O(b * violating * n_bus)
        hot = np.flatnonzero((gamma > 0).any(axis=0))
        fj = (gamma[:, hot, None] * self._w[hot][None]).max(axis=1, initial=0.0)
        frac[vb] = np.maximum(frac[vb], np.minimum(fj, 1.0))

    def _export_fractions(self, frac_g: np.ndarray, flow: FlowResult, cap_g: np.ndarray) -> None:
        """Raise ``frac_g`` in place where the feeder exports more than its limit: every unit gives the same
        share, overshooting the excess by 1 % so losses falling with the flow do not leave a sliver."""
        if self.export_limit_kw is None:
            return
        excess = np.where(flow.converged, -flow.slack_p_kw - self.export_limit_kw, 0.0)  # (B,)
        eb = np.flatnonzero(excess > _EXPORT_TOL_KW)
        if eb.size:
            total = cap_g[eb].sum(axis=1)
            share = np.divide(excess[eb] * 1.01 + _EXPORT_TOL_KW, total, out=np.ones_like(total), where=total > 0)
            frac_g[eb] = np.maximum(frac_g[eb], np.minimum(share, 1.0)[:, None])

    def _overload_fractions(self, frac, frac_g, lb, p, q, loading, over, target, cap, cap_g) -> None:
        """Raise ``frac`` (forward flow: shed load) and ``frac_g`` (reverse flow: shed generation) in place for
        the scenarios ``lb`` with an overloaded element; every bus downstream of it gives the same share."""
        down = self._down.astype(float)  # (e, j)
        p_down = p[lb] @ down.T  # (b, e) downstream net load, kW
        q_down = q[lb] @ down.T
        s_target = np.sqrt(p_down ** 2 + q_down ** 2) * target / np.maximum(loading[lb], 1e-12)
        p_ok = np.sqrt(np.maximum(s_target ** 2 - q_down ** 2, 0.0))
        need = np.where(over[lb], np.maximum(p_down - p_ok, 0.0), 0.0)  # (b, e) kW to shed
        frac[lb] = np.maximum(frac[lb], _downstream_share(need, cap[lb] @ down.T, down))
        if frac_g is not None:
            need_g = np.where(over[lb], np.maximum(-p_down - p_ok, 0.0), 0.0)  # (b, e) kW of export to shed
            frac_g[lb] = np.maximum(frac_g[lb], _downstream_share(need_g, cap_g[lb] @ down.T, down))


def _downstream_share(need: np.ndarray, cap_down: np.ndarray, down: np.ndarray) -> np.ndarray:
    """(b, j): the largest share ``need / cap_down`` (at most 1) of any element (b, e) that bus j lies below."""
    g = np.where(need > 0, np.divide(need, cap_down, out=np.full_like(need, _ALL), where=cap_down > 0), 0.0)
    g = np.minimum(g, 1.0)
    hot = np.flatnonzero((g > 0).any(axis=0))  # overloaded elements only, as for voltages
    return (g[:, hot, None] * down[hot][None]).max(axis=1, initial=0.0)


def _as_flex(name: str, x: npt.ArrayLike, shape: tuple[int, int]) -> np.ndarray:
    a = as_batch(name, x, shape[1])
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} like p_kw, got {a.shape}")
    if (a < 0.0).any():
        as_array(name, a, lo=0.0)  # raises, naming the first negative value
    return a
