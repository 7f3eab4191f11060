"""EVGrid-v0: zone operators, charging stations and EVs on a live feeder (PettingZoo ParallelEnv).

A thin adapter: :class:`evgrid.envs.sim.Sim` simulates, :mod:`evgrid.envs.views` turns its state into
observations, actions and rewards; this module maps them to agent ids.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Protocol

import gymnasium
import numpy as np
import numpy.typing as npt
from gymnasium import spaces
from gymnasium.utils import EzPickle
from pettingzoo import ParallelEnv

from evgrid.config import ConfigError, keyword_overrides
from evgrid.envs.config import load_config
from evgrid.envs.sim import Sim
from evgrid.envs.state import DEPARTED, PLUGGED, StepRecord
from evgrid.envs.views import features as ft
from evgrid.envs.views import rewards as rw
from evgrid.envs.views.actions import ActionDecoder
from evgrid.envs.views.observations import Observer
from evgrid.envs.views.slots import Slots
from evgrid.grid.service import GridService

log = logging.getLogger(__name__)


class OperatorPolicy(Protocol):
    """A fixed policy acting for the zone operators inside the env (e.g. a trained one, while another level
    learns): ``(n, F)`` operator observations -> ``(n, A)`` actions inside the operator action space."""

    def __call__(self, obs: npt.NDArray[np.float32]) -> npt.ArrayLike: ...


def _check_operator_policy(policy: Any, operator_level: str) -> None:
    if policy is None:
        return
    if not callable(policy):
        raise ValueError(f"operator_policy: expected a callable (n, F) observations -> (n, A) actions, or None, "
                         f"got {type(policy).__name__}")
    if operator_level != "learned":
        raise ConfigError(f"agents.operator: an operator_policy acts for the operators, so expected learned, got "
                          f"{operator_level!r}")


class EVGridVectorEnv:
    """``n_env`` lock-stepped EVGrid environments over one :class:`evgrid.envs.sim.Sim` with ``n_env`` scenarios.

    Everything :class:`EVGridEnv` documents (agents, spaces, observations, rewards), with a leading
    environment axis: ``reset`` and ``step`` take and return one PettingZoo dict per environment, and a step
    is one simulator step, so all environments share **one** batched power-flow call per feeder (the shape
    of Gymnasium's ``CartPoleVectorEnv``).  Every environment has the same ``possible_agents``; environment
    ``e`` of a reset with ``seed`` draws its day from ``(seed, e)``, so environment 0 replays ``EVGridEnv``
    with that seed.  All environments start and end together (an episode ends only by truncation), which is
    what lets them share the simulator.  ``EVGridEnv`` is this class with ``n_env = 1``; RLlib's env runners
    hold their ``envs_per_runner`` environments as one of these (:mod:`evgrid.agents.rllib.env`).

    Individual EVs with operators and stations on their rules leave no live agent while no EV is plugged in:
    an environment may then have none (step it with ``{}``) while another has some, and steps in which no
    environment has one run inside ``reset`` and ``step`` (the rules carry the day on), so ``agents`` is
    empty in every environment only once the episode is over.  ``step_records`` holds the records of all the
    simulator steps the last ``reset`` or ``step`` ran.

    ``operator_policy`` (:class:`OperatorPolicy`, with ``agents.operator: learned``): the operators act by it
    inside the env, as a rule would, and are not agents (no observations, rewards or actions outside): how a
    trained operator policy is held fixed while the EVs learn.
    """

    def __init__(self, config: Any = None, n_env: int = 1, powerflow: GridService | None = None,
                 operator_policy: OperatorPolicy | None = None, **overrides: Any) -> None:
        self.cfg = cfg = load_config(config, keyword_overrides(overrides))
        a = cfg.agents
        _check_operator_policy(operator_policy, a.operator)
        if a.operator == "rule" and a.station == "rule" and a.ev_view == "rule":
            raise ConfigError("agents: every level runs its rule, so the env has no agents; "
                              "drive evgrid.envs.sim.Sim directly (evgrid evaluate does)")
        self.n_slots = a.ev_slots if a.ev_slots is not None else cfg.stations.ports
        if a.ev_view == "grouped" and self.n_slots < cfg.stations.ports:
            raise ConfigError(f"agents.ev_slots: expected >= stations.ports ({cfg.stations.ports}) so every "
                              f"plugged EV has a slot, got {self.n_slots}")
        if not isinstance(n_env, int | np.integer) or not 1 <= n_env <= 65536:
            raise ValueError(f"n_env: expected an integer in [1, 65536], got {n_env!r}")
        self.n_env = int(n_env)
        self.sim = sim = Sim(cfg, self.n_env, grid=powerflow)
        lay = sim.layout
        self._ops = [f"operator_{k}" for k in range(lay.n_zone)] if a.operator == "learned" else []
        self._stns = [f"station_{j}" for j in range(lay.n_station)] if a.station == "learned" else []
        evs = {"individual": [f"ev_{k}" for k in range(cfg.fleet.n_ev)],
               "grouped": [f"evs_{j}" for j in range(lay.n_station)]}.get(a.ev_view, [])
        # a fixed operator policy acts inside the env: its operators are no agents of the outside world
        self._op_policy = operator_policy
        self._op_obs: npt.NDArray[np.float32] | None = None  # (E, Z, F) operators' last observation
        self._shown_ops = [] if operator_policy is not None else self._ops
        self.possible_agents = self._shown_ops + self._stns + evs
        self.agents: list[list[str]] = [[] for _ in range(self.n_env)]  # live agents per environment
        self.step_records: list[StepRecord] = []  # the simulator steps of the last reset() or step()
        self._observe = Observer(sim, self._ops, self._stns, a.ev_view)
        self._decoder = ActionDecoder(sim, self._ops, self._stns, a.ev_view, self.n_slots)
        self._disparity: tuple[npt.NDArray[np.float64], ...] | None = None  # stations' eq 16-17 terms, per reset
        self.slots: Slots | None = None
        self._next_seed: int | None = None
        self._log = None
        if cfg.log_dir is not None:
            from evgrid.io import EpisodeLog

            self._log = EpisodeLog(cfg.log_dir, sim)

    @property
    def last_rec(self) -> StepRecord | None:
        """The simulator's record of the last step (None right after ``reset``)."""
        return self.sim.last

    # ------------------------------------------------------------------ spaces

    @functools.cache
    def observation_space(self, agent: str) -> gymnasium.Space:
        kind = agent.split("_")[0]
        sc = self.cfg.stations
        box = functools.partial(spaces.Box, -np.inf, np.inf, dtype=np.float32)
        if kind == "operator":
            return box((len(ft.operator_features(self.sim.layout.storage.n > 0)),))
        if kind == "station":
            return box(((sc.c_max + 1) * (sc.e_max + 1) + len(ft.STATION),))
        if kind == "ev":
            return box((len(ft.EV),))
        if kind == "evs":
            return spaces.Dict({"evs": box((self.n_slots, len(ft.EV))),
                                "mask": spaces.Box(0.0, 1.0, (self.n_slots,), np.float32),
                                "context": box((len(ft.STATION_CONTEXT),))})
        raise KeyError(f"agent: unknown agent {agent!r}")

    @functools.cache
    def action_space(self, agent: str) -> gymnasium.Space:
        kind = agent.split("_")[0]
        m = self.cfg.market
        if kind == "operator":
            return self._operator_action_space()
        if kind == "station":
            return spaces.Discrete(len(self.cfg.stations.fraction_levels))
        if kind == "ev":
            return spaces.Dict({"mode": spaces.Discrete(3), "power": spaces.Box(0.0, 1.0, (1,), np.float32)})
        if kind == "evs":
            return spaces.Dict({"mode": spaces.MultiDiscrete([3] * self.n_slots),
                                "power": spaces.Box(0.0, 1.0, (self.n_slots,), np.float32)})
        raise KeyError(f"agent: unknown agent {agent!r}")

    def _operator_action_space(self) -> gymnasium.Space:
        """A price multiplier or level; with storage, paired with the zone's storage set-point (share of
        ``p_max_kw``, > 0 charges)."""
        m, storage = self.cfg.market, self.cfg.storage if self.sim.layout.storage.n else None
        if self.cfg.agents.operator_action == "level":
            if storage is None:
                return spaces.Discrete(len(m.price_levels))
            return spaces.MultiDiscrete([len(m.price_levels), len(storage.levels)])
        if storage is None:
            return spaces.Box(np.float32(m.price_multiplier_min), np.float32(m.price_multiplier_max), (1,), np.float32)
        return spaces.Box(np.array([m.price_multiplier_min, -1.0], np.float32),
                          np.array([m.price_multiplier_max, 1.0], np.float32), (2,), np.float32)

    # ------------------------------------------------------------------ API

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[list[dict], list[dict]]:
        """New episode in every environment; ``None`` continues the seed sequence (first: ``cfg.seed``)."""
        if seed is None:
            seed = self.cfg.seed if self._next_seed is None else self._next_seed
        self._next_seed = seed + 1  # a reset without a seed continues the sequence
        sim = self.sim
        sim.reset(seed)
        if self._stns:
            self._disparity = rw.episode_disparity(sim.base_zone_load_kw(), sim.layout.zone_nominal_kw)
        self.slots = Slots(self.n_env * sim.layout.n_station, self.n_slots, sim.day.sessions.n)
        self._assign_slots()
        self.agents = self._live_agents()
        if self._log is not None:
            self._log.start(sim.episode)
        self.step_records = []
        obs = self._observe_all(None, self.agents)
        if not any(self.agents):  # nobody acts before the first EV plugs in: the rules run until then
            obs = self._skip_idle(None)[0]
            return obs, [{a: {} for a in o} for o in obs]
        return obs, [{a: {} for a in ag} for ag in self.agents]

    def step(self, actions: list[dict[str, Any]]) -> tuple[list[dict], ...]:
        """One step of every environment: ``actions[e]`` holds an action for each live agent of environment e
        (more simulator steps where no environment has a live agent afterwards; see the class doc)."""
        sim = self.sim
        if sim.fleet is None or sim.t >= sim.n_steps or not any(self.agents):
            raise RuntimeError("step: the episode is over; call reset()")
        self.step_records = []
        out = self._step_once(actions)
        return self._skip_idle(out) if not any(self.agents) and sim.t < sim.n_steps else out

    def _skip_idle(self, out: tuple[list[dict], ...] | None) -> tuple[list[dict], ...]:
        """Step on with no actions while no environment has a live agent and the day goes on; ``out`` (a
        step's returns, or None) merged with theirs, per environment and agent (each agent is reported by one
        of them: the ones that left by the first, the ones that plugged in by the last)."""
        while not any(self.agents) and self.sim.t < self.sim.n_steps:
            more = self._step_once([{} for _ in range(self.n_env)])
            out = more if out is None else tuple([{**a, **b} for a, b in zip(x, y)] for x, y in zip(out, more))
        return out

    def _step_once(self, actions: list[dict[str, Any]]) -> tuple[list[dict], ...]:
        sim = self.sim
        act = self._decoder.decode(*self._with_operators(actions), self.slots.owner)
        plugged_before = sim.plugged()
        rec = sim.step(act)
        self.step_records.append(rec)
        if self._log is not None:
            self._log.add_step(rec)
        rewards = self._rewards(rec)
        truncate = sim.t >= sim.n_steps
        # sessions that left in this step: departed, or cut by the end of the episode
        left = plugged_before[sim.fleet.status[plugged_before] != PLUGGED]
        gone = self._terminated(left)
        if not truncate:
            self.slots.free(left, sim.fleet.station)
            self._assign_slots()
        # at the end every slot keeps its EV: the last observation shows the EVs as the day leaves them (what a
        # value bootstrap at truncation should see), and the same set of slots the last action was taken for
        live_next = [[] for _ in range(self.n_env)] if truncate else self._live_agents()
        reported = [list(dict.fromkeys(now + nxt)) for now, nxt in zip(self.agents, live_next)]
        obs = self._observe_all(rec, reported, left)
        terminated = [{a: a in g for a in rep} for rep, g in zip(reported, gone)]
        truncated = [{a: truncate for a in rep} for rep in reported]
        rew = [{a: float(r.get(a, 0.0)) for a in rep} for rep, r in zip(reported, rewards)]
        info = [{a: {} for a in rep} for rep in reported]
        self.agents = live_next
        if truncate and self._log is not None:
            self._log.end_episode()
        return obs, rew, terminated, truncated, info

    def _observe_all(self, rec: StepRecord | None, reported: list[list[str]],
                     left: npt.NDArray[np.int64] | None = None) -> list[dict[str, Any]]:
        """The observations of ``reported``; with an operator policy, its operators' too, kept for its next
        decision."""
        if self._op_policy is None:
            return self._observe(rec, reported, self.slots.owner, left)
        obs = self._observe(rec, [self._ops + r for r in reported], self.slots.owner, left)
        self._op_obs = np.stack([np.stack([o.pop(a) for a in self._ops]) for o in obs])
        return obs

    def _with_operators(self, actions: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[str]]]:
        """(actions, live agents) with the operator policy's actions added (unchanged without one)."""
        if self._op_policy is None:
            return actions, self.agents
        if not isinstance(actions, list | tuple) or len(actions) != self.n_env \
                or not all(isinstance(acts, dict) for acts in actions):
            return actions, self.agents  # the decoder names the problem
        taken = [a for acts in actions for a in acts if a in self._ops]
        if taken:
            raise ValueError(f"actions: {taken[0]!r} acts by the operator_policy; it is not an agent")
        n = self.n_env * len(self._ops)
        chosen = np.asarray(self._op_policy(self._op_obs.reshape(n, -1)))
        if chosen.ndim == 0 or chosen.shape[0] != n:
            raise ValueError(f"operator_policy: expected one action per operator observation ({n} rows), got "
                             f"shape {chosen.shape}")
        chosen = chosen.reshape(self.n_env, len(self._ops), *chosen.shape[1:])
        full = [{**acts, **dict(zip(self._ops, chosen[e]))} for e, acts in enumerate(actions)]
        return full, [self._ops + ag for ag in self.agents]

    def state(self, e: int = 0) -> npt.NDArray[np.float32]:
        """Global state of environment ``e`` for centralised critics: bus voltages, line loadings, zone loads,
        prices, time, storage SOC (with storage)."""
        sim, lay, rec = self.sim, self.sim.layout, self.sim.last
        n_branch = sum(f.n_line + f.n_trafo for f in lay.feeders)
        vm = rec.vm_pu[e] if rec is not None else np.ones(lay.n_bus)
        loading = rec.line_loading[e] if rec is not None else np.zeros(n_branch)
        zl = rec.zone_load_kw[e] / lay.zone_nominal_kw if rec is not None else np.zeros(lay.n_zone)
        t = min(sim.t, sim.n_steps - 1)
        clock = 2 * np.pi * sim.day.clock_h[t] / 24
        return np.concatenate([vm, np.nan_to_num(loading), zl, sim.prices.current[e], sim.prices.next[e],
                               np.eye(3)[sim.day.period[t]], [np.sin(clock), np.cos(clock)],
                               sim.fleet.storage_soc[e]]).astype(np.float32)

    def ev_decisions(self) -> npt.NDArray[np.int64]:
        """Per-EV actions the learned EVs take in the coming step, per environment: one per plugged EV."""
        if self.cfg.agents.ev_view == "rule":
            return np.zeros(self.n_env, dtype=np.int64)
        return np.bincount(self.sim.day.env[self.sim.plugged()], minlength=self.n_env)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    # ------------------------------------------------------------------ agents

    def _env_runs(self, idx: npt.NDArray[np.int64]) -> list[slice]:
        """For sessions ``idx`` (ascending), the slice of ``idx`` each environment owns: sessions are stored
        environment by environment."""
        bounds = np.searchsorted(self.sim.day.env[idx], np.arange(self.n_env + 1))
        return [slice(bounds[e], bounds[e + 1]) for e in range(self.n_env)]

    def _by_env(self, idx: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
        """Sessions ``idx`` (ascending) split per environment."""
        return [idx[run] for run in self._env_runs(idx)]

    def _live_agents(self) -> list[list[str]]:
        fixed = self._shown_ops + self._stns
        view = self.cfg.agents.ev_view
        if view == "individual":
            sim = self.sim
            return [fixed + [f"ev_{k}" for k in sim.fleet.ev_index[part]] for part in self._by_env(sim.plugged())]
        if view == "grouped":
            fixed = fixed + [f"evs_{j}" for j in range(self.sim.layout.n_station)]
        return [list(fixed) for _ in range(self.n_env)]

    def _assign_slots(self) -> None:
        if self.cfg.agents.ev_view == "grouped":
            self.slots.assign(self.sim.plugged(), self.sim.fleet.station)

    def _terminated(self, left: npt.NDArray[np.int64]) -> list[set[str]]:
        """Individual EV agents whose EV departed in the last step (a stay cut by the episode's end is truncated,
        not terminated)."""
        sim = self.sim
        if self.cfg.agents.ev_view != "individual":
            return [set() for _ in range(self.n_env)]
        departed = left[sim.fleet.status[left] == DEPARTED]
        return [{f"ev_{k}" for k in sim.fleet.ev_index[part]} for part in self._by_env(departed)]

    def _rewards(self, rec: StepRecord) -> list[dict[str, float]]:
        """Each live agent's reward for the step, per environment (:mod:`evgrid.envs.views.rewards`)."""
        sim, lay = self.sim, self.sim.layout
        n_env, n_st = self.n_env, lay.n_station
        out: list[dict[str, float]] = [{} for _ in range(n_env)]
        view = self.cfg.agents.ev_view
        if view != "rule":
            ev_r = rw.ev_rewards(rec, self.cfg.reward, sim.dt_h)
            if view == "individual":
                for e, run in enumerate(self._env_runs(rec.plugged)):
                    out[e].update((f"ev_{k}", r) for k, r in zip(sim.fleet.ev_index[rec.plugged[run]], ev_r[run]))
            else:
                per = rw.per_station(rec, ev_r, n_env, n_st)
                for e in range(n_env):
                    out[e].update((f"evs_{j}", per[e, j]) for j in range(n_st))
        if self._stns:
            r = rw.station_rewards(rec, self.cfg, lay, self._disparity)
            for e in range(n_env):
                out[e].update(zip(self._stns, r[e]))
        if self._shown_ops:
            r = rw.operator_rewards(rec, self.cfg.reward, lay)
            for e in range(n_env):
                out[e].update(zip(self._ops, r[e]))
        return out


class EVGridEnv(ParallelEnv, EzPickle):
    # the docstring is assembled below from the feature declarations
    metadata = {"name": "EVGrid-v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, config: Any = None, powerflow: GridService | None = None,
                 operator_policy: OperatorPolicy | None = None, **overrides: Any) -> None:
        EzPickle.__init__(self, config, None, operator_policy, **overrides)
        self.vec = EVGridVectorEnv(config, 1, powerflow, operator_policy, **overrides)
        self.cfg = self.vec.cfg
        self.sim = self.vec.sim
        self.possible_agents = self.vec.possible_agents
        self.render_mode = None

    @property
    def agents(self) -> list[str]:
        return self.vec.agents[0]

    @property
    def last_rec(self) -> StepRecord | None:
        """The simulator's record of the last step (None right after ``reset``)."""
        return self.vec.last_rec

    @property
    def step_records(self) -> list[StepRecord]:
        """The records of the simulator steps the last ``reset`` or ``step`` ran: one per ``step``, except with
        individual EVs and rule operators and stations, where steps with no EV plugged in run inside them."""
        return self.vec.step_records

    def observation_space(self, agent: str) -> gymnasium.Space:
        return self.vec.observation_space(agent)  # memoised there: the same object every call

    def action_space(self, agent: str) -> gymnasium.Space:
        return self.vec.action_space(agent)

    def reset(self, seed: int | None = None, options: dict | None = None):
        obs, infos = self.vec.reset(seed, options)
        return obs[0], infos[0]

    def step(self, actions: dict[str, Any]):
        if not isinstance(actions, dict):
            raise ValueError(f"actions: expected a dict of agent id -> action, got {type(actions).__name__}")
        obs, rew, term, trunc, info = self.vec.step([actions])
        return obs[0], rew[0], term[0], trunc[0], info[0]

    def state(self) -> npt.NDArray[np.float32]:
        """Global state for centralised critics: bus voltages, line loadings, zone loads, prices, time."""
        return self.vec.state(0)

    def close(self) -> None:
        self.vec.close()


def _indent(table: str, index_prefix: str = "") -> str:
    lines = table.splitlines()
    if index_prefix:
        lines = lines[:2] + [line.replace("| ", f"| {index_prefix}", 1) for line in lines[2:]]
    return "\n".join("    " + line for line in lines)


EVGridEnv.__doc__ = f"""Multi-agent EV charging on a distribution feeder with a per-step power flow.

    ## Description
    Zone operators set retail price multipliers (announced one interval ahead), charging stations share
    their connection limit among plugged EVs, and EVs choose to charge, idle or discharge (V2G) at a power
    level.  Each step solves an AC power flow of the feeder (a compiled batched sweep, pandapower as
    reference) and, where a bus voltage falls below ``v_min`` or a line exceeds its rating, curtails EV
    charging (or raises V2G) until the limits hold; PV and wind output above ``v_max``, on reverse overloads
    or beyond ``grid.export_limit_kw`` is curtailed (:mod:`evgrid.grid.limits`).  The simulator is
    :class:`evgrid.envs.sim.Sim`; this class only maps agents to its arrays.

    ## Agents
    Each level is ``learned`` (agents below) or ``rule`` (a controller inside the env), set in ``agents``:

    * ``operator_<k>``: one per zone.
    * ``station_<j>``: one per charging station.
    * EV view ``individual``: ``ev_<k>``, the k-th EV to plug in this episode; it appears when it plugs in,
      is terminated when it leaves and never returns.  ``possible_agents`` holds ``fleet.n_ev`` of them.
    * EV view ``grouped``: ``evs_<j>``, one per station, carrying its EVs as a padded set of ``ev_slots``
      slots (an EV keeps its slot while plugged).
    * EV view ``rule``: EVs follow ``agents.ev_rule``.

    ## Action Space
    Every action must lie in its space; anything else is a ValueError naming the agent.

    * operator: ``Box(multiplier_min, multiplier_max, (1,))`` price multiplier for the next step, or
      ``Discrete(len(price_levels))`` with ``operator_action: level``.  With ``storage``, the zone's storage
      set-point for this step joins it, as a share of each unit's ``p_max_kw`` (> 0 charges; the unit's power
      and SOC bounds hold, what they hold back is recorded): ``Box([multiplier_min, -1], [multiplier_max, 1])``,
      or ``MultiDiscrete([len(price_levels), len(storage.levels)])``.
    * station: ``Discrete(len(fraction_levels))``: its power limit as a share of ``p_max_kw`` (dispatch
      ``equal``), the share of its EVs that may charge (``llf``; with ``agents.ev_shield: deadline`` an EV
      that would miss its target by waiting one more step charges whatever the share), or each EV's power
      level (``cap``).
    * ev: ``Dict(mode=Discrete(3), power=Box(0, 1, (1,)))``; mode 0 charge, 1 idle, 2 discharge; power is a
      fraction of the charger's limit.  Physical bounds always hold: a full battery does not charge, a
      non-V2G EV does not discharge (the action becomes idle).  With ``agents.ev_shield: deadline`` an EV
      that would miss its target by waiting one more step charges at full power whatever the action, and a
      discharge after which it would becomes idle.
    * evs (grouped): ``Dict(mode=MultiDiscrete([3] * slots), power=Box(0, 1, (slots,)))``; empty slots are
      ignored.

    ## Observation Space
    operator, ``Box({len(ft.OPERATOR)},)`` float32:

{_indent(ft.OPERATOR.table())}

    With ``storage``, ``Box({len(ft.operator_features(True))},)``: these follow.

{_indent(ft.OPERATOR_STORAGE.table(len(ft.OPERATOR)))}

    station, ``Box(N + {len(ft.STATION)},)`` with ``N = (c_max+1)(e_max+1)``: seed 002's count matrix
    ``N[c, e]`` per port (flattened, c = remaining charge slots, e = remaining parking slots, the last
    row/column collecting larger values), then the station's features:

{_indent(ft.STATION.table(), "N + ")}

    ev, ``Box({len(ft.EV)},)``:

{_indent(ft.EV.table())}

    evs (grouped): ``Dict(evs=Box(slots, {len(ft.EV)}), mask=Box(0, 1, (slots,)), context=Box({len(ft.STATION_CONTEXT)},))``;
    ``mask`` is 1 where a slot holds an EV, ``context`` the station's features above without its network's
    (``zone_base_share_dev``, ``zone_load_share_dev``).

    ## Rewards
    Weights in ``reward`` (:class:`evgrid.envs.config.RewardConfig`), from :mod:`evgrid.envs.views.rewards`:

{_indent(rw.__doc__.split(chr(10) + chr(10), 1)[1].strip())}

    ## Starting State
    ``reset(seed)`` draws the day's sessions, base load, PV and wind from child generators of ``seed`` and
    plugs in the EVs that arrive in the first step.

    ## Episode End
    Truncation after ``n_steps`` steps (one day by default) for every agent; an EV agent is terminated when
    its EV leaves.  With individual EVs and operators and stations on their rules, the steps in which no EV is
    plugged in (no agent to act) run inside ``reset`` and ``step``, so ``agents`` is empty only at the end;
    ``step_records`` holds the simulator records of every step the last call ran.

    ## Arguments
    ``EVGridEnv(config=None, powerflow=None, operator_policy=None, **overrides)``: ``config`` an
    :class:`EnvConfig`, a YAML path, a shipped experiment's name or a mapping; overrides are config fields as
    nested mappings (``fleet={{"n_ev": 500}}``), ``section__field=value`` keywords, or the shortcut
    ``ev_view=...``, merged field by field; ``powerflow`` the solver service (default: in-process,
    :class:`evgrid.grid.service.LocalGrid`); ``operator_policy`` a fixed :class:`OperatorPolicy` acting for
    the operators inside the env (they are then no agents).  :class:`EVGridVectorEnv` runs several of these in
    lock-step with one batched power flow per step.

    ## Version History
    * v0: initial version.
    """
