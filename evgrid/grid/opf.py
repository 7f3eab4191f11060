"""Multi-period optimal power flow on a radial feeder (physics only: numpy, scipy, solvers; no RL imports).

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

Every solution is re-solved with the AC sweep (``result.ac``).  Solvers are open source only (Clarabel, HiGHS,
SCS), given the model's matrices directly (:mod:`evgrid.grid.program`).  An infeasible problem raises
:class:`InfeasibleError` naming what cannot be met: sessions whose energy target is out of reach are found
before solving; otherwise the problem is re-solved with every limit softened and the limits that had to give
are named.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from evgrid.grid.feeders import Feeder, MeshedFeederError
from evgrid.grid.program import OPTIMAL, Affine, Program, Quadratic, stack
from evgrid.validate import check_bool, check_choice, check_int, check_real

log = logging.getLogger(__name__)

FORMULATIONS = ("lindistflow", "socp")
EV_MODELS = ("sessions", "aggregate")
SOLVERS = ("auto", "CLARABEL", "HIGHS", "SCS")
METHODS = ("direct", "lazy")
_POLYGON_SIDES = 16
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
    _topologies: dict = field(default_factory=dict, repr=False)

    def topology(self, T: int) -> _Topology:
        """The model's network matrices over ``T`` steps (built once per horizon length: a single-period OPF
        solved again and again spends most of its build time on them otherwise)."""
        if T not in self._topologies:
            self._topologies[T] = _Topology.of(self.feeder, T)
        return self._topologies[T]

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


@dataclass(frozen=True, eq=False)
class _Topology:
    """Step-major (T n_node) branch-flow matrices: ``to_node`` places bus injections at their nodes, ``flow``
    (identity minus children) turns branch flows into node injections, ``parent`` reads each node's parent."""

    to_node: sp.csr_matrix  # (T n_node, T n_bus)
    flow: sp.csr_matrix  # (T n_node, T n_node)
    parent: sp.csr_matrix  # (T n_node, T n_node)
    branch: npt.NDArray[np.int64]  # rows of the nodes with a branch (all but the root)
    root: npt.NDArray[np.int64]
    elem_rows: npt.NDArray[np.int64]  # the node row of each element (lines, then transformers) at each step
    # ampacity polygon (lindistflow): side k of each element's rating at each step from its node's P and Q, and
    # each element's row repeated for every side
    poly_p: sp.csr_matrix  # (sides T n_elem, T n_node)
    poly_q: sp.csr_matrix
    poly_rep: sp.csr_matrix  # (sides T n_elem, T n_elem)

    @staticmethod
    def of(f: Feeder, T: int) -> _Topology:
        t, n = f.tree, f.tree.n_node
        rows = (np.arange(T)[:, None] * n + t.elem_node[None, :]).reshape(-1)
        pick = sp.csr_matrix((np.ones(rows.size), (np.arange(rows.size), rows)), shape=(rows.size, T * n))
        ang = np.pi * (2 * np.arange(_POLYGON_SIDES) + 1) / _POLYGON_SIDES
        eye = sp.identity(T, format="csr")
        nob = sp.csr_matrix((np.ones(f.n_bus), (t.node_of_bus, np.arange(f.n_bus))), shape=(n, f.n_bus))
        children = sp.csr_matrix((np.ones(n - 1), (t.parent[1:], np.arange(1, n))), shape=(n, n))
        parent = sp.csr_matrix((np.ones(n - 1), (np.arange(1, n), t.parent[1:])), shape=(n, n))
        return _Topology(to_node=sp.kron(eye, nob, format="csr"),
                         flow=sp.kron(eye, sp.identity(n) - children, format="csr"),
                         parent=sp.kron(eye, parent, format="csr"),
                         branch=np.flatnonzero(np.tile(np.arange(n) > 0, T)),
                         root=np.flatnonzero(np.tile(np.arange(n) == 0, T)), elem_rows=rows,
                         poly_p=sp.kron(np.cos(ang)[:, None], pick, format="csr"),
                         poly_q=sp.kron(np.sin(ang)[:, None], pick, format="csr"),
                         poly_rep=sp.kron(np.ones((_POLYGON_SIDES, 1)), sp.identity(rows.size), format="csr"))


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
    # (program objective - the solver's dual bound) / |program objective| (the objective here plus any soft
    # limits' penalties): how far from optimal the solution can be; None where the solver gives no duals (MIP)
    optimality_gap: float | None = None


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
    ``method``: ``direct`` (every row at once) or ``lazy`` (``lindistflow``, HiGHS: cutting planes; the model
    starts without the network's rows and adds each voltage and rating row a solution breaks, and squared
    objective terms as tangents, re-solving from the last basis: the same optimum, to ``lazy_gap`` relative on
    quadratic terms (and the solver's tolerances); on a day of thousands of EVs few network rows ever bind, so
    the problem stays the size of the sessions; where V2G cycling or the network binds at most steps, it can be
    slower than ``direct``).
    ``parallel_simplex``: HiGHS's parallel dual simplex for its LPs (the lazy method's included): on an idle
    2-core machine the day of 3,000 EVs took 1.6-1.9 s instead of 2.0-2.6 s serially, but 3-48 s while another
    process held the second core, so it is off unless asked for.
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
    method: str = "direct"
    lazy_gap: float = 1e-7
    parallel_simplex: bool = False

    def __post_init__(self) -> None:
        check_choice("formulation", self.formulation, FORMULATIONS)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("ev_model", self.ev_model, EV_MODELS)
        check_choice("method", self.method, METHODS)
        check_real("lazy_gap", self.lazy_gap, 0.0, 0.1)
        check_bool("parallel_simplex", self.parallel_simplex)
        if self.method == "lazy":
            if self.formulation != "lindistflow" or self.solver not in ("auto", "HIGHS"):
                raise ValueError(f"method: lazy needs formulation lindistflow and solver auto or HIGHS, got "
                                 f"{self.formulation} and {self.solver}")
            soft = [k for k in ("voltage_pu", "voltage_high_pu", "loading_kw") if self.softens(k)]
            if soft:
                raise ValueError(f"soft: method lazy adds network rows only once broken and cannot soften "
                                 f"{', '.join(soft)}; use method direct")
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
    also discharge, at every step within [e_min_kwh, cap_kwh]), added to the program.  ``lazy``: the V2G
    sessions' stored energy ``soc`` is a running sum whose bounds ``soc_kwh`` :meth:`_Model.separate` adds as
    rows once a solution breaks them (no per-step energy variable: the simplex would pivot each into its basis)."""

    soc: Affine | None = None

    def __init__(self, prog: Program, ss: Sessions, T: int, dt: float, slack, lazy: bool = False) -> None:
        sid, tt, first = _entries(ss)
        self.sid, self.tt = sid, tt
        n_ent = sid.size
        d = self.idx_d = np.flatnonzero(ss.p_dis_max_kw[sid] > 0)
        self.xc = prog.var(n_ent, 0.0, ss.p_ch_max_kw[sid])
        self.xd = prog.var(d.size, 0.0, ss.p_dis_max_kw[sid[d]])
        self.c_t, self.c_bus, self.c_station = tt, ss.bus[sid], ss.station[sid]
        self.d_t, self.d_bus, self.d_station = tt[d], ss.bus[sid[d]], ss.station[sid[d]]
        short = slack("target_kwh", ss.n)
        gain = ss.eta_ch[sid] * dt
        loss_d = dt / ss.eta_dis[sid[d]]
        s_c = sp.csr_matrix((gain, (sid, np.arange(n_ent))), shape=(ss.n, n_ent))
        s_d = sp.csr_matrix((loss_d, (sid[d], np.arange(d.size))), shape=(ss.n, d.size))
        e_end = ss.e0_kwh + s_c @ self.xc - s_d @ self.xd
        prog.ge(e_end + short, ss.e_target_kwh)
        prog.le(e_end, ss.cap_kwh)
        if d.size and lazy:
            self.soc = _running_sums(sid[d]) @ (gain[d] * self.xc[d] - loss_d * self.xd) + ss.e0_kwh[sid[d]]
            self.soc_kwh = (ss.e_min_kwh[sid[d]], ss.cap_kwh[sid[d]])
        elif d.size:
            e = prog.var(d.size, ss.e_min_kwh[sid[d]], ss.cap_kwh[sid[d]])
            prev = sp.eye(d.size, k=-1, format="csr").multiply((~first[d])[:, None]).tocsr()
            delta = gain[d] * self.xc[d] - loss_d * self.xd
            prog.eq(e - prev @ e, delta + np.where(first[d], ss.e0_kwh[sid[d]], 0.0))

    def separate(self, x: np.ndarray, tol: float) -> list:
        """``lazy``: the stored-energy rows ``x`` breaks by more than ``tol`` kWh."""
        e = self.soc.at(x)
        cuts = []
        for sign, bound in zip((-1.0, 1.0), self.soc_kwh):
            k = np.flatnonzero(sign * (e - bound) > tol)
            if k.size:
                cuts.append((sign * self.soc[k], sign * bound[k]))
        return cuts

    def powers(self, prog: Program, ss: Sessions, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Each session's charging and discharging power (n_session, T) at the solution."""
        p_ch, p_dis = np.zeros((ss.n, T)), np.zeros((ss.n, T))
        if self.sid.size:
            p_ch[self.sid, self.tt] = np.maximum(prog.value(self.xc), 0.0)
        if self.idx_d.size:
            p_dis[self.sid[self.idx_d], self.tt[self.idx_d]] = np.maximum(prog.value(self.xd), 0.0)
        return p_ch, p_dis


def _running_sums(group: np.ndarray) -> sp.csr_matrix:
    """(n, n): row i sums the entries j <= i of i's group (the entries of a group consecutive)."""
    n = group.size
    start = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if n else np.zeros(0, np.int64)
    first = np.repeat(start, np.diff(np.r_[start, n]))
    count = np.arange(n) - first + 1
    rows = np.repeat(np.arange(n), count)
    cols = np.repeat(first, count) + np.arange(rows.size) - np.repeat(np.cumsum(count) - count, count)
    return sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))


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

    def __init__(self, prog: Program, ss: Sessions, T: int, dt: float, slack) -> None:
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
        self.xc = prog.var(c_idx.size, 0.0, cap_c.reshape(-1)[c_idx])
        self.xd = prog.var(d_idx.size, 0.0, cap_d.reshape(-1)[d_idx])
        gc, gd = c_idx // T, d_idx // T
        self.c_t, self.c_bus, self.c_station = c_idx % T, groups[gc, 0], groups[gc, 1]
        self.d_t, self.d_bus, self.d_station = d_idx % T, groups[gd, 0], groups[gd, 1]
        # battery-side energy each group has taken by the end of each step, as a state with a one-step recursion
        # (a cumulative sum written out would put a dense triangle per group into the KKT system)
        step = sp.kron(sp.identity(G), sp.identity(T) - sp.eye(T, k=-1), format="csr")  # (G T, G T)
        e_c = sp.csr_matrix((eta_c[gc] * dt, (c_idx, np.arange(c_idx.size))), shape=(G * T, c_idx.size))
        e_d = sp.csr_matrix((inv_eta_d[gd] * dt, (d_idx, np.arange(d_idx.size))), shape=(G * T, d_idx.size))
        energy = prog.var(G * T, ub=self.hi.reshape(-1))
        short = slack("target_kwh", G * T)
        prog.eq(step @ energy, e_c @ self.xc - e_d @ self.xd)
        prog.ge(energy + short, self.lo.reshape(-1))

    def profiles(self, prog: Program, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Each group's charging and discharging power (G, T) at the solution."""
        pc, pd = np.zeros(self.G * T), np.zeros(self.G * T)
        if self.c_idx.size:
            pc[self.c_idx] = np.maximum(prog.value(self.xc), 0.0)
        if self.d_idx.size:
            pd[self.d_idx] = np.maximum(prog.value(self.xd), 0.0)
        return pc.reshape(self.G, T), pd.reshape(self.G, T)


def disaggregate(ss: Sessions, dt_h: float, group: np.ndarray, p_ch_kw: np.ndarray, p_dis_kw: np.ndarray,
                 options: OPFOptions | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Share each group's planned profile (``p_ch_kw``, ``p_dis_kw``: (G, T)) out among its sessions
    (``group``: (n,) the group of each session) so that every session keeps its own bounds: a linear program
    with no network in it, tracking each group's net power at every step (the least absolute deviation) and
    each station's charging limit.  Where a group's aggregate asked for more than its sessions can give (the
    aggregate is a relaxation) they deviate.  Returns each session's charging and discharging power (n, T) and
    the energy by which the groups' net power misses their profiles, kWh summed over groups and steps."""
    opt = options if options is not None else OPFOptions()
    G, T = p_ch_kw.shape
    if ss.n == 0:
        return np.zeros((0, T)), np.zeros((0, T)), 0.0
    prog = Program()
    penalties = []

    def slack(name: str, n: int):
        if not opt.softens(name):
            return 0
        v = prog.var(n, lb=0.0)
        penalties.append(Quadratic(SOFT_PENALTY[name] * v.sum()))
        return v

    ev = _SessionVars(prog, ss, T, dt_h, slack)
    grp_c, grp_d = group[ev.sid], group[ev.sid[ev.idx_d]]
    net = _sum_into(grp_c * T + ev.c_t, G * T) @ ev.xc - _sum_into(grp_d * T + ev.d_t, G * T) @ ev.xd
    dev = prog.var(G * T)
    prog.ge(dev, net - (p_ch_kw - p_dis_kw).reshape(-1))
    prog.ge(dev, (p_ch_kw - p_dis_kw).reshape(-1) - net)
    if opt.station_p_max_kw is not None and (ss.station >= 0).any():
        _station_limits(prog, ev, int(ss.station.max()) + 1, T, dataclasses.replace(opt, station_ramp_kw=None),
                        slack)
    prog.minimize([Quadratic(dev.sum()), *penalties])
    if prog.solve("HIGHS") not in OPTIMAL:
        raise InfeasibleError(f"disaggregation: the sessions' own bounds are {prog.status} (solver HIGHS)")
    tracking = np.maximum(prog.value(dev), 0.0)
    off_kwh = float(tracking.sum()) * dt_h if dev.size else 0.0
    if off_kwh > 1e-3:
        log.info("disaggregation: the sessions miss their groups' profiles by %.4g kWh in all (at most %.4g kW)",
                 off_kwh, float(tracking.max()))
    return (*ev.powers(prog, ss, T), off_kwh)


def _station_limits(prog: Program, ev, n_st: int, T: int, opt: OPFOptions, slack) -> None:
    """Each charging station's charging power at most ``station_p_max_kw`` (discharge passes the station's limit,
    as the simulator's dispatch does), and its net power moving by at most ``station_ramp_kw`` between steps."""
    at_c, at_d = ev.c_station >= 0, ev.d_station >= 0
    g_c = sp.csr_matrix((np.ones(int(at_c.sum())), (ev.c_t[at_c] * n_st + ev.c_station[at_c], np.flatnonzero(at_c))),
                        shape=(T * n_st, ev.c_t.size))
    g_d = sp.csr_matrix((np.ones(int(at_d.sum())), (ev.d_t[at_d] * n_st + ev.d_station[at_d], np.flatnonzero(at_d))),
                        shape=(T * n_st, ev.d_t.size))
    if opt.station_p_max_kw is not None:
        prog.le(g_c @ ev.xc, opt.station_p_max_kw)
    if opt.station_ramp_kw is not None and T > 1:
        diff = (sp.eye(T * n_st, k=n_st, format="csr") - sp.eye(T * n_st, format="csr"))[: (T - 1) * n_st]
        ramp = diff @ (g_c @ ev.xc - g_d @ ev.xd)
        lim = opt.station_ramp_kw + slack("ramp_kw", (T - 1) * n_st)
        prog.le(ramp, lim)
        prog.le(-ramp, lim)


def balanced_schedule(base_kw: npt.ArrayLike, sessions: Sessions, network: npt.ArrayLike, dt_h: float,
                      station_p_max_kw: float | None = None) -> tuple[np.ndarray, float]:
    """Seed 002's balancing plan, network limits aside: each session's net power (n, T), kW (> 0 charges), that
    minimises the mean over steps of the standard deviation over networks of their loads, ``base_kw`` (T, Z)
    plus the sessions' power (session k on network ``network[k]``), and that planned mean, kW.  Every session
    reaches its energy target (one out of reach within the stations' limits is left short at
    :data:`SOFT_PENALTY`'s price, prohibitive against kW of spread) and ends at most at ``cap_kwh`` (pass the
    targets as capacities to plan no energy beyond them, as the oracle does); ``station_p_max_kw`` limits each
    station's charging.  The oracle then plans each feeder to draw the load found here (:func:`solve_opf`'s
    ``tie_target_kw``), within the feeder's limits; ``sessions.bus`` is not read."""
    base = np.asarray(base_kw, dtype=float)
    if base.ndim != 2 or base.shape[1] < 2 or not np.isfinite(base).all():
        raise ValueError(f"base_kw: expected finite loads of shape (steps, networks >= 2), got {base.shape}")
    T, Z = base.shape
    net = np.asarray(network)
    if net.shape != (sessions.n,) or not np.issubdtype(net.dtype, np.integer) or net.size and (
            net.min() < 0 or net.max() >= Z):
        raise ValueError(f"network: expected {sessions.n} network numbers in [0, {Z - 1}] (one per session)")
    if sessions.n and sessions.end.max() > T:
        raise ValueError(f"sessions.end: expected <= {T} (steps of base_kw), got {sessions.end.max()}")
    check_real("dt_h", dt_h, 1e-6, 24.0)
    bad = _unreachable(sessions, dt_h)
    if bad.size:
        raise InfeasibleError(f"sessions {_first(bad)}: energy target out of reach even charging at full power "
                              f"while plugged in ({bad.size} of {sessions.n} sessions)")
    prog = Program()
    short: list[Affine] = []

    def slack(name: str, n: int):  # only targets give (station limits are the chargers' own)
        if name != "target_kwh":
            return 0
        short.append(prog.var(n, lb=0.0))
        return short[-1]

    ev = _SessionVars(prog, sessions, T, dt_h, slack)
    # each network's load per step, t-major (T Z,)
    load = (_sum_into(ev.c_t * Z + net[ev.sid], T * Z) @ ev.xc
            - _sum_into(ev.d_t * Z + net[ev.sid[ev.idx_d]], T * Z) @ ev.xd + base.reshape(-1))
    dev = sp.kron(sp.identity(T), sp.identity(Z) - np.full((Z, Z), 1.0 / Z), format="csr") @ load
    spread = prog.var(T, lb=0.0)  # >= each step's ||load - its mean||, sqrt(Z) times its std
    prog.soc(spread, *(dev[np.arange(T) * Z + z] for z in range(Z)))
    if station_p_max_kw is not None and (sessions.station >= 0).any():
        _station_limits(prog, ev, int(sessions.station.max()) + 1, T, OPFOptions(station_p_max_kw=station_p_max_kw),
                        slack)
    prog.minimize([Quadratic(spread.sum() * (1.0 / (math.sqrt(Z) * T))),
                   *(Quadratic(v.sum() * SOFT_PENALTY["target_kwh"]) for v in short)])
    if prog.solve("CLARABEL") not in OPTIMAL:
        raise InfeasibleError(f"balanced_schedule: the solver ended {prog.status}")
    p_ch, p_dis = ev.powers(prog, sessions, T)
    return p_ch - p_dis, float(prog.value(spread).sum() / (math.sqrt(Z) * T))


class _Model:
    """One program; :func:`solve_opf` builds it, solves it and reads it back."""

    def __init__(self, net: Network, hz: Horizon, ss: Sessions, obj: Objective, caps: Capacitors,
                 opt: OPFOptions) -> None:
        f = net.feeder
        T, nb, dt = hz.n_step, f.n_bus, hz.dt_h
        self.net, self.hz, self.ss, self.opt, self.T = net, hz, ss, opt, T
        self.solver = opt.solver  # the one used, once solved
        eye = sp.identity(T, format="csr")
        self.slacks = {}
        prog = self.prog = Program()

        def slack(name: str, n: int):
            """A penalised slack on the limits of kind ``name`` where the options soften them, else 0."""
            if not opt.softens(name):
                return 0
            v = prog.var(n, lb=0.0)
            self.slacks[name] = v
            return v

        # EV sessions, one variable per session and plugged step, or their aggregate per bus / station
        if opt.ev_model == "sessions":
            ev = _SessionVars(prog, ss, T, dt, slack, lazy=opt.method == "lazy")
        else:
            ev = _AggregateVars(prog, ss, T, dt, slack)
        self.ev = ev
        p_ev = _sum_into(ev.c_t * nb + ev.c_bus, T * nb) @ ev.xc - _sum_into(ev.d_t * nb + ev.d_bus, T * nb) @ ev.xd

        # DER: output up to what is available; the rest of PV/wind is curtailed
        kinds = np.array(f.der_kind)
        n_der = kinds.size
        avail = hz.der_avail_kw.reshape(-1)
        self.der = prog.var(T * n_der, 0.0, avail)
        caps.check(nb)
        if caps.step_kvar is None:
            self.qc = prog.var(T * caps.bus.size, 0.0, np.tile(caps.q_max_kvar, T))
        else:
            steps = prog.var(T * caps.bus.size, 0.0, np.tile(np.floor(caps.q_max_kvar / caps.step_kvar + 1e-9), T),
                             integer=True)
            self.qc = np.tile(caps.step_kvar, T) * steps

        self.p = hz.load_p_kw.reshape(-1) + p_ev - _at_buses(T, nb, f.der_bus) @ self.der  # (T n_bus,) net load, kW
        self.q = hz.load_q_kvar.reshape(-1) - _at_buses(T, nb, caps.bus) @ self.qc
        if opt.method == "lazy":
            tie, loss = self._network_lazy()
        else:
            tie, loss = self._network(eye, slack, opt.formulation == "socp")
        self.tie, self.loss = tie, loss
        if (opt.station_ramp_kw is not None or opt.station_p_max_kw is not None) and (ss.station >= 0).any():
            _station_limits(prog, ev, int(ss.station.max()) + 1, T, opt, slack)

        self.terms = self._objective(obj, kinds, avail, tie, loss, dt)
        penalty = [Quadratic(opt.penalty(k) * v.sum()) for k, v in self.slacks.items()]
        prog.minimize([*self.terms.values(), *penalty])

    # ------------------------------------------------------------------------------------------ pieces

    def _network(self, eye, slack, relaxed: bool):
        """Branch-flow variables per step and node: P, Q into the node through its branch, squared voltage v
        (and squared current l for ``socp``).  Each row reads a node, its parent or children: a sparse problem
        (the bus-injection form, voltages as dense sensitivities, solves ~10x slower)."""
        net, f, T, prog = self.net, self.net.feeder, self.T, self.prog
        t, n, kw, topo = f.tree, f.tree.n_node, net.kw_per_pu, net.topology(T)
        to_node, branch, root = topo.to_node, topo.branch, topo.root
        r, x = np.tile(t.r_pu, T), np.tile(t.x_pu, T)
        P, Q = prog.var(T * n), prog.var(T * n)
        # squared voltages: the root's fixed by its bounds
        lo_v, hi_v = np.full(T * n, -np.inf), np.full(T * n, np.inf)
        lo_v[root] = hi_v[root] = net.v0_pu ** 2
        v = prog.var(T * n, lo_v, hi_v)
        vpar = topo.parent @ v
        drop = 2 * (r * P + x * Q)
        if relaxed:
            # a transformer's voltage ratio c scales the parent's voltage (V = c V_parent - z J); lines have c = 1
            vpar = np.tile(t.coef[:, 4] ** 2 + t.coef[:, 5] ** 2, T) * vpar
            hi_l = np.full(T * n, np.inf)
            hi_l[root] = 0.0
            ell = prog.var(T * n, 0.0, hi_l)
            prog.eq(topo.flow @ P - r * ell, to_node @ self.p / kw)
            prog.eq(topo.flow @ Q - x * ell, to_node @ self.q / kw)
            prog.eq(v[branch], (vpar - drop + (r ** 2 + x ** 2) * ell)[branch])
            prog.soc((ell + vpar)[branch], 2 * P[branch], 2 * Q[branch], (ell - vpar)[branch])
            self.ell = ell
            loss = (sp.kron(eye, sp.csr_matrix(t.r_pu[None, :])) @ ell) * kw
        else:
            # AC residuals of the previous round (solve_opf), variables fixed by their bounds: each node's
            # squared-voltage error and each step's losses
            self.corr = prog.var(T * n, 0.0, 0.0)
            self.loss_fixed = prog.var(T, 0.0, 0.0)
            prog.eq(topo.flow @ P, to_node @ self.p / kw)
            prog.eq(topo.flow @ Q, to_node @ self.q / kw)
            prog.eq(v[branch], (vpar - drop + self.corr)[branch])
            loss = self.loss_fixed
        self.P, self.Q, self.v2_node = P, Q, v
        vb = to_node.T @ v  # (T n_bus,) each bus's node
        vmin, vmax = np.tile(f.v_min_pu ** 2, T), np.tile(f.v_max_pu ** 2, T)
        prog.ge(vb + slack("voltage_pu", T * f.n_bus), vmin)
        prog.le(vb - slack("voltage_high_pu", T * f.n_bus), vmax)
        self.v2 = vb
        if t.elem_node.size:
            rows = topo.elem_rows
            if relaxed:
                i_max = (t.elem_rating_ka / t.elem_ibase_ka).min(axis=1)
                over = slack("loading_kw", rows.size)
                prog.le(ell[rows], np.tile(i_max ** 2, T) + over / kw)
            else:
                # ampacity as apparent power at the lowest allowed voltage, a polygon inside the circle (an LP;
                # Clarabel solves 3,000 small cones no faster than these rows)
                lim = np.tile(net.s_max_kva * np.cos(np.pi / _POLYGON_SIDES), T * _POLYGON_SIDES) / kw
                over = slack("loading_kw", rows.size)
                prog.le(topo.poly_p @ P + topo.poly_q @ Q,
                        lim + (topo.poly_rep @ over / kw if isinstance(over, Affine) else 0.0))
        return P[root] * kw + (0 if relaxed else self.loss_fixed), loss

    def _network_lazy(self):
        """LinDistFlow without rows (``method: lazy``): the tie line is the net load plus the fixed losses, and
        each bus's squared voltage and each element's flow are sensitivities of the bus injections, rows
        :meth:`separate` adds once a solution breaks them."""
        net, f, T, prog = self.net, self.net.feeder, self.T, self.prog
        t, n, nb, kw = f.tree, f.tree.n_node, f.n_bus, net.kw_per_pu
        self.corr = prog.var(T * n, 0.0, 0.0)
        self.loss_fixed = prog.var(T, 0.0, 0.0)
        anc = net.paths
        path = anc[t.node_of_bus]  # (n_bus, n_node): the branches on each bus's path
        down = anc[t.node_of_bus][:, t.elem_node].T / kw  # (n_elem, n_bus): each element's flow per bus injection
        # squared voltage per kW (kvar) drawn at each bus; the offsets sum along the path
        self.sens = {"p": -2 * (path * t.r_pu) @ path.T / kw, "q": -2 * (path * t.x_pu) @ path.T / kw,
                     "corr": path, "elem": down}
        tie = _sum_into(np.repeat(np.arange(T), nb), T) @ self.p + self.loss_fixed
        return tie, self.loss_fixed

    def squared_voltages(self, x: np.ndarray | None = None) -> np.ndarray:
        """(T, n_bus) each bus's squared voltage at ``x`` (default: the solution)."""
        x = self.prog.x if x is None else x
        if self.opt.method == "direct":
            return self.v2.at(x).reshape(self.T, -1)
        return self._lazy_v2(x, *self._injections(x))

    def _injections(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T, n_bus) each bus's net active and reactive load at ``x``."""
        return self.p.at(x).reshape(self.T, -1), self.q.at(x).reshape(self.T, -1)

    def _lazy_v2(self, x: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        s = self.sens
        corr = self.corr.at(x).reshape(self.T, -1)
        return self.net.v0_pu ** 2 + p @ s["p"].T + q @ s["q"].T + corr @ s["corr"].T

    def separate(self, x: np.ndarray, tol: float = 1e-7) -> list:
        """``method: lazy``: the rows ``x`` breaks by more than ``tol`` (p.u.², p.u., kWh) as ``(lhs, rhs)``
        with ``lhs <= rhs``: bus voltages, element ratings and V2G sessions' stored energy."""
        f, nb, s = self.net.feeder, self.net.feeder.n_bus, self.sens
        p, q = self._injections(x)
        v2 = self._lazy_v2(x, p, q)
        cuts = []
        if getattr(self.ev, "soc", None) is not None:
            cuts += self.ev.separate(x, tol)
        for sign, bound in ((-1.0, f.v_min_pu ** 2), (1.0, f.v_max_pu ** 2)):
            tt, b = np.nonzero(sign * (v2 - bound) > tol)
            if tt.size:
                v2_rows = (self._rows(tt, s["p"][b], self.p, nb) + self._rows(tt, s["q"][b], self.q, nb)
                           + self._rows(tt, s["corr"][b], self.corr, s["corr"].shape[1]))
                cuts.append((sign * v2_rows, sign * (bound[b] - self.net.v0_pu ** 2)))
        if s["elem"].size:
            pe, qe = p @ s["elem"].T, q @ s["elem"].T  # (T, n_elem), p.u.
            ang = np.pi * (2 * np.arange(_POLYGON_SIDES) + 1) / _POLYGON_SIDES
            lim = self.net.s_max_kva * np.cos(np.pi / _POLYGON_SIDES) / self.net.kw_per_pu
            side = np.cos(ang)[:, None, None] * pe + np.sin(ang)[:, None, None] * qe  # (sides, T, n_elem)
            k, tt, e = np.nonzero(side - lim > tol)
            if k.size:
                cuts.append((np.cos(ang[k]) * self._rows(tt, s["elem"][e], self.p, nb)
                             + np.sin(ang[k]) * self._rows(tt, s["elem"][e], self.q, nb), lim[e]))
        return cuts

    @staticmethod
    def _rows(tt: np.ndarray, coef: np.ndarray, x: Affine, width: int) -> Affine:
        """Row r: ``coef[r] @`` the step ``tt[r]`` block (``width`` entries) of ``x``."""
        k = tt.size
        cols = tt[:, None] * width + np.arange(width)[None, :]
        G = sp.csr_matrix((coef.reshape(-1), (np.repeat(np.arange(k), width), cols.reshape(-1))),
                          shape=(k, x.size))
        return G @ x

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
        self.prog.fix(self.corr, corr.reshape(-1))
        self.prog.fix(self.loss_fixed, flow.loss_kw)

    def cone_gap(self) -> float:
        """socp: the largest slack ``l v_parent - P² - Q²`` over branches and steps, relative to the step's
        largest ``l v_parent`` (0: the relaxation is exact)."""
        t, T = self.net.feeder.tree, self.T
        n = t.n_node
        P, Q, ell, v = (self.prog.value(x).reshape(T, n) for x in (self.P, self.Q, self.ell, self.v2_node))
        ratio2 = t.coef[:, 4] ** 2 + t.coef[:, 5] ** 2
        rhs = (ell * ratio2 * v[:, np.maximum(t.parent, 0)])[:, 1:]
        lhs = (P ** 2 + Q ** 2)[:, 1:]
        # relative to the step's largest flow: a near-empty branch's relative slack says nothing
        return float(np.max((rhs - lhs) / np.maximum(rhs.max(axis=1, keepdims=True), 1e-12))) if rhs.size else 0.0

    def _objective(self, obj: Objective, kinds, avail, tie, loss, dt) -> dict[str, Quadratic]:
        T, prog = self.T, self.prog
        terms = {}
        renew = np.tile(np.isin(kinds, ("pv", "wind")), T)
        diesel = np.flatnonzero(np.tile(kinds == "diesel", T))
        if obj.tie_target_kw is not None:
            target = _series("tie_target_kw", obj.tie_target_kw, T)
            dev = (tie - target) / 1e3
            if self.opt.method == "direct":
                # through a variable of its own: a unit quadratic term, however the feeder's power base scales
                # tie (the lazy method's tangents read the range of tie's own terms instead)
                dev = prog.var(T)
                prog.eq(dev, (tie - target) / 1e3)
            terms["tie_deviation_mw2"] = Quadratic(squares=[(1.0, dev)])
        buy = None
        if obj.energy_price_per_kwh is not None or obj.capacity_price_per_kw or obj.carbon is not None:
            buy = prog.var(T, lb=0.0)
            prog.ge(buy, tie)
        if obj.energy_price_per_kwh is not None:
            terms["purchase"] = Quadratic((_series("energy_price_per_kwh", obj.energy_price_per_kwh, T) * buy).sum()
                                          * dt)
        if obj.capacity_price_per_kw:
            terms["capacity"] = Quadratic(obj.capacity_price_per_kw * _upper(prog, buy))
        if obj.curtail_cost_per_kwh and renew.any():
            terms["curtailment"] = Quadratic(obj.curtail_cost_per_kwh * dt * (avail[renew] - self.der[renew]).sum())
        a, b = obj.diesel_cost
        if (a or b) and diesel.size:
            # a = 0 keeps a linear program linear
            terms["diesel"] = Quadratic(b * dt * self.der[diesel].sum(), [(a * dt, self.der[diesel])] if a else [])
        if obj.carbon is not None:
            emis_t = (obj.grid_kg_per_kwh * buy.sum() + obj.diesel_kg_per_kwh * self.der[diesel].sum()) * dt / 1e3
            c = prog.var(1)
            for piece in obj.carbon._pieces(emis_t):
                prog.ge(c, piece)
            terms["carbon"] = Quadratic(c)
        if obj.loss_price_per_kwh:
            terms["losses"] = Quadratic(obj.loss_price_per_kwh * dt * loss.sum())
        elif self.opt.formulation == "socp" and self.opt.socp_loss_weight:
            terms["loss_regulariser"] = Quadratic(self.opt.socp_loss_weight * dt * loss.sum() / 1e3)
        if obj.accounts is not None:
            terms.update(self._accounts(obj.accounts, dt))
        if obj.peak_valley_weight:
            terms["peak_valley"] = Quadratic(obj.peak_valley_weight * (_upper(prog, tie) + _upper(prog, -tie)))
        return terms

    def _accounts(self, acc: Accounts, dt: float) -> dict[str, Quadratic]:
        T, nb, prog = self.T, self.net.feeder.n_bus, self.prog
        acc.check(nb, T)
        nz = acc.n_zone
        # (T Z, T n_bus): each zone's net load per step
        rows = (np.arange(T)[:, None] * nz + acc.zone_of_bus[None, :]).reshape(-1)
        g = sp.csr_matrix((np.ones(T * nb), (rows, np.arange(T * nb))), shape=(T * nz, T * nb))
        load = g @ self.p
        terms = {"zone_purchase": Quadratic(dt * (np.repeat(acc.price_per_kwh, nz) * load).sum())}
        if acc.carbon_lines:
            fixed = np.zeros(nz) if acc.excess_t is None else np.asarray(acc.excess_t, dtype=float).sum(axis=0)
            excess = fixed
            if acc.kg_per_kwh:
                drawn = prog.var(T * nz, lb=0.0)
                prog.ge(drawn, load)
                per_zone = sp.kron(np.ones((1, T)), sp.identity(nz), format="csr")
                excess = fixed + (acc.kg_per_kwh * dt / 1e3) * (per_zone @ drawn)
            c = prog.var(nz)
            for a, b in acc.carbon_lines:
                prog.ge(c, a * excess + b)
            terms["zone_carbon"] = Quadratic(c.sum())
        return terms


def _upper(prog: Program, x: Affine) -> Affine:
    """A variable at least every entry of ``x``: its maximum, where the objective pushes it down."""
    z = prog.var(1)
    prog.ge(np.ones((x.size, 1)) @ z, x)
    return z


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
        if model.prog.status not in OPTIMAL:
            if opt.soft is True:
                raise InfeasibleError(f"the softened problem is {model.prog.status} (solver {model.solver})")
            raise InfeasibleError(_diagnose(net, horizon, ss, obj, caps, opt, model.prog.status))
        if k == rounds:
            break
        # AC residuals at this solution become the model's constants for the next round
        p, q = _value(model.prog, model.p, horizon), _value(model.prog, model.q, horizon)
        flow = backend.solve(p, q)
        if not flow.converged.all():
            log.warning("AC correction: the sweep did not converge at %d steps; stopping after round %d",
                        int((~flow.converged).sum()), k)
            break
        model.correct(flow, p, q)
    result = _read(model, build_s, solve_s)
    return _with_ac(result, model, backend)


def _solve(model: _Model, solver: str) -> None:
    prog = model.prog
    if solver == "auto":
        # measured on IEEE 33, 96 steps, 300 EVs: HiGHS solves the LP in 0.7 s (Clarabel 6 s) but stalls on the
        # QP, which Clarabel solves in 5 s; OSQP fails to converge on both
        solver = "HIGHS" if prog.is_lp or model.opt.method == "lazy" else "CLARABEL"
        model.solver = solver
    if prog.is_mixed_integer and (solver != "HIGHS" or not (prog.is_lp or model.opt.method == "lazy")):
        raise ValueError(f"capacitors.step_kvar: integer capacitor steps need a linear problem solved by HiGHS "
                         f"(formulation lindistflow, no quadratic term); got solver {solver}")
    settings = {"simplex_strategy": 2} if model.opt.parallel_simplex else None
    if model.opt.method == "lazy":
        prog.solve_cuts(model.separate, model.opt.lazy_gap, settings=settings)
        return
    prog.solve(solver, settings if solver == "HIGHS" else None)
    if prog.status == "solver_error" and solver == "CLARABEL":
        # Clarabel stops on a numerical error on a few of seed 001's ramp-limited days (a near-singular KKT
        # system); iterative refinement and ten times its default static regularisation solve them to optimality
        log.info("Clarabel: numerical error; solving again with iterative refinement, static regularisation 1e-7")
        prog.solve(solver, {"iterative_refinement_enable": True, "static_regularization_constant": 1e-7})


def _value(prog: Program, expr: Affine, hz: Horizon) -> np.ndarray:
    return prog.value(expr).reshape(hz.n_step, -1)


def _first(idx: np.ndarray, n: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:n])
    return shown + (", ..." if idx.size > n else "")


def _diagnose(net, hz, ss, obj, caps, opt, status) -> str:
    """Re-solve with every limit softened and name the limits that had to give."""
    soft = _Model(net, hz, ss, obj, caps, dataclasses.replace(opt, soft=True, method="direct"))
    _solve(soft, opt.solver)
    if soft.prog.status not in OPTIMAL:
        return f"problem {status} (solver {soft.solver}); the softened problem too ({soft.prog.status})"
    f, T = net.feeder, hz.n_step
    parts = []
    for name, var in soft.slacks.items():
        val = soft.prog.value(var)
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
    prog = m.prog
    p_bus = _value(prog, m.p, hz)
    tracking_kwh = 0.0
    if isinstance(m.ev, _SessionVars):
        p_ch, p_dis = m.ev.powers(prog, ss, T)
    else:
        pc, pd = m.ev.profiles(prog, T)
        p_ch, p_dis, tracking_kwh = disaggregate(ss, hz.dt_h, m.ev.group, pc, pd, m.opt)
        # the buses see what the sessions do, which the AC check then judges
        shift = np.zeros((T, f.n_bus))
        np.add.at(shift.T, ss.bus, (p_ch - p_dis))
        np.subtract.at(shift.T, m.ev.group_bus, pc - pd)
        p_bus = p_bus + shift
    step = hz.dt_h * (ss.eta_ch[:, None] * p_ch - p_dis / ss.eta_dis[:, None])
    e = np.concatenate([ss.e0_kwh[:, None], ss.e0_kwh[:, None] + np.cumsum(step, axis=1)], axis=1)
    v2 = m.squared_voltages()
    costs = {k: v.value(prog.x) for k, v in m.terms.items()}
    slack = {k: float(np.sum(prog.value(v))) for k, v in m.slacks.items()}
    n_der, n_cap = len(f.der_kind), m.qc.size // T if T else 0
    return OPFResult(
        formulation=m.opt.formulation, solver=m.solver, status=prog.status,
        objective=float(sum(costs.values())), costs=costs, build_s=build_s, solve_s=solve_s,
        p_ch_kw=p_ch, p_dis_kw=p_dis, e_kwh=e,
        der_kw=_value(prog, m.der, hz) if n_der else np.zeros((T, 0)),
        q_cap_kvar=_value(prog, m.qc, hz) if n_cap else np.zeros((T, 0)),
        tracking_kwh=tracking_kwh, p_bus_kw=p_bus, q_bus_kvar=_value(prog, m.q, hz),
        tie_kw=prog.value(m.tie),
        vm_pu=np.sqrt(np.maximum(v2, 0.0)), loss_kw=prog.value(m.loss).reshape(T),
        slack=slack, optimality_gap=_gap(prog))


def _gap(prog: Program) -> float | None:
    if prog.dual_objective is None:
        return None
    primal = prog.objective_at(prog.x)
    return (primal - prog.dual_objective) / max(abs(primal), 1e-9)


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
