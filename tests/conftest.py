"""Shared fixtures.  One thread per process: on 2 cores more threads stall."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from evgrid.grid.feeders import FEEDERS, build_feeder  # noqa: E402


@functools.cache
def feeder(name: str, der: bool = False):
    """Feeders are immutable once built; build each once per session."""
    return build_feeder(name, der=der)


@pytest.fixture(params=FEEDERS)
def any_feeder(request):
    return feeder(request.param)
