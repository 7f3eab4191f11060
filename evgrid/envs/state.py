"""The simulator's state, split by lifetime, and the typed record of one step.

* :class:`Layout` is fixed when the simulator is built: buses, zones, DER sites and stations of every
  feeder of the configuration.
* :class:`Day` is drawn at every reset: base load, PV and wind profiles, tariff periods and the EV
  sessions of each of the ``E`` lock-stepped environments.
* :class:`FleetState` evolves step by step: each session's status, SOC and counters, and the running sums
  the market needs.
* :class:`StepRecord` is what one step did; environments, rewards, logs and metrics read it.

Conventions: ``E`` environments, ``S`` sessions of all environments together (``Day.env`` says whose),
``P`` sessions plugged in during a step, ``n_bus`` buses of all feeders concatenated
(``Layout.bus_offset``), ``Z`` zones and ``M`` stations of one environment, numbered globally across
environments as ``env * M + j`` where a field says "global".  Power: load positive; an EV's ``p_kw`` > 0
charges.  Energy in kWh, money in the tariff's currency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt

from evgrid.envs import fleet as fl
from evgrid.envs import routing as rt
from evgrid.envs import storage as sg
from evgrid.envs.config import EnvConfig
from evgrid.envs.market import OperatingCost
from evgrid.grid import profiles
from evgrid.grid.feeders import Feeder
from evgrid.grid.service import build_feeders

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# session status
FUTURE, TRAVELLING, PLUGGED, DEPARTED, TURNED_AWAY, TRUNCATED = range(6)
STATUS = ("future", "travelling", "plugged", "departed", "turned_away", "truncated")
# EV action modes
CHARGE, IDLE, DISCHARGE = 0, 1, 2


@dataclass
class SimActions:
    """Decisions of the learned levels for one step; None where the level runs its rule."""

    price_multiplier: FloatArray | None = None  # (E, Z) for the next step
    station_fraction: FloatArray | None = None  # (E * M,) in [0, 1], global station order
    ev_mode: IntArray | None = None  # (S,) CHARGE / IDLE / DISCHARGE; read for plugged EVs
    ev_power: FloatArray | None = None  # (S,) fraction of the charger limit, [0, 1]
    storage_kw: FloatArray | None = None  # (E, U) storage set-points, grid side, kW (> 0 charges)


@dataclass(frozen=True, eq=False)
class Layout:
    """What is fixed at construction: the network and where things sit on it (one environment's view;
    every environment shares it)."""

    feeders: tuple[Feeder, ...]
    load_kinds: tuple[str, ...]  # (F,) base-load shape of each feeder
    bus_offset: IntArray  # (F + 1,) first global bus of each feeder
    zone_of_bus: IntArray  # (n_bus,) zones numbered across feeders
    feeder_of_bus: IntArray  # (n_bus,)
    base_p_kw: FloatArray  # (n_bus,) base load at the daily peak
    base_q_kvar: FloatArray  # (n_bus,)
    v_min_pu: FloatArray  # (n_bus,)
    v_max_pu: FloatArray  # (n_bus,)
    zone_nominal_kw: FloatArray  # (Z,) peak base load per zone, >= 1 kW (a normaliser)
    der_bus: dict[str, IntArray]  # "pv" / "wind" / "diesel" -> (n_unit,) global bus
    der_kw: dict[str, FloatArray]  # "pv" / "wind" / "diesel" -> (n_unit,) rating, kW
    station_bus: IntArray  # (M,) global bus
    station_xy_km: FloatArray  # (M, 2) position in the routing area
    storage: sg.StorageUnits  # (U,) stationary storage units (none without a storage section)

    @property
    def n_bus(self) -> int:
        return int(self.bus_offset[-1])

    @property
    def n_zone(self) -> int:
        return int(self.zone_nominal_kw.shape[0])

    @property
    def n_station(self) -> int:
        return int(self.station_bus.shape[0])

    @property
    def station_zone(self) -> IntArray:  # (M,)
        return self.zone_of_bus[self.station_bus]

    @property
    def station_feeder(self) -> IntArray:  # (M,)
        return self.feeder_of_bus[self.station_bus]

    def zone_der_kw(self, kind: str) -> FloatArray:
        """(Z,) rating of the DER of ``kind`` in each zone, kW."""
        return np.bincount(self.zone_of_bus[self.der_bus[kind]], self.der_kw[kind], self.n_zone)

    def feeder_slice(self, f: int) -> slice:
        return slice(int(self.bus_offset[f]), int(self.bus_offset[f + 1]))


def build_layout(cfg: EnvConfig) -> Layout:
    """The feeders of ``cfg.grid`` with their zones, DER and ``cfg.stations`` placed on them."""
    g = cfg.grid
    feeders, load_kinds, zones = build_feeders(g)
    bus_offset = np.cumsum([0] + [f.n_bus for f in feeders])
    zone_offset = np.cumsum([0] + [int(z.max()) + 1 for z in zones])
    zone_of_bus = np.concatenate([z + o for z, o in zip(zones, zone_offset[:-1])])
    base_p_kw = np.concatenate([f.base_p_kw for f in feeders]) * g.base_load_scale
    der_bus, der_kw = _der_sites(feeders, bus_offset)
    m = cfg.stations.n_station
    return Layout(
        feeders=tuple(feeders), load_kinds=tuple(load_kinds), bus_offset=bus_offset, zone_of_bus=zone_of_bus,
        feeder_of_bus=np.repeat(np.arange(len(feeders)), [f.n_bus for f in feeders]), base_p_kw=base_p_kw,
        base_q_kvar=np.concatenate([f.base_q_kvar for f in feeders]) * g.base_load_scale,
        v_min_pu=np.concatenate([f.v_min_pu for f in feeders]),
        v_max_pu=np.concatenate([f.v_max_pu for f in feeders]),
        zone_nominal_kw=np.maximum(np.bincount(zone_of_bus, base_p_kw, int(zone_offset[-1])), 1.0),
        der_bus=der_bus, der_kw=der_kw, station_bus=_station_buses(cfg, feeders, zone_of_bus, base_p_kw),
        station_xy_km=(rt.station_layout(m, cfg.routing.area_km) if cfg.routing is not None else np.zeros((m, 2))),
        storage=sg.place(cfg.storage, feeders, zone_of_bus, base_p_kw))


def _der_sites(feeders: list[Feeder], bus_offset: IntArray) -> tuple[dict[str, IntArray], dict[str, FloatArray]]:
    sites: dict[str, list[tuple[int, float]]] = {"pv": [], "wind": [], "diesel": []}
    for fi, f in enumerate(feeders):
        for b, k, p in zip(f.der_bus, f.der_kind, f.der_p_max_kw):
            sites[k].append((int(bus_offset[fi] + b), float(p)))
    return ({k: np.array([b for b, _ in v], dtype=np.int64) for k, v in sites.items()},
            {k: np.array([p for _, p in v], dtype=float) for k, v in sites.items()})


def _station_buses(cfg: EnvConfig, feeders: list[Feeder], zone_of_bus: IntArray, base_p_kw: FloatArray) -> IntArray:
    """Each station's global bus: the configured ones (the feeder's own numbering), or round-robin over the
    zones, inside a zone the load buses in turn, the most loaded first."""
    sc = cfg.stations
    if sc.buses is not None:
        if len(feeders) > 1:
            raise ValueError("stations.buses: a city's stations go one per network in turn; leave buses out")
        return np.array([feeders[0].position_of(b, "stations.buses") for b in sc.buses], dtype=np.int64)
    n_zone = int(zone_of_bus.max()) + 1
    bus = np.empty(sc.n_station, dtype=np.int64)
    for j in range(sc.n_station):
        z = j % n_zone
        cand = np.flatnonzero((zone_of_bus == z) & (base_p_kw > 0))
        if cand.size == 0:
            cand = np.flatnonzero(zone_of_bus == z)
        cand = cand[np.argsort(-base_p_kw[cand], kind="stable")]
        bus[j] = cand[(j // n_zone) % cand.size]
    return bus


@dataclass(frozen=True, eq=False)
class Day:
    """What one reset draws for every environment: profiles, tariff periods and sessions."""

    seed: int
    load_pu: FloatArray  # (E, T, F) base load over its peak, per feeder
    pv_pu: FloatArray  # (E, T) PV output over rating
    wind_pu: FloatArray  # (E, T) wind output over rating
    period: IntArray  # (T,) tariff period code per step (VALLEY / OFFPEAK / PEAK)
    clock_h: FloatArray  # (T,) clock time of each step, hours [0, 24)
    sessions: fl.Sessions  # (S,) every environment's sessions, environment by environment
    env: IntArray  # (S,) environment of each session
    req_step: IntArray  # (S,) step of the arrival (or of the charging request when routed)
    dep_fixed_step: IntArray  # (S,) fixed departure step, -1 where the stay starts at the plug-in
    rng_rule: tuple[np.random.Generator, ...]  # (E,) randomness of the rule controllers
    rng_route: tuple[np.random.Generator, ...]  # (E,) routing participation draws

    @property
    def n_env(self) -> int:
        return int(self.load_pu.shape[0])


def draw_day(cfg: EnvConfig, layout: Layout, n_env: int, seed: int) -> Day:
    """Environment e's day from ``(seed, e)``: independent child streams for sessions, profiles, rules and
    routing."""
    kids = [np.random.default_rng([seed, e]).spawn(4) for e in range(n_env)]
    load_pu, pv_pu, wind_pu = _profiles(cfg, layout, [k[1] for k in kids])
    dt_h = cfg.dt_min / 60.0
    days = math.ceil((cfg.start_hour + cfg.n_steps * dt_h) / 24)
    s0 = int(round(cfg.start_hour * 60 / cfg.dt_min))
    area_km = cfg.routing.area_km if cfg.routing is not None else 10.0
    parts = [fl.generate(cfg.fleet, k[0], n_station=layout.n_station, area_km=area_km) for k in kids]
    s = fl.Sessions.concat(parts)
    # times relative to the episode start, the day taken as periodic
    t_rel = (s.t_request_h - cfg.start_hour) % 24.0
    fixed = ~np.isnan(s.t_depart_h)
    dep_rel = np.where(fixed, t_rel + (s.t_depart_h - s.t_request_h), np.nan)
    return Day(
        seed=seed, load_pu=load_pu, pv_pu=pv_pu, wind_pu=wind_pu,
        period=cfg.market.tariff.period(cfg.dt_min, days)[s0:s0 + cfg.n_steps],
        clock_h=(cfg.start_hour + np.arange(cfg.n_steps) * dt_h) % 24.0, sessions=s,
        env=np.repeat(np.arange(n_env), [p.n for p in parts]),
        req_step=np.floor(t_rel / dt_h + 1e-9).astype(np.int64),
        dep_fixed_step=np.where(fixed, np.floor(np.nan_to_num(dep_rel) / dt_h + 1e-9), -1).astype(np.int64),
        rng_rule=tuple(k[2] for k in kids), rng_route=tuple(k[3] for k in kids))


def _profiles(cfg: EnvConfig, layout: Layout, rngs: list[np.random.Generator]) -> tuple[FloatArray, ...]:
    days = math.ceil((cfg.start_hour + cfg.n_steps * cfg.dt_min / 60) / 24)
    s0 = int(round(cfg.start_hour * 60 / cfg.dt_min))
    sl = slice(s0, s0 + cfg.n_steps)
    n_env, nf = len(rngs), len(layout.feeders)
    load = np.empty((n_env, cfg.n_steps, nf))
    pv = np.zeros((n_env, cfg.n_steps))
    wind = np.zeros((n_env, cfg.n_steps))
    for e, rng in enumerate(rngs):
        for fi in range(nf):
            load[e, :, fi] = profiles.load_shape(layout.load_kinds[fi], dt_min=cfg.dt_min, days=days, rng=rng)[sl]
        if layout.der_bus["pv"].size:
            pv[e] = profiles.pv_profile(dt_min=cfg.dt_min, days=days, rng=rng)[sl]
        if layout.der_bus["wind"].size:
            wind[e] = profiles.wind_profile(dt_min=cfg.dt_min, days=days, rng=rng)[sl]
    return load, pv, wind


@dataclass(eq=False)
class FleetState:
    """What evolves during an episode: per session (S,) and per environment and zone (E, Z)."""

    station: IntArray  # (S,) global station, -1 until routing chooses one
    status: npt.NDArray[np.int8]  # (S,) index into STATUS
    plug_step: IntArray  # (S,) step it plugs in (travellers: arrival step), -1 before
    dep_step: IntArray  # (S,) step it leaves, -1 before it plugs in
    soc: FloatArray  # (S,) state of charge now
    soc_arrive: FloatArray  # (S,) state of charge when it plugged in
    ev_index: IntArray  # (S,) k of agent ev_<k>: plug-in order within its environment, -1 before
    started: BoolArray  # (S,) has charged at all (uninterruptible sessions then keep going)
    e_grid_kwh: FloatArray  # (S,) net energy from the grid, grid side (charging - discharging)
    e_v2g_kwh: FloatArray  # (S,) energy discharged to the grid, grid side
    e_curtailed_kwh: FloatArray  # (S,) charging curtailed by limit enforcement, grid side
    cost: FloatArray  # (S,) paid by the user, V2G income negative
    e_travel_kwh: FloatArray  # (S,) battery energy spent driving to the station (routing)
    unmet_kwh: FloatArray  # (S,) battery energy short of the target when it left (NaN before)
    p_kw: FloatArray  # (S,) grid-side power of the last step
    category: npt.NDArray[np.int8]  # (S,) seed 003's user category (fleet.CATEGORIES)
    n_plugged_total: IntArray  # (E,) EVs plugged in so far: the next ev_<k> index
    cum_excess_t: FloatArray  # (E, Z) carbon emission excess since the episode began, tonnes
    zone_load_sum_kw: FloatArray  # (E, Z) zone net load summed over the steps so far
    storage_soc: FloatArray  # (E, U) state of charge of the stationary storage units

    @staticmethod
    def start(day: Day, n_env: int, n_zone: int, n_station: int, storage: sg.StorageUnits) -> FleetState:
        s = day.sessions
        n = s.n
        return FleetState(
            station=np.where(s.station >= 0, day.env * n_station + s.station, -1),
            status=np.full(n, FUTURE, dtype=np.int8), plug_step=np.full(n, -1, dtype=np.int64),
            dep_step=np.full(n, -1, dtype=np.int64), soc=s.soc0.copy(), soc_arrive=s.soc0.copy(),
            ev_index=np.full(n, -1, dtype=np.int64), started=np.zeros(n, dtype=bool), e_grid_kwh=np.zeros(n),
            e_v2g_kwh=np.zeros(n), e_curtailed_kwh=np.zeros(n), cost=np.zeros(n), e_travel_kwh=np.zeros(n),
            unmet_kwh=np.full(n, np.nan), p_kw=np.zeros(n), category=np.zeros(n, dtype=np.int8),
            n_plugged_total=np.zeros(n_env, dtype=np.int64), cum_excess_t=np.zeros((n_env, n_zone)),
            zone_load_sum_kw=np.zeros((n_env, n_zone)), storage_soc=np.tile(storage.soc0, (n_env, 1)))


@dataclass(frozen=True, slots=True, eq=False)
class StepRecord:
    """What one step did.  Per-EV fields cover the ``P`` sessions plugged in during the step (``plugged``);
    grid fields are after limit enforcement unless they say otherwise."""

    t: int
    """Step index in the episode (the step this record describes)."""
    clock_h: float
    """Clock time at the step's start, hours [0, 24)."""
    period: int
    """Tariff period code of the step (VALLEY / OFFPEAK / PEAK)."""
    plugged: IntArray
    """(P,) sessions plugged in during the step, ascending (environment by environment)."""
    ev_station: IntArray
    """(P,) their global station."""
    p_ev_kw: FloatArray
    """(P,) grid-side power after enforcement, kW (> 0 charging)."""
    cut_ev_kw: FloatArray
    """(P,) charging curtailed by limit enforcement, kW."""
    ev_cost: FloatArray
    """(P,) paid by each user this step (V2G income negative), currency."""
    e_batt_kwh: FloatArray
    """(P,) energy through the battery (in or out), battery side, kWh >= 0."""
    progress_kwh: FloatArray
    """(P,) energy missing to the target before the step minus after it, battery side, kWh (negative when
    discharge took the EV further away)."""
    vm_pu: FloatArray
    """(E, n_bus) bus voltages, p.u. (NaN where the flow did not converge)."""
    line_loading: FloatArray
    """(E, n_branch) line then transformer loading of every feeder, current / rating."""
    loss_kw: FloatArray
    """(E,) active losses of all feeders, kW."""
    feeder_load_kw: FloatArray
    """(E, F) power each feeder draws from upstream, kW (negative: export)."""
    converged: BoolArray
    """(E,) every feeder's flow converged."""
    curtail_kw: FloatArray
    """(E, n_bus) EV charging curtailed by limit enforcement, kW."""
    v2g_add_kw: FloatArray
    """(E, n_bus) V2G discharge added by limit enforcement, kW."""
    res_curtail_kw: FloatArray
    """(E, n_bus) PV and wind output curtailed by limit enforcement, kW."""
    zone_load_kw: FloatArray
    """(E, Z) zone net load (base load + EVs + storage - PV - wind - diesel), kW."""
    zone_mean_load_kw: FloatArray
    """(E, Z) zone net load averaged over the episode's steps so far, kW."""
    zone_ev_revenue: FloatArray
    """(E, Z) what the zone's EV users paid this step, currency."""
    zone_cost: OperatingCost
    """(E, Z) each zone's operating cost this step (purchase, diesel, carbon, curtailment)."""
    zone_violations: FloatArray
    """(E, Z) bus-steps outside the voltage limits in the zone, on the flow of the step's dispatch before
    enforcement."""
    violations: IntArray
    """(E,) buses outside the voltage limits on the flow before enforcement (what the decisions caused)."""
    violations_enforced: IntArray
    """(E,) buses still outside the voltage limits after enforcement."""
    price_zone: FloatArray
    """(E, Z) retail price in effect, currency per kWh."""
    price_mult: FloatArray
    """(E, Z) operators' price multiplier in effect."""
    storage_p_kw: FloatArray
    """(E, U) stationary storage power, grid side, kW (> 0 charging); part of its bus's load and its zone's
    purchase, never curtailed by limit enforcement."""
    storage_limited_kw: FloatArray
    """(E, U) set-point minus ``storage_p_kw``: what the unit's power and SOC bounds held back, kW."""
    storage_e_kwh: FloatArray
    """(E, U) energy into the storage cells (negative: out of them), kWh."""
    storage_soc: FloatArray
    """(E, U) storage state of charge after the step."""

    @property
    def total_load_kw(self) -> FloatArray:  # (E,)
        """Power drawn from upstream by all feeders, kW."""
        return self.feeder_load_kw.sum(axis=1)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
