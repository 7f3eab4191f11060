"""The power-flow service as Ray actors: creating the shards, and choosing a grid service for a config.

Sharding: with ``num_actors = n``, feeder ``f`` lives in actor ``f % n`` (named ``<name>-<f % n>``);
the client routes each feeder's call there.

Faults: actors are created with ``max_restarts`` and ``max_task_retries=0``; retrying is the client's job
(:mod:`.client`).  A restarted actor starts with no warm starts.

Lifetime: hold the handles :func:`get_or_create_actor` returns for as long as the actors must live: Ray
collects a named, non-detached actor once no handle to it is left.  Actors are *not* detached by
default, so they end with the job (driver) that created them and never outlive a crashed training run;
env runners of that job find them by name because the namespace is explicit (``evgrid``).
``detached=True`` makes a long-lived service shared by several jobs; end it with ``ray.kill``.

Which service an environment uses: :func:`make_grid` (``local`` or ``actor``), or an
:class:`ActorGridFactory` handed to code that must not import this package (the RLlib env adapter).
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from evgrid.cluster.powerflow.client import (DEFAULT_NAME, DEFAULT_NAMESPACE, TRANSPORTS, ActorNotFoundError,
                                             PowerFlowClient, actor_name, grid_of, retry_policy)
from evgrid.cluster.powerflow.service import PowerFlowService, check_batching, grid_key
from evgrid.envs.config import EnvConfig
from evgrid.grid.config import GridConfig
from evgrid.grid.feeders import Feeder
from evgrid.grid.service import GridService, LocalGrid, build_feeders, n_feeders
from evgrid.validate import check_choice, check_int, check_real

log = logging.getLogger(__name__)

MODES = ("local", "actor")


class _RayPowerFlowService(PowerFlowService):
    """:class:`PowerFlowService` that knows the Ray node it runs on (its same-node channel's node)."""

    def __init__(self, grid: GridConfig, shard: int = 0, n_shards: int = 1, **settings: Any) -> None:
        super().__init__(grid, shard, n_shards, node_id=ray.get_runtime_context().get_node_id(), **settings)


PowerFlowActor = ray.remote(_RayPowerFlowService)
"""The Ray actor class; create it through :func:`get_or_create_actor` (name, namespace, restarts)."""


def get_or_create_actor(cfg: EnvConfig | GridConfig, *, name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE,
                        num_actors: int = 1, num_cpus: float = 0.0, max_restarts: int = 3, detached: bool = False,
                        micro_batching: bool = True, max_batch_requests: int = 64, max_wait_ms: float = 1.0,
                        wait: bool = True) -> list[Any]:
    """Start the shards ``<name>-0 .. <name>-<num_actors-1>`` (or find them); returns their handles.

    Args:
        cfg: the environment (or grid) configuration whose feeders the actors hold.
        num_actors: shards, 1..number of feeders; feeder f goes to shard ``f % num_actors``.
        num_cpus: CPUs each actor reserves, 0..1024 (0: it shares the env runners' CPUs).
        max_restarts: restarts Ray grants each actor after it dies, -1 (forever) or 0..10000.
        detached: outlive the creating job (a service for several jobs); default: end with it.
        micro_batching, max_batch_requests, max_wait_ms: see :class:`PowerFlowService`.
        wait: block until every actor has built its feeders (and check an existing one matches).

    An actor of that name that already exists is reused if it holds the same grid and sharding (its batching
    settings stay as they are: change them with ``configure``); otherwise a ValueError says so (pick another
    ``name`` or kill it).
    """
    g = grid_of(cfg)
    num_actors = check_int("num_actors", num_actors, 1, n_feeders(g))
    check_real("num_cpus", num_cpus, 0.0, 1024.0)
    check_int("max_restarts", max_restarts, -1, 10_000)
    check_batching(max_batch_requests, max_wait_ms)
    if not ray.is_initialized():
        raise RuntimeError("get_or_create_actor: Ray is not initialised; call ray.init() or "
                           "evgrid.cluster.runtime.connect() first")
    handles = [PowerFlowActor.options(
        name=actor_name(name, k), namespace=namespace, get_if_exists=True,
        lifetime="detached" if detached else None, num_cpus=num_cpus, max_restarts=int(max_restarts),
        max_task_retries=0,
    ).remote(g, k, num_actors, micro_batching=micro_batching, max_batch_requests=max_batch_requests,
             max_wait_ms=max_wait_ms) for k in range(num_actors)]
    if wait:
        for k, info in enumerate(ray.get([h.info.remote() for h in handles])):
            if info["grid_key"] != grid_key(g) or info["n_shards"] != num_actors:
                raise ValueError(f"name: actor {actor_name(name, k)!r} in namespace {namespace!r} already serves "
                                 f"another grid or sharding ({info['grid_key']}, {info['n_shards']} shards); "
                                 f"pick another name or ray.kill it")
        log.info("power-flow actors %s-0..%d ready in namespace %r", name, num_actors - 1, namespace)
    return handles


class ActorGridFactory:
    """Picklable recipe for a simulator's grid service: the named actors' client where they run, else
    solving in-process.

    ``factory(grid, feeders)`` returns a :class:`PowerFlowClient` of the actors ``<name>-<k>`` in
    ``namespace`` when Ray is initialised and they exist; otherwise a :class:`LocalGrid` of ``feeders``
    (built from ``grid`` when None), with a logged warning, so a config runs the same everywhere.
    ``client_kwargs``: ``transport``, ``retry`` or the :class:`RetryPolicy` fields, checked here.
    """

    def __init__(self, name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE, **client_kwargs: Any) -> None:
        settings = dict(client_kwargs)
        check_choice("transport", settings.pop("transport", "auto"), TRANSPORTS)
        retry_policy(**settings)
        self.name = name
        self.namespace = namespace
        self.client_kwargs = client_kwargs

    def __call__(self, grid: GridConfig, feeders: list[Feeder] | None = None) -> GridService:
        if not ray.is_initialized():
            log.warning("power flow: Ray is not initialised; solving in-process (LocalGrid)")
        else:
            try:
                return PowerFlowClient(grid, name=self.name, namespace=self.namespace, **self.client_kwargs)
            except ActorNotFoundError as e:
                log.warning("power flow: %s; solving in-process (LocalGrid)", e)
        return _local_grid(grid, feeders)

    def __repr__(self) -> str:
        kw = "".join(f", {k}={v!r}" for k, v in self.client_kwargs.items())
        return f"ActorGridFactory(name={self.name!r}, namespace={self.namespace!r}{kw})"


def _local_grid(grid: GridConfig, feeders: list[Feeder] | None) -> LocalGrid:
    return LocalGrid(feeders if feeders is not None else build_feeders(grid).feeders, grid)


def make_grid(cfg: EnvConfig | GridConfig, mode: str = "local", *, feeders: list[Feeder] | None = None,
              name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE, **client_kwargs: Any) -> GridService:
    """The power-flow service for ``Sim(cfg, grid=...)``.

    ``local``: a :class:`LocalGrid` (``feeders``: the ones Sim built, else built here).  ``actor``: what
    ``ActorGridFactory(name, namespace, **client_kwargs)`` gives: a :class:`PowerFlowClient` of the named
    actors if they exist; without Ray or without them, the in-process ``LocalGrid`` (logged).
    """
    check_choice("mode", mode, MODES)
    grid = grid_of(cfg)
    if mode == "actor":
        return ActorGridFactory(name, namespace, **client_kwargs)(grid, feeders)
    return _local_grid(grid, feeders)


__all__ = ["MODES", "ActorGridFactory", "PowerFlowActor", "get_or_create_actor", "make_grid"]
