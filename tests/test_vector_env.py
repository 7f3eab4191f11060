"""EVGridVectorEnv: K lock-stepped environments over one simulator, one power-flow call per step."""

from __future__ import annotations

import numpy as np
import pytest

import evgrid
from evgrid.envs.ev_grid import EVGridVectorEnv
from evgrid.envs.config import load_config
from evgrid.envs.sim import TRUNCATED
from evgrid.grid.service import LocalGrid, build_feeders

SMALL = {"n_steps": 40, "start_hour": 14.0, "fleet": {"n_ev": 60}, "stations": {"ports": 30}}


def _actions(env, agents, rng):
    """Random but valid actions for the live ``agents`` of one environment."""
    out = {}
    for a in agents:
        space = env.action_space(a)
        space.seed(int(rng.integers(2**31)))
        out[a] = space.sample()
    return out


class CountingGrid(LocalGrid):
    """The in-process solver, counting calls and the scenarios each carried."""

    def __init__(self, cfg):
        super().__init__(build_feeders(cfg.grid).feeders, cfg.grid)
        self.batches: list[int] = []

    def submit(self, f, p_kw, *args):
        self.batches.append(p_kw.shape[0])
        return super().submit(f, p_kw, *args)


@pytest.mark.parametrize("view", ["grouped", "individual"])
def test_k_envs_make_one_power_flow_call_per_step(view):
    cfg = load_config("experiments/quickstart.yaml", {**SMALL, "agents": {"ev_view": view}})
    grid = CountingGrid(cfg)
    vec = EVGridVectorEnv(cfg, 3, powerflow=grid)
    obs, infos = vec.reset(seed=4)
    assert len(obs) == len(infos) == 3
    rng = np.random.default_rng(0)
    steps = 0
    while any(vec.agents):
        obs, rew, term, trunc, _ = vec.step([_actions(vec, ag, rng) for ag in vec.agents])
        steps += 1
        for e in range(3):
            assert set(obs[e]) == set(rew[e]) == set(term[e]) == set(trunc[e])
            assert all(np.isfinite(r) for r in rew[e].values())
    assert steps == SMALL["n_steps"]
    assert grid.batches == [3] * steps, "each step should solve all environments in one call"


def test_env_zero_of_a_vector_replays_the_single_env():
    """Environment 0 of a reset with seed s is EVGridEnv's day for s (to the solver's tolerance: a batch of
    three converges together, so last digits may differ)."""
    over = {**SMALL, "agents": {"ev_view": "grouped"}}
    vec = EVGridVectorEnv("experiments/quickstart.yaml", 3, **over)
    single = evgrid.make("EVGrid-v0", "experiments/quickstart.yaml", **over)
    ov, _ = vec.reset(seed=9)
    os_, _ = single.reset(seed=9)
    rng_v, rng_s = np.random.default_rng(1), np.random.default_rng(1)
    others = np.random.default_rng(2)
    while single.agents:
        a0 = _actions(single, single.agents, rng_s)
        assert a0.keys() == _actions(vec, vec.agents[0], rng_v).keys()
        acts = [a0] + [_actions(vec, ag, others) for ag in vec.agents[1:]]
        ov, rv, *_ = vec.step(acts)
        os_, rs, *_ = single.step(a0)
        assert ov[0].keys() == os_.keys()
        for a in os_:
            np.testing.assert_allclose(rv[0][a], rs[a], rtol=1e-6, atol=1e-6)
            got, want = ov[0][a], os_[a]
            if isinstance(want, dict):
                for k in want:
                    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not any(vec.agents)


def test_environments_of_a_vector_draw_their_own_days():
    vec = EVGridVectorEnv("experiments/quickstart.yaml", 2, **SMALL)
    vec.reset(seed=0)
    sim = vec.sim
    arrive = [np.sort(sim.day.sessions.t_request_h[sim.day.env == e]) for e in range(2)]
    assert arrive[0].shape == arrive[1].shape and not np.allclose(arrive[0], arrive[1])


def test_bad_vector_actions_name_the_environment():
    vec = EVGridVectorEnv("experiments/quickstart.yaml", 2, **SMALL)
    vec.reset(seed=0)
    rng = np.random.default_rng(0)
    acts = [_actions(vec, ag, rng) for ag in vec.agents]
    with pytest.raises(ValueError, match="list of 2 dicts"):
        vec.step(acts[:1])
    bad = [acts[0], dict(acts[1])]
    del bad[1]["station_2"]
    with pytest.raises(ValueError, match=r"'station_2' \(env 1\)"):
        vec.step(bad)
    bad = [acts[0], dict(acts[1], operator_0=np.array([9.0], np.float32))]
    with pytest.raises(ValueError, match=r"'operator_0' \(env 1\)"):
        vec.step(bad)
    vec.step(acts)  # still usable after the refused steps


def test_the_last_observation_shows_the_evs_the_day_ends_with():
    """At truncation a grouped agent still sees its EVs (the value bootstrap reads this observation, and it
    holds the slots the last action was taken for); an individual EV cut by the end is truncated, not
    terminated, with its real final state."""
    vec = EVGridVectorEnv("experiments/quickstart.yaml", 1, **{**SMALL, "n_steps": 20})
    obs, _ = vec.reset(seed=5)
    rng = np.random.default_rng(0)
    while any(vec.agents):
        obs, *_ = vec.step([_actions(vec, vec.agents[0], rng)])
    sim = vec.sim
    fleet = sim.fleet
    cut = np.bincount(fleet.station[fleet.status == TRUNCATED], minlength=sim.layout.n_station)
    assert cut.sum() > 0
    for j in range(sim.layout.n_station):
        final = obs[0][f"evs_{j}"]
        assert final["mask"].sum() == cut[j]
        assert (final["evs"][final["mask"] > 0][:, 0] > 0).all(), "an occupied final slot shows no SOC"

    ind = EVGridVectorEnv("experiments/quickstart.yaml", 1,
                          **{**SMALL, "n_steps": 20, "agents": {"ev_view": "individual"}})
    obs, _ = ind.reset(seed=5)
    while any(ind.agents):
        obs, _, term, trunc, _ = ind.step([_actions(ind, ind.agents[0], rng)])
    sim = ind.sim
    cut_names = {f"ev_{k}" for k in sim.fleet.ev_index[sim.fleet.status == TRUNCATED]}
    assert cut_names and cut_names <= set(obs[0])
    for a in cut_names:
        assert trunc[0][a] and not term[0][a]
        assert obs[0][a][0] > 0  # its SOC, not a blank observation
