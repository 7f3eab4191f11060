"""EVGrid-v0: zone operators, charging stations and EVs on a live feeder (PettingZoo ParallelEnv)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import gymnasium
import numba as nb
import numpy as np
import numpy.typing as npt
from gymnasium import spaces
from gymnasium.utils import EzPickle
from pettingzoo import ParallelEnv

from evgrid.config import ConfigError, keyword_overrides
from evgrid.envs import sim as sm
from evgrid.envs.config import EnvConfig, load_config
from evgrid.grid.profiles import VALLEY

log = logging.getLogger(__name__)

OPERATOR_FEATURES = ("zone_load_pu", "zone_pv_pu", "zone_wind_pu", "multiplier_now", "multiplier_next",
                     "valley", "offpeak", "peak", "clock_sin", "clock_cos", "zone_v_min_pu",
                     "plugged_share", "need_h", "time_left")
EV_FEATURES = ("soc", "soc_target", "need_share", "hours_left_per_day", "p_ch_max_per_50kw", "p_dis_max_per_50kw",
               "v2g", "price_now", "price_next", "bus_vm_pu", "laxity", "uninterruptible_on", "valley")
STATION_CONTEXT = ("bus_vm_pu", "price_now", "valley", "offpeak", "peak", "clock_sin", "clock_cos",
                   "load_share", "plugged_share", "time_left")


class EVGridVectorEnv:
    """``n_env`` lock-stepped EVGrid environments over one :class:`evgrid.envs.sim.Sim` with ``n_env`` scenarios.

    Everything :class:`EVGridEnv` documents (agents, spaces, observations,
    rewards), with a leading environment axis: ``reset`` and ``step`` take and
    return one PettingZoo dict per environment, and a step is one simulator
    step, so all environments share **one** batched power-flow call per
    feeder (the shape of Gymnasium's ``CartPoleVectorEnv``).  Every
    environment has the same ``possible_agents``; environment ``e`` of a reset
    with ``seed`` draws its day from ``(seed, e)``, so environment 0 replays
    ``EVGridEnv`` with that seed.  All environments start and end together
    (an episode ends only by truncation), which is what lets them share the
    simulator.  ``EVGridEnv`` is this class with ``n_env = 1``; RLlib's env
    runners hold their ``envs_per_runner`` environments as one of these
    (:mod:`evgrid.agents.rllib.env`).
    """

    def __init__(self, config: Any = None, n_env: int = 1, powerflow: sm.GridService | None = None,
                 **overrides: Any) -> None:
        self.cfg = cfg = load_config(config, keyword_overrides(overrides))
        a = cfg.agents
        if a.operator == "rule" and a.station == "rule" and a.ev_view == "rule":
            raise ConfigError("agents: every level runs its rule, so the env has no agents; "
                              "drive evgrid.envs.sim.Sim directly (evgrid evaluate does)")
        if a.ev_view == "individual" and a.operator == "rule" and a.station == "rule":
            raise ConfigError("agents.ev_view: 'individual' with rule operators and stations leaves no live agent "
                              "while no EV is plugged in; make a level learned or use the grouped view")
        self.slots = a.ev_slots if a.ev_slots is not None else cfg.stations.ports
        if a.ev_view == "grouped" and self.slots < cfg.stations.ports:
            raise ConfigError(f"agents.ev_slots: expected >= stations.ports ({cfg.stations.ports}) so every "
                              f"plugged EV has a slot, got {self.slots}")
        if not isinstance(n_env, int | np.integer) or not 1 <= n_env <= 65536:
            raise ValueError(f"n_env: expected an integer in [1, 65536], got {n_env!r}")
        self.n_env = int(n_env)
        self.sim = sim = sm.Sim(cfg, self.n_env, grid=powerflow)
        ops = [f"operator_{k}" for k in range(sim.n_zone)] if a.operator == "learned" else []
        stns = [f"station_{j}" for j in range(sim.n_station)] if a.station == "learned" else []
        if a.ev_view == "individual":
            evs = [f"ev_{k}" for k in range(cfg.fleet.n_ev)]
        elif a.ev_view == "grouped":
            evs = [f"evs_{j}" for j in range(sim.n_station)]
        else:
            evs = []
        self.possible_agents = ops + stns + evs
        self.agents: list[list[str]] = [[] for _ in range(self.n_env)]  # live agents per environment
        self._ops, self._stns = ops, stns
        self._mult_lo = cfg.market.price_multiplier_min
        self._mult_hi = cfg.market.price_multiplier_max
        self._max_price = max(cfg.market.tariff.peak_price_per_kwh, cfg.market.tariff.offpeak_price_per_kwh,
                              cfg.market.tariff.valley_price_per_kwh) * self._mult_hi
        self._ports_zone = np.maximum(np.bincount(sim.station_zone, minlength=sim.n_zone) * cfg.stations.ports, 1)
        # buses grouped by zone, for one minimum.reduceat over them (every zone has buses)
        self._zone_bus_order = np.argsort(sim.zone_of_bus, kind="stable")
        self._zone_bus_starts = np.searchsorted(sim.zone_of_bus[self._zone_bus_order], np.arange(sim.n_zone))
        self._station_in_zone = np.eye(sim.n_zone)[sim.station_zone]  # (n_station, Z): a station's zone, one-hot
        # PV / wind capacity per zone, kW: the zone's output is this times the step's per-unit profile
        self._zone_der_kw = {kind: np.bincount(sim.zone_of_bus[sim.der[kind][0]], sim.der[kind][1], sim.n_zone)
                             for kind in ("pv", "wind")}
        self.last_rec: dict | None = None  # the simulator's record of the last step
        self._log = None
        if cfg.log_dir is not None:
            from evgrid.io import EpisodeLog

            self._log = EpisodeLog(cfg.log_dir, sim)

    # ------------------------------------------------------------------ spaces

    @functools.cache
    def observation_space(self, agent: str) -> gymnasium.Space:
        kind = agent.split("_")[0]
        sc = self.cfg.stations
        if kind == "operator":
            return spaces.Box(-np.inf, np.inf, (len(OPERATOR_FEATURES),), np.float32)
        if kind == "station":
            n = (sc.c_max + 1) * (sc.e_max + 1) + len(STATION_CONTEXT)
            return spaces.Box(-np.inf, np.inf, (n,), np.float32)
        if kind == "ev":
            return spaces.Box(-np.inf, np.inf, (len(EV_FEATURES),), np.float32)
        if kind == "evs":
            return spaces.Dict({
                "evs": spaces.Box(-np.inf, np.inf, (self.slots, len(EV_FEATURES)), np.float32),
                "mask": spaces.Box(0.0, 1.0, (self.slots,), np.float32),
                "context": spaces.Box(-np.inf, np.inf, (len(STATION_CONTEXT),), np.float32),
            })
        raise KeyError(f"agent: unknown agent {agent!r}")

    @functools.cache
    def action_space(self, agent: str) -> gymnasium.Space:
        kind = agent.split("_")[0]
        m = self.cfg.market
        if kind == "operator":
            if self.cfg.agents.operator_action == "level":
                return spaces.Discrete(len(m.price_levels))
            return spaces.Box(np.float32(self._mult_lo), np.float32(self._mult_hi), (1,), np.float32)
        if kind == "station":
            return spaces.Discrete(len(self.cfg.stations.fraction_levels))
        if kind == "ev":
            return spaces.Dict({"mode": spaces.Discrete(3), "power": spaces.Box(0.0, 1.0, (1,), np.float32)})
        if kind == "evs":
            return spaces.Dict({"mode": spaces.MultiDiscrete([3] * self.slots),
                                "power": spaces.Box(0.0, 1.0, (self.slots,), np.float32)})
        raise KeyError(f"agent: unknown agent {agent!r}")

    # ------------------------------------------------------------------ API

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[list[dict], list[dict]]:
        """New episode in every environment; ``None`` continues the seed sequence (first: ``cfg.seed``)."""
        if seed is None and not hasattr(self, "_next_seed"):
            seed = self.cfg.seed
        if seed is None:
            seed = self._next_seed
        self._next_seed = seed + 1  # a reset without a seed continues the sequence
        sim = self.sim
        sim.reset(seed)
        self._slot_owner = np.full((self.n_env * sim.n_station, self.slots), -1, dtype=np.int64)  # global station
        self._slot_of = np.full(sim.s.n, -1, dtype=np.int64)
        self._assign_slots()
        self.last_rec = None
        self.agents = self._live_agents()
        if self._log is not None:
            self._log.start(sim.episode)
        obs = self._observations(self.agents)
        return obs, [{a: {} for a in ag} for ag in self.agents]

    def step(self, actions: list[dict[str, Any]]) -> tuple[list[dict], ...]:
        """One step of every environment: ``actions[e]`` holds an action for each live agent of environment e."""
        sim = self.sim
        if sim.t >= sim.n_steps or not any(self.agents):
            raise RuntimeError("step: the episode is over; call reset()")
        act = self._decode(actions)
        plugged_before = sim.plugged()
        need_before = sim._need_kwh(plugged_before)
        rec = sim.step(act)
        self.last_rec = rec
        if self._log is not None:
            self._log.add_step(rec)
        rewards = self._rewards(rec, need_before)
        truncate = sim.t >= sim.n_steps
        # sessions that left in this step: departed, or cut by the end of the episode
        left = plugged_before[sim.status[plugged_before] != sm.PLUGGED]
        gone: list[set[str]] = [set() for _ in range(self.n_env)]
        if self.cfg.agents.ev_view == "individual":
            departed = left[sim.status[left] == sm.DEPARTED]  # a cut stay is truncated, not terminated
            for e, part in enumerate(self._by_env(departed)):
                gone[e] = {f"ev_{k}" for k in sim.ev_index[part]}
        if not truncate:
            self._free_slots(plugged_before)
            self._assign_slots()
        # at the end every slot keeps its EV: the last observation shows the EVs as the day leaves them (what a
        # value bootstrap at truncation should see), and the same set of slots the last action was taken for
        live_next = [[] for _ in range(self.n_env)] if truncate else self._live_agents()
        reported = [list(dict.fromkeys(now + nxt)) for now, nxt in zip(self.agents, live_next)]
        obs = self._observations(reported, left)
        terminated = [{a: a in g for a in rep} for rep, g in zip(reported, gone)]
        truncated = [{a: truncate for a in rep} for rep in reported]
        rew = [{a: float(r.get(a, 0.0)) for a in rep} for rep, r in zip(reported, rewards)]
        info = [{a: {} for a in rep} for rep in reported]
        self.agents = live_next
        if truncate and self._log is not None:
            self._log.end_episode()
        return obs, rew, terminated, truncated, info

    def state(self, e: int = 0) -> npt.NDArray[np.float32]:
        """Global state of environment ``e`` for centralised critics: bus voltages, line loadings, zone loads,
        prices, time."""
        sim = self.sim
        rec = self.last_rec
        n_branch = sum(f.n_line + f.n_trafo for f in sim.feeders)
        vm = rec["vm_pu"][e] if rec is not None else np.ones(sim.n_bus)
        loading = rec["line_loading"][e] if rec is not None else np.zeros(n_branch)
        zl = rec["zone_load_kw"][e] / sim.zone_nominal_kw if rec is not None else np.zeros(sim.n_zone)
        t = min(sim.t, sim.n_steps - 1)
        clock = 2 * np.pi * sim.clock_h[t] / 24
        return np.concatenate([vm, np.nan_to_num(loading), zl, sim.prices.current[e], sim.prices.next[e],
                               np.eye(3)[sim.period[t]], [np.sin(clock), np.cos(clock)]]).astype(np.float32)

    def ev_decisions(self) -> npt.NDArray[np.int64]:
        """Per-EV actions the learned EVs take in the coming step, per environment: one per plugged EV."""
        if self.cfg.agents.ev_view == "rule":
            return np.zeros(self.n_env, dtype=np.int64)
        return np.bincount(self.sim.env[self.sim.plugged()], minlength=self.n_env)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    # ------------------------------------------------------------------ agents and slots

    def _env_runs(self, idx: npt.NDArray[np.int64]) -> list[slice]:
        """For sessions ``idx`` (ascending), the slice of ``idx`` each environment owns: sessions are stored
        environment by environment."""
        bounds = np.searchsorted(self.sim.env[idx], np.arange(self.n_env + 1))
        return [slice(bounds[e], bounds[e + 1]) for e in range(self.n_env)]

    def _by_env(self, idx: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
        """Sessions ``idx`` (ascending) split per environment."""
        return [idx[run] for run in self._env_runs(idx)]

    def _label(self, agent: str, e: int) -> str:
        """An agent's name in messages: its id, and its environment when there are several."""
        return agent if self.n_env == 1 else f"{agent} (env {e})"

    def _live_agents(self) -> list[list[str]]:
        fixed = self._ops + self._stns
        view = self.cfg.agents.ev_view
        if view == "individual":
            sim = self.sim
            return [fixed + [f"ev_{k}" for k in sim.ev_index[part]] for part in self._by_env(sim.plugged())]
        if view == "grouped":
            fixed = fixed + [f"evs_{j}" for j in range(self.sim.n_station)]
        return [list(fixed) for _ in range(self.n_env)]

    def _assign_slots(self) -> None:
        """Give each newly plugged EV the lowest free slot of its station."""
        sim = self.sim
        idx = sim.plugged()
        new = idx[self._slot_of[idx] < 0]
        if new.size == 0 or self.cfg.agents.ev_view != "grouped":
            return
        stn = sim.station[new]  # global station: its row of _slot_owner
        order = np.argsort(stn, kind="stable")
        new, stn = new[order], stn[order]
        rank = np.arange(new.size) - sm.st._group_starts(stn)
        free_s, free_k = np.nonzero(self._slot_owner < 0)  # sorted by station, then slot
        first = np.searchsorted(free_s, stn)
        slot = free_k[first + rank]
        self._slot_owner[stn, slot] = new
        self._slot_of[new] = slot

    def _free_slots(self, before: npt.NDArray[np.int64]) -> None:
        left = before[self.sim.status[before] != sm.PLUGGED]
        if left.size and self.cfg.agents.ev_view == "grouped":
            self._slot_owner[self.sim.station[left], self._slot_of[left]] = -1

    # ------------------------------------------------------------------ actions

    def _decode(self, actions: list[dict[str, Any]]) -> sm.SimActions:
        sim = self.sim
        cfg = self.cfg
        E = self.n_env
        if not isinstance(actions, list | tuple) or len(actions) != E:
            raise ValueError(f"actions: expected a list of {E} dicts (one per environment), got "
                             f"{type(actions).__name__} of length {len(actions) if hasattr(actions, '__len__') else '?'}")
        for e, (acts, live) in enumerate(zip(actions, self.agents)):
            unknown = [a for a in acts if a not in live]
            if unknown:
                raise ValueError(f"actions: {self._label(unknown[0], e)!r} is not a live agent")
            missing = [a for a in live if a not in acts]
            if missing:
                raise ValueError(f"actions: no action for live agent {self._label(missing[0], e)!r}")
        act = sm.SimActions()
        if self._ops:
            if cfg.agents.operator_action == "level":
                lv = self._levels(actions, self._ops, len(cfg.market.price_levels))
                mult = np.asarray(cfg.market.price_levels, dtype=float)[lv]
            else:
                mult = self._multipliers(actions)
            act.price_multiplier = mult  # (E, Z)
        if self._stns:
            lv = self._levels(actions, self._stns, len(cfg.stations.fraction_levels)).ravel()  # global station order
            act.station_fraction = np.asarray(cfg.stations.fraction_levels, dtype=float)[lv]
        view = cfg.agents.ev_view
        if view == "individual":
            idx = sim.plugged()
            mode = np.empty(idx.size, dtype=np.int64)
            power = np.empty(idx.size)
            i = 0
            for e, part in enumerate(self._by_env(idx)):
                acts = actions[e]
                for k in sim.ev_index[part]:
                    a = f"ev_{k}"
                    mode[i], power[i] = _ev_action(acts[a], self._label(a, e))
                    i += 1
            act.ev_mode = np.full(sim.s.n, sm.IDLE, dtype=np.int64)
            act.ev_power = np.zeros(sim.s.n)
            act.ev_mode[idx] = mode
            act.ev_power[idx] = power
        elif view == "grouped":
            mode, power = self._grouped_actions(actions)  # (E * n_station, slots), global station order
            owner = self._slot_owner
            occ = owner >= 0
            act.ev_mode = np.full(sim.s.n, sm.IDLE, dtype=np.int64)
            act.ev_power = np.zeros(sim.s.n)
            act.ev_mode[owner[occ]] = mode[occ]
            act.ev_power[owner[occ]] = power[occ]
        return act

    def _levels(self, actions: list[dict[str, Any]], names: list[str], n: int) -> np.ndarray:
        """Discrete actions of ``names`` in every environment, (E, len(names)), checked at once (one by one only
        to name a bad one)."""
        shape = (self.n_env, len(names))
        try:
            v = np.array([[actions[e][a] for a in names] for e in range(self.n_env)])
            ok = v.shape == shape and np.issubdtype(v.dtype, np.integer) and v.min() >= 0 and v.max() < n
        except (TypeError, ValueError):
            ok = False
        if not ok:
            v = np.array([[_int_action(actions[e][a], self._label(a, e), n) for a in names]
                          for e in range(self.n_env)]).reshape(shape)
        return v

    def _multipliers(self, actions: list[dict[str, Any]]) -> np.ndarray:
        """Operators' price multipliers, (E, Z), checked at once (one by one only to name a bad one)."""
        lo, hi = self._mult_lo, self._mult_hi
        shape = (self.n_env, len(self._ops))
        try:
            v = np.array([[actions[e][a] for a in self._ops] for e in range(self.n_env)], dtype=float)
            ok = v.size == shape[0] * shape[1] and np.isfinite(v).all() and v.min() >= lo - 1e-6 \
                and v.max() <= hi + 1e-6
        except (TypeError, ValueError):
            ok = False
        if not ok:
            v = np.array([[_box_scalar(actions[e][a], self._label(a, e), lo, hi) for a in self._ops]
                          for e in range(self.n_env)])
        return np.clip(v.reshape(shape), lo, hi)  # float32 rounding of the bounds only

    def _grouped_actions(self, actions: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Every ``evs_<j>`` action stacked and checked at once; only an invalid one is looked at alone, to
        name it."""
        names = [(e, f"evs_{j}") for e in range(self.n_env) for j in range(self.sim.n_station)]
        try:
            acts = [actions[e][a] for e, a in names]
            mode = np.array([a["mode"] for a in acts])
            power = np.array([a["power"] for a in acts]).astype(float)
            ok = (mode.shape == power.shape == (len(names), self.slots) and np.issubdtype(mode.dtype, np.integer)
                  and mode.min() >= 0 and mode.max() <= 2 and np.isfinite(power).all()
                  and power.min() >= 0 and power.max() <= 1)
        except (TypeError, KeyError, IndexError, ValueError):
            ok = False
        if not ok:  # the first bad action raises, naming its agent
            checked = [_grouped_action(actions[e][a], self._label(a, e), self.slots) for e, a in names]
            mode, power = np.stack([m for m, _ in checked]), np.stack([p for _, p in checked])
        return mode, power

    # ------------------------------------------------------------------ observations

    def _observations(self, agents: list[list[str]],
                      left: npt.NDArray[np.int64] | None = None) -> list[dict[str, Any]]:
        """Observations of ``agents`` (per environment); ``left``: sessions that left in the last step, whose
        EVs are still reported (an individual EV's final observation, the slots at the episode's end)."""
        if not any(agents):
            return [{} for _ in agents]
        sim = self.sim
        E, n_st = self.n_env, sim.n_station
        out: list[dict[str, Any]] = [{} for _ in range(E)]
        t = min(sim.t, sim.n_steps - 1)
        clock = 2 * np.pi * sim.clock_h[t] / 24
        period = np.eye(3)[sim.period[t]]
        time_left = (sim.n_steps - sim.t) / sim.n_steps
        rec = self.last_rec
        vm = rec["vm_pu"] if rec is not None else np.ones((E, sim.n_bus))  # (E, n_bus)
        idx = sim.plugged()
        stn = sim.station[idx]
        # plugged EVs per station, (E * n_st,): operators sum them over their zone; stations and grouped EVs see
        # their own.  The missing energy only for the levels that observe it
        plugged = np.bincount(stn, minlength=E * n_st).astype(float)
        need = sim._need_kwh(idx) if self._ops or self._stns else None
        if self._ops:
            need_st = np.bincount(stn, need, E * n_st)
            feats = self._operator_obs(rec, vm, period, clock, time_left, plugged, need_st)  # (E, Z, F)
            for e in range(E):
                out[e].update(zip(self._ops, feats[e]))
        ctx = None
        if self._stns or self.cfg.agents.ev_view == "grouped":
            ctx = self._station_context(vm, period, clock, time_left, plugged)  # (E * n_st, F)
        if self._stns:
            c, e_slots = sim.slots(idx, need)
            sc = self.cfg.stations
            n = sm.st.count_matrix(c, e_slots, stn, E * n_st, sc.c_max, sc.e_max) / sc.ports
            flat = np.concatenate([n.reshape(E * n_st, -1), ctx], axis=1).astype(np.float32)
            for e in range(E):
                out[e].update(zip(self._stns, flat[e * n_st:(e + 1) * n_st]))
        view = self.cfg.agents.ev_view
        if view == "individual":
            shown = idx if left is None or left.size == 0 else np.union1d(idx, left)  # sessions with EV features
            feats = np.empty((shown.size, len(EV_FEATURES)), np.float32)
            self._ev_features(feats, np.arange(shown.size), shown, vm)
            for e, rows in enumerate(self._env_runs(shown)):
                want = {a for a in agents[e] if a.startswith("ev_")}
                for k, row in zip(sim.ev_index[shown[rows]], feats[rows]):
                    name = f"ev_{k}"
                    if name in want:
                        out[e][name] = row
        elif view == "grouped":
            occ = self._slot_owner >= 0
            owner = self._slot_owner.ravel()
            flat = np.flatnonzero(occ)  # occupied slots, (station, slot) flattened
            feats = np.zeros((owner.size, len(EV_FEATURES)), np.float32)
            self._ev_features(feats, flat, owner[flat], vm)
            feats = feats.reshape(E * n_st, self.slots, -1)
            mask = occ.astype(np.float32)
            ctx32 = ctx.astype(np.float32)
            for e in range(E):
                for j in range(n_st):
                    g = e * n_st + j
                    out[e][f"evs_{j}"] = {"evs": feats[g], "mask": mask[g], "context": ctx32[g]}
        return [{a: o[a] for a in ag} for o, ag in zip(out, agents)]

    def _operator_obs(self, rec, vm, period, clock, time_left, plugged_st, need_st) -> np.ndarray:
        """(E, Z, len(OPERATOR_FEATURES)); ``plugged_st``, ``need_st``: plugged EVs and their missing kWh per
        station, (E * n_station,)."""
        sim = self.sim
        E, Z = self.n_env, sim.n_zone
        t = min(sim.t, sim.n_steps - 1)
        nom = sim.zone_nominal_kw
        zl = rec["zone_load_kw"] / nom if rec is not None else np.zeros((E, Z))
        pv = sim.pv_pu[:, t, None] * self._zone_der_kw["pv"]  # (E, Z)
        wind = sim.wind_pu[:, t, None] * self._zone_der_kw["wind"]
        vmin = np.minimum.reduceat(vm[:, self._zone_bus_order], self._zone_bus_starts, axis=1)
        vmin = np.where(np.isnan(vmin), 0.0, vmin)  # a bus without a solution (collapse) shows as 0
        to_zone = self._station_in_zone
        plugged = plugged_st.reshape(E, -1) @ to_zone / self._ports_zone
        need = need_st.reshape(E, -1) @ to_zone / nom
        ones = np.ones((E, Z))
        feats = np.stack([zl, pv / nom, wind / nom, sim.prices.current, sim.prices.next,
                          ones * period[0], ones * period[1], ones * period[2], ones * np.sin(clock),
                          ones * np.cos(clock), vmin, plugged, need, ones * time_left], axis=-1)
        return feats.astype(np.float32)

    def _station_context(self, vm, period, clock, time_left, plugged_st) -> np.ndarray:
        """(E * n_station, len(STATION_CONTEXT)), rows in global station order; ``plugged_st``: plugged EVs per
        station."""
        sim = self.sim
        sc = self.cfg.stations
        rec = self.last_rec
        n = self.n_env * sim.n_station
        load = np.zeros(n)
        if rec is not None:
            load = np.bincount(sim.station[rec["idx"]], np.maximum(rec["p_ev_kw"], 0.0), n) / sc.p_max_kw
        price_now = sim.retail_price()  # (E, Z)
        return np.column_stack([vm[:, sim.station_bus].ravel(), price_now[:, sim.station_zone].ravel(),
                                np.broadcast_to(period, (n, 3)), np.full(n, np.sin(clock)), np.full(n, np.cos(clock)),
                                load, plugged_st / sc.ports, np.full(n, time_left)])

    def _ev_features(self, out: np.ndarray, rows: npt.NDArray[np.int64], idx: npt.NDArray[np.int64],
                     vm: np.ndarray) -> None:
        """Write sessions ``idx``'s EV_FEATURES into ``out[rows]`` (float32, (n, len(EV_FEATURES)))."""
        sim = self.sim
        s = sim.s
        t_next = min(sim.t + 1, sim.n_steps - 1)
        valley = float(sim.period[min(sim.t, sim.n_steps - 1)] == VALLEY)
        _ev_feature_rows(out, rows, idx, sim.env, sim.station, sim.n_station, sim.station_bus, sim.zone_of_bus,
                         sim.soc, s.soc_target, s.cap_kwh, sim.dep_step, s.p_ch_max_kw, s.p_dis_max_kw, s.eta_ch,
                         s.v2g, sim.started, sim.retail_price(), sim.prices.next,
                         _tariff_prices(self.cfg)[sim.period[t_next]], vm, sim.t, sim.dt_h,
                         bool(self.cfg.fleet.uninterruptible), valley)

    # ------------------------------------------------------------------ rewards

    def _rewards(self, rec: dict, need_before: npt.NDArray[np.float64]) -> list[dict[str, float]]:
        sim = self.sim
        w = self.cfg.reward
        dt = sim.dt_h
        E, n_st = self.n_env, sim.n_station
        out: list[dict[str, float]] = [{} for _ in range(E)]
        idx = rec["idx"]
        # energy the step brought each EV towards its target (negative when discharge took it further away);
        # over a stay it sums to (need on arrival - need at departure), so paying it per step is the unmet
        # penalty at departure plus a constant, with the credit on the steps that cause it
        progress = need_before - sim._need_kwh(idx)
        ev_r = -(w.ev_cost * rec["ev_cost"] + w.ev_throughput_per_kwh * rec["e_batt_kwh"]
                 + w.curtail_per_kwh * rec["cut_ev_kw"] * dt) + w.ev_unmet_per_kwh * progress
        view = self.cfg.agents.ev_view
        if view == "individual":
            for e, rows in enumerate(self._env_runs(idx)):
                out[e].update((f"ev_{k}", r) for k, r in zip(sim.ev_index[idx[rows]], ev_r[rows]))
        elif view == "grouped":
            per = np.bincount(sim.station[idx], ev_r, E * n_st).reshape(E, n_st)
            for e in range(E):
                out[e].update((f"evs_{j}", per[e, j]) for j in range(n_st))
        if self._stns:
            st_idx = sim.station[idx]
            # a station's EVs all pay its zone's price: the price times the energy they drew
            charge_kwh = np.bincount(st_idx, np.maximum(rec["p_ev_kw"], 0.0), E * n_st).reshape(E, n_st) * dt
            cost = charge_kwh * rec["price_zone"][:, sim.station_zone]
            norm_cost = cost / (self.cfg.stations.p_max_kw * dt * self._max_price)
            loads = rec["feeder_load_kw"] if len(sim.feeders) > 1 else rec["zone_load_kw"] / sim.zone_nominal_kw
            hi = np.max(np.abs(loads), axis=1)
            spread = loads.max(axis=1) - loads.min(axis=1)
            disparity = np.divide(spread, hi, out=np.zeros(E), where=hi > 0)  # (E,)
            curt = np.bincount(st_idx, rec["cut_ev_kw"] * dt, E * n_st).reshape(E, n_st)
            st_progress = np.bincount(st_idx, progress, E * n_st).reshape(E, n_st)
            r = -(w.station_w1 * norm_cost + w.station_w2 * disparity[:, None]) - w.curtail_per_kwh * curt \
                + w.station_unmet_per_kwh * st_progress
            for e in range(E):
                out[e].update(zip(self._stns, r[e]))
        if self._ops:
            c = rec["zone_costs"]
            profit = rec["zone_ev_revenue"] - c["total"]
            dev = (rec["zone_load_kw"] - rec["zone_mean_load_kw"]) / sim.zone_nominal_kw
            r = w.operator_profit * profit / 1000.0 - w.operator_peak_valley * dev ** 2 \
                - w.operator_violation * rec["zone_violations"]
            for e in range(E):
                out[e].update(zip(self._ops, r[e]))
        return out


class EVGridEnv(ParallelEnv, EzPickle):
    """Multi-agent EV charging on a distribution feeder with a per-step power flow.

    ## Description
    Zone operators set retail price multipliers (announced one interval
    ahead), charging stations share their connection limit among plugged EVs,
    and EVs choose to charge, idle or discharge (V2G) at a power level.  Each
    step solves an AC power flow of the feeder (a compiled batched sweep,
    pandapower as reference) and, where a bus voltage falls below ``v_min`` or
    a line exceeds its rating, curtails EV charging (or raises V2G) until the
    limits hold (:mod:`evgrid.grid.limits`).  The simulator is
    :class:`evgrid.envs.sim.Sim`; this class only maps agents to its arrays.

    ## Agents
    Each level is ``learned`` (agents below) or ``rule`` (a controller inside
    the env), set in ``agents``:

    * ``operator_<k>``: one per zone.
    * ``station_<j>``: one per charging station.
    * EV view ``individual``: ``ev_<k>``, the k-th EV to plug in this episode;
      it appears when it plugs in, is terminated when it leaves and never
      returns.  ``possible_agents`` holds ``fleet.n_ev`` of them.
    * EV view ``grouped``: ``evs_<j>``, one per station, carrying its EVs as a
      padded set of ``ev_slots`` slots (an EV keeps its slot while plugged).
    * EV view ``rule``: EVs follow ``agents.ev_rule``.

    ## Action Space
    * operator: ``Box(multiplier_min, multiplier_max, (1,))`` price multiplier
      for the next step, or ``Discrete(len(price_levels))`` with
      ``operator_action: level``.
    * station: ``Discrete(len(fraction_levels))``: its power limit as a share
      of ``p_max_kw`` (dispatch ``equal``), the share of its EVs that may
      charge (``llf``), or each EV's power level (``cap``).
    * ev: ``Dict(mode=Discrete(3), power=Box(0, 1, (1,)))``; mode 0 charge,
      1 idle, 2 discharge; power is a fraction of the charger's limit.
      Physical bounds always hold: a full battery does not charge, a non-V2G
      EV does not discharge (the action becomes idle).
    * evs (grouped): ``Dict(mode=MultiDiscrete([3] * slots), power=Box(0, 1, (slots,)))``;
      empty slots are ignored.

    ## Observation Space
    operator, ``Box(14,)`` float32:

    | index | name | unit | range |
    |---|---|---|---|
    | 0 | zone_load_pu | zone net load / zone nominal load, last step | (-inf, inf) |
    | 1 | zone_pv_pu | zone PV output / zone nominal load, this step | [0, inf) |
    | 2 | zone_wind_pu | zone wind output / zone nominal load, this step | [0, inf) |
    | 3 | multiplier_now | price multiplier in effect | [min, max] |
    | 4 | multiplier_next | multiplier announced for the next step | [min, max] |
    | 5-7 | valley, offpeak, peak | tariff period one-hot | {0, 1} |
    | 8-9 | clock_sin, clock_cos | time of day | [-1, 1] |
    | 10 | zone_v_min_pu | lowest bus voltage in the zone, last step (1 before the first) | [0, 2] |
    | 11 | plugged_share | plugged EVs / zone ports | [0, 1] |
    | 12 | need_h | EV energy still needed in the zone / zone nominal load | hours, [0, inf) |
    | 13 | time_left | share of the episode left | [0, 1] |

    station, ``Box((c_max+1)(e_max+1) + 10,)``: seed 002's count matrix
    ``N[c, e]`` per port (flattened, c = remaining charge slots, e = remaining
    parking slots, the last row/column collecting larger values), then
    ``bus_vm_pu``, ``price_now`` (per kWh), tariff period one-hot,
    ``clock_sin``, ``clock_cos``, ``load_share`` (charging power / limit, last
    step), ``plugged_share`` (EVs / ports), ``time_left``.

    ev, ``Box(13,)``: ``soc``, ``soc_target``, ``need_share`` (missing energy
    / capacity), ``hours_left_per_day`` (time to departure / 24 h),
    ``p_ch_max_per_50kw``, ``p_dis_max_per_50kw``, ``v2g`` (0/1),
    ``price_now``, ``price_next`` (per kWh), ``bus_vm_pu`` (last step),
    ``laxity`` (remaining charge slots / remaining parking slots),
    ``uninterruptible_on`` (0/1: charging can no longer stop), ``valley`` (0/1:
    the tariff's valley period now).

    evs (grouped): ``Dict(evs=Box(slots, 13), mask=Box(0, 1, (slots,)),
    context=Box(10,))``; ``mask`` is 1 where a slot holds an EV, ``context``
    the station context above.

    ## Rewards
    Weights in ``reward`` (:class:`evgrid.envs.config.RewardConfig`).

    * ev: ``-ev_cost * cost - ev_throughput_per_kwh * battery kWh -
      curtail_per_kwh * curtailed kWh + ev_unmet_per_kwh * progress``, where
      progress is the step's reduction of the energy still missing to the
      target.  Summed over a stay, the progress term is ``-ev_unmet_per_kwh *
      kWh short at departure`` plus a constant (the need on arrival): the
      unmet-energy penalty, paid on the steps that cause it.
    * evs (grouped): the sum over its slots.
    * station: ``-(station_w1 * price cost / (p_max dt max price) +
      station_w2 * load disparity)`` (seed 002; disparity = (max − min) /
      max of network loads, zones on a single feeder) minus its EVs'
      curtailment penalty, plus ``station_unmet_per_kwh`` times its EVs'
      progress (the unmet-energy penalty in the same per-step form).
    * operator: ``operator_profit * (EV revenue − purchase − diesel − carbon
      − curtailment cost) / 1000 − operator_peak_valley * ((zone load − its
      episode mean) / zone nominal)^2 − operator_violation * bus-steps outside
      voltage limits in the zone``, counted on the power flow of the step's
      dispatch before enforcement corrects it.

    ## Starting State
    ``reset(seed)`` draws the day's sessions, base load, PV and wind from
    child generators of ``seed`` and plugs in the EVs that arrive in the first
    step.

    ## Episode End
    Truncation after ``n_steps`` steps (one day by default) for every agent;
    an EV agent is terminated when its EV leaves.

    ## Arguments
    ``EVGridEnv(config=None, powerflow=None, **overrides)``: ``config`` an
    :class:`EnvConfig`, a YAML path or a mapping; overrides are config fields
    as nested mappings (``fleet={"n_ev": 500}``), ``section__field=value``
    keywords, or the shortcut ``ev_view=...``; ``powerflow`` the solver
    service (default: in-process, :class:`evgrid.envs.sim.LocalGrid`).
    :class:`EVGridVectorEnv` runs several of these in lock-step with one
    batched power flow per step.

    ## Version History
    * v0: initial version.
    """

    metadata = {"name": "EVGrid-v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, config: Any = None, powerflow: sm.GridService | None = None, **overrides: Any) -> None:
        EzPickle.__init__(self, config, None, **overrides)
        self.vec = EVGridVectorEnv(config, 1, powerflow, **overrides)
        self.cfg = self.vec.cfg
        self.sim = self.vec.sim
        self.possible_agents = self.vec.possible_agents
        self.render_mode = None

    @property
    def agents(self) -> list[str]:
        return self.vec.agents[0]

    @property
    def last_rec(self) -> dict | None:
        """The simulator's record of the last step (None right after ``reset``)."""
        return self.vec.last_rec

    def observation_space(self, agent: str) -> gymnasium.Space:
        return self.vec.observation_space(agent)  # memoised there: the same object every call

    def action_space(self, agent: str) -> gymnasium.Space:
        return self.vec.action_space(agent)

    def reset(self, seed: int | None = None, options: dict | None = None):
        obs, infos = self.vec.reset(seed, options)
        return obs[0], infos[0]

    def step(self, actions: dict[str, Any]):
        obs, rew, term, trunc, info = self.vec.step([actions])
        return obs[0], rew[0], term[0], trunc[0], info[0]

    def state(self) -> npt.NDArray[np.float32]:
        """Global state for centralised critics: bus voltages, line loadings, zone loads, prices, time."""
        return self.vec.state(0)

    def close(self) -> None:
        self.vec.close()


# ---------------------------------------------------------------------- action decoding helpers


@nb.njit(cache=True, nogil=True)
def _ev_feature_rows(out, rows, idx, env_of, station_of, n_station, station_bus, zone_of_bus, soc, soc_target, cap_kwh,
                     dep_step, p_ch_max_kw, p_dis_max_kw, eta_ch, v2g, started, price_now, price_next, next_factor, vm,
                     t, dt_h, uninterruptible, valley):  # pragma: no cover (compiled)
    """EV_FEATURES of sessions ``idx`` into ``out[rows]``: one pass instead of ~30 numpy gathers over the fleet
    (the observation was a third of the grouped view's env step).  Same formulas as ``Sim._need_kwh`` and
    ``stations.charge_slots``."""
    for k in range(idx.shape[0]):
        i = idx[k]
        r = rows[k]
        e = env_of[i]
        bus = station_bus[station_of[i] % n_station]
        z = zone_of_bus[bus]
        need = max(soc_target[i] - soc[i], 0.0) * cap_kwh[i]
        c = np.ceil(max(need, 0.0) / max(p_ch_max_kw[i] * eta_ch[i] * dt_h, 1e-12) - 1e-9)
        left = dep_step[i] - t
        out[r, 0] = soc[i]
        out[r, 1] = soc_target[i]
        out[r, 2] = need / cap_kwh[i]
        out[r, 3] = left * dt_h / 24.0
        out[r, 4] = p_ch_max_kw[i] / 50.0
        out[r, 5] = p_dis_max_kw[i] / 50.0
        out[r, 6] = 1.0 if v2g[i] else 0.0
        out[r, 7] = price_now[e, z]
        out[r, 8] = price_next[e, z] * next_factor
        out[r, 9] = vm[e, bus]
        out[r, 10] = c / max(left, 1)
        out[r, 11] = 1.0 if (started[i] and uninterruptible) else 0.0
        out[r, 12] = valley


def _tariff_prices(cfg: EnvConfig) -> tuple[float, float, float]:
    t = cfg.market.tariff
    return (t.valley_price_per_kwh, t.offpeak_price_per_kwh, t.peak_price_per_kwh)


def _int_action(a: Any, agent: str, n: int) -> int:
    v = np.asarray(a)
    if v.size != 1 or not np.issubdtype(v.dtype, np.integer) or not 0 <= int(v.reshape(())) < n:
        raise ValueError(f"actions[{agent!r}]: expected an integer in [0, {n - 1}], got {a!r}")
    return int(v.reshape(()))


def _box_scalar(a: Any, agent: str, lo: float, hi: float) -> float:
    v = np.asarray(a, dtype=float).reshape(-1)
    if v.size != 1 or not np.isfinite(v[0]) or not lo - 1e-6 <= v[0] <= hi + 1e-6:
        raise ValueError(f"actions[{agent!r}]: expected one finite multiplier in [{lo}, {hi}], got {a!r}")
    return float(min(max(v[0], lo), hi))  # float32 rounding of the bounds only


def _ev_action(a: Any, agent: str) -> tuple[int, float]:
    try:
        mode, power = a["mode"], a["power"]
    except (TypeError, KeyError, IndexError):
        raise ValueError(f"actions[{agent!r}]: expected {{'mode': 0|1|2, 'power': [fraction]}}, got {a!r}") from None
    m = _int_action(mode, f"{agent}.mode", 3)
    p = np.asarray(power, dtype=float).reshape(-1)
    if p.size != 1 or not np.isfinite(p[0]) or not 0.0 <= p[0] <= 1.0:
        raise ValueError(f"actions[{agent!r}]['power']: expected one finite fraction in [0, 1], got {power!r}")
    return m, float(p[0])


def _grouped_action(a: Any, agent: str, slots: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        mode, power = np.asarray(a["mode"]), np.asarray(a["power"], dtype=float)
    except (TypeError, KeyError, IndexError):
        raise ValueError(f"actions[{agent!r}]: expected {{'mode': [{slots}] ints, 'power': [{slots}] fractions}}, "
                         f"got {type(a).__name__}") from None
    if mode.shape != (slots,) or not np.issubdtype(mode.dtype, np.integer) or mode.min() < 0 or mode.max() > 2:
        raise ValueError(f"actions[{agent!r}]['mode']: expected {slots} integers in [0, 2], got shape {mode.shape}")
    if power.shape != (slots,) or not np.isfinite(power).all() or power.min() < 0 or power.max() > 1:
        raise ValueError(f"actions[{agent!r}]['power']: expected {slots} finite fractions in [0, 1]")
    return mode, power
