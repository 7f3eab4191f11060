"""The simulator core: state arrays and one step.  No agent API here.

``Sim`` runs ``n_env`` independent copies of one configured scenario in
lock-step (a leading environment axis ``E``), so one step makes one batched
power-flow call per feeder for all of them.  Sessions of all environments
share flat arrays (``env[S]`` says whose); stations are numbered globally
(``env * n_station + j``); buses of all feeders are concatenated
(``bus_offset[f] + bus``).

Data flow of :meth:`Sim.step` (``../DESIGN.md``):

1. operators' price multipliers for the next step are announced;
2. each plugged EV requests a power: its agent's (mode, fraction), or the EV
   rule; physical bounds (charger, SOC window, V2G permission) always hold;
3. stations share their limit among their EVs (equal share, LLF, cap);
4. bus injections = base load + EV power − PV − wind − diesel;
5. power flow per feeder, all environments in one batch, warm-started;
6. limit enforcement curtails EV charging (and raises V2G) where voltages
   or loadings are violated; the curtailment is passed back to the EVs at
   each bus in proportion to their charging (their spare discharge);
7. settle: SOC, energy, costs, carbon; reward terms per level;
8. the clock advances: EVs whose stay ends leave, new ones arrive (routed
   first when a routing policy is configured).

Sign convention: EV power ``p_kw`` > 0 charges (a load), < 0 discharges.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numba as nb
import numpy as np
import numpy.typing as npt

from evgrid.envs import fleet as fl
from evgrid.envs import market as mk
from evgrid.envs import routing as rt
from evgrid.envs import stations as st
from evgrid.envs.config import EnvConfig
from evgrid.grid import profiles
from evgrid.grid.service import GridService, LocalGrid, build_feeders
from evgrid.grid.profiles import VALLEY

log = logging.getLogger(__name__)

# session status
FUTURE, TRAVELLING, PLUGGED, DEPARTED, TURNED_AWAY, TRUNCATED = range(6)
STATUS = ("future", "travelling", "plugged", "departed", "turned_away", "truncated")
# EV action modes
CHARGE, IDLE, DISCHARGE = 0, 1, 2
_EPS_KW = 1e-9


@dataclass
class SimActions:
    """Decisions of the learned levels for one step; None where the level runs its rule."""

    price_multiplier: npt.NDArray[np.float64] | None = None  # (E, Z) for the next step
    station_fraction: npt.NDArray[np.float64] | None = None  # (E * n_station,) in [0, 1]
    ev_mode: npt.NDArray[np.int64] | None = None  # (S,) CHARGE / IDLE / DISCHARGE; read for plugged EVs
    ev_power: npt.NDArray[np.float64] | None = None  # (S,) fraction of the charger limit, [0, 1]


class Sim:
    """``n_env`` lock-stepped environments of one configuration."""

    def __init__(self, cfg: EnvConfig, n_env: int = 1, grid: GridService | None = None) -> None:
        if n_env < 1:
            raise ValueError(f"n_env: expected >= 1, got {n_env}")
        self.cfg = cfg
        self.n_env = n_env
        self.dt_h = cfg.dt_min / 60.0
        self.n_steps = cfg.n_steps
        g = cfg.grid
        self.feeders, self.load_kinds, zone_of_bus = build_feeders(g)
        # buses of all feeders concatenated, zones numbered globally
        self.bus_offset = np.cumsum([0] + [f.n_bus for f in self.feeders])
        self.n_bus = int(self.bus_offset[-1])
        zoff = np.cumsum([0] + [int(z.max()) + 1 for z in zone_of_bus])
        self.zone_of_bus = np.concatenate([z + o for z, o in zip(zone_of_bus, zoff[:-1])])  # (n_bus,)
        self.n_zone = int(zoff[-1])
        self.feeder_of_bus = np.repeat(np.arange(len(self.feeders)), [f.n_bus for f in self.feeders])
        self.base_p_kw = np.concatenate([f.base_p_kw for f in self.feeders]) * g.base_load_scale  # (n_bus,) at peak
        self.base_q_kvar = np.concatenate([f.base_q_kvar for f in self.feeders]) * g.base_load_scale
        self.v_min_pu = np.concatenate([f.v_min_pu for f in self.feeders])
        self.v_max_pu = np.concatenate([f.v_max_pu for f in self.feeders])
        self.zone_nominal_kw = np.maximum(np.bincount(self.zone_of_bus, self.base_p_kw, self.n_zone), 1.0)
        self._place_der()
        self._place_stations()
        self.grid = grid if grid is not None else LocalGrid(self.feeders, cfg.grid)
        self.prices = mk.ZonePrices(n_env, self.n_zone, cfg.market)
        self._rng: list[np.random.Generator] = []
        self.t = 0
        self.episode = -1

    # ------------------------------------------------------------------ layout

    def _place_der(self) -> None:
        kinds = {"pv": [], "wind": [], "diesel": []}
        for fi, f in enumerate(self.feeders):
            for b, k, p in zip(f.der_bus, f.der_kind, f.der_p_max_kw):
                kinds[k].append((self.bus_offset[fi] + b, p))
        self.der = {k: (np.array([b for b, _ in v], dtype=np.int64), np.array([p for _, p in v], dtype=float))
                    for k, v in kinds.items()}

    def _place_stations(self) -> None:
        sc = self.cfg.stations
        m = sc.n_station
        if sc.buses is not None:
            if len(self.feeders) > 1:
                raise ValueError("stations.buses: give bus positions only for a single feeder; "
                                 "city stations go one per network in turn")
            bus = np.array([self.feeders[0].position_of(b, "stations.buses") for b in sc.buses], dtype=np.int64)
        else:
            bus = np.empty(m, dtype=np.int64)
            # round-robin over zones; inside a zone, the load buses in turn, the most loaded first
            for j in range(m):
                z = j % self.n_zone
                cand = np.flatnonzero((self.zone_of_bus == z) & (self.base_p_kw > 0))
                if cand.size == 0:
                    cand = np.flatnonzero(self.zone_of_bus == z)
                cand = cand[np.argsort(-self.base_p_kw[cand], kind="stable")]
                bus[j] = cand[(j // self.n_zone) % cand.size]
        self.station_bus = bus  # (m,) global bus
        self.station_zone = self.zone_of_bus[bus]
        self.station_feeder = self.feeder_of_bus[bus]
        self.n_station = m
        xy = rt.station_layout(m, self.cfg.routing.area_km) if self.cfg.routing is not None else np.zeros((m, 2))
        self.station_xy_km = xy

    # ------------------------------------------------------------------ episode

    def reset(self, seed: int | None = None) -> None:
        """New episode in every environment; ``seed`` seeds environment e with ``(seed, e)``."""
        cfg = self.cfg
        seed = cfg.seed if seed is None else seed
        self.episode += 1
        roots = [np.random.default_rng([seed, e]) for e in range(self.n_env)]
        # independent child streams: arrivals, loads/weather, rule randomness, routing participation
        kids = [r.spawn(4) for r in roots]
        self._rng_rule = [k[2] for k in kids]
        self._rng_route = [k[3] for k in kids]
        self._profiles([k[1] for k in kids])
        parts = [fl.generate(cfg.fleet, k[0], n_station=self.n_station,
                             area_km=cfg.routing.area_km if cfg.routing is not None else 10.0) for k in kids]
        self._init_sessions(parts)
        self.prices.reset()
        self.grid.reset()
        self.t = 0
        self.cum_excess_t = np.zeros((self.n_env, self.n_zone))
        self.zone_load_sum = np.zeros((self.n_env, self.n_zone))
        self.n_plugged_total = np.zeros(self.n_env, dtype=np.int64)
        self.last = None
        self._advance_sessions()

    def _profiles(self, rngs: list[np.random.Generator]) -> None:
        cfg = self.cfg
        days = math.ceil((cfg.start_hour + cfg.n_steps * cfg.dt_min / 60) / 24)
        s0 = int(round(cfg.start_hour * 60 / cfg.dt_min))
        sl = slice(s0, s0 + cfg.n_steps)
        nf = len(self.feeders)
        load = np.empty((self.n_env, cfg.n_steps, nf))
        pv = np.zeros((self.n_env, cfg.n_steps))
        wind = np.zeros((self.n_env, cfg.n_steps))
        for e, rng in enumerate(rngs):
            for fi in range(nf):
                load[e, :, fi] = profiles.load_shape(self.load_kinds[fi], dt_min=cfg.dt_min, days=days, rng=rng)[sl]
            if self.der["pv"][0].size:
                pv[e] = profiles.pv_profile(dt_min=cfg.dt_min, days=days, rng=rng)[sl]
            if self.der["wind"][0].size:
                wind[e] = profiles.wind_profile(dt_min=cfg.dt_min, days=days, rng=rng)[sl]
        self.load_pu = load  # (E, T, n_feeder)
        self.pv_pu = pv  # (E, T)
        self.wind_pu = wind  # (E, T)
        period = cfg.market.tariff.period(cfg.dt_min, days)[sl]
        self.period = period  # (T,) VALLEY / OFFPEAK / PEAK
        self.clock_h = (cfg.start_hour + np.arange(cfg.n_steps) * self.dt_h) % 24.0  # (T,)

    def _init_sessions(self, parts: list[fl.Sessions]) -> None:
        cfg = self.cfg
        s = fl.Sessions.concat(parts)
        n = s.n
        self.s = s
        self.env = np.repeat(np.arange(self.n_env), [p.n for p in parts])  # (S,)
        # times relative to the episode start, the day taken as periodic
        t_rel = (s.t_request_h - cfg.start_hour) % 24.0
        self.req_step = np.floor(t_rel / self.dt_h + 1e-9).astype(np.int64)
        fixed = ~np.isnan(s.t_depart_h)
        dep_rel = np.where(fixed, t_rel + (s.t_depart_h - s.t_request_h), np.nan)
        self.dep_fixed_step = np.where(fixed, np.floor(np.nan_to_num(dep_rel) / self.dt_h + 1e-9), -1).astype(np.int64)
        self.station = np.where(s.station >= 0, self.env * self.n_station + s.station, -1)  # (S,) global
        self.status = np.full(n, FUTURE, dtype=np.int8)
        self.plug_step = np.full(n, -1, dtype=np.int64)
        self.dep_step = np.full(n, -1, dtype=np.int64)
        self.soc = s.soc0.copy()
        self.soc_arrive = s.soc0.copy()
        self.ev_index = np.full(n, -1, dtype=np.int64)  # k of agent ev_<k>, in plug-in order per env
        self.started = np.zeros(n, dtype=bool)
        self.e_grid_kwh = np.zeros(n)  # net energy from the grid (charging - discharging)
        self.e_v2g_kwh = np.zeros(n)
        self.e_curtailed_kwh = np.zeros(n)
        self.cost = np.zeros(n)  # paid by the user (V2G income negative)
        self.e_travel_kwh = np.zeros(n)
        self.unmet_kwh = np.full(n, np.nan)
        self.p_kw = np.zeros(n)  # last step's power
        self.category = np.zeros(n, dtype=np.int8)

    # ------------------------------------------------------------------ arrivals / departures

    def _advance_sessions(self) -> None:
        """Departures at the start of step ``t``, then arrivals for it."""
        t = self.t
        leaving = (self.status == PLUGGED) & (self.dep_step <= t)
        if leaving.any():
            self._depart(np.flatnonzero(leaving), DEPARTED)
        if t >= self.n_steps:
            return
        new = np.flatnonzero((self.status == FUTURE) & (self.req_step == t))
        if new.size:
            if self.cfg.routing is not None:
                self._route(new)
            else:
                self.status[new] = TRAVELLING
                self.plug_step[new] = t
        arriving = np.flatnonzero((self.status == TRAVELLING) & (self.plug_step == t))
        if arriving.size:
            self._plug_in(arriving)

    def _route(self, idx: npt.NDArray[np.int64]) -> None:
        cfg = self.cfg
        s = self.s
        # network load the LBMS rule compares: each station's feeder load, per environment
        if self.last is None:
            feeder_load = np.zeros((self.n_env, len(self.feeders)))
        else:
            feeder_load = self.last["feeder_load_kw"]
        env = self.env[idx]
        load = feeder_load[env][:, self.station_feeder]  # (n, m)
        stations = np.empty(idx.size, dtype=np.int64)
        travel = np.empty(idx.size)
        e_travel = np.empty(idx.size)
        # one call per environment keeps each environment's participation draws on its own stream
        for e in np.unique(env):
            sel = env == e
            r = rt.route(s.pos_km[idx[sel]], self.soc[idx[sel]], s.cap_kwh[idx[sel]], self.station_xy_km, load[sel],
                         cfg.routing, self._rng_route[e])
            stations[sel], travel[sel], e_travel[sel] = r.station, r.travel_h, r.e_travel_kwh
        self.station[idx] = env * self.n_station + stations
        self.e_travel_kwh[idx] = e_travel
        self.soc[idx] = np.maximum(self.soc[idx] - e_travel / s.cap_kwh[idx], 0.0)
        self.status[idx] = TRAVELLING
        self.plug_step[idx] = self.t + np.ceil(travel / self.dt_h - 1e-9).astype(np.int64)
        # a trip that ends after the episode never plugs in
        late = idx[self.plug_step[idx] >= self.n_steps]
        self.status[late] = TRUNCATED

    def _plug_in(self, idx: npt.NDArray[np.int64]) -> None:
        sc = self.cfg.stations
        n_st = self.n_env * self.n_station
        occupied = np.bincount(self.station[self.status == PLUGGED], minlength=n_st)
        free = np.maximum(sc.ports - occupied, 0)
        # first come first served within a step, in session order
        order = idx[np.argsort(self.station[idx], kind="stable")]
        stn = self.station[order]
        starts = st._group_starts(stn)
        rank = np.arange(order.size) - starts
        ok = rank < free[stn]
        self.status[order[~ok]] = TURNED_AWAY
        self.unmet_kwh[order[~ok]] = self._need_kwh(order[~ok])
        acc = np.sort(order[ok])
        if acc.size == 0:
            return
        self.status[acc] = PLUGGED
        self.soc_arrive[acc] = self.soc[acc]
        fixed = self.dep_fixed_step[acc] >= 0
        stay = np.maximum(np.floor(self.s.stay_h[acc] / self.dt_h + 1e-9).astype(np.int64), 1)
        dep = np.where(fixed, self.dep_fixed_step[acc], self.t + stay)
        self.dep_step[acc] = np.maximum(dep, self.t + 1)
        # agent numbering: the k-th EV to plug in within its environment is ev_<k>
        env = self.env[acc]
        order_env = np.argsort(env, kind="stable")
        e_sorted = env[order_env]
        rank_env = np.arange(acc.size) - st._group_starts(e_sorted)
        self.ev_index[acc[order_env]] = self.n_plugged_total[e_sorted] + rank_env
        self.n_plugged_total += np.bincount(env, minlength=self.n_env)
        t_arr = self.cfg.start_hour + self.t * self.dt_h
        t_dep = self.cfg.start_hour + self.dep_step[acc] * self.dt_h
        self.category[acc] = fl.user_category(np.full(acc.size, t_arr), t_dep, self.cfg.market.tariff)

    def _need_kwh(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Battery energy still missing to the target."""
        return np.maximum(self.s.soc_target[idx] - self.soc[idx], 0.0) * self.s.cap_kwh[idx]

    def _depart(self, idx: npt.NDArray[np.int64], status: int) -> None:
        self.status[idx] = status
        self.unmet_kwh[idx] = self._need_kwh(idx)

    # ------------------------------------------------------------------ views used by the env and the rules

    def plugged(self) -> npt.NDArray[np.int64]:
        """Sessions plugged in now, in session order."""
        return np.flatnonzero(self.status == PLUGGED)

    def slots(self, idx: npt.NDArray[np.int64],
              need_kwh: npt.NDArray[np.float64] | None = None) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Seed 002's (c, e): remaining charge slots at full power and remaining parking slots (``need_kwh``:
        ``_need_kwh(idx)`` when the caller has it)."""
        s = self.s
        need_kwh = self._need_kwh(idx) if need_kwh is None else need_kwh
        c = st.charge_slots(need_kwh, s.p_ch_max_kw[idx], s.eta_ch[idx], self.dt_h)
        e = self.dep_step[idx] - self.t
        return c, e

    def bounds(self, idx: npt.NDArray[np.int64]) -> tuple[np.ndarray, np.ndarray]:
        s = self.s
        return fl.power_bounds(self.soc[idx], s.cap_kwh[idx], s.p_ch_max_kw[idx], s.p_dis_max_kw[idx], s.eta_ch[idx],
                               s.eta_dis[idx], s.v2g[idx], self.cfg.fleet.v2g_soc_min, self.dt_h)

    def retail_price(self) -> npt.NDArray[np.float64]:
        """Retail price per zone now, (E, Z) per kWh."""
        return self.prices.price_per_kwh(int(self.period[min(self.t, self.n_steps - 1)]))

    # ------------------------------------------------------------------ step

    def step(self, act: SimActions | None = None) -> dict:
        """Advance one step; returns this step's record (arrays per env / zone / station / session)."""
        if self.t >= self.n_steps:
            raise RuntimeError("step: the episode is over; call reset()")
        act = act or SimActions()
        cfg = self.cfg
        E, T, dt = self.n_env, self.t, self.dt_h
        s = self.s
        if act.price_multiplier is not None:
            self.prices.announce(act.price_multiplier)
        price_zone = self.retail_price()  # (E, Z) in effect this step
        idx = self.plugged()
        env = self.env[idx]
        stn = self.station[idx]
        bus = self.station_bus[stn % self.n_station]
        zone = self.zone_of_bus[bus]
        if act.ev_mode is not None:  # learned EVs: bounds, need and requests in one compiled pass
            frac = act.ev_power if act.ev_power is not None else np.ones(s.n)
            p_ch_av, p_dis_av, need_rate, req = _learned_requests(
                idx, act.ev_mode, frac, self.soc, s.soc_target, s.cap_kwh, s.p_ch_max_kw, s.p_dis_max_kw, s.eta_ch,
                s.eta_dis, s.v2g, cfg.fleet.v2g_soc_min, dt)
        else:
            p_ch_av, p_dis_av = self.bounds(idx)
            need_rate = self._need_kwh(idx) / (s.eta_ch[idx] * dt)  # grid kW that reaches the target this step
            req = self._rule_requests(idx, p_ch_av, need_rate)
        # uninterruptible sessions that started keep full power until their target (seed 001)
        forced = np.zeros(idx.size, dtype=bool)
        if cfg.fleet.uninterruptible:
            forced = self.started[idx] & (need_rate > _EPS_KW)
            req = np.where(forced, np.minimum(s.p_ch_max_kw[idx], p_ch_av), req)
        p_ev = self._dispatch(idx, stn, req, forced, act)
        # bus injections, (E, n_bus)
        lin = env * self.n_bus + bus
        width = E * self.n_bus
        charge = np.maximum(p_ev, 0.0)
        ev_bus = np.bincount(lin, p_ev, width).reshape(E, self.n_bus)
        flex_c = np.bincount(lin, charge, width).reshape(E, self.n_bus)
        spare_v2g = np.maximum(p_dis_av + np.minimum(p_ev, 0.0), 0.0)
        flex_v = np.bincount(lin, spare_v2g, width).reshape(E, self.n_bus)
        load_pu = self.load_pu[:, T, :][:, self.feeder_of_bus]  # (E, n_bus)
        base_p = self.base_p_kw * load_pu
        base_q = self.base_q_kvar * load_pu
        gen = np.zeros((E, self.n_bus))
        pv_b, pv_p = self.der["pv"]
        wd_b, wd_p = self.der["wind"]
        ds_b, ds_p = self.der["diesel"]
        np.add.at(gen, (slice(None), pv_b), self.pv_pu[:, T, None] * pv_p)
        np.add.at(gen, (slice(None), wd_b), self.wind_pu[:, T, None] * wd_p)
        renewable = gen.copy()
        np.add.at(gen, (slice(None), ds_b), np.broadcast_to(cfg.grid.diesel_output * ds_p, (E, ds_p.size)))
        p_bus = base_p + ev_bus - gen
        # power flow + limits per feeder, all environments in one batch
        vm = np.empty((E, self.n_bus))
        vm_dispatch = np.empty((E, self.n_bus))
        curtail = np.zeros((E, self.n_bus))
        v2g_add = np.zeros((E, self.n_bus))
        loss = np.zeros(E)
        feeder_load = np.empty((E, len(self.feeders)))
        converged = np.ones(E, dtype=bool)
        line_loading = []
        # every feeder's request goes out before any answer is awaited: shards of a remote service overlap
        pending = []
        for fi in range(len(self.feeders)):
            sl = slice(self.bus_offset[fi], self.bus_offset[fi + 1])
            pending.append(self.grid.submit(fi, p_bus[:, sl], base_q[:, sl], flex_c[:, sl], flex_v[:, sl],
                                            np.zeros_like(flex_v[:, sl])))
        for fi, job in enumerate(pending):
            sl = slice(self.bus_offset[fi], self.bus_offset[fi + 1])
            flow, c, v, _gc, vd = job.result()
            vm[:, sl] = flow.vm_pu
            vm_dispatch[:, sl] = vd
            curtail[:, sl] = c
            v2g_add[:, sl] = v
            loss += np.nan_to_num(flow.loss_kw)
            feeder_load[:, fi] = flow.slack_p_kw
            converged &= flow.converged
            line_loading.append(np.concatenate([flow.line_loading, flow.trafo_loading], axis=1))
        # pass curtailment and added V2G back to the EVs at each bus (pro rata), then settle each EV
        p_bus = p_bus - curtail - v2g_add
        self.p_kw[:] = 0.0
        p_ev, cut_ev, ev_cost, e_batt = _settle(
            idx, lin, p_ev, charge, spare_v2g, flex_c.ravel(), flex_v.ravel(), curtail.ravel(), v2g_add.ravel(),
            price_zone.ravel()[env * self.n_zone + zone], cfg.market.v2g_price_ratio, dt, s.cap_kwh, s.eta_ch,
            s.eta_dis, self.soc, self.started, self.e_grid_kwh, self.e_v2g_kwh, self.e_curtailed_kwh, self.cost,
            self.p_kw)
        # zones: net load, operator economics
        zl = E * self.n_zone
        zlin = (np.arange(E)[:, None] * self.n_zone + self.zone_of_bus[None, :]).ravel()
        zone_load = np.bincount(zlin, p_bus.ravel(), zl).reshape(E, self.n_zone)
        zone_diesel = np.bincount(zlin, (gen - renewable).ravel(), zl).reshape(E, self.n_zone)
        zone_renew = np.bincount(zlin, renewable.ravel(), zl).reshape(E, self.n_zone)
        zone_ev_rev = np.bincount(env * self.n_zone + zone, ev_cost, zl).reshape(E, self.n_zone)
        zone_curt = np.bincount(zlin, curtail.ravel(), zl).reshape(E, self.n_zone) * dt
        outside = self._outside_limits(vm)  # (E, n_bus) after enforcement
        outside_dispatch = self._outside_limits(vm_dispatch)  # what the decisions alone would have caused
        zone_viol = np.bincount(zlin, outside_dispatch.ravel().astype(float), zl).reshape(E, self.n_zone)
        costs = mk.operating_cost(
            purchase_kwh=zone_load * dt, diesel_kw=zone_diesel, curtailed_kwh=np.zeros_like(zone_load),
            dt_h=dt, cum_excess_t=self.cum_excess_t, cfg=cfg.market, period=int(self.period[T]),
            renewable_kwh=zone_renew * dt)
        self.cum_excess_t = costs["cum_excess_t"]
        self.zone_load_sum += zone_load
        mean_load = self.zone_load_sum / (T + 1)
        rec = dict(
            t=T, clock_h=float(self.clock_h[T]), period=int(self.period[T]), idx=idx, p_ev_kw=p_ev,
            cut_ev_kw=cut_ev, ev_cost=ev_cost, e_batt_kwh=e_batt,
            vm_pu=vm, line_loading=np.concatenate(line_loading, axis=1), loss_kw=loss, feeder_load_kw=feeder_load,
            total_load_kw=feeder_load.sum(axis=1), converged=converged, curtail_kw=curtail, v2g_add_kw=v2g_add,
            zone_load_kw=zone_load, zone_mean_load_kw=mean_load, zone_ev_revenue=zone_ev_rev, zone_costs=costs,
            zone_curtailed_kwh=zone_curt, zone_violations=zone_viol, violations=outside_dispatch.sum(axis=1),
            violations_enforced=outside.sum(axis=1), vm_dispatch_pu=vm_dispatch,
            price_zone=price_zone, price_mult=self.prices.current.copy(),
        )
        self.last = rec
        self.prices.advance()
        self.t += 1
        if self.t >= self.n_steps:
            # the episode ends with these EVs still plugged: their stay is cut, not finished
            still = np.flatnonzero(self.status == PLUGGED)
            self._depart(still, TRUNCATED)
            self.status[self.status == TRAVELLING] = TRUNCATED
        self._advance_sessions()
        rec["departed"] = np.flatnonzero((self.status == DEPARTED) & (self.dep_step == self.t))
        return rec

    def _outside_limits(self, vm: np.ndarray) -> np.ndarray:
        """Buses outside [v_min, v_max]; a non-converged scenario counts at every bus."""
        return (vm < self.v_min_pu - 1e-6) | (vm > self.v_max_pu + 1e-6) | ~np.isfinite(vm)

    def _rule_requests(self, idx, p_ch_av, need_rate) -> np.ndarray:
        """Power each plugged rule EV asks for (kW, >= 0), within its physical bounds."""
        cfg = self.cfg
        rule = cfg.agents.ev_rule
        full = np.minimum(p_ch_av, need_rate)
        if rule == "random":
            rng = self._rng_rule
            u = np.concatenate([rng[e].random(int(n)) for e, n in enumerate(np.bincount(self.env[idx], minlength=self.n_env))])
            return full * u
        if rule == "tou":
            c, e = self.slots(idx)
            must = c >= e - 1  # waiting one more step would miss the target
            now = (self.period[self.t] == VALLEY) | must
            req = np.where(now, full, 0.0)
        else:
            req = full
        # price-elastic users (seed 003): a dearer period loses demand; a cheaper one cannot push a rule EV
        # past full power or its target, so there the rule's request stands
        zone = self.zone_of_bus[self.station_bus[self.station[idx] % self.n_station]]
        factor = mk.elastic_demand_factor_now(self.prices.current[self.env[idx], zone], int(self.period[self.t]),
                                              cfg.market)
        return np.minimum(req * factor, full)

    def _dispatch(self, idx, stn, req, forced, act: SimActions) -> np.ndarray:
        """Share each station's limit among its EVs' charging requests; discharge passes through."""
        sc = self.cfg.stations
        n_st = self.n_env * self.n_station
        charge = np.maximum(req, 0.0)
        cap = np.full(n_st, sc.p_max_kw)
        frac = act.station_fraction
        if frac is not None and sc.dispatch == "equal":
            cap = cap * frac
        elif frac is not None and sc.dispatch == "cap":
            charge = np.minimum(charge, frac[stn] * self.s.p_ch_max_kw[idx])
        # forced (uninterruptible) EVs take their power first
        cap = np.maximum(cap - np.bincount(stn, np.where(forced, charge, 0.0), n_st), 0.0)
        free = ~forced
        out = np.where(forced, charge, 0.0)
        if sc.dispatch == "llf":
            c, e = self.slots(idx[free])
            out[free] = st.llf_dispatch(charge[free], stn[free], cap, frac if frac is not None else np.ones(n_st), c, e)
        else:
            out[free] = st.equal_share(charge[free], stn[free], cap)
        return out + np.minimum(req, 0.0)


@nb.njit(cache=True, nogil=True)
def _learned_requests(idx, mode, frac, soc, soc_target, cap_kwh, p_ch_max_kw, p_dis_max_kw, eta_ch, eta_dis, v2g,
                      v2g_soc_min, dt_h):  # pragma: no cover (compiled)
    """For plugged sessions ``idx`` with agents' ``mode``/``frac`` (indexed by session): ``fleet.power_bounds``,
    the grid kW that reaches the target this step, and the request clipped into the bounds (discharge negative).
    One pass over the fleet instead of ~25 numpy gathers and temporaries; the same expressions, so the same
    values to the last bit."""
    n = idx.shape[0]
    p_ch_av = np.empty(n)
    p_dis_av = np.empty(n)
    need_rate = np.empty(n)
    req = np.empty(n)
    for k in range(n):
        i = idx[k]
        p_ch_av[k] = min(p_ch_max_kw[i], max(1.0 - soc[i], 0.0) * cap_kwh[i] / (eta_ch[i] * dt_h))
        p_dis_av[k] = min(p_dis_max_kw[i], max(soc[i] - v2g_soc_min, 0.0) * cap_kwh[i] * eta_dis[i] / dt_h) \
            if v2g[i] else 0.0
        need_rate[k] = max(soc_target[i] - soc[i], 0.0) * cap_kwh[i] / (eta_ch[i] * dt_h)
        m = mode[i]
        r = frac[i] * p_ch_max_kw[i] if m == CHARGE else (-frac[i] * p_dis_max_kw[i] if m == DISCHARGE else 0.0)
        req[k] = min(max(r, -p_dis_av[k]), p_ch_av[k])
    return p_ch_av, p_dis_av, need_rate, req


@nb.njit(cache=True, nogil=True)
def _settle(idx, lin, p_ev, charge, spare_v2g, flex_c, flex_v, curtail, v2g_add, price_ev, v2g_price_ratio, dt_h,
            cap_kwh, eta_ch, eta_dis, soc, started, e_grid_kwh, e_v2g_kwh, e_curtailed_kwh, cost,
            p_kw):  # pragma: no cover (compiled)
    """Each plugged EV's share of its bus's curtailment (of charging) and added V2G (of spare discharge), then
    its SOC (``fleet.apply_power``), counters and last power, in place.  ``lin``: the EV's (env, bus) cell of
    the flattened (E, n_bus) arrays.  Returns the EVs' final grid power, curtailed kW, cost and battery-side
    energy (kWh, >= 0).  One pass instead of ~30 numpy temporaries over the fleet."""
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
        eb = (p * eta_ch[i] if p >= 0.0 else p / eta_dis[i]) * dt_h
        soc[i] = soc[i] + eb / cap_kwh[i]
        if p > _EPS_KW:
            started[i] = True
        e = p * dt_h
        e_batt[k] = abs(e * eta_ch[i] if e >= 0 else e / eta_dis[i])
        ev_cost[k] = e * price_ev[k] if e >= 0 else e * price_ev[k] * v2g_price_ratio
        e_grid_kwh[i] += e
        e_v2g_kwh[i] += max(-e, 0.0)
        e_curtailed_kwh[i] += cut[k] * dt_h
        cost[i] += ev_cost[k]
        p_kw[i] = p
    return p_out, cut, ev_cost, e_batt
