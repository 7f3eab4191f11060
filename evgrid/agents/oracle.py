"""The oracle: a perfect-foresight optimal EV schedule for an episode, replayed through the simulator.

For each episode the oracle knows everything the day will bring (base load, PV, wind, every session's arrival,
station, stay and energy) and plans every EV's power with the multi-period OPF of :mod:`evgrid.grid.opf`, one
feeder at a time, under the network's voltage and ampacity limits and each station's connection limit.  The
plan is then replayed through :class:`~evgrid.envs.sim.Sim` as the EVs' actions, so the oracle's metrics come
from the same power flow, limit enforcement and settlement as every other policy's: an upper bound beside the
rules and the trained agents.

What the oracle knows of the sessions it learns from a first pass of the day (the simulator with its rules):
where each EV plugs in, when, with what state of charge, and when it leaves.  None of that depends on charging
decisions unless routing compares network loads (LBMS); then the replay may send EVs elsewhere than planned,
and the oracle plans again on the sessions as they came, up to ``oracle.rounds`` plans.

Uninterruptible sessions (seed 001: once started, an EV charges at full power until its target) cannot follow
an arbitrary profile.  There the OPF's station profiles are the targets and each EV's start step is chosen to
track them (least flexible EVs first, each at the start that brings its station's schedule closest to the
target, charging above it weighted more): a heuristic for the start-time problem, whose exact form is an
integer program.

Several networks (``oracle.objective: spatial_balance``, seed 002): the spread of the networks' loads couples the
feeders, so the plan has two stages, as seed 001's flat target does.  :func:`evgrid.grid.opf.balanced_schedule`
shares every EV's energy out over its stay for the least mean spread, network limits aside (each feeder's AC
losses under the plan enter as fixed load); then each feeder's OPF draws that load (``tie_target_kw``) within its
limits.  Each EV takes exactly the energy charging on arrival gives it within the day (its target or all it can
reach), so the plan only moves energy in time, and compares with greedy's day.

Stationary storage (``storage``) is the operators' and enters the plan as the OPF models it: a session plugged
in for the whole episode, within its SOC window, that must end no emptier than it began (so the plan cannot
earn by selling the energy it started with); the replay sets each unit to its planned power.

Sessions whose target is out of reach (too little time plugged in) are planned to charge all they can; an EV
still plugged in when the episode ends must by then hold what it could not charge between the end and its
departure (what the rules, which charge nothing after the end either, are held to by the unmet-energy metric).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from evgrid.envs import fleet as fl
from evgrid.envs import market as mk
from evgrid.envs.config import EnvConfig, load_config
from evgrid.envs.sim import Sim, SimActions
from evgrid.envs.state import CHARGE, DEPARTED, DISCHARGE, IDLE, PLUGGED, TRUNCATED
from evgrid.grid import opf

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
_EPS_KW = 1e-6


@dataclass(frozen=True, eq=False)
class Lifecycle:
    """Where and when each session of one environment charges (S,): global station, plug-in step, departure step
    (possibly after the episode's end), state of charge at plug-in; ``plugged``: it plugged in at all."""

    station: IntArray
    plug_step: IntArray
    dep_step: IntArray
    soc_arrive: FloatArray
    plugged: npt.NDArray[np.bool_]

    @staticmethod
    def of(sim: Sim) -> Lifecycle:
        f = sim.fleet
        plugged = (f.plug_step >= 0) & (f.dep_step >= 0) & np.isin(f.status, (DEPARTED, TRUNCATED, PLUGGED))
        return Lifecycle(f.station.copy(), f.plug_step.copy(), f.dep_step.copy(), f.soc_arrive.copy(), plugged)

    def differs(self, other: Lifecycle) -> npt.NDArray[np.bool_]:
        """Sessions whose station, window or plugging differ."""
        return ((self.plugged != other.plugged)
                | (self.plugged & ((self.station != other.station) | (self.plug_step != other.plug_step)
                                   | (self.dep_step != other.dep_step))))


@dataclass(frozen=True, eq=False)
class Plan:
    """The oracle's schedule of one episode: each session's grid-side power per step (S, T), kW (> 0 charges),
    the OPF results per feeder, for uninterruptible sessions the chosen start step (-1: none), which sessions
    the plan covers, the cost no decision changes (diesel at its fixed output) and each storage unit's
    grid-side power per step (U, T), kW."""

    p_kw: FloatArray
    start_step: IntArray
    planned: npt.NDArray[np.bool_]
    results: tuple[opf.OPFResult, ...]
    fixed_cost: float
    solve_s: float
    storage_kw: FloatArray

    @property
    def objective(self) -> float:
        """The planned objective with the fixed cost: for ``operator_cost``, the operator cost the replay should
        settle at (equal where the replay follows the plan exactly)."""
        return float(sum(r.objective for r in self.results)) + self.fixed_cost


def plan_episode(sim: Sim, life: Lifecycle) -> Plan:
    """The perfect-foresight schedule of ``sim``'s current day (one environment) for the sessions as ``life``
    says they come."""
    cfg, layout, day = sim.cfg, sim.layout, sim.day
    if sim.n_env != 1:
        raise ValueError(f"n_env: the oracle plans one environment at a time, got {sim.n_env}")
    T, n_sess = sim.n_steps, day.sessions.n
    p_kw = np.zeros((n_sess, T))
    storage_kw = np.zeros((layout.storage.n, T))
    results = []
    fixed = 0.0
    t0 = time.perf_counter()
    m = layout.n_station
    local = life.plugged & (life.station >= 0) & (life.plug_step < life.dep_step)
    feeder_of = layout.station_feeder[np.maximum(life.station, 0) % m]
    parts = []  # per feeder: its sessions, its storage units, both as OPF sessions, its horizon
    for f in range(len(layout.feeders)):
        idx = np.flatnonzero(local & (feeder_of == f))
        bus0 = int(layout.feeder_slice(f).start)
        units, batteries = _storage_sessions(sim, f, bus0)
        evs = _sessions(cfg, sim, life, idx, bus0, exact=cfg.oracle.objective == "spatial_balance")
        parts.append((idx, units, _concat(evs, batteries), _horizon(cfg, sim, f)))
    draws = _balanced_draws(cfg, sim, parts) if cfg.oracle.objective == "spatial_balance" else None
    for f, feeder in enumerate(layout.feeders):
        idx, units, ss, horizon = parts[f]
        margin = cfg.oracle.v_margin_pu
        planned = dataclasses.replace(feeder, v_min_pu=feeder.v_min_pu + margin, v_max_pu=feeder.v_max_pu - margin)
        objective, fixed_f = _objective(cfg, sim, f, None if draws is None else draws[:, f])
        fixed += fixed_f
        res = opf.solve_opf(planned, horizon, ss, objective,
                            opf.OPFOptions(formulation=cfg.oracle.formulation, solver=cfg.oracle.solver,
                                           ac_rounds=cfg.oracle.ac_rounds, ev_model=cfg.oracle.ev_model,
                                           method=cfg.oracle.method,
                                           station_p_max_kw=cfg.stations.p_max_kw, soft=cfg.oracle.soft,
                                           penalties=_penalties(cfg)))
        if not res.ac.converged:
            log.warning("oracle: the AC check of feeder %d's plan did not converge", f)
        for kind, amount in res.slack.items():
            if amount > 1e-6:
                log.warning("oracle, feeder %d: the plan gives way on %s by %.4g in all (oracle.soft)", f, kind,
                            amount)
        p_net = res.p_ch_kw - res.p_dis_kw  # EV sessions first, then the storage units
        p_kw[idx] = p_net[:idx.size]
        storage_kw[units] = p_net[idx.size:]
        results.append(res)
    start = np.full(n_sess, -1, dtype=np.int64)
    if cfg.fleet.uninterruptible:
        p_kw, start = _start_times(sim, life, p_kw)
    planned = np.zeros(n_sess, dtype=bool)
    planned[np.flatnonzero(life.plugged & (life.station >= 0))] = True
    return Plan(p_kw, start, planned, tuple(results), fixed, time.perf_counter() - t0, storage_kw)


def plan_day(sim: Sim, seed: int) -> Plan:
    """The plan of day ``seed`` (one round: the sessions as they come under the rules); leaves ``sim`` reset to
    that day, ready to replay it."""
    sim.reset(seed)
    return plan_episode(sim, _first_pass(sim, seed))


def _balanced_draws(cfg: EnvConfig, sim: Sim, parts: list) -> FloatArray:
    """``spatial_balance``: what each feeder should draw per step (T, F), kW: its base load (DER at their
    available output) and losses plus the EV and storage power of :func:`evgrid.grid.opf.balanced_schedule` over
    all feeders at once, the plan that spreads the networks' loads least."""
    if len(parts) < 2:
        raise ValueError("oracle.objective: spatial_balance balances the loads of several networks; this config has "
                         "1 feeder (allowed with 2 or more, e.g. grid.feeder: city)")
    base = np.column_stack([h.load_p_kw.sum(axis=1) - h.der_avail_kw.sum(axis=1) for *_, h in parts])
    ss = _concat(*(p[2] for p in parts))
    network = np.concatenate([np.full(p[2].n, f, dtype=np.int64) for f, p in enumerate(parts)])
    # the programme is lossless, and losses grow with a feeder's load, so they add to the spread the metric
    # measures: each feeder's AC losses under the last plan (the base load alone at first) enter as fixed load
    p_kw = np.zeros((ss.n, sim.n_steps))
    for _ in range(2):
        loss = _losses(sim, parts, p_kw, network)
        p_kw, spread_kw = opf.balanced_schedule(base + loss, ss, network, sim.dt_h, cfg.stations.p_max_kw)
    log.info("oracle: balanced plan, mean spatial std %.1f kW before the feeders' limits", spread_kw)
    return base + _losses(sim, parts, p_kw, network) + p_kw.T @ np.eye(len(parts))[network]


def _losses(sim: Sim, parts: list, p_kw: FloatArray, network: IntArray) -> FloatArray:
    """(T, F) each feeder's losses by the AC sweep, kW, with its sessions drawing ``p_kw`` (n, T) at their
    buses (NaN where the sweep does not converge: 0)."""
    from evgrid.grid.flow.sweep import SweepBackend

    out = np.zeros((sim.n_steps, len(parts)))
    for f, (_, _, ss, h) in enumerate(parts):
        feeder = sim.layout.feeders[f]
        p = h.load_p_kw.copy()
        np.subtract.at(p.T, feeder.der_bus, h.der_avail_kw.T)
        np.add.at(p.T, ss.bus, p_kw[network == f])
        flow = SweepBackend(feeder).solve(p, h.load_q_kvar)
        out[:, f] = np.where(flow.converged, flow.loss_kw, 0.0)
    return out


def _sessions(cfg: EnvConfig, sim: Sim, life: Lifecycle, idx: IntArray, bus0: int, exact: bool = False
              ) -> opf.Sessions:
    """Sessions ``idx`` as the OPF's, at buses numbered from ``bus0``.  ``exact`` (``spatial_balance``): each
    EV takes exactly the energy charging on arrival gives it within the day, its target or all it can reach,
    so the plan only moves energy in time, against greedy's day."""
    s, dt_h = sim.day.sessions, sim.dt_h
    m = sim.layout.n_station
    cap = s.cap_kwh[idx]
    e0 = life.soc_arrive[idx] * cap
    start, end = life.plug_step[idx], np.minimum(life.dep_step[idx], sim.n_steps)
    p_ch = s.p_ch_max_kw[idx]
    per_step = s.eta_ch[idx] * p_ch * dt_h
    # an EV staying past the episode's end needs by then only what it cannot still charge before it leaves
    target = s.soc_target[idx] * cap - (0.0 if exact else per_step * (life.dep_step[idx] - end))
    # a target out of reach in the time plugged in becomes all that time can store (the simulator then records
    # the rest as unmet, as for every policy)
    reach = np.minimum(e0 + per_step * (end - start), cap)
    target = np.minimum(target, reach * (1 - 1e-9))
    v2g = s.v2g[idx]
    e_min = np.where(v2g, np.minimum(cfg.fleet.v2g_soc_min * cap, e0), 0.0)
    if exact:
        cap = np.maximum(target, e0)  # no EV ends above its target
    return opf.Sessions(bus=sim.layout.station_bus[life.station[idx] % m] - bus0, start=start, end=end,
                        p_ch_max_kw=p_ch, p_dis_max_kw=np.where(v2g, s.p_dis_max_kw[idx], 0.0), cap_kwh=cap,
                        e0_kwh=e0, e_target_kwh=target, e_min_kwh=e_min, eta_ch=s.eta_ch[idx],
                        eta_dis=s.eta_dis[idx], station=life.station[idx] % m)


def _storage_sessions(sim: Sim, f: int, bus0: int) -> tuple[IntArray, opf.Sessions]:
    """Feeder ``f``'s storage units (their numbers) and the same as OPF sessions: plugged in for the whole
    horizon, stored energy within [soc_min, soc_max] of capacity, ending with at least the energy of ``soc0``."""
    u, T = sim.layout.storage, sim.n_steps
    k = np.flatnonzero(sim.layout.feeder_of_bus[u.bus] == f)
    e0 = u.soc0[k] * u.e_kwh[k]
    return k, opf.Sessions(bus=u.bus[k] - bus0, start=np.zeros(k.size, np.int64), end=np.full(k.size, T),
                           p_ch_max_kw=u.p_max_kw[k], p_dis_max_kw=u.p_max_kw[k], cap_kwh=u.soc_max[k] * u.e_kwh[k],
                           e0_kwh=e0, e_target_kwh=e0, e_min_kwh=u.soc_min[k] * u.e_kwh[k], eta_ch=u.eta_ch[k],
                           eta_dis=u.eta_dis[k], station=np.full(k.size, -1, np.int64))


def _concat(*parts: opf.Sessions) -> opf.Sessions:
    return opf.Sessions(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                           for f in dataclasses.fields(opf.Sessions)})


def _horizon(cfg: EnvConfig, sim: Sim, f: int) -> opf.Horizon:
    """Feeder ``f``'s base load over the episode; diesel runs at its fixed output (the simulator does not
    dispatch it), so it enters as negative load; PV and wind as available output, which the plan may curtail."""
    layout, day = sim.layout, sim.day
    sl = layout.feeder_slice(f)
    feeder = layout.feeders[f]
    load_pu = day.load_pu[0, :, f][:, None]
    p = layout.base_p_kw[sl][None, :] * load_pu
    q = layout.base_q_kvar[sl][None, :] * load_pu
    kinds = np.array(feeder.der_kind)
    avail = np.zeros((sim.n_steps, kinds.size))
    avail[:, kinds == "pv"] = day.pv_pu[0][:, None] * feeder.der_p_max_kw[kinds == "pv"]
    avail[:, kinds == "wind"] = day.wind_pu[0][:, None] * feeder.der_p_max_kw[kinds == "wind"]
    diesel = kinds == "diesel"
    np.subtract.at(p.T, feeder.der_bus[diesel], cfg.grid.diesel_output * feeder.der_p_max_kw[diesel][:, None])
    return opf.Horizon(sim.dt_h, p, q, avail)


def _penalties(cfg: EnvConfig) -> dict[str, float] | None:
    """``operator_cost``: unmet energy at the price every policy's ``cost_with_unmet`` pays for it (a peak
    measured in kW has no common unit with it: there unmet energy keeps the default, prohibitive penalty)."""
    if cfg.oracle.objective != "operator_cost":
        return None
    price = cfg.oracle.unmet_price_per_kwh
    return {"target_kwh": cfg.reward.ev_unmet_per_kwh if price is None else price}


def _objective(cfg: EnvConfig, sim: Sim, f: int, draw_kw: FloatArray | None = None) -> tuple[opf.Objective, float]:
    """Feeder ``f``'s objective, and the cost no decision changes (each zone's diesel at its fixed output);
    ``draw_kw``: ``spatial_balance``'s load for the feeder (:func:`_balanced_draws`)."""
    if cfg.oracle.objective == "peak_valley":
        return opf.Objective(peak_valley_weight=1.0), 0.0
    if cfg.oracle.objective == "spatial_balance":
        return opf.Objective(tie_target_kw=draw_kw), 0.0
    layout, day, mc = sim.layout, sim.day, cfg.market
    sl = layout.feeder_slice(f)
    feeder = layout.feeders[f]
    zones = layout.zone_of_bus[sl]
    z0 = int(zones.min())
    zone = zones - z0
    n_zone = int(zone.max()) + 1
    kinds = np.array(feeder.der_kind)
    # each zone's fixed emission excess: diesel's emissions minus the quota that diesel and PV / wind (taken as
    # delivered in full) earn
    c = mc.carbon
    gen_kwh = np.zeros((sim.n_steps, n_zone))
    diesel_kwh = np.zeros((sim.n_steps, n_zone))
    for k, out_pu in (("pv", day.pv_pu[0]), ("wind", day.wind_pu[0])):
        sel = kinds == k
        np.add.at(gen_kwh.T, zone[feeder.der_bus[sel]], (out_pu[:, None] * feeder.der_p_max_kw[sel]).T * sim.dt_h)
    sel = kinds == "diesel"
    np.add.at(diesel_kwh.T, zone[feeder.der_bus[sel]],
              np.broadcast_to(cfg.grid.diesel_output * feeder.der_p_max_kw[sel] * sim.dt_h,
                              (sim.n_steps, int(sel.sum()))).T)
    excess_t = (c.diesel_kg_per_kwh * diesel_kwh - c.quota_kg_per_kwh * (diesel_kwh + gen_kwh)) / 1e3
    fixed = float(mk.diesel_cost(diesel_kwh / sim.dt_h, sim.dt_h, mc).sum())
    return opf.Objective(
        curtail_cost_per_kwh=mc.curtailment_cost_per_kwh,
        accounts=opf.Accounts(zone_of_bus=zone, price_per_kwh=mk.purchase_price_per_kwh(day.period, mc),
                              kg_per_kwh=c.thermal_share * c.thermal_kg_per_kwh, excess_t=excess_t,
                              carbon_lines=c.cost_lines())), fixed


def _start_times(sim: Sim, life: Lifecycle, p_kw: FloatArray) -> tuple[FloatArray, IntArray]:
    """Uninterruptible sessions: a start step each, tracking the plan's station profiles.  Least flexible EVs
    first; each takes the start whose constant-power block brings its station's schedule closest to the planned
    profile (:func:`_miss`).  A loop over EVs, but at planning time, not in a step."""
    s, dt_h, T = sim.day.sessions, sim.dt_h, sim.n_steps
    idx = np.flatnonzero(life.plugged & (life.station >= 0) & (life.plug_step < life.dep_step))
    dep = np.minimum(life.dep_step, T)
    target = {}  # station -> (T,) planned charging still to place
    for st in np.unique(life.station[idx]):
        target[int(st)] = p_kw[idx[life.station[idx] == st]].sum(axis=0)
    need = fl.need_kwh(life.soc_arrive[idx], s.soc_target[idx], s.cap_kwh[idx])
    per_step = s.p_ch_max_kw[idx] * s.eta_ch[idx] * dt_h
    n_full = np.floor(need / per_step + 1e-9).astype(np.int64)
    rest = need - n_full * per_step  # battery energy of the last, partial step
    dur = n_full + (rest > 1e-9)
    latest = dep[idx] - dur
    order = np.argsort(latest - life.plug_step[idx], kind="stable")  # fewest choices first
    out = np.zeros_like(p_kw)
    start = np.full(s.n, -1, dtype=np.int64)
    for k in order:
        i, d = int(idx[k]), int(dur[k])
        if d == 0:
            continue
        shape = np.full(d, s.p_ch_max_kw[i])
        if rest[k] > 1e-9:
            shape[-1] = rest[k] / (s.eta_ch[i] * dt_h)
        first, last = int(life.plug_step[i]), int(max(latest[k], life.plug_step[i]))
        r = target[int(life.station[i])]
        window = r[first:min(last + d, T)]
        if window.size >= d:
            # (starts, d): the station's planned charging still to place under each candidate block
            before = np.lib.stride_tricks.sliding_window_view(window, d)
            a = first + int(np.argmin((_miss(before - shape) - _miss(before)).sum(axis=1)))
        else:  # it cannot finish: start on arrival
            a = first
        stop = min(a + d, T)
        out[i, a:stop] = shape[:stop - a]
        r[a:stop] -= shape[:stop - a]
        start[i] = a
    return out, start


def _miss(residual: FloatArray) -> FloatArray:
    """Squared distance of a station's schedule from its plan, charging above the plan (a negative residual)
    weighted ten times: the plan holds the network's limits, charging beyond it may not."""
    return np.where(residual < 0, 10.0, 1.0) * residual ** 2


def actions(plan: Plan, sim: Sim) -> SimActions:
    """The EVs' actions of the current step: the planned power as a mode and a fraction of the charger's
    limit; an EV the plan does not know (routed elsewhere) charges at full power, as uncontrolled EVs do.  The
    storage units' set-points are their planned power."""
    s, t = sim.day.sessions, sim.t
    p = plan.p_kw[:, t]
    if sim.cfg.fleet.uninterruptible:
        p = np.where(plan.start_step == t, s.p_ch_max_kw, 0.0)  # the simulator keeps a started session going
    mode = np.where(p > _EPS_KW, CHARGE, np.where(p < -_EPS_KW, DISCHARGE, IDLE)).astype(np.int64)
    frac = np.where(p >= 0, p / np.maximum(s.p_ch_max_kw, 1e-12), -p / np.maximum(s.p_dis_max_kw, 1e-12))
    mode[~plan.planned] = CHARGE
    frac[~plan.planned] = 1.0
    return SimActions(ev_mode=mode, ev_power=np.clip(frac, 0.0, 1.0), storage_kw=plan.storage_kw[None, :, t])


def oracle_config(cfg: EnvConfig) -> EnvConfig:
    """The configuration the oracle replays in: operators and stations on their rules (the TOU tariff, the
    station's full allowance), the EVs driven by the plan (no shield: the plan meets every reachable target);
    routing as configured."""
    return load_config(cfg, {"agents": {"operator": "rule", "station": "rule", "ev_view": "rule",
                                        "ev_rule": "uncontrolled", "ev_shield": "none"}})


def oracle_episodes(cfg: EnvConfig, seeds: Iterable[int], log_dir=None) -> Iterator[tuple[dict, Plan]]:
    """Plan and replay each seed's episode; yields the replay's metric row (:class:`EpisodeMetrics`) and the
    plan.  With ``log_dir``, the replays' ``steps.parquet`` and ``sessions.parquet`` go there."""
    from evgrid.evaluate import EpisodeMetrics
    from evgrid.io import EpisodeLog

    cfg = oracle_config(cfg)
    sim = Sim(cfg, 1)
    routed = cfg.routing is not None
    episode_log = EpisodeLog(log_dir, sim) if log_dir is not None else None
    try:
        for episode, seed in enumerate(seeds):
            sim.reset(seed)
            life = _first_pass(sim, seed)
            for round_ in range(cfg.oracle.rounds):
                plan = plan_episode(sim, life)
                # the plan's stations are the oracle's routing: load-dependent routing would move EVs away
                sim.reset(seed, stations=np.where(plan.planned, life.station, -1) if routed else None)
                if episode_log is not None:
                    episode_log.start(episode)
                m = EpisodeMetrics(sim)
                while sim.t < sim.n_steps:
                    rec = sim.step(actions(plan, sim))
                    m.add(rec)
                    if episode_log is not None:
                        episode_log.add_step(rec)
                came = Lifecycle.of(sim)
                moved = came.differs(life)
                if not moved.any() or round_ == cfg.oracle.rounds - 1:
                    if moved.any():
                        log.warning("oracle, seed %d: %d sessions came elsewhere or at other times than the last "
                                    "plan assumed (load-dependent routing)", seed, int(moved.sum()))
                    break
                log.info("oracle, seed %d: %d sessions moved; planning again", seed, int(moved.sum()))
                life = came
            if episode_log is not None:
                episode_log.end_episode()
            log.info("oracle, seed %d: planned objective %.6g in %.2f s", seed, plan.objective, plan.solve_s)
            yield m.rows()[0], plan
    finally:
        if episode_log is not None:
            episode_log.close()


def _first_pass(sim: Sim, seed: int) -> Lifecycle:
    """The sessions' lifecycle on the day with every EV on the uncontrolled rule."""
    while sim.t < sim.n_steps:
        sim.step()
    life = Lifecycle.of(sim)
    sim.reset(seed)
    return life
