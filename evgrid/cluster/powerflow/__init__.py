"""The shared power-flow service: one Ray actor per shard holds the feeders of a grid configuration and
serves *solve + limit enforcement* requests from every env runner, the remote twin of
:class:`evgrid.grid.service.LocalGrid`.

Modules::

    service.py    PowerFlowService: micro-batching per feeder, warm starts per client, counters (no Ray)
    transport.py  the same-node Unix-socket channel: framing, the serving loop, the blocking client side
    client.py     PowerFlowClient (LocalGrid's interface over the shards), PendingSolve, RetryPolicy
    actor.py      PowerFlowActor, get_or_create_actor, make_grid(cfg, "local"|"actor"), ActorGridFactory

The actor pays off by batching many env runners, by holding large feeders once, and by coupling env shards
that share one feeder, not on a small feeder with one runner: ``evgrid bench actor`` measures both modes.
"""

from __future__ import annotations

from evgrid.cluster.powerflow.actor import MODES, ActorGridFactory, PowerFlowActor, get_or_create_actor, make_grid
from evgrid.cluster.powerflow.client import (DEFAULT_NAME, DEFAULT_NAMESPACE, TRANSPORTS, ActorNotFoundError,
                                             PendingSolve, PowerFlowClient, RetryPolicy, actor_name)
from evgrid.cluster.powerflow.service import PowerFlowService, grid_key
from evgrid.grid.service import build_feeders, n_feeders

__all__ = ["DEFAULT_NAME", "DEFAULT_NAMESPACE", "MODES", "TRANSPORTS", "ActorGridFactory", "ActorNotFoundError",
           "PendingSolve", "PowerFlowActor", "PowerFlowClient", "PowerFlowService", "RetryPolicy", "actor_name",
           "build_feeders", "get_or_create_actor", "grid_key", "make_grid", "n_feeders"]
