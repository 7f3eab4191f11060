"""EVStartTime-v0 (seed 001's two stages): the exact fleet, start windows, uninterruptible constant-power blocks
and their energy, the scheduled profile and the rewards recomputed from scratch, stage 1's limits and energy,
baselines, the PettingZoo API and RLlib's wrapper, and named errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

import evgrid
from evgrid.config import ConfigError
from evgrid.envs.start_time import (AGENT, StartTimeEnv, greedy_policy, greedy_start, random_policy,
                                    run_episode)

DT_H = 0.25
VALLEY_START_H = 22.0


@pytest.fixture(scope="module")
def env() -> StartTimeEnv:
    return evgrid.make("EVStartTime-v0")


def raw_random(seed: int):
    """Any slot of the action space, masked or not: masked ones must move to the nearest valid slot."""
    rng = np.random.default_rng(seed)
    return lambda env, obs: int(rng.integers(0, env.n_slots))


def expected_blocks(env: StartTimeEnv, res):
    """Each EV's block rebuilt from the raw sessions and its start: (station profile (M, n_grid), delivered
    battery kWh per EV), checking the start against the EV's window on the way."""
    s = env.day.sessions
    a = np.ceil((s.t_request_h - VALLEY_START_H) / DT_H - 1e-9).astype(int)
    b = np.floor((s.t_depart_h - VALLEY_START_H) / DT_H + 1e-9).astype(int)
    need = (s.soc_target - s.soc0) * s.cap_kwh
    per_slot = s.eta_ch * s.p_ch_max_kw * DT_H
    prof = np.zeros_like(res.p_kw)
    got = np.zeros(s.n)
    for k in range(s.n):
        d, st = math.ceil(need[k] / per_slot[k] - 1e-9), int(res.start_slot[k])
        if d > b[k] - a[k]:
            assert st == a[k] and not res.adjustable[k], "a non-adjustable EV starts on arrival"
        elif res.adjustable[k]:
            assert max(a[k], 0) <= st <= b[k] - d, "start within [valley start, departure - duration]"
        else:
            assert st == b[k] - d < 0, "no start fits the valley: it starts at departure - duration"
        block = np.full(d, s.p_ch_max_kw[k])  # uninterruptible at constant power, the last slot the remainder
        block[-1] = (need[k] - (d - 1) * per_slot[k]) / (s.eta_ch[k] * DT_H)
        block = block[:max(b[k] - st, 0)]  # a departure cuts a non-adjustable EV's block
        prof[s.station[k], st - res.grid_start:st - res.grid_start + block.size] += block
        got[k] = block.sum() * s.eta_ch[k] * DT_H
    return prof, got


def test_the_papers_fleet_and_stations(env):
    obs, _ = env.reset(seed=0)
    assert env.nodes == (5, 9, 13)
    assert np.bincount(env.windows.station).tolist() == [179, 225, 146]
    assert env.agents == [AGENT] and env.n_slots == 40  # 22:00-08:00 at 15 min
    s = env.day.sessions
    assert np.all(s.cap_kwh == 50.0) and np.all(s.eta_ch == 0.9) and np.all(s.soc_target == 1.0)
    assert np.all(s.t_depart_h == 32.0), "every EV leaves at 08:00"
    assert env.observation_space(AGENT).contains(obs[AGENT])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_actions_keep_windows_blocks_energy_and_rewards(env, seed):
    obs, _ = env.reset(seed=seed)
    policy, returned, moved = raw_random(seed), 0.0, 0
    while env.agents:
        mask = obs[AGENT]["action_mask"]
        a = policy(env, obs)
        obs, rew, term, trunc, info = env.step({AGENT: a})
        returned += rew[AGENT]
        moved += not mask[a]
        assert info[AGENT]["moved"] == (not mask[a])
        if env.agents:
            assert env.observation_space(AGENT).contains(obs[AGENT])
    res = env.result()
    assert term[AGENT] and not trunc[AGENT] and res.n_moved == moved > 0
    prof, got = expected_blocks(env, res)
    np.testing.assert_allclose(res.p_kw, prof, atol=1e-9, err_msg="the profile is the sum of the EVs' blocks")
    need = env.windows.need_kwh
    np.testing.assert_allclose(got + res.unmet_kwh, need, atol=1e-9, err_msg="energy balance")
    assert np.all(res.unmet_kwh[res.adjustable] == 0.0), "an adjustable EV always gets its energy"
    # eqs 20-23 recomputed: lambda_i (sum P* - sum |P* - P|) minus the unmet penalty, and the returns add up
    opt = res.p_opt_kw
    lam = 1000.0 / opt.sum(axis=1)
    unmet = np.bincount(res.station, res.unmet_kwh / 0.9 / DT_H, 3)
    expect = lam * (opt.sum(axis=1) - np.abs(opt - res.p_sched_kw).sum(axis=1) - unmet)
    np.testing.assert_allclose(res.total_reward, expect, rtol=1e-9, atol=1e-9)
    assert returned == pytest.approx(res.total_reward.sum(), rel=1e-9)
    assert np.all(res.total_reward < 1000.0)


def test_stage1_profiles_hold_the_ramp_limit_and_the_evs_energy(env):
    res = run_episode(env, random_policy(0), seed=0)
    s1 = res.stage1
    assert np.abs(np.diff(s1.p_opt_kw, axis=1)).max() <= env.st.station_ramp_kw + 1e-4
    assert s1.p_opt_kw.min() >= -1e-6
    # the energy the EVs take inside the valley (fixed by the windows, whatever the starts) is stage 1's
    delivered = np.bincount(res.station, (env.windows.need_kwh - res.unmet_kwh) / 0.9, 3)
    before_valley = res.p_kw[:, :-res.grid_start].sum(axis=1) * DT_H if res.grid_start < 0 else 0.0
    np.testing.assert_allclose(s1.p_opt_kw.sum(axis=1) * DT_H, delivered - before_valley, rtol=1e-5)
    # the optimised tie-line is flatter than the original and the voltages hold their limit (AC)
    assert np.std(s1.tie_opt_kw) < 0.1 * np.std(s1.tie_orig_kw)
    assert s1.vm_opt_pu.min() >= 0.95 - 2e-3
    np.testing.assert_allclose(s1.p_orig_kw.sum(), s1.p_opt_kw.sum(), rtol=1e-5)


def test_copying_the_optimal_profile_beats_random(env):
    greedy = run_episode(env, greedy_policy, seed=0)
    rand = run_episode(env, random_policy(0), seed=0)
    assert np.all(greedy.total_reward > rand.total_reward + 50.0)
    assert np.all(greedy.dev_mean_mw < rand.dev_mean_mw)
    assert greedy.n_moved == rand.n_moved == 0
    summary = greedy.summary()  # the last step's info: string keys, as gymnasium's info wrappers need
    assert summary["total_reward"] == {f"node{n}": pytest.approx(r) for n, r in zip((5, 9, 13), greedy.total_reward)}


def test_score_observation_is_each_starts_reward_over_the_blocks_energy():
    """``observation: scores`` appends, per valid start, the deviation the block would remove (the step's
    reward before the unmet term) over the block's energy; greedy's pick carries the highest score."""
    env = evgrid.make("EVStartTime-v0", start_time={"observation": "scores"})
    obs, _ = env.reset(seed=3)
    n, rng = env.n_slots, np.random.default_rng(3)
    assert env.observation_space(AGENT)["observations"].shape == (len(env.nodes) + 8 + 3 * n,)
    for _ in range(40):
        o, d = obs[AGENT], env.decision()
        scores = o["observations"][-n:]
        valid = o["action_mask"].astype(bool)
        assert np.all(scores[~valid] == 0) and np.all(np.abs(scores) <= 1 + 1e-6)
        assert scores[greedy_start(d.gap_kw, d.shape_kw, d.earliest, d.latest)] == pytest.approx(scores[valid].max())
        a = int(rng.integers(d.earliest, d.latest + 1))
        placed = np.zeros(n)
        placed[a:a + d.shape_kw.size] = d.shape_kw
        removed_kw = np.abs(d.gap_kw).sum() - np.abs(d.gap_kw - placed).sum()  # eq 21 before minus after
        assert scores[a] * d.shape_kw.sum() == pytest.approx(removed_kw, abs=1e-6)
        obs, *_ = env.step({AGENT: a})
    assert env.observation_space(AGENT).contains(obs[AGENT])


def test_masked_actions_move_to_the_nearest_valid_slot_and_bad_ones_fail(env):
    obs, _ = env.reset(seed=0)
    d = env.decision()
    for a in (-1, env.n_slots, 2.5, "3", None):
        with pytest.raises(ValueError, match=r"actions\['aggregator_0'\]"):
            env.step({AGENT: a})
    with pytest.raises(ValueError, match="actions"):
        env.step({"station_5": 0})
    late = env.n_slots - 1
    *_, info = env.step({AGENT: np.int64(late)})
    assert info[AGENT]["start_slot"] == (d.latest if late > d.latest else late)
    d = env.decision()
    *_, info = env.step({AGENT: 0})
    assert info[AGENT]["start_slot"] == d.earliest


def test_same_seed_same_day_and_the_simulators_evs(env):
    from evgrid.envs.sim import Sim

    env.reset(seed=4)
    sim = Sim(env.cfg)
    sim.reset(4)
    np.testing.assert_array_equal(sim.day.sessions.t_request_h, env.day.sessions.t_request_h)
    np.testing.assert_array_equal(sim.day.sessions.station, env.day.sessions.station)


def test_pettingzoo_parallel_api_and_seed(env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_api_test(env, num_cycles=1000)
    parallel_seed_test(lambda: evgrid.make("EVStartTime-v0"), num_cycles=20)


def test_rllib_wraps_it_unchanged(env):
    from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv

    wrapped = ParallelPettingZooEnv(env)
    obs, _ = wrapped.reset(seed=0)
    space = wrapped.observation_space[AGENT]
    for _ in range(5):
        a = int(np.flatnonzero(obs[AGENT]["action_mask"])[0])
        obs, rew, term, trunc, _ = wrapped.step({AGENT: a})
        assert space.contains(obs[AGENT]) and not term["__all__"]


@pytest.mark.parametrize("kw, field", [
    ({"start_time": {"valley_start_h": 25.0}}, "start_time.valley_start_h"),
    ({"start_time": {"valley_end_h": 21.0}}, "start_time.valley_end_h"),
    ({"start_time": {"valley_start_h": 22.1}}, "start_time.valley_start_h"),
    ({"start_time": {"reward_scale": 0.0}}, "start_time.reward_scale"),
    ({"start_time": {"station_ramp_kw": -1.0}}, "start_time.station_ramp_kw"),
    ({"start_time": {"ev_model": "exact"}}, "start_time.ev_model"),
    ({"start_time": {"observation": "full"}}, "start_time.observation"),
    ({"start_time": {"c": 1000}}, "start_time.c"),
    ({"start_time": {"valley_start_h": 2.0, "valley_end_h": 30.0}}, "start_time.valley_end_h"),
    ({"fleet": {"scenario": "daily_mix"}}, "fleet.scenario"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        evgrid.make("EVStartTime-v0", **kw)


def test_ac_flow_of_the_optimal_profiles_is_stage1s_own(env):
    """The AC flow of the day with the stations at stage 1's optimal profiles is stage 1's AC check."""
    env.reset(seed=0)
    vm, tie = env.ac_flow(env.stage1.p_opt_kw)
    np.testing.assert_allclose(vm, env.stage1.vm_opt_pu, atol=1e-6)
    np.testing.assert_allclose(tie, env.stage1.tie_opt_kw, rtol=1e-6)


def test_stage1_is_solved_once_per_process_and_travels_to_other_processes(monkeypatch):
    """Envs of one process share a day's stage 1; an env in another process (RLlib's runners) takes the
    driver's solutions through ``preload_stage1`` and solves nothing; a different stage setting is not shared."""
    import evgrid.envs.start_time as st

    a, b = StartTimeEnv("seed001"), StartTimeEnv("seed001")
    a.reset(seed=321)
    solved = a.stage1_days([321, 322])
    monkeypatch.setattr(st, "_STAGE1_CACHE", type(st._STAGE1_CACHE)())  # a fresh process
    monkeypatch.setattr(st, "solve_stage1", lambda *a, **k: pytest.fail("stage 1 solved again"))
    b.preload_stage1(solved)
    b.reset(seed=322)
    assert b.stage1 is solved[322][0]
    b.reset(seed=321)
    np.testing.assert_array_equal(b.stage1.p_opt_kw, a.stage1.p_opt_kw)
    other = StartTimeEnv("seed001", start_time={"station_ramp_kw": 10.0})
    other.preload_stage1({})
    with pytest.raises(pytest.fail.Exception, match="stage 1 solved again"):
        other.reset(seed=321)
