"""Versioned environment ids and ``make``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ENVS: dict[str, Callable[..., Any]] = {}


def register(env_id: str, factory: Callable[..., Any]) -> None:
    if env_id in ENVS:
        raise ValueError(f"env_id: {env_id!r} is already registered")
    ENVS[env_id] = factory


def make(env_id: str, config: Any = None, **overrides: Any) -> Any:
    """Build a registered environment: ``make("EVGrid-v0", config="experiments/quickstart.yaml", ev_view="grouped")``."""
    if env_id not in ENVS:
        raise ValueError(f"env_id: unknown environment {env_id!r}; registered: {', '.join(sorted(ENVS))}")
    return ENVS[env_id](config, **overrides)


def _evgrid_v0(config: Any = None, **overrides: Any) -> Any:
    from evgrid.envs.ev_grid import EVGridEnv

    return EVGridEnv(config, **overrides)


register("EVGrid-v0", _evgrid_v0)


def _evstarttime_v0(config: Any = None, **overrides: Any) -> Any:
    """Seed 001's start-time environment; ``config`` defaults to the seed001 experiment, ``start_time=`` takes
    :class:`evgrid.envs.start_time.StartTimeConfig` fields."""
    from evgrid.envs.start_time import StartTimeEnv

    return StartTimeEnv("seed001" if config is None else config, **overrides)


register("EVStartTime-v0", _evstarttime_v0)
