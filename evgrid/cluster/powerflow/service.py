"""The power-flow service: solve + limit enforcement for the feeders of one shard, micro-batched.

:class:`PowerFlowService` is the body of the shared actor (:mod:`.actor` wraps it in Ray) and the remote
twin of :class:`evgrid.grid.service.LocalGrid`: it builds its solvers the same way
(:class:`~evgrid.grid.service.FeederSolver`) and keeps warm starts by the same policy
(:class:`~evgrid.grid.service.WarmStarts`).  It knows nothing of Ray: any event loop runs its ``async``
methods (tests drive it in-process), and the Ray node it runs on comes in as ``node_id``.

Why asyncio: requests are collected by an asyncio batcher task per feeder while the event loop is free,
and one vectorised solve serves them all; there are no locks, and while a batch is being solved new
requests queue up (in Ray, or on the socket) and join the next batch.  A threaded actor would need a
condition variable per feeder and would fight over the GIL for nothing: the solve is single-threaded by
design (one thread per worker, ``OMP_NUM_THREADS=1``).

Micro-batching: the first pending request of a feeder opens a batch; it is solved when
``max_batch_requests`` clients are pending, or when every client that asked this feeder in the last
second is pending (lock-stepped env runners: nobody else is coming, so no wait at all with a single
client), or after ``max_wait_ms``.  Each client's rows are concatenated along the scenario axis, solved
in one backend call (two when some clients have a warm start and others not) and one enforcer call, then
routed back (:meth:`FeederSolver.solve_batch <evgrid.grid.service.FeederSolver.solve_batch>`).  Results
agree with solving each client alone to the solver tolerance (~1e-8 p.u.), not bit for bit: a scenario's
last digits depend on its batch companions.  With one request per batch (micro-batching off, or one
client) the answer is ``LocalGrid``'s to the last bit.

Warm starts: the previous solution is kept per (client id, feeder) and only reused for the same client
with the same batch size, exactly as ``LocalGrid`` keeps one per feeder; a request marked ``cold`` (the
client was reset) drops its client's state first.  Clients' states never mix.  At most
``max_warm_states`` of them are kept (least recently used dropped: that client just starts cold).  A
restarted actor has none: cold starts.

Requests come in two wire forms besides :meth:`PowerFlowService.solve`: :meth:`~PowerFlowService.solve_packed`
(a Ray call: the five arrays pickled as one ``(5, B, n_bus)`` array, the answer pickled) and the
same-node socket (:meth:`~PowerFlowService.channel`, framing in :mod:`.transport`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import time
from typing import Any

import numpy as np

from evgrid.cluster.powerflow.transport import ChannelServer, dumps
from evgrid.grid.config import GridConfig
from evgrid.grid.service import (FeederRequest, FeederSolver, GridSolution, WarmStarts, build_feeders, check_request,
                                 n_feeders)
from evgrid.validate import check_int, check_real

log = logging.getLogger(__name__)

# a client that asked a feeder this recently is expected to ask again: a batch waits for it (up to max_wait_ms)
_ACTIVE_WINDOW_S = 1.0
# GridConfig fields that shape the network, the solver or the enforcement: a client and an actor must agree on
# them; the rest (base load scale, load shape, diesel output, zones) only change what the client sends
_GRID_KEYS = ("feeder", "der", "city_networks", "city_base", "v_min_pu", "v_max_pu", "loading_max",
              "enforce_limits", "limit_rounds", "backend", "export_limit_kw")
REQUEST_ARRAYS = ("p_kw", "q_kvar", "flex_charge_kw", "flex_v2g_kw", "flex_gen_kw")
"""The arrays of a request, in the order of a packed ``(5, B, n_bus)`` request."""


def grid_key(grid: GridConfig) -> dict[str, Any]:
    """The fields a client's config and an actor's must share."""
    return {k: getattr(grid, k) for k in _GRID_KEYS}


def check_batching(max_batch_requests: int, max_wait_ms: float) -> None:
    check_int("max_batch_requests", max_batch_requests, 1, 4096)
    check_real("max_wait_ms", max_wait_ms, 0.0, 1000.0)


def check_packed(x: Any) -> np.ndarray:
    """The five request arrays stacked, ``(5, B, n_bus)`` in the order of :data:`REQUEST_ARRAYS`."""
    if not isinstance(x, np.ndarray) or x.ndim != 3 or x.shape[0] != len(REQUEST_ARRAYS):
        raise ValueError(f"payload: expected a pickled ({len(REQUEST_ARRAYS)}, batch, n_bus) array, got "
                         f"{type(x).__name__} {getattr(x, 'shape', '')}")
    return x


@dataclasses.dataclass(eq=False)
class _Request:
    client: str
    request: FeederRequest
    cold: bool
    future: asyncio.Future | None = None


@dataclasses.dataclass(eq=False)
class _FeederQueue:
    loop: asyncio.AbstractEventLoop  # its Event and futures belong to this loop
    pending: list[_Request] = dataclasses.field(default_factory=list)
    arrived: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    seen: dict[str, float] = dataclasses.field(default_factory=dict)  # client -> last request time, loop clock
    task: asyncio.Task | None = None


class PowerFlowService:
    """Solve + limit enforcement for the feeders ``f % n_shards == shard`` of a grid configuration.

    Args:
        grid: the grid configuration (feeders, backend, enforcement settings).
        shard, n_shards: this service serves feeder f where ``f % n_shards == shard``.
        micro_batching: collect concurrent requests into one solve per feeder; off: each request alone.
        max_batch_requests: most requests in one batch, 1..4096.
        max_wait_ms: longest a batch waits for more requests, 0..1000 ms.
        max_warm_states: warm-start states kept, one per (client, feeder), least recently used dropped, >= 1.
        node_id: the Ray node this service runs on (None: outside Ray); clients on that node use its
            same-node channel.
    """

    def __init__(self, grid: GridConfig, shard: int = 0, n_shards: int = 1, *, micro_batching: bool = True,
                 max_batch_requests: int = 64, max_wait_ms: float = 1.0, max_warm_states: int = 4096,
                 node_id: str | None = None) -> None:
        n_f = n_feeders(grid)
        check_int("n_shards", n_shards, 1, n_f)
        check_int("shard", shard, 0, n_shards - 1)
        check_batching(max_batch_requests, max_wait_ms)
        t0 = time.perf_counter()
        self.grid = grid
        self.shard = int(shard)
        self.n_shards = int(n_shards)
        self.n_feeders = n_f
        self.node_id = node_id
        feeders = build_feeders(grid).feeders
        # this shard's feeders only: the others' solvers and sensitivity matrices are not held here
        self.solvers = {f: FeederSolver(feeders[f], grid) for f in range(n_f) if f % n_shards == shard}
        for s in self.solvers.values():  # load the compiled kernels now, not on the first request
            s.backend.solve(s.feeder.base_p_kw[None], s.feeder.base_q_kvar[None])
        self.micro_batching = bool(micro_batching)
        self.max_batch_requests = int(max_batch_requests)
        self.max_wait_s = float(max_wait_ms) / 1e3
        self.warm = WarmStarts(check_int("max_warm_states", max_warm_states, 1))  # keyed (client, feeder)
        self._queues: dict[int, _FeederQueue] = {}
        self._stats = self._zero_stats()
        self._channel_server = ChannelServer(self._solve_frame, f"power-flow shard {shard}")
        self._channel_path: asyncio.Future | None = None  # the channel's path, once its server listens
        log.info("power-flow shard %d/%d: feeders %s ready in %.2f s", shard, n_shards, sorted(self.solvers),
                 time.perf_counter() - t0)

    # ------------------------------------------------------------------ control

    async def info(self) -> dict[str, Any]:
        return dict(shard=self.shard, n_shards=self.n_shards, n_feeders=self.n_feeders, feeders=sorted(self.solvers),
                    n_bus={f: s.feeder.n_bus for f, s in self.solvers.items()}, grid_key=grid_key(self.grid),
                    node=self.node_id, pid=os.getpid(), **self._settings())

    def _settings(self) -> dict[str, Any]:
        return dict(micro_batching=self.micro_batching, max_batch_requests=self.max_batch_requests,
                    max_wait_ms=self.max_wait_s * 1e3)

    async def configure(self, micro_batching: bool | None = None, max_batch_requests: int | None = None,
                        max_wait_ms: float | None = None) -> dict[str, Any]:
        """Change the batching settings (the benchmark switches micro-batching on and off); returns them."""
        mb = self.max_batch_requests if max_batch_requests is None else max_batch_requests
        mw = self.max_wait_s * 1e3 if max_wait_ms is None else max_wait_ms
        check_batching(mb, mw)
        if micro_batching is not None:
            self.micro_batching = bool(micro_batching)
        self.max_batch_requests, self.max_wait_s = int(mb), float(mw) / 1e3
        return self._settings()

    @staticmethod
    def _zero_stats() -> dict[str, Any]:
        return dict(requests=0, socket_requests=0, solves=0, scenarios=0, max_requests_per_solve=0, solve_s=0.0,
                    requests_per_feeder={}, requests_per_node={})

    async def stats(self, reset: bool = False) -> dict[str, Any]:
        """Counters since the start (or the last reset): requests (of which through the same-node socket),
        batched solves, scenarios, seconds solving, requests per feeder and per caller's node."""
        s = dict(self._stats, requests_per_feeder=dict(self._stats["requests_per_feeder"]),
                 requests_per_node=dict(self._stats["requests_per_node"]), warm_states=len(self.warm),
                 pid=os.getpid())
        if reset:
            self._stats = self._zero_stats()
        return s

    async def forget(self, client: str) -> int:
        """Drop a client's warm-start states; returns how many."""
        return self.warm.drop_where(lambda key: key[0] != client)

    # ------------------------------------------------------------------ requests

    async def solve(self, client: str, f: int, p_kw: np.ndarray, q_kvar: np.ndarray, flex_charge_kw: np.ndarray,
                    flex_v2g_kw: np.ndarray, flex_gen_kw: np.ndarray | None = None, cold: bool = False
                    ) -> GridSolution:
        """``LocalGrid.solve`` for one client's batch (B, n_bus); ``cold`` drops its warm start first.

        ``client``: ``"<node id>:<unique id>"`` (the counters group requests by node).  The returned flow
        carries no warm-start ``state``: that stays here, keyed by client and feeder.
        """
        req = self._request(client, f, p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw, cold)
        st = self._stats
        st["requests"] += 1
        st["requests_per_feeder"][f] = st["requests_per_feeder"].get(f, 0) + 1
        node = req.client.split(":", 1)[0]
        st["requests_per_node"][node] = st["requests_per_node"].get(node, 0) + 1
        if not self.micro_batching:
            return self._solve_batch(f, [req])[0]
        loop = asyncio.get_running_loop()
        q = self._queues.get(f)
        if q is None or q.loop is not loop:  # (in-process use may run several loops one after the other)
            q = self._queues[f] = _FeederQueue(loop)
        if q.task is None or q.task.done():
            q.task = loop.create_task(self._batcher(f, q))
        req.future = loop.create_future()
        q.pending.append(req)
        q.seen[req.client] = loop.time()
        q.arrived.set()
        return await req.future

    async def solve_packed(self, client: str, f: int, payload: bytes, cold: bool = False) -> bytes:
        """:meth:`solve` with the five arrays pickled into one ``(5, B, n_bus)`` array and the answer pickled:
        what clients send through Ray, which serialises bytes faster than several small arrays (~0.6 ms
        less per call on 2 cores)."""
        x = check_packed(pickle.loads(payload))
        return dumps(await self.solve(client, f, *x, cold=cold))

    async def channel(self) -> dict[str, Any]:
        """The same-node channel, started on first use: ``node`` (None outside Ray), socket ``path``, ``pid``."""
        if self._channel_path is None:  # a task, so that clients probing at once share one server
            self._channel_path = asyncio.ensure_future(self._channel_server.open())
        return dict(node=self.node_id, path=await self._channel_path, pid=os.getpid())

    async def _solve_frame(self, body: bytes) -> GridSolution:
        """A request from the channel: pickled ``(client, f, (5, B, n_bus) array, cold)``."""
        client, f, x, cold = pickle.loads(body)
        sol = await self.solve(client, f, *check_packed(x), cold=cold)
        self._stats["socket_requests"] += 1
        return sol

    def _request(self, client, f, p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw, cold) -> _Request:
        """Check one request, so a bad one fails alone instead of failing its batch."""
        if not isinstance(f, int | np.integer) or f not in self.solvers:
            raise ValueError(f"f: feeder {f!r} is not served by shard {self.shard} of {self.n_shards}; expected one "
                             f"of {sorted(self.solvers)} (feeders 0..{self.n_feeders - 1}, f % {self.n_shards} == "
                             f"{self.shard})")
        req = check_request(self.solvers[f].feeder.n_bus, p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw)
        return _Request(str(client), req, cold=bool(cold))

    # ------------------------------------------------------------------ batching

    def _ready(self, q: _FeederQueue, now: float) -> bool:
        pending = {r.client for r in q.pending}
        if len(pending) >= self.max_batch_requests:
            return True
        for c, t in list(q.seen.items()):
            if now - t > _ACTIVE_WINDOW_S:
                del q.seen[c]
            elif c not in pending:
                return False
        return True

    def _take(self, q: _FeederQueue) -> list[_Request]:
        """Up to max_batch_requests requests, one per client (a second one needs the first's warm start)."""
        batch: list[_Request] = []
        rest: list[_Request] = []
        clients: set[str] = set()
        for r in q.pending:
            if len(batch) < self.max_batch_requests and r.client not in clients:
                batch.append(r)
                clients.add(r.client)
            else:
                rest.append(r)
        q.pending = rest
        return batch

    async def _gather(self, q: _FeederQueue) -> None:
        """Wait until the pending requests make a batch (see the module docstring) or ``max_wait_ms`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while not self._ready(q, loop.time()):
            left = deadline - loop.time()
            if left <= 0:
                return
            q.arrived.clear()
            try:
                await asyncio.wait_for(q.arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _batcher(self, f: int, q: _FeederQueue) -> None:
        while True:
            if not q.pending:
                q.arrived.clear()
                await q.arrived.wait()
                continue
            await self._gather(q)
            batch = self._take(q)
            try:
                results = self._solve_batch(f, batch)
            except Exception as e:  # an unexpected failure goes to every caller of the batch, not to the loop
                log.exception("power-flow batch on feeder %d failed", f)
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
            else:
                for r, res in zip(batch, results):
                    if not r.future.done():  # a caller that went away
                        r.future.set_result(res)
            await asyncio.sleep(0)  # let arrivals and answers through before the next batch

    def _solve_batch(self, f: int, reqs: list[_Request]) -> list[GridSolution]:
        """One vectorised solve + enforcement for the requests of several clients on feeder ``f``."""
        t0 = time.perf_counter()
        for r in reqs:
            if r.cold:
                self.warm.drop((r.client, f))
        out = self.solvers[f].solve_batch([((r.client, f), r.request) for r in reqs], self.warm)
        st = self._stats
        st["solves"] += 1
        st["scenarios"] += sum(r.request.batch for r in reqs)
        st["max_requests_per_solve"] = max(st["max_requests_per_solve"], len(reqs))
        st["solve_s"] += time.perf_counter() - t0
        return out


__all__ = ["REQUEST_ARRAYS", "PowerFlowService", "check_batching", "check_packed", "grid_key"]
