"""A thin RLlib ``MultiAgentEnv`` over the EVGrid ``ParallelEnv``.

RLlib's own ``ParallelPettingZooEnv`` takes the agent set at ``reset`` as
fixed and fails when an EV agent arrives later; this adapter passes the
PettingZoo dicts through unchanged and adds what RLlib needs: per-agent
spaces built from ``possible_agents``, ``__all__`` flags, and the global
``state()`` (also in ``infos["__common__"]`` when ``state_in_infos``).
"""

from __future__ import annotations

import time
from typing import Any

from ray.rllib.env.multi_agent_env import MultiAgentEnv

from evgrid.envs.ev_grid import EVGridEnv


class RLlibEVGrid(MultiAgentEnv):
    """``env_config``: ``{"config": <EnvConfig | YAML path | mapping>, "overrides": {...},
    "state_in_infos": False, "powerflow": "local" | "actor"}``; overrides as for ``evgrid.make``.
    ``actor``: solve through the shared power-flow actor of this job (in-process if there is none)."""

    def __init__(self, env_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        env_config = dict(env_config or {})
        unknown = set(env_config) - {"config", "overrides", "state_in_infos", "powerflow"}
        if unknown:
            raise ValueError(f"env_config: unknown key {sorted(unknown)[0]!r}; "
                             "expected config, overrides, state_in_infos, powerflow")
        overrides = dict(env_config.get("overrides") or {})
        service = None
        if env_config.get("powerflow", "local") == "actor":
            from evgrid.cluster.powerflow import make_grid
            from evgrid.envs.config import load_config

            service = make_grid(load_config(env_config.get("config"), _nested(overrides)), "actor")
        self.env = EVGridEnv(env_config.get("config"), powerflow=service, **overrides)
        self.state_in_infos = bool(env_config.get("state_in_infos", False))
        self.possible_agents = list(self.env.possible_agents)
        self.observation_spaces = {a: self.env.observation_space(a) for a in self.possible_agents}
        self.action_spaces = {a: self.env.action_space(a) for a in self.possible_agents}
        self.agents = []
        self.last_ev_decisions = 0  # per-EV actions in the last step (read by the training callback)
        self.last_step_s = 0.0  # seconds inside the env's step (simulator + power flow), same reader

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, infos = self.env.reset(seed=seed, options=options)
        self.agents = list(self.env.agents)
        return obs, self._with_state(infos)

    def step(self, action_dict: dict[str, Any]):
        learned_evs = self.env.cfg.agents.ev_view != "rule"
        self.last_ev_decisions = int(self.env.sim.plugged().size) if learned_evs else 0
        t0 = time.perf_counter()
        obs, rew, term, trunc, infos = self.env.step(action_dict)
        self.last_step_s = time.perf_counter() - t0
        self.agents = list(self.env.agents)
        term["__all__"] = False  # the day ends by truncation; agents terminate one by one
        trunc["__all__"] = not self.env.agents
        return obs, rew, term, trunc, self._with_state(infos)

    def state(self):
        return self.env.state()

    def _with_state(self, infos: dict) -> dict:
        if self.state_in_infos:
            infos["__common__"] = {"state": self.env.state()}
        return infos

    def close(self) -> None:
        self.env.close()


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """EVGridEnv keyword overrides as the nested mapping load_config takes."""
    from evgrid.envs.ev_grid import _keyword_overrides

    return _keyword_overrides(overrides)
