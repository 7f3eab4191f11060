"""The simulator core: explicit state (:mod:`evgrid.envs.state`) and one step as named phases.  No agent API.

``Sim`` runs ``n_env`` independent copies of one configured scenario in lock-step (a leading environment
axis ``E``), so one step makes one batched power-flow call per feeder for all of them.

A step (``../DESIGN.md``'s data flow), each phase a function with typed inputs and outputs:

1. :func:`requests` — each plugged EV's power request: its agent's (mode, fraction) or the EV rule, inside
   its physical bounds (charger, SOC window, V2G permission); uninterruptible sessions keep charging;
2. :func:`dispatch` — stations share their limit among their EVs (equal share, LLF, cap); :func:`storage_dispatch`
   — the operators' storage set-points (or ``agents.storage_rule``) within each unit's power and SOC bounds;
3. :func:`injections` — bus injections: base load + EV power + storage − PV − wind − diesel;
4. :func:`solve_and_enforce` — power flow per feeder, all environments in one batch, warm-started; limit
   enforcement curtails EV charging (or adds V2G) under low voltages and overloads, and curtails PV / wind
   above ``v_max``, on reverse overloads and beyond the export limit; storage is the operators' firm schedule,
   counted in the flow but never curtailed (the limits act on EVs and PV / wind around it);
5. :func:`settle` — enforcement's curtailment and added V2G passed back to the EVs at each bus pro rata;
   SOC, energy, costs;
6. :func:`account` — zone loads (storage included: the operators buy and sell its energy at the zone's
   purchase price), operating costs, carbon, violations: the :class:`StepRecord`.

Then the clock advances: EVs whose stay ends leave, new ones arrive (routed first when a routing policy is
configured) and plug in while ports are free.  Operators' price multipliers are announced one step ahead.

Sign convention: EV and storage power ``p_kw`` > 0 charges (a load), < 0 discharges.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numba as nb
import numpy as np
import numpy.typing as npt

from evgrid.envs import fleet as fl
from evgrid.envs import market as mk
from evgrid.envs import routing as rt
from evgrid.envs import stations as st
from evgrid.envs import storage as sg
from evgrid.envs.config import EnvConfig
from evgrid.envs.state import (CHARGE, DEPARTED, DISCHARGE, FUTURE, PLUGGED, STATUS, TRAVELLING, TRUNCATED,
                               TURNED_AWAY, Day, FleetState, Layout, SimActions, StepRecord, build_layout, draw_day)
from evgrid.grid.profiles import VALLEY
from evgrid.grid.service import GridService, LocalGrid

log = logging.getLogger(__name__)

__all__ = ["CHARGE", "DEPARTED", "DISCHARGE", "FUTURE", "PLUGGED", "STATUS", "TRAVELLING", "TRUNCATED",
           "TURNED_AWAY", "Sim", "SimActions", "StepRecord"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
_EPS_KW = 1e-9


class Sim:
    """``n_env`` lock-stepped environments of one configuration."""

    def __init__(self, cfg: EnvConfig, n_env: int = 1, grid: GridService | None = None) -> None:
        if not isinstance(n_env, int | np.integer) or n_env < 1:
            raise ValueError(f"n_env: expected an integer >= 1, got {n_env!r}")
        self.cfg = cfg
        self.n_env = int(n_env)
        self.dt_h = cfg.dt_min / 60.0
        self.n_steps = cfg.n_steps
        self.layout: Layout = build_layout(cfg)
        self.grid = grid if grid is not None else LocalGrid(list(self.layout.feeders), cfg.grid)
        self.prices = mk.ZonePrices(self.n_env, self.layout.n_zone, cfg.market)
        self.day: Day | None = None
        self.zone_period: npt.NDArray[np.int8] | None = None  # (E, T, Z) retail tariff period per zone and step
        self._base_zone_kw: FloatArray | None = None  # (E, T, Z) the day's base load per zone, per reset
        self.fleet: FleetState | None = None
        self.last: StepRecord | None = None
        self.t = 0
        self.episode = -1  # episodes started so far, minus one

    # ------------------------------------------------------------------ episode

    def reset(self, seed: int | None = None, stations: IntArray | None = None) -> None:
        """New episode in every environment; ``seed`` seeds environment e with ``(seed, e)``.  ``stations``: (S,)
        a global station per session chosen in advance (-1: routing chooses), e.g. by the oracle's plan; routing
        then only makes the trip."""
        seed = self.cfg.seed if seed is None else seed
        self.episode += 1
        self.day = draw_day(self.cfg, self.layout, self.n_env, seed)
        lay = self.layout
        bus_kw = self.day.load_pu[:, :, lay.feeder_of_bus] * lay.base_p_kw  # (E, T, n_bus)
        self._base_zone_kw = np.einsum("etb,bz->etz", bus_kw, np.eye(lay.n_zone)[lay.zone_of_bus])
        self._base_zone_kw.flags.writeable = False  # shared with callers (zone periods, stations, observations)
        self.zone_period = _zone_periods(self.cfg, self.day, self._base_zone_kw)
        self.fleet = FleetState.start(self.day, self.n_env, self.layout.n_zone, self.layout.n_station,
                                      self.layout.storage)
        if self.cfg.routing is not None:
            self.fleet.station[:] = -1  # routing chooses (a station a scenario drew is not the EV's choice)
        if stations is not None:
            n_st = self.n_env * self.layout.n_station
            if np.shape(stations) != (self.day.sessions.n,) or np.any((stations < -1) | (stations >= n_st)):
                raise ValueError(f"stations: expected {self.day.sessions.n} global station numbers in [-1, "
                                 f"{n_st - 1}] (one per session), got shape {np.shape(stations)}")
            self.fleet.station = np.where(stations >= 0, stations, self.fleet.station)
        self.prices.reset()
        self.grid.reset()
        self.t = 0
        self.last = None
        advance_sessions(self.cfg, self.layout, self.day, self.fleet, self.t, None)

    def step(self, act: SimActions | None = None) -> StepRecord:
        """Advance one step; returns what it did."""
        if self.fleet is None or self.t >= self.n_steps:
            raise RuntimeError("step: the episode is over (or never began); call reset()")
        act = act or SimActions()
        cfg, layout, day, fleet, t = self.cfg, self.layout, self.day, self.fleet, self.t
        if act.price_multiplier is not None:
            self.prices.announce(act.price_multiplier)
        price_zone = self.retail_price()  # (E, Z) in effect this step
        req = requests(cfg, layout, day, fleet, t, act, self.prices.current)
        p_ev = dispatch(cfg, layout, day, fleet, t, req, act.station_fraction)
        sto = storage_dispatch(cfg, layout, day, fleet, t, act.storage_kw)
        inj = injections(cfg, layout, day, t, req, p_ev, sto.p_kw)
        out = solve_and_enforce(self.grid, layout, inj)
        ev = settle(cfg, layout, day, fleet, req, inj, out, p_ev, price_zone)
        fleet.storage_soc = sto.soc  # not curtailed: the bounded set-point is what flowed
        self.last = rec = account(cfg, layout, day, fleet, t, req, inj, out, ev, sto, price_zone,
                                  self.prices.current)
        self.prices.advance()
        self.t += 1
        if self.t >= self.n_steps:
            # the episode ends with these EVs still plugged: their stay is cut, not finished
            depart(day, fleet, np.flatnonzero(fleet.status == PLUGGED), TRUNCATED)
            fleet.status[fleet.status == TRAVELLING] = TRUNCATED
        advance_sessions(cfg, layout, day, fleet, self.t, rec.feeder_load_kw)
        return rec

    # ------------------------------------------------------------------ views used by the env and the rules

    def plugged(self) -> IntArray:
        """Sessions plugged in now, in session order (environment by environment)."""
        return np.flatnonzero(self.fleet.status == PLUGGED)

    def need_kwh(self, idx: IntArray) -> FloatArray:
        """Battery energy sessions ``idx`` still miss to their target, kWh."""
        s = self.day.sessions
        return fl.need_kwh(self.fleet.soc[idx], s.soc_target[idx], s.cap_kwh[idx])

    def slots(self, idx: IntArray, need_kwh: FloatArray | None = None) -> tuple[IntArray, IntArray]:
        """Seed 002's (c, e) of sessions ``idx``: remaining charge slots at full power and remaining parking
        slots (``need_kwh``: :meth:`need_kwh` of ``idx`` when the caller has it)."""
        return _slots(self.day, self.fleet, self.t, self.dt_h, idx, need_kwh)

    def bounds(self, idx: IntArray) -> tuple[FloatArray, FloatArray]:
        """Largest charge and discharge power of sessions ``idx`` this step, kW (both >= 0)."""
        return _bounds(self.cfg, self.day, self.fleet, idx)

    def retail_price(self) -> FloatArray:
        """Retail price per zone now, (E, Z) per kWh."""
        return self.prices.price_per_kwh(self.zone_period[:, min(self.t, self.n_steps - 1)])

    def base_zone_load_kw(self) -> FloatArray:
        """(E, T, Z) each zone's base load (no EVs, no generation) over the day, kW (drawn at reset; read only)."""
        return self._base_zone_kw


def _zone_periods(cfg: EnvConfig, day: Day, base_zone_kw: FloatArray) -> npt.NDArray[np.int8]:
    """(E, T, Z) retail tariff periods: the clock's everywhere, or each zone's own from its base load."""
    if cfg.market.tou_basis == "base_load":
        return mk.load_ranked_periods(base_zone_kw, day.period)
    return np.broadcast_to(day.period[None, :, None], base_zone_kw.shape)


# ---------------------------------------------------------------------- battery views


def _bounds(cfg: EnvConfig, day: Day, fleet: FleetState, idx: IntArray) -> tuple[FloatArray, FloatArray]:
    s, dt_h = day.sessions, cfg.dt_min / 60.0
    soc = fleet.soc[idx]
    return (fl.charge_limit_kw(soc, s.cap_kwh[idx], s.p_ch_max_kw[idx], s.eta_ch[idx], dt_h),
            fl.discharge_limit_kw(soc, s.cap_kwh[idx], s.p_dis_max_kw[idx], s.eta_dis[idx], s.v2g[idx],
                                  cfg.fleet.v2g_soc_min, dt_h))


def _slots(day: Day, fleet: FleetState, t: int, dt_h: float, idx: IntArray,
           need_kwh: FloatArray | None = None) -> tuple[IntArray, IntArray]:
    s = day.sessions
    if need_kwh is None:
        need_kwh = fl.need_kwh(fleet.soc[idx], s.soc_target[idx], s.cap_kwh[idx])
    return fl.charge_slots(need_kwh, s.p_ch_max_kw[idx], s.eta_ch[idx], dt_h), fleet.dep_step[idx] - t


def _must_charge(day: Day, fleet: FleetState, t: int, dt_h: float, idx: IntArray, need_kwh: FloatArray) -> BoolArray:
    """Sessions ``idx`` that would miss their target by waiting one more step (the TOU rule's fallback and the
    deadline shield's trigger)."""
    return _due(*_slots(day, fleet, t, dt_h, idx, need_kwh))


def _due(c_slots: IntArray, e_slots: IntArray) -> BoolArray:
    """Remaining charge slots that no longer fit in the parking slots left after one more idle step."""
    return c_slots >= e_slots - 1


# ---------------------------------------------------------------------- phase 1: requests


class Requests(NamedTuple):
    """What the plugged EVs ask for this step, one row per plugged session (P,)."""

    idx: IntArray  # plugged sessions
    env: IntArray  # their environment
    station: IntArray  # global station
    bus: IntArray  # global bus of the station
    zone: IntArray  # zone of the bus
    p_ch_av_kw: FloatArray  # largest charging power, kW >= 0
    p_dis_av_kw: FloatArray  # largest discharging power, kW >= 0
    need_kwh: FloatArray  # battery energy missing to the target before the step
    req_kw: FloatArray  # requested grid-side power (discharge negative), within the bounds
    forced: BoolArray  # uninterruptible sessions that started: their request is not negotiable


def requests(cfg: EnvConfig, layout: Layout, day: Day, fleet: FleetState, t: int, act: SimActions,
             multiplier: FloatArray) -> Requests:
    """Phase 1: the learned EVs' actions (with ``agents.ev_shield``), or the EV rule, turned into power requests
    within the bounds."""
    s, dt_h = day.sessions, cfg.dt_min / 60.0
    idx = np.flatnonzero(fleet.status == PLUGGED)
    env, stn = day.env[idx], fleet.station[idx]
    bus = layout.station_bus[stn % layout.n_station]
    zone = layout.zone_of_bus[bus]
    if act.ev_mode is not None:  # learned EVs: bounds, need and requests in one compiled pass
        frac = act.ev_power if act.ev_power is not None else np.ones(s.n)
        p_ch_av, p_dis_av, need, req = _learned_requests(
            idx, act.ev_mode, frac, fleet.soc, s.soc_target, s.cap_kwh, s.p_ch_max_kw, s.p_dis_max_kw, s.eta_ch,
            s.eta_dis, s.v2g, cfg.fleet.v2g_soc_min, dt_h)
        need_rate = need / (s.eta_ch[idx] * dt_h)
        if cfg.agents.ev_shield == "deadline":
            req = _deadline_shield(day, fleet, t, dt_h, idx, need, np.minimum(p_ch_av, need_rate), req)
    else:
        p_ch_av, p_dis_av = _bounds(cfg, day, fleet, idx)
        need = fl.need_kwh(fleet.soc[idx], s.soc_target[idx], s.cap_kwh[idx])
        need_rate = need / (s.eta_ch[idx] * dt_h)  # grid kW that reaches the target this step
        full = np.minimum(p_ch_av, need_rate)
        req = _rule_requests(cfg, day, fleet, t, idx, need, full, multiplier[env, zone])
    forced = np.zeros(idx.size, dtype=bool)
    if cfg.fleet.uninterruptible:  # seed 001: a session that started keeps full power until its target
        forced = fleet.started[idx] & (need_rate > _EPS_KW)
        req = np.where(forced, np.minimum(s.p_ch_max_kw[idx], p_ch_av), req)
    return Requests(idx, env, stn, bus, zone, p_ch_av, p_dis_av, need, req, forced)


def _deadline_shield(day: Day, fleet: FleetState, t: int, dt_h: float, idx: IntArray, need_kwh: FloatArray,
                     full_kw: FloatArray, req_kw: FloatArray) -> FloatArray:
    """``agents.ev_shield: deadline``: an EV that would miss its target by waiting one more step charges at
    ``full_kw``, and a discharge after which it would is held back (idle), so an EV whose target was within
    reach on arrival still reaches it, whatever its agent asks (unless its station or the grid curtail it)."""
    s = day.sessions
    req = np.where(_must_charge(day, fleet, t, dt_h, idx, need_kwh), np.maximum(req_kw, full_kw), req_kw)
    discharging = req < 0.0
    if discharging.any():
        after = need_kwh - fl.battery_kwh(np.minimum(req, 0.0), s.eta_ch[idx], s.eta_dis[idx], dt_h)
        req = np.where(discharging & _must_charge(day, fleet, t + 1, dt_h, idx, after), 0.0, req)
    return req


def _rule_requests(cfg: EnvConfig, day: Day, fleet: FleetState, t: int, idx: IntArray, need_kwh: FloatArray,
                   full_kw: FloatArray, multiplier: FloatArray) -> FloatArray:
    """Power each plugged rule EV asks for (kW, >= 0, at most ``full_kw``: its bound and what reaches its
    target)."""
    rule = cfg.agents.ev_rule
    if rule == "random":
        counts = np.bincount(day.env[idx], minlength=day.n_env)
        u = np.concatenate([day.rng_rule[e].random(int(n)) for e, n in enumerate(counts)])
        return full_kw * u
    if rule == "tou":
        must = _must_charge(day, fleet, t, cfg.dt_min / 60.0, idx, need_kwh)
        req = np.where((day.period[t] == VALLEY) | must, full_kw, 0.0)
    else:
        req = full_kw
    # price-elastic users (seed 003): a dearer period loses demand; a cheaper one cannot push a rule EV
    # past full power or its target, so there the rule's request stands
    factor = mk.elastic_demand_factor_now(multiplier, int(day.period[t]), cfg.market)
    return np.minimum(req * factor, full_kw)


@nb.njit(cache=True, nogil=True)
def _learned_requests(idx, mode, frac, soc, soc_target, cap_kwh, p_ch_max_kw, p_dis_max_kw, eta_ch, eta_dis, v2g,
                      v2g_soc_min, dt_h):  # pragma: no cover (compiled)
    """For plugged sessions ``idx`` with agents' ``mode``/``frac`` (indexed by session): the power bounds, the
    energy missing to the target and the request clipped into the bounds (discharge negative), in one pass
    over the fleet instead of ~25 numpy gathers and temporaries."""
    n = idx.shape[0]
    p_ch_av = np.empty(n)
    p_dis_av = np.empty(n)
    need = np.empty(n)
    req = np.empty(n)
    for k in range(n):
        i = idx[k]
        p_ch_av[k] = fl.nb_charge_limit_kw(soc[i], cap_kwh[i], p_ch_max_kw[i], eta_ch[i], dt_h)
        p_dis_av[k] = fl.nb_discharge_limit_kw(soc[i], cap_kwh[i], p_dis_max_kw[i], eta_dis[i], v2g[i], v2g_soc_min,
                                               dt_h)
        need[k] = fl.nb_need_kwh(soc[i], soc_target[i], cap_kwh[i])
        m = mode[i]
        r = frac[i] * p_ch_max_kw[i] if m == CHARGE else (-frac[i] * p_dis_max_kw[i] if m == DISCHARGE else 0.0)
        req[k] = min(max(r, -p_dis_av[k]), p_ch_av[k])
    return p_ch_av, p_dis_av, need, req


# ---------------------------------------------------------------------- phase 2: dispatch


def dispatch(cfg: EnvConfig, layout: Layout, day: Day, fleet: FleetState, t: int, req: Requests,
             station_fraction: FloatArray | None) -> FloatArray:
    """Phase 2: each station shares its limit among its EVs' charging requests; discharge passes through.
    Returns the EVs' grid-side power (P,), kW."""
    sc = cfg.stations
    n_st = day.n_env * layout.n_station
    stn, forced = req.station, req.forced
    charge = np.maximum(req.req_kw, 0.0)
    cap = np.full(n_st, sc.p_max_kw)
    frac = station_fraction
    if frac is not None and sc.dispatch == "equal":
        cap = cap * frac
    elif frac is not None and sc.dispatch == "cap":
        charge = np.minimum(charge, frac[stn] * day.sessions.p_ch_max_kw[req.idx])
    # forced (uninterruptible) EVs take their power first
    cap = np.maximum(cap - np.bincount(stn, np.where(forced, charge, 0.0), n_st), 0.0)
    free = ~forced
    out = np.where(forced, charge, 0.0)
    if sc.dispatch == "llf":
        c, e = _slots(day, fleet, t, cfg.dt_min / 60.0, req.idx[free], req.need_kwh[free])
        # the deadline shield overrides a learned station's fraction for its EVs at their deadline
        due = _due(c, e) & (c > 0) if cfg.agents.ev_shield == "deadline" else None
        out[free] = st.llf_dispatch(charge[free], stn[free], cap, frac if frac is not None else np.ones(n_st), c, e,
                                    due)
    else:
        out[free] = st.equal_share(charge[free], stn[free], cap)
    return out + np.minimum(req.req_kw, 0.0)


def storage_dispatch(cfg: EnvConfig, layout: Layout, day: Day, fleet: FleetState, t: int,
                     setpoint_kw: FloatArray | None) -> sg.StorageStep:
    """Phase 2, storage: the learned operators' set-points (E, U), or ``agents.storage_rule``'s, within each
    unit's bounds; the SOC it returns is the step's (storage is not curtailed)."""
    units, dt_h = layout.storage, cfg.dt_min / 60.0
    if setpoint_kw is None:
        setpoint_kw = sg.rule_setpoint_kw(cfg.agents.storage_rule, units, fleet.storage_soc, int(day.period[t]), dt_h)
    return sg.step(units, fleet.storage_soc, setpoint_kw, dt_h)


# ---------------------------------------------------------------------- phase 3: injections


class Injections(NamedTuple):
    """What the grid sees, per environment and bus (E, n_bus), kW, and each EV's place in it."""

    p_kw: FloatArray  # net load: base load + EVs - PV - wind - diesel
    q_kvar: FloatArray  # base load's reactive power
    flex_charge_kw: FloatArray  # EV charging enforcement may curtail
    flex_v2g_kw: FloatArray  # V2G discharge enforcement may add
    renewable_kw: FloatArray  # PV + wind output: what enforcement may curtail
    diesel_kw: FloatArray  # diesel output
    lin: IntArray  # (P,) each EV's cell of the flattened (E, n_bus) arrays
    charge_kw: FloatArray  # (P,) each EV's charging power
    spare_v2g_kw: FloatArray  # (P,) discharge each EV could still add


def injections(cfg: EnvConfig, layout: Layout, day: Day, t: int, req: Requests, p_ev: FloatArray,
               storage_kw: FloatArray) -> Injections:
    """Phase 3: the bus injections of every environment; ``storage_kw`` (E, U): the storage units' power."""
    n_env, n_bus = day.n_env, layout.n_bus
    lin = req.env * n_bus + req.bus
    width = n_env * n_bus
    charge = np.maximum(p_ev, 0.0)
    ev_bus = np.bincount(lin, p_ev, width).reshape(n_env, n_bus)
    flex_c = np.bincount(lin, charge, width).reshape(n_env, n_bus)
    spare_v2g = np.maximum(req.p_dis_av_kw + np.minimum(p_ev, 0.0), 0.0)
    flex_v = np.bincount(lin, spare_v2g, width).reshape(n_env, n_bus)
    load_pu = day.load_pu[:, t, :][:, layout.feeder_of_bus]  # (E, n_bus)
    gen = np.zeros((n_env, n_bus))
    for kind, out_pu in (("pv", day.pv_pu), ("wind", day.wind_pu)):
        np.add.at(gen, (slice(None), layout.der_bus[kind]), out_pu[:, t, None] * layout.der_kw[kind])
    renewable = gen.copy()
    ds_kw = layout.der_kw["diesel"]
    np.add.at(gen, (slice(None), layout.der_bus["diesel"]),
              np.broadcast_to(cfg.grid.diesel_output * ds_kw, (n_env, ds_kw.size)))
    p_kw = layout.base_p_kw * load_pu + ev_bus - gen
    if layout.storage.n:
        np.add.at(p_kw, (slice(None), layout.storage.bus), storage_kw)
    return Injections(p_kw, layout.base_q_kvar * load_pu, flex_c, flex_v, renewable, gen - renewable, lin, charge,
                      spare_v2g)


# ---------------------------------------------------------------------- phase 4: solve and enforce


class GridOutcome(NamedTuple):
    """The power flow of every feeder after limit enforcement, environments x buses (E, n_bus) unless noted."""

    vm_pu: FloatArray  # after enforcement
    vm_dispatch_pu: FloatArray  # of the dispatch alone, before enforcement
    curtail_kw: FloatArray  # EV charging curtailed
    v2g_add_kw: FloatArray  # V2G discharge added
    res_curtail_kw: FloatArray  # PV / wind output curtailed
    loss_kw: FloatArray  # (E,) all feeders
    feeder_load_kw: FloatArray  # (E, F) power drawn from upstream
    converged: BoolArray  # (E,) every feeder converged
    line_loading: FloatArray  # (E, n_branch) lines then transformers, feeder by feeder


def solve_and_enforce(grid: GridService, layout: Layout, inj: Injections) -> GridOutcome:
    """Phase 4: one request per feeder for all environments, every request sent before any answer is awaited
    (shards of a remote service then work in parallel)."""
    n_env, n_feeder = inj.p_kw.shape[0], len(layout.feeders)
    has_res = layout.der_bus["pv"].size + layout.der_bus["wind"].size > 0
    renewable = inj.renewable_kw if has_res else None  # None: no generation for enforcement to look at
    pending = []
    for f in range(n_feeder):
        sl = layout.feeder_slice(f)
        pending.append(grid.submit(f, inj.p_kw[:, sl], inj.q_kvar[:, sl], inj.flex_charge_kw[:, sl],
                                   inj.flex_v2g_kw[:, sl], renewable[:, sl] if renewable is not None else None))
    bus_fields = [np.empty_like(inj.p_kw) for _ in range(5)]  # vm, vm_dispatch, curtail, v2g, res_curtail
    loss = np.zeros(n_env)
    feeder_load = np.empty((n_env, n_feeder))
    converged = np.ones(n_env, dtype=bool)
    loading = []
    for f, job in enumerate(pending):
        sol = job.result()
        sl = layout.feeder_slice(f)
        for dest, part in zip(bus_fields, (sol.flow.vm_pu, sol.vm_dispatch_pu, sol.curtail_kw, sol.v2g_kw,
                                           sol.gen_curtail_kw)):
            dest[:, sl] = part
        loss += np.nan_to_num(sol.flow.loss_kw)
        feeder_load[:, f] = sol.flow.slack_p_kw
        converged &= sol.flow.converged
        loading.append(np.concatenate([sol.flow.line_loading, sol.flow.trafo_loading], axis=1))
    vm, vm_dispatch, curtail, v2g_add, res_curtail = bus_fields
    return GridOutcome(vm, vm_dispatch, curtail, v2g_add, res_curtail, loss, feeder_load, converged,
                       np.concatenate(loading, axis=1))


# ---------------------------------------------------------------------- phase 5: settle


class Settlement(NamedTuple):
    """Each plugged EV's outcome of the step (P,)."""

    p_ev_kw: FloatArray  # grid-side power after enforcement
    cut_ev_kw: FloatArray  # its share of the bus's curtailed charging
    ev_cost: FloatArray  # paid by the user (V2G income negative)
    e_batt_kwh: FloatArray  # energy through the battery, >= 0
    progress_kwh: FloatArray  # energy missing to the target before the step minus after it


def settle(cfg: EnvConfig, layout: Layout, day: Day, fleet: FleetState, req: Requests, inj: Injections,
           out: GridOutcome, p_ev: FloatArray, price_zone: FloatArray) -> Settlement:
    """Phase 5: each EV's share of its bus's curtailment and added V2G, then SOC, counters and costs (in
    ``fleet``)."""
    s, dt_h = day.sessions, cfg.dt_min / 60.0
    fleet.p_kw[:] = 0.0
    p, cut, cost, e_batt = _settle(
        req.idx, inj.lin, p_ev, inj.charge_kw, inj.spare_v2g_kw, inj.flex_charge_kw.ravel(), inj.flex_v2g_kw.ravel(),
        out.curtail_kw.ravel(), out.v2g_add_kw.ravel(), price_zone.ravel()[req.env * layout.n_zone + req.zone],
        cfg.market.v2g_price_ratio, dt_h, s.cap_kwh, s.eta_ch, s.eta_dis, fleet.soc, fleet.started, fleet.e_grid_kwh,
        fleet.e_v2g_kwh, fleet.e_curtailed_kwh, fleet.cost, fleet.p_kw)
    need_after = fl.need_kwh(fleet.soc[req.idx], s.soc_target[req.idx], s.cap_kwh[req.idx])
    return Settlement(p, cut, cost, e_batt, req.need_kwh - need_after)


@nb.njit(cache=True, nogil=True)
def _settle(idx, lin, p_ev, charge, spare_v2g, flex_c, flex_v, curtail, v2g_add, price_ev, v2g_price_ratio, dt_h,
            cap_kwh, eta_ch, eta_dis, soc, started, e_grid_kwh, e_v2g_kwh, e_curtailed_kwh, cost,
            p_kw):  # pragma: no cover (compiled)
    """Each plugged EV's share of its bus's curtailment (of charging) and added V2G (of spare discharge), then
    its SOC, counters and last power, in place.  ``lin``: the EV's (env, bus) cell of the flattened (E, n_bus)
    arrays.  Returns the EVs' final grid power, curtailed kW, cost and battery-side energy (kWh, >= 0).  One
    pass instead of ~30 numpy temporaries over the fleet."""
    n = idx.shape[0]
    p_out = np.empty(n)
    cut = np.empty(n)
    ev_cost = np.empty(n)
    e_batt = np.empty(n)
    for k in range(n):
        i = idx[k]
        b = lin[k]
        share_c = charge[k] / flex_c[b] if flex_c[b] > 0 else 0.0
        share_v = spare_v2g[k] / flex_v[b] if flex_v[b] > 0 else 0.0
        cut[k] = curtail[b] * share_c
        p = p_ev[k] - cut[k] - v2g_add[b] * share_v
        p_out[k] = p
        eb = fl.nb_battery_kwh(p, eta_ch[i], eta_dis[i], dt_h)
        soc[i] = soc[i] + eb / cap_kwh[i]
        if p > _EPS_KW:
            started[i] = True
        e = p * dt_h
        e_batt[k] = abs(eb)
        ev_cost[k] = e * price_ev[k] if e >= 0 else e * price_ev[k] * v2g_price_ratio
        e_grid_kwh[i] += e
        e_v2g_kwh[i] += max(-e, 0.0)
        e_curtailed_kwh[i] += cut[k] * dt_h
        cost[i] += ev_cost[k]
        p_kw[i] = p
    return p_out, cut, ev_cost, e_batt


# ---------------------------------------------------------------------- phase 6: account


def account(cfg: EnvConfig, layout: Layout, day: Day, fleet: FleetState, t: int, req: Requests, inj: Injections,
            out: GridOutcome, ev: Settlement, sto: sg.StorageStep, price_zone: FloatArray,
            multiplier: FloatArray) -> StepRecord:
    """Phase 6: zone loads and operating costs (carbon accounts per environment and zone), violations."""
    n_env, n_zone, dt_h = inj.p_kw.shape[0], layout.n_zone, cfg.dt_min / 60.0
    p_bus = inj.p_kw - out.curtail_kw - out.v2g_add_kw + out.res_curtail_kw
    width = n_env * n_zone
    zlin = (np.arange(n_env)[:, None] * n_zone + layout.zone_of_bus[None, :]).ravel()

    def by_zone(x: FloatArray) -> FloatArray:  # (E, n_bus) -> (E, Z)
        return np.bincount(zlin, x.ravel(), width).reshape(n_env, n_zone)

    zone_load = by_zone(p_bus)
    curtailed = out.res_curtail_kw.any()
    renewable = inj.renewable_kw - out.res_curtail_kw if curtailed else inj.renewable_kw
    costs = mk.operating_cost(
        purchase_kwh=zone_load * dt_h, diesel_kw=by_zone(inj.diesel_kw),
        curtailed_kwh=by_zone(out.res_curtail_kw) * dt_h if curtailed else np.zeros_like(zone_load), dt_h=dt_h,
        cum_excess_t=fleet.cum_excess_t, cfg=cfg.market, period=int(day.period[t]),
        renewable_kwh=by_zone(renewable) * dt_h)
    fleet.cum_excess_t = costs.cum_excess_t
    fleet.zone_load_sum_kw += zone_load
    outside = _outside_limits(layout, out.vm_pu)  # (E, n_bus) after enforcement
    outside_dispatch = _outside_limits(layout, out.vm_dispatch_pu)  # what the decisions alone would have caused
    return StepRecord(
        t=t, clock_h=float(day.clock_h[t]), period=int(day.period[t]), plugged=req.idx, ev_station=req.station,
        p_ev_kw=ev.p_ev_kw, cut_ev_kw=ev.cut_ev_kw, ev_cost=ev.ev_cost, e_batt_kwh=ev.e_batt_kwh,
        progress_kwh=ev.progress_kwh, vm_pu=out.vm_pu, line_loading=out.line_loading, loss_kw=out.loss_kw,
        feeder_load_kw=out.feeder_load_kw, converged=out.converged, curtail_kw=out.curtail_kw,
        v2g_add_kw=out.v2g_add_kw, res_curtail_kw=out.res_curtail_kw, zone_load_kw=zone_load,
        zone_mean_load_kw=fleet.zone_load_sum_kw / (t + 1),
        zone_ev_revenue=np.bincount(req.env * n_zone + req.zone, ev.ev_cost, width).reshape(n_env, n_zone),
        zone_cost=costs, zone_violations=by_zone(outside_dispatch.astype(float)),
        violations=outside_dispatch.sum(axis=1), violations_enforced=outside.sum(axis=1), price_zone=price_zone,
        price_mult=multiplier.copy(), storage_p_kw=sto.p_kw, storage_limited_kw=sto.limited_kw,
        storage_e_kwh=sto.e_batt_kwh, storage_soc=sto.soc)


def _outside_limits(layout: Layout, vm: FloatArray) -> BoolArray:
    """Buses outside [v_min, v_max]; a non-converged scenario counts at every bus."""
    return (vm < layout.v_min_pu - 1e-6) | (vm > layout.v_max_pu + 1e-6) | ~np.isfinite(vm)


# ---------------------------------------------------------------------- sessions: departures, arrivals


def advance_sessions(cfg: EnvConfig, layout: Layout, day: Day, fleet: FleetState, t: int,
                     feeder_load_kw: FloatArray | None) -> None:
    """At the start of step ``t``: departures, then requests (routed when configured) and plug-ins.
    ``feeder_load_kw`` (E, F): the last step's, what LBMS routing compares (None before the first step)."""
    leaving = (fleet.status == PLUGGED) & (fleet.dep_step <= t)
    if leaving.any():
        depart(day, fleet, np.flatnonzero(leaving), DEPARTED)
    if t >= cfg.n_steps:
        return
    new = np.flatnonzero((fleet.status == FUTURE) & (day.req_step == t))
    if new.size:
        if cfg.routing is not None:
            _route(cfg, layout, day, fleet, t, new, feeder_load_kw)
        else:
            fleet.status[new] = TRAVELLING
            fleet.plug_step[new] = t
    arriving = np.flatnonzero((fleet.status == TRAVELLING) & (fleet.plug_step == t))
    if arriving.size:
        _plug_in(cfg, layout, day, fleet, t, arriving)


def depart(day: Day, fleet: FleetState, idx: IntArray, status: int) -> None:
    """Sessions ``idx`` leave with ``status``; what they miss of their target is recorded."""
    s = day.sessions
    fleet.status[idx] = status
    fleet.unmet_kwh[idx] = fl.need_kwh(fleet.soc[idx], s.soc_target[idx], s.cap_kwh[idx])


def _route(cfg: EnvConfig, layout: Layout, day: Day, fleet: FleetState, t: int, idx: IntArray,
           feeder_load_kw: FloatArray | None) -> None:
    s, dt_h, n_env = day.sessions, cfg.dt_min / 60.0, day.n_env
    # network load the LBMS rule compares: each station's feeder load, per environment ...
    if feeder_load_kw is None:
        feeder_load_kw = np.zeros((n_env, len(layout.feeders)))
    env = day.env[idx]
    load = feeder_load_kw[env][:, layout.station_feeder]  # (n, M)
    if cfg.routing.lbms_load == "committed":  # ... plus the charging power of the EVs on their way there
        on_way = np.flatnonzero(fleet.status == TRAVELLING)
        en_route = np.bincount(fleet.station[on_way], s.p_ch_max_kw[on_way], n_env * layout.n_station)
        load = load + en_route.reshape(n_env, -1)[env]
    stations = np.empty(idx.size, dtype=np.int64)
    travel = np.empty(idx.size)
    e_travel = np.empty(idx.size)
    # a station chosen before the episode (the oracle's plan, Sim.reset(stations=...)) only costs the trip
    chosen = fleet.station[idx] >= 0
    if chosen.any():
        stations[chosen] = fleet.station[idx[chosen]] % layout.n_station
        travel[chosen], e_travel[chosen] = rt.trip(s.pos_km[idx[chosen]], layout.station_xy_km[stations[chosen]],
                                                   cfg.routing)
    # one call per environment keeps each environment's participation draws on its own stream
    for e in np.unique(env[~chosen]):
        sel = (env == e) & ~chosen
        # LBMS without herding: each request sees the charging power the earlier ones of the step will add
        r = rt.route(s.pos_km[idx[sel]], fleet.soc[idx[sel]], s.cap_kwh[idx[sel]], layout.station_xy_km, load[sel],
                     cfg.routing, day.rng_route[e], add_kw=s.p_ch_max_kw[idx[sel]])
        stations[sel], travel[sel], e_travel[sel] = r.station, r.travel_h, r.e_travel_kwh
    fleet.station[idx] = env * layout.n_station + stations
    fleet.e_travel_kwh[idx] = e_travel
    fleet.soc[idx] = np.maximum(fleet.soc[idx] - e_travel / s.cap_kwh[idx], 0.0)
    fleet.status[idx] = TRAVELLING
    fleet.plug_step[idx] = t + np.ceil(travel / dt_h - 1e-9).astype(np.int64)
    # a trip that ends after the episode never plugs in
    fleet.status[idx[fleet.plug_step[idx] >= cfg.n_steps]] = TRUNCATED


def _plug_in(cfg: EnvConfig, layout: Layout, day: Day, fleet: FleetState, t: int, idx: IntArray) -> None:
    """Arrivals take a free port of their station, first come first served in session order; the others are
    turned away.  The k-th EV to plug in within its environment becomes agent ``ev_<k>``."""
    dt_h, n_env = cfg.dt_min / 60.0, day.n_env
    occupied = np.bincount(fleet.station[fleet.status == PLUGGED], minlength=n_env * layout.n_station)
    free = np.maximum(cfg.stations.ports - occupied, 0)
    order = idx[np.argsort(fleet.station[idx], kind="stable")]
    stn = fleet.station[order]
    ok = np.arange(order.size) - st.group_starts(stn) < free[stn]
    depart(day, fleet, order[~ok], TURNED_AWAY)
    acc = np.sort(order[ok])
    if acc.size == 0:
        return
    fleet.status[acc] = PLUGGED
    fleet.soc_arrive[acc] = fleet.soc[acc]
    fixed = day.dep_fixed_step[acc] >= 0
    stay = np.maximum(np.floor(day.sessions.stay_h[acc] / dt_h + 1e-9).astype(np.int64), 1)
    fleet.dep_step[acc] = np.maximum(np.where(fixed, day.dep_fixed_step[acc], t + stay), t + 1)
    env = day.env[acc]
    order_env = np.argsort(env, kind="stable")
    e_sorted = env[order_env]
    fleet.ev_index[acc[order_env]] = fleet.n_plugged_total[e_sorted] + np.arange(acc.size) - st.group_starts(e_sorted)
    fleet.n_plugged_total += np.bincount(env, minlength=n_env)
    t_arr = cfg.start_hour + t * dt_h
    fleet.category[acc] = fl.user_category(np.full(acc.size, t_arr), cfg.start_hour + fleet.dep_step[acc] * dt_h,
                                           cfg.market.tariff)
