"""EVStartTime-v0: seed 001's two-stage charging scheduling of household EVs over the valley (22:00-08:00).

Stage 1 (:func:`solve_stage1`, the DSO): the LinDistFlow OPF of :mod:`evgrid.grid.opf` over the valley
minimises the squared deviation of the tie-line power from the flat target of eqs 6-8
(:func:`evgrid.grid.opf.flat_target_kw`, eq 9) under voltage and ampacity limits (eqs 11-12) and each
station's ramp limit (eq 10).  Its output is each charging station's optimal profile ``P*_i(t)``.

Stage 2 (:class:`StartTimeEnv`, the aggregator): EVs arrive one by one in arrival order (eqs 13-16).  An
adjustable EV gets a start slot in ``[max(arrival, valley start), departure - duration]`` (eq 16) and then
charges without a break at its charger's power until its energy is in; a non-adjustable EV (duration longer
than its stay) starts on arrival and leaves short.  The session draw, the base load and the feeder are the
project's own for the config and seed (:func:`evgrid.envs.state.draw_day`, ``fleet.household_valley`` with
``station_counts``), so the simulator, the oracle and this environment see the same EVs and loads.

Design choices (the paper's equations survive only as numbers; these are our readings):

* **One agent, ``aggregator_0``** (the paper's "aggregator control center"): eqs 18-23 define one sequential
  MDP whose k-th step is the k-th EV, whichever station it plugs into, and eq 21's per-node coefficient exists
  precisely so that one agent's rewards are comparable across nodes with 179, 225 and 146 EVs.  A station per
  agent would be turn-based (one station acts per step), which PettingZoo's parallel API cannot express
  without dummy actions for the idle stations.  Per-node returns are reported separately (:class:`EpisodeResult`).
* **Deviation (eq 21)**: ``D_i^k = sum_t |P*_i(t) - P_i^k(t)|`` over the valley slots, kW summed over slots,
  ``P_i^k`` the scheduled profile of node i after the first k EVs (eq 17).  The absolute deviation makes eqs
  22-23 exact: the total reward of a node is ``lambda_i (D_i^0 - D_i^K)``, at most ``lambda_i sum_t P*_i(t)``.
* **Reward (eq 20)**: ``r_k = lambda_i (D_i^{k-1} - D_i^k) - lambda_i w_unmet E_unmet,k / dt``, the second term
  our reading of the penalty for unmet demand (grid-side kWh an EV leaves without, per slot length, so an
  unmet kWh costs what a kWh placed on the optimal profile earns at ``w_unmet = 1``).
* **Normaliser (eqs 22-23)**: ``lambda_i = C / sum_t P*_i(t)`` with ``C = reward_scale = 1000`` (the number
  in the paper's PPO table, our reading): a perfect schedule of node i totals ``C``.
* **Time grid**: slots of ``dt_min``; an EV can start at the first slot boundary at or after its arrival; the
  last slot of a block carries the remainder of its energy at a lower mean power (a constant-power block that
  ends inside the slot), so every block delivers exactly the EV's need.
* **EVs whose duration fits their stay but not the valley** (a slow charger, a low SOC) have no start inside
  the valley; they start at ``departure - duration`` (the least charging before the valley that still meets
  the demand, eq 16's cost side).  Like non-adjustable EVs they are scheduled without an action (ours).
* **Actions**: ``Discrete(n_slots)``, the start slot relative to the valley start, with an action mask in the
  observation (DQN needs a discrete space).  A masked action is moved to the nearest valid slot (documented
  and counted in ``info``); an action outside the space is a ValueError.

RLlib: the agent set is fixed (one agent from reset to the end), so RLlib's own
``ray.rllib.env.wrappers.pettingzoo_env.ParallelPettingZooEnv`` wraps this env unchanged; the ``Dict``
observation with ``observations`` and ``action_mask`` is what RLlib's action-masking modules read.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import gymnasium
import numpy as np
import numpy.typing as npt
from gymnasium import spaces
from gymnasium.utils import EzPickle
from pettingzoo import ParallelEnv

from evgrid.config import ConfigError, from_dict, keyword_overrides, to_dict
from evgrid.envs import fleet as fl
from evgrid.envs.config import EnvConfig, load_config
from evgrid.envs.state import build_layout, draw_day
from evgrid.envs.views.features import Feature, FeatureSet
from evgrid.grid import opf
from evgrid.grid.feeders import Feeder
from evgrid.validate import check_choice, check_real

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
AGENT = "aggregator_0"
_EPS = 1e-9
_CACHE_DAYS = 64  # stage-1 solutions kept per process (a seed replayed for evaluation skips its OPF)
# (config, stage settings, seed) -> (Stage1, opf.Sessions), shared by every env of a process: a vectorised env
# runner's copies solve each training day once between them, not once each
_STAGE1_CACHE: OrderedDict[tuple[str, int], tuple] = OrderedDict()
UNSCHEDULED = np.iinfo(np.int64).min  # start slot of an EV not scheduled yet
OBSERVATIONS = ("paper", "scores")


@dataclass(frozen=True)
class StartTimeConfig:
    """Seed 001's stage settings beside the EnvConfig (``start_time=`` of :class:`StartTimeEnv`)."""

    valley_start_h: float = 22.0
    """Valley start, hours after midnight of the arrival day, [0, 24); a multiple of ``dt_min``."""
    valley_end_h: float = 32.0
    """Valley end, hours after midnight of the arrival day (32 = 08:00 next morning), (valley_start_h,
    valley_start_h + 24]; every EV must have left by then."""
    station_ramp_kw: float | None = 50.0
    """Stage 1 (eq 10): most a station's charging power may change between slots, kW per slot, >= 0; None: no
    limit.  The paper's value is lost (ours)."""
    reward_scale: float = 1000.0
    """C of eq 23: a node's total reward when its schedule meets its optimal profile exactly, (0, 1e9]."""
    unmet_weight: float = 1.0
    """Penalty per unmet kWh relative to the reward of a kWh placed on the optimal profile, [0, 1e6] (ours)."""
    ev_model: str = "sessions"
    """Stage-1 EV model: ``sessions`` (exact) or ``aggregate`` (one flexible load per station)."""
    observation: str = "paper"
    """``paper``: eqs 18-19; ``scores`` (ours): also, per start slot, how much closer starting there brings the
    station's schedule to its optimal profile (what the greedy baseline maximises), derived from the same
    profiles."""

    def __post_init__(self) -> None:
        check_real("valley_start_h", self.valley_start_h, 0.0, 24.0, hi_open=True)
        check_real("valley_end_h", self.valley_end_h, self.valley_start_h, self.valley_start_h + 24.0, lo_open=True)
        if self.station_ramp_kw is not None:
            check_real("station_ramp_kw", self.station_ramp_kw, 0.0, math.inf)
        check_real("reward_scale", self.reward_scale, 0.0, 1e9, lo_open=True)
        check_real("unmet_weight", self.unmet_weight, 0.0, 1e6)
        check_choice("ev_model", self.ev_model, opf.EV_MODELS)
        check_choice("observation", self.observation, OBSERVATIONS)


# ------------------------------------------------------------------------------------------- EV windows


@dataclass(frozen=True, eq=False)
class StartWindows:
    """Each EV of the day (n,), in arrival order; slots count from the valley start (negative: before it)."""

    station: IntArray  # station index 0..M-1
    arrive_slot: IntArray  # first slot boundary at or after the arrival
    depart_slot: IntArray  # departure (<= n_slots)
    dur_slots: IntArray  # slots the constant-power block spans (eq 13), the last one partial
    p_kw: FloatArray  # charger power, grid side
    last_kw: FloatArray  # mean grid-side power in the block's last slot (<= p_kw)
    need_kwh: FloatArray  # battery energy to the target SOC (eqs 14-15)
    cap_kwh: FloatArray
    eta: FloatArray  # charging efficiency
    earliest: IntArray  # adjustable EVs: earliest start, max(arrival, valley start)
    latest: IntArray  # adjustable EVs: latest start, departure - duration (eq 16)
    adjustable: npt.NDArray[np.bool_]  # the agent chooses its start
    auto_start: IntArray  # the others: arrival (duration > stay) or departure - duration (before the valley)

    @property
    def n(self) -> int:
        return int(self.station.shape[0])


def start_windows(sessions: fl.Sessions, valley_start_h: float, dt_h: float) -> StartWindows:
    """Slots, durations and start bounds of ``sessions`` (fleet sessions, station set) on the valley grid."""
    a = np.ceil((sessions.t_request_h - valley_start_h) / dt_h - _EPS).astype(np.int64)
    b = np.floor((sessions.t_depart_h - valley_start_h) / dt_h + _EPS).astype(np.int64)
    need = fl.need_kwh(sessions.soc0, sessions.soc_target, sessions.cap_kwh)
    per_slot = sessions.eta_ch * sessions.p_ch_max_kw * dt_h  # battery kWh of a full slot
    d = np.ceil(need / per_slot - _EPS).astype(np.int64)
    last_kw = np.where(d > 0, (need - (d - 1) * per_slot) / (sessions.eta_ch * dt_h), 0.0)
    earliest, latest = np.maximum(a, 0), b - d
    fits = d <= b - a  # eq 13-16: the block fits the stay; otherwise non-adjustable
    adjustable = fits & (d > 0) & (latest >= earliest)
    return StartWindows(station=sessions.station.astype(np.int64), arrive_slot=a, depart_slot=b, dur_slots=d,
                        p_kw=sessions.p_ch_max_kw, last_kw=last_kw, need_kwh=need, cap_kwh=sessions.cap_kwh,
                        eta=sessions.eta_ch, earliest=earliest, latest=latest, adjustable=adjustable,
                        auto_start=np.where(fits, latest, a))


def block_entries(start: IntArray, dur: IntArray, stop: IntArray, p_kw: FloatArray,
                  last_kw: FloatArray) -> tuple[IntArray, IntArray, FloatArray]:
    """Constant-power blocks as flat (block, slot, kW) entries: block j covers slots ``start[j]`` onwards for
    ``dur[j]`` slots at ``p_kw[j]``, the last at ``last_kw[j]``, cut at ``stop[j]`` (departure)."""
    n = np.clip(np.minimum(start + dur, stop) - start, 0, None)
    blk = np.repeat(np.arange(start.size), n)
    off = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    p = np.where(off == dur[blk] - 1, last_kw[blk], p_kw[blk])
    return blk, start[blk] + off, p


# ------------------------------------------------------------------------------------------------ stage 1


@dataclass(frozen=True, eq=False)
class Stage1:
    """Stage 1 of one day over the valley's T slots; tie-lines and voltages from the AC sweep."""

    p_opt_kw: FloatArray  # (M, T) each station's optimal charging profile
    p_orig_kw: FloatArray  # (M, T) each station's profile when every EV charges from plug-in (the TOU habit)
    tie_target_kw: FloatArray  # (T,) eqs 6-8
    tie_orig_kw: FloatArray  # (T,) base load + original charging + losses
    tie_opt_kw: FloatArray  # (T,) base load + optimal charging + losses
    vm_orig_pu: FloatArray  # (T, n_bus)
    vm_opt_pu: FloatArray  # (T, n_bus)
    objective: float  # eq 9, MW² summed over slots
    solve_s: float
    load_p_kw: FloatArray  # (T, n_bus) the day's base load over the valley, what every schedule adds to
    load_q_kvar: FloatArray  # (T, n_bus)


def solve_stage1(feeder: Feeder, load_p_kw: FloatArray, load_q_kvar: FloatArray, sessions: opf.Sessions,
                 dt_h: float, *, station_ramp_kw: float | None = None, ev_model: str = "sessions") -> Stage1:
    """Seed 001 stage 1: each station's optimal profile over ``load_*`` (T, n_bus) for ``sessions`` (with
    ``station`` set), tracking eqs 6-8's flat tie-line target (eq 9) under the network's limits and the
    stations' ramp limit (eq 10).  DER sites, if the feeder has any, produce nothing (seed 001's has none)."""
    from evgrid.grid.flow.sweep import SweepBackend

    t0 = time.perf_counter()
    T = load_p_kw.shape[0]
    n_st = int(sessions.station.max()) + 1 if sessions.n else 0
    hz = opf.Horizon(dt_h, load_p_kw, load_q_kvar, np.zeros((T, len(feeder.der_kind))))
    ev_kwh = float(((sessions.e_target_kwh - sessions.e0_kwh) / sessions.eta_ch).sum())  # grid side
    target = opf.flat_target_kw(load_p_kw.sum(axis=1), ev_kwh, dt_h)
    res = opf.solve_opf(feeder, hz, sessions, opf.Objective(tie_target_kw=target),
                        opf.OPFOptions(station_ramp_kw=station_ramp_kw, ev_model=ev_model))
    p_opt = np.zeros((n_st, T))
    np.add.at(p_opt, sessions.station, res.p_ch_kw - res.p_dis_kw)
    # the original day: every EV at full power from plug-in until its target
    per_slot = sessions.eta_ch * sessions.p_ch_max_kw * dt_h
    need = sessions.e_target_kwh - sessions.e0_kwh
    dur = np.ceil(need / per_slot - _EPS).astype(np.int64)
    last = np.where(dur > 0, (need - (dur - 1) * per_slot) / (sessions.eta_ch * dt_h), 0.0)
    blk, slot, p = block_entries(sessions.start, dur, sessions.end, sessions.p_ch_max_kw, last)
    p_orig, p_bus = np.zeros((n_st, T)), load_p_kw.copy()
    np.add.at(p_orig, (sessions.station[blk], slot), p)
    np.add.at(p_bus, (slot, sessions.bus[blk]), p)
    flow = SweepBackend(feeder).solve(p_bus, load_q_kvar)
    if not (flow.converged.all() and res.ac.converged):
        log.warning("stage 1: the AC sweep of the original or optimised day did not converge")
    return Stage1(p_opt_kw=p_opt, p_orig_kw=p_orig, tie_target_kw=target,
                  tie_orig_kw=p_bus.sum(axis=1) + flow.loss_kw, tie_opt_kw=res.p_bus_kw.sum(axis=1) + res.ac.loss_kw,
                  vm_orig_pu=flow.vm_pu, vm_opt_pu=res.ac.vm_pu, objective=res.objective,
                  solve_s=time.perf_counter() - t0, load_p_kw=load_p_kw, load_q_kvar=load_q_kvar)


def stage1_sessions(w: StartWindows, soc0: FloatArray, station_bus: IntArray, n_slots: int,
                    dt_h: float) -> opf.Sessions:
    """The day's EVs as OPF sessions over the valley: an adjustable EV may charge anywhere between its
    earliest start and departure; an EV without a choice is pinned to its block's in-valley energy (a target
    within 1e-9 of charging at full power throughout, so the plan holds what stage 2 will do)."""
    auto = np.flatnonzero(~w.adjustable & (w.dur_slots > 0))
    blk, slot, p = block_entries(w.auto_start[auto], w.dur_slots[auto], w.depart_slot[auto], w.p_kw[auto],
                                 w.last_kw[auto])
    inside = (slot >= 0) & (slot < n_slots)
    e_batt = p * w.eta[auto[blk]] * dt_h
    before_kwh = np.bincount(blk, e_batt * (slot < 0), auto.size)
    in_kwh = np.bincount(blk, e_batt * inside, auto.size)
    start, end = w.earliest.copy(), w.depart_slot.copy()
    e0 = soc0 * w.cap_kwh
    e_target = e0 + w.need_kwh
    start[auto] = np.maximum(w.auto_start[auto], 0)
    end[auto] = np.minimum(w.auto_start[auto] + w.dur_slots[auto], w.depart_slot[auto])
    e0[auto] += before_kwh
    e_target[auto] = e0[auto] + in_kwh * (1 - _EPS)
    keep = np.flatnonzero((start < end) & (w.dur_slots > 0) & (e_target > e0))
    n = keep.size
    return opf.Sessions(bus=station_bus[w.station[keep]], start=start[keep], end=end[keep],
                        p_ch_max_kw=w.p_kw[keep], p_dis_max_kw=np.zeros(n), cap_kwh=w.cap_kwh[keep],
                        e0_kwh=e0[keep], e_target_kwh=np.minimum(e_target[keep], w.cap_kwh[keep]),
                        e_min_kwh=np.zeros(n), eta_ch=w.eta[keep], eta_dis=w.eta[keep], station=w.station[keep])


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class EpisodeResult:
    """What one episode scheduled: M stations (paper's ``nodes``), n EVs in arrival order."""

    nodes: tuple[int, ...]  # (M,) the stations' node numbers (1-based, node 1 = the substation)
    dt_h: float
    valley_start_h: float
    grid_start: int  # valley slot of column 0 of p_kw (<= 0: EVs that start before the valley)
    p_kw: FloatArray  # (M, n_grid) scheduled profile of each station
    p_opt_kw: FloatArray  # (M, n_slots) stage 1's optimal profile
    total_reward: FloatArray  # (M,) each node's sum of rewards (eq 22)
    start_slot: IntArray  # (n,) each EV's start, valley slots (UNSCHEDULED: not yet)
    station: IntArray  # (n,)
    adjustable: npt.NDArray[np.bool_]  # (n,)
    unmet_kwh: FloatArray  # (n,) battery energy each EV left without
    n_moved: int  # masked actions moved to the nearest valid slot
    stage1: Stage1 = field(repr=False)

    @property
    def p_sched_kw(self) -> FloatArray:  # (M, n_slots)
        """The scheduled profiles over the valley."""
        return self.p_kw[:, -self.grid_start:-self.grid_start + self.p_opt_kw.shape[1]]

    @property
    def start_h(self) -> FloatArray:  # (n,)
        """Each EV's start, hours after midnight of the arrival day."""
        return self.valley_start_h + self.start_slot * self.dt_h

    @property
    def dev_mean_mw(self) -> FloatArray:  # (M,)
        return np.abs(self.p_opt_kw - self.p_sched_kw).mean(axis=1) / 1e3

    @property
    def dev_max_mw(self) -> FloatArray:  # (M,)
        return np.abs(self.p_opt_kw - self.p_sched_kw).max(axis=1) / 1e3

    def summary(self) -> dict[str, Any]:
        """Per-node metrics as plain numbers (the last step's ``info``)."""
        per = {"total_reward": self.total_reward, "dev_mean_mw": self.dev_mean_mw, "dev_max_mw": self.dev_max_mw}
        out: dict[str, Any] = {k: {f"node{n}": float(v) for n, v in zip(self.nodes, a)} for k, a in per.items()}
        out.update(mean_total_reward=float(self.total_reward.mean()), n_moved=self.n_moved,
                   unmet_kwh=float(self.unmet_kwh.sum()))
        return out


class Decision(NamedTuple):
    """The EV awaiting a start: its index, station, bounds (valley slots), block shape (kW per slot) and the
    station's optimal minus scheduled profile over the valley (kW)."""

    ev: int
    station: int
    earliest: int
    latest: int
    shape_kw: FloatArray
    gap_kw: FloatArray


# ---------------------------------------------------------------------------------------- the environment

_EV_FEATURES = FeatureSet((
    Feature("t_arrive", "valley slots / n_slots", "(-inf, 1)", "arrival (first slot boundary after it)"),
    Feature("t_depart", "valley slots / n_slots", "(0, 1]", "departure"),
    Feature("earliest", "valley slots / n_slots", "[0, 1)", "earliest start, max(arrival, valley start)"),
    Feature("latest", "valley slots / n_slots", "[0, 1)", "latest start, departure - duration (eq 16)"),
    Feature("duration", "slots / n_slots", "(0, 1]", "charging duration at constant power (eq 13)"),
    Feature("p_kw", "share of the largest charger power", "(0, 1]", "charging power"),
    Feature("need", "share of battery capacity", "(0, 1]", "energy to the target SOC (eqs 14-15)"),
    Feature("progress", "share", "[0, 1]", "share of this station's EVs scheduled so far"),
))


class StartTimeEnv(ParallelEnv, EzPickle):
    # the docstring is assembled below from the feature declarations
    metadata = {"name": "EVStartTime-v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, config: Any = "seed001", start_time: StartTimeConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> None:
        EzPickle.__init__(self, config, start_time, **overrides)
        self.cfg = load_config(config, keyword_overrides(overrides))
        self.st = start_time if isinstance(start_time, StartTimeConfig) else \
            from_dict(StartTimeConfig, start_time, "start_time.")
        self.dt_h = self.cfg.dt_min / 60.0
        self.n_slots, self._step0 = _check(self.cfg, self.st)
        self.layout = build_layout(self.cfg)
        feeder = self.layout.feeders[0]
        self.nodes = tuple(int(n) for n in feeder.numbers[self.layout.station_bus])
        self.possible_agents = [AGENT]
        self.agents: list[str] = []
        self.render_mode = None
        self._p_ref_kw = self.cfg.fleet.ranges()[1][1]
        self._stage1_key = json.dumps([to_dict(self.cfg), self.st.valley_start_h, self.st.valley_end_h,
                                       self.st.station_ramp_kw, self.st.ev_model], sort_keys=True, default=str)
        self._next_seed: int | None = None
        self.day = None  # the day's draw (sessions, base load), as the simulator draws it
        self.windows: StartWindows | None = None
        self.stage1: Stage1 | None = None
        self.opf_sessions: opf.Sessions | None = None  # the day's EVs as stage 1 saw them

    # ------------------------------------------------------------------ spaces

    @functools.cache
    def observation_space(self, agent: str) -> gymnasium.Space:
        _agent(agent)
        m, n = len(self.nodes), self.n_slots
        k = n if self.st.observation == "scores" else 0
        low = np.concatenate([np.zeros(m), [-np.inf], np.zeros(len(_EV_FEATURES) - 1), np.zeros(2 * n), -np.ones(k)])
        high = np.concatenate([np.ones(m + len(_EV_FEATURES)), np.full(2 * n, np.inf), np.ones(k)])
        return spaces.Dict({"observations": spaces.Box(low.astype(np.float32), high.astype(np.float32),
                                                       dtype=np.float32),
                            "action_mask": spaces.Box(0, 1, (n,), np.int8)})

    @functools.cache
    def action_space(self, agent: str) -> gymnasium.Space:
        _agent(agent)
        return spaces.Discrete(self.n_slots)

    # ------------------------------------------------------------------ API

    def reset(self, seed: int | None = None, options: dict | None = None):
        """A new day: ``seed`` draws its EVs and base load (None continues the sequence from ``cfg.seed``)."""
        if seed is None:
            seed = self.cfg.seed if self._next_seed is None else self._next_seed
        self._next_seed = seed + 1
        self.day = day = draw_day(self.cfg, self.layout, 1, seed)
        self.windows = w = start_windows(day.sessions, self.st.valley_start_h, self.dt_h)
        if (w.depart_slot > self.n_slots).any() or (w.arrive_slot >= self.n_slots).any():
            raise ValueError(f"start_time.valley_end_h: every EV must arrive before and leave by the valley end "
                             f"({self.st.valley_end_h} h), got departures up to {day.sessions.t_depart_h.max()} h")
        self.stage1, self.opf_sessions = self._stage1(seed, day, w)
        m = len(self.nodes)
        total = self.stage1.p_opt_kw.sum(axis=1)
        self._lambda = np.divide(self.st.reward_scale, total, out=np.zeros(m), where=total > _EPS)  # eq 23
        self._scale = np.maximum(self.stage1.p_opt_kw.max(axis=1), 1.0)  # observation: optimal peak = 1
        auto = ~w.adjustable & (w.dur_slots > 0)
        self._g0 = min(0, int(w.auto_start[auto].min())) if auto.any() else 0
        self._p_kw = np.zeros((m, self.n_slots - self._g0))
        self._start = np.full(w.n, UNSCHEDULED)
        self._unmet = np.zeros(w.n)
        self._reward = np.zeros(m)
        self._count = np.bincount(w.station, minlength=m)
        self._done = np.zeros(m, dtype=np.int64)
        self._adj = np.flatnonzero(w.adjustable)
        self._k, self._n_moved = 0, 0
        # EVs before the first decision: their reward comes with the first step's
        self._pending = self._advance(int(self._adj[0]) if self._adj.size else w.n)
        self.agents = [AGENT] if self._k < self._adj.size else []
        if not self.agents:
            log.warning("seed %d: no adjustable EV; the episode is over at reset", seed)
            return {}, {}
        return {AGENT: self._observe()}, {AGENT: {"node": self.nodes[w.station[self._adj[0]]]}}

    def step(self, actions: dict[str, Any]):
        """Schedule the waiting EV at ``actions[AGENT]``, then every EV that arrives before the next choice."""
        if not self.agents:
            raise RuntimeError("step: the episode is over; call reset()")
        a = _action(actions, self.n_slots)
        w, i = self.windows, int(self._adj[self._k])
        s = int(np.clip(a, w.earliest[i], w.latest[i]))  # a masked slot moves to the nearest valid one
        self._n_moved += s != a
        r = self._place(np.array([i]), np.array([s])).sum() + self._pending
        self._pending = 0.0
        self._k += 1
        nxt = int(self._adj[self._k]) if self._k < self._adj.size else w.n
        r += self._advance(nxt)
        done = self._k >= self._adj.size
        info: dict[str, Any] = {"node": self.nodes[w.station[i]], "start_slot": s, "moved": s != a}
        if done:
            info["result"] = self.result().summary()
            self.agents = []
        return ({AGENT: self._observe()}, {AGENT: float(r)}, {AGENT: done}, {AGENT: False}, {AGENT: info})

    def decision(self) -> Decision:
        """The EV awaiting a start now (what a baseline needs)."""
        if not self.agents:
            raise RuntimeError("decision: no EV is waiting; call reset()")
        w, i = self.windows, int(self._adj[self._k])
        j, d = int(w.station[i]), int(w.dur_slots[i])
        shape = np.full(d, w.p_kw[i])
        shape[-1] = w.last_kw[i]
        gap = self.stage1.p_opt_kw[j] - self._p_kw[j, -self._g0:]
        return Decision(i, j, int(w.earliest[i]), int(w.latest[i]), shape, gap)

    def result(self) -> EpisodeResult:
        """The episode so far: profiles, per-node rewards and deviations, each EV's start (valley slots)."""
        w = self.windows
        return EpisodeResult(nodes=self.nodes, dt_h=self.dt_h, valley_start_h=self.st.valley_start_h,
                             grid_start=self._g0, p_kw=self._p_kw.copy(), p_opt_kw=self.stage1.p_opt_kw,
                             total_reward=self._reward.copy(), start_slot=self._start.copy(), station=w.station,
                             adjustable=w.adjustable, unmet_kwh=self._unmet.copy(), n_moved=self._n_moved,
                             stage1=self.stage1)

    def state(self) -> npt.NDArray[np.float32]:
        """Every station's optimal and scheduled profile over the valley, over its optimal peak."""
        sched = self._p_kw[:, -self._g0:] / self._scale[:, None]
        return np.concatenate([(self.stage1.p_opt_kw / self._scale[:, None]).ravel(),
                               sched.ravel()]).astype(np.float32)

    def close(self) -> None:
        pass

    def stage1_days(self, seeds: Iterable[int]) -> dict[int, tuple[Stage1, opf.Sessions]]:
        """Stage 1 of the days ``seeds`` (solved, or from the process's cache): what :meth:`preload_stage1` gives
        envs in other processes (RLlib's env runners), so a day is solved once per training run."""
        out = {}
        for seed in map(int, seeds):
            day = draw_day(self.cfg, self.layout, 1, seed)
            out[seed] = self._stage1(seed, day, start_windows(day.sessions, self.st.valley_start_h, self.dt_h))
        return out

    def preload_stage1(self, days: Mapping[int, tuple[Stage1, opf.Sessions]]) -> None:
        """Put :meth:`stage1_days`'s output, from an env of the same config and stage settings, in this
        process's cache."""
        for seed, solved in days.items():
            _cache_stage1((self._stage1_key, int(seed)), solved)

    # ------------------------------------------------------------------ internals

    def _stage1(self, seed: int, day, w: StartWindows) -> tuple[Stage1, opf.Sessions]:
        key = (self._stage1_key, seed)
        if key in _STAGE1_CACHE:
            _STAGE1_CACHE.move_to_end(key)
            return _STAGE1_CACHE[key]
        lay = self.layout
        ss = stage1_sessions(w, day.sessions.soc0, lay.station_bus, self.n_slots, self.dt_h)
        s1 = solve_stage1(lay.feeders[0], *self._valley_load(day), ss, self.dt_h,
                          station_ramp_kw=self.st.station_ramp_kw, ev_model=self.st.ev_model)
        log.info("seed %d: stage 1 solved in %.2f s (objective %.4g MW²)", seed, s1.solve_s, s1.objective)
        _cache_stage1(key, (s1, ss))
        return s1, ss

    def _valley_load(self, day) -> tuple[FloatArray, FloatArray]:
        """The day's base load over the valley, (n_slots, n_bus) kW and kvar."""
        lay, s0 = self.layout, self._step0
        load_pu = day.load_pu[0, s0:s0 + self.n_slots, 0][:, None]
        return lay.base_p_kw[None, :] * load_pu, lay.base_q_kvar[None, :] * load_pu

    def ac_flow(self, p_station_kw: FloatArray, stage1: Stage1 | None = None) -> tuple[FloatArray, FloatArray]:
        """The AC power flow of a day's valley with the stations drawing ``p_station_kw`` (M, n_slots), e.g. a
        result's ``p_sched_kw``: bus voltages (n_slots, n_bus) p.u. and the tie-line (n_slots,) kW, losses in.
        The day is ``stage1``'s (e.g. a result's ``stage1``: no reset, no OPF), else the current one."""
        from evgrid.grid.flow.sweep import SweepBackend

        s1 = stage1 if stage1 is not None else self.stage1
        if s1 is None:
            raise RuntimeError("ac_flow: no day drawn yet; call reset() or pass a stage1")
        p = s1.load_p_kw.copy()
        np.add.at(p.T, self.layout.station_bus, p_station_kw)
        flow = SweepBackend(self.layout.feeders[0]).solve(p, s1.load_q_kvar)
        return flow.vm_pu, p.sum(axis=1) + flow.loss_kw

    def _deviation(self) -> FloatArray:  # (M,) eq 21, kW summed over the valley slots
        return np.abs(self.stage1.p_opt_kw - self._p_kw[:, -self._g0:]).sum(axis=1)

    def _place(self, idx: IntArray, start: IntArray) -> FloatArray:
        """Add EVs ``idx``'s blocks from ``start``; their reward per node (eq 20)."""
        w = self.windows
        blk, slot, p = block_entries(start, w.dur_slots[idx], w.depart_slot[idx], w.p_kw[idx], w.last_kw[idx])
        before = self._deviation()
        np.add.at(self._p_kw, (w.station[idx[blk]], slot - self._g0), p)
        got_kwh = np.bincount(blk, p, idx.size) * w.eta[idx] * self.dt_h
        unmet = w.need_kwh[idx] - got_kwh
        unmet = np.where(unmet > 1e-9, unmet, 0.0)  # a full block's rounding is not unmet demand
        self._start[idx], self._unmet[idx] = start, unmet
        m = len(self.nodes)
        penalty = np.bincount(w.station[idx], unmet / w.eta[idx] / self.dt_h, m)  # grid kWh per slot length
        r = self._lambda * (before - self._deviation() - self.st.unmet_weight * penalty)
        self._reward += r
        self._done += np.bincount(w.station[idx], minlength=m)
        return r

    def _advance(self, upto: int) -> float:
        """Schedule, as they arrive, the EVs without a choice before EV ``upto``; their reward."""
        w = self.windows
        first = int(self._adj[self._k - 1]) + 1 if self._k > 0 else 0
        idx = np.arange(first, upto)
        idx = idx[~w.adjustable[idx]]
        return float(self._place(idx, w.auto_start[idx]).sum()) if idx.size else 0.0

    def _observe(self) -> dict[str, np.ndarray]:
        m, n = len(self.nodes), self.n_slots
        x = np.zeros(self.observation_space(AGENT)["observations"].shape, dtype=np.float32)
        mask = np.zeros(n, dtype=np.int8)
        if self._k >= self._adj.size:  # nothing waits: a terminal observation, slot 0 nominally valid
            mask[0] = 1
            return {"observations": x, "action_mask": mask}
        w, i = self.windows, int(self._adj[self._k])
        j = int(w.station[i])
        x[j] = 1.0
        x[m:m + len(_EV_FEATURES)] = (w.arrive_slot[i] / n, w.depart_slot[i] / n, w.earliest[i] / n,
                                      w.latest[i] / n, w.dur_slots[i] / n, w.p_kw[i] / self._p_ref_kw,
                                      w.need_kwh[i] / w.cap_kwh[i], self._done[j] / max(self._count[j], 1))
        o = m + len(_EV_FEATURES)
        x[o:o + n] = self.stage1.p_opt_kw[j] / self._scale[j]
        x[o + n:o + 2 * n] = self._p_kw[j, -self._g0:] / self._scale[j]
        if self.st.observation == "scores":
            d = self.decision()
            x[o + 2 * n + d.earliest:o + 2 * n + d.latest + 1] = start_scores(d.gap_kw, d.shape_kw, d.earliest,
                                                                              d.latest)
        mask[w.earliest[i]:w.latest[i] + 1] = 1
        return {"observations": x, "action_mask": mask}


def _cache_stage1(key: tuple[str, int], solved: tuple[Stage1, opf.Sessions]) -> None:
    _STAGE1_CACHE[key] = solved
    _STAGE1_CACHE.move_to_end(key)
    if len(_STAGE1_CACHE) > _CACHE_DAYS:
        _STAGE1_CACHE.popitem(last=False)


def _agent(agent: str) -> None:
    if agent != AGENT:
        raise KeyError(f"agent: unknown agent {agent!r}; this env has one agent, {AGENT!r}")


def _action(actions: Any, n_slots: int) -> int:
    if not isinstance(actions, Mapping) or AGENT not in actions:
        raise ValueError(f"actions: expected a dict holding {AGENT!r}'s start slot, got {actions!r}")
    a = actions[AGENT]
    a = a.item() if isinstance(a, np.ndarray) and a.size == 1 else a
    if isinstance(a, bool) or not isinstance(a, int | np.integer) or not 0 <= a < n_slots:
        raise ValueError(f"actions[{AGENT!r}]: expected a start slot, an integer in [0, {n_slots - 1}], got {a!r}")
    return int(a)


def _check(cfg: EnvConfig, st: StartTimeConfig) -> tuple[int, int]:
    """Slots of the valley and its first step in the config's episode; what the config must be for seed 001."""
    if cfg.fleet.scenario != "household_valley":
        raise ConfigError(f"fleet.scenario: EVStartTime-v0 schedules seed 001's household EVs, expected "
                          f"'household_valley', got {cfg.fleet.scenario!r}")
    if cfg.grid.feeder == "city":
        raise ConfigError("grid.feeder: EVStartTime-v0 runs on one feeder, expected 'ieee33', 'feeder14' or "
                          "'cigre_mv', got 'city'")
    dt_h = cfg.dt_min / 60.0
    for name in ("valley_start_h", "valley_end_h"):
        slots = getattr(st, name) / dt_h
        if abs(slots - round(slots)) > 1e-9:
            raise ConfigError(f"start_time.{name}: expected a multiple of dt_min ({cfg.dt_min} min), got "
                              f"{getattr(st, name)}")
    n_slots = int(round((st.valley_end_h - st.valley_start_h) / dt_h))
    step0 = int(round((st.valley_start_h - cfg.start_hour) / dt_h)) % int(round(24 / dt_h))
    if step0 + n_slots > cfg.n_steps:
        raise ConfigError(f"start_time.valley_end_h: the valley ({st.valley_start_h}-{st.valley_end_h} h) must lie "
                          f"inside the config's day (start_hour {cfg.start_hour}, n_steps {cfg.n_steps}), which "
                          f"holds the base load")
    return n_slots, step0


# -------------------------------------------------------------------------------------------- baselines


def _windows(gap_kw: FloatArray, shape_kw: FloatArray, earliest: int, latest: int) -> FloatArray:
    """(starts, d): the gap under the block at each start in [earliest, latest]."""
    d = shape_kw.size
    return np.lib.stride_tricks.sliding_window_view(gap_kw[earliest:latest + d], d)


def start_scores(gap_kw: FloatArray, shape_kw: FloatArray, earliest: int, latest: int,
                 win: FloatArray | None = None) -> FloatArray:
    """For each start in [earliest, latest], how much the block ``shape_kw`` placed there reduces the
    deviation from the optimal profile (eq 21), over the block's own energy: in [-1, 1], 1 where it fills the
    gap exactly, -1 where it lands wholly on slots already at or above the profile."""
    win = _windows(gap_kw, shape_kw, earliest, latest) if win is None else win
    return (np.abs(win).sum(axis=1) - np.abs(win - shape_kw).sum(axis=1)) / max(float(shape_kw.sum()), _EPS)


def greedy_start(gap_kw: FloatArray, shape_kw: FloatArray, earliest: int, latest: int) -> int:
    """The start in [earliest, latest] whose block brings the schedule closest to the optimal profile: least
    absolute deviation (eq 21, the largest immediate reward), ties to the largest overlap with the gap."""
    win = _windows(gap_kw, shape_kw, earliest, latest)
    score = start_scores(gap_kw, shape_kw, earliest, latest, win)
    best = np.flatnonzero(score >= score.max() - 1e-9 / max(float(shape_kw.sum()), _EPS))  # ties within 1e-9 kW
    return earliest + int(best[np.argmax(win[best] @ shape_kw)])


def greedy_policy(env: StartTimeEnv, obs: Any = None) -> int:
    """Copy the optimal profile myopically: :func:`greedy_start` for the waiting EV."""
    d = env.decision()
    return greedy_start(d.gap_kw, d.shape_kw, d.earliest, d.latest)


def random_policy(seed: int = 0) -> Callable[[StartTimeEnv, Any], int]:
    """The paper's random policy: a start drawn uniformly from the waiting EV's valid slots."""
    rng = np.random.default_rng(seed)

    def act(env: StartTimeEnv, obs: Any = None) -> int:
        d = env.decision()
        return int(rng.integers(d.earliest, d.latest + 1))

    return act


def run_episode(env: StartTimeEnv, policy: Callable[[StartTimeEnv, Any], int], seed: int | None = None
                ) -> EpisodeResult:
    """One day under ``policy(env, obs) -> start slot``."""
    obs, _ = env.reset(seed=seed)
    while env.agents:
        obs, *_ = env.step({AGENT: policy(env, obs[AGENT])})
    return env.result()


def _indent(table: str) -> str:
    lines = table.splitlines()
    lines = lines[:2] + [line.replace("| ", "| M + ", 1) for line in lines[2:]]  # rows follow the M one-hot
    return "\n".join("    " + line for line in lines)


StartTimeEnv.__doc__ = f"""Seed 001's sequential start-time scheduling of household EVs (stage 2).

    ## Description
    At reset the day's EVs are drawn (``fleet.household_valley`` with the config's ``station_counts``; seed
    001: 179, 225 and 146 EVs at nodes 5, 9 and 13 of the 14-node feeder) and stage 1
    (:func:`solve_stage1`) gives each station its optimal profile over the valley.  The EVs then arrive one
    by one; the agent picks each adjustable EV's start slot, and the EV charges without a break at constant
    power until its energy is in.  EVs without a choice are scheduled as they arrive.

    ## Agents
    One, ``{AGENT}``, the aggregator scheduling every station's EVs (see the module docstring for why).

    ## Action Space
    ``Discrete(n_slots)``: the start slot counted from the valley start (``n_slots`` = valley length /
    ``dt_min``, 40 for 22:00-08:00 at 15 min).  The slots in ``[earliest, latest]`` are valid (the
    observation's ``action_mask``); any other slot moves to the nearest valid one (``info["moved"]``).
    Anything outside the space is a ValueError.

    ## Observation Space
    ``Dict(observations=Box(M + {len(_EV_FEATURES)} + 2 n_slots,) float32, action_mask=Box(0, 1, (n_slots,)) int8)``,
    eqs 18-19: index 0..M-1 the one-hot station of the waiting EV (M stations), then

{_indent(_EV_FEATURES.table())}

    then that station's optimal profile ``P*_i`` (n_slots) and its scheduled profile ``P_i^(k-1)`` (n_slots),
    each over the station's optimal peak (kW / kW, [0, inf)); with ``start_time.observation = "scores"``
    (ours) then n_slots more: each valid start's :func:`start_scores` ([-1, 1], 0 outside the window).

    ## Rewards
    Eq 20: ``r_k = lambda_i (D_i^(k-1) - D_i^k) - lambda_i unmet_weight E_unmet / dt``, with eq 21's
    ``D_i^k = sum_t |P*_i(t) - P_i^k(t)|`` over the valley and eq 23's ``lambda_i = reward_scale / sum_t P*_i(t)``:
    a node's rewards total ``reward_scale`` when its schedule meets the optimal profile.  EVs without a choice
    are scheduled in the step before which they arrive and their rewards come with its reward (those that
    arrive before the first choice with the first step's).  Per-node totals: :meth:`result` and the last
    step's ``info["result"]`` (keyed ``node5`` etc.).

    ## Starting State
    ``reset(seed)`` draws the day from child generators of ``seed`` exactly as the simulator does
    (:func:`evgrid.envs.state.draw_day`), solves stage 1 (the process caches the last {_CACHE_DAYS} days) and
    schedules the EVs that arrive before the first adjustable one.

    ## Episode End
    Termination when the day's last adjustable EV is scheduled (one step per adjustable EV, ~530 for seed 001).

    ## Arguments
    ``StartTimeEnv(config="seed001", start_time=None, **overrides)``: ``config`` an EnvConfig, YAML path,
    shipped experiment name or mapping, with overrides as for ``evgrid.make``; ``start_time`` a
    :class:`StartTimeConfig` or mapping (valley hours, stage 1's ramp limit, ``reward_scale``, ``unmet_weight``).

    ## Version History
    * v0: initial version.
    """
