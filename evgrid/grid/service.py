"""The grid as a service: solve a batch of one feeder and enforce its limits, warm-started.

:class:`LocalGrid` serves the feeders of a :class:`GridConfig` in this process; the shared power-flow
actor (:mod:`evgrid.cluster.powerflow`) serves the same requests to every env runner of a job and
builds its solvers here too, so both answer alike to the last bit for one request at a time.  What
a simulator needs from either is :class:`GridService`.

A request is one feeder's batch (B scenarios x n_bus buses, load positive): the net load ``p_kw``
and ``q_kvar``, and what limit enforcement may change: EV charging it may curtail
(``flex_charge_kw``), V2G discharge it may add (``flex_v2g_kw``) and PV / wind output it may curtail
(``flex_gen_kw``), all >= 0.  The answer is a :class:`GridSolution`.

:class:`FeederSolver` holds one feeder's solver and enforcer; its :meth:`~FeederSolver.solve_batch`
serves several callers' checked requests (:func:`check_request`) in one vectorised solve (the actor's
micro-batches), each warm-started by the one policy of :class:`WarmStarts`, which ``LocalGrid`` follows
for its single requests too.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from evgrid.grid.config import GridConfig
from evgrid.grid.feeders import Feeder, build_city, build_feeder
from evgrid.grid.flow import FlowResult, PowerFlowBackend, make_backend
from evgrid.grid.limits import LimitEnforcer
from evgrid.grid.zoning import default_profiles, zoning
from evgrid.validate import as_array, as_batch, check_int

log = logging.getLogger(__name__)


class FeederSet(NamedTuple):
    """A grid configuration's feeders and what a simulator derives per feeder."""

    feeders: list[Feeder]
    load_kinds: list[str]  # base-load shape per feeder
    zone_of_bus: list[np.ndarray]  # (n_bus,) per feeder, zones numbered per feeder


def build_feeders(grid: GridConfig) -> FeederSet:
    """The feeders of ``grid``: one, or a city's networks (one zone each).  A single feeder's zones follow
    ``grid.zoning``: its own partition (``equal_load``) or seed 003's index (``modularity``)."""
    if grid.feeder == "city":
        city = build_city(grid.city_networks, base=grid.city_base, v_min_pu=grid.v_min_pu, v_max_pu=grid.v_max_pu)
        feeders = list(city.feeders)
        return FeederSet(feeders, list(city.load_kinds), [np.zeros(f.n_bus, dtype=np.int64) for f in feeders])
    f0 = build_feeder(grid.feeder, der=grid.der, n_zones=grid.n_zones, v_min_pu=grid.v_min_pu,
                      v_max_pu=grid.v_max_pu)
    if grid.zoning == "modularity":
        profiles = default_profiles(f0, load_kind=grid.load_kind, base_load_scale=grid.base_load_scale,
                                    diesel_output=grid.diesel_output)
        z = zoning(f0, "modularity", **profiles._asdict())
        log.info("feeder %s zones (%s): %s", f0.name, f0.numbering, z.zones())
        f0 = dataclasses.replace(f0, zone_of_bus=z.zone_of_bus)
    return FeederSet([f0], [grid.load_kind], [f0.zone_of_bus])


def n_feeders(grid: GridConfig) -> int:
    """Number of feeders ``grid`` builds, without building them."""
    return grid.city_networks if grid.feeder == "city" else 1


class GridSolution(NamedTuple):
    """One feeder's step: the flow after enforcement, what enforcement changed (all (B, n_bus), kW), and the
    voltages the request's own injections gave before it."""

    flow: FlowResult
    curtail_kw: npt.NDArray[np.float64]  # EV charging curtailed
    v2g_kw: npt.NDArray[np.float64]  # V2G discharge added
    gen_curtail_kw: npt.NDArray[np.float64]  # PV / wind output curtailed
    vm_dispatch_pu: npt.NDArray[np.float64]  # before enforcement

    def take(self, rows: slice) -> GridSolution:
        """The scenarios ``rows``, without the flow's warm-start state (it stays with the server)."""
        return GridSolution(self.flow.take(rows, state=False), self.curtail_kw[rows], self.v2g_kw[rows],
                            self.gen_curtail_kw[rows], self.vm_dispatch_pu[rows])


class FeederRequest(NamedTuple):
    """One feeder's batch, checked (:func:`check_request`): (B, n_bus) float64 each, load positive, the
    three flexibilities >= 0."""

    p_kw: npt.NDArray[np.float64]
    q_kvar: npt.NDArray[np.float64]
    flex_charge_kw: npt.NDArray[np.float64]
    flex_v2g_kw: npt.NDArray[np.float64]
    flex_gen_kw: npt.NDArray[np.float64]

    @property
    def batch(self) -> int:
        return int(self.p_kw.shape[0])


def check_request(n_bus: int, p_kw: npt.ArrayLike, q_kvar: npt.ArrayLike, flex_charge_kw: npt.ArrayLike,
                  flex_v2g_kw: npt.ArrayLike, flex_gen_kw: npt.ArrayLike | None = None) -> FeederRequest:
    """A request for a feeder of ``n_bus`` buses, checked whether or not limits are enforced, so that a bad one
    fails on its own (not inside a batch of others); ``flex_gen_kw`` None: no curtailable generation."""
    p = as_batch("p_kw", p_kw, n_bus)
    out = [p]
    for name, x in zip(FeederRequest._fields[1:], (q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw)):
        if x is None:
            out.append(np.zeros_like(p))
            continue
        a = as_batch(name, x, n_bus)
        if a.shape != p.shape:
            raise ValueError(f"{name}: expected shape {p.shape} like p_kw, got {a.shape}")
        out.append(a if name == "q_kvar" else as_array(name, a, finite=False, lo=0.0))
    return FeederRequest(*out)


class FeederSolver:
    """One feeder's backend and (when limits are enforced) its enforcer."""

    def __init__(self, feeder: Feeder, grid: GridConfig) -> None:
        self.feeder = feeder
        self.backend: PowerFlowBackend = make_backend(feeder, grid.backend)
        self.enforcer = (LimitEnforcer(self.backend, loading_max=grid.loading_max, max_rounds=grid.limit_rounds,
                                       export_limit_kw=grid.export_limit_kw) if grid.enforce_limits else None)

    def enforce(self, p_kw: np.ndarray, q_kvar: np.ndarray, flex_charge_kw: npt.ArrayLike,
                flex_v2g_kw: npt.ArrayLike, flex_gen_kw: npt.ArrayLike | None, flow: FlowResult) -> GridSolution:
        """The solution from the request's power flow ``flow``: enforced, or as it is when enforcement is off
        (the request is still checked: a bad one must fail whatever the setting)."""
        if self.enforcer is None:
            check_request(self.feeder.n_bus, p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw)
            zero = np.zeros_like(p_kw)
            return GridSolution(flow, zero, zero, zero, flow.vm_pu)
        enf = self.enforcer.enforce(p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw, flow=flow)
        return GridSolution(enf.flow, enf.curtail_kw, enf.v2g_kw, enf.gen_curtail_kw, flow.vm_pu)

    def solve_batch(self, keyed: Sequence[tuple[Hashable, FeederRequest]], warm: WarmStarts) -> list[GridSolution]:
        """Several keys' requests (one each) in one vectorised solve and one enforcement, each warm-started
        from its key's last solution of the same batch size; each key's new solution is kept in ``warm``
        and returned without its warm-start state.

        One request is computed exactly as ``backend.solve`` then :meth:`enforce` would, to the last bit;
        several agree with that to the solver tolerance only: the sweep iterates a chunk of scenarios until
        all of them converge and the enforcer re-solves the whole batch while any scenario still needs it,
        so a scenario's last digits depend on its companions.
        """
        reqs = [r for _, r in keyed]
        sizes = [r.batch for r in reqs]
        inits = [warm.get(k, b) for (k, _), b in zip(keyed, sizes)]
        x = reqs[0] if len(reqs) == 1 else FeederRequest(*(np.concatenate(a) for a in zip(*reqs)))
        sol = self.enforce(*x, self._flow(x.p_kw, x.q_kvar, inits, sizes))
        if len(reqs) == 1:
            warm.put(keyed[0][0], sol.flow)
            return [sol.take(slice(None))]
        out = []
        start = 0
        for (key, _), b in zip(keyed, sizes):
            rows = slice(start, start + b)
            start += b
            warm.put(key, sol.flow.take(rows))
            out.append(sol.take(rows))
        return out

    def _flow(self, p_kw: np.ndarray, q_kvar: np.ndarray, inits: list[FlowResult | None],
              sizes: list[int]) -> FlowResult:
        """The power flow of the stacked requests, each warm-started from its ``inits`` entry (None: cold)."""
        warm_i = [i for i, x in enumerate(inits) if x is not None]
        if len(warm_i) in (0, len(inits)):
            return self.backend.solve(p_kw, q_kvar, init=FlowResult.concat(inits) if warm_i else None)
        # the backend warm-starts a whole batch or nothing: the warm requests in one call, the cold in another
        off = np.cumsum([0, *sizes])
        rows = [np.arange(off[i], off[i + 1]) for i in range(len(sizes))]
        rw = np.concatenate([rows[i] for i in warm_i])
        rc = np.concatenate([rows[i] for i in range(len(sizes)) if inits[i] is None])
        fw = self.backend.solve(p_kw[rw], q_kvar[rw], init=FlowResult.concat([inits[i] for i in warm_i]))
        fc = self.backend.solve(p_kw[rc], q_kvar[rc])
        return FlowResult.scatter([(fw, rw), (fc, rc)], int(off[-1]))


class WarmStarts:
    """The last solution of each key (a feeder; the actor: a client and a feeder), reused to warm-start the
    next solve of the same key and batch size.  A batch with a non-converged scenario is not kept: it would
    poison the next start.  At most ``max_size`` keys, the least recently used dropped (that key starts cold)."""

    def __init__(self, max_size: int = 1 << 30) -> None:
        self.max_size = check_int("max_size", max_size, 1)
        self._last: collections.OrderedDict[Hashable, FlowResult] = collections.OrderedDict()

    def get(self, key: Hashable, batch: int) -> FlowResult | None:
        last = self._last.get(key)
        return last if last is not None and last.state is not None and last.batch == batch else None

    def put(self, key: Hashable, flow: FlowResult) -> None:
        if flow.state is None or not flow.converged.all():
            self._last.pop(key, None)
            return
        self._last[key] = flow
        self._last.move_to_end(key)
        while len(self._last) > self.max_size:
            self._last.popitem(last=False)

    def drop(self, key: Hashable) -> None:
        self._last.pop(key, None)

    def drop_where(self, keep: Any) -> int:
        """Drop the keys for which ``keep(key)`` is false; returns how many."""
        gone = [k for k in self._last if not keep(k)]
        for k in gone:
            del self._last[k]
        return len(gone)

    def clear(self) -> None:
        self._last.clear()

    def __len__(self) -> int:
        return len(self._last)


class PendingSolution(Protocol):
    def result(self) -> GridSolution: ...


class GridService(Protocol):
    """What a simulator needs from a power-flow service: :class:`LocalGrid` in process, or the shared actor's
    client (:class:`evgrid.cluster.powerflow.PowerFlowClient`)."""

    def reset(self) -> None:
        """New episode: the next solve of every feeder starts cold."""

    def submit(self, f: int, p_kw: np.ndarray, q_kvar: np.ndarray, flex_charge_kw: np.ndarray,
               flex_v2g_kw: np.ndarray, flex_gen_kw: np.ndarray) -> PendingSolution:
        """Send feeder ``f``'s batch; ``.result()`` of the answer waits for its :class:`GridSolution`."""


class _Done(NamedTuple):
    solution: GridSolution

    def result(self) -> GridSolution:
        return self.solution


class LocalGrid:
    """Power flow and limit enforcement for every feeder of ``grid``, in this process."""

    def __init__(self, feeders: list[Feeder], grid: GridConfig) -> None:
        if not isinstance(grid, GridConfig):
            raise TypeError(f"grid: expected a GridConfig, got {type(grid).__name__}")
        self.solvers = [FeederSolver(f, grid) for f in feeders]
        self.warm = WarmStarts()

    def reset(self) -> None:
        self.warm.clear()

    def submit(self, f: int, p_kw: npt.ArrayLike, q_kvar: npt.ArrayLike, flex_charge_kw: npt.ArrayLike,
               flex_v2g_kw: npt.ArrayLike, flex_gen_kw: npt.ArrayLike | None = None) -> _Done:
        """:meth:`solve`, in the shape of a remote call (``.result()``): a simulator sends every feeder
        before waiting."""
        return _Done(self.solve(f, p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw))

    def solve(self, f: int, p_kw: npt.ArrayLike, q_kvar: npt.ArrayLike, flex_charge_kw: npt.ArrayLike,
              flex_v2g_kw: npt.ArrayLike, flex_gen_kw: npt.ArrayLike | None = None) -> GridSolution:
        """Solve feeder ``f`` for a batch (B, n_bus) and enforce its limits (``flex_gen_kw`` None: no
        curtailable generation)."""
        if not isinstance(f, int | np.integer) or not 0 <= f < len(self.solvers):
            check_int("f", f, 0, len(self.solvers) - 1)  # raises, naming the range
        solver = self.solvers[f]
        # the backend and the enforcer check what they read, which is every array (the flexibilities are
        # checked in ``enforce`` when enforcement is off)
        batch = np.shape(p_kw)[0] if np.ndim(p_kw) == 2 else 0  # a bad shape: cold, and the backend says why
        flow = solver.backend.solve(p_kw, q_kvar, init=self.warm.get(f, batch))
        sol = solver.enforce(p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw, flow)
        self.warm.put(f, sol.flow)
        return sol
