"""The client of the shared power-flow actors: ``LocalGrid``'s interface over Ray and the same-node socket.

:class:`PowerFlowClient` finds the named shards (``<name>-<k>`` in an explicit namespace), checks that
they serve its grid (:func:`~.service.grid_key`) and sends each feeder's request to shard ``f % n``:
through the shard's same-node channel (:mod:`.transport`) when the shard runs on this node and
``transport="auto"``, else as a Ray call.  :meth:`PowerFlowClient.submit` returns at once
(:class:`PendingSolve`), so requests to several shards run in parallel.

Faults: actors run with ``max_task_retries=0``; retrying is the client's job.  A call that fails because
the actor died or is restarting (``RayActorError``: ``ActorDiedError``, ``ActorUnavailableError``), or
whose channel broke, is re-sent after an exponential backoff, up to ``RetryPolicy.max_retries`` times,
then a ``RuntimeError`` names the actor and the number of tries.  No step is skipped.  An error the
actor raises on a bad request is raised here as it was raised there, and not retried.  A request that
times out is not re-sent either: it may still land and overwrite the warm start out of order.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import time
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt
import ray
import ray.exceptions

from evgrid.cluster.powerflow.service import grid_key
from evgrid.cluster.powerflow.transport import Channel, ChannelLost, dumps
from evgrid.envs.config import EnvConfig
from evgrid.grid.config import GridConfig
from evgrid.grid.service import GridSolution, check_request
from evgrid.validate import check_choice, check_int, check_real

log = logging.getLogger(__name__)

DEFAULT_NAME = "evgrid-powerflow"
DEFAULT_NAMESPACE = "evgrid"
TRANSPORTS = ("auto", "ray")
# the actor died, is restarting or is unreachable: worth a retry (an error raised by solve itself is not)
_DOWN = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ChannelLost)
_TIMEOUTS = (ray.exceptions.GetTimeoutError, TimeoutError)


class ActorNotFoundError(LookupError):
    """No power-flow actor of that name in that namespace."""


def actor_name(name: str, k: int) -> str:
    """Name of shard ``k``."""
    return f"{name}-{k}"


def grid_of(cfg: EnvConfig | GridConfig) -> GridConfig:
    """The grid configuration of an environment's (or a grid's) configuration."""
    if isinstance(cfg, EnvConfig):
        return cfg.grid
    if isinstance(cfg, GridConfig):
        return cfg
    raise TypeError(f"cfg: expected an EnvConfig or a GridConfig, got {type(cfg).__name__}")


def _node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a client re-sends a request whose actor died, is restarting or whose channel broke."""

    max_retries: int = 12
    """Re-sends of one request, 0..1000."""
    backoff_s: float = 0.1
    """First wait before a re-send, 0..60 s; it doubles with each try, up to ``max_backoff_s``."""
    max_backoff_s: float = 2.0
    """Longest wait between two tries, ``backoff_s``..600 s."""
    timeout_s: float | None = None
    """Longest wait for one answer, (0, 86400] s; past it a RuntimeError (None: no limit)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_retries", check_int("max_retries", self.max_retries, 0, 1000))
        object.__setattr__(self, "backoff_s", check_real("backoff_s", self.backoff_s, 0.0, 60.0))
        object.__setattr__(self, "max_backoff_s", check_real("max_backoff_s", self.max_backoff_s, self.backoff_s,
                                                             600.0))
        if self.timeout_s is not None:
            object.__setattr__(self, "timeout_s", check_real("timeout_s", self.timeout_s, 0.0, 86400.0,
                                                             lo_open=True))

    def wait_s(self, tries: int) -> float:
        """The wait before the re-send that follows failed try number ``tries`` (1, 2, ...)."""
        return min(self.backoff_s * 2 ** (tries - 1), self.max_backoff_s)


def retry_policy(retry: RetryPolicy | None = None, **settings: Any) -> RetryPolicy:
    """``retry``, or a policy from its keywords (``max_retries``, ``backoff_s``, ``max_backoff_s``,
    ``timeout_s``); not both."""
    if retry is None:
        return RetryPolicy(**settings)
    if not isinstance(retry, RetryPolicy):
        raise ValueError(f"retry: expected a RetryPolicy, got {type(retry).__name__}")
    if settings:
        raise ValueError(f"retry: give a RetryPolicy or its fields as keywords, not both (got retry and "
                         f"{', '.join(sorted(settings))})")
    return retry


class PendingSolve:
    """A request in flight; :meth:`result` waits for it, re-sending it after an actor failure."""

    def __init__(self, client: PowerFlowClient, f: int, packed: np.ndarray, cold: bool) -> None:
        self._client = client
        self.f = f
        self._request = (packed, cold)
        self._send()

    def _send(self) -> None:
        self._sent: tuple | None = None
        self._error: BaseException | None = None
        try:
            self._sent = self._client._send(self.f, *self._request)
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
                raise RuntimeError(f"power-flow actor {c.actor_name(k)!r} (namespace {c.namespace!r}): no answer "
                                   f"for feeder {self.f} within timeout_s={c.retry.timeout_s}") from e
            except _DOWN as e:
                self._retry_or_raise(e, k, tries)
                tries += 1
                self._send()
        if not ok:  # the actor's own error (a bad request): raised here as it was raised there
            raise value
        return value

    def _retry_or_raise(self, error: BaseException, k: int, tries: int) -> None:
        """After failed try ``tries``: wait and look the shard up again, or give up with an error."""
        c = self._client
        policy = c.retry
        if tries > policy.max_retries:
            first_line = str(error).splitlines()[0] if str(error) else ""
            raise RuntimeError(
                f"power-flow actor {c.actor_name(k)!r} (namespace {c.namespace!r}) is unavailable: feeder "
                f"{self.f}'s solve failed {tries} tries in a row (1 + max_retries={policy.max_retries}); last "
                f"error: {type(error).__name__}: {first_line}") from error
        wait_s = policy.wait_s(tries)
        log.warning("power-flow actor %r: %s on feeder %d; retry %d/%d in %.2f s", c.actor_name(k),
                    type(error).__name__, self.f, tries, policy.max_retries, wait_s)
        c.retries += 1
        time.sleep(wait_s)
        c._refresh(k)


class PowerFlowClient:
    """``LocalGrid``'s interface (``reset``, ``submit``, ``solve``) served by the named power-flow actors.

    Args:
        cfg: the environment (or grid) configuration; must match the actors' grid (:func:`grid_key`).
        name, namespace: the actors are ``<name>-<k>`` in ``namespace``; the shard count comes from shard 0.
        transport: ``auto``: requests to a shard on this node go through its same-node socket (~20 us a
            round trip against ~1 ms for a Ray call), the others through Ray; ``ray``: Ray calls only.
        retry: the :class:`RetryPolicy`; or its fields as keywords (``max_retries=3, timeout_s=10``).

    Each client (and each unpickled copy of one) has its own id, so its warm starts are its own.
    """

    def __init__(self, cfg: EnvConfig | GridConfig, *, name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE,
                 transport: str = "auto", retry: RetryPolicy | None = None, **retry_settings: Any) -> None:
        self.retry = retry_policy(retry, **retry_settings)
        check_choice("transport", transport, TRANSPORTS)  # (before any Ray call)
        self.grid = grid_of(cfg)
        self.name = name
        self.namespace = namespace
        self.retries = 0  # re-sends so far (all feeders)
        first = self._lookup(0)
        infos = [ray.get(first.info.remote())]
        self.n_shards = int(infos[0]["n_shards"])
        self._handles = [first] + [self._lookup(k) for k in range(1, self.n_shards)]
        infos += ray.get([h.info.remote() for h in self._handles[1:]])
        for k, info in enumerate(infos):
            if info["grid_key"] != grid_key(self.grid):
                mine, theirs = grid_key(self.grid), info["grid_key"]
                diff = {f: (mine[f], theirs.get(f)) for f in mine if mine[f] != theirs.get(f)}
                raise ValueError(f"cfg: the grid differs from the one actor {actor_name(name, k)!r} serves "
                                 f"(field: (this config, the actor's)): {diff}")
        self.n_feeders = int(infos[0]["n_feeders"])
        self._n_bus = {f: n for info in infos for f, n in info["n_bus"].items()}  # buses per feeder
        self._new_identity()
        self.transport = transport

    def _new_identity(self) -> None:
        # "<node id>:<uuid>": the actor counts requests per node from it (a multi-node run shows where its
        # callers live)
        self.client_id = f"{_node_id() or 'local'}:{uuid.uuid4().hex}"
        self._cold: set[int] = set()  # an unknown id has no warm state anywhere
        # per shard: None (not probed yet), False (Ray calls) or the open same-node channel
        self._channels: list[Channel | bool | None] = [None] * self.n_shards

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
        self._transport = check_choice("transport", value, TRANSPORTS)
        for k in range(self.n_shards):
            self._drop_channel(k)

    def actor_name(self, k: int) -> str:
        return actor_name(self.name, k)

    def shard_of(self, f: int) -> int:
        """The shard serving feeder ``f``."""
        return f % self.n_shards

    # ------------------------------------------------------------------ finding the shards

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

    def _drop_channel(self, k: int) -> None:
        ch = self._channels[k]
        if isinstance(ch, Channel):
            ch.close()
        self._channels[k] = None

    def _channel(self, k: int) -> Channel | None:
        """Shard ``k``'s same-node channel, opened on first use; None: use Ray calls."""
        ch = self._channels[k]
        if ch is None:
            ch = False
            if self.transport == "auto":
                info = ray.get(self._handles[k].channel.remote(), timeout=self.retry.timeout_s)
                if info["node"] is not None and info["node"] == _node_id():
                    try:
                        ch = Channel(info["path"], self.retry.timeout_s)
                    except ChannelLost as e:  # the actor just answered: its socket is out of reach from here
                        log.warning("power-flow actor %r: same-node channel %s unreachable (%s); using Ray calls",
                                    self.actor_name(k), info["path"], e)
                        ch = False
            self._channels[k] = ch
        return ch or None

    # ------------------------------------------------------------------ requests

    def _send(self, f: int, packed: np.ndarray, cold: bool) -> tuple:
        k = self.shard_of(f)
        ch = self._channel(k)
        if ch is not None:
            return ch, ch.send(dumps((self.client_id, f, packed, cold)))
        return None, self._handles[k].solve_packed.remote(self.client_id, f, dumps(packed), cold)

    def _receive(self, sent: tuple) -> tuple[bool, Any]:
        """(True, solution), or (False, the actor's exception) for a bad request sent through a channel."""
        ch, ticket = sent
        if ch is None:
            return True, pickle.loads(ray.get(ticket, timeout=self.retry.timeout_s))
        return pickle.loads(ch.receive(ticket))

    def reset(self) -> None:
        """New episode: the next solve of every feeder starts cold, as ``LocalGrid.reset``."""
        self._cold = set(range(self.n_feeders))

    def submit(self, f: int, p_kw: npt.ArrayLike, q_kvar: npt.ArrayLike, flex_charge_kw: npt.ArrayLike,
               flex_v2g_kw: npt.ArrayLike, flex_gen_kw: npt.ArrayLike | None = None) -> PendingSolve:
        """Send feeder ``f``'s batch (B, n_bus) without waiting; ``flex_gen_kw`` None: no curtailable
        generation.  The actor checks the arrays (its errors are raised by ``result()``)."""
        f = check_int("f", f, 0, self.n_feeders - 1)
        arrays = (p_kw, q_kvar, flex_charge_kw, flex_v2g_kw,
                  np.zeros(np.shape(p_kw)) if flex_gen_kw is None else flex_gen_kw)
        try:
            packed = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
        except (TypeError, ValueError):
            check_request(self._n_bus[f], *arrays)  # raises the error that names the field at fault
            raise
        cold = f in self._cold
        self._cold.discard(f)
        return PendingSolve(self, f, packed, cold)

    def solve(self, f: int, p_kw: npt.ArrayLike, q_kvar: npt.ArrayLike, flex_charge_kw: npt.ArrayLike,
              flex_v2g_kw: npt.ArrayLike, flex_gen_kw: npt.ArrayLike | None = None) -> GridSolution:
        """Solve feeder ``f`` for a batch (B, n_bus) and enforce its limits (``LocalGrid.solve``)."""
        return self.submit(f, p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw).result()

    # ------------------------------------------------------------------ the shards' state

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


__all__ = ["DEFAULT_NAME", "DEFAULT_NAMESPACE", "TRANSPORTS", "ActorNotFoundError", "PendingSolve",
           "PowerFlowClient", "RetryPolicy", "actor_name", "grid_of", "retry_policy"]
