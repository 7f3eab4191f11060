"""Rule baselines: uncontrolled, TOU-delay, LLF, LBMS-greedy, random.

Each baseline is usable two ways:

* as the built-in rules of every level (:func:`rule_overrides`): the config
  overrides that make the simulator run it with no learned agent —
  ``evgrid evaluate`` runs baselines this way;
* as a policy for the learned agents of an :class:`EVGridEnv`
  (:class:`BaselinePolicy`), acting from observations only, so a baseline
  can stand in for any level next to trained agents.

| baseline | operators | stations | EVs | routing |
|---|---|---|---|---|
| uncontrolled | TOU tariff, storage idle | equal share, full limit | full power on arrival | nearest |
| tou | TOU tariff, storage charged in the valley, discharged in the peak | equal share, full limit | wait for the valley unless the target would be missed | nearest |
| llf | TOU tariff, storage idle | on/off LLF, full limit | full power | nearest |
| lbms | TOU tariff, storage idle | equal share, full limit | full power | LBMS (seed 002's greedy) |
| random | random multiplier and storage set-point | random fraction | random mode and power | nearest |

Storage applies where the config has a ``storage`` section.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evgrid.envs.views.features import EV, OPERATOR

POLICIES = ("uncontrolled", "tou", "llf", "lbms", "random")
# what ``evgrid evaluate`` runs: these rules and the perfect-foresight oracle (evgrid.agents.oracle)
EVALUATE_POLICIES = (*POLICIES, "oracle")


def rule_overrides(policy: str, routed: bool) -> dict[str, Any]:
    """Config overrides that run ``policy`` as the built-in rule of every level."""
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
    ev_rule = {"tou": "tou", "random": "random"}.get(policy, "uncontrolled")
    storage_rule = "tou" if policy == "tou" else "idle"
    out: dict[str, Any] = {"agents": {"operator": "rule", "station": "rule", "ev_view": "rule", "ev_rule": ev_rule,
                                      "storage_rule": storage_rule},
                           "stations": {"dispatch": "llf" if policy == "llf" else "equal"}}
    if routed:
        out["routing"] = {"policy": "lbms" if policy == "lbms" else "nearest"}
    return out


_EV_LAXITY = EV.index("laxity")
_EV_HOURS_LEFT = EV.index("hours_left_per_day")
_EV_VALLEY = EV.index("valley")
_OP_VALLEY = OPERATOR.index("valley")
_OP_PEAK = OPERATOR.index("peak")


class BaselinePolicy:
    """Acts for the learned agents of an EVGridEnv from their observations.

    ``uncontrolled``/``llf``/``lbms`` charge at full power and let stations
    charge everyone; ``tou`` charges in the valley or when the laxity says
    waiting would miss the target; ``random`` samples each action space.
    """

    def __init__(self, name: str, env: Any, seed: int = 0) -> None:
        if name not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {name!r}")
        self.name = name
        self.env = env
        self.rng = np.random.default_rng(seed)
        cfg = env.cfg
        self._full_level = int(np.argmax(cfg.stations.fraction_levels))
        levels = np.asarray(cfg.market.price_levels)
        self._neutral_level = int(np.argmin(np.abs(levels - 1.0)))
        self._storage_levels = np.asarray(cfg.storage.levels) if env.sim.layout.storage.n else None

    def act(self, obs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for agent, o in obs.items():
            if agent not in self.env.agents:
                continue
            space = self.env.action_space(agent)
            if self.name == "random":
                space.seed(int(self.rng.integers(2**31)))
                out[agent] = space.sample()
                continue
            kind = agent.split("_")[0]
            if kind == "operator":
                out[agent] = self._operator(o)
            elif kind == "station":
                out[agent] = np.int64(self._full_level)
            elif kind == "ev":
                out[agent] = {"mode": np.int64(0 if self._charge(o[None, :])[0] else 1),
                              "power": np.ones(1, np.float32)}
            elif kind == "evs":
                on = self._charge(o["evs"])
                out[agent] = {"mode": np.where(on, 0, 1).astype(np.int64),
                              "power": np.ones(on.shape[0], np.float32)}
        return out

    def _operator(self, obs: np.ndarray) -> Any:
        """The TOU tariff (multiplier 1); with storage, ``tou`` charges it fully in the valley and discharges it
        in the peak (the simulator holds the set-point within the units' bounds), the others leave it idle."""
        level = self.env.cfg.agents.operator_action == "level"
        if self._storage_levels is None:
            return np.int64(self._neutral_level) if level else np.ones(1, np.float32)
        share = 0.0
        if self.name == "tou":
            share = 1.0 if obs[_OP_VALLEY] > 0.5 else (-1.0 if obs[_OP_PEAK] > 0.5 else 0.0)
        if level:
            return np.array([self._neutral_level, np.argmin(np.abs(self._storage_levels - share))], np.int64)
        return np.array([1.0, share], np.float32)

    def _charge(self, feats: np.ndarray) -> np.ndarray:
        """(n, F) EV features -> charge now?"""
        if self.name != "tou":
            return np.ones(feats.shape[0], dtype=bool)
        valley = feats[:, _EV_VALLEY] > 0.5
        # laxity c/e close to 1: one more idle step would miss the target
        steps_left = feats[:, _EV_HOURS_LEFT] * 24.0 / self.env.sim.dt_h
        must = feats[:, _EV_LAXITY] * np.maximum(steps_left, 1) >= steps_left - 1
        return valley | must
