"""EVGrid-v0: zone operators, charging stations and EVs on a live feeder (PettingZoo ParallelEnv)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import gymnasium
import numpy as np
import numpy.typing as npt
from gymnasium import spaces
from gymnasium.utils import EzPickle
from pettingzoo import ParallelEnv

from evgrid.config import ConfigError
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

    ## Version History
    * v0: initial version.
    """

    metadata = {"name": "EVGrid-v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, config: Any = None, powerflow: sm.GridService | None = None, **overrides: Any) -> None:
        EzPickle.__init__(self, config, None, **overrides)
        self.cfg = cfg = load_config(config, _keyword_overrides(overrides))
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
        self.sim = sm.Sim(cfg, 1, grid=powerflow)
        sim = self.sim
        ops = [f"operator_{k}" for k in range(sim.n_zone)] if a.operator == "learned" else []
        stns = [f"station_{j}" for j in range(sim.n_station)] if a.station == "learned" else []
        if a.ev_view == "individual":
            evs = [f"ev_{k}" for k in range(cfg.fleet.n_ev)]
        elif a.ev_view == "grouped":
            evs = [f"evs_{j}" for j in range(sim.n_station)]
        else:
            evs = []
        self.possible_agents = ops + stns + evs
        self.agents: list[str] = []
        self._ops, self._stns = ops, stns
        self.render_mode = None
        self._mult_lo = cfg.market.price_multiplier_min
        self._mult_hi = cfg.market.price_multiplier_max
        self._max_price = max(cfg.market.tariff.peak_price_per_kwh, cfg.market.tariff.offpeak_price_per_kwh,
                              cfg.market.tariff.valley_price_per_kwh) * self._mult_hi
        self._ports_zone = np.maximum(np.bincount(sim.station_zone, minlength=sim.n_zone) * cfg.stations.ports, 1)
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

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is None and not hasattr(self, "_next_seed"):
            seed = self.cfg.seed
        if seed is None:
            seed = self._next_seed
        self._next_seed = seed + 1  # a reset without a seed continues the sequence
        self.sim.reset(seed)
        n_st = self.sim.n_station
        self._slot_owner = np.full((n_st, self.slots), -1, dtype=np.int64)
        self._slot_of = np.full(self.sim.s.n, -1, dtype=np.int64)
        self._assign_slots()
        self._last_rec = None
        self.agents = self._live_agents()
        if self._log is not None:
            self._log.start(self.sim.episode)
        obs = self._observations(self.agents)
        return obs, {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("step: the episode is over; call reset()")
        sim = self.sim
        act = self._decode(actions)
        plugged_before = sim.plugged()
        need_before = sim._need_kwh(plugged_before)
        rec = sim.step(act)
        self._last_rec = rec
        if self._log is not None:
            self._log.add_step(rec)
        rewards = self._rewards(rec, need_before)
        truncate = sim.t >= sim.n_steps
        gone = set()
        if self.cfg.agents.ev_view == "individual":
            left = plugged_before[sim.status[plugged_before] != sm.PLUGGED]
            gone = {f"ev_{k}" for k in sim.ev_index[left]}
        self._free_slots(plugged_before)
        if not truncate:
            self._assign_slots()
        live_next = [] if truncate else self._live_agents()
        reported = list(dict.fromkeys(self.agents + live_next))
        obs = self._observations(reported)
        terminated = {a: a in gone for a in reported}
        truncated = {a: truncate for a in reported}
        rew = {a: float(rewards.get(a, 0.0)) for a in reported}
        info = {a: {} for a in reported}
        self.agents = live_next
        if truncate and self._log is not None:
            self._log.end_episode()
        return obs, rew, terminated, truncated, info

    def state(self) -> npt.NDArray[np.float32]:
        """Global state for centralised critics: bus voltages, line loadings, zone loads, prices, time."""
        sim = self.sim
        rec = self._last_rec
        n_branch = sum(f.n_line + f.n_trafo for f in sim.feeders)
        vm = rec["vm_pu"][0] if rec is not None else np.ones(sim.n_bus)
        loading = rec["line_loading"][0] if rec is not None else np.zeros(n_branch)
        zl = rec["zone_load_kw"][0] / sim.zone_nominal_kw if rec is not None else np.zeros(sim.n_zone)
        t = min(sim.t, sim.n_steps - 1)
        clock = 2 * np.pi * sim.clock_h[t] / 24
        return np.concatenate([vm, np.nan_to_num(loading), zl, sim.prices.current[0], sim.prices.next[0],
                               np.eye(3)[sim.period[t]], [np.sin(clock), np.cos(clock)]]).astype(np.float32)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    # ------------------------------------------------------------------ agents and slots

    def _live_agents(self) -> list[str]:
        agents = self._ops + self._stns
        view = self.cfg.agents.ev_view
        if view == "individual":
            agents = agents + [f"ev_{k}" for k in self.sim.ev_index[self.sim.plugged()]]
        elif view == "grouped":
            agents = agents + [f"evs_{j}" for j in range(self.sim.n_station)]
        return agents

    def _assign_slots(self) -> None:
        """Give each newly plugged EV the lowest free slot of its station."""
        sim = self.sim
        idx = sim.plugged()
        new = idx[self._slot_of[idx] < 0]
        if new.size == 0 or self.cfg.agents.ev_view != "grouped":
            return
        stn = sim.station[new]  # single env: global station == local
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

    def _decode(self, actions: dict[str, Any]) -> sm.SimActions:
        sim = self.sim
        cfg = self.cfg
        unknown = [a for a in actions if a not in self.agents]
        if unknown:
            raise ValueError(f"actions: {unknown[0]!r} is not a live agent")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"actions: no action for live agent {missing[0]!r}")
        act = sm.SimActions()
        if self._ops:
            if cfg.agents.operator_action == "level":
                lv = np.array([_int_action(actions[a], a, len(cfg.market.price_levels)) for a in self._ops])
                mult = np.asarray(cfg.market.price_levels, dtype=float)[lv]
            else:
                mult = np.array([_box_scalar(actions[a], a, self._mult_lo, self._mult_hi) for a in self._ops])
            act.price_multiplier = mult[None, :]
        if self._stns:
            lv = np.array([_int_action(actions[a], a, len(cfg.stations.fraction_levels)) for a in self._stns])
            act.station_fraction = np.asarray(cfg.stations.fraction_levels, dtype=float)[lv]
        view = cfg.agents.ev_view
        if view == "individual":
            idx = sim.plugged()
            names = [f"ev_{k}" for k in sim.ev_index[idx]]
            mode = np.empty(idx.size, dtype=np.int64)
            power = np.empty(idx.size)
            for i, a in enumerate(names):
                mode[i], power[i] = _ev_action(actions[a], a)
            act.ev_mode = np.full(sim.s.n, sm.IDLE, dtype=np.int64)
            act.ev_power = np.zeros(sim.s.n)
            act.ev_mode[idx] = mode
            act.ev_power[idx] = power
        elif view == "grouped":
            n_st = sim.n_station
            mode = np.empty((n_st, self.slots), dtype=np.int64)
            power = np.empty((n_st, self.slots))
            for j in range(n_st):
                a = f"evs_{j}"
                mode[j], power[j] = _grouped_action(actions[a], a, self.slots)
            owner = self._slot_owner
            occ = owner >= 0
            act.ev_mode = np.full(sim.s.n, sm.IDLE, dtype=np.int64)
            act.ev_power = np.zeros(sim.s.n)
            act.ev_mode[owner[occ]] = mode[occ]
            act.ev_power[owner[occ]] = power[occ]
        return act

    # ------------------------------------------------------------------ observations

    def _observations(self, agents: list[str]) -> dict[str, Any]:
        if not agents:
            return {}
        sim = self.sim
        out: dict[str, Any] = {}
        t = min(sim.t, sim.n_steps - 1)
        clock = 2 * np.pi * sim.clock_h[t] / 24
        period = np.eye(3)[sim.period[t]]
        time_left = (sim.n_steps - sim.t) / sim.n_steps
        rec = self._last_rec
        vm = rec["vm_pu"][0] if rec is not None else np.ones(sim.n_bus)
        price_now = sim.retail_price()[0]  # (Z,)
        idx = sim.plugged()
        if self._ops:
            out.update(self._operator_obs(idx, rec, vm, period, clock, time_left))
        ctx = None
        if self._stns or self.cfg.agents.ev_view == "grouped":
            ctx = self._station_context(idx, vm, price_now, period, clock, time_left)
        if self._stns:
            c, e = sim.slots(idx)
            sc = self.cfg.stations
            n = sm.st.count_matrix(c, e, sim.station[idx], sim.n_station, sc.c_max, sc.e_max) / sc.ports
            flat = np.concatenate([n.reshape(sim.n_station, -1), ctx], axis=1).astype(np.float32)
            for j, a in enumerate(self._stns):
                out[a] = flat[j]
        view = self.cfg.agents.ev_view
        if view == "individual":
            feats = self._ev_features(idx, vm).astype(np.float32)
            want = {a for a in agents if a.startswith("ev_")}
            for k, row in zip(sim.ev_index[idx], feats):
                name = f"ev_{k}"
                if name in want:
                    out[name] = row
            # EVs that just left: their last observation (the state they left in)
            zero = np.zeros(len(EV_FEATURES), np.float32)
            for a in want - out.keys():
                out[a] = zero
        elif view == "grouped":
            feats = np.zeros((sim.n_station, self.slots, len(EV_FEATURES)), np.float32)
            owner = self._slot_owner
            occ = owner >= 0
            if occ.any():
                rows = owner[occ]
                pos = np.searchsorted(idx, rows)
                feats[occ] = self._ev_features(idx, vm)[pos]
            mask = occ.astype(np.float32)
            for j in range(sim.n_station):
                out[f"evs_{j}"] = {"evs": feats[j], "mask": mask[j], "context": ctx[j].astype(np.float32)}
        return {a: out[a] for a in agents}

    def _operator_obs(self, idx, rec, vm, period, clock, time_left) -> dict[str, np.ndarray]:
        sim = self.sim
        t = min(sim.t, sim.n_steps - 1)
        nom = sim.zone_nominal_kw
        zl = rec["zone_load_kw"][0] / nom if rec is not None else np.zeros(sim.n_zone)
        pv = np.zeros(sim.n_zone)
        wind = np.zeros(sim.n_zone)
        for arr, kind, pu in ((pv, "pv", sim.pv_pu), (wind, "wind", sim.wind_pu)):
            b, p = sim.der[kind]
            np.add.at(arr, sim.zone_of_bus[b], p * pu[0, t])
        vmin = np.full(sim.n_zone, np.inf)
        np.minimum.at(vmin, sim.zone_of_bus, np.nan_to_num(vm, nan=0.0))
        zone = sim.zone_of_bus[sim.station_bus[sim.station[idx]]]
        plugged = np.bincount(zone, minlength=sim.n_zone) / self._ports_zone
        need = np.bincount(zone, sim._need_kwh(idx), sim.n_zone) / nom
        feats = np.column_stack([zl, pv / nom, wind / nom, sim.prices.current[0], sim.prices.next[0],
                                 np.broadcast_to(period, (sim.n_zone, 3)), np.full(sim.n_zone, np.sin(clock)),
                                 np.full(sim.n_zone, np.cos(clock)), vmin, plugged, need,
                                 np.full(sim.n_zone, time_left)]).astype(np.float32)
        return {a: feats[k] for k, a in enumerate(self._ops)}

    def _station_context(self, idx, vm, price_now, period, clock, time_left) -> np.ndarray:
        sim = self.sim
        sc = self.cfg.stations
        rec = self._last_rec
        stn = sim.station[idx]
        load = np.zeros(sim.n_station)
        if rec is not None:
            load = np.bincount(sim.station[rec["idx"]], np.maximum(rec["p_ev_kw"], 0.0), sim.n_station) / sc.p_max_kw
        n = sim.n_station
        return np.column_stack([vm[sim.station_bus], price_now[sim.station_zone], np.broadcast_to(period, (n, 3)),
                                np.full(n, np.sin(clock)), np.full(n, np.cos(clock)), load,
                                np.bincount(stn, minlength=n) / sc.ports, np.full(n, time_left)])

    def _ev_features(self, idx, vm) -> np.ndarray:
        sim = self.sim
        s = sim.s
        stn = sim.station[idx]
        bus = sim.station_bus[stn]
        zone = sim.zone_of_bus[bus]
        c, e = sim.slots(idx)
        t_next = min(sim.t + 1, sim.n_steps - 1)
        price_next = (sim.prices.next[0][zone] * np.asarray(_tariff_prices(self.cfg))[sim.period[t_next]])
        unint = sim.started[idx] & self.cfg.fleet.uninterruptible
        return np.column_stack([
            sim.soc[idx], s.soc_target[idx], sim._need_kwh(idx) / s.cap_kwh[idx],
            (sim.dep_step[idx] - sim.t) * sim.dt_h / 24.0, s.p_ch_max_kw[idx] / 50.0, s.p_dis_max_kw[idx] / 50.0,
            s.v2g[idx].astype(float), sim.retail_price()[0][zone], price_next, vm[bus],
            c / np.maximum(e, 1), unint.astype(float), np.full(idx.size, float(sim.period[min(sim.t, sim.n_steps - 1)] == VALLEY))])

    # ------------------------------------------------------------------ rewards

    def _rewards(self, rec: dict, need_before: npt.NDArray[np.float64]) -> dict[str, float]:
        sim = self.sim
        w = self.cfg.reward
        dt = sim.dt_h
        out: dict[str, float] = {}
        idx = rec["idx"]
        # energy the step brought each EV towards its target (negative when discharge took it further away);
        # over a stay it sums to (need on arrival - need at departure), so paying it per step is the unmet
        # penalty at departure plus a constant, with the credit on the steps that cause it
        progress = need_before - sim._need_kwh(idx)
        ev_r = -(w.ev_cost * rec["ev_cost"] + w.ev_throughput_per_kwh * rec["e_batt_kwh"]
                 + w.curtail_per_kwh * rec["cut_ev_kw"] * dt) + w.ev_unmet_per_kwh * progress
        view = self.cfg.agents.ev_view
        if view == "individual":
            for k, r in zip(sim.ev_index[idx], ev_r):
                out[f"ev_{k}"] = r
        elif view == "grouped":
            per = np.bincount(sim.station[idx], ev_r, sim.n_station)
            for j in range(sim.n_station):
                out[f"evs_{j}"] = per[j]
        if self._stns:
            st_idx = sim.station[idx]
            charge_e = np.maximum(rec["p_ev_kw"], 0.0) * dt
            price = rec["price_zone"][0][sim.zone_of_bus[sim.station_bus[st_idx]]]
            cost = np.bincount(st_idx, charge_e * price, sim.n_station)
            norm_cost = cost / (self.cfg.stations.p_max_kw * dt * self._max_price)
            loads = rec["feeder_load_kw"][0] if len(sim.feeders) > 1 else rec["zone_load_kw"][0] / sim.zone_nominal_kw
            hi = np.max(np.abs(loads))
            disparity = (loads.max() - loads.min()) / hi if hi > 0 else 0.0
            curt = np.bincount(st_idx, rec["cut_ev_kw"] * dt, sim.n_station)
            st_progress = np.bincount(st_idx, progress, sim.n_station)
            r = -(w.station_w1 * norm_cost + w.station_w2 * disparity) - w.curtail_per_kwh * curt \
                + w.station_unmet_per_kwh * st_progress
            for j, a in enumerate(self._stns):
                out[a] = r[j]
        if self._ops:
            c = rec["zone_costs"]
            profit = rec["zone_ev_revenue"][0] - c["total"][0]
            dev = (rec["zone_load_kw"][0] - rec["zone_mean_load_kw"][0]) / sim.zone_nominal_kw
            r = w.operator_profit * profit / 1000.0 - w.operator_peak_valley * dev ** 2 \
                - w.operator_violation * rec["zone_violations"][0]
            for k, a in enumerate(self._ops):
                out[a] = r[k]
        return out


# ---------------------------------------------------------------------- action decoding helpers


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


def _keyword_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    """``ev_view=...`` and ``section__field=value`` keywords as a nested override mapping."""
    out: dict[str, Any] = {}
    for key, value in kw.items():
        if key == "ev_view":
            out.setdefault("agents", {})["ev_view"] = value
            continue
        parts = key.split("__")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out
