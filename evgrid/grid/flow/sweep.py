"""Fast backend: compiled, batched backward/forward sweep for radial feeders.

The feeder is a tree (``RadialTree``): each iteration draws the load and
shunt currents at the present voltages, accumulates them towards the slack
(backward), then recomputes voltages away from it (forward).  Branches are
exact two-ports taken from pandapower's admittance matrices, so line charging,
transformer magnetising branches, taps and phase shifts are all included.

Scenarios are processed in chunks with the scenario index innermost, so each
bus update is one SIMD loop over the chunk; a chunk iterates until all its
scenarios meet the tolerance (a scenario that already met it just gets more
accurate).  A scenario still above the tolerance after ``max_iter`` sweeps,
or whose voltages become non-finite, is reported ``converged=False`` with NaN
results; constant-power loads past the nose of the PV curve do that.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from evgrid.grid.feeders import Feeder, MeshedFeederError
from evgrid.grid.flow.base import FlowResult, PowerFlowBackend

# No 'nnan'/'ninf': non-finite voltages must stay detectable.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Scenarios per chunk: a chunk iterates until its slowest scenario converges,
# so small chunks waste fewer sweeps; 8 lanes are two AVX2 vectors.
_CHUNK = 8
# columns of the packed float output, after vm (n_bus), va (n_bus), loading (n_elem)
_LOSS, _SP, _SQ = 0, 1, 2


@nb.njit(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy")
def _block(b0, b1, p_kw, q_kvar, ints, coef, elem, v0r, v0i, kw_per_pu, init, tol, max_iter, out, out_conv, out_iter, state):
    """Solve scenarios b0 .. b1-1 chunk by chunk with one workspace; returns
    1 + the flat index of the first non-finite input, or 0."""
    n = coef.shape[0]
    vr = np.empty((n, _CHUNK))
    vi = np.empty((n, _CHUNK))
    jr = np.empty((n, _CHUNK))
    ji = np.empty((n, _CHUNK))
    sp = np.empty((n, _CHUNK))
    sq = np.empty((n, _CHUNK))
    for c0 in range(b0, b1, _CHUNK):
        bad = _chunk(c0, min(_CHUNK, b1 - c0), vr, vi, jr, ji, sp, sq, p_kw, q_kvar, ints, coef, elem, v0r, v0i, kw_per_pu, init,
                     tol, max_iter, out, out_conv, out_iter, state)
        if bad:
            return bad
    return 0


@nb.njit(inline="always", fastmath=_FASTMATH, nogil=True, error_model="numpy")
def _chunk(c0, m, vr, vi, jr, ji, sp, sq, p_kw, q_kvar, ints, coef, elem, v0r, v0i, kw_per_pu, init, tol, max_iter, out, out_conv, out_iter, state):
    """Solve the m <= CH scenarios starting at c0."""
    n_batch, n_bus = p_kw.shape
    n = coef.shape[0]
    n_elem = elem.shape[0]
    parent = ints[:n]
    node_of_bus = ints[n:n + n_bus]
    elem_node = ints[n + n_bus:]
    sp[:, :m] = 0.0
    sq[:, :m] = 0.0
    dmax = np.empty(_CHUNK)
    iters = np.zeros(_CHUNK, dtype=np.int64)
    inv = 1.0 / kw_per_pu
    for k in range(m):
        for j in range(n_bus):
            pv, qv = p_kw[c0 + k, j], q_kvar[c0 + k, j]
            if not (math.isfinite(pv) and math.isfinite(qv)):
                return 1 + (c0 + k) * n_bus + j
            node = node_of_bus[j]
            sp[node, k] += pv * inv
            sq[node, k] += qv * inv
    for k in range(m):
        vr[0, k] = v0r
        vi[0, k] = v0i
    if init.shape[0] > 0:
        for i in range(1, n):
            for k in range(m):
                vr[i, k] = init[c0 + k, i].real
                vi[i, k] = init[c0 + k, i].imag
    else:  # no-load voltages (taps and phase shifts included)
        for i in range(1, n):
            pi = parent[i]
            cr, ci = coef[i, 4], coef[i, 5]
            for k in range(m):
                vr[i, k] = cr * vr[pi, k] - ci * vi[pi, k]
                vi[i, k] = cr * vi[pi, k] + ci * vr[pi, k]
    tol2 = tol * tol
    for it in range(1, max_iter + 1):
        _backward(n, m, parent, coef, vr, vi, jr, ji, sp, sq)
        dmax[:] = 0.0
        for i in range(1, n):
            pi = parent[i]
            cr, ci, zr, zi = coef[i, 4], coef[i, 5], coef[i, 6], coef[i, 7]
            for k in range(m):
                nr = cr * vr[pi, k] - ci * vi[pi, k] - (zr * jr[i, k] - zi * ji[i, k])
                ni = cr * vi[pi, k] + ci * vr[pi, k] - (zr * ji[i, k] + zi * jr[i, k])
                dr = nr - vr[i, k]
                di = ni - vi[i, k]
                dmax[k] = max(dr * dr + di * di, dmax[k])
                vr[i, k] = nr
                vi[i, k] = ni
        done = True
        for k in range(m):
            if iters[k] == 0:
                if dmax[k] < tol2:
                    iters[k] = it
                else:
                    done = False
        if done:
            break
    # currents consistent with the final voltages
    _backward(n, m, parent, coef, vr, vi, jr, ji, sp, sq)
    rad2deg = 180.0 / math.pi
    c_load = 2 * n_bus
    c_tail = c_load + n_elem
    for k in range(m):
        b = c0 + k
        ok = iters[k] > 0
        for i in range(n):
            state[b, i] = complex(vr[i, k], vi[i, k])
            if not (math.isfinite(vr[i, k]) and math.isfinite(vi[i, k])):
                ok = False
        out_conv[b] = ok
        out_iter[b] = iters[k] if ok else max_iter
        if not ok:
            out[b, :] = np.nan
            continue
        for j in range(n_bus):
            node = node_of_bus[j]
            out[b, j] = math.sqrt(vr[node, k] ** 2 + vi[node, k] ** 2)
            out[b, n_bus + j] = math.atan2(vi[node, k], vr[node, k]) * rad2deg
        for e in range(n_elem):
            i = elem_node[e]
            pi = parent[i]
            sr, si, ar, ai = coef[i, 0], coef[i, 1], coef[i, 2], coef[i, 3]
            fr = sr * vr[pi, k] - si * vi[pi, k] + ar * jr[i, k] - ai * ji[i, k]
            fi = sr * vi[pi, k] + si * vr[pi, k] + ar * ji[i, k] + ai * jr[i, k]
            lf = math.sqrt(fr * fr + fi * fi) * elem[e, 0]
            lt = math.sqrt(jr[i, k] ** 2 + ji[i, k] ** 2) * elem[e, 1]
            out[b, c_load + e] = max(lf, lt)
        p0 = (vr[0, k] * jr[0, k] + vi[0, k] * ji[0, k]) * kw_per_pu
        tot = 0.0
        for j in range(n_bus):
            tot += p_kw[b, j]
        out[b, c_tail + _LOSS] = p0 - tot
        out[b, c_tail + _SP] = p0
        out[b, c_tail + _SQ] = (vi[0, k] * jr[0, k] - vr[0, k] * ji[0, k]) * kw_per_pu
    return 0


@nb.njit(inline="always", fastmath=_FASTMATH)
def _backward(n, m, parent, coef, vr, vi, jr, ji, sp, sq):
    # node currents: constant-power load conj(S/V) plus shunt admittance * V
    for i in range(n):
        yr, yi = coef[i, 8], coef[i, 9]
        for k in range(m):
            a, b = vr[i, k], vi[i, k]
            inv2 = 1.0 / (a * a + b * b)
            jr[i, k] = (sp[i, k] * a + sq[i, k] * b) * inv2 + yr * a - yi * b
            ji[i, k] = (sp[i, k] * b - sq[i, k] * a) * inv2 + yr * b + yi * a
    # accumulate towards the slack; children have larger indices than parents
    for i in range(n - 1, 0, -1):
        pi = parent[i]
        sr, si, ar, ai = coef[i, 0], coef[i, 1], coef[i, 2], coef[i, 3]
        if sr == 0.0 and si == 0.0 and ar == 1.0 and ai == 0.0:  # plain series branch
            for k in range(m):
                jr[pi, k] += jr[i, k]
                ji[pi, k] += ji[i, k]
        else:
            for k in range(m):
                jr[pi, k] += sr * vr[pi, k] - si * vi[pi, k] + ar * jr[i, k] - ai * ji[i, k]
                ji[pi, k] += sr * vi[pi, k] + si * vr[pi, k] + ar * ji[i, k] + ai * jr[i, k]


@nb.njit(cache=True, nogil=True, parallel=True)
def _sweep_parallel(n_block, p_kw, q_kvar, ints, coef, elem, v0r, v0i, kw_per_pu, init, tol, max_iter, out, out_conv,
                    out_iter, state):
    n_chunk = (p_kw.shape[0] + _CHUNK - 1) // _CHUNK
    per = (n_chunk + n_block - 1) // n_block * _CHUNK
    bad = np.zeros(n_block, dtype=np.int64)
    for t in nb.prange(n_block):
        b0 = t * per
        b1 = min(b0 + per, p_kw.shape[0])
        if b0 < b1:
            bad[t] = _block(b0, b1, p_kw, q_kvar, ints, coef, elem, v0r, v0i, kw_per_pu, init, tol, max_iter,
                            out, out_conv, out_iter, state)
    for t in range(n_block):
        if bad[t]:
            return bad[t]
    return 0


_NO_INIT = np.zeros((0, 0), dtype=np.complex128)


class SweepBackend(PowerFlowBackend):
    """Batched backward/forward sweep (numba).  Radial feeders only.

    Args:
        feeder: a radial feeder (``feeder.tree`` set); a meshed one raises
            :class:`MeshedFeederError` naming the loop.
        tol_pu: convergence tolerance on the largest voltage change of one
            sweep, p.u.  The remaining error is about ``tol_pu`` times
            rho / (1 - rho), rho the sweep's contraction factor (< 0.3 on these
            feeders): 1e-7 keeps voltages within ~3e-8 p.u. of the exact
            solution, well inside the 1e-6 p.u. parity target with pandapower.
        max_iter: sweeps before a scenario is declared non-converged.
        threads: 1 (default, what env workers use) runs in the calling thread;
            more spreads chunks of scenarios over numba's thread pool.
    """

    name = "sweep"
    checks_finite = True  # the kernel rejects NaN/inf while it reads the batch

    def __init__(self, feeder: Feeder, tol_pu: float = 1e-7, max_iter: int = 100, threads: int = 1) -> None:
        if feeder.tree is None:
            raise MeshedFeederError(f"feeder {feeder.name!r}: {feeder.mesh_error}")
        if not 0.0 < tol_pu < 1e-3:
            raise ValueError(f"tol_pu: expected 0 < tol_pu < 1e-3, got {tol_pu}")
        if max_iter < 1:
            raise ValueError(f"max_iter: expected >= 1, got {max_iter}")
        if threads < 1:
            raise ValueError(f"threads: expected >= 1, got {threads}")
        super().__init__(feeder)
        t = feeder.tree
        self.tol_pu = tol_pu
        self.max_iter = max_iter
        self.threads = threads
        self._ints = np.concatenate([t.parent, t.node_of_bus, t.elem_node]).astype(np.int64)
        self._coef = np.ascontiguousarray(t.coef)
        # per element: loading per p.u. current at the parent side and the node side
        self._elem = np.ascontiguousarray(t.elem_ibase_ka / t.elem_rating_ka)
        self._v0 = (t.v_slack.real, t.v_slack.imag, t.base_mva * 1e3)
        self._n_node = t.n_node
        self._width = 2 * feeder.n_bus + self._elem.shape[0] + 3

    def _solve(self, p_kw: np.ndarray, q_kvar: np.ndarray, init: FlowResult | None) -> FlowResult:
        n_b, n_bus = p_kw.shape
        n_node = self._n_node
        if init is None:
            state0 = _NO_INIT
        elif init.state is None or init.state.shape != (n_b, n_node):
            raise ValueError(f"init: expected a result of the sweep backend with state shape {(n_b, n_node)}")
        else:
            state0 = init.state
        out = np.empty((n_b, self._width))
        conv = np.empty(n_b, dtype=np.bool_)
        iters = np.empty(n_b, dtype=np.int64)
        state = np.empty((n_b, n_node), dtype=np.complex128)
        args = (p_kw, q_kvar, self._ints, self._coef, self._elem, *self._v0, state0, self.tol_pu, self.max_iter,
                out, conv, iters, state)
        threads = 1 if self.threads == 1 else min(self.threads, nb.config.NUMBA_NUM_THREADS, -(-n_b // _CHUNK))
        if threads > 1:
            nb.set_num_threads(threads)
            bad = _sweep_parallel(threads, *args)
        else:
            bad = _block(0, n_b, *args)
        if bad:
            b, j = divmod(bad - 1, n_bus)
            name, val = ("p_kw", p_kw[b, j]) if not np.isfinite(p_kw[b, j]) else ("q_kvar", q_kvar[b, j])
            raise ValueError(f"{name}: expected finite values, got {val} at scenario {b}, bus position {j}")
        c = 2 * n_bus + self._elem.shape[0]
        nl = self.feeder.n_line
        return FlowResult(vm_pu=out[:, :n_bus], va_deg=out[:, n_bus:2 * n_bus],
                          line_loading=out[:, 2 * n_bus:2 * n_bus + nl], trafo_loading=out[:, 2 * n_bus + nl:c],
                          loss_kw=out[:, c + _LOSS], slack_p_kw=out[:, c + _SP], slack_q_kvar=out[:, c + _SQ],
                          converged=conv, iterations=iters, state=state)
