"""The shared power-flow actor (micro-batching) and its client.

One Ray actor per shard holds the feeders of a grid configuration (built as
:class:`evgrid.envs.sim.Sim` builds them) and serves *solve + limit
enforcement* requests from every env runner: the remote twin of
:class:`evgrid.envs.sim.LocalGrid`.

Pieces::

    PowerFlowService                 the actor's logic (plain class, testable without Ray)
    PowerFlowActor                   ray.remote(PowerFlowService)
    get_or_create_actor(cfg, ...)    start (or find) the named shards evgrid-powerflow-<k>
    PowerFlowClient(cfg, ...)        LocalGrid's interface (reset, solve) over the shards
    make_grid(cfg, "local"|"actor")  LocalGrid, or a client when the actor exists

Why an async actor: requests are collected by an asyncio batcher task per
feeder while the event loop is free, and one vectorised solve serves them all;
there are no locks, and while a batch is being solved new requests queue up in
Ray and join the next batch.  A threaded actor would need a condition
variable per feeder and would fight over the GIL for nothing: the solve is
single-threaded by design (one thread per worker, ``OMP_NUM_THREADS=1``).

Micro-batching: the first pending request of a feeder opens a batch; it is
solved when ``max_batch_requests`` clients are pending, or when every client
that asked this feeder in the last second is pending (lock-stepped env
runners: nobody else is coming, so no wait at all with a single client), or
after ``max_wait_ms``.  Each client's rows are concatenated along the
scenario axis, solved in one backend call (two when some clients have a
warm start and others not) and one enforcer call, then routed back.  Results
agree with solving each client alone to the solver tolerance (~1e-8 p.u.),
not bit for bit: the sweep iterates chunks of 8 scenarios until all of them
converge, and the enforcer re-solves the whole batch while any scenario still
needs it, so a scenario's last digits depend on its batch companions.  With
one request per batch (micro-batching off, or one client) the answer is the
same as ``LocalGrid``'s to the last bit.

Warm starts: the previous solution is kept per (client id, feeder) and only
reused for the same client with the same batch size, exactly as
``LocalGrid`` keeps one per feeder; ``PowerFlowClient.reset()`` makes the
next request of each feeder cold.  Clients' states never mix.  The actor
keeps at most ``max_warm_states`` of them (least recently used dropped: that
client just starts cold).  After a restart the actor has none: cold starts.

Transport: a Ray call costs ~1 ms on the 2-core dev machine, five times the solve of 8 scenarios on
IEEE 33.  Clients on the actor's node therefore send their requests through a Unix socket the actor serves
from its event loop (:meth:`PowerFlowService.channel`; ~20 us a round trip) into the same batchers; Ray
still finds the actor, restarts it and carries the calls of clients on other nodes (``transport="ray"``
forces Ray calls everywhere).

Sharding: with ``num_actors = n``, feeder ``f`` lives in actor ``f % n``
(named ``<name>-<f % n>``); the client routes each feeder's call there.

Faults: actors are created with ``max_restarts`` and ``max_task_retries=0``;
retrying is the client's job.  A call that fails because the actor died or is
restarting (``RayActorError``: ``ActorDiedError``, ``ActorUnavailableError``), or whose
channel broke, is re-sent after an exponential backoff, up to ``max_retries`` times, then a
``RuntimeError`` names the actor and the number of tries.  No step is skipped.

Lifetime: hold the handles ``get_or_create_actor`` returns for as long as
the actors must live: Ray collects a named, non-detached actor once no
handle to it is left.  Actors are *not* detached by default, so they end with the job
(driver) that created them and never outlive a crashed training run; env
runners of that job find them by name because the namespace is explicit
(``evgrid``).  ``detached=True`` makes a long-lived service shared by several
jobs; end it with ``ray.kill``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import dataclasses
import logging
import os
import pickle
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import ray.exceptions

from evgrid.envs.config import EnvConfig
from evgrid.grid.config import GridConfig
from evgrid.grid.service import FeederSet, GridSolution, LocalGrid, build_feeders
from evgrid.grid.feeders import Feeder
from evgrid.grid.flow import FlowResult, make_backend
from evgrid.validate import as_batch
from evgrid.grid.limits import LimitEnforcer

log = logging.getLogger(__name__)

DEFAULT_NAME = "evgrid-powerflow"
DEFAULT_NAMESPACE = "evgrid"
MODES = ("local", "actor")
TRANSPORTS = ("auto", "ray")
# a client that asked a feeder this recently is expected to ask again: a batch waits for it (up to max_wait_ms)
_ACTIVE_WINDOW_S = 1.0
# the actor died, is restarting or is unreachable: worth a retry (an error raised by solve itself is not)
_RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# GridConfig fields that shape the network, the solver or the enforcement: a client and an actor must agree on
# them; the rest (base load scale, load shape, diesel output) only change the injections the client sends
_GRID_KEYS = ("feeder", "der", "city_networks", "city_base", "v_min_pu", "v_max_pu", "loading_max",
              "enforce_limits", "limit_rounds", "backend")


class ActorNotFoundError(LookupError):
    """No power-flow actor of that name in that namespace."""


# ---------------------------------------------------------------------------------------------- feeders


def n_feeders(grid: GridConfig) -> int:
    """Number of feeders ``grid`` builds, without building them."""
    return grid.city_networks if grid.feeder == "city" else 1


def grid_key(grid: GridConfig) -> dict[str, Any]:
    """The fields a client's config and an actor's must share."""
    return {k: getattr(grid, k) for k in _GRID_KEYS}


def _grid_of(cfg: EnvConfig | GridConfig) -> GridConfig:
    if isinstance(cfg, EnvConfig):
        return cfg.grid
    if isinstance(cfg, GridConfig):
        return cfg
    raise TypeError(f"cfg: expected an EnvConfig or a GridConfig, got {type(cfg).__name__}")


def actor_name(name: str, k: int) -> str:
    """Name of shard ``k``."""
    return f"{name}-{k}"


# ---------------------------------------------------------------------------------------------- flow helpers


def _flow_rows(flow: FlowResult, rows: slice | np.ndarray, state: bool = True) -> FlowResult:
    """The scenarios ``rows`` of a batch result (views for a slice); ``state=False`` drops the warm-start state."""
    kw = {f.name: getattr(flow, f.name) for f in dataclasses.fields(flow)}
    out = {k: (v[rows] if v is not None else None) for k, v in kw.items()}
    if not state:
        out["state"] = None
    return FlowResult(**out)


def _flow_concat(flows: Sequence[FlowResult]) -> FlowResult:
    """Batch results stacked along the scenario axis (state only where all have one)."""
    if len(flows) == 1:
        return flows[0]
    out = {}
    for f in dataclasses.fields(FlowResult):
        parts = [getattr(x, f.name) for x in flows]
        out[f.name] = None if any(p is None for p in parts) else np.concatenate(parts)
    return FlowResult(**out)


def _flow_scatter(parts: Sequence[tuple[FlowResult, np.ndarray]], n: int) -> FlowResult:
    """One batch of ``n`` scenarios from results that each cover the given rows."""
    first = parts[0][0]
    out = {}
    for f in dataclasses.fields(FlowResult):
        v0 = getattr(first, f.name)
        if any(getattr(p, f.name) is None for p, _ in parts):
            out[f.name] = None
            continue
        a = np.empty((n, *v0.shape[1:]), dtype=v0.dtype)
        for p, rows in parts:
            a[rows] = getattr(p, f.name)
        out[f.name] = a
    return FlowResult(**out)


# ---------------------------------------------------------------------------------------------- the service


@dataclasses.dataclass(eq=False)
class _Request:
    client: str
    p_kw: np.ndarray  # (B, n_bus)
    q_kvar: np.ndarray
    flex_charge_kw: np.ndarray
    flex_v2g_kw: np.ndarray
    cold: bool
    future: asyncio.Future | None = None


@dataclasses.dataclass(eq=False)
class _FeederQueue:
    loop: asyncio.AbstractEventLoop  # its Event and futures belong to this loop
    pending: list[_Request] = dataclasses.field(default_factory=list)
    arrived: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    seen: dict[str, float] = dataclasses.field(default_factory=dict)  # client -> last request time, loop clock
    task: asyncio.Task | None = None


def _check_batching(max_batch_requests: int, max_wait_ms: float) -> None:
    if not isinstance(max_batch_requests, int | np.integer) or not 1 <= max_batch_requests <= 4096:
        raise ValueError(f"max_batch_requests: expected an integer in [1, 4096], got {max_batch_requests!r}")
    if not 0.0 <= float(max_wait_ms) <= 1000.0:
        raise ValueError(f"max_wait_ms: expected a wait in [0, 1000] ms, got {max_wait_ms!r}")


# a socket frame: request sequence number, body length
_FRAME = struct.Struct("!QQ")


def _check_packed(x: Any) -> np.ndarray:
    """The four request arrays stacked, (4, B, n_bus): p_kw, q_kvar, flex_charge_kw, flex_v2g_kw."""
    if not isinstance(x, np.ndarray) or x.ndim != 3 or x.shape[0] != 4:
        raise ValueError(f"payload: expected a pickled (4, batch, n_bus) array, got {type(x).__name__} "
                         f"{getattr(x, 'shape', '')}")
    return x


_CHANNEL_PREFIX = "evgrid-pf-"


def _remove_channel(path: str) -> None:
    for rm in (os.unlink, os.rmdir):
        try:
            rm(path)
        except OSError:
            pass
        path = os.path.dirname(path)


def _remove_dead_channels(min_age_s: float = 60.0) -> int:
    """Remove this user's channel directories whose actor is gone; returns how many.

    An actor killed by Ray (SIGKILL: restarts, ``ray.kill``, the end of a job) runs no exit hook, so each
    would leave its directory behind.  A new channel sweeps them: a socket nobody listens on refuses the
    connection.  Directories younger than ``min_age_s`` are left alone (their actor may be binding now).
    """
    root = tempfile.gettempdir()
    removed = 0
    try:
        names = [n for n in os.listdir(root) if n.startswith(_CHANNEL_PREFIX)]
    except OSError:
        return 0
    now = time.time()
    for name in names:
        d = os.path.join(root, name)
        path = os.path.join(d, "solve.sock")
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if st.st_uid != os.getuid() or now - st.st_mtime < min_age_s:
            continue
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(path)  # a live actor's channel: keep it
        except (ConnectionRefusedError, FileNotFoundError):
            _remove_channel(path)
            removed += not os.path.exists(d)
        except OSError:
            continue
    return removed


def _node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class PowerFlowService:
    """Solve + limit enforcement for the feeders ``f % n_shards == shard`` of a grid configuration.

    The body of :data:`PowerFlowActor`; usable in-process (its ``async`` methods in an event loop) for tests.

    Args:
        grid: the grid configuration (feeders, backend, enforcement settings).
        shard, n_shards: this actor serves feeder f where ``f % n_shards == shard``.
        micro_batching: collect concurrent requests into one solve per feeder; off: each request alone.
        max_batch_requests: most requests in one batch, 1..4096.
        max_wait_ms: longest a batch waits for more requests, 0..1000 ms.
        max_warm_states: warm-start states kept, one per (client, feeder), least recently used dropped.
    """

    def __init__(self, grid: GridConfig, shard: int = 0, n_shards: int = 1, *, micro_batching: bool = True,
                 max_batch_requests: int = 64, max_wait_ms: float = 1.0, max_warm_states: int = 4096) -> None:
        n_f = n_feeders(grid)
        if not 1 <= n_shards <= n_f:
            raise ValueError(f"n_shards: expected 1..{n_f} (the config's feeders), got {n_shards}")
        if not 0 <= shard < n_shards:
            raise ValueError(f"shard: expected 0..{n_shards - 1}, got {shard}")
        _check_batching(max_batch_requests, max_wait_ms)
        if max_warm_states < 1:
            raise ValueError(f"max_warm_states: expected >= 1, got {max_warm_states}")
        t0 = time.perf_counter()
        self.grid = grid
        self.shard = shard
        self.n_shards = n_shards
        self.n_feeders = n_f
        feeders = build_feeders(grid).feeders
        # this shard's feeders only: the others' solvers and sensitivity matrices are not held here
        self.feeders = {f: feeders[f] for f in range(n_f) if f % n_shards == shard}
        self.backends = {f: make_backend(fd, grid.backend) for f, fd in self.feeders.items()}
        self.enforcers = ({f: LimitEnforcer(b, loading_max=grid.loading_max, max_rounds=grid.limit_rounds)
                           for f, b in self.backends.items()} if grid.enforce_limits else None)
        for f, b in self.backends.items():  # load the compiled kernels now, not on the first request
            fd = self.feeders[f]
            b.solve(fd.base_p_kw[None], fd.base_q_kvar[None])
        self.micro_batching = bool(micro_batching)
        self.max_batch_requests = int(max_batch_requests)
        self.max_wait_s = float(max_wait_ms) / 1e3
        self.max_warm_states = int(max_warm_states)
        self._warm: collections.OrderedDict[tuple[str, int], FlowResult] = collections.OrderedDict()
        self._queues: dict[int, _FeederQueue] = {}
        self._stats = self._zero_stats()
        self._server: asyncio.Future | None = None  # the channel's path, once its server listens
        self._listener: asyncio.AbstractServer | None = None
        self._answers: set[asyncio.Task] = set()  # socket requests being solved (the loop keeps weak refs only)
        log.info("power-flow shard %d/%d: feeders %s ready in %.2f s", shard, n_shards, sorted(self.feeders),
                 time.perf_counter() - t0)

    # ------------------------------------------------------------------ control

    async def info(self) -> dict[str, Any]:
        return dict(shard=self.shard, n_shards=self.n_shards, n_feeders=self.n_feeders, feeders=sorted(self.feeders),
                    n_bus={f: fd.n_bus for f, fd in self.feeders.items()}, grid_key=grid_key(self.grid),
                    pid=os.getpid(), **self._settings())

    def _settings(self) -> dict[str, Any]:
        return dict(micro_batching=self.micro_batching, max_batch_requests=self.max_batch_requests,
                    max_wait_ms=self.max_wait_s * 1e3)

    async def configure(self, micro_batching: bool | None = None, max_batch_requests: int | None = None,
                        max_wait_ms: float | None = None) -> dict[str, Any]:
        """Change the batching settings (the benchmark switches micro-batching on and off); returns them."""
        mb = self.max_batch_requests if max_batch_requests is None else max_batch_requests
        mw = self.max_wait_s * 1e3 if max_wait_ms is None else max_wait_ms
        _check_batching(mb, mw)
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
        batched solves, scenarios, seconds solving."""
        s = dict(self._stats, requests_per_feeder=dict(self._stats["requests_per_feeder"]),
                 requests_per_node=dict(self._stats["requests_per_node"]),
                 warm_states=len(self._warm), pid=os.getpid())
        if reset:
            self._stats = self._zero_stats()
        return s

    async def forget(self, client: str) -> int:
        """Drop a client's warm-start states; returns how many."""
        keys = [k for k in self._warm if k[0] == client]
        for k in keys:
            del self._warm[k]
        return len(keys)

    # ------------------------------------------------------------------ solving

    async def solve(self, client: str, f: int, p_kw: np.ndarray, q_kvar: np.ndarray, flex_charge_kw: np.ndarray,
                    flex_v2g_kw: np.ndarray, cold: bool = False) -> GridSolution:
        """``LocalGrid.solve`` for one client's batch (B, n_bus); ``cold`` drops its warm start first.

        The returned flow carries no warm-start ``state``: that stays here, keyed by client and feeder.
        """
        req = self._request(client, f, p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, cold)
        st = self._stats
        st["requests"] += 1
        st["requests_per_feeder"][f] = st["requests_per_feeder"].get(f, 0) + 1
        node = client.split(":", 1)[0]
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
        q.seen[client] = loop.time()
        q.arrived.set()
        return await req.future

    async def solve_packed(self, client: str, f: int, payload: bytes, cold: bool = False) -> bytes:
        """:meth:`solve` with the four arrays pickled into one ``(4, B, n_bus)`` array and the answer pickled:
        what :class:`PowerFlowClient` sends through Ray, since Ray serialises bytes faster than several small
        arrays (~0.6 ms less per call on the 2-core dev machine)."""
        x = _check_packed(pickle.loads(payload))
        sol = await self.solve(client, f, x[0], x[1], x[2], x[3], cold)
        return pickle.dumps(sol, protocol=pickle.HIGHEST_PROTOCOL)

    async def channel(self) -> dict[str, Any]:
        """The same-node fast path, started on first use: a Unix socket served by this actor's event loop.

        A Ray call costs ~1 ms on the dev machine (gRPC, thread hand-offs) against ~20 us for a round trip on
        a Unix socket, while the solve itself takes ~0.2 ms; clients on this node send their requests here
        and keep Ray for finding the actor, restarts and clients on other nodes.  The socket lives in a fresh
        private (0700) directory, so only this user's processes can reach it.
        """
        if self._server is None:  # a task, so that clients probing at once share one server
            self._server = asyncio.ensure_future(self._open_channel())
        return dict(node=_node_id(), path=await self._server, pid=os.getpid())

    async def _open_channel(self) -> str:
        _remove_dead_channels()
        path = os.path.join(tempfile.mkdtemp(prefix=_CHANNEL_PREFIX), "solve.sock")
        self._listener = await asyncio.start_unix_server(self._serve, path)
        atexit.register(_remove_channel, path)
        log.info("power-flow shard %d: same-node channel at %s", self.shard, path)
        return path

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: frames in, each answered when its solve is done (in any order)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                seq, n = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                body = await reader.readexactly(n)
                task = loop.create_task(self._answer(writer, seq, body))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, seq: int, body: bytes) -> None:
        try:
            client, f, x, cold = pickle.loads(body)
            x = _check_packed(x)
            out = (True, await self.solve(client, f, x[0], x[1], x[2], x[3], cold))
            self._stats["socket_requests"] += 1
        except Exception as e:  # the caller's error (bad request), raised there as it is raised here
            out = (False, e)
        try:
            data = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # an exception that does not pickle
            data = pickle.dumps((False, RuntimeError(f"{type(out[1]).__name__}: {out[1]}")))
            log.debug("power-flow answer %d: %s", seq, e)
        if not writer.is_closing():
            writer.write(_FRAME.pack(seq, len(data)) + data)

    def _request(self, client, f, p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, cold) -> _Request:
        """Validate one request, so a bad one fails alone instead of failing its batch."""
        if not isinstance(f, int | np.integer) or f not in self.feeders:
            raise ValueError(f"f: feeder {f!r} is not served by shard {self.shard} of {self.n_shards}; expected one "
                             f"of {sorted(self.feeders)} (feeders 0..{self.n_feeders - 1}, f % {self.n_shards} == "
                             f"{self.shard})")
        n_bus = self.feeders[f].n_bus
        p = as_batch("p_kw", p_kw, n_bus)
        arrs = [p]
        for name, x in (("q_kvar", q_kvar), ("flex_charge_kw", flex_charge_kw), ("flex_v2g_kw", flex_v2g_kw)):
            a = as_batch(name, x, n_bus)
            if a.shape != p.shape:
                raise ValueError(f"{name}: expected shape {p.shape} like p_kw, got {a.shape}")
            if name != "q_kvar" and (a < 0).any():
                raise ValueError(f"{name}: expected values >= 0 kW, got min {a.min()}")
            arrs.append(a)
        return _Request(str(client), *arrs, cold=bool(cold))

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

    async def _batcher(self, f: int, q: _FeederQueue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not q.pending:
                q.arrived.clear()
                await q.arrived.wait()
                continue
            deadline = loop.time() + self.max_wait_s
            while not self._ready(q, loop.time()):
                left = deadline - loop.time()
                if left <= 0:
                    break
                q.arrived.clear()
                try:
                    await asyncio.wait_for(q.arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
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
        backend = self.backends[f]
        sizes = [r.p_kw.shape[0] for r in reqs]
        off = np.cumsum([0, *sizes])
        n = int(off[-1])
        prev: list[FlowResult | None] = []
        for r in reqs:
            key = (r.client, f)
            if r.cold:
                self._warm.pop(key, None)
            last = self._warm.get(key)
            # as LocalGrid: warm only from a state of this client, this feeder and this batch size
            prev.append(last if last is not None and last.state is not None and last.batch == r.p_kw.shape[0]
                        else None)
        if len(reqs) == 1:
            r = reqs[0]
            p, q, fc, fv = r.p_kw, r.q_kvar, r.flex_charge_kw, r.flex_v2g_kw
        else:
            p = np.concatenate([r.p_kw for r in reqs])
            q = np.concatenate([r.q_kvar for r in reqs])
            fc = np.concatenate([r.flex_charge_kw for r in reqs])
            fv = np.concatenate([r.flex_v2g_kw for r in reqs])
        warm = [i for i, x in enumerate(prev) if x is not None]
        if not warm:
            flow = backend.solve(p, q)
        elif len(warm) == len(reqs):
            flow = backend.solve(p, q, init=_flow_concat(prev))
        else:
            # the backend warm-starts a whole batch or nothing: warm and cold clients in one call each
            cold = [i for i in range(len(reqs)) if prev[i] is None]
            rw = np.concatenate([np.arange(off[i], off[i + 1]) for i in warm])
            rc = np.concatenate([np.arange(off[i], off[i + 1]) for i in cold])
            fw = backend.solve(p[rw], q[rw], init=_flow_concat([prev[i] for i in warm]))
            fcold = backend.solve(p[rc], q[rc])
            flow = _flow_scatter([(fw, rw), (fcold, rc)], n)
        flow, curtail, v2g, vm_dispatch = enforce_limits(self.enforcers[f] if self.enforcers else None, p, q, fc, fv,
                                                         flow)
        out = []
        for i, r in enumerate(reqs):
            rows = slice(int(off[i]), int(off[i + 1]))
            mine = _flow_rows(flow, rows)
            key = (r.client, f)
            # a non-converged scenario would poison the next warm start
            if mine.converged.all() and mine.state is not None:
                self._warm[key] = mine
                self._warm.move_to_end(key)
                while len(self._warm) > self.max_warm_states:
                    self._warm.popitem(last=False)
            else:
                self._warm.pop(key, None)
            out.append(GridSolution(_flow_rows(flow, rows, state=False), curtail[rows], v2g[rows],
                                    vm_dispatch[rows]))
        st = self._stats
        st["solves"] += 1
        st["scenarios"] += n
        st["max_requests_per_solve"] = max(st["max_requests_per_solve"], len(reqs))
        st["solve_s"] += time.perf_counter() - t0
        return out


PowerFlowActor = ray.remote(PowerFlowService)
"""The Ray actor class; create it through :func:`get_or_create_actor` (name, namespace, restarts)."""


# ---------------------------------------------------------------------------------------------- creating actors


def get_or_create_actor(cfg: EnvConfig | GridConfig, *, name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE,
                        num_actors: int = 1, num_cpus: float = 0.0, max_restarts: int = 3, detached: bool = False,
                        micro_batching: bool = True, max_batch_requests: int = 64, max_wait_ms: float = 1.0,
                        wait: bool = True) -> list[Any]:
    """Start the shards ``<name>-0 .. <name>-<num_actors-1>`` (or find them); returns their handles.

    Args:
        cfg: the environment (or grid) configuration whose feeders the actors hold.
        num_actors: shards, 1..number of feeders; feeder f goes to shard ``f % num_actors``.
        num_cpus: CPUs each actor reserves, >= 0 (0: it shares the env runners' CPUs).
        max_restarts: restarts Ray grants each actor after it dies, -1 (forever) or >= 0.
        detached: outlive the creating job (a service for several jobs); default: end with it.
        wait: block until every actor has built its feeders (and check an existing one matches).

    An actor of that name that already exists is reused if it holds the same grid and sharding (its batching
    settings stay as they are: change them with ``configure``); otherwise a ValueError says so (pick another
    ``name`` or kill it).
    """
    g = _grid_of(cfg)
    n_f = n_feeders(g)
    if not isinstance(num_actors, int | np.integer) or not 1 <= num_actors <= n_f:
        raise ValueError(f"num_actors: expected 1..{n_f} (one feeder per shard at least), got {num_actors!r}")
    if not num_cpus >= 0:
        raise ValueError(f"num_cpus: expected >= 0, got {num_cpus!r}")
    if not isinstance(max_restarts, int | np.integer) or max_restarts < -1:
        raise ValueError(f"max_restarts: expected -1 (unbounded) or >= 0, got {max_restarts!r}")
    _check_batching(max_batch_requests, max_wait_ms)
    if not ray.is_initialized():
        raise RuntimeError("get_or_create_actor: Ray is not initialised; call ray.init() or "
                           "evgrid.cluster.runtime.connect() first")
    handles = []
    for k in range(num_actors):
        handles.append(PowerFlowActor.options(
            name=actor_name(name, k), namespace=namespace, get_if_exists=True,
            lifetime="detached" if detached else None, num_cpus=num_cpus, max_restarts=int(max_restarts),
            max_task_retries=0,
        ).remote(g, k, int(num_actors), micro_batching=micro_batching, max_batch_requests=max_batch_requests,
                 max_wait_ms=max_wait_ms))
    if wait:
        for k, info in enumerate(ray.get([h.info.remote() for h in handles])):
            if info["grid_key"] != grid_key(g) or info["n_shards"] != num_actors:
                raise ValueError(f"name: actor {actor_name(name, k)!r} in namespace {namespace!r} already serves "
                                 f"another grid or sharding ({info['grid_key']}, {info['n_shards']} shards); "
                                 f"pick another name or ray.kill it")
        log.info("power-flow actors %s-0..%d ready in namespace %r", name, num_actors - 1, namespace)
    return handles


# ---------------------------------------------------------------------------------------------- the client


class _ChannelLost(ConnectionError):
    """The same-node socket broke (the actor died or restarts): worth a retry, as a RayActorError is."""


class _Channel:
    """A blocking connection to a shard's same-node socket (:meth:`PowerFlowService.channel`).

    Requests carry a sequence number; answers may come back in any order (two feeders of one shard are
    solved by two batchers), so one that arrives early waits here for its ``receive``.  A broken socket
    raises :class:`_ChannelLost`; a timeout raises ``TimeoutError``.
    """

    def __init__(self, path: str, timeout_s: float | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self._seq = 0
        self._early: dict[int, bytearray] = {}
        with self._lost():
            self.sock.connect(path)

    @contextlib.contextmanager
    def _lost(self):
        try:
            yield
        except TimeoutError:
            raise
        except OSError as e:
            self.sock.close()
            raise _ChannelLost(f"{type(e).__name__}: {e}") from e

    def send(self, body: bytes) -> int:
        self._seq += 1
        with self._lost():
            self.sock.sendall(_FRAME.pack(self._seq, len(body)) + body)
        return self._seq

    def receive(self, seq: int) -> bytearray:
        with self._lost():
            while seq not in self._early:
                got, n = _FRAME.unpack(self._read(_FRAME.size))
                self._early[got] = self._read(n)
        return self._early.pop(seq)

    def _read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        k = 0
        while k < n:
            m = self.sock.recv_into(view[k:])
            if m == 0:
                raise ConnectionResetError("the power-flow actor closed the channel")
            k += m
        return buf

    def close(self) -> None:
        self.sock.close()


_TIMEOUTS = (ray.exceptions.GetTimeoutError, TimeoutError)
_DOWN = (*_RETRYABLE, _ChannelLost)


class PendingSolve:
    """A request in flight; :meth:`result` waits for it, re-sending it after an actor failure."""

    def __init__(self, client: PowerFlowClient, f: int, request: tuple[np.ndarray, bool]) -> None:
        self._client = client
        self.f = f
        self._request = request
        self._send()

    def _send(self) -> None:
        self._sent: tuple | None = None
        self._error: BaseException | None = None
        try:
            self._sent = self._client._send(self.f, self._request)
        except (*_TIMEOUTS, *_DOWN) as e:  # a dead actor, found while sending: result() retries
            self._error = e

    def result(self) -> GridSolution:
        c = self._client
        k = c.shard_of(self.f)
        tries = 1
        while True:
            try:
                if self._error is not None:
                    raise self._error
                ok, value = c._receive(self._sent)
                break
            except _TIMEOUTS as e:
                # not re-sent: the first request may still land and overwrite the warm start out of order
                raise RuntimeError(f"power-flow actor {c.actor_name(k)!r} (namespace {c.namespace!r}): no answer "
                                   f"for feeder {self.f} within timeout_s={c.timeout_s}") from e
            except _DOWN as e:
                if tries > c.max_retries:
                    first_line = str(e).splitlines()[0] if str(e) else ""
                    raise RuntimeError(
                        f"power-flow actor {c.actor_name(k)!r} (namespace {c.namespace!r}) is unavailable: feeder "
                        f"{self.f}'s solve failed {tries} tries in a row (1 + max_retries={c.max_retries}); last "
                        f"error: {type(e).__name__}: {first_line}") from e
                wait_s = min(c.backoff_s * 2 ** (tries - 1), c.max_backoff_s)
                log.warning("power-flow actor %r: %s on feeder %d; retry %d/%d in %.2f s", c.actor_name(k),
                            type(e).__name__, self.f, tries, c.max_retries, wait_s)
                c.retries += 1
                time.sleep(wait_s)
                c._refresh(k)
                tries += 1
                self._send()
        if not ok:  # the actor's own error (a bad request): raised here as it was raised there
            raise value
        return value


class PowerFlowClient:
    """``LocalGrid``'s interface (``reset``, ``solve``) served by the named power-flow actors.

    Args:
        cfg: the environment (or grid) configuration; must match the actors' grid (:func:`grid_key`).
        name, namespace: the actors are ``<name>-<k>`` in ``namespace``; the shard count comes from shard 0.
        max_retries: re-sends of a call whose actor died or is restarting, >= 0.
        backoff_s: first wait before a re-send, doubling each time up to ``max_backoff_s``.
        timeout_s: longest wait for one answer (None: no limit); past it a RuntimeError.
        transport: ``auto``: requests to a shard on this node go through its Unix socket
            (:meth:`PowerFlowService.channel`, ~20 us a round trip against ~1 ms for a Ray call), the others
            through Ray; ``ray``: Ray calls only.

    Each client (and each unpickled copy of one) has its own id, so its warm starts are its own.
    """

    def __init__(self, cfg: EnvConfig | GridConfig, *, name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE,
                 max_retries: int = 12, backoff_s: float = 0.1, max_backoff_s: float = 2.0,
                 timeout_s: float | None = None, transport: str = "auto") -> None:
        if not isinstance(max_retries, int | np.integer) or max_retries < 0:
            raise ValueError(f"max_retries: expected an integer >= 0, got {max_retries!r}")
        if not 0.0 <= backoff_s <= 60.0:
            raise ValueError(f"backoff_s: expected 0..60 s, got {backoff_s!r}")
        if not backoff_s <= max_backoff_s <= 600.0:
            raise ValueError(f"max_backoff_s: expected backoff_s..600 s, got {max_backoff_s!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0 s or None, got {timeout_s!r}")
        if transport not in TRANSPORTS:  # (checked before any Ray call)
            raise ValueError(f"transport: expected one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.grid = _grid_of(cfg)
        self.name = name
        self.namespace = namespace
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.timeout_s = timeout_s
        self.retries = 0  # re-sends so far (all feeders)
        first = self._lookup(0)
        info = ray.get(first.info.remote())
        self.n_shards = int(info["n_shards"])
        self.n_feeders = int(info["n_feeders"])
        if info["grid_key"] != grid_key(self.grid):
            mine, theirs = grid_key(self.grid), info["grid_key"]
            diff = {k: (mine[k], theirs.get(k)) for k in mine if mine[k] != theirs.get(k)}
            raise ValueError(f"cfg: the grid differs from the one actor {actor_name(name, 0)!r} serves "
                             f"(field: (this config, the actor's)): {diff}")
        self._handles = [first] + [self._lookup(k) for k in range(1, self.n_shards)]
        self._new_identity()
        self.transport = transport

    def _new_identity(self) -> None:
        # "<node id>:<uuid>": the actor counts requests per node from it (a multi-node run shows where its
        # callers live)
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        self.client_id = f"{node}:{uuid.uuid4().hex}"
        self._cold: set[int] = set()  # an unknown id has no warm state anywhere
        # per shard: None (not probed yet), False (Ray calls) or the open same-node channel
        self._channels: list[_Channel | bool | None] = [None] * self.n_shards

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("client_id", "_cold", "_channels")}

    def __setstate__(self, state: dict) -> None:
        # a copy in another process is another client: it must not share (and race on) the original's warm starts
        self.__dict__.update(state)
        self._new_identity()

    @property
    def transport(self) -> str:
        """``auto`` (same-node socket where the shard is on this node) or ``ray``; settable."""
        return self._transport

    @transport.setter
    def transport(self, value: str) -> None:
        if value not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {', '.join(TRANSPORTS)}, got {value!r}")
        self._transport = value
        for k in range(self.n_shards):
            self._drop_channel(k)

    def actor_name(self, k: int) -> str:
        return actor_name(self.name, k)

    def _drop_channel(self, k: int) -> None:
        ch = self._channels[k]
        if isinstance(ch, _Channel):
            ch.close()
        self._channels[k] = None

    def shard_of(self, f: int) -> int:
        """The shard serving feeder ``f``."""
        return f % self.n_shards

    def _lookup(self, k: int) -> Any:
        try:
            return ray.get_actor(self.actor_name(k), namespace=self.namespace)
        except ValueError as e:
            raise ActorNotFoundError(f"name: no power-flow actor {self.actor_name(k)!r} in namespace "
                                     f"{self.namespace!r}; start it with get_or_create_actor") from e

    def _refresh(self, k: int) -> None:
        """Look the shard up again: someone may have re-created it under the same name; its channel is new."""
        self._drop_channel(k)
        try:
            self._handles[k] = ray.get_actor(self.actor_name(k), namespace=self.namespace)
        except ValueError:
            pass  # gone for good (or not back yet): the next try fails and counts

    def _channel(self, k: int) -> _Channel | None:
        """Shard ``k``'s same-node channel, opened on first use; None: use Ray calls."""
        ch = self._channels[k]
        if ch is None:
            ch = False
            if self.transport == "auto":
                info = ray.get(self._handles[k].channel.remote(), timeout=self.timeout_s)
                if info["node"] is not None and info["node"] == _node_id():
                    try:
                        ch = _Channel(info["path"], self.timeout_s)
                    except _ChannelLost as e:  # the actor just answered: its socket is out of reach from here
                        log.warning("power-flow actor %r: same-node channel %s unreachable (%s); using Ray calls",
                                    self.actor_name(k), info["path"], e)
                        ch = False
            self._channels[k] = ch
        return ch or None

    def _send(self, f: int, request: tuple[np.ndarray, bool]) -> tuple:
        x, cold = request
        k = self.shard_of(f)
        ch = self._channel(k)
        if ch is not None:
            return ch, ch.send(pickle.dumps((self.client_id, f, x, cold), protocol=pickle.HIGHEST_PROTOCOL))
        payload = pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)
        return None, self._handles[k].solve_packed.remote(self.client_id, f, payload, cold)

    def _receive(self, sent: tuple) -> tuple[bool, Any]:
        """(True, solution), or (False, the actor's exception) for a bad request sent through a channel."""
        ch, ticket = sent
        if ch is None:
            return True, pickle.loads(ray.get(ticket, timeout=self.timeout_s))
        return pickle.loads(ch.receive(ticket))

    def reset(self) -> None:
        """New episode: the next solve of every feeder starts cold, as ``LocalGrid.reset``."""
        self._cold = set(range(self.n_feeders))

    def submit(self, f: int, p_kw: np.ndarray, q_kvar: np.ndarray, flex_charge_kw: np.ndarray,
               flex_v2g_kw: np.ndarray) -> PendingSolve:
        """Send feeder ``f``'s batch without waiting (requests to several shards then run in parallel)."""
        if not isinstance(f, int | np.integer) or not 0 <= f < self.n_feeders:
            raise ValueError(f"f: expected a feeder index in [0, {self.n_feeders - 1}], got {f!r}")
        f = int(f)
        cold = f in self._cold
        self._cold.discard(f)
        try:
            x = np.stack([np.asarray(a, dtype=np.float64) for a in (p_kw, q_kvar, flex_charge_kw, flex_v2g_kw)])
        except ValueError as e:
            raise ValueError(f"p_kw, q_kvar, flex_charge_kw, flex_v2g_kw: expected one shape (batch, n_bus), got "
                             f"{[np.shape(a) for a in (p_kw, q_kvar, flex_charge_kw, flex_v2g_kw)]}") from e
        return PendingSolve(self, f, (x, cold))

    def solve(self, f: int, p_kw: np.ndarray, q_kvar: np.ndarray, flex_charge_kw: np.ndarray,
              flex_v2g_kw: np.ndarray) -> GridSolution:
        """Solve feeder ``f`` for a batch (E, n_bus) and enforce its limits (``LocalGrid.solve``)."""
        return self.submit(f, p_kw, q_kvar, flex_charge_kw, flex_v2g_kw).result()

    def stats(self, reset: bool = False) -> list[dict[str, Any]]:
        """Each shard's counters."""
        return ray.get([h.stats.remote(reset) for h in self._handles])

    def configure(self, **settings: Any) -> list[dict[str, Any]]:
        """Change every shard's batching settings (see :meth:`PowerFlowService.configure`)."""
        return ray.get([h.configure.remote(**settings) for h in self._handles])

    def close(self) -> None:
        """Close its channels; free this client's warm-start states in the actors (best effort)."""
        for k in range(self.n_shards):
            self._drop_channel(k)
        try:
            ray.get([h.forget.remote(self.client_id) for h in self._handles])
        except ray.exceptions.RayError as e:
            log.debug("power-flow client close: %s", e)


def make_grid(cfg: EnvConfig, mode: str = "local", *, feeders: list[Feeder] | None = None, name: str = DEFAULT_NAME,
              namespace: str = DEFAULT_NAMESPACE, **client_kwargs: Any) -> LocalGrid | PowerFlowClient:
    """The power-flow service for ``Sim(cfg, grid=...)``.

    ``local``: a :class:`LocalGrid` (``feeders``: the ones Sim built, else built here).  ``actor``: a
    :class:`PowerFlowClient` of the named actors if they exist; without Ray or without them, the in-process
    ``LocalGrid`` (logged), so a config runs the same everywhere.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "actor":
        if not ray.is_initialized():
            log.warning("power flow: Ray is not initialised; solving in-process (LocalGrid)")
        else:
            try:
                return PowerFlowClient(cfg, name=name, namespace=namespace, **client_kwargs)
            except ActorNotFoundError as e:
                log.warning("power flow: %s; solving in-process (LocalGrid)", e)
    fs = feeders if feeders is not None else build_feeders(cfg.grid).feeders
    return LocalGrid(fs, cfg)


__all__ = ["DEFAULT_NAME", "DEFAULT_NAMESPACE", "MODES", "TRANSPORTS", "ActorNotFoundError", "FeederSet", "PendingSolve",
           "PowerFlowActor", "PowerFlowClient", "PowerFlowService", "actor_name", "build_feeders",
           "get_or_create_actor", "grid_key", "make_grid", "n_feeders"]
