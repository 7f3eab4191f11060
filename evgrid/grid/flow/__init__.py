"""Power-flow backends behind one interface (see :mod:`evgrid.grid.flow.base`).

``make_backend(feeder, "auto")`` picks the fast sweep for radial feeders and
falls back to pandapower, with a warning, for meshed ones.
"""

from __future__ import annotations

import logging

from evgrid.grid.feeders import Feeder, MeshedFeederError
from evgrid.grid.flow.base import FlowResult, PowerFlowBackend
from evgrid.grid.flow.pandapower_backend import PandapowerBackend
from evgrid.grid.flow.sweep import SweepBackend

log = logging.getLogger(__name__)

BACKENDS = {"sweep": SweepBackend, "pandapower": PandapowerBackend}


def make_backend(feeder: Feeder, backend: str = "auto", **kwargs) -> PowerFlowBackend:
    """Build a backend by name: ``auto`` | ``sweep`` | ``pandapower``."""
    if backend == "auto":
        if feeder.tree is None:
            log.warning("feeder %s: %s; falling back to the pandapower backend", feeder.name, feeder.mesh_error)
            return PandapowerBackend(feeder, **kwargs)
        return SweepBackend(feeder, **kwargs)
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected auto, {', '.join(BACKENDS)}")
    return BACKENDS[backend](feeder, **kwargs)


__all__ = ["BACKENDS", "FlowResult", "MeshedFeederError", "PandapowerBackend", "PowerFlowBackend",
           "SweepBackend", "make_backend"]
