"""Uniform one-step replay kept in arrays, and the RLlib DQN that learns from it (:class:`ArrayReplayDQN`).

RLlib 2.60's DQN replays transitions as episodes: its multi-agent episode buffer builds one
``SingleAgentEpisode`` per sampled transition, and the learner connector turns those back into a batch, so an
update of 32 transitions cost about 5.3 ms here, of which 2.5 ms was the gradient step itself (profile of seed
001's DQN: buffer sampling 1.8 ms, connector 1 ms, replay metrics 1 ms).  :class:`TransitionReplay` keeps each
module's transitions as rows of preallocated arrays and hands the learner a ready ``MultiAgentBatch`` with the
columns the connector would have built (observations, next observations, actions, rewards, terminateds,
truncateds, unit weights and ``n_step`` 1).  The loss, target syncs, epsilon schedule and metrics are RLlib's.

Select it with ``DQNConfig(algo_class=ArrayReplayDQN).training(replay_buffer_config={"type": REPLAY_TYPE,
"capacity": N}, n_step=1)``; any other buffer (prioritized replay) trains through RLlib's own step.  Like
RLlib's buffers, ``capacity`` counts env steps: a module keeps the transitions of the last ``capacity`` env
steps, however many of its agents acted in each (both drop whole episode chunks, oldest first).  Each row holds
its next observation beside its observation, twice an episode buffer's observation memory (seed 001's full DQN
run, 512,200 transitions of 131 numbers: about 0.4 GB).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import tree
from ray.rllib.algorithms.dqn.dqn import DQN, calculate_rr_weights
from ray.rllib.core.columns import Columns
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import (ALL_MODULES, ENV_RUNNER_RESULTS, ENV_RUNNER_SAMPLING_TIMER, LEARNER_RESULTS,
                                     LEARNER_UPDATE_TIMER, NUM_AGENT_STEPS_SAMPLED_LIFETIME,
                                     NUM_ENV_STEPS_SAMPLED_LIFETIME, REPLAY_BUFFER_ADD_DATA_TIMER,
                                     REPLAY_BUFFER_SAMPLE_TIMER, SYNCH_WORKER_WEIGHTS_TIMER, TD_ERROR_KEY, TIMERS)

from evgrid.validate import check_int

REPLAY_TYPE = f"{__name__}.TransitionReplay"
"""``replay_buffer_config["type"]`` of :class:`TransitionReplay` (RLlib imports a buffer named by its path)."""


class _Rows:
    """One module's transitions: a ring of rows in arrays (one per leaf of the observation), grown by doubling,
    each row stamped with the env step it was added at."""

    def __init__(self, first: dict[str, Any], n: int) -> None:
        size = max(1024, 2 ** int(np.ceil(np.log2(n))))
        self.cols = tree.map_structure(lambda a: np.empty((size, *a.shape[1:]), a.dtype), first)
        self.stamp = np.empty(size, np.int64)
        self.head = 0  # oldest row
        self.size = 0

    def append(self, cols: dict[str, Any], n: int, stamp: int) -> None:
        cap = len(self.stamp)
        if self.size + n > cap:
            self._grow(self.size + n)
            cap = len(self.stamp)
        at = (self.head + self.size + np.arange(n)) % cap
        for dst, src in zip(tree.flatten(self.cols), tree.flatten(cols)):
            dst[at] = src
        self.stamp[at] = stamp
        self.size += n

    def _grow(self, need: int) -> None:
        cap = len(self.stamp)
        order = (self.head + np.arange(self.size)) % cap  # oldest first, so the ring restarts at 0
        size = 2 ** int(np.ceil(np.log2(need)))

        def moved(a: np.ndarray) -> np.ndarray:
            out = np.empty((size, *a.shape[1:]), a.dtype)
            out[:self.size] = a[order]
            return out

        self.cols = tree.map_structure(moved, self.cols)
        self.stamp = moved(self.stamp)
        self.head = 0

    def drop_before(self, stamp: int) -> None:
        """Forget the rows added before env step ``stamp`` (rows are in stamp order)."""
        cap = len(self.stamp)
        ring = (self.head + np.arange(self.size)) % cap
        old = int(np.searchsorted(self.stamp[ring], stamp, side="left"))
        self.head = (self.head + old) % cap
        self.size -= old

    def rows(self, idx: np.ndarray) -> dict[str, Any]:
        at = (self.head + idx) % len(self.stamp)
        return tree.map_structure(lambda a: a[at], self.cols)


class TransitionReplay:
    """Uniform replay of one-step transitions per module, in arrays (module docstring)."""

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = check_int("replay_buffer_config.capacity", capacity, 1, 10**10)
        self.rng = np.random.default_rng()  # prepare_algorithm seeds it from the config's seed
        self._modules: dict[Any, _Rows] = {}
        self._env_steps = 0

    def add(self, episodes: Iterable[Any]) -> None:
        """Add the transitions of multi-agent episode chunks (as ``EnvRunner.sample`` returns them, numpy)."""
        for episode in episodes:
            self._env_steps += len(episode)  # env steps of this chunk
            for agent_id, sa in episode.agent_episodes.items():
                n = len(sa)
                if n == 0:
                    continue
                obs = sa.get_observations()
                if len(tree.flatten(obs)[0]) != n + 1:
                    raise ValueError(f"agent {agent_id!r}: expected {n + 1} observations for {n} actions")
                done = np.zeros(n, bool)
                cols = {Columns.OBS: tree.map_structure(lambda a: a[:-1], obs),
                        Columns.NEXT_OBS: tree.map_structure(lambda a: a[1:], obs),
                        Columns.ACTIONS: np.asarray(sa.get_actions()),
                        Columns.REWARDS: np.asarray(sa.get_rewards(), np.float32),
                        Columns.TERMINATEDS: done.copy(), Columns.TRUNCATEDS: done}
                cols[Columns.TERMINATEDS][-1] = sa.is_terminated
                cols[Columns.TRUNCATEDS][-1] = sa.is_truncated
                module = episode.module_for(agent_id)
                if module not in self._modules:
                    self._modules[module] = _Rows(cols, n)
                self._modules[module].append(cols, n, self._env_steps)
        for rows in self._modules.values():
            rows.drop_before(self._env_steps - self.capacity + 1)

    def get_num_timesteps(self) -> int:
        """Env steps added so far (RLlib's buffers count the same)."""
        return self._env_steps

    def sample_batch(self, num_items: int) -> MultiAgentBatch | None:
        """``num_items`` transitions per module drawn uniformly with replacement, as RLlib's independent
        sampling does (None before any transition is stored)."""
        batches = {}
        for module, rows in self._modules.items():
            if rows.size == 0:
                continue
            cols = rows.rows(self.rng.integers(rows.size, size=num_items))
            cols["weights"] = np.ones(num_items, np.float32)
            cols["n_step"] = np.ones(num_items, np.int64)
            batches[module] = SampleBatch(cols)
        return MultiAgentBatch(batches, env_steps=num_items) if batches else None


class ArrayReplayDQN(DQN):
    """RLlib's DQN whose training step replays from a :class:`TransitionReplay` (module docstring); with any
    other buffer it is RLlib's DQN unchanged."""

    def training_step(self) -> None:
        buffer = self.local_replay_buffer
        if not isinstance(buffer, TransitionReplay):
            return super().training_step()
        if self.config.n_step != 1:
            raise ValueError(f"n_step: {REPLAY_TYPE} replays one-step transitions; expected 1, got "
                             f"{self.config.n_step!r}")
        store_weight, train_weight = calculate_rr_weights(self.config)
        for _ in range(store_weight):
            with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
                episodes, runner_results = synchronous_parallel_sample(
                    worker_set=self.env_runner_group, concat=True, sample_timeout_s=self.config.sample_timeout_s,
                    _uses_new_env_runners=True, _return_metrics=True)
            self.metrics.aggregate(runner_results, key=ENV_RUNNER_RESULTS)
            with self.metrics.log_time((TIMERS, REPLAY_BUFFER_ADD_DATA_TIMER)):
                buffer.add(episodes)
        timesteps = {key: self.metrics.peek((ENV_RUNNER_RESULTS, key), default=default)
                     for key, default in ((NUM_ENV_STEPS_SAMPLED_LIFETIME, 0), (NUM_AGENT_STEPS_SAMPLED_LIFETIME, {}))}
        now = (sum(timesteps[NUM_AGENT_STEPS_SAMPLED_LIFETIME].values())
               if self.config.count_steps_by == "agent_steps" else timesteps[NUM_ENV_STEPS_SAMPLED_LIFETIME])
        if now < self.config.num_steps_sampled_before_learning_starts:
            return None
        results: list[dict] = []
        for _ in range(train_weight):
            with self.metrics.log_time((TIMERS, REPLAY_BUFFER_SAMPLE_TIMER)):
                batch = buffer.sample_batch(self.config.total_train_batch_size)
            if batch is None:  # nothing stored yet (learning starts at 0)
                return None
            with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
                results = self.learner_group.update(batch=batch, timesteps=timesteps)
            for result in results:
                for module_results in result.values():
                    module_results.pop(TD_ERROR_KEY, None)  # per-transition errors: priorities only
            self.metrics.aggregate(results, key=LEARNER_RESULTS)
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                               policies=set(results[0]) - {ALL_MODULES}, global_vars=None,
                                               inference_only=True)
        return None
