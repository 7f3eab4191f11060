"""P-DQN and MP-DQN for parameterised (hybrid) actions, as RLlib 2.60 new-API-stack algorithms.

An agent picks a discrete mode ``k`` in {0..K-1} and a continuous parameter ``x_k`` for it; its action space is
``Dict({"mode": Discrete(K), "power": Box(low, high, shape=(K,))})`` (or ``shape=(K, P)``: P parameters per
mode), every mode's parameter is sent and the environment reads the chosen one.

* P-DQN (Xiong et al. 2018): a parameter actor ``x(s)`` gives all K parameter vectors (tanh-squashed into the
  Box); a Q-network ``Q(s, x_1..x_K)`` gives K values.  Acting: ``k = argmax_k Q(s, x(s))``.  The Q-loss is a
  TD loss on the stored ``(k, x)``; the actor loss ``-sum_k Q(s, x(s))[k]`` moves the actor only.
* MP-DQN (Bester et al. 2019, ``multi_pass=True``): the Q-network runs K passes, pass k seeing only ``x_k``
  (the others zeroed), and ``Q_k`` is read from pass k, so ``Q_k`` does not depend on ``x_j`` (j != k) and the
  actor gets no false gradient through the other modes' parameters.

Pieces: :class:`PDQNConfig` / :class:`MPDQNConfig` (settings), :class:`PDQN` / :class:`MPDQN` (the algorithm:
sample, store in an episode replay buffer, update, sync), :class:`PDQNTorchRLModule` (networks, greedy and
exploring actions) and :class:`PDQNTorchLearner` (two optimisers, the losses, target updates).
:class:`GroupedPDQNTorchRLModule` applies the same networks to each occupied slot of a padded slot set (a
station's EVs), the set's Q the sum of its slots' (value decomposition); the same learner trains it.

Parameters travel in two scales: the environment's (Box units, what the replay buffer stores) and the unit
scale [-1, 1] per coordinate that the networks see, so layer sizes and the exploration noise need not know the
Box.  Train with ``environment(normalize_actions=False, clip_actions=False)``: the module already returns
actions inside the space (RLlib's unsquashing would assume [-1, 1] outputs).

Environments that take only the chosen mode's parameter (``power`` of shape (1,) or (P,) whatever the mode) get
it from :func:`chosen_mode_connector` (``config.env_runners(module_to_env_connector=chosen_mode_connector)``):
the environment is sent the chosen mode's parameter while the episode keeps every mode's (the Q-loss needs them).

Not supported: recurrent (stateful) modules, observations other than a flat Box (or the grouped module's slot
set).  The replay buffer is not part of a
checkpoint (RLlib 2.60's new-stack ``Algorithm.get_state`` leaves it out), so a restored run refills it before
it learns again (``num_steps_sampled_before_learning_starts`` counts the buffer's content).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.connectors.common.add_observations_from_episodes_to_batch import (
    AddObservationsFromEpisodesToBatch,
)
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner.add_next_observations_from_episodes_to_train_batch import (
    AddNextObservationsFromEpisodesToTrainBatch,
)
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import POLICY_LOSS_KEY
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.learner.utils import make_target_network, update_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LAST_TARGET_UPDATE_TS,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_AGENT_STEPS_SAMPLED_LIFETIME,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_TARGET_UPDATES,
    REPLAY_BUFFER_ADD_DATA_TIMER,
    REPLAY_BUFFER_RESULTS,
    REPLAY_BUFFER_SAMPLE_TIMER,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TD_ERROR_KEY,
    TIMERS,
)
from ray.rllib.utils.numpy import convert_to_numpy
from ray.rllib.utils.replay_buffers.utils import update_priorities_in_episode_replay_buffer
from torch import nn
from torch.nn import functional as F  # noqa: N812

from evgrid.validate import check_bool, check_choice, check_int, check_real, describe

__all__ = ["MODE_KEY", "MPDQN", "PARAM_KEY", "PDQN", "QF_PREDS", "Q_ACTOR", "Q_NEXT", "SLOT_KEYS",
           "ChosenModeParameter", "GroupedPDQNTorchRLModule", "MPDQNConfig", "PDQNConfig", "PDQNTorchLearner",
           "PDQNTorchRLModule", "chosen_mode_action", "chosen_mode_connector", "demonstration_losses",
           "grouped_hybrid_action_space", "hybrid_action_space", "pdqn_losses", "schedule_value"]

log = logging.getLogger(__name__)

MODE_KEY = "mode"
PARAM_KEY = "power"

# forward_train outputs (keys of the learner's fwd_out)
QF_PREDS = "qf_preds"  # Q(s, x_b) of every mode at the stored parameters, [B, K]
Q_ACTOR = "q_actor"  # Q(s, x(s)) with the Q-network's weights held fixed, [B, K]
Q_NEXT = "q_next"  # bootstrap value max_k Q_target(s', x_target(s')) (or its double-Q form), [B]

Schedule = float | Sequence[Sequence[float]]


def hybrid_action_space(low: Any, high: Any) -> gym.spaces.Dict:
    """The action space these algorithms act in: one mode of ``len(low)`` and one parameter per mode in
    [low_k, high_k] (arrays of shape (K,) or (K, P))."""
    lo = np.asarray(low, dtype=np.float32)
    hi = np.asarray(high, dtype=np.float32)
    return gym.spaces.Dict({MODE_KEY: gym.spaces.Discrete(lo.shape[0]),
                            PARAM_KEY: gym.spaces.Box(lo, hi, dtype=np.float32)})


def _check_schedule(name: str, value: Any, hi: float) -> Schedule:
    """A constant in [0, hi] or a schedule ``[[timestep, value], ...]`` from timestep 0, timesteps increasing,
    values in [0, hi] (linear in between, the last value after the end)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return check_real(name, value, 0.0, hi)
    expected = f"{name}: expected a number in [0, {hi}] or a schedule [[0, v0], [t1, v1], ...] with increasing " \
               f"timesteps and values in [0, {hi}]"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) < 1:
        raise ValueError(f"{expected}, got {describe(value)}")
    points = []
    for pair in value:
        if isinstance(pair, str | bytes) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"{expected}, got {describe(value)}")
        try:
            t = check_real(name, pair[0], 0.0)
            v = check_real(name, pair[1], 0.0, hi)
        except ValueError:
            raise ValueError(f"{expected}, got {describe(value)}") from None
        points.append((t, v))
    if points[0][0] != 0.0 or any(b[0] <= a[0] for a, b in zip(points, points[1:])):
        raise ValueError(f"{expected}, got {describe(value)}")
    return [list(p) for p in points]


def schedule_value(schedule: Schedule, t: float) -> float:
    """The value of a constant or piecewise-linear schedule at timestep ``t``."""
    if isinstance(schedule, int | float):
        return float(schedule)
    ts, vs = zip(*schedule)
    return float(np.interp(t, ts, vs))


class PDQNConfig(AlgorithmConfig):
    """Settings of :class:`PDQN` (``multi_pass=False``) and :class:`MPDQN` (``multi_pass=True``).

    Network widths come from ``rl_module(model_config={"actor_hidden": [...], "q_hidden": [...]})`` (or
    ``"hidden"`` for both; default [64, 64]).  Everything else via ``training(...)``:

    * ``multi_pass`` (bool): MP-DQN's K-pass Q-network.
    * ``actor_lr``, ``critic_lr`` (float in [0, 1]; 0 freezes that network): Adam step sizes of the parameter
      actor and of the Q-network.
    * ``tau`` (float in (0, 1]): Polyak weight of a target update (1 copies).
    * ``target_network_update_freq`` (int >= 0): env steps between target updates; 0 updates after every
      learner update (soft updates with ``tau`` < 1; periodic hard syncs: ``tau=1`` and e.g. 500).
    * ``epsilon`` (constant in [0, 1] or ``[[t, value], ...]`` over env steps): probability of a uniformly
      random mode with uniformly random parameters.
    * ``param_noise`` (constant in [0, 10] or schedule): std of the Gaussian noise on the greedy parameters,
      as a fraction of each parameter's half range; noisy parameters are clipped into the Box.
    * ``replay_buffer_config`` (dict): an RLlib episode buffer, ``{"type": "EpisodeReplayBuffer" |
      "PrioritizedEpisodeReplayBuffer" | "MultiAgentEpisodeReplayBuffer" | ..., "capacity": ...}``.
    * ``num_steps_sampled_before_learning_starts`` (int >= 0): timesteps in the buffer before updates start.
    * ``training_intensity`` (float > 0 or None): replayed / sampled timesteps, i.e. updates per iteration
      ``ceil(training_intensity * sampled / train_batch_size)``; None: one update per iteration.
    * ``double_q`` (bool): bootstrap with the online networks' choice of mode, valued by the target networks.
    * ``td_error_loss_fn`` ("huber" | "mse"), ``n_step`` (int >= 1), plus RLlib's ``gamma``, ``grad_clip``
      (per optimiser), ``train_batch_size_per_learner`` (the minibatch).
    """

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or PDQN)
        # inherited settings: the module squashes into the Box itself; off-policy defaults
        self.normalize_actions = False
        self.clip_actions = False
        self.train_batch_size_per_learner = 128
        self.rollout_fragment_length = 64
        self.grad_clip = 10.0
        self.grad_clip_by = "global_norm"
        self.gamma = 0.99
        # P-DQN / MP-DQN
        self.multi_pass = False
        self.actor_lr = 1e-4
        self.critic_lr = 1e-3
        self.tau = 0.01
        self.target_network_update_freq = 0
        self.epsilon: Schedule = [[0, 1.0], [10_000, 0.05]]
        self.param_noise: Schedule = [[0, 0.3], [10_000, 0.05]]
        self.replay_buffer_config: dict[str, Any] = {"type": "EpisodeReplayBuffer", "capacity": 50_000}
        self.num_steps_sampled_before_learning_starts = 1000
        self.training_intensity: float | None = None
        self.double_q = False
        self.td_error_loss_fn = "huber"
        self.n_step = 1

    def training(self, *, multi_pass: bool = NotProvided, actor_lr: float = NotProvided,
                 critic_lr: float = NotProvided, tau: float = NotProvided,
                 target_network_update_freq: int = NotProvided, epsilon: Schedule = NotProvided,
                 param_noise: Schedule = NotProvided, replay_buffer_config: dict = NotProvided,
                 num_steps_sampled_before_learning_starts: int = NotProvided,
                 training_intensity: float | None = NotProvided, double_q: bool = NotProvided,
                 td_error_loss_fn: str = NotProvided, n_step: int = NotProvided, **kwargs: Any) -> PDQNConfig:
        """RLlib's ``training()`` plus the P-DQN settings (see the class doc)."""
        super().training(**kwargs)
        given = dict(multi_pass=multi_pass, actor_lr=actor_lr, critic_lr=critic_lr, tau=tau,
                     target_network_update_freq=target_network_update_freq, epsilon=epsilon,
                     param_noise=param_noise, num_steps_sampled_before_learning_starts=(
                         num_steps_sampled_before_learning_starts), training_intensity=training_intensity,
                     double_q=double_q, td_error_loss_fn=td_error_loss_fn, n_step=n_step)
        for key, value in given.items():
            if value is not NotProvided:
                setattr(self, key, value)
        if replay_buffer_config is not NotProvided:
            if isinstance(replay_buffer_config, dict):
                # a new buffer type replaces the settings, the same type updates them
                same = replay_buffer_config.get("type", self.replay_buffer_config.get("type")) == \
                    self.replay_buffer_config.get("type")
                replay_buffer_config = {**(self.replay_buffer_config if same else {}), **replay_buffer_config}
            self.replay_buffer_config = replay_buffer_config  # validate() refuses anything else
        return self

    def validate(self) -> None:
        super().validate()
        check_bool("multi_pass", self.multi_pass)
        check_real("actor_lr", self.actor_lr, 0.0, 1.0)
        check_real("critic_lr", self.critic_lr, 0.0, 1.0)
        check_real("tau", self.tau, 0.0, 1.0, lo_open=True)
        check_int("target_network_update_freq", self.target_network_update_freq, 0, 10**12)
        _check_schedule("epsilon", self.epsilon, 1.0)
        _check_schedule("param_noise", self.param_noise, 10.0)
        check_int("num_steps_sampled_before_learning_starts", self.num_steps_sampled_before_learning_starts,
                  0, 10**12)
        if self.training_intensity is not None:
            check_real("training_intensity", self.training_intensity, 0.0, 1e6, lo_open=True)
        check_bool("double_q", self.double_q)
        check_choice("td_error_loss_fn", self.td_error_loss_fn, ("huber", "mse"))
        check_int("n_step", self.n_step, 1, 1000)
        check_real("gamma", self.gamma, 0.0, 1.0)
        check_int("train_batch_size_per_learner", self.train_batch_size_per_learner, 1, 10**9)
        rb = self.replay_buffer_config
        if not isinstance(rb, dict) or "type" not in rb:
            raise ValueError(f"replay_buffer_config: expected a mapping with a 'type', got {describe(rb)}")
        kind = rb["type"] if isinstance(rb["type"], str) else getattr(rb["type"], "__name__", "")
        if "EpisodeReplayBuffer" not in kind and "EpisodeBuffer" not in kind:
            raise ValueError(f"replay_buffer_config.type: expected an episode replay buffer (EpisodeReplayBuffer, "
                             f"PrioritizedEpisodeReplayBuffer, MultiAgent...), got {describe(rb['type'])}")
        check_int("replay_buffer_config.capacity", rb.get("capacity", 50_000), 1, 10**10)
        if not self.enable_rl_module_and_learner or not self.enable_env_runner_and_connector_v2:
            raise ValueError("api_stack: PDQN runs on RLlib's new API stack only (enable_rl_module_and_learner and "
                             "enable_env_runner_and_connector_v2 true)")
        for name in ("normalize_actions", "clip_actions"):
            if getattr(self, name):
                raise ValueError(f"{name}: expected False for PDQN (its module returns actions inside the Box "
                                 f"already; RLlib's unsquashing assumes outputs in [-1, 1]), got True")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=PDQNTorchRLModule, model_config=self.model_config)

    def get_default_learner_class(self) -> type:
        return PDQNTorchLearner

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        # what the modules need: to act (env runners) and for the bootstrap value (learners)
        return super()._model_config_auto_includes | {"multi_pass": self.multi_pass, "epsilon": self.epsilon,
                                                      "param_noise": self.param_noise, "double_q": self.double_q}


class MPDQNConfig(PDQNConfig):
    """:class:`PDQNConfig` with ``multi_pass=True`` (MP-DQN)."""

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or MPDQN)
        self.multi_pass = True


def _mlp(n_in: int, hidden: Sequence[int], n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        n_in = h
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _widths(model_config: dict, key: str) -> list[int]:
    widths = model_config.get(key, model_config.get("hidden", [64, 64]))
    if not isinstance(widths, list | tuple) or not widths:
        raise ValueError(f"model_config.{key}: expected a list of layer widths (integers in [1, 65536]), got "
                         f"{describe(widths)}")
    return [check_int(f"model_config.{key}", h, 1, 65536) for h in widths]


class PDQNTorchRLModule(TorchRLModule, TargetNetworkAPI, InferenceOnlyAPI):
    """Parameter actor, Q-network (single- or multi-pass) and, in learners, their target copies.

    Observation: a flat Box.  Action: ``Dict(mode=Discrete(K), power=Box(shape=(K,) or (K, P)))`` with finite
    bounds.  ``model_config``: ``actor_hidden``, ``q_hidden`` (or ``hidden``; default [64, 64]),
    ``multi_pass``, ``epsilon``, ``param_noise``, ``double_q`` (filled in from :class:`PDQNConfig`).

    Outputs ``Columns.ACTIONS`` directly (``{"mode": long [B], "power": float [B, K(, P)]}``), so RLlib's
    ``GetActions`` connector passes them through.
    """

    def setup(self) -> None:
        obs, act = self.observation_space, self.action_space
        if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
            raise ValueError(f"observation_space: PDQN expects a flat Box, got {obs}")
        if not isinstance(act, gym.spaces.Dict) or set(act.spaces) != {MODE_KEY, PARAM_KEY} \
                or not isinstance(act[MODE_KEY], gym.spaces.Discrete) or not isinstance(act[PARAM_KEY], gym.spaces.Box):
            raise ValueError(f"action_space: PDQN expects Dict({MODE_KEY!r}: Discrete(K), {PARAM_KEY!r}: Box of "
                             f"shape (K,) or (K, P)), got {act}")
        self._build(int(obs.shape[0]), int(act[MODE_KEY].n), act[PARAM_KEY], PARAM_KEY)

    def _build(self, n_obs: int, n_mode: int, box: gym.spaces.Box, where: str, lead: int = 0) -> None:
        """The networks for items of ``n_obs`` features, each choosing one of ``n_mode`` modes and the
        parameters ``box`` (its shape after ``lead`` leading axes: (K,) or (K, P)); ``where`` names the Box in
        messages."""
        shape = box.shape[lead:]
        if shape[:1] != (n_mode,) or len(shape) > 2:
            raise ValueError(f"action_space.{where}: expected shape ({n_mode},) or ({n_mode}, P), one parameter "
                             f"(vector) per mode, got {box.shape}")
        low, high = np.asarray(box.low, np.float64), np.asarray(box.high, np.float64)
        if not (np.isfinite(low).all() and np.isfinite(high).all() and (high > low).all()):
            raise ValueError(f"action_space.{where}: expected finite bounds with high > low, got low "
                             f"{describe(box.low)}, high {describe(box.high)}")
        if lead:
            # one set of bounds for every item: the leading axes must repeat it
            low, high = low.reshape(-1, *shape), high.reshape(-1, *shape)
            if not ((low == low[0]).all() and (high == high[0]).all()):
                raise ValueError(f"action_space.{where}: expected the same bounds for every slot, got low "
                                 f"{describe(box.low)}, high {describe(box.high)}")
            low, high = low[0], high[0]
        self.n_mode = n_mode
        self.n_param = int(shape[1]) if len(shape) == 2 else 1
        self.param_shape = tuple(shape)  # one item's
        self.param_dtype = torch.float32 if box.dtype == np.float32 else torch.float64
        # buffers move with .to(device) but stay out of the state (they follow from the space)
        self.register_buffer("_low", torch.tensor(low.reshape(n_mode, self.n_param), dtype=torch.float32),
                             persistent=False)
        self.register_buffer("_high", torch.tensor(high.reshape(n_mode, self.n_param), dtype=torch.float32),
                             persistent=False)
        self.register_buffer("_pass_mask", torch.eye(n_mode).reshape(n_mode, n_mode, 1), persistent=False)
        cfg = self.model_config or {}
        self.multi_pass = check_bool("multi_pass", cfg.get("multi_pass", False))
        self.epsilon = _check_schedule("epsilon", cfg.get("epsilon", [[0, 1.0], [10_000, 0.05]]), 1.0)
        self.param_noise = _check_schedule("param_noise", cfg.get("param_noise", 0.1), 10.0)
        self.double_q = check_bool("double_q", cfg.get("double_q", False))
        n_flat = n_mode * self.n_param
        self.actor = _mlp(n_obs, _widths(cfg, "actor_hidden"), n_flat)
        self.q_net = _mlp(n_obs + n_flat, _widths(cfg, "q_hidden"), n_mode)
        # start with parameters near the middle of their ranges, where tanh is not saturated
        last = self.actor[-1]
        nn.init.uniform_(last.weight, -3e-3, 3e-3)
        nn.init.zeros_(last.bias)

    # ---- the networks ---------------------------------------------------------------------------------------

    def params_unit(self, obs: torch.Tensor, actor: nn.Module | None = None) -> torch.Tensor:
        """Every mode's parameters in the unit scale, ``[B, K, P]`` in [-1, 1]."""
        out = (actor or self.actor)(obs.float())
        return torch.tanh(out).reshape(obs.shape[0], self.n_mode, self.n_param)

    def q_values(self, obs: torch.Tensor, x_unit: torch.Tensor,
                 q_net: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``Q(s, x_1..x_K)``, ``[B, K]``, for parameters ``x_unit`` ``[B, K, P]`` in the unit scale.

        Multi-pass: K passes, pass k with every parameter but ``x_k`` zeroed; ``Q_k`` is output k of pass k.
        """
        net = q_net or self.q_net
        obs = obs.float()
        # explicit sizes, no -1: a grouped module may pass no item at all (B = 0)
        b, n_flat = obs.shape[0], self.n_mode * self.n_param
        if not self.multi_pass:
            return net(torch.cat([obs, x_unit.reshape(b, n_flat)], dim=-1))
        # [B, 1, K, P] * [K, K, 1]: row k keeps mode k's parameters only
        xs = (x_unit.unsqueeze(1) * self._pass_mask).reshape(b, self.n_mode, n_flat)
        inp = torch.cat([obs.unsqueeze(1).expand(b, self.n_mode, obs.shape[-1]), xs], dim=-1)
        q = net(inp.reshape(b * self.n_mode, obs.shape[-1] + n_flat)).reshape(b, self.n_mode, self.n_mode)
        return q.diagonal(dim1=1, dim2=2)

    def q_values_fixed_net(self, obs: torch.Tensor, x_unit: torch.Tensor) -> torch.Tensor:
        """``q_values`` with the Q-network's weights detached: gradients reach ``x_unit`` (the actor) only."""
        weights = {name: p.detach() for name, p in self.q_net.named_parameters()}
        return self.q_values(obs, x_unit, lambda inp: torch.func.functional_call(self.q_net, weights, (inp,)))

    def to_env(self, x_unit: torch.Tensor) -> torch.Tensor:
        """Unit-scale parameters ``[B, K, P]`` -> Box units in the Box's shape (clamped: rounding stays inside)."""
        x = self._low + (x_unit + 1.0) * 0.5 * (self._high - self._low)
        x = torch.minimum(torch.maximum(x, self._low), self._high)
        return x.reshape(x.shape[0], *self.param_shape).to(self.param_dtype)

    def to_unit(self, x_env: torch.Tensor) -> torch.Tensor:
        """Box units (the Box's shape) -> unit scale ``[B, K, P]``."""
        x = x_env.float().reshape(x_env.shape[0], self.n_mode, self.n_param)
        return (2.0 * (x - self._low) / (self._high - self._low) - 1.0).clamp(-1.0, 1.0)

    # ---- acting ---------------------------------------------------------------------------------------------

    def choose(self, obs: torch.Tensor, t: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mode ``[N]``, unit-scale parameters ``[N, K, P]``) for items ``obs`` ``[N, n_obs]``: greedy when ``t``
        is None; otherwise ε-greedy over modes (a random mode comes with uniformly random parameters) and, for
        the greedy ones, Gaussian noise on the parameters (``param_noise`` of the half range), clipped into
        the Box, at exploration timestep ``t``."""
        with torch.no_grad():
            x = self.params_unit(obs)
            mode = self.q_values(obs, x).argmax(dim=-1)
            if t is None:
                return mode, x
            eps = schedule_value(self.epsilon, t)
            sigma = schedule_value(self.param_noise, t)
            n = obs.shape[0]
            if sigma > 0.0:
                x = (x + sigma * torch.randn_like(x)).clamp(-1.0, 1.0)
            rand = torch.rand(n, device=obs.device) < eps
            if rand.any():
                mode = torch.where(rand, torch.randint(0, self.n_mode, (n,), device=obs.device), mode)
                x = torch.where(rand.view(n, 1, 1), torch.rand_like(x) * 2.0 - 1.0, x)
        return mode, x

    def _forward_inference(self, batch: dict, **kwargs: Any) -> dict:
        mode, x = self.choose(batch[Columns.OBS])
        return {Columns.ACTIONS: {MODE_KEY: mode, PARAM_KEY: self.to_env(x)}}

    def _forward_exploration(self, batch: dict, t: int = 0, **kwargs: Any) -> dict:
        """See :meth:`choose`."""
        mode, x = self.choose(batch[Columns.OBS], t)
        return {Columns.ACTIONS: {MODE_KEY: mode, PARAM_KEY: self.to_env(x)}}

    def _forward(self, batch: dict, **kwargs: Any) -> dict:
        return self._forward_inference(batch)

    # ---- learning -------------------------------------------------------------------------------------------

    def _forward_train(self, batch: dict, **kwargs: Any) -> dict:
        """Q at the stored actions, Q at the actor's parameters (Q-net fixed) and the bootstrap value."""
        if self.inference_only:
            raise RuntimeError("PDQNTorchRLModule: an inference-only module (an env runner's) cannot train")
        obs, act = batch[Columns.OBS], batch[Columns.ACTIONS]
        out = {QF_PREDS: self.q_values(obs, self.to_unit(act[PARAM_KEY])),
               Q_ACTOR: self.q_values_fixed_net(obs, self.params_unit(obs))}
        out[Q_NEXT] = self.forward_target(batch)[Q_NEXT]
        return out

    def forward_target(self, batch: dict, **kwargs: Any) -> dict:
        """The bootstrap value at ``batch[NEXT_OBS]`` (see :meth:`bootstrap_value`)."""
        return {Q_NEXT: self.bootstrap_value(batch[Columns.NEXT_OBS])}

    def bootstrap_value(self, nxt: torch.Tensor) -> torch.Tensor:
        """``max_k Q_target(s', x_target(s'))`` per item ``[N]`` of ``nxt`` ``[N, n_obs]``; with ``double_q`` the
        mode the online networks would pick, valued by the target networks."""
        with torch.no_grad():
            q_target = self.q_values(nxt, self.params_unit(nxt, self._target_actor), self._target_q)
            if self.double_q:
                best = self.q_values(nxt, self.params_unit(nxt)).argmax(dim=-1, keepdim=True)
                return q_target.gather(-1, best).squeeze(-1)
            return q_target.max(dim=-1).values

    def make_target_networks(self) -> None:
        self._target_actor = make_target_network(self.actor)
        self._target_q = make_target_network(self.q_net)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.actor, self._target_actor), (self.q_net, self._target_q)]

    def get_non_inference_attributes(self) -> list[str]:
        return ["_target_actor", "_target_q"]


SLOT_KEYS = ("evs", "mask", "context")


def grouped_hybrid_action_space(n_slot: int, low: Any, high: Any) -> gym.spaces.Dict:
    """The action space of :class:`GroupedPDQNTorchRLModule`: per slot one mode of ``len(low)`` and one
    parameter per mode in [low_k, high_k] (arrays of shape (K,) or (K, P), the same for every slot)."""
    lo = np.asarray(low, dtype=np.float32)
    hi = np.asarray(high, dtype=np.float32)
    return gym.spaces.Dict({MODE_KEY: gym.spaces.MultiDiscrete([lo.shape[0]] * n_slot),
                            PARAM_KEY: gym.spaces.Box(np.broadcast_to(lo, (n_slot, *lo.shape)).copy(),
                                                      np.broadcast_to(hi, (n_slot, *hi.shape)).copy(),
                                                      dtype=np.float32)})


class GroupedPDQNTorchRLModule(PDQNTorchRLModule):
    """P-DQN / MP-DQN over a padded set of slots: one shared per-slot parameter actor and Q-network (and their
    targets), the networks of :class:`PDQNTorchRLModule`, applied to each occupied slot's features and the
    context.

    Observation: ``Dict(evs=Box((S, F)), mask=Box((S,)), context=Box((C,)))`` (a slot is occupied where its
    mask is > 0.5).  Action: :func:`grouped_hybrid_action_space`, ``Dict(mode=MultiDiscrete([K] * S),
    power=Box((S, K) or (S, K, P)))``; :class:`ChosenModeParameter` sends the env each slot's chosen parameter.
    Every slot picks its own mode and parameters (ε-greedy and parameter noise per slot); empty slots get mode 0
    and mid-range parameters, which the env ignores.

    Learning decomposes the set's value over its slots (VDN): ``Q(s, a) = sum_occupied Q_slot(s_i, k_i, x_i)``
    and the bootstrap value ``sum over s''s occupied slots of max_k Q'_slot``; the actor maximises the sum of its
    slots' Q-values.  Empty slots never enter a network: occupied slots are gathered, and their outputs
    scattered into zero-filled ``[B, S, K]`` tensors, so padding contributes exactly zero to every loss and
    gradient whatever it holds, and every weight stays in the graph (finite, possibly zero, gradients).
    """

    def setup(self) -> None:
        obs, act = self.observation_space, self.action_space
        if not isinstance(obs, gym.spaces.Dict) or set(obs.spaces) != set(SLOT_KEYS) \
                or len(obs["evs"].shape) != 2 or obs["mask"].shape != obs["evs"].shape[:1] \
                or len(obs["context"].shape) != 1:
            raise ValueError(f"observation_space: grouped PDQN expects Dict(evs: Box (S, F), mask: Box (S,), "
                             f"context: Box (C,)), got {obs}")
        n_slot, n_feat = obs["evs"].shape
        if not isinstance(act, gym.spaces.Dict) or set(act.spaces) != {MODE_KEY, PARAM_KEY} \
                or not isinstance(act[MODE_KEY], gym.spaces.MultiDiscrete) or act[MODE_KEY].shape != (n_slot,) \
                or len(set(np.asarray(act[MODE_KEY].nvec).tolist())) != 1 \
                or not isinstance(act[PARAM_KEY], gym.spaces.Box) or act[PARAM_KEY].shape[:1] != (n_slot,):
            raise ValueError(f"action_space: grouped PDQN expects Dict({MODE_KEY!r}: MultiDiscrete([K] * {n_slot}), "
                             f"{PARAM_KEY!r}: Box of shape ({n_slot}, K) or ({n_slot}, K, P)), got {act}")
        self.n_slot = int(n_slot)
        self._build(int(n_feat) + int(obs["context"].shape[0]), int(act[MODE_KEY].nvec[0]), act[PARAM_KEY],
                    PARAM_KEY, lead=1)

    def slot_items(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The occupied slots' inputs ``[N, F + C]`` (features and context), their flat indices into
        ``B * S``, and B."""
        evs, ctx = obs["evs"].float(), obs["context"].float()
        b = evs.shape[0]
        idx = (obs["mask"].reshape(-1) > 0.5).nonzero().squeeze(-1)
        items = torch.cat([evs.reshape(b * self.n_slot, evs.shape[-1]).index_select(0, idx),
                           ctx.index_select(0, idx // self.n_slot)], dim=-1)
        return items, idx, b

    def _scatter(self, values: torch.Tensor, idx: torch.Tensor, b: int, fill: float) -> torch.Tensor:
        """Per-occupied-slot ``values`` ``[N, ...]`` -> ``[B, S, ...]``, ``fill`` in empty slots (differentiable
        towards ``values``)."""
        full = values.new_full((b * self.n_slot, *values.shape[1:]), fill)
        return full.index_copy(0, idx, values).reshape(b, self.n_slot, *values.shape[1:])

    def _slot_actions(self, obs: dict, t: int | None) -> dict:
        items, idx, b = self.slot_items(obs)
        mode, x = self.choose(items, t)
        mode = self._scatter(mode, idx, b, 0)
        x = self._scatter(x, idx, b, 0.0).reshape(b * self.n_slot, self.n_mode, self.n_param)
        return {MODE_KEY: mode, PARAM_KEY: self.to_env(x).reshape(b, self.n_slot, *self.param_shape)}

    def _forward_inference(self, batch: dict, **kwargs: Any) -> dict:
        return {Columns.ACTIONS: self._slot_actions(batch[Columns.OBS], None)}

    def _forward_exploration(self, batch: dict, t: int = 0, **kwargs: Any) -> dict:
        return {Columns.ACTIONS: self._slot_actions(batch[Columns.OBS], t)}

    def _forward_train(self, batch: dict, **kwargs: Any) -> dict:
        """Per slot Q at the stored actions and Q at the actor's parameters (Q-net fixed), ``[B, S, K]`` and zero
        in empty slots, and the set's bootstrap value ``[B]``."""
        if self.inference_only:
            raise RuntimeError("GroupedPDQNTorchRLModule: an inference-only module (an env runner's) cannot train")
        items, idx, b = self.slot_items(batch[Columns.OBS])
        stored = batch[Columns.ACTIONS][PARAM_KEY].reshape(b * self.n_slot, *self.param_shape)
        q = self.q_values(items, self.to_unit(stored.index_select(0, idx)))
        q_actor = self.q_values_fixed_net(items, self.params_unit(items))
        return {QF_PREDS: self._scatter(q, idx, b, 0.0), Q_ACTOR: self._scatter(q_actor, idx, b, 0.0),
                Q_NEXT: self.forward_target(batch)[Q_NEXT]}

    def forward_target(self, batch: dict, **kwargs: Any) -> dict:
        """The sum over s''s occupied slots of each slot's :meth:`bootstrap_value` (0 for an empty set)."""
        items, idx, b = self.slot_items(batch[Columns.NEXT_OBS])
        value = self.bootstrap_value(items)
        return {Q_NEXT: value.new_zeros(b).index_add(0, idx // self.n_slot, value)}


def pdqn_losses(fwd_out: dict, batch: dict, *, gamma: float,
                loss_fn: str = "huber") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q-loss, actor loss, |TD error| per sample) from a P-DQN module's ``_forward_train`` output.

    ``QF_PREDS`` and ``Q_ACTOR`` are ``[B, K]`` (one decision per sample) or ``[B, S, K]`` (a set of S slots per
    sample, zero in empty slots: :class:`GroupedPDQNTorchRLModule`); a sample's Q is the sum over its slots
    (value decomposition), and ``Q_NEXT`` ``[B]`` is already that sum at s'.
    Q-loss: ``weights * huber|mse(sum_slots Q(s, x_b)[k_b], r + gamma^n (1 - terminated) q_next)`` averaged; it
    reaches the Q-network only (the target is computed without gradients, the stored parameters are data).
    Actor loss: ``-mean_b sum_slots sum_k Q(s, x(s))[k]``; it reaches the actor only (the Q-network's weights
    were detached in that forward pass).
    """
    act = batch[Columns.ACTIONS]
    q_sel = fwd_out[QF_PREDS].gather(-1, act[MODE_KEY].long().unsqueeze(-1)).squeeze(-1)
    if q_sel.dim() > 1:  # a slot set: the sample's Q is the sum over its slots (empty ones hold 0)
        q_sel = q_sel.sum(-1)
    n_step = batch.get("n_step")
    discount = gamma ** n_step.float() if n_step is not None else torch.full_like(q_sel, gamma)
    target = (batch[Columns.REWARDS].float()
              + discount * (1.0 - batch[Columns.TERMINATEDS].float()) * fwd_out[Q_NEXT]).detach()
    weights = batch.get("weights")
    weights = torch.ones_like(q_sel) if weights is None else weights.float()
    per_sample = F.huber_loss(q_sel, target, reduction="none") if loss_fn == "huber" \
        else F.mse_loss(q_sel, target, reduction="none")
    q_loss = (weights * per_sample).mean()
    actor_loss = -fwd_out[Q_ACTOR].flatten(1).sum(-1).mean()
    return q_loss, actor_loss, (q_sel - target).abs().detach()


def demonstration_losses(module: PDQNTorchRLModule, items: torch.Tensor, mode: torch.Tensor,
                         power_unit: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(margin loss, actor loss, ``Q_{k_E}`` ``[N]``): DQfD's supervised terms (Hester et al. 2018) for
    parameterised actions, on demonstrated decisions: inputs ``items`` ``[N, n_obs]`` (observations, or a grouped
    module's slot items), the demonstrated ``mode`` ``[N]`` and its parameters ``power_unit`` ``[N, P]`` in the
    unit scale, NaN where they are not acted on (an idle EV's).

    Margin loss: ``mean(max_k (Q_k + margin [k != k_E]) - Q_{k_E})`` at the actor's parameters (held fixed), so
    the greedy mode is the demonstrated one by at least ``margin``; it reaches the Q-network only.  Actor loss:
    the mean squared error of the demonstrated mode's parameters from the demonstration's where those are
    finite; it reaches the actor only.  ``Q_{k_E}`` is the demonstrated mode's value at the actor's parameters.
    """
    x = module.params_unit(items)
    q = module.q_values(items, x.detach())
    k = mode.long().unsqueeze(-1)
    q_demo = q.gather(-1, k).squeeze(-1)
    margins = torch.full_like(q, margin).scatter(-1, k, 0.0)
    margin_loss = ((q + margins).max(dim=-1).values - q_demo).mean() if len(q) else q.sum()
    chosen = x.gather(1, k.unsqueeze(-1).expand(-1, 1, x.shape[-1])).squeeze(1)  # [N, P]
    acted = torch.isfinite(power_unit).all(dim=-1)
    err = (chosen - torch.nan_to_num(power_unit)) ** 2
    actor_loss = err[acted].mean() if bool(acted.any()) else chosen.sum() * 0.0
    return margin_loss, actor_loss, q_demo


class PDQNTorchLearner(TorchLearner):
    """Two Adam optimisers per module, ``"qf"`` (Q-network, ``critic_lr``) and ``"actor"`` (``actor_lr``), the
    P-DQN losses, and target updates after each update (every ``target_network_update_freq`` env steps).

    With demonstrations (:meth:`set_demonstrations`) each update adds, for that module, ``weight`` times
    :func:`demonstration_losses` on a uniformly drawn minibatch of the demonstrated decisions (DQfD's supervised
    terms kept beside the TD loss: the Q-network cannot unlearn the demonstrated modes where the TD errors of a
    short budget say nothing better)."""

    def build(self) -> None:
        super().build()
        self._demos: dict[str, dict[str, Any]] = {}
        self._last_target_update_ts: dict[str, int] = defaultdict(int)
        self.module.foreach_module(
            lambda mid, mod: mod.make_target_networks() if isinstance(mod, TargetNetworkAPI) else None)
        # the TD target needs s'
        self._learner_connector.insert_after(AddObservationsFromEpisodesToBatch,
                                             AddNextObservationsFromEpisodesToTrainBatch())

    def add_module(self, *, module_id: str, module_spec: RLModuleSpec, **kwargs: Any) -> Any:
        spec = super().add_module(module_id=module_id, module_spec=module_spec, **kwargs)
        if isinstance(self.module[module_id].unwrapped(), TargetNetworkAPI):
            self.module[module_id].unwrapped().make_target_networks()
        return spec

    @classmethod
    def rl_module_required_apis(cls) -> list[type]:
        return [TargetNetworkAPI]

    def set_demonstrations(self, module_id: str, items: np.ndarray, mode: np.ndarray, power_unit: np.ndarray, *,
                           weight: float, margin: float, batch: int = 256, seed: int = 0) -> None:
        """Demonstrated decisions for ``module_id`` (see :func:`demonstration_losses`: ``items`` ``[N, n_obs]``,
        ``mode`` ``[N]``, ``power_unit`` ``[N, P]``), ``batch`` of them drawn per update; ``weight`` 0 removes
        them."""
        check_real("weight", weight, 0.0, 1e6)
        check_real("margin", margin, 0.0, 1e6)
        check_int("batch", batch, 1, 10**7)
        if weight == 0.0:
            self._demos.pop(module_id, None)
            return
        n = len(mode)
        if n == 0 or len(items) != n or len(power_unit) != n:
            raise ValueError(f"items, mode, power_unit: expected the same number (> 0) of demonstrated decisions, "
                             f"got {len(items)}, {n}, {len(power_unit)}")
        self._demos[module_id] = dict(items=torch.as_tensor(items, dtype=torch.float32),
                                      mode=torch.as_tensor(mode, dtype=torch.int64),
                                      power=torch.as_tensor(power_unit, dtype=torch.float32), weight=weight,
                                      margin=margin, batch=batch, gen=torch.Generator().manual_seed(seed))

    def _demonstration_loss(self, module_id: str) -> torch.Tensor | None:
        d = self._demos.get(module_id)
        if d is None:
            return None
        pick = torch.randint(0, len(d["mode"]), (d["batch"],), generator=d["gen"])
        module = self.module[module_id].unwrapped()
        dev = next(module.parameters()).device
        margin_loss, actor_loss, _ = demonstration_losses(
            module, d["items"][pick].to(dev), d["mode"][pick].to(dev), d["power"][pick].to(dev), d["margin"])
        self.metrics.log_dict({"demo_margin_loss": margin_loss, "demo_actor_loss": actor_loss}, key=module_id,
                              window=1)
        return d["weight"] * (margin_loss + actor_loss)

    def configure_optimizers_for_module(self, module_id: str, config: PDQNConfig | None = None) -> None:
        module = self._module[module_id].unwrapped()
        for name, net, lr in (("qf", module.q_net, config.critic_lr), ("actor", module.actor, config.actor_lr)):
            params = self.get_parameters(net)
            self.register_optimizer(module_id=module_id, optimizer_name=name, optimizer=torch.optim.Adam(params),
                                    params=params, lr_or_lr_schedule=lr)

    def compute_loss_for_module(self, *, module_id: str, config: PDQNConfig, batch: dict,
                                fwd_out: dict) -> torch.Tensor:
        q_loss, actor_loss, td_error = pdqn_losses(fwd_out, batch, gamma=config.gamma,
                                                   loss_fn=config.td_error_loss_fn)
        # per-sample TD errors go back to a prioritised buffer (concatenated over learners)
        self.metrics.log_value((module_id, TD_ERROR_KEY), td_error, reduce="item_series")
        q_pred = fwd_out[QF_PREDS].detach()
        if q_pred.dim() == 3:  # a slot set: the statistics of occupied slots (empty ones hold 0)
            q_pred = q_pred[batch[Columns.OBS]["mask"] > 0.5]
            if q_pred.numel() == 0:
                q_pred = q_pred.new_zeros(1)
        self.metrics.log_dict({"qf_loss": q_loss, POLICY_LOSS_KEY: actor_loss, "qf_mean": q_pred.mean(),
                               "qf_max": q_pred.max(), "qf_min": q_pred.min(), "td_error_mean": td_error.mean()},
                              key=module_id, window=1)
        # one sum is enough: each loss has gradients only towards its own network (see pdqn_losses and
        # demonstration_losses), and each optimiser steps only its own network
        demo = self._demonstration_loss(module_id)
        return q_loss + actor_loss + (demo if demo is not None else 0.0)

    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        ts = int(timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0) or 0)
        for module_id, module in self.module._rl_modules.items():
            mod = module.unwrapped()
            if not isinstance(mod, TargetNetworkAPI):
                continue
            config = self.config.get_config_for_module(module_id)
            if ts - self._last_target_update_ts[module_id] < config.target_network_update_freq:
                continue
            for main, target in mod.get_target_network_pairs():
                update_target_network(main_net=main, target_net=target, tau=config.tau)
            self._last_target_update_ts[module_id] = ts
            self.metrics.log_value((module_id, NUM_TARGET_UPDATES), 1, reduce="lifetime_sum")
            self.metrics.log_value((module_id, LAST_TARGET_UPDATE_TS), ts, reduce="max")


def chosen_mode_action(action: Mapping[str, Any]) -> dict[str, Any]:
    """One agent's action with every mode's parameter (numpy) -> the chosen mode's only: ``{"mode": k, "power":
    power[k]}`` as a 1-D array (shape (1,) for one parameter per mode, (P,) for P).  A slot set's action
    (``mode`` of shape (S,), ``power`` (S, K) or (S, K, P)) -> each slot's chosen parameter, (S,) or (S, P)."""
    mode = action[MODE_KEY]
    power = np.asarray(action[PARAM_KEY])
    m = np.asarray(mode)
    if m.ndim == 0:
        return {MODE_KEY: mode, PARAM_KEY: np.array(power[int(mode)], ndmin=1)}
    index = m.astype(np.int64).reshape(*m.shape, 1, *([1] * (power.ndim - m.ndim - 1)))
    return {MODE_KEY: mode, PARAM_KEY: np.take_along_axis(power, index, axis=m.ndim).squeeze(m.ndim)}


class ChosenModeParameter(ConnectorV2):
    """Module-to-env piece: ``Columns.ACTIONS_FOR_ENV`` gets, for the agents of :class:`PDQNTorchRLModule`
    modules (grouped ones included: each slot's chosen parameter), :func:`chosen_mode_action` of their actions,
    and the actions unchanged for every other agent (the env runner sends that column when it exists).
    ``Columns.ACTIONS``, what the episodes store, keeps every mode's parameter.

    It runs among the user pieces of RLlib's default pipeline, after ``UnBatchToIndividualItems`` and
    ``ModuleToAgentUnmapping`` (so it sees one numpy action per agent) and before ``NormalizeAndClipActions``,
    which with PDQN's ``normalize_actions=False, clip_actions=False`` leaves this column alone.
    """

    def __call__(self, *, rl_module: Any, batch: dict[str, Any], episodes: list, explore: bool | None = None,
                 shared_data: dict | None = None, **kwargs: Any) -> Any:
        source = batch.get(Columns.ACTIONS_FOR_ENV, batch.get(Columns.ACTIONS))
        if not source:
            return batch
        hybrid = {mid for mid in {_module_id(key) for key in source}
                  if isinstance((rl_module if mid is None else rl_module[mid]).unwrapped(), PDQNTorchRLModule)}
        batch[Columns.ACTIONS_FOR_ENV] = {
            key: [chosen_mode_action(a) for a in items] if _module_id(key) in hybrid else list(items)
            for key, items in source.items()}
        return batch


def _module_id(key: tuple) -> Any:
    """The module of a module-to-env batch key: ``(episode id, agent id, module id)`` multi-agent; None for a
    single-agent ``(episode id,)`` (one module)."""
    return key[2] if len(key) == 3 else None


def chosen_mode_connector(env: Any = None, spaces: Any = None) -> ConnectorV2:
    """For ``config.env_runners(module_to_env_connector=...)``: a :class:`ChosenModeParameter`."""
    return ChosenModeParameter()


class PDQN(Algorithm):
    """P-DQN (``multi_pass=False``) or MP-DQN (``multi_pass=True``); see :class:`PDQNConfig`."""

    @classmethod
    def get_default_config(cls) -> PDQNConfig:
        return PDQNConfig()

    def setup(self, config: PDQNConfig) -> None:
        super().setup(config)
        buffer = self.local_replay_buffer
        if config.seed is not None and isinstance(getattr(buffer, "rng", None), np.random.Generator):
            # RLlib 2.60's episode buffers draw their samples from an unseeded generator: seed it, so a seeded run
            # replays the same minibatches
            buffer.rng = np.random.default_rng(config.seed)

    def training_step(self) -> None:
        """Sample with the env runners, store the episodes, run the learner updates on replayed minibatches,
        sync the weights to the env runners (targets are updated inside the learner)."""
        cfg = self.config
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes, runner_results = synchronous_parallel_sample(
                worker_set=self.env_runner_group, concat=True, sample_timeout_s=cfg.sample_timeout_s,
                _uses_new_env_runners=True, _return_metrics=True)
        self.metrics.aggregate(runner_results, key=ENV_RUNNER_RESULTS)
        with self.metrics.log_time((TIMERS, REPLAY_BUFFER_ADD_DATA_TIMER)):
            self.local_replay_buffer.add(episodes)
        # the buffer's content, not the lifetime count, gates learning: a restored run starts with an empty buffer
        if self.local_replay_buffer.get_num_timesteps() < max(cfg.num_steps_sampled_before_learning_starts, 1):
            return
        sampled = sum(e.env_steps() for e in episodes)
        n_updates = 1 if cfg.training_intensity is None else \
            max(1, math.ceil(cfg.training_intensity * sampled / cfg.total_train_batch_size))
        timesteps = {
            NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME),
                                                              default=0),
            NUM_AGENT_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                (ENV_RUNNER_RESULTS, NUM_AGENT_STEPS_SAMPLED_LIFETIME), default={}),
        }
        learner_results: list = []
        for _ in range(n_updates):
            with self.metrics.log_time((TIMERS, REPLAY_BUFFER_SAMPLE_TIMER)):
                replayed = self.local_replay_buffer.sample(
                    num_items=cfg.total_train_batch_size, n_step=cfg.n_step, gamma=cfg.gamma,
                    beta=cfg.replay_buffer_config.get("beta", 0.0), batch_length_T=0, lookback=0,
                    min_batch_length_T=0, sample_episodes=True)
            self.metrics.aggregate([self.local_replay_buffer.get_metrics()], key=REPLAY_BUFFER_RESULTS)
            with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
                learner_results = self.learner_group.update(episodes=replayed, timesteps=timesteps)
            td_errors: dict[str, list] = defaultdict(list)
            for res in learner_results:
                for module_id, module_results in res.items():
                    if TD_ERROR_KEY in module_results:
                        # a list of per-update arrays (reduce="item_series")
                        td_errors[module_id].extend(convert_to_numpy(module_results.pop(TD_ERROR_KEY).peek()))
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
            update_priorities_in_episode_replay_buffer(
                replay_buffer=self.local_replay_buffer,
                td_errors={mid: {TD_ERROR_KEY: np.concatenate(v, axis=0)} for mid, v in td_errors.items()})
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                               policies=set(learner_results[0]) - {ALL_MODULES},
                                               inference_only=True)


class MPDQN(PDQN):
    """MP-DQN: :class:`PDQN` with the multi-pass Q-network."""

    @classmethod
    def get_default_config(cls) -> MPDQNConfig:
        return MPDQNConfig()
