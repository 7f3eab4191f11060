"""Multi-period optimal power flow on a radial feeder (physics only: numpy, scipy, cvxpy; no RL imports).

Over a horizon of ``T`` steps the model schedules the controllable injections of a :class:`Feeder`:

* EV sessions (:class:`Sessions`): charging, and discharge (V2G) where allowed, within each session's
  window, power bounds and state-of-charge bounds, reaching its energy target by departure.  A stationary
  battery is a session that spans the horizon;
* PV and wind: output up to the available power (the rest is curtailed), diesel up to its rating;
* capacitor banks: reactive injection, a continuous relaxation of their steps.

Formulations (``formulation``):

``lindistflow``
    The linearised DistFlow model (Baran & Wu 1989; seed 001 eq 5): along each branch the squared voltage
    falls by ``2 (r P + x Q)``, losses neglected, written as branch-flow rows (each reads a node and its
    parent or children, a sparse problem).  Branch ampacity is a 16-sided polygon inside the circle
    ``P² + Q² <= S²`` (an LP/QP).  Before the first solve, one AC sweep of the loads alone gives each node a
    squared-voltage offset and each step its losses (``ac_offsets``): they carry transformer ratios and
    losses, and keep the model within ~1e-3 p.u. of AC.  ``ac_rounds`` re-solves with the residuals at the
    solution itself.
``socp``
    The DistFlow branch-flow model with the current equality ``l v = P² + Q²`` relaxed to a rotated cone
    (Farivar & Low 2013); exact where the cone is tight, which :class:`ACCheck` reports.

Every solution is re-solved with the AC sweep (``result.ac``).  Solvers are open source only (cvxpy with
Clarabel, HiGHS, SCS).  An infeasible problem raises :class:`InfeasibleError` naming what cannot be met:
sessions whose energy target is out of reach are found before solving; otherwise the problem is re-solved with
every limit softened and the limits that had to give are named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from evgrid.grid.feeders import Feeder, MeshedFeederError
from evgrid.validate import check_choice, check_int, check_real

log = logging.getLogger(__name__)

FORMULATIONS = ("lindistflow", "socp")
EV_MODELS = ("sessions", "aggregate")
SOLVERS = ("auto", "CLARABEL", "HIGHS", "SCS")
_POLYGON_SIDES = 16
# Clarabel's default (faer, multithreaded) factorises these KKT systems ~10x slower than QDLDL on 2 cores
_SOLVER_SETTINGS = {"CLARABEL": {"direct_solve_method": "qdldl"}, "HIGHS": {"output_flag": False}}
# penalty per unit of slack when limits are softened (diagnosis, or ``soft=True``): dominates any cost
SOFT_PENALTY = {"voltage_pu": 1e6, "voltage_high_pu": 1e6, "loading_kw": 1e3, "target_kwh": 1e3, "ramp_kw": 1e3}


class InfeasibleError(ValueError):
    """The schedule cannot meet every limit; the message names those that cannot be met."""


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True, eq=False)
class Horizon:
    """What the planner knows of the horizon: ``T`` steps of ``dt_h`` hours.

    ``load_*``: each bus's uncontrollable load (positive = consumption); ``der_avail_kw``: the power each of the
    feeder's DER sites can give at each step (PV, wind: the forecast; diesel: its rating)."""

    dt_h: float
    load_p_kw: npt.NDArray[np.float64]  # (T, n_bus)
    load_q_kvar: npt.NDArray[np.float64]  # (T, n_bus)
    der_avail_kw: npt.NDArray[np.float64]  # (T, n_der)

    @property
    def n_step(self) -> int:
        return int(self.load_p_kw.shape[0])

    def check(self, feeder: Feeder) -> None:
        check_real("dt_h", self.dt_h, 0.0, 24.0, lo_open=True)
        t = self.n_step
        for name, n in (("load_p_kw", feeder.n_bus), ("load_q_kvar", feeder.n_bus),
                        ("der_avail_kw", len(feeder.der_kind))):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.shape != (t, n) or not np.isfinite(a).all():
                raise ValueError(f"{name}: expected finite numbers of shape ({t}, {n}) (steps, "
                                 f"{'buses' if 'load' in name else 'DER sites'}), got "
                                 f"{getattr(a, 'shape', type(a).__name__)}")
        if (self.der_avail_kw < 0).any() or (self.der_avail_kw > feeder.der_p_max_kw + 1e-9).any():
            raise ValueError("der_avail_kw: expected values in [0, the site's der_p_max_kw]")


@dataclass(frozen=True, eq=False)
class Sessions:
    """EV sessions (and stationary batteries) as arrays over sessions.

    A session is plugged in for the steps ``start <= t < end`` of the horizon at bus ``bus`` (position in
    ``feeder.bus_ids``).  Powers are at the grid side of the charger, energies at the battery side:
    ``e(t+1) = e(t) + dt (eta_ch p_ch - p_dis / eta_dis)``; ``e_min_kwh <= e <= cap_kwh`` while plugged, and
    ``e(end) >= e_target_kwh``.  ``station``: the charging station of each session (-1: none), for ramp
    limits."""

    bus: npt.NDArray[np.int64]  # (n,)
    start: npt.NDArray[np.int64]  # (n,)
    end: npt.NDArray[np.int64]  # (n,)
    p_ch_max_kw: npt.NDArray[np.float64]  # (n,)
    p_dis_max_kw: npt.NDArray[np.float64]  # (n,) 0 without V2G
    cap_kwh: npt.NDArray[np.float64]  # (n,)
    e0_kwh: npt.NDArray[np.float64]  # (n,) stored energy at plug-in
    e_target_kwh: npt.NDArray[np.float64]  # (n,) at least this much at departure
    e_min_kwh: npt.NDArray[np.float64]  # (n,) floor while discharging
    eta_ch: npt.NDArray[np.float64]  # (n,)
    eta_dis: npt.NDArray[np.float64]  # (n,)
    station: npt.NDArray[np.int64]  # (n,) -1: none

    @property
    def n(self) -> int:
        return int(self.bus.shape[0])

    @staticmethod
    def empty() -> Sessions:
        i, f = np.zeros(0, np.int64), np.zeros(0)
        return Sessions(i, i, i, f, f, f, f, f, f, f, f, i)

    def check(self, feeder: Feeder, n_step: int) -> None:
        n = self.n
        for name in ("bus", "start", "end", "p_ch_max_kw", "p_dis_max_kw", "cap_kwh", "e0_kwh", "e_target_kwh",
                     "e_min_kwh", "eta_ch", "eta_dis", "station"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.shape != (n,) or not np.isfinite(a).all():
                raise ValueError(f"sessions.{name}: expected {n} finite numbers, got "
                                 f"{getattr(a, 'shape', type(a).__name__)}")
        bad = [("bus", (self.bus < 0) | (self.bus >= feeder.n_bus), f"[0, {feeder.n_bus - 1}]"),
               ("start", (self.start < 0) | (self.start >= self.end), "[0, end)"),
               ("end", self.end > n_step, f"<= {n_step} (steps of the horizon)"),
               ("p_ch_max_kw", self.p_ch_max_kw < 0, ">= 0"), ("p_dis_max_kw", self.p_dis_max_kw < 0, ">= 0"),
               ("cap_kwh", self.cap_kwh <= 0, "> 0"),
               ("e0_kwh", (self.e0_kwh < self.e_min_kwh) | (self.e0_kwh > self.cap_kwh), "[e_min_kwh, cap_kwh]"),
               ("e_target_kwh", self.e_target_kwh > self.cap_kwh, "<= cap_kwh"),
               ("e_min_kwh", self.e_min_kwh < 0, ">= 0"),
               ("eta_ch", (self.eta_ch <= 0) | (self.eta_ch > 1), "(0, 1]"),
               ("eta_dis", (self.eta_dis <= 0) | (self.eta_dis > 1), "(0, 1]")]
        for name, mask, allowed in bad:
            if mask.any():
                k = int(np.flatnonzero(mask)[0])
                raise ValueError(f"sessions.{name}: session {k} has {getattr(self, name)[k].item()!r}, expected {allowed}")


@dataclass(frozen=True)
class CarbonLadder:
    """Stepped carbon price (seed 003 eqs 2-5): emissions above the free ``quota_t`` cost ``base_price_per_t``
    for the first ``step_t`` tonnes, step k at ``base_price_per_t (1 + k growth)`` (eq 4's linear growth, as
    :class:`evgrid.envs.market.CarbonConfig`); below the quota the allowance sells at the base price.  Convex
    (rising prices), so it is an exact LP epigraph."""

    base_price_per_t: float = 200.0
    step_t: float = 50.0
    growth: float = 0.25
    n_steps: int = 5
    quota_t: float = 0.0

    def cost(self, emissions_t: float) -> float:
        """Reference evaluation (the model's epigraph must agree)."""
        return max(self._pieces(emissions_t))

    def _pieces(self, e):
        # the convex piecewise-linear function as a max of lines: below the quota, the base price
        out, c0, x0 = [self.base_price_per_t * (e - self.quota_t)], 0.0, self.quota_t
        for k in range(self.n_steps):
            price = self.base_price_per_t * (1 + self.growth * k)
            out.append(c0 + price * (e - x0))
            c0, x0 = c0 + price * self.step_t, x0 + self.step_t
        return out


@dataclass(frozen=True)
class Objective:
    """Terms of the objective, each off by default (currency: the config's).

    * ``tie_target_kw``: (T,) squared deviation of the power drawn from upstream from this target, in MW²
      summed over steps (seed 001 stage 1, eq 9);
    * ``energy_price_per_kwh``: (T,) price of energy bought upstream (exports earn nothing);
    * ``capacity_price_per_kw``: on the horizon's peak purchase;
    * ``curtail_cost_per_kwh``: on PV and wind left unused;
    * ``diesel_cost``: ``(a per kW² h, b per kWh)``, quadratic fuel cost of each diesel site;
    * ``carbon``: stepped carbon price on purchases' emissions (``grid_kg_per_kwh`` of each kWh bought) and
      diesel's (``diesel_kg_per_kwh``);
    * ``loss_price_per_kwh``: on network losses (seed 003 eq 6; LinDistFlow has none: use ``socp``);
    * ``peak_valley_weight``: on the spread between the highest and lowest purchase, per kW."""

    tie_target_kw: npt.NDArray[np.float64] | None = None
    energy_price_per_kwh: npt.NDArray[np.float64] | None = None
    capacity_price_per_kw: float = 0.0
    curtail_cost_per_kwh: float = 0.0
    diesel_cost: tuple[float, float] = (0.0, 0.0)
    carbon: CarbonLadder | None = None
    grid_kg_per_kwh: float = 0.0
    diesel_kg_per_kwh: float = 0.0
    loss_price_per_kwh: float = 0.0
    peak_valley_weight: float = 0.0
    accounts: Accounts | None = None


@dataclass(frozen=True, eq=False)
class Accounts:
    """Zone accounts settled the simulator's way (:func:`evgrid.envs.market.operating_cost`): each zone's net load
    (its buses' loads + EVs - DER; losses are not a zone's) is bought at ``price_per_kwh`` (export earns it),
    and each zone's emission excess over the horizon, ``kg_per_kwh`` of every kWh its net load draws (the
    positive part) plus the fixed ``excess_t`` (e.g. diesel emissions minus quota), costs the convex
    piecewise-linear ``max(slope * excess + intercept)`` over ``carbon_lines`` (currency per tonne, currency)."""

    zone_of_bus: npt.NDArray[np.int64]  # (n_bus,) zones 0..Z-1
    price_per_kwh: npt.NDArray[np.float64]  # (T,)
    kg_per_kwh: float = 0.0
    excess_t: npt.NDArray[np.float64] | None = None  # (T, Z)
    carbon_lines: tuple[tuple[float, float], ...] = ()

    @property
    def n_zone(self) -> int:
        return int(self.zone_of_bus.max()) + 1

    def check(self, n_bus: int, T: int) -> None:
        z = self.zone_of_bus
        if not isinstance(z, np.ndarray) or z.shape != (n_bus,) or z.min() < 0:
            raise ValueError(f"accounts.zone_of_bus: expected {n_bus} zone numbers >= 0 (one per bus)")
        _series("accounts.price_per_kwh", self.price_per_kwh, T)
        check_real("accounts.kg_per_kwh", self.kg_per_kwh, 0.0, 1e3)
        if self.excess_t is not None and (np.shape(self.excess_t) != (T, self.n_zone)
                                          or not np.isfinite(self.excess_t).all()):
            raise ValueError(f"accounts.excess_t: expected finite numbers of shape ({T}, {self.n_zone}) (steps, "
                             f"zones), got {np.shape(self.excess_t)}")
        slopes = [a for a, _ in self.carbon_lines]
        if any(not math.isfinite(a) or not math.isfinite(b) for a, b in self.carbon_lines):
            raise ValueError("accounts.carbon_lines: expected finite (slope, intercept) pairs")
        if slopes and min(slopes) < 0 and max(slopes) <= 0:
            raise ValueError("accounts.carbon_lines: expected a cost that rises with emissions (a positive slope)")


def flat_target_kw(base_kw: npt.ArrayLike, energy_kwh: float, dt_h: float) -> npt.NDArray[np.float64]:
    """Seed 001 eqs 6-8: the base load filled up to a flat level with ``energy_kwh`` (water-filling): where
    the energy exceeds what fills every step to the base peak, the target is flat above it."""
    base = np.asarray(base_kw, dtype=float)
    check_real("energy_kwh", energy_kwh, 0.0, math.inf)
    if energy_kwh == 0.0:
        return base.copy()
    srt = np.sort(base)
    # energy needed to lift every step below srt[k] up to srt[k]
    fill = (srt * np.arange(1, srt.size + 1) - np.cumsum(srt)) * dt_h
    k = int(np.searchsorted(fill, energy_kwh, side="right")) - 1
    level = srt[k] + (energy_kwh - fill[k]) / ((k + 1) * dt_h)
    return np.maximum(base, level)


# -------------------------------------------------------------------------------------------- the network


@dataclass(frozen=True, eq=False)
class Network:
    """What the model needs of a radial feeder beyond the feeder itself."""

    feeder: Feeder
    kw_per_pu: float
    paths: npt.NDArray[np.float64]  # (n_node, n_node) RadialTree.paths()
    s_max_kva: npt.NDArray[np.float64]  # (n_elem,) rating as apparent power at the lowest allowed voltage
    v0_pu: float

    @staticmethod
    def of(feeder: Feeder) -> Network:
        t = feeder.tree
        if t is None:
            raise MeshedFeederError(f"feeder {feeder.name!r}: the OPF needs a radial feeder; {feeder.mesh_error}")
        anc = t.paths()
        kw_per_pu = t.base_mva * 1e3
        i_max_pu = (t.elem_rating_ka / t.elem_ibase_ka).min(axis=1)
        # the lowest voltage allowed on a bus each element feeds
        fed = anc[np.ix_(t.node_of_bus, t.elem_node)]  # (n_bus, n_elem)
        v_low = np.where(fed > 0, feeder.v_min_pu[:, None], np.inf).min(axis=0)
        v_low = np.where(np.isfinite(v_low), v_low, feeder.v_min_pu.min())
        return Network(feeder=feeder, kw_per_pu=kw_per_pu, paths=anc, s_max_kva=i_max_pu * v_low * kw_per_pu,
                       v0_pu=abs(t.v_slack))


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True, eq=False)
class ACCheck:
    """The OPF's solution re-solved with the AC sweep."""

    vm_pu: npt.NDArray[np.float64]  # (T, n_bus) AC voltages of the scheduled injections
    loss_kw: npt.NDArray[np.float64]  # (T,) AC losses
    max_loading: float  # largest current / rating of any element at any step (AC)
    max_dv_pu: float  # max |V_opf - V_ac|
    max_loss_error_kw: float  # max |loss_opf - loss_ac|
    cone_gap: float | None  # socp: max relative slack of the relaxed current equality (0 = tight)
    converged: bool


@dataclass(frozen=True, eq=False)
class OPFResult:
    formulation: str
    solver: str
    status: str
    objective: float
    costs: dict[str, float]  # each objective term's value
    build_s: float
    solve_s: float
    p_ch_kw: npt.NDArray[np.float64]  # (n_session, T)
    p_dis_kw: npt.NDArray[np.float64]  # (n_session, T)
    e_kwh: npt.NDArray[np.float64]  # (n_session, T + 1) stored energy at the start of each step (and the end)
    der_kw: npt.NDArray[np.float64]  # (T, n_der) output of each DER site
    q_cap_kvar: npt.NDArray[np.float64]  # (T, n_cap)
    tracking_kwh: float  # aggregate EV model: energy by which the sessions' shares miss their groups' profiles
    p_bus_kw: npt.NDArray[np.float64]  # (T, n_bus) net load per bus (loads + EVs - DER)
    q_bus_kvar: npt.NDArray[np.float64]  # (T, n_bus)
    tie_kw: npt.NDArray[np.float64]  # (T,) power drawn from upstream, model's
    vm_pu: npt.NDArray[np.float64]  # (T, n_bus) model's voltages
    loss_kw: npt.NDArray[np.float64]  # (T,) model's losses
    slack: dict[str, float] = field(default_factory=dict)  # soft limits: total violation of each kind
    ac: ACCheck | None = None


# ----------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Capacitors:
    """Capacitor banks: ``bus`` positions and the largest reactive injection of each (kvar); with ``step_kvar``
    each bank switches in whole steps of that size (integer variables: a mixed-integer program, which HiGHS
    solves; Clarabel and SCS cannot), else its output is continuous (the relaxation)."""

    bus: npt.NDArray[np.int64]
    q_max_kvar: npt.NDArray[np.float64]
    step_kvar: npt.NDArray[np.float64] | None = None

    def check(self, n_bus: int) -> None:
        n = self.bus.shape[0]
        bad_bus = ((self.bus < 0) | (self.bus >= n_bus)).any()
        if self.q_max_kvar.shape != (n,) or (self.q_max_kvar < 0).any() or bad_bus:
            raise ValueError(f"capacitors: expected {n} buses in [0, {n_bus - 1}] and as many q_max_kvar >= 0")
        step = self.step_kvar
        if step is not None and (np.shape(step) != (n,) or not (np.asarray(step) > 0).all()):
            raise ValueError(f"capacitors.step_kvar: expected {n} step sizes > 0 (one per bank), kvar")

    @staticmethod
    def none() -> Capacitors:
        return Capacitors(np.zeros(0, np.int64), np.zeros(0))


@dataclass(frozen=True)
class OPFOptions:
    """How to solve: ``formulation`` (:data:`FORMULATIONS`), ``solver`` (:data:`SOLVERS`; ``auto``: HiGHS for
    linear programs, Clarabel for quadratic and conic ones, the faster of each here), AC correction
    rounds (``lindistflow``), ramp limit of each charging station's net power between steps and each station's
    charging limit (kW, None: no limit), and ``soft``: limits become penalised slacks (:data:`SOFT_PENALTY`) instead of
    hard constraints, all of them (True) or the kinds named (e.g. ``("target_kwh",)``: energy a session cannot
    get within the limits is left unmet at the penalty).  ``ev_model``: ``sessions`` (a variable per session and
    step: exact, the problem grows with the fleet) or ``aggregate`` (the sessions at each bus and station as
    one flexible load, the problem the size of the network; :func:`disaggregate` then shares each group's
    profile out among its sessions).
    ``socp_loss_weight``: per MWh of losses, added to the ``socp`` objective where it prices no losses itself:
    an objective that does not grow with losses leaves the cone slack (the relaxation inexact); this small
    weight makes it tight at a negligible change of the optimum.  ``ac_offsets`` (``lindistflow``): start from
    the AC flow of the loads alone (transformer ratios, losses); off, the model is plain LinDistFlow.
    ``penalties``: per kind, the price of a unit of slack where it is softened, instead of :data:`SOFT_PENALTY`'s
    (e.g. ``{"target_kwh": 2.0}``: a kWh left unmet costs 2 in the objective, so the plan weighs it against
    what delivering it costs; the ``sessions`` model's slack is each session's shortfall at departure, the
    ``aggregate`` model's its groups' shortfall at every step, a proxy)."""

    formulation: str = "lindistflow"
    solver: str = "auto"
    ac_rounds: int = 0
    ac_offsets: bool = True
    station_ramp_kw: float | None = None
    station_p_max_kw: float | None = None
    soft: bool | tuple[str, ...] = False
    ev_model: str = "sessions"
    socp_loss_weight: float = 1e-4
    penalties: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        check_choice("formulation", self.formulation, FORMULATIONS)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("ev_model", self.ev_model, EV_MODELS)
        check_int("ac_rounds", self.ac_rounds, 0, 10)
        check_real("socp_loss_weight", self.socp_loss_weight, 0.0, 1e6)
        if not isinstance(self.soft, bool):
            bad = [k for k in self.soft if k not in SOFT_PENALTY]
            if bad or not isinstance(self.soft, tuple):
                raise ValueError(f"soft: expected true, false or a tuple of {', '.join(SOFT_PENALTY)}, got "
                                 f"{self.soft!r}")
        for name in ("station_ramp_kw", "station_p_max_kw"):
            if getattr(self, name) is not None:
                check_real(name, getattr(self, name), 0.0, math.inf)
        for kind, price in (self.penalties or {}).items():
            if kind not in SOFT_PENALTY:
                raise ValueError(f"penalties: expected kinds among {', '.join(SOFT_PENALTY)}, got {kind!r}")
            check_real(f"penalties.{kind}", price, 0.0, 1e9)

    def softens(self, kind: str) -> bool:
        return self.soft if isinstance(self.soft, bool) else kind in self.soft

    def penalty(self, kind: str) -> float:
        """The price of a unit of ``kind``'s slack."""
        return (self.penalties or {}).get(kind, SOFT_PENALTY[kind])


def _entries(sessions: Sessions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Session index, step and first-entry flag of every (session, plugged step) pair, session-major."""
    length = sessions.end - sessions.start
    sid = np.repeat(np.arange(sessions.n), length)
    first = np.repeat(np.cumsum(length) - length, length)
    k = np.arange(int(length.sum()))
    return sid, sessions.start[sid] + (k - first), k == first


def _unreachable(sessions: Sessions, dt_h: float) -> np.ndarray:
    """Sessions whose target exceeds what charging at full power all the time they are plugged in stores."""
    best = np.minimum(sessions.e0_kwh + sessions.eta_ch * sessions.p_ch_max_kw * (sessions.end - sessions.start) * dt_h,
                      sessions.cap_kwh)
    return np.flatnonzero(sessions.e_target_kwh > best + 1e-9)


def _sum_into(rows: np.ndarray, n_rows: int) -> sp.csr_matrix:
    """(n_rows, n): sums n variables into the rows ``rows`` (one per variable)."""
    return sp.csr_matrix((np.ones(rows.size), (rows, np.arange(rows.size))), shape=(n_rows, rows.size))


class _SessionVars:
    """EV sessions one by one: charging at every plugged step, discharge where the session allows V2G.
    ``xc``/``xd``: the variables; ``c_t``, ``c_bus``, ``c_station`` (and ``d_*``): each variable's step, bus and
    station (-1: none); ``cons``: each session's power bounds, energy target and capacity (V2G sessions, which
    also discharge, at every step within [e_min_kwh, cap_kwh])."""

    def __init__(self, cp, ss: Sessions, T: int, dt: float, slack) -> None:
        sid, tt, first = _entries(ss)
        self.sid, self.tt = sid, tt
        n_ent = sid.size
        d = self.idx_d = np.flatnonzero(ss.p_dis_max_kw[sid] > 0)
        self.xc = cp.Variable(n_ent, nonneg=True, name="p_ch_kw")
        self.xd = cp.Variable(d.size, nonneg=True, name="p_dis_kw")
        self.c_t, self.c_bus, self.c_station = tt, ss.bus[sid], ss.station[sid]
        self.d_t, self.d_bus, self.d_station = tt[d], ss.bus[sid[d]], ss.station[sid[d]]
        cons = [self.xc <= ss.p_ch_max_kw[sid], self.xd <= ss.p_dis_max_kw[sid[d]]]
        short = slack("target_kwh", ss.n)
        gain = ss.eta_ch[sid] * dt
        loss_d = dt / ss.eta_dis[sid[d]]
        s_c = sp.csr_matrix((gain, (sid, np.arange(n_ent))), shape=(ss.n, n_ent))
        s_d = sp.csr_matrix((loss_d, (sid[d], np.arange(d.size))), shape=(ss.n, d.size))
        e_end = ss.e0_kwh + s_c @ self.xc - s_d @ self.xd
        cons += [e_end + short >= ss.e_target_kwh, e_end <= ss.cap_kwh]
        if d.size:
            e = cp.Variable(d.size, name="e_kwh")
            prev = sp.eye(d.size, k=-1, format="csr").multiply((~first[d])[:, None]).tocsr()
            delta = cp.multiply(gain[d], self.xc[d]) - cp.multiply(loss_d, self.xd)
            cons += [e - prev @ e == delta + np.where(first[d], ss.e0_kwh[sid[d]], 0.0),
                     e >= ss.e_min_kwh[sid[d]], e <= ss.cap_kwh[sid[d]]]
        self.cons = cons

    def powers(self, ss: Sessions, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Each session's charging and discharging power (n_session, T) at the solution."""
        p_ch, p_dis = np.zeros((ss.n, T)), np.zeros((ss.n, T))
        if self.sid.size:
            p_ch[self.sid, self.tt] = np.maximum(np.asarray(self.xc.value, dtype=float).reshape(-1), 0.0)
        if self.idx_d.size:
            p_dis[self.sid[self.idx_d], self.tt[self.idx_d]] = np.maximum(np.asarray(self.xd.value, dtype=float), 0.0)
        return p_ch, p_dis


def session_envelopes(ss: Sessions, T: int, dt: float) -> tuple[np.ndarray, ...]:
    """Each session's battery-side energy taken by the end of each step along its earliest and latest paths
    (``lo``, ``hi``), and its charging and discharging power limits while plugged in, (n, T) each: what the
    aggregate EV model sums per group.  V2G sessions may go below their starting energy, down to ``e_min_kwh``."""
    k = np.arange(T)[None, :]
    start, end = ss.start[:, None], ss.end[:, None]
    on = (k >= start) & (k < end)
    v2g = ss.p_dis_max_kw > 0
    per_c = (ss.eta_ch * ss.p_ch_max_kw * dt)[:, None]
    per_d = np.where(v2g, ss.p_dis_max_kw / ss.eta_dis * dt, 0.0)[:, None]
    steps_in = np.clip(k - start + 1, 0, end - start)  # plugged steps up to and including step k
    steps_left = np.clip(end - 1 - k, 0, None) * (k >= start)  # plugged steps after step k
    need = (ss.e_target_kwh - ss.e0_kwh)[:, None]
    room = (ss.cap_kwh - ss.e0_kwh)[:, None]
    floor = np.where(v2g, ss.e_min_kwh - ss.e0_kwh, 0.0)[:, None]
    hi = np.minimum(room, per_c * steps_in)
    lo = np.where(k >= start, np.maximum(np.maximum(need - per_c * steps_left, floor), -per_d * steps_in), 0.0)
    return (np.minimum(lo, hi), hi, on * ss.p_ch_max_kw[:, None],
            on * np.where(v2g, ss.p_dis_max_kw, 0.0)[:, None])


class _AggregateVars:
    """The sessions at each bus and station as one flexible load per step: charging up to the sum of the
    plugged sessions' limits, discharge likewise, and the group's cumulative stored energy between the sums of
    the sessions' own earliest and latest trajectories.  A relaxation (each session's bounds hold only in sum);
    :func:`disaggregate` shares the result out session by session.  Its size does not grow with the fleet."""

    def __init__(self, cp, ss: Sessions, T: int, dt: float, slack) -> None:
        key = np.stack([ss.bus, ss.station], axis=1)
        groups, self.group = np.unique(key, axis=0, return_inverse=True)
        self.group = self.group.reshape(-1)
        self.group_bus = groups[:, 0]
        G = groups.shape[0]
        self.G = G
        v2g = ss.p_dis_max_kw > 0
        lo, hi, p_c, p_d_on = session_envelopes(ss, T, dt)

        def by_group(x):  # (n, T) -> (G, T)
            out = np.zeros((G, T))
            np.add.at(out, self.group, x)
            return out

        cap_c, cap_d = by_group(p_c), by_group(p_d_on)
        # the group's efficiencies: its sessions' own, weighted by their power limits
        p_d = np.where(v2g, ss.p_dis_max_kw, 0.0)
        eta_c = np.bincount(self.group, ss.eta_ch * ss.p_ch_max_kw, G) / np.maximum(
            np.bincount(self.group, ss.p_ch_max_kw, G), 1e-12)
        inv_eta_d = np.bincount(self.group, p_d / ss.eta_dis, G) / np.maximum(np.bincount(self.group, p_d, G), 1e-12)
        self.lo, self.hi, self.cap_c, self.cap_d = by_group(lo), by_group(hi), cap_c, cap_d
        c_idx = np.flatnonzero(cap_c.reshape(-1) > 0)  # (g, t) cells with a plugged session
        d_idx = np.flatnonzero(cap_d.reshape(-1) > 0)
        self.c_idx, self.d_idx = c_idx, d_idx
        self.xc = cp.Variable(c_idx.size, nonneg=True, name="p_ch_kw")
        self.xd = cp.Variable(d_idx.size, nonneg=True, name="p_dis_kw")
        gc, gd = c_idx // T, d_idx // T
        self.c_t, self.c_bus, self.c_station = c_idx % T, groups[gc, 0], groups[gc, 1]
        self.d_t, self.d_bus, self.d_station = d_idx % T, groups[gd, 0], groups[gd, 1]
        # battery-side energy each group has taken by the end of each step, as a state with a one-step recursion
        # (a cumulative sum written out would put a dense triangle per group into the KKT system)
        step = sp.kron(sp.identity(G), sp.identity(T) - sp.eye(T, k=-1), format="csr")  # (G T, G T)
        e_c = sp.csr_matrix((eta_c[gc] * dt, (c_idx, np.arange(c_idx.size))), shape=(G * T, c_idx.size))
        e_d = sp.csr_matrix((inv_eta_d[gd] * dt, (d_idx, np.arange(d_idx.size))), shape=(G * T, d_idx.size))
        energy = cp.Variable(G * T, name="group_e_kwh")
        short = slack("target_kwh", G * T)
        self.cons = [self.xc <= cap_c.reshape(-1)[c_idx], self.xd <= cap_d.reshape(-1)[d_idx],
                     step @ energy == e_c @ self.xc - e_d @ self.xd,
                     energy + short >= self.lo.reshape(-1), energy <= self.hi.reshape(-1)]

    def profiles(self, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Each group's charging and discharging power (G, T) at the solution."""
        pc, pd = np.zeros(self.G * T), np.zeros(self.G * T)
        if self.c_idx.size:
            pc[self.c_idx] = np.maximum(np.asarray(self.xc.value, dtype=float), 0.0)
        if self.d_idx.size:
            pd[self.d_idx] = np.maximum(np.asarray(self.xd.value, dtype=float), 0.0)
        return pc.reshape(self.G, T), pd.reshape(self.G, T)


def disaggregate(ss: Sessions, dt_h: float, group: np.ndarray, p_ch_kw: np.ndarray, p_dis_kw: np.ndarray,
                 options: OPFOptions | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Share each group's planned profile (``p_ch_kw``, ``p_dis_kw``: (G, T)) out among its sessions
    (``group``: (n,) the group of each session) so that every session keeps its own bounds: a linear program
    with no network in it, tracking each group's net power at every step (the least absolute deviation) and
    each station's charging limit.  Where a group's aggregate asked for more than its sessions can give (the
    aggregate is a relaxation) they deviate.  Returns each session's charging and discharging power (n, T) and
    the energy by which the groups' net power misses their profiles, kWh summed over groups and steps."""
    import cvxpy as cp

    opt = options if options is not None else OPFOptions()
    G, T = p_ch_kw.shape
    if ss.n == 0:
        return np.zeros((0, T)), np.zeros((0, T)), 0.0
    penalties = {}

    def slack(name: str, n: int):
        if not opt.softens(name):
            return 0
        v = penalties[name] = cp.Variable(n, nonneg=True, name=name)
        return v

    ev = _SessionVars(cp, ss, T, dt_h, slack)
    grp_c, grp_d = group[ev.sid], group[ev.sid[ev.idx_d]]
    net = _sum_into(grp_c * T + ev.c_t, G * T) @ ev.xc - _sum_into(grp_d * T + ev.d_t, G * T) @ ev.xd
    dev = cp.Variable(G * T, name="tracking_kw")
    cons = [*ev.cons, dev >= net - (p_ch_kw - p_dis_kw).reshape(-1), dev >= (p_ch_kw - p_dis_kw).reshape(-1) - net]
    if opt.station_p_max_kw is not None and (ss.station >= 0).any():
        cons += _station_limits(ev, int(ss.station.max()) + 1, T, dataclasses.replace(opt, station_ramp_kw=None),
                                slack)
    problem = cp.Problem(cp.Minimize(cp.sum(dev) + sum(SOFT_PENALTY[k] * cp.sum(v) for k, v in penalties.items())),
                         cons)
    with quiet_stdout():
        problem.solve(solver="HIGHS", **_SOLVER_SETTINGS["HIGHS"])
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise InfeasibleError(f"disaggregation: the sessions' own bounds are {problem.status} (solver HIGHS)")
    off_kwh = float(np.sum(np.maximum(dev.value, 0.0))) * dt_h if dev.size else 0.0
    if off_kwh > 1e-3:
        log.info("disaggregation: the sessions miss their groups' profiles by %.4g kWh in all (at most %.4g kW)",
                 off_kwh, float(np.max(dev.value)))
    return (*ev.powers(ss, T), off_kwh)


def _station_limits(ev, n_st: int, T: int, opt: OPFOptions, slack) -> list:
    """Each charging station's charging power at most ``station_p_max_kw`` (discharge passes the station's limit,
    as the simulator's dispatch does), and its net power moving by at most ``station_ramp_kw`` between steps."""
    at_c, at_d = ev.c_station >= 0, ev.d_station >= 0
    g_c = sp.csr_matrix((np.ones(int(at_c.sum())), (ev.c_t[at_c] * n_st + ev.c_station[at_c], np.flatnonzero(at_c))),
                        shape=(T * n_st, ev.c_t.size))
    g_d = sp.csr_matrix((np.ones(int(at_d.sum())), (ev.d_t[at_d] * n_st + ev.d_station[at_d], np.flatnonzero(at_d))),
                        shape=(T * n_st, ev.d_t.size))
    cons = []
    if opt.station_p_max_kw is not None:
        cons.append(g_c @ ev.xc <= opt.station_p_max_kw)
    if opt.station_ramp_kw is not None:
        diff = (sp.eye(T * n_st, k=n_st, format="csr") - sp.eye(T * n_st, format="csr"))[: (T - 1) * n_st]
        ramp = diff @ (g_c @ ev.xc - g_d @ ev.xd)
        lim = opt.station_ramp_kw + slack("ramp_kw", (T - 1) * n_st)
        cons += [ramp <= lim, -ramp <= lim]
    return cons


class _Model:
    """One cvxpy problem; :func:`solve_opf` builds it, solves it and reads it back."""

    def __init__(self, net: Network, hz: Horizon, ss: Sessions, obj: Objective, caps: Capacitors,
                 opt: OPFOptions) -> None:
        import cvxpy as cp

        f = net.feeder
        T, nb, dt = hz.n_step, f.n_bus, hz.dt_h
        self.net, self.hz, self.ss, self.opt, self.T = net, hz, ss, opt, T
        self.solver = opt.solver  # the one used, once solved
        eye = sp.identity(T, format="csr")
        cons, self.slacks = [], {}

        def slack(name: str, n: int):
            """A penalised slack on the limits of kind ``name`` where the options soften them, else 0."""
            if not opt.softens(name):
                return 0
            v = cp.Variable(n, nonneg=True, name=name)
            self.slacks[name] = v
            return v

        # EV sessions, one variable per session and plugged step, or their aggregate per bus / station
        ev = (_SessionVars if opt.ev_model == "sessions" else _AggregateVars)(cp, ss, T, dt, slack)
        self.ev = ev
        cons += ev.cons
        p_ev = _sum_into(ev.c_t * nb + ev.c_bus, T * nb) @ ev.xc - _sum_into(ev.d_t * nb + ev.d_bus, T * nb) @ ev.xd

        # DER: output up to what is available; the rest of PV/wind is curtailed
        kinds = np.array(f.der_kind)
        n_der = kinds.size
        self.der = cp.Variable(T * n_der, nonneg=True, name="der_kw")
        avail = hz.der_avail_kw.reshape(-1)
        cons.append(self.der <= avail)
        caps.check(nb)
        if caps.step_kvar is None:
            self.qc = cp.Variable(T * caps.bus.size, nonneg=True, name="q_cap_kvar")
            cons.append(self.qc <= np.tile(caps.q_max_kvar, T))
        else:
            steps = cp.Variable(T * caps.bus.size, integer=True, name="capacitor_steps")
            self.qc = cp.multiply(np.tile(caps.step_kvar, T), steps)
            cons += [steps >= 0, steps <= np.tile(np.floor(caps.q_max_kvar / caps.step_kvar + 1e-9), T)]

        self.p = hz.load_p_kw.reshape(-1) + p_ev - _at_buses(T, nb, f.der_bus) @ self.der  # (T n_bus,) net load, kW
        self.q = hz.load_q_kvar.reshape(-1) - _at_buses(T, nb, caps.bus) @ self.qc
        tie, loss = self._network(cp, eye, cons, slack, opt.formulation == "socp")
        self.tie, self.loss = tie, loss
        if (opt.station_ramp_kw is not None or opt.station_p_max_kw is not None) and (ss.station >= 0).any():
            cons += _station_limits(ev, int(ss.station.max()) + 1, T, opt, slack)

        terms = self._objective(cp, obj, kinds, avail, tie, loss, dt, cons)
        self.terms = terms
        penalty = sum(opt.penalty(k) * cp.sum(v) for k, v in self.slacks.items())
        self.problem = cp.Problem(cp.Minimize(sum(terms.values()) + penalty), cons)

    # ------------------------------------------------------------------------------------------ pieces

    def _network(self, cp, eye, cons, slack, relaxed: bool):
        """Branch-flow variables per step and node: P, Q into the node through its branch, squared voltage v
        (and squared current l for ``socp``).  Each row reads a node, its parent or children: a sparse problem
        (the bus-injection form, voltages as dense sensitivities, solves ~10x slower)."""
        net, f, T = self.net, self.net.feeder, self.T
        t = f.tree
        n, kw = t.n_node, net.kw_per_pu
        nob = sp.csr_matrix((np.ones(f.n_bus), (t.node_of_bus, np.arange(f.n_bus))), shape=(n, f.n_bus))
        to_node = sp.kron(eye, nob, format="csr")
        children = sp.csr_matrix((np.ones(n - 1), (t.parent[1:], np.arange(1, n))), shape=(n, n))
        parent = sp.csr_matrix((np.ones(n - 1), (np.arange(1, n), t.parent[1:])), shape=(n, n))
        ch, pa = sp.kron(eye, children, format="csr"), sp.kron(eye, parent, format="csr")
        r, x = np.tile(t.r_pu, T), np.tile(t.x_pu, T)
        branch = np.flatnonzero(np.tile(np.arange(n) > 0, T))
        root = np.flatnonzero(np.tile(np.arange(n) == 0, T))
        P = cp.Variable(T * n, name="p_branch_pu")
        Q = cp.Variable(T * n, name="q_branch_pu")
        v = cp.Variable(T * n, name="v2_pu")
        vpar = pa @ v
        drop = 2 * (cp.multiply(r, P) + cp.multiply(x, Q))
        if relaxed:
            # a transformer's voltage ratio c scales the parent's voltage (V = c V_parent - z J); lines have c = 1
            vpar = cp.multiply(np.tile(t.coef[:, 4] ** 2 + t.coef[:, 5] ** 2, T), vpar)
            ell = cp.Variable(T * n, nonneg=True, name="i2_pu")
            cons += [P - ch @ P - cp.multiply(r, ell) == to_node @ self.p / kw,
                     Q - ch @ Q - cp.multiply(x, ell) == to_node @ self.q / kw, ell[root] == 0,
                     v[branch] == (vpar - drop + cp.multiply(r ** 2 + x ** 2, ell))[branch],
                     cp.SOC((ell + vpar)[branch], cp.vstack([2 * P[branch], 2 * Q[branch], (ell - vpar)[branch]]),
                            axis=0)]
            self.ell = ell
            loss = (sp.kron(eye, sp.csr_matrix(t.r_pu[None, :])) @ ell) * kw
        else:
            # AC residuals of the previous round (solve_opf): each bus's squared-voltage error, each step's losses
            self.corr = cp.Parameter(T * n, name="v2_correction", value=np.zeros(T * n))
            self.loss_par = cp.Parameter(T, name="loss_kw", value=np.zeros(T))
            cons += [P - ch @ P == to_node @ self.p / kw, Q - ch @ Q == to_node @ self.q / kw,
                     v[branch] == (vpar - drop + self.corr)[branch]]
            loss = self.loss_par
        cons.append(v[root] == net.v0_pu ** 2)
        self.P, self.Q, self.v2_node = P, Q, v
        vb = to_node.T @ v  # (T n_bus,) each bus's node
        vmin, vmax = np.tile(f.v_min_pu ** 2, T), np.tile(f.v_max_pu ** 2, T)
        lo = slack("voltage_pu", T * f.n_bus)
        hi = slack("voltage_high_pu", T * f.n_bus)
        cons += [vb + lo >= vmin, vb - hi <= vmax]
        self.v2 = vb
        if t.elem_node.size:
            rows = (np.arange(T)[:, None] * n + t.elem_node[None, :]).reshape(-1)
            if relaxed:
                i_max = (t.elem_rating_ka / t.elem_ibase_ka).min(axis=1)
                over = slack("loading_kw", rows.size)
                cons.append(ell[rows] <= np.tile(i_max ** 2, T) + over / kw)
            else:
                # ampacity as apparent power at the lowest allowed voltage, a polygon inside the circle (cvxpy
                # compiles 3,000 small cones ~20x slower than these rows, and Clarabel solves them no faster)
                ang = np.pi * (2 * np.arange(_POLYGON_SIDES) + 1) / _POLYGON_SIDES
                lim = np.tile(net.s_max_kva * np.cos(np.pi / _POLYGON_SIDES), T) / kw
                over = slack("loading_kw", lim.size) / kw
                cons += [np.cos(a) * P[rows] + np.sin(a) * Q[rows] <= lim + over for a in ang]
        return P[root] * kw + (0 if relaxed else self.loss_par), loss

    def correct(self, flow, p_bus: np.ndarray, q_bus: np.ndarray) -> None:
        """Take the AC solution ``flow`` of the bus loads ``p_bus``, ``q_bus`` (T, n_bus) as the model's
        constants: each node's squared-voltage offset from the lossless linear model at those loads (so the
        model's voltages equal AC's there; a node without a bus inherits its parent's), and each step's
        losses.  Transformer ratios, shunts and losses are what the offsets carry."""
        t, T, kw = self.net.feeder.tree, self.T, self.net.kw_per_pu
        n = t.n_node
        p_node, q_node = np.zeros((T, n)), np.zeros((T, n))
        np.add.at(p_node.T, t.node_of_bus, p_bus.T / kw)
        np.add.at(q_node.T, t.node_of_bus, q_bus.T / kw)
        anc = self.net.paths
        P, Q = p_node @ anc, q_node @ anc  # flow into each node through its branch
        v_lin = self.net.v0_pu ** 2 - 2 * (P * t.r_pu + Q * t.x_pu) @ anc.T
        has_bus = np.zeros(n, dtype=bool)
        has_bus[t.node_of_bus] = True
        off = np.zeros((T, n))
        off[:, t.node_of_bus] = flow.vm_pu ** 2 - v_lin[:, t.node_of_bus]
        for i in range(1, n):  # sweep order: parents first
            if not has_bus[i]:
                off[:, i] = off[:, t.parent[i]]
        corr = off - off[:, np.maximum(t.parent, 0)]
        corr[:, 0] = 0.0
        self.corr.value = corr.reshape(-1)
        self.loss_par.value = flow.loss_kw.copy()

    def cone_gap(self) -> float:
        """socp: the largest slack ``l v_parent - P² - Q²`` over branches and steps, relative to the step's
        largest ``l v_parent`` (0: the relaxation is exact)."""
        t, T = self.net.feeder.tree, self.T
        n = t.n_node
        P, Q, ell, v = (np.asarray(x.value, dtype=float).reshape(T, n) for x in (self.P, self.Q, self.ell,
                                                                                  self.v2_node))
        ratio2 = t.coef[:, 4] ** 2 + t.coef[:, 5] ** 2
        rhs = (ell * ratio2 * v[:, np.maximum(t.parent, 0)])[:, 1:]
        lhs = (P ** 2 + Q ** 2)[:, 1:]
        # relative to the step's largest flow: a near-empty branch's relative slack says nothing
        return float(np.max((rhs - lhs) / np.maximum(rhs.max(axis=1, keepdims=True), 1e-12))) if rhs.size else 0.0

    def _objective(self, cp, obj: Objective, kinds, avail, tie, loss, dt, cons) -> dict:
        T = self.T
        terms = {}
        renew = np.tile(np.isin(kinds, ("pv", "wind")), T)
        diesel = np.flatnonzero(np.tile(kinds == "diesel", T))
        if obj.tie_target_kw is not None:
            target = _series("tie_target_kw", obj.tie_target_kw, T)
            # through a variable of its own: the quadratic term then couples no two EV variables
            dev = cp.Variable(T, name="tie_deviation_mw")
            cons.append(dev == (tie - target) / 1e3)
            terms["tie_deviation_mw2"] = cp.sum_squares(dev)
        buy = None
        if obj.energy_price_per_kwh is not None or obj.capacity_price_per_kw or obj.carbon is not None:
            buy = cp.Variable(T, nonneg=True, name="purchase_kw")
            cons.append(buy >= tie)
        if obj.energy_price_per_kwh is not None:
            terms["purchase"] = cp.sum(cp.multiply(_series("energy_price_per_kwh", obj.energy_price_per_kwh, T),
                                                   buy)) * dt
        if obj.capacity_price_per_kw:
            terms["capacity"] = obj.capacity_price_per_kw * cp.max(buy)
        if obj.curtail_cost_per_kwh and renew.any():
            terms["curtailment"] = obj.curtail_cost_per_kwh * dt * cp.sum(avail[renew] - self.der[renew])
        a, b = obj.diesel_cost
        if (a or b) and diesel.size:
            quad = a * cp.sum_squares(self.der[diesel]) if a else 0  # a = 0 keeps a linear program linear
            terms["diesel"] = (quad + b * cp.sum(self.der[diesel])) * dt
        if obj.carbon is not None:
            emis_t = (obj.grid_kg_per_kwh * cp.sum(buy) + obj.diesel_kg_per_kwh * cp.sum(self.der[diesel])) * dt / 1e3
            c = cp.Variable(name="carbon")
            cons += [c >= piece for piece in obj.carbon._pieces(emis_t)]
            terms["carbon"] = c
        if obj.loss_price_per_kwh:
            terms["losses"] = obj.loss_price_per_kwh * dt * cp.sum(loss)
        elif self.opt.formulation == "socp" and self.opt.socp_loss_weight:
            terms["loss_regulariser"] = self.opt.socp_loss_weight * dt * cp.sum(loss) / 1e3
        if obj.accounts is not None:
            terms.update(self._accounts(cp, obj.accounts, dt, cons))
        if obj.peak_valley_weight:
            terms["peak_valley"] = obj.peak_valley_weight * (cp.max(tie) - cp.min(tie))
        if not terms:
            terms["zero"] = cp.Constant(0.0)
        return terms


    def _accounts(self, cp, acc: Accounts, dt: float, cons: list) -> dict:
        T, nb = self.T, self.net.feeder.n_bus
        acc.check(nb, T)
        nz = acc.n_zone
        # (T Z, T n_bus): each zone's net load per step
        rows = (np.arange(T)[:, None] * nz + acc.zone_of_bus[None, :]).reshape(-1)
        g = sp.csr_matrix((np.ones(T * nb), (rows, np.arange(T * nb))), shape=(T * nz, T * nb))
        load = g @ self.p
        terms = {"zone_purchase": dt * cp.sum(cp.multiply(np.repeat(acc.price_per_kwh, nz), load))}
        if acc.carbon_lines:
            fixed = np.zeros(nz) if acc.excess_t is None else np.asarray(acc.excess_t, dtype=float).sum(axis=0)
            excess = fixed
            if acc.kg_per_kwh:
                drawn = cp.Variable(T * nz, nonneg=True, name="zone_drawn_kw")
                cons.append(drawn >= load)
                per_zone = sp.kron(np.ones((1, T)), sp.identity(nz), format="csr")
                excess = fixed + (acc.kg_per_kwh * dt / 1e3) * (per_zone @ drawn)
            c = cp.Variable(nz, name="zone_carbon")
            cons += [c >= a * excess + b for a, b in acc.carbon_lines]
            terms["zone_carbon"] = cp.sum(c)
        return terms


def _at_buses(T: int, n_bus: int, bus: np.ndarray) -> sp.csr_matrix:
    """(T n_bus, T n): places per-step quantities of n devices (step-major) at their buses."""
    rows = (np.arange(T)[:, None] * n_bus + bus[None, :]).reshape(-1)
    return sp.csr_matrix((np.ones(rows.size), (rows, np.arange(rows.size))), shape=(T * n_bus, rows.size))


def _series(name: str, x: npt.ArrayLike, T: int) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.shape != (T,) or not np.isfinite(a).all():
        raise ValueError(f"{name}: expected {T} finite numbers (one per step), got shape {a.shape}")
    return a


def solve_opf(feeder: Feeder | Network, horizon: Horizon, sessions: Sessions | None = None,
              objective: Objective | None = None, options: OPFOptions | None = None,
              capacitors: Capacitors | None = None) -> OPFResult:
    """Schedule the controllables of ``feeder`` over ``horizon`` for ``objective`` under every limit, and check
    the schedule with AC power flow (``result.ac``).  Raises :class:`InfeasibleError` naming what cannot be met
    (with ``options.soft`` the limits give instead, at :data:`SOFT_PENALTY`, and ``result.slack`` says how
    much)."""
    from evgrid.grid.flow.sweep import SweepBackend

    net = feeder if isinstance(feeder, Network) else Network.of(feeder)
    f = net.feeder
    ss = sessions if sessions is not None else Sessions.empty()
    obj = objective if objective is not None else Objective()
    opt = options if options is not None else OPFOptions()
    caps = capacitors if capacitors is not None else Capacitors.none()
    horizon.check(f)
    ss.check(f, horizon.n_step)
    bad = _unreachable(ss, horizon.dt_h)
    if bad.size and not opt.softens("target_kwh"):
        raise InfeasibleError(f"sessions {_first(bad)}: energy target out of reach even charging at full power "
                              f"while plugged in ({bad.size} of {ss.n} sessions)")
    t0 = time.perf_counter()
    model = _Model(net, horizon, ss, obj, caps, opt)
    build_s = time.perf_counter() - t0
    backend = SweepBackend(f)
    solve_s = 0.0
    rounds = opt.ac_rounds if opt.formulation == "lindistflow" else 0
    if opt.formulation == "lindistflow" and opt.ac_offsets:
        # the first round's constants from the AC flow of the loads alone, DER at what is available: one
        # batched sweep (~1 ms) that carries the transformer ratios and most of the losses into the model
        p0 = horizon.load_p_kw.copy()
        np.subtract.at(p0.T, f.der_bus, horizon.der_avail_kw.T)
        flow0 = backend.solve(p0, horizon.load_q_kvar)
        if flow0.converged.all():
            model.correct(flow0, p0, horizon.load_q_kvar)
    for k in range(rounds + 1):
        t1 = time.perf_counter()
        _solve(model, opt.solver)
        solve_s += time.perf_counter() - t1
        if model.problem.status not in ("optimal", "optimal_inaccurate"):
            if opt.soft is True:
                raise InfeasibleError(f"the softened problem is {model.problem.status} (solver {model.solver})")
            raise InfeasibleError(_diagnose(net, horizon, ss, obj, caps, opt, model.problem.status))
        if k == rounds:
            break
        # AC residuals at this solution become the model's constants for the next round
        p, q = _value(model.p, horizon), _value(model.q, horizon)
        flow = backend.solve(p, q)
        if not flow.converged.all():
            log.warning("AC correction: the sweep did not converge at %d steps; stopping after round %d",
                        int((~flow.converged).sum()), k)
            break
        model.correct(flow, p, q)
    result = _read(model, build_s, solve_s)
    return _with_ac(result, model, backend)


def _solve(model: _Model, solver: str) -> None:
    if solver == "auto":
        # measured on IEEE 33, 96 steps, 300 EVs: HiGHS solves the LP in 0.7 s (Clarabel 6 s) but stalls on the
        # QP, which Clarabel solves in 5 s; OSQP fails to converge on both
        solver = "HIGHS" if _is_lp(model.problem) else "CLARABEL"
        model.solver = solver
    if model.problem.is_mixed_integer() and (solver != "HIGHS" or not _is_lp(model.problem)):
        raise ValueError(f"capacitors.step_kvar: integer capacitor steps need a linear problem solved by HiGHS "
                         f"(formulation lindistflow, no quadratic term); got solver {solver}")
    _run(model, solver, _SOLVER_SETTINGS.get(solver, {}))
    if model.problem.status == "solver_error" and solver == "CLARABEL":
        # Clarabel stops on a numerical error on a few of seed 001's ramp-limited days (a near-singular KKT
        # system); ten times its default static regularisation solves them to optimality
        log.info("Clarabel: numerical error; solving again with static regularisation 1e-7")
        _run(model, solver, {**_SOLVER_SETTINGS[solver], "static_regularization_constant": 1e-7})


def _run(model: _Model, solver: str, settings: dict) -> None:
    model.problem._status = None
    try:
        with quiet_stdout() if solver == "HIGHS" else contextlib.nullcontext():
            model.problem.solve(solver=solver, **settings)
    except Exception as e:  # cvxpy's SolverError: status says the rest
        log.info("solver %s: %s", solver, e)
        if model.problem.status is None:
            model.problem._status = "solver_error"


@contextlib.contextmanager
def quiet_stdout():
    """HiGHS's C++ core prints a banner on file descriptor 1 whatever its options say; JSON output on stdout
    (``evgrid bench opf --json``) must stay clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _is_lp(problem) -> bool:
    """No quadratic term and no cone beyond linear rows."""
    import cvxpy as cp

    return problem.objective.expr.is_pwl() and not any(isinstance(c, cp.constraints.SOC)
                                                              for c in problem.constraints)


def _value(expr, hz: Horizon) -> np.ndarray:
    return np.asarray(expr.value, dtype=float).reshape(hz.n_step, -1)


def _first(idx: np.ndarray, n: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:n])
    return shown + (", ..." if idx.size > n else "")


def _diagnose(net, hz, ss, obj, caps, opt, status) -> str:
    """Re-solve with every limit softened and name the limits that had to give."""
    soft = _Model(net, hz, ss, obj, caps, dataclasses.replace(opt, soft=True))
    _solve(soft, opt.solver)
    if soft.problem.status not in ("optimal", "optimal_inaccurate"):
        return f"problem {status} (solver {soft.solver}); the softened problem too ({soft.problem.status})"
    f, T = net.feeder, hz.n_step
    parts = []
    for name, var in soft.slacks.items():
        val = np.asarray(var.value).reshape(-1)
        hit = np.flatnonzero(val > 1e-6)
        if not hit.size:
            continue
        if name.startswith("voltage"):
            t, b = np.divmod(hit, f.n_bus)
            side = "below v_min_pu" if name == "voltage_pu" else "above v_max_pu"
            buses = np.unique(f.numbers[b])
            parts.append(f"voltage {side} cannot be held at bus {_first(buses)} ({f.numbering}) at steps "
                         f"{int(t.min())}-{int(t.max())}")
        elif name == "loading_kw":
            n_elem = val.size // T
            parts.append(f"branch rating exceeded on element {_first(np.unique(hit % n_elem))} (lines, then "
                         f"transformers) at steps {int((hit // n_elem).min())}-{int((hit // n_elem).max())}")
        elif name == "target_kwh":
            parts.append(f"sessions {_first(hit)}: energy target cannot be met within the network's limits")
        elif name == "ramp_kw":
            parts.append("station ramp limit cannot be held")
    return f"problem {status}: " + ("; ".join(parts) or "no single limit named (solver tolerance)")


def _read(m: _Model, build_s: float, solve_s: float) -> OPFResult:
    hz, ss, f, T = m.hz, m.ss, m.net.feeder, m.T
    p_bus = _value(m.p, hz)
    tracking_kwh = 0.0
    if isinstance(m.ev, _SessionVars):
        p_ch, p_dis = m.ev.powers(ss, T)
    else:
        pc, pd = m.ev.profiles(T)
        p_ch, p_dis, tracking_kwh = disaggregate(ss, hz.dt_h, m.ev.group, pc, pd, m.opt)
        # the buses see what the sessions do, which the AC check then judges
        shift = np.zeros((T, f.n_bus))
        np.add.at(shift.T, ss.bus, (p_ch - p_dis))
        np.subtract.at(shift.T, m.ev.group_bus, pc - pd)
        p_bus = p_bus + shift
    step = hz.dt_h * (ss.eta_ch[:, None] * p_ch - p_dis / ss.eta_dis[:, None])
    e = np.concatenate([ss.e0_kwh[:, None], ss.e0_kwh[:, None] + np.cumsum(step, axis=1)], axis=1)
    v2 = np.asarray(m.v2.value, dtype=float).reshape(T, f.n_bus)
    costs = {k: float(v.value) for k, v in m.terms.items() if k != "zero"}
    slack = {k: float(np.sum(v.value)) for k, v in m.slacks.items()}
    n_der, n_cap = len(f.der_kind), m.qc.size // T if T else 0
    return OPFResult(
        formulation=m.opt.formulation, solver=m.solver, status=m.problem.status,
        objective=float(sum(costs.values())), costs=costs, build_s=build_s, solve_s=solve_s,
        p_ch_kw=p_ch, p_dis_kw=p_dis, e_kwh=e,
        der_kw=np.asarray(m.der.value, dtype=float).reshape(T, n_der) if n_der else np.zeros((T, 0)),
        q_cap_kvar=np.asarray(m.qc.value, dtype=float).reshape(T, n_cap) if n_cap else np.zeros((T, 0)),
        tracking_kwh=tracking_kwh, p_bus_kw=p_bus, q_bus_kvar=_value(m.q, hz),
        tie_kw=np.asarray(m.tie.value, dtype=float),
        vm_pu=np.sqrt(np.maximum(v2, 0.0)), loss_kw=np.asarray(m.loss.value, dtype=float).reshape(T),
        slack=slack)


def _with_ac(result: OPFResult, m: _Model, backend) -> OPFResult:
    flow = backend.solve(result.p_bus_kw, result.q_bus_kvar)
    gap = m.cone_gap() if m.opt.formulation == "socp" else None
    loading = np.concatenate([flow.line_loading, flow.trafo_loading], axis=1)
    ac = ACCheck(vm_pu=flow.vm_pu, loss_kw=flow.loss_kw,
                 max_loading=float(np.nanmax(loading)) if loading.size else 0.0,
                 max_dv_pu=float(np.nanmax(np.abs(result.vm_pu - flow.vm_pu))),
                 max_loss_error_kw=float(np.nanmax(np.abs(result.loss_kw - flow.loss_kw))), cone_gap=gap,
                 converged=bool(flow.converged.all()))
    return dataclasses.replace(result, ac=ac)
