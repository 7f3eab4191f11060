"""The array replay behind evgrid's DQN (:mod:`evgrid.agents.rllib.replay`): its rows are the transitions RLlib's
learner connector builds from the same episodes, its window keeps the last ``capacity`` env steps, and a
training with it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tree
from ray.rllib.core.columns import Columns

from evgrid.agents.rllib.replay import REPLAY_TYPE, ArrayReplayDQN, TransitionReplay, _Rows

# operators and stations learned with discrete levels (two modules, several agents each), EVs on their rule
DQN_RUN = ["n_steps=8", "start_hour=16.0", "fleet.n_ev=40", "stations.ports=20", "agents.operator_action=level",
           "agents.ev_view=rule", "train.algorithm=DQN", "train.replay=uniform", "train.num_env_runners=0",
           "train.train_batch_size=16", "train.minibatch_size=16", "train.rollout_fragment_length=8",
           "train.learning_starts=8"]


def _table(cols) -> np.ndarray:
    """The columns the DQN loss reads, one row per transition, rows sorted (order-free comparison)."""
    picked = [cols[c] for c in (Columns.OBS, Columns.NEXT_OBS, Columns.ACTIONS, Columns.REWARDS,
                                Columns.TERMINATEDS)]
    flat = [np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x, np.float64) for x in tree.flatten(picked)]
    table = np.concatenate([x.reshape(len(x), -1) for x in flat], axis=1)
    return table[np.lexsort(table.T[::-1])]


def test_rows_keep_the_last_capacity_env_steps_in_order():
    """Random adds (1-300 rows each, stamped with a rising env step) and windows against a plain list."""
    rng = np.random.default_rng(7)
    rows, ref, step, added = None, [], 0, 0
    for _ in range(200):
        n = int(rng.integers(1, 300))
        step += int(rng.integers(1, 50))
        values = rng.normal(size=(n, 3)).astype(np.float32)
        cols = {"x": values, "nested": {"k": np.arange(n) + added}}
        added += n
        if rows is None:
            rows = _Rows(cols, n)
        rows.append(cols, n, step)
        ref += [(step, v) for v in values]
        cut = step - int(rng.integers(0, 400))
        rows.drop_before(cut)
        ref = [(s, v) for s, v in ref if s >= cut]
        assert rows.size == len(ref)
        if ref:
            got = rows.rows(np.arange(rows.size))
            np.testing.assert_array_equal(got["x"], np.stack([v for _, v in ref]))
            assert np.all(np.diff(got["nested"]["k"]) == 1)  # contiguous, oldest first


def test_replay_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="replay_buffer_config.capacity: expected an integer in \\[1, "):
        TransitionReplay(capacity=0)
    with pytest.raises(TypeError, match="alpha"):
        TransitionReplay(capacity=10, alpha=0.6)  # prioritized replay is RLlib's buffer's


def test_replayed_rows_are_the_learner_connectors_batch_and_training_is_seeded(ray_local):
    """Every transition of sampled multi-agent episodes, as the replay stores it, equals RLlib's learner
    connector's batch of the same episodes (the columns its DQN loss reads); two trainings with one seed learn
    the same weights and differ from their start."""
    from evgrid.agents.rllib.algos import load_run_config
    from evgrid.agents.rllib.experiment import Experiment

    env_cfg, train_cfg = load_run_config("quickstart", DQN_RUN)
    with Experiment(env_cfg, train_cfg) as exp:
        algo = exp.algo
        assert isinstance(algo, ArrayReplayDQN) and algo.config.replay_buffer_config["type"] == REPLAY_TYPE
        episodes = algo.env_runner_group.local_env_runner.sample(num_timesteps=24, random_actions=True)
        replay = TransitionReplay(capacity=10_000)
        replay.add(episodes)
        learner = algo.learner_group._learner
        batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes, shared_data={},
                                           metrics=learner.metrics)
        assert set(batch) == set(replay._modules) == {"operator", "station"}
        for module, rows in replay._modules.items():  # the same transitions, in another order
            ours = rows.rows(np.arange(rows.size))
            np.testing.assert_array_equal(_table(ours), _table(batch[module]))
        assert replay.get_num_timesteps() == sum(len(e) for e in episodes) >= 24
        sampled = replay.sample_batch(16)
        assert {m: len(b) for m, b in sampled.policy_batches.items()} == {"operator": 16, "station": 16}

    def trained() -> tuple[dict, dict]:
        with Experiment(env_cfg, train_cfg) as run:
            start = {k: v.clone() for k, v in run.modules()["station"].state_dict().items()}
            run.step()
            return start, {k: v.clone() for k, v in run.modules()["station"].state_dict().items()}

    (start, a), (_, b) = trained(), trained()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(start[k], a[k]) for k in a)
