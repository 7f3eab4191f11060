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


@pytest.fixture(autouse=True)
def _process_settings_stay_put():
    """No test leaves the numeric pins or the hash seed changed: Ray workers started later in the session
    inherit this process's environment, and a worker compiled for another target disagrees in the last bits
    with the in-process references the power-flow tests compare it to."""
    from evgrid.cluster.environment import worker_env

    keys = set(worker_env(True))
    before = {k: os.environ.get(k) for k in keys}
    yield
    after = {k: os.environ.get(k) for k in keys}
    assert after == before, f"the test changed process settings: {before} -> {after}"


@pytest.fixture(scope="module")
def ray_local():
    """An embedded Ray per test module that trains (start-up costs seconds: one per module, not per test)."""
    import ray

    from evgrid.cluster.runtime import connect

    with connect(num_cpus=2):
        # nothing leaves the machine: the node, and every address Ray hands out, is loopback
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        yield ray
