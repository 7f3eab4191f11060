"""Fast sweep vs pandapower on every feeder: 1,000 random load scenarios each."""

from __future__ import annotations

import numpy as np
import pytest

from evgrid.bench import scenarios
from evgrid.grid.feeders import FEEDERS
from evgrid.grid.flow import PandapowerBackend, SweepBackend
from tests.conftest import feeder


@pytest.mark.parametrize("name", FEEDERS)
def test_sweep_matches_pandapower_on_1000_scenarios(name):
    f = feeder(name)
    n = 1000
    p, q, _, _ = scenarios(f, n, seed=11)
    ours = SweepBackend(f).solve(p, q)
    ref = PandapowerBackend(f).solve(p, q)
    both = ours.converged & ref.converged
    assert both.sum() >= 0.99 * n
    assert (ours.converged == ref.converged).all()
    assert np.abs(ours.vm_pu[both] - ref.vm_pu[both]).max() <= 1e-6
    assert np.abs(ours.va_deg[both] - ref.va_deg[both]).max() <= 1e-4
    assert np.abs(ours.line_loading[both] - ref.line_loading[both]).max() <= 1e-5
    assert np.abs(ours.slack_p_kw[both] - ref.slack_p_kw[both]).max() <= 1e-2
    assert np.abs(ours.loss_kw[both] - ref.loss_kw[both]).max() <= 1e-2
