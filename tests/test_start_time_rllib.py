"""Seed 001's stage 2 on Ray (evgrid.agents.rllib.start_time): PPO, A2C and DQN train on EVStartTime-v0 with
masked actions, act greedily inside the mask, checkpoint and restore to the same actions, and PPO beats the
random policy on held-out days after a modest budget (slow)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from evgrid.agents.rllib.start_time import (ALGORITHMS, MODULE_ID, StartTimeAgent, evaluate_policies,
                                            train_start_time)
from evgrid.envs.start_time import AGENT

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

EVAL_SEED = 1000  # held out: the training days are seeds 0..15


def _episode(agent: StartTimeAgent, seed: int = EVAL_SEED):
    """One greedy episode: the observations the agent saw, its actions, and the result."""
    env = agent.make_env()
    obs, _ = env.reset(seed=seed)
    seen, actions = [], []
    while env.agents:
        seen.append(obs[AGENT])
        actions.append(agent.act(obs[AGENT]))
        obs, *_ = env.step({AGENT: actions[-1]})
    return seen, np.array(actions), env.result()


@pytest.fixture(scope="module")
def spaces():
    from evgrid.envs.start_time import StartTimeEnv

    env = StartTimeEnv("seed001")
    return env.observation_space(AGENT), env.action_space(AGENT)


def _masked_batch(obs_space, n=64, seed=0):
    """Random observations whose masks are random windows [lo, hi] (never empty), as torch tensors."""
    rng = np.random.default_rng(seed)
    n_act = obs_space["action_mask"].shape[0]
    lo = rng.integers(0, n_act, n)
    hi = np.minimum(lo + rng.integers(0, 12, n), n_act - 1)
    mask = ((np.arange(n_act) >= lo[:, None]) & (np.arange(n_act) <= hi[:, None])).astype(np.int8)
    x = rng.random((n, obs_space["observations"].shape[0])).astype(np.float32)
    return {"observations": torch.as_tensor(x), "action_mask": torch.as_tensor(mask)}, mask.astype(bool)


def test_masked_modules_never_pick_a_masked_slot(spaces):
    """PPO's sampled and greedy actions, DQN's greedy and fully random (epsilon 1) ones, all inside the mask;
    DQN's Q-values are -inf exactly outside it, online and target."""
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.algorithms.dqn.default_dqn_rl_module import QF_PREDS, QF_TARGET_NEXT_PREDS
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.columns import Columns

    from evgrid.agents.rllib.start_time import DQN_MODEL, PPO_MODEL, MaskedDQNModule, MaskedPPOModule

    obs_space, act_space = spaces
    obs, mask = _masked_batch(obs_space)
    rows = np.arange(len(mask))
    ppo = MaskedPPOModule(observation_space=obs_space, action_space=act_space,
                          model_config=PPOConfig().rl_module(model_config=PPO_MODEL).model_config)
    batch = {Columns.OBS: obs}
    logits = ppo.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS]
    assert batch[Columns.OBS] is obs and set(obs) == {"observations", "action_mask"}, "the batch was consumed"
    dist = ppo.get_exploration_action_dist_cls().from_logits(logits)
    for _ in range(20):
        assert mask[rows, dist.sample().numpy()].all()
    assert mask[rows, logits.argmax(-1).numpy()].all() and torch.isfinite(dist.entropy()).all()
    dqn = MaskedDQNModule(observation_space=obs_space, action_space=act_space,
                          model_config=DQNConfig().rl_module(model_config=DQN_MODEL).model_config)
    dqn.make_target_networks()
    for _ in range(5):  # t=0: epsilon 1, every action random
        assert mask[rows, dqn.forward_exploration({Columns.OBS: obs}, t=0)[Columns.ACTIONS].numpy()].all()
    assert mask[rows, dqn.forward_inference({Columns.OBS: obs})[Columns.ACTIONS].numpy()].all()
    out = dqn.forward_train({Columns.OBS: obs, Columns.NEXT_OBS: obs})
    for key in (QF_PREDS, QF_TARGET_NEXT_PREDS):
        np.testing.assert_array_equal(torch.isfinite(out[key]).numpy(), mask)


def test_an_unknown_algorithm_names_the_allowed_ones():
    with pytest.raises(ValueError, match="algorithm: expected one of PPO, A2C, DQN, got 'A3C'"):
        train_start_time("A3C", timesteps=10)
    assert ALGORITHMS == ("PPO", "A2C", "DQN")


def test_ppo_trains_acts_inside_the_mask_and_restores_to_the_same_actions(ray_local, tmp_path):
    calls = []
    agent = train_start_time("PPO", timesteps=2 * 2048, seed=0, num_env_runners=0, num_envs=2, out_dir=tmp_path / "ppo",
                             progress=lambda steps, ret: calls.append((steps, ret)))
    try:
        assert [s for s, _ in calls] == [2048, 4096] and agent.timesteps == 4096
        assert all(math.isfinite(r) and 0 < r < 1000 for _, r in calls)  # per node, at most reward_scale
        assert agent.algorithm == "PPO" and agent.wall_s > 0 and agent.algo is not None
        seen, actions, res = _episode(agent)
        masks = np.stack([o["action_mask"] for o in seen])
        assert masks[np.arange(len(actions)), actions].all(), "a greedy action outside the mask"
        assert res.n_moved == 0 and agent.decision_ms > 0
        drawn = agent.sampled(seed=3)
        assert all(o["action_mask"][drawn(None, o)] for o in seen[:50])
        # checkpoint -> restore -> the same actions on the same observations
        back = StartTimeAgent.restore(tmp_path / "ppo")
        assert (back.algorithm, back.timesteps, back.wall_s) == ("PPO", agent.timesteps, agent.wall_s)
        assert [back.act(o) for o in seen] == actions.tolist()
        assert (tmp_path / "ppo" / "algorithm" / "learner_group").is_dir()  # RLlib's checkpoint beside it
    finally:
        agent.stop()
    assert agent.algo is None and agent.act(seen[0]) == actions[0]  # the module outlives the Algorithm


@pytest.mark.parametrize("algorithm,timesteps", [("A2C", 256), ("DQN", 500)])
def test_a2c_and_dqn_train_briefly_and_act_inside_the_mask(ray_local, algorithm, timesteps):
    agent = train_start_time(algorithm, timesteps=timesteps, seed=1, num_env_runners=0)
    try:
        assert agent.timesteps >= timesteps
        if algorithm == "DQN":  # the masked Q-values: finite inside the window, -inf outside
            res = agent.algo.train()["learners"][MODULE_ID]
            assert math.isfinite(res["qf_loss"]) and math.isfinite(res["qf_mean"])
        seen, actions, res = _episode(agent)
        masks = np.stack([o["action_mask"] for o in seen])
        assert masks[np.arange(len(actions)), actions].all() and res.n_moved == 0
    finally:
        agent.stop()


def test_evaluate_policies_adds_the_baselines_on_the_same_days():
    def earliest(env, obs):
        return int(np.flatnonzero(obs["action_mask"])[0])

    out = evaluate_policies({"earliest": earliest}, seeds=[EVAL_SEED])
    assert list(out) == ["earliest", "random", "greedy"]
    assert all(len(v) == 1 for v in out.values())
    r = {k: v[0].total_reward.mean() for k, v in out.items()}
    assert r["greedy"] > r["random"]
    np.testing.assert_array_equal(out["earliest"][0].p_opt_kw, out["greedy"][0].p_opt_kw)  # the same day


@pytest.mark.slow
def test_ppo_beats_random_on_held_out_days(ray_local):
    """The paper's "stable after 102,400 steps" budget (50 iterations, ~2-3 min here).  The policy PPO trains,
    drawn from, beats random; its argmax is not asserted: this early it swings between iterations from below
    random to well above (StartTimeAgent.sampled says why)."""
    returns = []
    agent = train_start_time("PPO", timesteps=50 * 2048, seed=0, progress=lambda s, r: returns.append(r))
    try:
        out = evaluate_policies({"PPO drawn": agent.sampled(0)}, seeds=range(1000, 1004))
    finally:
        agent.stop()
    mean = {k: np.mean([r.total_reward.mean() for r in v]) for k, v in out.items()}
    finite = [r for r in returns if math.isfinite(r)]  # NaN until the first episodes end (8 envs per runner)
    assert finite[-1] > finite[0] + 20, returns  # it learns: the training return per node climbs
    assert mean["PPO drawn"] > mean["random"] + 10 and mean["greedy"] > mean["PPO drawn"], mean


def test_slot_scoring_policy_trains_acts_inside_the_mask_and_restores(ray_local, tmp_path):
    """``policy="slots"``: one network scores every start slot (the module's own head, not RLlib's pi); it
    trains, acts inside the mask and comes back from its checkpoint with the same actions; it refuses DQN and
    the paper's observation (no scores to read)."""
    scores = {"observation": "scores"}
    agent = train_start_time("PPO", timesteps=2048, seed=0, num_env_runners=0, out_dir=tmp_path / "slots",
                             start_time=scores, policy="slots")
    try:
        assert type(agent.module).__name__ == "SlotScorePPOModule"
        seen, actions, res = _episode(agent)
        masks = np.stack([o["action_mask"] for o in seen])
        assert masks[np.arange(len(actions)), actions].all() and res.n_moved == 0
        back = StartTimeAgent.restore(tmp_path / "slots")
        assert [back.act(o) for o in seen] == actions.tolist()
    finally:
        agent.stop()
    # agents trained on different observations are evaluated together, each on its own env, on the same days
    paper = train_start_time("PPO", timesteps=256, seed=0, num_env_runners=0)
    try:
        out = evaluate_policies({"slots": back, "paper": paper}, seeds=[EVAL_SEED])
    finally:
        paper.stop()
    assert list(out) == ["slots", "paper", "random", "greedy"]
    for name in ("slots", "paper", "random"):
        np.testing.assert_array_equal(out[name][0].p_opt_kw, out["greedy"][0].p_opt_kw)
    assert back.decision_ms > 0 and paper.decision_ms > 0
    for algorithm in ("PPO", "DQN"):
        with pytest.raises(ValueError, match="policy: 'slots' scores start slots from start_time.observation 'scores', "
                                             "got observation 'paper'"):
            train_start_time(algorithm, timesteps=10, policy="slots")


def test_slot_scoring_dqn_learns_its_slot_network_and_its_target_copy(ray_local, tmp_path):
    """DQN with ``policy="slots"``: the Q-value of each slot comes from the slot network (the module's ``af``),
    whose target copy RLlib syncs; the masked slots' Q is -inf; it acts inside the mask and restores."""
    agent = train_start_time("DQN", timesteps=500, seed=0, num_env_runners=0, num_envs=2, out_dir=tmp_path / "dqn",
                             start_time={"observation": "scores"}, policy="slots")
    try:
        assert type(agent.module).__name__ == "SlotScoreDQNModule"
        learned = agent.algo.learner_group._learner.module[MODULE_ID]  # local learner: the one with target copies
        (enc, enc_t), (af, af_t) = learned.get_target_network_pairs()
        assert not list(enc.parameters()) and [p.shape for p in af.parameters()] == [p.shape for p in af_t.parameters()]
        before = agent.algo.learner_group.get_weights()[MODULE_ID]
        res = agent.algo.train()["learners"][MODULE_ID]
        after = agent.algo.learner_group.get_weights()[MODULE_ID]
        assert math.isfinite(res["qf_loss"])
        assert {k for k in after if k.startswith("af.") and not np.array_equal(after[k], before[k])}, \
            "the slot network did not learn"
        seen, actions, out = _episode(agent)
        masks = np.stack([o["action_mask"] for o in seen])
        assert masks[np.arange(len(actions)), actions].all() and out.n_moved == 0
        back = StartTimeAgent.restore(tmp_path / "dqn")
        assert [back.act(o) for o in seen[:100]] == actions[:100].tolist()
    finally:
        agent.stop()
