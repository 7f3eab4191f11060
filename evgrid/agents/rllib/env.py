"""The EVGrid environment as RLlib sees it: a thin ``MultiAgentEnv``, and a vector env whose sub-envs share
one simulator.

RLlib's own ``ParallelPettingZooEnv`` takes the agent set at ``reset`` as
fixed and fails when an EV agent arrives later; these adapters pass the
PettingZoo dicts through unchanged and add what RLlib needs: per-agent
spaces built from ``possible_agents``, ``__all__`` flags, and the global
``state()`` (also in ``infos["__common__"]`` when ``state_in_infos``).

* :class:`RLlibEVGrid` — one environment (``MultiAgentEnv``), for users who
  bring their own RLlib setup.
* :class:`RLlibEVGridVector` — the ``K = envs_per_runner`` environments of an
  env runner as one :class:`evgrid.envs.ev_grid.EVGridVectorEnv`: they step
  together, so a step makes **one** power-flow call for all K (one Ray round
  trip in ``powerflow: actor`` mode, instead of K with RLlib's
  ``SyncVectorMultiAgentEnv``, which steps its sub-envs one after the other).
* :class:`EVGridEnvRunner` — RLlib's ``MultiAgentEnvRunner`` building that
  vector env; ``evgrid train`` always uses it.  It overrides ``make_env``
  only, against the pinned RLlib 2.60.

Actions: RLlib's default modules put a Gaussian on Box actions (operators'
price multiplier and storage share, an individual EV's power), whose samples
leave the box; the vector env clips those agents' actions into their space,
as RLlib's ``clip_actions`` would, but only theirs: RLlib's generic per-agent
clipping cost more than the environment step itself (grouped EVs' Beta powers
and discrete levels are inside their spaces by construction).  Operators' Box
actions are learned in [-1, 1] per component (:func:`operator_module_space`)
and scaled into their space (:func:`to_env_action`): a Gaussian starts at
mean 0, which clipped into the multiplier's [0.5, 2] would sit on its floor,
where clipping leaves no gradient; scaled, it starts mid-range.  The
environment still rejects what lies outside.
"""

from __future__ import annotations

import os
import time
from typing import Any

import gymnasium as gym
import numpy as np
from ray.rllib.callbacks.utils import make_callback
from ray.rllib.env.env_context import EnvContext
from ray.rllib.env.multi_agent_env import MultiAgentEnv
from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner
from ray.rllib.env.vector.vector_multi_agent_env import VectorMultiAgentEnv

from evgrid.config import keyword_overrides
from evgrid.envs.config import EnvConfig, load_config
from evgrid.envs.ev_grid import EVGridEnv, EVGridVectorEnv

_ENV_CONFIG_KEYS = ("config", "overrides", "state_in_infos", "grid_factory", "operator_policy")
ENV_NAME = "evgrid"


def register_env(name: str = ENV_NAME) -> None:
    """Register :class:`RLlibEVGrid` with Ray Tune's registry under ``name`` (what ``algo_config`` names).
    :class:`EVGridEnvRunner` builds the vector env itself; the registered creator serves RLlib's own checks."""
    from ray.tune.registry import register_env as tune_register_env

    tune_register_env(name, RLlibEVGrid)


def _parse_env_config(env_config: dict[str, Any] | None) -> tuple[EnvConfig, Any, bool]:
    """(config with its overrides, power-flow service or None, state_in_infos) from an RLlib ``env_config``
    (its ``operator_policy``: :func:`_operator_policy`)."""
    worker = getattr(env_config, "worker_index", None)  # set where RLlib builds the env (an EnvContext)
    env_config = dict(env_config or {})
    unknown = set(env_config) - set(_ENV_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"env_config: unknown key {sorted(unknown)[0]!r}; expected {', '.join(_ENV_CONFIG_KEYS)}")
    cfg = load_config(env_config.get("config"), keyword_overrides(dict(env_config.get("overrides") or {})))
    if cfg.log_dir is not None and worker is not None:
        # every env runner of a training run has this config: each logs to its own directory, or their
        # writers would replace one another's files
        cfg = load_config(cfg, {"log_dir": os.path.join(cfg.log_dir, f"runner-{worker}")})
    factory = env_config.get("grid_factory")
    if factory is not None and not callable(factory):
        raise ValueError(f"env_config.grid_factory: expected a callable taking a GridConfig and returning a "
                         f"power-flow service, or None, got {factory!r}")
    service = factory(cfg.grid) if factory is not None else None
    return cfg, service, bool(env_config.get("state_in_infos", False))


def _operator_policy(env_config: dict[str, Any] | None) -> Any:
    """The fixed operator policy of an RLlib ``env_config`` (:class:`evgrid.envs.ev_grid.OperatorPolicy`), or
    None: the operators are agents (or on their rule)."""
    return dict(env_config or {}).get("operator_policy")


def clip_action(a: Any, space: gym.Space) -> Any:
    """What RLlib's ``clip_actions`` does: Box actions into their bounds, discrete ones as integers."""
    if isinstance(space, gym.spaces.Dict):
        return {k: clip_action(a[k], space[k]) for k in space.spaces}
    if isinstance(space, gym.spaces.Box):
        return np.clip(np.asarray(a, dtype=space.dtype).reshape(space.shape), space.low, space.high)
    return np.asarray(a).astype(np.int64)


def operator_module_space(space: gym.Space) -> gym.Space:
    """The action space an operator's module learns in: ``[-1, 1]`` per component of a Box (scaled into the
    env's by :func:`to_env_action`); other spaces as they are."""
    if isinstance(space, gym.spaces.Box):
        return gym.spaces.Box(-1.0, 1.0, space.shape, np.float32)
    return space


def to_env_action(a: Any, module_space: gym.Space, env_space: gym.Space) -> Any:
    """A module's action (or a batch of them, leading axes) in the env's space: from ``[-1, 1]``
    (:func:`operator_module_space`) scaled affinely onto the env's Box, clipped first; a module that acts in the
    env's own space (a checkpoint from before operators were scaled) clipped as :func:`clip_action` does."""
    scaled = (isinstance(env_space, gym.spaces.Box) and isinstance(module_space, gym.spaces.Box)
              and module_space.shape == env_space.shape and module_space != env_space
              and np.all(module_space.low == -1.0) and np.all(module_space.high == 1.0))
    if not scaled:
        if isinstance(env_space, gym.spaces.Box) and np.ndim(a) > len(env_space.shape):  # a batch
            return np.clip(np.asarray(a, dtype=env_space.dtype), env_space.low, env_space.high)
        return clip_action(a, env_space)
    x = np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0)
    y = env_space.low + (x + 1.0) / 2.0 * (env_space.high - env_space.low)
    return np.clip(y.astype(env_space.dtype), env_space.low, env_space.high)


def _all_flags(term: dict, trunc: dict, over: bool) -> None:
    # the day ends by truncation (all environments together); agents terminate one by one
    term["__all__"] = False
    trunc["__all__"] = over


class RLlibEVGrid(MultiAgentEnv):
    """``env_config``: ``{"config": <EnvConfig | YAML path | mapping>, "overrides": {...},
    "state_in_infos": False, "grid_factory": None, "operator_policy": None}``; overrides as for ``evgrid.make``;
    ``grid_factory``: a picklable callable, called with the config's ``GridConfig`` in the process that builds
    the env, returning the power-flow service (e.g. a client of the shared actor); None solves in-process.
    ``operator_policy``: a picklable :class:`evgrid.envs.ev_grid.OperatorPolicy` acting for the operators."""

    def __init__(self, env_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        config, service, self.state_in_infos = _parse_env_config(env_config)
        self.env = EVGridEnv(config, powerflow=service, operator_policy=_operator_policy(env_config))
        self.possible_agents = list(self.env.possible_agents)
        self.observation_spaces = {a: self.env.observation_space(a) for a in self.possible_agents}
        self.action_spaces = {a: self.env.action_space(a) for a in self.possible_agents}
        self.agents = []

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, infos = self.env.reset(seed=seed, options=options)
        self.agents = list(self.env.agents)
        return obs, self._with_state(infos)

    def step(self, action_dict: dict[str, Any]):
        obs, rew, term, trunc, infos = self.env.step(action_dict)
        self.agents = list(self.env.agents)
        _all_flags(term, trunc, not self.agents)
        return obs, rew, term, trunc, self._with_state(infos)

    def state(self):
        return self.env.state()

    def _with_state(self, infos: dict) -> dict:
        if self.state_in_infos:
            infos["__common__"] = {"state": self.env.state()}
        return infos

    def close(self) -> None:
        self.env.close()


class _EnvView(MultiAgentEnv):
    """Environment ``e`` of an :class:`RLlibEVGridVector` as RLlib's runner reads a sub-env: ids, spaces,
    live agents, state.  It is stepped only through the vector env."""

    def __init__(self, vec: EVGridVectorEnv, e: int, spaces: tuple[dict, dict]) -> None:
        # no MultiAgentEnv.__init__: it assigns `agents`, which here is a live view of the vector env
        self._agent_ids = set()
        self._vec, self._e = vec, e
        self.possible_agents = vec.possible_agents
        self.observation_spaces, self.action_spaces = spaces
        self.last_ev_decisions = 0  # per-EV actions in the last step (read by the training callback)
        self.last_step_s = 0.0  # this environment's share of the seconds inside the last step, same reader

    @property
    def agents(self) -> list[str]:
        return self._vec.agents[self._e]

    def state(self):
        return self._vec.state(self._e)

    def reset(self, *, seed=None, options=None):
        raise RuntimeError("reset: this is one environment of an RLlibEVGridVector; reset the vector env")

    def step(self, action_dict):
        raise RuntimeError("step: this is one environment of an RLlibEVGridVector; step the vector env")


class RLlibEVGridVector(VectorMultiAgentEnv):
    """``num_envs`` EVGrid environments stepped together (one simulator, one power-flow call per step).

    ``env_config`` as :class:`RLlibEVGrid`'s.  It follows RLlib's ``SyncVectorMultiAgentEnv`` contract:
    lists of per-environment dicts, and "next step" auto-reset (the step after an episode ends resets and
    returns the first observations).  Seeds: a reset with ``seed`` s seeds environment e with (s, e); each
    later episode adds ``num_workers + 1`` (from the ``EnvContext``), so env runner w, which RLlib seeds
    with ``seed + w``, never replays another runner's days.
    """

    def __init__(self, env_config: dict[str, Any] | None = None, num_envs: int = 1) -> None:
        super().__init__()
        config, service, self.state_in_infos = _parse_env_config(env_config)
        self.vec = EVGridVectorEnv(config, num_envs, powerflow=service,
                                   operator_policy=_operator_policy(env_config))
        self.num_envs = self.vec.n_env
        self._stride = int(getattr(env_config, "num_workers", 0) or 0) + 1
        possible = self.vec.possible_agents
        obs_spaces = {a: self.vec.observation_space(a) for a in possible}
        env_spaces = {a: self.vec.action_space(a) for a in possible}
        # what RLlib's modules act in: operators' Boxes in [-1, 1] (module_specs builds theirs alike)
        act_spaces = {a: operator_module_space(s) if a.startswith("operator_") else s for a, s in env_spaces.items()}
        self.envs = [_EnvView(self.vec, e, (obs_spaces, act_spaces)) for e in range(self.num_envs)]
        self.single_observation_spaces, self.single_action_spaces = obs_spaces, act_spaces
        self.single_observation_space = gym.spaces.Dict(obs_spaces)
        self.single_action_space = gym.spaces.Dict(act_spaces)
        self.metadata = {"autoreset_mode": "next_step"}
        # agents whose default RLlib module samples a Gaussian: operators (scaled) and individual EVs (clipped)
        self._to_env = {a: (act_spaces[a], s) for a, s in env_spaces.items()
                        if a.startswith(("operator_", "ev_")) and not isinstance(s, gym.spaces.Discrete)}
        self._needs_reset = False
        self._seed: int | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._seed = int(seed)
        elif self._seed is not None:
            self._seed += self._stride
        obs, infos = self.vec.reset(self._seed, options)  # None the first time: the config's seed
        self._needs_reset = not any(self.vec.agents)  # a day without any agent is over at once
        return obs, self._with_state(infos)

    def step(self, actions: list[dict[str, Any]]):
        if self._needs_reset:
            obs, infos = self.reset()
            idle = [{"__all__": False} for _ in range(self.num_envs)]
            return obs, [{} for _ in range(self.num_envs)], idle, [dict(d) for d in idle], infos
        decisions = self.vec.ev_decisions()
        to_env = self._to_env
        actions = [{a: to_env_action(x, *to_env[a]) if a in to_env else x for a, x in acts.items()}
                   for acts in actions]
        t0 = time.perf_counter()
        obs, rew, term, trunc, infos = self.vec.step(actions)
        share_s = (time.perf_counter() - t0) / self.num_envs
        # no live agent in any environment: the day is over (before, one environment alone may have none:
        # individual EVs with rule operators and stations, while none of its EVs is plugged in)
        self._needs_reset = not any(self.vec.agents)
        for e, view in enumerate(self.envs):
            _all_flags(term[e], trunc[e], self._needs_reset)
            view.last_ev_decisions, view.last_step_s = int(decisions[e]), share_s
        return obs, rew, term, trunc, self._with_state(infos)

    def _with_state(self, infos: list[dict]) -> list[dict]:
        if self.state_in_infos:
            for e, info in enumerate(infos):
                info["__common__"] = {"state": self.vec.state(e)}
        return infos

    def close_extras(self, **kwargs: Any) -> None:
        self.vec.close()


class EVGridEnvRunner(MultiAgentEnvRunner):
    """RLlib's multi-agent env runner whose ``num_envs_per_env_runner`` environments are one
    :class:`RLlibEVGridVector`."""

    def make_env(self) -> None:
        if self.env is not None:
            self.env.close()
        ctx = self.config.env_config
        if not isinstance(ctx, EnvContext):
            ctx = EnvContext(ctx, worker_index=self.worker_index, num_workers=self.config.num_env_runners,
                             remote=self.config.remote_worker_envs)
        self.env = RLlibEVGridVector(ctx, num_envs=self.config.num_envs_per_env_runner)
        self.num_envs = self.env.num_envs
        self._needs_initial_reset = True
        make_callback("on_environment_created", callbacks_objects=self._callbacks,
                      callbacks_functions=self.config.callbacks_on_environment_created,
                      kwargs=dict(env_runner=self, metrics_logger=self.metrics, env=self.env.unwrapped,
                                  env_context=ctx))

