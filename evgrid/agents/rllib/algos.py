"""Training settings (``train:`` in an experiment YAML) and the RLlib algorithm config they build.

Algorithms: PPO (default), IMPALA, DQN (double-Q) for configs whose
learned levels all act discretely (operators with ``operator_action: level``,
stations; EVs on their rule), and P-DQN / MP-DQN (:mod:`evgrid.agents.rllib.pdqn`)
for EVs (``ev_view: individual``, or ``grouped``: one shared per-slot network,
the station's Q the sum over its slots; operators and stations on their
rules): a mode and a power per mode, the chosen mode's power sent to the env.
RLlib 2.60 has no A2C: PPO with one epoch over the batch, no clipping
(``clip_param`` large) and no KL term is its special case — ``algorithm: PPO``,
``num_epochs: 1``, ``clip_param: 1e6``, ``kl_coeff: 0``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.utils.metrics import ENV_RUNNER_SAMPLING_TIMER, LEARNER_UPDATE_TIMER, TIMERS

from evgrid.agents.rllib.modules import LEVELS
from evgrid.config import ConfigError, from_dict, merge, parse_overrides, read_yaml
from evgrid.envs.config import EnvConfig
from evgrid.validate import check_bool, check_choice, check_int, check_real

ALGORITHMS = ("PPO", "IMPALA", "DQN", "PDQN", "MPDQN")
REPLAYS = ("prioritized", "uniform")
# the hybrid-action algorithms, for EVs only (individual or grouped)
HYBRID_ALGORITHMS = ("PDQN", "MPDQN")

# algorithms people ask for that this package does not run, and what to use instead
_REFUSED = {
    "A2C": "RLlib 2.60 has no A2C; use its special case, PPO with num_epochs: 1, clip_param: 1e6, kl_coeff: 0",
    # APPO trains, but saving its learner state (every checkpoint) never returns in RLlib 2.60: the learner
    # group waits on a learner actor that its learner thread keeps busy (cf. ray-project/ray#53468)
    "APPO": "APPO's checkpoints hang in RLlib 2.60; use IMPALA (the same asynchronous architecture) or PPO",
}


@dataclass(frozen=True)
class TrainConfig:
    """How ``evgrid train`` trains the learned levels."""

    algorithm: str = "PPO"
    """PPO, IMPALA, DQN (discrete levels only; double-Q), PDQN or MPDQN (EVs only, individual or grouped)."""
    iterations: int = 20
    """Training iterations, 1..1,000,000."""
    checkpoint_every: int = 5
    """Checkpoint every N iterations (and always at the end), 1..1,000,000."""
    num_env_runners: int = 1
    """Sampling workers (0 samples in the driver), 0..4096."""
    envs_per_runner: int = 1
    """Environments per runner, 1..1024: one simulator with a leading environment axis, so they step together
    and share one power-flow call per step."""
    rollout_fragment_length: int = 96
    """Env steps per runner per sample call, 1..100,000."""
    train_batch_size: int = 384
    """Env steps per training batch, 1..10,000,000 (DQN, PDQN, MPDQN: transitions per replayed minibatch)."""
    minibatch_size: int = 128
    """SGD minibatch (PPO), 1..train_batch_size."""
    num_epochs: int = 4
    """Passes over each batch (PPO), 1..100."""
    lr: float = 3e-4
    """Learning rate, (0, 1] (PDQN, MPDQN: of the Q-network)."""
    gamma: float = 0.99
    """Discount, [0, 1]."""
    clip_param: float = 0.2
    """PPO ratio clip, (0, 1e9]."""
    kl_coeff: float = 0.2
    """PPO KL penalty coefficient, [0, 1e6]."""
    entropy_coeff: float = 0.0
    """Entropy bonus, [0, 10]."""
    env_runner_resources: dict[str, float] | None = None
    """Custom Ray resources each env runner needs (e.g. ``{"evgrid_runner": 1}`` to place runners on nodes
    started with that resource)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer widths of every level's network."""
    hidden_per_level: dict[str, tuple[int, ...]] | None = None
    """Widths for some levels instead of ``hidden``, e.g. ``{ev: [128, 128]}``; only learned levels
    (``operator``, ``station``, ``ev``) have a network."""
    powerflow: str = "local"
    """Power flow in each env (``local``, measured faster for one small feeder per runner) or the shared ``actor``."""
    num_powerflow_actors: int = 1
    """Power-flow actors when ``powerflow: actor`` (feeders sharded across them), 1..256."""
    seed: int = 0
    """Seed of the algorithm (network init, sampling)."""
    actor_lr: float = 1e-4
    """PDQN, MPDQN: learning rate of the power actor, [0, 1] (0 freezes it)."""
    tau: float = 0.01
    """PDQN, MPDQN: Polyak weight of the target networks' update after each learner update, (0, 1] (1 copies)."""
    exploration_steps: int = 10_000
    """DQN, PDQN, MPDQN: env steps (all runners) over which the random-action (mode) probability falls linearly
    from 1 to ``epsilon_final`` and (PDQN, MPDQN) the power noise from ``param_noise`` to ``param_noise_final``,
    1..1,000,000,000."""
    epsilon_final: float = 0.05
    """DQN, PDQN, MPDQN: probability of a random action (mode, with random powers) after ``exploration_steps``,
    [0, 1] (seed 002's DDQN: 0)."""
    param_noise: float = 0.3
    """PDQN, MPDQN: initial std of the Gaussian noise on the greedy powers, as a share of half the power range,
    [0, 10]."""
    param_noise_final: float = 0.05
    """PDQN, MPDQN: that std after ``exploration_steps``, [0, 10]."""
    learning_starts: int = 1000
    """DQN, PDQN, MPDQN: env steps in the replay buffer before the first update, 0..1,000,000,000."""
    training_intensity: float | None = None
    """DQN, PDQN, MPDQN: replayed / sampled steps, (0, 1e6]: ``ceil(training_intensity * env steps sampled /
    train_batch_size)`` updates per iteration; None: RLlib's default (DQN: its native ratio; PDQN, MPDQN: one
    update per iteration)."""
    replay_capacity: int = 50_000
    """DQN, PDQN, MPDQN: env steps the replay buffer holds, 1..1,000,000,000."""
    replay: str = "prioritized"
    """DQN: ``prioritized`` replay (alpha 0.6, beta 0.4) or ``uniform`` (seed 002's DDQN)."""
    target_update_steps: int = 500
    """DQN: env steps between copies of the Q-network into the target network (seed 002's B),
    1..1,000,000,000."""
    dueling: bool = True
    """DQN: a dueling head (RLlib's default); false: the plain Q-head of seed 002's DDQN."""
    imitation_days: int = 0
    """Grouped EVs with PPO, IMPALA, PDQN or MPDQN: days of the perfect-foresight oracle's schedules the EV module
    imitates (:mod:`evgrid.agents.rllib.imitation`; P-DQN: DQfD's pre-training and demonstration loss) before
    the first iteration, 0..100,000 (0: none)."""
    imitation_seed: int = 1_000_000
    """Seed of the first demonstration day (then +1 per day), 0..2^62: keep it apart from the evaluation days
    (the config's ``seed`` onwards)."""
    imitation_epochs: int = 30
    """Passes of behaviour cloning over the demonstrations, 1..10,000."""
    imitation_lr: float = 1e-3
    """Learning rate of behaviour cloning (Adam), (0, 1]."""
    imitation_margin: float = 1.0
    """PDQN, MPDQN: the margin, in reward units, by which a demonstrated mode's Q-value must lead the others'
    (DQfD's large-margin loss), [0, 1e6]."""
    imitation_weight: float = 10.0
    """PDQN, MPDQN: weight of the demonstration loss (margin and power terms) kept in every training update,
    [0, 1e6]; 0: the demonstrations only pre-train.  On seed 000, weight 1 let the TD updates undo much of the
    pre-training within 10 iterations; 10 held it over 60."""

    def __post_init__(self) -> None:
        if isinstance(self.algorithm, str) and self.algorithm in _REFUSED:
            raise ValueError(f"algorithm: {_REFUSED[self.algorithm]} (expected one of {', '.join(ALGORITHMS)})")
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_int("iterations", self.iterations, 1, 1_000_000)
        check_int("checkpoint_every", self.checkpoint_every, 1, 1_000_000)
        check_int("num_env_runners", self.num_env_runners, 0, 4096)
        check_int("envs_per_runner", self.envs_per_runner, 1, 1024)
        check_int("rollout_fragment_length", self.rollout_fragment_length, 1, 100_000)
        check_int("train_batch_size", self.train_batch_size, 1, 10_000_000)
        check_int("minibatch_size", self.minibatch_size, 1, self.train_batch_size)
        check_int("num_epochs", self.num_epochs, 1, 100)
        check_real("lr", self.lr, 0.0, 1.0, lo_open=True)
        check_real("gamma", self.gamma, 0.0, 1.0)
        check_real("clip_param", self.clip_param, 0.0, 1e9, lo_open=True)
        check_real("kl_coeff", self.kl_coeff, 0.0, 1e6)
        check_real("entropy_coeff", self.entropy_coeff, 0.0, 10.0)
        _check_widths("hidden", self.hidden)
        if self.hidden_per_level is not None:
            if not isinstance(self.hidden_per_level, dict):
                raise ValueError(f"hidden_per_level: expected a mapping of level to layer widths, got "
                                 f"{self.hidden_per_level!r}")
            for level, widths in self.hidden_per_level.items():
                check_choice("hidden_per_level", level, LEVELS)
                _check_widths(f"hidden_per_level.{level}", widths)
        check_choice("powerflow", self.powerflow, ("local", "actor"))
        if self.env_runner_resources is not None:
            if not isinstance(self.env_runner_resources, dict):
                raise ValueError(f"env_runner_resources: expected a mapping of resource name to amount, "
                                 f"got {self.env_runner_resources!r}")
            for k, v in self.env_runner_resources.items():
                check_real(f"env_runner_resources.{k}", v, 0.0, 1e6, lo_open=True)
        check_int("num_powerflow_actors", self.num_powerflow_actors, 1, 256)
        check_int("seed", self.seed, 0, 2**31 - 1)
        check_real("actor_lr", self.actor_lr, 0.0, 1.0)
        check_real("tau", self.tau, 0.0, 1.0, lo_open=True)
        check_int("exploration_steps", self.exploration_steps, 1, 10**9)
        check_real("epsilon_final", self.epsilon_final, 0.0, 1.0)
        check_real("param_noise", self.param_noise, 0.0, 10.0)
        check_real("param_noise_final", self.param_noise_final, 0.0, 10.0)
        check_int("learning_starts", self.learning_starts, 0, 10**9)
        if self.training_intensity is not None:
            check_real("training_intensity", self.training_intensity, 0.0, 1e6, lo_open=True)
        check_int("replay_capacity", self.replay_capacity, 1, 10**9)
        check_choice("replay", self.replay, REPLAYS)
        check_int("target_update_steps", self.target_update_steps, 1, 10**9)
        check_bool("dueling", self.dueling)
        check_int("imitation_days", self.imitation_days, 0, 100_000)
        check_int("imitation_seed", self.imitation_seed, 0, 2**62)
        check_int("imitation_epochs", self.imitation_epochs, 1, 10_000)
        check_real("imitation_lr", self.imitation_lr, 0.0, 1.0, lo_open=True)
        check_real("imitation_margin", self.imitation_margin, 0.0, 1e6)
        check_real("imitation_weight", self.imitation_weight, 0.0, 1e6)


def _check_widths(name: str, widths: Any) -> None:
    if not isinstance(widths, list | tuple) or not widths:
        raise ValueError(f"{name}: expected a list of layer widths (integers in [1, 65536]), got {widths!r}")
    for h in widths:
        check_int(name, h, 1, 65536)


def load_run_config(source: Any, overrides: Iterable[str] | Mapping[str, Any] = ()) -> tuple[EnvConfig, TrainConfig]:
    """(EnvConfig, TrainConfig) from an experiment YAML (a path, or a shipped name such as ``quickstart``) or a
    mapping, whose optional ``train:`` section holds the training settings; ``train.iterations=5`` style
    overrides go to that section."""
    data = dict(read_yaml(source)) if isinstance(source, str | os.PathLike) else dict(source or {})
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    data = merge(data, extra)
    train = from_dict(TrainConfig, data.pop("train", None), "train.")
    env = from_dict(EnvConfig, data)
    return env, train


def learned_levels(env: EnvConfig, fixed_operators: bool = False) -> list[str]:
    """The levels of ``env`` whose agents are trained (each has one module); ``fixed_operators``: a fixed
    operator policy acts for the operators (:class:`evgrid.envs.ev_grid.OperatorPolicy`)."""
    a = env.agents
    ops = a.operator == "learned" and not fixed_operators
    return [level for level, on in (("operator", ops), ("station", a.station == "learned"),
                                    ("ev", a.ev_view != "rule")) if on]


def check_run(env: EnvConfig, train: TrainConfig, fixed_operators: bool = False) -> None:
    """What would fail only once Ray and its workers run, raised before: nothing to learn, a network for a
    level that runs its rule, DQN on a level with continuous actions, P-DQN on a level other than EVs.
    ``fixed_operators``: a fixed policy acts for the operators (they are not trained)."""
    if fixed_operators and env.agents.operator != "learned":
        raise ConfigError(f"agents.operator: an operator policy acts for the operators, so expected learned, got "
                          f"{env.agents.operator!r}")
    learned = learned_levels(env, fixed_operators)
    if not learned:
        raise ConfigError("agents: every level runs its rule, so there is nothing to train; set agents.operator "
                          "or agents.station to learned, or agents.ev_view to grouped or individual")
    for level in train.hidden_per_level or {}:
        if level not in learned:
            setting = "agents.ev_view: rule" if level == "ev" else f"agents.{level}: rule"
            raise ConfigError(f"train.hidden_per_level.{level}: the {level} level runs its rule ({setting}), so it "
                              f"has no module; learned levels: {', '.join(learned)}")
    if train.algorithm == "DQN":
        continuous = [lv for lv in learned
                      if lv == "ev" or (lv == "operator" and env.agents.operator_action != "level")]
        if continuous:
            raise ConfigError(f"train.algorithm: DQN needs discrete actions for every learned level; "
                              f"{continuous[0]!r} is not (set agents.operator_action: level and agents.ev_view: "
                              f"rule, or use PPO)")
        if "operator" in learned and env.storage is not None:
            raise ConfigError("train.algorithm: DQN needs one discrete action per agent, but with storage an "
                              "operator picks a (price level, storage level) pair; use PPO, or drop storage")
    if train.algorithm in HYBRID_ALGORITHMS:
        _check_hybrid_levels(train.algorithm, learned)
    if train.imitation_days and (env.agents.ev_view != "grouped" or train.algorithm == "DQN"):
        raise ConfigError(f"train.imitation_days: the oracle's schedules are imitated by grouped EVs trained with "
                          f"PPO, IMPALA, PDQN or MPDQN, got agents.ev_view {env.agents.ev_view!r} and "
                          f"train.algorithm {train.algorithm!r}; set imitation_days: 0")


def _check_hybrid_levels(algorithm: str, learned: list[str]) -> None:
    """P-DQN learns EVs' hybrid actions only (individual or grouped): operators and stations must run their
    rules."""
    others = [lv for lv in learned if lv != "ev"]
    if not others:
        return
    raise ConfigError(f"train.algorithm: {algorithm} trains EVs only (agents.ev_view: individual or grouped, "
                      f"agents.operator: rule, agents.station: rule), but agents.{others[0]} is learned; use PPO "
                      f"or IMPALA for learned operators or stations")


def algo_config(env: EnvConfig, train: TrainConfig, env_name: str = "evgrid",
                grid_factory: Callable[..., Any] | None = None, operator_policy: Any = None) -> Any:
    """The RLlib ``AlgorithmConfig`` for ``env`` (registered as ``env_name``) trained per ``train``.

    ``grid_factory``: called in each env runner with the config's ``GridConfig`` for the power-flow service
    its environments share (picklable; e.g. a client of the shared actor); None solves in-process.
    ``operator_policy``: a picklable :class:`evgrid.envs.ev_grid.OperatorPolicy` acting for the operators
    inside every env (they are then not trained); None: the operators are agents or on their rule.
    """
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.algorithms.impala import IMPALAConfig
    from ray.rllib.algorithms.ppo import PPOConfig

    from evgrid.agents.rllib.env import EVGridEnvRunner, RLlibEVGrid
    from evgrid.agents.rllib.modules import module_specs, policy_mapping_fn
    from evgrid.agents.rllib.pdqn import MPDQNConfig, PDQNConfig, chosen_mode_connector
    from evgrid.agents.rllib.replay import ArrayReplayDQN
    from evgrid.config import to_dict

    check_run(env, train, operator_policy is not None)
    hybrid = train.algorithm in HYBRID_ALGORITHMS
    env_config = {"config": to_dict(env), "grid_factory": grid_factory, "operator_policy": operator_policy}
    # spaces only: no solver service needed
    probe = RLlibEVGrid({"config": env_config["config"], "operator_policy": operator_policy})
    specs = module_specs(probe, {"hidden": list(train.hidden), "fcnet_hiddens": list(train.hidden)},
                         hybrid_evs=hybrid)
    for level, widths in (train.hidden_per_level or {}).items():
        specs.rl_module_specs[level].model_config = {"hidden": list(widths), "fcnet_hiddens": list(widths)}
    new = {"PPO": PPOConfig, "IMPALA": IMPALAConfig, "DQN": lambda: DQNConfig(algo_class=ArrayReplayDQN),
           "PDQN": PDQNConfig, "MPDQN": MPDQNConfig}[train.algorithm]
    cfg = (new()
           .environment(env_name, env_config=env_config, normalize_actions=False, clip_actions=False)
           .env_runners(env_runner_cls=EVGridEnvRunner, num_env_runners=train.num_env_runners,
                        num_envs_per_env_runner=train.envs_per_runner,
                        rollout_fragment_length=train.rollout_fragment_length,
                        custom_resources_per_env_runner=dict(train.env_runner_resources or {}))
           .multi_agent(policies=set(specs.rl_module_specs), policy_mapping_fn=policy_mapping_fn)
           .rl_module(rl_module_spec=specs)
           .callbacks(EVDecisionCounter)
           .debugging(seed=train.seed))
    if hybrid:
        # the env takes one power per EV: it is sent the chosen mode's, the episodes keep all three
        cfg.env_runners(module_to_env_connector=chosen_mode_connector)
    return cfg.training(**_training_settings(train))


def _training_settings(train: TrainConfig) -> dict[str, Any]:
    """The ``AlgorithmConfig.training`` arguments of ``train.algorithm``."""
    common: dict[str, Any] = dict(gamma=train.gamma, train_batch_size_per_learner=train.train_batch_size)
    if train.algorithm in HYBRID_ALGORITHMS:
        # multi-agent episodes need the multi-agent buffer (PDQN's default is the single-agent one)
        return common | dict(
            critic_lr=train.lr, actor_lr=train.actor_lr, tau=train.tau,
            epsilon=[[0, 1.0], [train.exploration_steps, train.epsilon_final]],
            param_noise=[[0, train.param_noise], [train.exploration_steps, train.param_noise_final]],
            num_steps_sampled_before_learning_starts=train.learning_starts,
            training_intensity=train.training_intensity,
            replay_buffer_config={"type": "MultiAgentEpisodeReplayBuffer", "capacity": train.replay_capacity})
    common["lr"] = train.lr
    if train.algorithm == "PPO":
        common.update(minibatch_size=train.minibatch_size, num_epochs=train.num_epochs, clip_param=train.clip_param,
                      kl_coeff=train.kl_coeff, entropy_coeff=train.entropy_coeff)
    elif train.algorithm == "IMPALA":
        common.update(entropy_coeff=train.entropy_coeff)
    else:
        common.update(_dqn_settings(train))
    return common


def _dqn_settings(train: TrainConfig) -> dict[str, Any]:
    """DQN's: double-Q always, epsilon falling linearly from 1, target sync every ``target_update_steps``."""
    from evgrid.agents.rllib.replay import REPLAY_TYPE

    # uniform: replayed from arrays (ArrayReplayDQN); prioritized: RLlib's multi-agent episode buffer (its
    # default single-agent one breaks on multi-agent episodes in 2.60)
    buffer = ({"type": "MultiAgentPrioritizedEpisodeReplayBuffer", "alpha": 0.6, "beta": 0.4}
              if train.replay == "prioritized" else {"type": REPLAY_TYPE})
    return dict(double_q=True, dueling=train.dueling, epsilon=[[0, 1.0], [train.exploration_steps,
                                                                         train.epsilon_final]],
                target_network_update_freq=train.target_update_steps,
                num_steps_sampled_before_learning_starts=train.learning_starts,
                training_intensity=train.training_intensity,
                replay_buffer_config={**buffer, "capacity": train.replay_capacity})


class EVDecisionCounter(RLlibCallback):
    """Logs per iteration ``ev_decisions`` (per-EV actions taken: one per plugged EV agent or occupied
    slot) and ``env_step_s`` (seconds inside the env's step: simulator, power flow, observations)."""

    def on_episode_step(self, *, episode, env=None, env_index=0, metrics_logger=None, **kwargs) -> None:
        if metrics_logger is None or env is None:
            return
        view = env.unwrapped.envs[env_index]  # an RLlibEVGridVector's environment
        metrics_logger.log_value("ev_decisions", view.last_ev_decisions, reduce="sum")
        metrics_logger.log_value("env_step_s", view.last_step_s, reduce="sum")


def prepare_algorithm(algo: Any) -> Any:
    """Fix two RLlib 2.60 defaults on a built ``algo`` (returns it).

    * Its sampling and learner-update timers become this iteration's seconds.  RLlib keeps them as an EMA
      (coefficient 0.01), which the first iteration (module build, numba compiles) dominates for a hundred
      iterations; as sums, which every result clears, they are the iteration's own.
    * Its replay buffer (DQN, P-DQN) draws from a generator seeded by the config's ``seed``: RLlib seeds it from
      the OS (``default_rng(None)``), so two trainings with one seed replayed different minibatches."""
    for timer in (ENV_RUNNER_SAMPLING_TIMER, LEARNER_UPDATE_TIMER):
        algo.metrics.log_value((TIMERS, timer), 0.0, reduce="sum")
    buffer = getattr(algo, "local_replay_buffer", None)
    if buffer is not None and hasattr(buffer, "rng"):
        buffer.rng = np.random.default_rng(algo.config.seed)
    return algo


def iteration_timings(result: Mapping[str, Any]) -> tuple[float, float]:
    """(sampling s, learning s) of one ``Algorithm.train()`` result (NaN where absent)."""
    timers = result.get(TIMERS, {})
    return (float(timers.get(ENV_RUNNER_SAMPLING_TIMER, math.nan)),
            float(timers.get(LEARNER_UPDATE_TIMER, math.nan)))
