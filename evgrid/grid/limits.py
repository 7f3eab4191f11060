"""Enforce network limits by curtailing controllable EV charging.

After a solve, where a bus voltage is below ``v_min_pu`` or a line or
transformer is loaded above ``loading_max``, controllable load is reduced and
the batch re-solved, a bounded number of rounds.  Two levers per bus, both
lowering its net load: curtailing EV charging (used first) and raising V2G
discharge.  What cannot be fixed (for example a violation that base load
causes on its own) is reported, never hidden.

How much to curtail comes from LinDistFlow sensitivities on the radial tree:
a load reduction of ``dp`` kW at bus j raises the voltage of bus i by about
``R[i, j] * dp`` (``R[i, j]``: resistance of the path the two buses share, in
p.u. per kW) and lowers the flow of every branch upstream of j by ``dp``.
For a voltage violation at bus i, every bus j that shares its path is
curtailed by a fraction proportional to ``R[i, j] / R[i, i]`` of its
controllable load, so buses electrically close to the violation give most;
for an overloaded branch, every controllable load downstream gives the same
fraction.  Each bus takes the largest fraction any violation asks of it.
Over-voltage is reported but not enforced (curtailing charging cannot fix it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from evgrid.grid.feeders import MeshedFeederError
from evgrid.grid.flow.base import FlowResult, PowerFlowBackend, _as_batch

_ALL = 1e30  # a fraction so large that min(fraction, 1) = 1 wherever it applies


@dataclass(frozen=True, eq=False)
class Enforcement:
    """Outcome of :meth:`LimitEnforcer.enforce` for a batch of B scenarios."""

    p_kw: npt.NDArray[np.float64]  # (B, n_bus) net load after enforcement
    flow: FlowResult  # solution at p_kw
    curtail_kw: npt.NDArray[np.float64]  # (B, n_bus) charging curtailed, 0 <= . <= flex_charge_kw
    v2g_kw: npt.NDArray[np.float64]  # (B, n_bus) discharge added, 0 <= . <= flex_v2g_kw
    undervoltage: npt.NDArray[np.bool_]  # (B, n_bus) still below v_min_pu
    overvoltage: npt.NDArray[np.bool_]  # (B, n_bus) above v_max_pu (not enforced)
    overload: npt.NDArray[np.bool_]  # (B, n_line + n_trafo) still above loading_max
    rounds: npt.NDArray[np.int64]  # (B,) re-solves spent on the scenario

    @property
    def violations(self) -> npt.NDArray[np.int64]:
        """Remaining violations per scenario (bus and branch counts; non-converged counts 1)."""
        n = self.undervoltage.sum(1) + self.overvoltage.sum(1) + self.overload.sum(1)
        return n + (~self.flow.converged)


class LimitEnforcer:
    """Sensitivity-based curtailment on one radial feeder.

    Args:
        backend: the solver used for re-solves (its feeder must be radial:
            the sensitivities come from the radial tree).
        loading_max: largest allowed line/transformer loading (1.0 = rating).
        max_rounds: re-solves per call; remaining violations are reported.
        margin_pu: aim this far inside the voltage limit, so the nonlinear
            re-solve lands inside it (a fraction of it for loading).
    """

    def __init__(self, backend: PowerFlowBackend, *, loading_max: float = 1.0, max_rounds: int = 8,
                 margin_pu: float = 5e-4) -> None:
        f = backend.feeder
        if f.tree is None:
            raise MeshedFeederError(f"feeder {f.name!r}: limit sensitivities need a radial feeder; {f.mesh_error}")
        if not 0.0 < loading_max <= 10.0:
            raise ValueError(f"loading_max: expected 0 < loading_max <= 10, got {loading_max}")
        if max_rounds < 1:
            raise ValueError(f"max_rounds: expected >= 1, got {max_rounds}")
        if not 0.0 <= margin_pu < 0.05:
            raise ValueError(f"margin_pu: expected 0 <= margin_pu < 0.05, got {margin_pu}")
        self.backend = backend
        self.feeder = f
        self.loading_max = loading_max
        self.max_rounds = max_rounds
        self.margin_pu = margin_pu
        t = f.tree
        n = t.n_node
        # anc[i, k]: branch into node k lies on the path slack -> node i
        anc = np.zeros((n, n))
        for i in range(1, n):
            k = i
            while k > 0:
                anc[i, k] = 1.0
                k = t.parent[k]
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
        *,
        flow: FlowResult | None = None,
    ) -> Enforcement:
        """Curtail until limits hold or ``max_rounds`` re-solves are spent.

        Args:
            p_kw, q_kvar: (B, n_bus) net load, load positive.
            flex_charge_kw: (B, n_bus) EV charging included in ``p_kw`` that may be curtailed, >= 0.
            flex_v2g_kw: (B, n_bus) extra discharge the EVs can still give, >= 0.
            flow: the solution at ``p_kw`` if the caller has it (saves a solve;
                it also warm-starts the re-solves).
        """
        f = self.feeder
        p = _as_batch("p_kw", p_kw, f.n_bus).copy()
        q = _as_batch("q_kvar", q_kvar, f.n_bus)
        cap_c = _as_flex("flex_charge_kw", flex_charge_kw, p.shape, f.n_bus)
        cap_v = (np.zeros_like(p) if flex_v2g_kw is None
                 else _as_flex("flex_v2g_kw", flex_v2g_kw, p.shape, f.n_bus))
        if flow is None:
            flow = self.backend.solve(p, q)
        elif flow.batch != p.shape[0]:
            raise ValueError(f"flow: expected a result for {p.shape[0]} scenarios, got {flow.batch}")
        v_min = f.v_min_pu
        curtail = np.zeros_like(p)
        v2g = np.zeros_like(p)
        rounds = np.zeros(p.shape[0], dtype=np.int64)
        for _ in range(self.max_rounds):
            frac = self._fractions(flow, p, q, cap_c - curtail + cap_v - v2g, v_min)
            todo = frac.max(axis=1) > 0.0
            if not todo.any():
                break
            avail_c = cap_c - curtail
            dp = frac * (avail_c + cap_v - v2g)
            dc = np.minimum(dp, avail_c)
            curtail += dc
            v2g += dp - dc
            p -= dp
            rounds += todo
            flow = self.backend.solve(p, q, init=flow if flow.state is not None else None)
        loading = np.concatenate([flow.line_loading, flow.trafo_loading], axis=1)
        conv = flow.converged[:, None]
        return Enforcement(
            p_kw=p, flow=flow, curtail_kw=curtail, v2g_kw=v2g,
            undervoltage=conv & (flow.vm_pu < v_min), overvoltage=conv & (flow.vm_pu > f.v_max_pu),
            overload=conv & (loading > self.loading_max), rounds=rounds,
        )

    def _fractions(self, flow: FlowResult, p, q, cap, v_min) -> np.ndarray:
        """Share of each bus's remaining controllable capacity to give up, (B, n_bus)."""
        frac = np.zeros_like(p)
        has_cap = cap > 0.0
        # non-converged: likely past voltage collapse; halve the controllable load and retry
        bad = ~flow.converged
        if bad.any():
            frac[bad] = 0.5
        ok = flow.converged
        deficit = np.where(ok[:, None], v_min + self.margin_pu - flow.vm_pu, 0.0)  # (B, n_bus)
        vb = np.flatnonzero((deficit > 0).any(axis=1))
        if vb.size:
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
        loading = np.concatenate([flow.line_loading, flow.trafo_loading], axis=1)  # (B, n_elem)
        target = self.loading_max * (1.0 - self.margin_pu)
        over = ok[:, None] & (loading > target)
        lb = np.flatnonzero(over.any(axis=1))
        if lb.size:
            down = self._down.astype(float)  # (e, j)
            p_down = p[lb] @ down.T  # (b, e) downstream net load, kW
            q_down = q[lb] @ down.T
            s_target = np.sqrt(p_down ** 2 + q_down ** 2) * target / np.maximum(loading[lb], 1e-12)
            p_ok = np.sqrt(np.maximum(s_target ** 2 - q_down ** 2, 0.0))
            need = np.where(over[lb], np.maximum(p_down - p_ok, 0.0), 0.0)  # (b, e) kW to shed
            cap_down = cap[lb] @ down.T
            g = np.where(need > 0, np.divide(need, cap_down, out=np.full_like(need, _ALL), where=cap_down > 0), 0.0)
            g = np.minimum(g, 1.0)
            hot = np.flatnonzero((g > 0).any(axis=0))  # overloaded elements only, as above
            fj = (g[:, hot, None] * down[hot][None]).max(axis=1, initial=0.0)  # (b, j)
            frac[lb] = np.maximum(frac[lb], fj)
        return np.where(has_cap, frac, 0.0)


def _as_flex(name: str, x: npt.ArrayLike, shape: tuple[int, int], n_bus: int) -> np.ndarray:
    a = _as_batch(name, x, n_bus)
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} like p_kw, got {a.shape}")
    if (a < 0).any():
        raise ValueError(f"{name}: expected values >= 0 kW (controllable load/discharge), got min {a.min()}")
    return a


