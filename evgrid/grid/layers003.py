"""Seed 003's two layers on a radial feeder: the distribution layer (low-carbon economic dispatch, the
loss-minimising OPF and the zone targets) and the aggregation layer (each zone's aggregator meets its target with
EV users' price-based demand response and V2G).  Physics and optimisation only: numpy and cvxpy, the network
through :func:`evgrid.grid.opf.solve_opf`; no agent API.

Ji et al., *Int. J. Renewable Energy Development* (2025), "the paper" below; equation numbers are its.

Distribution layer (:func:`distribution_layer`)
    * Eq 1, the economic dispatch (ED): external purchase at the TOU price ``omega_g`` plus a capacity price on
      the day's peak purchase (32 yuan/kVA per month, a 30-day month: the day's share), quadratic diesel cost
      ``a P^2 + b P`` plus a no-load cost per running hour, the stepped carbon cost of eqs 2-5 and 0.1 yuan per
      kWh of PV / wind curtailed.  PV, wind, the diesel above its must-run floor and the EVs are dispatched under
      the network's limits (:func:`~evgrid.grid.opf.solve_opf`).
    * Eq 6, the loss-minimising OPF (LM): the same controllables, the network's losses as the only objective
      (``socp``: LinDistFlow has no losses).
    * Eqs 9-10: each zone's target per step is the larger of the zone's net load (its buses' loads + EVs - DER)
      in the two dispatches, active and reactive.
    * Eq 11: the price at which a zone may buy from its neighbours is capped at what buying upstream would cost
      with the losses of the path from the zone's purchase node to the slack,
      ``omega_Z P_B <= omega_g (P_B + G (V_a^2 + V_b^2 - 2 V_a V_b))``.

Aggregation layer (:func:`aggregation_layer`)
    Each zone's aggregator sets its period prices (multipliers on the base tariff, within +-50 %, the paper's
    floating range) and dispatches its EVs so that the zone's net load stays within its target at least cost
    (eq 22); users respond to the three period prices through the full 3x3 elasticity matrix, cross terms
    included (eqs 25, 26, 35); V2G users discharge where it pays.

Readings of the paper (ours, where it is ambiguous or silent)
    * **The target is a ceiling.**  Eq 9 takes the larger of two dispatches so that the zone keeps room for its own
      scheduling (section 2.4); eq 22 prices the zone's net load above the target net of what it buys from
      neighbours.  We read the target as the most the zone may draw from the feeder at each step (a hard bound;
      ``trade_kw_max`` > 0 lets a zone buy up to that much beyond it from neighbours at the eq 11 price).
      Reactive targets (eq 10) are reported; the aggregators dispatch active power only (EVs at unity power
      factor).
    * **Eq 6's branches.**  The paper minimises the losses of the branches *between* aggregation areas; the OPF
      prices every branch's losses the same (it has no per-branch weights), so the LM dispatch minimises all
      losses and the inter-zone losses of eq 6 are reported from its AC voltages.
    * **Eq 22's decision variables.**  Per zone: the three period price multipliers ``m`` (eq 25's ``dP/P = m - 1``),
      the charging power of each user category at each step, V2G charging and discharging power per category and
      step, and the purchase from neighbours ``P_B``.  The zone's DER output is the distribution layer's
      dispatch (eq 23's PV, wind and diesel as a fixed part of the zone's net load, so ``C_dg`` is a constant);
      ``omega_cg`` is the upstream TOU price ``omega_g``: the linear reward / penalty on the zone's net load.
    * **Who responds to prices.**  Users without V2G respond to prices (price-based demand response): the
      energy a category charges in each tariff block is its baseline (uncontrolled charging at the base tariff)
      times ``1 + [E (m - 1)]_period``; within a block the aggregator places it (orderly charging within each
      plugged EV's stay).  V2G users hand their battery to the aggregator: it charges and discharges them within
      their stays and energy bounds, and they leave with their target energy.  Users' charging needs are met:
      each category's total energy is at least its baseline (``keep_total_energy``).  Eq 25's ``1/T`` is read
      as part of the fitted matrix of eq 35 (``elasticity_scale`` = 1, as :class:`~evgrid.envs.market.MarketConfig`).
    * **Categories** (section 2.8) from the periods a stay spans: type 1 a single period; type 2 peak and
      off-peak, no valley; type 3 spans the valley and valley + off-peak charging can cover its need; type 4 spans
      the valley but cannot (a valley stay that cannot be covered without the peak is type 4 even without the
      peak: it is the least flexible).  Priority (Fig 4): type 4, then type 1, then types 2 and 3.  Each zone's
      categories are dispatched jointly in one LP (so every category stays feasible), with a small weight
      ``priority_eps`` per rank on each category's cost that gives higher-priority categories the cheaper room
      first where categories compete for it; the zones' LPs are solved side by side as one problem.
    * **The distribution layer sees what the aggregators can do.**  Its EV flexibility per zone is the
      aggregate of sub-sessions: each price-responsive EV's baseline energy of each tariff block, movable within
      that block, and each V2G EV as a whole session (exact with ``ev_model="sessions"``); so the aggregators can
      always reproduce the ED's EV schedule at ``m = 1`` and the targets are feasible for them.
    * **A periodic day.**  Stays past midnight continue at step 0 (the EV of the previous evening).  A V2G stay
      cut at midnight hands over, at midnight, the least energy from which its morning part can still reach the
      target (the morning is the valley): ``e_mid = max(e0, target - p eta t_morning)``.
    * **Carbon.**  Emissions are the thermal share of purchases at ``thermal_kg_per_kwh`` plus diesel's; the
      quota (eq 3) is 0.7 kg per kWh of diesel, PV and wind delivered (:class:`~evgrid.envs.market.CarbonConfig`).
      The OPF's carbon ladder has a fixed quota, so the quota that curtailed PV / wind would have earned is priced
      on the curtailment at the base carbon price (exact while the excess stays on one linear piece); its tiers
      grow linearly as eq 4's (``c (1 + i k)``).  The costs reported are recomputed from the schedule with the
      market's ladder (:func:`~evgrid.envs.market.stepped_carbon_cost`, which also has a sell price).
    * **Capacity price** on kW of purchase (the OPF prices kW, not kVA).
    * **Exports** earn nothing and are not barred (the OPF has no bound on reverse flow at the substation), so PV
      and wind are curtailed only where a voltage or branch limit binds.
    * **Diesel** runs at least at ``diesel_min_pu`` of its available power (the paper: its cost is the same before
      and after, 3,288.6 yuan: full output all day with :class:`~evgrid.envs.market.MarketConfig`'s a, b, c).

Formulation (measured on :func:`seed003_day`, IEEE 33, 24 hourly steps, 3,000 EVs): the ED is solved as a ``socp``
with a loss price of 1 yuan/MWh (0.001 yuan/kWh, where the objective leaves losses free the cone would not be
tight); it is tight (cone gap 2e-4, AC voltages within 3e-8 p.u., losses exact) in 2.4 s.  ``lindistflow`` takes
0.8 s but misses the AC voltages by 1e-3 p.u. and the day's losses by 30 % (two AC rounds: 3e-5 p.u., 27 s).

Sign convention: load positive, generation negative; a zone's net load is what it draws from the rest of the
feeder.  Currency: yuan.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from evgrid.envs import market as mk
from evgrid.grid import opf
from evgrid.grid.feeders import Feeder
from evgrid.grid.profiles import OFFPEAK, PEAK, VALLEY
from evgrid.grid.program import quiet_stdout
from evgrid.validate import as_array, check_choice, check_real, describe

if TYPE_CHECKING:
    from evgrid.envs.fleet import Sessions as FleetSessions

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

N_CATEGORY = 4
# Section 2.8 / Fig 4: type 4 first, then type 1, then types 2 and 3 (each within its own periods)
PRIORITY: tuple[tuple[int, ...], ...] = ((4,), (1,), (2, 3))
PERIOD_CODES = (VALLEY, OFFPEAK, PEAK)

# Table 2 (yuan per day) and the aggregation-layer figures of section 3.2 / the abstract
PAPER_TABLE2 = {
    "before": {"purchase": 6274.51, "diesel": 3288.6, "curtailment": 632.60, "carbon": 1356.16, "total": 11551.88},
    "after": {"purchase": 2258.82, "diesel": 3288.6, "curtailment": 0.0, "carbon": 673.42, "total": 6220.84},
}
PAPER_CAPABILITY_SHARES = (0.870, 0.834, 0.891)  # area 2 at 5:00 and 7:00, area 5 at 14:00
PAPER_PEAK_SHAVING_SHARE = 0.211

_MC = mk.MarketConfig()
_TOL_KW = 1e-3


class TargetError(ValueError):
    """A zone cannot keep its net load within its target; the message names the zone, steps and shortfall."""


# ------------------------------------------------------------------------------------------------ the fleet


@dataclass(frozen=True, eq=False)
class EVFleet:
    """EVs of one periodic day as arrays over EVs (times in steps of the horizon).

    EV ``i`` is plugged in at bus position ``bus[i]`` for ``stay[i]`` steps from step ``arrive[i]``; a stay
    past the last step continues at step 0 (the same EV the previous evening).  Powers at the grid side,
    energies in the battery: ``e(t+1) = e(t) + dt (eta_ch p_ch - p_dis / eta_dis)``.  ``p_dis_max_kw`` 0: the
    user allows no V2G (then a price-responsive user)."""

    bus: IntArray  # (n,) position in feeder.bus_ids
    arrive: IntArray  # (n,) plug-in step, [0, T)
    stay: IntArray  # (n,) steps plugged in, [1, T]
    p_ch_max_kw: FloatArray  # (n,)
    p_dis_max_kw: FloatArray  # (n,) 0: no V2G
    cap_kwh: FloatArray  # (n,)
    e0_kwh: FloatArray  # (n,) at plug-in
    e_target_kwh: FloatArray  # (n,) at departure, reachable at full power
    e_min_kwh: FloatArray  # (n,) V2G floor
    eta_ch: FloatArray  # (n,)
    eta_dis: FloatArray  # (n,)

    @property
    def n(self) -> int:
        return int(self.bus.shape[0])

    @property
    def v2g(self) -> npt.NDArray[np.bool_]:
        return self.p_dis_max_kw > 0

    def check(self, n_bus: int, n_step: int, dt_h: float) -> None:
        n = self.n
        for name in ("bus", "arrive", "stay", "p_ch_max_kw", "p_dis_max_kw", "cap_kwh", "e0_kwh", "e_target_kwh",
                     "e_min_kwh", "eta_ch", "eta_dis"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.shape != (n,) or not np.isfinite(a).all():
                raise ValueError(f"ev.{name}: expected {n} finite numbers (one per EV), got {describe(a)}")
        reach = self.e0_kwh + self.eta_ch * self.p_ch_max_kw * self.stay * dt_h
        rules = [("bus", (self.bus < 0) | (self.bus >= n_bus), f"[0, {n_bus - 1}]"),
                 ("arrive", (self.arrive < 0) | (self.arrive >= n_step), f"[0, {n_step - 1}]"),
                 ("stay", (self.stay < 1) | (self.stay > n_step), f"[1, {n_step}]"),
                 ("p_ch_max_kw", self.p_ch_max_kw <= 0, "> 0"), ("p_dis_max_kw", self.p_dis_max_kw < 0, ">= 0"),
                 ("cap_kwh", self.cap_kwh <= 0, "> 0"),
                 ("e0_kwh", (self.e0_kwh < self.e_min_kwh) | (self.e0_kwh > self.cap_kwh), "[e_min_kwh, cap_kwh]"),
                 ("e_target_kwh", (self.e_target_kwh < self.e0_kwh) | (self.e_target_kwh > self.cap_kwh)
                  | (self.e_target_kwh > reach + 1e-9), "[e0_kwh, min(cap_kwh, reachable at full power)]"),
                 ("e_min_kwh", self.e_min_kwh < 0, ">= 0"),
                 ("eta_ch", (self.eta_ch <= 0) | (self.eta_ch > 1), "(0, 1]"),
                 ("eta_dis", (self.eta_dis <= 0) | (self.eta_dis > 1), "(0, 1]")]
        for name, bad, allowed in rules:
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise ValueError(f"ev.{name}: EV {k} has {getattr(self, name)[k].item()!r}, expected {allowed}")

    def position(self, n_step: int) -> IntArray:  # (n, T)
        """Each step's position within each EV's stay (``>= stay``: not plugged in)."""
        return (np.arange(n_step)[None, :] - self.arrive[:, None]) % n_step

    def plugged(self, n_step: int) -> npt.NDArray[np.bool_]:  # (n, T)
        return self.position(n_step) < self.stay[:, None]


def fleet_from_sessions(sessions: FleetSessions, bus: npt.ArrayLike, *, dt_h: float, n_step: int,
                        v2g_soc_min: float = 0.3) -> EVFleet:
    """A periodic day's :class:`EVFleet` from :class:`evgrid.envs.fleet.Sessions` (hours after midnight) at bus
    positions ``bus``: arrival and departure rounded to steps (at least one step plugged in), the target cut to
    what full power reaches, the V2G floor ``v2g_soc_min`` of the capacity (or the arrival energy if lower)."""
    dt_h = check_real("dt_h", dt_h, 0.0, 24.0, lo_open=True)
    t_arr = np.asarray(sessions.t_request_h, dtype=float)
    t_dep = np.where(np.isnan(sessions.t_depart_h), t_arr + sessions.stay_h, sessions.t_depart_h)
    arrive = np.rint(t_arr / dt_h).astype(np.int64)
    stay = np.clip(np.rint(t_dep / dt_h).astype(np.int64) - arrive, 1, n_step)
    arrive %= n_step
    cap = np.asarray(sessions.cap_kwh, dtype=float)
    p = np.asarray(sessions.p_ch_max_kw, dtype=float)
    eta = np.asarray(sessions.eta_ch, dtype=float)
    e0 = np.clip(sessions.soc0, 0.0, 1.0) * cap
    target = np.clip(np.maximum(sessions.soc_target * cap, e0), None, e0 + eta * p * stay * dt_h)
    v2g = np.asarray(sessions.v2g, dtype=bool)
    e_min = np.where(v2g, np.minimum(v2g_soc_min * cap, e0), 0.0)
    b = np.asarray(bus, dtype=np.int64)
    if b.shape != cap.shape:
        raise ValueError(f"bus: expected {cap.size} bus positions (one per session), got {describe(b)}")
    return EVFleet(bus=b, arrive=arrive, stay=stay, p_ch_max_kw=p,
                   p_dis_max_kw=np.where(v2g, sessions.p_dis_max_kw, 0.0), cap_kwh=cap, e0_kwh=e0,
                   e_target_kwh=target, e_min_kwh=e_min, eta_ch=eta, eta_dis=np.asarray(sessions.eta_dis, dtype=float))


def paper_categories(ev: EVFleet, period: npt.ArrayLike, dt_h: float) -> npt.NDArray[np.int8]:  # (n,) 1..4
    """Section 2.8's user type of each EV from the tariff periods its stay spans (see the module docstring)."""
    per = _period(period)
    T = per.size
    on = ev.plugged(T)
    has = {code: (on & (per == code)[None, :]).any(axis=1) for code in PERIOD_CODES}
    n_codes = sum(h.astype(int) for h in has.values())
    cover = ev.eta_ch * ev.p_ch_max_kw * dt_h * (on & (per != PEAK)[None, :]).sum(axis=1)
    need = ev.e_target_kwh - ev.e0_kwh
    cat = np.where(n_codes == 1, 1, np.where(~has[VALLEY], 2, np.where(cover >= need - 1e-9, 3, 4)))
    return cat.astype(np.int8)


def uncontrolled_kw(ev: EVFleet, n_step: int, dt_h: float) -> FloatArray:  # (n, T)
    """Each EV's grid-side charging when it charges at full power from plug-in until its target (the baseline,
    "before optimisation")."""
    k = ev.position(n_step)
    per = (ev.eta_ch * ev.p_ch_max_kw * dt_h)[:, None]
    e = np.clip((ev.e_target_kwh - ev.e0_kwh)[:, None] - k * per, 0.0, per) * (k < ev.stay[:, None])
    return e / (ev.eta_ch[:, None] * dt_h)


def tariff_blocks(period: npt.ArrayLike) -> tuple[IntArray, IntArray]:
    """Maximal runs of one tariff period within the day: ``(block_of_step (T,), period_of_block (B,))``."""
    per = _period(period)
    start = np.ones(per.size, dtype=bool)
    start[1:] = per[1:] != per[:-1]
    block = np.cumsum(start) - 1
    return block.astype(np.int64), per[start].astype(np.int64)


@dataclass(frozen=True, eq=False)
class ZoneEVs:
    """A fleet as both layers see it.

    The distribution layer sees each zone's EVs as sub-sessions (``sessions``, :class:`~evgrid.grid.opf.Sessions`,
    aggregated per bus and group ``station``): every price-responsive EV's baseline energy in each tariff block it
    is plugged in (group ``1 + block``: movable within the block only), every V2G EV as a whole session (group 0;
    stays past midnight cut there, see the module docstring).  Its flexibility per zone and step is summarised
    by ``p_ch_max_kw``, ``p_dis_max_kw`` (T, Z) and ``e_need_kwh`` (Z,).

    The aggregation layer sees each zone's EVs per user category (index = paper type - 1): the plugged charger
    power and baseline energy per tariff block of its price-responsive users, and the power limits and cumulative
    energy envelope (``v2g_lo_kwh <= energy taken by the end of step t <= v2g_hi_kwh``, battery side) of its V2G
    users, the same relaxation as :class:`~evgrid.grid.opf.OPFOptions`' ``aggregate`` EV model."""

    dt_h: float
    period: IntArray  # (T,) tariff period codes
    zone_of_bus: IntArray  # (n_bus,)
    block_of_step: IntArray  # (T,)
    block_period: IntArray  # (B,)
    category: npt.NDArray[np.int8]  # (n_ev,) paper type 1..4
    ev_zone: IntArray  # (n_ev,)
    sessions: opf.Sessions  # the distribution layer's sub-sessions
    session_zone: IntArray  # (n_session,)
    p_ch_max_kw: FloatArray  # (T, Z) charger power plugged in
    p_dis_max_kw: FloatArray  # (T, Z) V2G power plugged in
    e_need_kwh: FloatArray  # (Z,) battery-side energy the EVs need over the day
    n_ev: IntArray  # (Z, C)
    resp_p_kw: FloatArray  # (Z, C, T) price-responsive users' charger power plugged in
    resp_base_kwh: FloatArray  # (Z, C, B) their grid-side baseline energy per tariff block
    v2g_ch_kw: FloatArray  # (Z, C, T)
    v2g_dis_kw: FloatArray  # (Z, C, T)
    v2g_lo_kwh: FloatArray  # (Z, C, T)
    v2g_hi_kwh: FloatArray  # (Z, C, T)
    v2g_eta_ch: FloatArray  # (Z, C)
    v2g_inv_eta_dis: FloatArray  # (Z, C)
    base_kw: FloatArray  # (Z, C, T) uncontrolled grid-side charging of all users

    @property
    def n_step(self) -> int:
        return int(self.period.size)

    @property
    def n_zone(self) -> int:
        return int(self.p_ch_max_kw.shape[1])

    @property
    def n_block(self) -> int:
        return int(self.block_period.size)


def _sub_sessions(ev: EVFleet, on: np.ndarray, x0: np.ndarray, block: np.ndarray, T: int,
                  dt_h: float) -> tuple[opf.Sessions, int, IntArray]:
    """The distribution layer's sessions for ``ev``: each price-responsive EV's baseline energy of each tariff
    block it is plugged in (a piece movable within the block), then each V2G EV whole (cut at midnight).
    Returns the sessions, the number of pieces (they come first) and the EV of each V2G session."""
    v2g = ev.v2g
    resp = ~v2g
    # the distribution layer's sub-sessions: price-responsive EVs' pieces (one tariff block, contiguous in [0, T))
    ri = np.flatnonzero(resp)
    on_r = on[ri]
    same = np.zeros_like(on_r)
    same[:, 1:] = on_r[:, :-1] & (block[1:] == block[:-1])[None, :]
    first = on_r & ~same
    cells = np.flatnonzero(on_r.reshape(-1))
    piece = np.cumsum(first.reshape(-1))[cells] - 1
    n_piece = int(first.sum())
    row, t = np.divmod(cells, T)
    e_piece = np.bincount(piece, (x0[ri] * ev.eta_ch[ri, None] * dt_h).reshape(-1)[cells], n_piece)
    p_start = np.full(n_piece, T, dtype=np.int64)
    np.minimum.at(p_start, piece, t)
    p_end = np.zeros(n_piece, dtype=np.int64)
    np.maximum.at(p_end, piece, t + 1)
    p_ev = np.zeros(n_piece, dtype=np.int64)
    p_ev[piece] = ri[row]
    keep = e_piece > 1e-9
    p_ev, p_start, p_end, e_piece = p_ev[keep], p_start[keep], p_end[keep], e_piece[keep]
    e_piece = np.minimum(e_piece, ev.eta_ch[p_ev] * ev.p_ch_max_kw[p_ev] * (p_end - p_start) * dt_h)
    # V2G EVs: whole sessions, cut at midnight with the least energy handed over that still reaches the target
    vi = np.flatnonzero(v2g)
    wrap = ev.arrive[vi] + ev.stay[vi] > T
    per_c = ev.eta_ch[vi] * ev.p_ch_max_kw[vi] * dt_h
    n_morning = np.where(wrap, ev.arrive[vi] + ev.stay[vi] - T, 0)
    e_mid = np.clip(ev.e_target_kwh[vi] - per_c * n_morning, ev.e0_kwh[vi], ev.e_target_kwh[vi])
    ev_part = np.concatenate([vi, vi[wrap]])
    v_start = np.concatenate([ev.arrive[vi], np.zeros(int(wrap.sum()), np.int64)])
    v_end = np.concatenate([np.minimum(ev.arrive[vi] + ev.stay[vi], T), n_morning[wrap]])
    v_e0 = np.concatenate([ev.e0_kwh[vi], e_mid[wrap]])
    v_target = np.concatenate([np.where(wrap, e_mid, ev.e_target_kwh[vi]), ev.e_target_kwh[vi][wrap]])
    v_emin = np.minimum(ev.e_min_kwh[ev_part], v_e0)
    n_p, n_v = p_ev.size, ev_part.size
    s_ev = np.concatenate([p_ev, ev_part])
    sessions = opf.Sessions(
        bus=ev.bus[s_ev], start=np.concatenate([p_start, v_start]), end=np.concatenate([p_end, v_end]),
        p_ch_max_kw=ev.p_ch_max_kw[s_ev], p_dis_max_kw=np.concatenate([np.zeros(n_p), ev.p_dis_max_kw[ev_part]]),
        cap_kwh=np.concatenate([e_piece, ev.cap_kwh[ev_part]]), e0_kwh=np.concatenate([np.zeros(n_p), v_e0]),
        e_target_kwh=np.concatenate([e_piece, v_target]), e_min_kwh=np.concatenate([np.zeros(n_p), v_emin]),
        eta_ch=ev.eta_ch[s_ev], eta_dis=ev.eta_dis[s_ev],
        station=np.concatenate([1 + block[p_start], np.zeros(n_v, np.int64)]))
    return sessions, n_p, ev_part


def zone_evs(ev: EVFleet, zone_of_bus: npt.ArrayLike, period: npt.ArrayLike, dt_h: float) -> ZoneEVs:
    """Both layers' view of ``ev`` (:class:`ZoneEVs`) for the zones ``zone_of_bus`` and the tariff ``period``."""
    per = _period(period)
    T = per.size
    zob = _zones(zone_of_bus, int(np.size(zone_of_bus)))
    Z = int(zob.max()) + 1
    dt_h = check_real("dt_h", dt_h, 0.0, 24.0, lo_open=True)
    ev.check(zob.size, T, dt_h)
    block, block_per = tariff_blocks(per)
    B = block_per.size
    cat = paper_categories(ev, per, dt_h)
    zone = zob[ev.bus]
    on = ev.plugged(T)
    x0 = uncontrolled_kw(ev, T, dt_h)
    resp = ~ev.v2g
    sessions, n_p, ev_part = _sub_sessions(ev, on, x0, block, T, dt_h)

    # per zone and category
    zc = zone * N_CATEGORY + (cat - 1)

    def by_zc(x: np.ndarray, idx: np.ndarray = zc) -> FloatArray:  # (n, ...) -> (Z, C, ...)
        out = np.zeros((Z * N_CATEGORY,) + x.shape[1:])
        np.add.at(out, idx, x)
        return out.reshape((Z, N_CATEGORY) + x.shape[1:])

    blocks_1hot = np.zeros((T, B))
    blocks_1hot[np.arange(T), block] = 1.0
    resp_p = by_zc(on * (ev.p_ch_max_kw * resp)[:, None])
    resp_base = by_zc((x0 * resp[:, None] * dt_h) @ blocks_1hot)
    # the aggregate model of the distribution layer, so the aggregators relax exactly as it does
    lo, hi, cap_c, cap_d = (x[n_p:] for x in opf.session_envelopes(sessions, T, dt_h))
    zc_v = zc[ev_part]
    pd = ev.p_dis_max_kw[ev_part]
    w_c = by_zc(ev.p_ch_max_kw[ev_part], zc_v)
    w_d = by_zc(pd, zc_v)
    eta_c = np.where(w_c > 0, by_zc(ev.eta_ch[ev_part] * ev.p_ch_max_kw[ev_part], zc_v) / np.maximum(w_c, 1e-12), 1.0)
    inv_eta_d = np.where(w_d > 0, by_zc(pd / ev.eta_dis[ev_part], zc_v) / np.maximum(w_d, 1e-12), 1.0)
    zone_1hot = np.zeros((ev.n, Z))
    zone_1hot[np.arange(ev.n), zone] = 1.0
    return ZoneEVs(
        dt_h=dt_h, period=per.astype(np.int64), zone_of_bus=zob, block_of_step=block, block_period=block_per,
        category=cat, ev_zone=zone, sessions=sessions, session_zone=zob[sessions.bus],
        p_ch_max_kw=(on * ev.p_ch_max_kw[:, None]).T @ zone_1hot,
        p_dis_max_kw=(on * ev.p_dis_max_kw[:, None]).T @ zone_1hot,
        e_need_kwh=(ev.e_target_kwh - ev.e0_kwh) @ zone_1hot,
        n_ev=np.bincount(zc, minlength=Z * N_CATEGORY).reshape(Z, N_CATEGORY).astype(np.int64),
        resp_p_kw=resp_p, resp_base_kwh=resp_base, v2g_ch_kw=by_zc(cap_c, zc_v), v2g_dis_kw=by_zc(cap_d, zc_v),
        v2g_lo_kwh=by_zc(lo, zc_v), v2g_hi_kwh=by_zc(hi, zc_v), v2g_eta_ch=eta_c, v2g_inv_eta_dis=inv_eta_d,
        base_kw=by_zc(x0))


# ------------------------------------------------------------------------------------ the distribution layer


@dataclass(frozen=True, eq=False)
class DistributionParams:
    """Prices and costs of eq 1 and how to solve the dispatch (defaults: the paper's case study, else ours from
    :class:`~evgrid.envs.market.MarketConfig`)."""

    purchase_price_per_kwh: FloatArray
    """(T,) omega_g, price of energy bought upstream at each step, yuan/kWh, >= 0."""
    capacity_price_per_kva_month: float = 32.0
    """Capacity price on the peak purchase, yuan per kVA and month (paper: 32), >= 0; priced per kW (the OPF's)."""
    days_per_month: float = 30.0
    """The day's share of the monthly capacity price is 1 / this, (0, 31] (ours)."""
    diesel_a_per_kw2h: float = _MC.diesel_a_per_kw2h
    """Quadratic diesel cost a, yuan/(kW^2 h), >= 0."""
    diesel_b_per_kwh: float = _MC.diesel_b_per_kwh
    """Linear diesel cost b, yuan/kWh, >= 0."""
    diesel_c_per_h: float = _MC.diesel_c_per_h
    """No-load diesel cost per running hour, yuan/h, >= 0 (the paper's 3,288.6 yuan a day at full output)."""
    diesel_min_pu: float = 1.0
    """Must-run floor of each diesel unit, share of its available power, [0, 1] (paper: its output is the same
    before and after dispatch, i.e. 1)."""
    curtail_cost_per_kwh: float = 0.1
    """PV / wind curtailed, yuan/kWh (paper: 0.1), >= 0."""
    carbon: mk.CarbonConfig = field(default_factory=mk.CarbonConfig)
    """Stepped carbon trading (paper: 200 yuan/t, 50 t steps, 25 % growth, 0.7 kg/kWh quota, 47.6 % thermal)."""
    formulation: str = "socp"
    """The ED's OPF formulation, ``socp`` or ``lindistflow`` (the LM OPF is always ``socp``).  Measured on seed
    003's day (IEEE 33, 24 steps, 3,000 EVs): ``socp`` with ``socp_loss_weight_per_mwh`` = 1 is tight (cone gap
    3e-4, |V - V_AC| 3e-8 p.u., losses exact) in 2.4 s; ``lindistflow`` solves in 0.8 s but misses the AC
    voltages by 1e-3 p.u. and the day's losses by 30 % (2 AC rounds: 3e-5 p.u., 27 s)."""
    ev_model: str = "sessions"
    """How the OPF models the EVs: ``sessions`` (each sub-session exactly) or ``aggregate`` (per bus and group, a
    relaxation whose schedule the sessions may not follow)."""
    ac_rounds: int = 0
    """``lindistflow``: re-solves with the AC residuals at the solution, 0..10."""
    socp_loss_weight_per_mwh: float = 1.0
    """``socp``: price on losses that keeps the cone tight where the objective does not price them (exports),
    yuan/MWh, >= 0."""

    def __post_init__(self) -> None:
        price = as_array("purchase_price_per_kwh", self.purchase_price_per_kwh, shape=(None,),
                         shape_names="(T,) (one per step)", lo=0.0, what="prices")
        object.__setattr__(self, "purchase_price_per_kwh", price)
        self._check_scalars()

    def check(self, n_step: int) -> None:
        """Also the price series' length: ``n_step`` steps."""
        as_array("purchase_price_per_kwh", self.purchase_price_per_kwh, shape=(n_step,), shape_names=f"({n_step},) "
                 "(one per step)", lo=0.0, what="prices")

    def _check_scalars(self) -> None:
        check_real("capacity_price_per_kva_month", self.capacity_price_per_kva_month, 0.0, 1e6)
        check_real("days_per_month", self.days_per_month, 0.0, 31.0, lo_open=True)
        for name in ("diesel_a_per_kw2h", "diesel_b_per_kwh", "diesel_c_per_h"):
            check_real(name, getattr(self, name), 0.0, 1e6)
        check_real("diesel_min_pu", self.diesel_min_pu, 0.0, 1.0)
        check_real("curtail_cost_per_kwh", self.curtail_cost_per_kwh, 0.0, 1e3)
        if not isinstance(self.carbon, mk.CarbonConfig):
            raise ValueError(f"carbon: expected a CarbonConfig, got {describe(self.carbon)}")
        check_choice("formulation", self.formulation, opf.FORMULATIONS)
        check_choice("ev_model", self.ev_model, opf.EV_MODELS)
        if isinstance(self.ac_rounds, bool) or not isinstance(self.ac_rounds, int) or not 0 <= self.ac_rounds <= 10:
            raise ValueError(f"ac_rounds: expected an integer in [0, 10], got {describe(self.ac_rounds)}")
        check_real("socp_loss_weight_per_mwh", self.socp_loss_weight_per_mwh, 0.0, 1e6)

    @property
    def capacity_price_per_kw_day(self) -> float:
        return self.capacity_price_per_kva_month / self.days_per_month


@dataclass(frozen=True, eq=False)
class DistributionPlan:
    """The distribution layer's result.  Zone arrays are (T, Z); costs in yuan over the horizon."""

    ed: opf.OPFResult  # eq 1, the economic dispatch
    lm: opf.OPFResult  # eq 6, the loss-minimising dispatch
    costs: dict[str, float]  # the ED's eq 1 terms recomputed from its schedule: purchase, capacity, diesel,
    #                          carbon, curtailment, total
    opf_costs: dict[str, float]  # the terms as the OPF priced them (plus the fixed diesel cost)
    purchase_kw: FloatArray  # (T,) bought upstream (ED, the model's tie power, >= 0)
    diesel_kw: FloatArray  # (T,) all diesel output (floor + dispatch)
    renewable_kw: FloatArray  # (T,) PV and wind delivered
    curtailed_kw: FloatArray  # (T,) PV and wind curtailed
    emission_t: float  # eq 2 + purchases' thermal share, tonnes
    quota_t: float  # eq 3, tonnes
    zone_p_ed_kw: FloatArray  # (T, Z) sum_i in d P^D_i,t (net load: loads + EVs - DER)
    zone_p_lm_kw: FloatArray  # (T, Z) sum_i in d P^DI_i,t
    zone_q_ed_kvar: FloatArray  # (T, Z)
    zone_q_lm_kvar: FloatArray  # (T, Z)
    zone_target_kw: FloatArray  # (T, Z) eq 9
    zone_target_kvar: FloatArray  # (T, Z) eq 10
    target_from_lm: npt.NDArray[np.bool_]  # (T, Z) the LM dispatch set the active target (else the ED)
    zone_ev_kw: FloatArray  # (T, Z) the ED's EV net charging per zone
    zone_base_kw: FloatArray  # (T, Z) the ED's zone net load without EVs (loads - DER at the ED's dispatch)
    trade_price_cap_per_kwh: FloatArray  # (T, Z) eq 11's cap on the price of buying from neighbours
    path_loss_kw: FloatArray  # (T, Z) eq 11's G (V_a^2 + V_b^2 - 2 V_a V_b) at the ED's AC voltages
    interzone_loss_kwh: dict[str, float]  # eq 6's objective (branches between zones, AC voltages): ed, lm
    ac: dict[str, dict[str, float | bool | str | None]]  # AC check of each dispatch
    binding: tuple[str, ...]  # limits and terms that bind in the ED
    solve_s: float


def distribution_layer(feeder: Feeder, horizon: opf.Horizon, zone_of_bus: npt.ArrayLike, ev_flex: ZoneEVs,
                       params: DistributionParams) -> DistributionPlan:
    """Eq 1's economic dispatch and eq 6's loss-minimising OPF over ``horizon``, each zone's targets (eqs 9-10)
    and the price cap of trades between zones (eq 11).  ``ev_flex``: each zone's EV flexibility
    (:func:`zone_evs`); ``horizon.der_avail_kw``: PV / wind forecasts and each diesel unit's available power.
    Raises :class:`~evgrid.grid.opf.InfeasibleError` (a ValueError) naming the limits that cannot be met."""
    t0 = time.perf_counter()
    if not isinstance(horizon, opf.Horizon):
        raise ValueError(f"horizon: expected an opf.Horizon, got {describe(horizon)}")
    horizon.check(feeder)
    T = horizon.n_step
    if not isinstance(params, DistributionParams):
        raise ValueError(f"params: expected a DistributionParams, got {describe(params)}")
    params.check(T)
    zob = _zones(zone_of_bus, feeder.n_bus)
    Z = int(zob.max()) + 1
    if not isinstance(ev_flex, ZoneEVs):
        raise ValueError(f"ev_flex: expected a ZoneEVs (zone_evs(...)), got {describe(ev_flex)}")
    if ev_flex.n_step != T or not math.isclose(ev_flex.dt_h, horizon.dt_h):
        raise ValueError(f"ev_flex: expected {T} steps of {horizon.dt_h} h like the horizon, got {ev_flex.n_step} "
                         f"steps of {ev_flex.dt_h} h")
    if ev_flex.zone_of_bus.shape != zob.shape or (ev_flex.zone_of_bus != zob).any():
        raise ValueError("ev_flex: built for another zoning than zone_of_bus")
    dt = horizon.dt_h
    price = np.asarray(params.purchase_price_per_kwh, dtype=float)

    d = economic_dispatch(feeder, horizon, ev_flex.sessions, params)
    ed = d.result
    lm = opf.solve_opf(feeder, d.horizon, ev_flex.sessions, opf.Objective(loss_price_per_kwh=1.0),
                       opf.OPFOptions(formulation="socp", ev_model=params.ev_model))
    log.info("distribution layer: ED (%s, %s) %.2f s, LM (socp, %s) %.2f s", ed.formulation, ed.solver,
             ed.solve_s, lm.solver, lm.solve_s)

    # eqs 9-10
    onehot = np.zeros((feeder.n_bus, Z))
    onehot[np.arange(feeder.n_bus), zob] = 1.0
    p_ed, p_lm = ed.p_bus_kw @ onehot, lm.p_bus_kw @ onehot
    q_ed, q_lm = ed.q_bus_kvar @ onehot, lm.q_bus_kvar @ onehot
    zone_ev = np.zeros((T, Z))
    np.add.at(zone_ev.T, ev_flex.session_zone, ed.p_ch_kw - ed.p_dis_kw)

    # eq 11, eq 6
    path_loss, cap = _trade_price_cap(feeder, zob, ed, p_ed, price)
    ilm = {"ed": _interzone_loss_kwh(feeder, zob, ed.ac.vm_pu, dt),
           "lm": _interzone_loss_kwh(feeder, zob, lm.ac.vm_pu, dt)}
    return DistributionPlan(
        ed=ed, lm=lm, costs=d.costs, opf_costs=d.opf_costs, purchase_kw=d.purchase_kw, diesel_kw=d.diesel_kw,
        renewable_kw=d.renewable_kw, curtailed_kw=d.curtailed_kw, emission_t=d.emission_t, quota_t=d.quota_t,
        zone_p_ed_kw=p_ed, zone_p_lm_kw=p_lm, zone_q_ed_kvar=q_ed, zone_q_lm_kvar=q_lm,
        zone_target_kw=np.maximum(p_ed, p_lm), zone_target_kvar=np.maximum(q_ed, q_lm), target_from_lm=p_lm > p_ed,
        zone_ev_kw=zone_ev, zone_base_kw=p_ed - zone_ev, trade_price_cap_per_kwh=cap, path_loss_kw=path_loss,
        interzone_loss_kwh=ilm, ac={"ed": _ac_figures(ed, dt), "lm": _ac_figures(lm, dt)},
        binding=_binding(feeder, horizon, ed, d.purchase_kw, d.curtailed_kw, params, d.emission_t - d.quota_t,
                         ev_flex),
        solve_s=time.perf_counter() - t0)


@dataclass(frozen=True, eq=False)
class Dispatch:
    """Eq 1's economic dispatch: the OPF's result and its cost terms recomputed from the schedule."""

    result: opf.OPFResult
    horizon: opf.Horizon  # the horizon the OPF saw: diesel's floor moved into the loads
    costs: dict[str, float]  # purchase, capacity, diesel, carbon, curtailment, total
    opf_costs: dict[str, float]  # the OPF's own terms, and the fixed diesel cost it does not see
    purchase_kw: FloatArray  # (T,) bought upstream: the model's tie power, >= 0
    diesel_kw: FloatArray  # (T,) all diesel output (floor + dispatch)
    renewable_kw: FloatArray  # (T,) PV and wind delivered
    curtailed_kw: FloatArray  # (T,) PV and wind curtailed
    emission_t: float  # eq 2 plus the purchases' thermal share, tonnes
    quota_t: float  # eq 3, tonnes


def economic_dispatch(feeder: Feeder, horizon: opf.Horizon, sessions: opf.Sessions | None,
                      params: DistributionParams, *, soft: bool | tuple[str, ...] = False) -> Dispatch:
    """Eq 1 over ``horizon`` with the EV ``sessions`` (None: the EVs' charging is part of the loads), each diesel
    unit at least at its floor (``params.diesel_min_pu``), and its cost terms recomputed from the schedule."""
    T, dt = horizon.n_step, horizon.dt_h
    params.check(T)
    kinds = np.array(feeder.der_kind)
    dsl = kinds == "diesel"
    ren = np.isin(kinds, ("pv", "wind"))
    c = params.carbon
    price = np.asarray(params.purchase_price_per_kwh, dtype=float)
    # diesel's must-run floor is a fixed (negative) load; the OPF dispatches the rest
    fix_kw = params.diesel_min_pu * horizon.der_avail_kw[:, dsl]
    load_p = horizon.load_p_kw.copy()
    np.subtract.at(load_p.T, feeder.der_bus[dsl], fix_kw.T)
    avail = horizon.der_avail_kw.copy()
    avail[:, dsl] -= fix_kw
    hz = opf.Horizon(dt, load_p, horizon.load_q_kvar, np.maximum(avail, 0.0))
    fix_kwh = float(fix_kw.sum() * dt)
    ren_avail_kwh = float(horizon.der_avail_kw[:, ren].sum() * dt)
    a, b = params.diesel_a_per_kw2h, params.diesel_b_per_kwh
    # a unit at floor f + u costs a (f + u)^2 + b (f + u) = const + (2 a f + b) u + a u^2; the OPF takes one linear
    # coefficient, exact where every unit's floor is the same (the mean floor is used)
    f_mean = float(fix_kw.mean()) if fix_kw.size else 0.0
    if c.sell_price_per_t != c.base_price_per_t:
        log.warning("carbon: the OPF's ladder sells quota at the base price %.4g, not the sell price %.4g; the "
                    "costs reported use the sell price", c.base_price_per_t, c.sell_price_per_t)
    quota_fixed_t = (c.quota_kg_per_kwh * (fix_kwh + ren_avail_kwh) - c.diesel_kg_per_kwh * fix_kwh) / 1e3
    obj = opf.Objective(
        energy_price_per_kwh=price, capacity_price_per_kw=params.capacity_price_per_kw_day,
        # curtailed PV / wind also forgoes its quota (eq 3), which the ladder's fixed quota cannot see
        curtail_cost_per_kwh=params.curtail_cost_per_kwh + c.quota_kg_per_kwh * c.base_price_per_t / 1e3,
        # nothing to dispatch above a full floor: no quadratic term, so the ED stays a linear program (HiGHS)
        diesel_cost=(a, 2 * a * f_mean + b) if avail[:, dsl].max(initial=0.0) > 0 else (0.0, 0.0),
        carbon=opf.CarbonLadder(base_price_per_t=c.base_price_per_t, step_t=c.step_t, growth=c.growth,
                                n_steps=c.n_tiers, quota_t=quota_fixed_t),
        grid_kg_per_kwh=c.thermal_share * c.thermal_kg_per_kwh,
        diesel_kg_per_kwh=c.diesel_kg_per_kwh - c.quota_kg_per_kwh)
    # no sessions: nothing to aggregate
    ev_model = params.ev_model if sessions is not None and sessions.n else "sessions"
    res = opf.solve_opf(feeder, hz, sessions, obj, opf.OPFOptions(
        formulation=params.formulation, ev_model=ev_model, soft=soft, ac_rounds=params.ac_rounds,
        socp_loss_weight=params.socp_loss_weight_per_mwh))
    return _settled(horizon, hz, res, fix_kw, dsl, ren, params)


def _settled(horizon: opf.Horizon, hz: opf.Horizon, res: opf.OPFResult, fix_kw: np.ndarray, dsl: np.ndarray,
             ren: np.ndarray, params: DistributionParams) -> Dispatch:
    """Eq 1's cost terms recomputed from the dispatch ``res`` (the market's carbon ladder, diesel with its floor
    ``fix_kw`` and no-load cost), beside the OPF's own terms; ``dsl``, ``ren``: the diesel and PV / wind sites."""
    dt, c = horizon.dt_h, params.carbon
    price = np.asarray(params.purchase_price_per_kwh, dtype=float)
    buy = np.maximum(res.tie_kw, 0.0)
    unit_kw = fix_kw + res.der_kw[:, dsl]  # (T, n_diesel)
    diesel_kw = unit_kw.sum(axis=1)
    ren_kw = res.der_kw[:, ren].sum(axis=1)
    curt_kw = np.maximum(horizon.der_avail_kw[:, ren].sum(axis=1) - ren_kw, 0.0)
    emission_t = float((c.thermal_share * c.thermal_kg_per_kwh * buy.sum() + c.diesel_kg_per_kwh * diesel_kw.sum())
                       * dt / 1e3)
    quota_t = float(c.quota_kg_per_kwh * (diesel_kw.sum() + ren_kw.sum()) * dt / 1e3)
    costs = {"purchase": float(price @ buy * dt),
             "capacity": float(params.capacity_price_per_kw_day * buy.max(initial=0.0)),
             "diesel": _diesel_cost(unit_kw, dt, params),
             "carbon": float(mk.stepped_carbon_cost(emission_t - quota_t, c)),
             "curtailment": float(params.curtail_cost_per_kwh * curt_kw.sum() * dt)}
    costs["total"] = float(sum(costs.values()))
    opf_costs = dict(res.costs)
    # the floor's cost, a constant the OPF does not see (with its no-load cost while running)
    opf_costs["diesel_fixed"] = _diesel_cost(fix_kw, dt, params)
    if res.der_kw[:, dsl].size and res.der_kw[:, dsl].max() > 1e-6:
        log.info("diesel dispatched above its floor: its cost is reported from the schedule")
    return Dispatch(result=res, horizon=hz, costs=costs, opf_costs=opf_costs, purchase_kw=buy, diesel_kw=diesel_kw,
                    renewable_kw=ren_kw, curtailed_kw=curt_kw, emission_t=emission_t, quota_t=quota_t)


def _diesel_cost(unit_kw: np.ndarray, dt: float, p: DistributionParams) -> float:
    """``(a P^2 + b P + c) dt`` per unit and step while it runs (P > 0)."""
    u = np.asarray(unit_kw, dtype=float)
    return float(np.where(u > 1e-9, (p.diesel_a_per_kw2h * u + p.diesel_b_per_kwh) * u + p.diesel_c_per_h,
                          0.0).sum() * dt)


def path_conductance_pu(feeder: Feeder) -> FloatArray:  # (n_bus,)
    """Each bus's ``G = Re(1 / Z_path)``, ``Z_path`` the series impedance of the path slack -> bus, p.u. on the
    tree's base (inf at the slack)."""
    t = feeder.tree
    anc = t.paths()
    r, x = anc @ t.r_pu, anc @ t.x_pu
    node = t.node_of_bus
    z2 = r[node] ** 2 + x[node] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(z2 > 0, r[node] / z2, np.inf)


def purchase_nodes(feeder: Feeder, zone_of_bus: np.ndarray) -> IntArray:  # (Z,)
    """Each zone's purchase node (eq 11's ``a``): its bus nearest the slack (fewest branches on the path)."""
    t = feeder.tree
    depth = t.paths().sum(axis=1)[t.node_of_bus]
    Z = int(zone_of_bus.max()) + 1
    return np.array([int(np.flatnonzero(zone_of_bus == d)[np.argmin(depth[zone_of_bus == d])]) for d in range(Z)])


def _trade_price_cap(feeder: Feeder, zob: np.ndarray, res: opf.OPFResult, zone_p_kw: np.ndarray,
                     price: np.ndarray) -> tuple[FloatArray, FloatArray]:
    """Eq 11 per zone and step: the path loss ``G (V_a^2 + V_b^2 - 2 V_a V_b)`` (kW, AC voltages) and the price cap
    ``omega_g (1 + loss / P_B)`` for ``P_B`` the zone's import (its net load); a zone that exports buys nothing
    from its neighbours, and its cap is ``omega_g``."""
    a = purchase_nodes(feeder, zob)
    g = path_conductance_pu(feeder)[a]
    vm = res.ac.vm_pu
    va, vb = vm[:, a], vm[:, [feeder.slack_bus]]
    kw = feeder.tree.base_mva * 1e3
    with np.errstate(invalid="ignore"):
        loss = np.where(np.isfinite(g), g * (va ** 2 + vb ** 2 - 2 * va * vb), 0.0) * kw
    loss = np.maximum(loss, 0.0)
    imp = np.maximum(zone_p_kw, 0.0)
    cap = price[:, None] * (1.0 + np.where(imp > _TOL_KW, loss / np.maximum(imp, _TOL_KW), 0.0))
    return loss, cap


def _interzone_loss_kwh(feeder: Feeder, zob: np.ndarray, vm_pu: np.ndarray, dt: float) -> float:
    """Eq 6: ``sum_t sum_ab G_ab (V_a^2 + V_b^2 - 2 V_a V_b)`` over the branches between zones, kWh."""
    t = feeder.tree
    bus_of_node = np.full(t.n_node, -1)
    bus_of_node[t.node_of_bus] = np.arange(feeder.n_bus)
    total = 0.0
    for i in range(1, t.n_node):
        a, b = bus_of_node[i], bus_of_node[t.parent[i]]
        if a < 0 or b < 0 or zob[a] == zob[b]:
            continue
        g = t.r_pu[i] / (t.r_pu[i] ** 2 + t.x_pu[i] ** 2)
        va, vb = vm_pu[:, a], vm_pu[:, b]
        total += float((g * (va ** 2 + vb ** 2 - 2 * va * vb)).sum())
    return total * t.base_mva * 1e3 * dt


def _ac_figures(res: opf.OPFResult, dt: float) -> dict[str, float | bool | str | None]:
    ac = res.ac
    return {"formulation": res.formulation, "solver": res.solver, "status": res.status, "solve_s": res.solve_s,
            "build_s": res.build_s, "converged": ac.converged, "max_dv_pu": ac.max_dv_pu,
            "max_loss_error_kw": ac.max_loss_error_kw, "cone_gap": ac.cone_gap, "max_loading": ac.max_loading,
            "vm_min_pu": float(np.nanmin(ac.vm_pu)), "vm_max_pu": float(np.nanmax(ac.vm_pu)),
            "loss_kwh_ac": float(ac.loss_kw.sum() * dt), "loss_kwh_model": float(res.loss_kw.sum() * dt)}


def _binding(feeder: Feeder, hz: opf.Horizon, ed: opf.OPFResult, buy: np.ndarray, curt: np.ndarray,
             params: DistributionParams, excess_t: float, evs: ZoneEVs) -> tuple[str, ...]:
    """What binds in the ED: voltage and branch limits (AC), the peak that sets the capacity charge, curtailment,
    the diesel floor, the carbon tier, EV power limits."""
    out = []
    vm = ed.ac.vm_pu
    low = vm <= feeder.v_min_pu[None, :] + 1e-3
    high = vm >= feeder.v_max_pu[None, :] - 1e-3
    for name, hit in (("voltage floor", low), ("voltage ceiling", high)):
        if hit.any():
            t, bb = np.nonzero(hit)
            out.append(f"{name} (within 1e-3 p.u., AC) at bus {_listed(np.unique(feeder.numbers[bb]))} "
                       f"({feeder.numbering}), steps {_listed(np.unique(t))}")
    if ed.ac.max_loading >= 0.99:
        out.append(f"branch rating (AC loading {ed.ac.max_loading:.3f})")
    if params.capacity_price_per_kva_month > 0 and buy.size:
        peak = np.flatnonzero(buy >= buy.max() * (1 - 1e-3) - 1e-6)
        out.append(f"capacity charge: peak purchase {buy.max():.1f} kW at steps {_listed(peak)}")
    if (curt > 1e-3).any():
        out.append(f"curtailment: {curt.sum() * hz.dt_h:.1f} kWh at steps {_listed(np.flatnonzero(curt > 1e-3))}")
    if params.diesel_min_pu > 0 and "diesel" in feeder.der_kind:
        out.append(f"diesel must-run floor ({params.diesel_min_pu:.2f} of available power)")
    c = params.carbon
    tier = "below the quota" if excess_t < 0 else f"tier {min(int(excess_t // c.step_t), c.n_tiers - 1) + 1}"
    out.append(f"carbon: excess {excess_t:.3f} t ({tier})")
    ev = ed.p_ch_kw.sum(axis=0)
    cap = evs.p_ch_max_kw.sum(axis=1)
    full = np.flatnonzero((cap > 0) & (ev >= cap * (1 - 1e-3)))
    if full.size:
        out.append(f"EV charging at the plugged chargers' limit at steps {_listed(full)}")
    return tuple(out)


def _listed(x: np.ndarray, n: int = 8) -> str:
    x = np.asarray(x).reshape(-1)
    return ", ".join(str(int(v)) for v in x[:n]) + (", ..." if x.size > n else "")


# ------------------------------------------------------------------------------------- the aggregation layer


@dataclass(frozen=True, eq=False)
class AggregationParams:
    """The zone aggregators' prices and rules (defaults: the paper's, else ours)."""

    multiplier_min: float = 0.5
    """Lowest price multiplier on a period's base price, (0, 1] (paper: the elastic price floats at most 50 %)."""
    multiplier_max: float = 1.5
    """Highest multiplier, [1, 10] (paper: 50 %)."""
    elasticity_scale: float = 1.0
    """Factor on the elasticity matrix, [0, 1] (eq 25's 1/T read as part of the fitted matrix: 1)."""
    v2g_cost_per_kwh: float = 0.1
    """Paid to V2G users per kWh discharged (battery wear), yuan/kWh, >= 0 (ours)."""
    trade_kw_max: float = 0.0
    """Most a zone may buy from its neighbours beyond its target per step, kW, >= 0 (0: the target is hard; the
    neighbours' spare room is not checked)."""
    keep_total_energy: bool = True
    """Each category's total energy at least its baseline (users' charging needs are met)."""
    priority: tuple[tuple[int, ...], ...] = PRIORITY
    """User types by rank, first served first (paper: type 4, then type 1, then types 2 and 3); every type once."""
    priority_eps: float = 1e-3
    """Relative cost weight per rank that gives earlier types the cheaper room first, [0, 0.1]."""
    tol_kw: float = _TOL_KW
    """Tolerance on the target, kW, >= 0."""

    def __post_init__(self) -> None:
        check_real("multiplier_min", self.multiplier_min, 0.0, 1.0, lo_open=True)
        check_real("multiplier_max", self.multiplier_max, 1.0, 10.0)
        check_real("elasticity_scale", self.elasticity_scale, 0.0, 1.0)
        check_real("v2g_cost_per_kwh", self.v2g_cost_per_kwh, 0.0, 1e3)
        check_real("trade_kw_max", self.trade_kw_max, 0.0, 1e9)
        check_real("priority_eps", self.priority_eps, 0.0, 0.1)
        check_real("tol_kw", self.tol_kw, 0.0, 1e6)
        if not isinstance(self.keep_total_energy, bool):
            raise ValueError(f"keep_total_energy: expected true or false, got {describe(self.keep_total_energy)}")
        try:
            flat = sorted(int(k) for rank in self.priority for k in rank)
        except TypeError:
            flat = []
        if flat != [1, 2, 3, 4]:
            raise ValueError(f"priority: expected ranks of user types (tuples) holding 1, 2, 3, 4 once each, got "
                             f"{self.priority!r}")

    def weights(self) -> FloatArray:  # (C,)
        """Cost weight of each type (index type - 1): ``1 + priority_eps x (ranks after it)``."""
        w = np.ones(N_CATEGORY)
        for r, rank in enumerate(self.priority):
            w[np.asarray(rank) - 1] = 1.0 + self.priority_eps * (len(self.priority) - 1 - r)
        return w


@dataclass(frozen=True, eq=False)
class AggregationPlan:
    """The aggregation layer's result.  Category axes are paper type - 1; period axes period codes (VALLEY,
    OFFPEAK, PEAK); costs in yuan over the horizon."""

    multiplier: FloatArray  # (Z, 3) each zone's price multiplier per period code
    demand_factor: FloatArray  # (Z, 3) 1 + E (m - 1): relative demand per period code
    charge_kw: FloatArray  # (Z, C, T) price-responsive users' charging (grid side)
    v2g_charge_kw: FloatArray  # (Z, C, T)
    v2g_discharge_kw: FloatArray  # (Z, C, T)
    energy_kwh: FloatArray  # (Z, C, B) price-responsive users' grid-side energy per tariff block
    base_energy_kwh: FloatArray  # (Z, C, B) the same at the base prices (baseline)
    zone_net_kw: FloatArray  # (T, Z) the zone's net load after dispatch
    zone_target_kw: FloatArray  # (T, Z)
    trade_kw: FloatArray  # (T, Z) bought from neighbours beyond the target
    zone_ev_before_kw: FloatArray  # (T, Z) uncontrolled charging
    zone_ev_after_kw: FloatArray  # (T, Z)
    capability_share: FloatArray  # (T, Z) the EVs' change over the change they could make in its direction
    capability_direction: npt.NDArray[np.int8]  # (T, Z) -1 peak shaving, +1 valley filling, 0 none
    zone_max_share: FloatArray  # (Z,)
    zone_max_share_step: IntArray  # (Z,)
    peak_shaving_share: float  # feeder: (peak before - peak after) / peak before, EVs the only change
    zone_peak_shaving_share: FloatArray  # (Z,)
    costs: dict[str, float]  # eq 22 summed over zones: energy, trade, v2g, total; and responsive_users_bill,
    #                          the price-responsive users' charging at their zone's prices
    zone_costs: FloatArray  # (Z,) eq 22 per zone
    solve_s: float


def elastic_factor(multiplier: npt.ArrayLike, elasticity_by_period: npt.ArrayLike) -> FloatArray:  # (..., 3)
    """Eqs 25-26: relative demand per period ``1 + E (m - 1)`` (``dQ/Q = E dP/P``), both axes in period codes;
    ``multiplier[..., j]``: price of period j over its base price."""
    m = as_array("multiplier", multiplier, lo=0.0, what="multipliers")
    e = check_elasticity(elasticity_by_period, name="elasticity_by_period")
    if m.ndim == 0 or m.shape[-1] != 3:
        raise ValueError(f"multiplier: expected a last axis of 3 periods, got shape {m.shape}")
    return 1.0 + (m - 1.0) @ e.T


def check_elasticity(elasticity: npt.ArrayLike, name: str = "elasticity") -> FloatArray:
    """A 3x3 elasticity matrix of finite numbers with self-elasticities (diagonal) <= 0, else ValueError."""
    e = as_array(name, elasticity, shape=(3, 3), shape_names="(3, 3) (periods x periods)")
    if (np.diag(e) > 0).any():
        raise ValueError(f"{name}: expected self-elasticities (diagonal) <= 0 (demand falls as its own price "
                         f"rises), got diagonal {np.diag(e).tolist()}")
    return e


def aggregation_layer(zone_target_kw: npt.ArrayLike, zone_base_kw: npt.ArrayLike, evs: ZoneEVs,
                      price_per_kwh: npt.ArrayLike, elasticity: npt.ArrayLike = mk.SEED003_ELASTICITY,
                      params: AggregationParams | None = None, *, retail_by_period: npt.ArrayLike | None = None,
                      trade_price_per_kwh: npt.ArrayLike | None = None) -> AggregationPlan:
    """Each zone meets its target at least cost (eq 22) with its EVs: price-responsive users through the period
    prices and the elasticity matrix (eq 25, cross terms included), V2G users dispatched; see the module docstring
    for the reading.

    Args:
        zone_target_kw: (T, Z) the most each zone may draw (eq 9).
        zone_base_kw: (T, Z) each zone's net load without EVs (loads - DER at the distribution layer's dispatch).
        evs: the fleet per zone and category (:func:`zone_evs`).
        price_per_kwh: (T,) omega_g, the upstream price of the zone's net load, >= 0.
        elasticity: 3x3, rows and columns in the **paper's** order (peak, off-peak, valley), diagonal <= 0.
        retail_by_period: (3,) users' base charging price per period code (VALLEY, OFFPEAK, PEAK), for their
            cost; default: the market's retail tariff.
        trade_price_per_kwh: (T, Z) price of buying from neighbours (default: ``price_per_kwh``); eq 11's cap
            is :attr:`DistributionPlan.trade_price_cap_per_kwh`.

    Raises :class:`TargetError` naming each zone that cannot keep within its target."""
    import cvxpy as cp

    t0 = time.perf_counter()
    p = params if params is not None else AggregationParams()
    if not isinstance(p, AggregationParams):
        raise ValueError(f"params: expected an AggregationParams, got {describe(p)}")
    if not isinstance(evs, ZoneEVs):
        raise ValueError(f"evs: expected a ZoneEVs (zone_evs(...)), got {describe(evs)}")
    target, base, price, trade_price, retail, E = _aggregation_inputs(
        zone_target_kw, zone_base_kw, evs, price_per_kwh, elasticity, p, retail_by_period, trade_price_per_kwh)
    T, Z, B = evs.n_step, evs.n_zone, evs.n_block
    # a higher weight on a type's cost gives it the cheaper steps where types compete for the same room
    weight = p.weights()
    in_block = np.zeros((B, T))
    in_block[evs.block_of_step, np.arange(T)] = 1.0
    tril = np.tril(np.ones((T, T)))

    cons, parts, cost_terms = [], [], []
    for d in range(Z):
        zone_cons, cost, part = _zone_model(cp, evs, d, E, p, base[:, d], target[:, d], price, trade_price[:, d],
                                            weight, in_block, tril)
        cons += zone_cons
        cost_terms.append(cost)
        parts.append(part)
    problem = cp.Problem(cp.Minimize(cp.sum(cp.hstack(cost_terms))), cons)
    with quiet_stdout():  # HiGHS's banner
        problem.solve(solver="HIGHS", output_flag=False)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise TargetError(f"aggregation layer: the zones' problem is {problem.status} (solver HIGHS)")

    return _plan(evs, parts, p, base, target, price, trade_price, retail, in_block, t0)


def _aggregation_inputs(zone_target_kw, zone_base_kw, evs: ZoneEVs, price_per_kwh, elasticity,
                        p: AggregationParams, retail_by_period, trade_price_per_kwh) -> tuple[np.ndarray, ...]:
    """:func:`aggregation_layer`'s arrays, checked: targets, base loads, prices, trade prices, retail prices and
    the scaled elasticity matrix in period codes."""
    T, Z = evs.n_step, evs.n_zone
    names = f"({T}, {Z}) (steps x zones)"
    target = as_array("zone_target_kw", zone_target_kw, shape=(T, Z), shape_names=names, what="kW")
    base = as_array("zone_base_kw", zone_base_kw, shape=(T, Z), shape_names=names, what="kW")
    price = as_array("price_per_kwh", price_per_kwh, shape=(T,), shape_names=f"({T},) (one per step)", lo=0.0,
                     what="prices")
    trade_price = (np.broadcast_to(price[:, None], (T, Z)) if trade_price_per_kwh is None else
                   as_array("trade_price_per_kwh", trade_price_per_kwh, shape=(T, Z), shape_names=names, lo=0.0,
                            what="prices"))
    retail = (mk.tariff_by_period(_MC.tariff) if retail_by_period is None else
              as_array("retail_by_period", retail_by_period, shape=(3,), shape_names="(3,) (VALLEY, OFFPEAK, PEAK)",
                       lo=0.0, what="prices"))
    e_paper = check_elasticity(elasticity)
    E = p.elasticity_scale * mk.paper_to_period_order(e_paper)
    return target, base, price, trade_price, retail, E


def _plan(evs: ZoneEVs, parts: list, p: AggregationParams, base: np.ndarray, target: np.ndarray,
          price: np.ndarray, trade_price: np.ndarray, retail: np.ndarray, in_block: np.ndarray,
          t0: float) -> AggregationPlan:
    """The solved zones' schedules, costs and shares (a :class:`TargetError` naming each zone short of its
    target beyond ``p.tol_kw``)."""
    Z, dt, bp = evs.n_zone, evs.dt_h, evs.block_period
    val = lambda e: np.asarray(e.value, dtype=float)  # noqa: E731
    short = np.stack([val(pt[5]) for pt in parts], axis=1)  # (T, Z)
    if (short > p.tol_kw).any():
        msgs = []
        for d in np.flatnonzero((short > p.tol_kw).any(axis=0)):
            st = np.flatnonzero(short[:, d] > p.tol_kw)
            buses = np.flatnonzero(evs.zone_of_bus == d)
            msgs.append(f"zone {d} (bus positions {_listed(buses)}) cannot keep within its target at steps "
                        f"{_listed(st)}: short by up to {short[:, d].max():.3f} kW even with all its EVs' "
                        f"flexibility")
        raise TargetError("; ".join(msgs))
    mult = np.stack([val(pt[0]) for pt in parts])  # (Z, 3)
    fac = np.stack([val(pt[1]) for pt in parts])
    x = np.maximum(np.stack([val(pt[2]) for pt in parts]), 0.0)  # (Z, C, T)
    v = np.maximum(np.stack([val(pt[3]) for pt in parts]), 0.0)
    w = np.maximum(np.stack([val(pt[4]) for pt in parts]), 0.0)
    trade = np.maximum(np.stack([val(pt[6]) for pt in parts], axis=1), 0.0)  # (T, Z)
    ev_after = (x + v - w).sum(axis=1).T  # (T, Z)
    ev_before = evs.base_kw.sum(axis=1).T
    net = base + ev_after
    zone_costs = dt * (price @ ev_after + (trade_price * trade).sum(axis=0) + p.v2g_cost_per_kwh * w.sum(axis=(1, 2)))
    energy = x @ in_block.T * dt  # (Z, C, B)
    users = float(((energy * (retail[bp] * mult[:, bp])[:, None, :]).sum()))
    costs = {"energy": float(dt * (price @ ev_after).sum()), "trade": float(dt * (trade_price * trade).sum()),
             "v2g": float(dt * p.v2g_cost_per_kwh * w.sum()), "total": float(zone_costs.sum()),
             "responsive_users_bill": users}
    share, direction = _capability(evs, ev_before, ev_after)
    best = np.argmax(share, axis=0)
    pk_b = (base + ev_before).sum(axis=1).max()
    zone_pk_b = (base + ev_before).max(axis=0)
    zone_pk_a = net.max(axis=0)
    return AggregationPlan(
        multiplier=mult, demand_factor=fac, charge_kw=x, v2g_charge_kw=v, v2g_discharge_kw=w, energy_kwh=energy,
        base_energy_kwh=evs.resp_base_kwh.copy(), zone_net_kw=net, zone_target_kw=target, trade_kw=trade,
        zone_ev_before_kw=ev_before, zone_ev_after_kw=ev_after, capability_share=share,
        capability_direction=direction, zone_max_share=share[best, np.arange(Z)], zone_max_share_step=best,
        peak_shaving_share=float((pk_b - net.sum(axis=1).max()) / pk_b) if pk_b > 0 else 0.0,
        zone_peak_shaving_share=(zone_pk_b - zone_pk_a) / np.where(zone_pk_b > 0, zone_pk_b, np.inf),
        costs=costs, zone_costs=zone_costs, solve_s=time.perf_counter() - t0)


def _zone_model(cp, evs: ZoneEVs, d: int, E: np.ndarray, p: AggregationParams, base: np.ndarray,
                target: np.ndarray, price: np.ndarray, trade_price: np.ndarray, weight: np.ndarray,
                in_block: np.ndarray, tril: np.ndarray):
    """Zone ``d``'s part of eq 22: its constraints, its cost and its variables (m, f, x, v, w, slack, trade)."""
    C, T, dt, bp = N_CATEGORY, evs.n_step, evs.dt_h, evs.block_period
    m = cp.Variable(3, name=f"m{d}")
    f = 1.0 + E @ (m - 1.0)  # (3,) relative demand per period code
    x = cp.Variable((C, T), nonneg=True, name=f"x{d}")
    v = cp.Variable((C, T), nonneg=True, name=f"v{d}")
    w = cp.Variable((C, T), nonneg=True, name=f"w{d}")
    slack = cp.Variable(T, nonneg=True, name=f"s{d}")
    trade = cp.Variable(T, nonneg=True, name=f"b{d}")
    q0 = evs.resp_base_kwh[d]  # (C, B)
    energy = (x @ in_block.T) * dt  # (C, B)
    cons = [m >= p.multiplier_min, m <= p.multiplier_max, f >= 0, x <= evs.resp_p_kw[d], v <= evs.v2g_ch_kw[d],
            w <= evs.v2g_dis_kw[d], trade <= p.trade_kw_max]
    # eq 25 per category and tariff block: the block's baseline energy times its period's relative demand
    demand = _block_factor(cp, f, bp, q0)
    cons.append(energy == demand)
    if p.keep_total_energy:
        cons.append(cp.sum(demand, axis=1) >= q0.sum(axis=1) - 1e-9)
    cum = (cp.multiply(evs.v2g_eta_ch[d][:, None], v) - cp.multiply(evs.v2g_inv_eta_dis[d][:, None], w)) \
        @ tril.T * dt  # (C, T) energy taken by the end of each step
    cons += [cum >= evs.v2g_lo_kwh[d] - 1e-9, cum <= evs.v2g_hi_kwh[d] + 1e-9]
    net = base + cp.sum(x + v - w, axis=0)  # (T,)
    # the slack says by how much a zone misses its target (an error beyond tol_kw)
    cons.append(net <= target + trade + slack)
    weighted = cp.sum(cp.multiply(weight[:, None], x + v - w), axis=0)
    cost = dt * (price @ weighted + trade_price @ trade + p.v2g_cost_per_kwh * cp.sum(w))
    return cons, cost + 1e6 * cp.sum(slack), (m, f, x, v, w, slack, trade)


def _block_factor(cp, f, bp: np.ndarray, q0: np.ndarray):
    """(C, B) expression: each block's baseline energy times its period's relative demand ``f[period]``."""
    sel = np.zeros((3, bp.size))
    sel[bp, np.arange(bp.size)] = 1.0
    return cp.multiply(q0, np.ones((q0.shape[0], 1)) @ cp.reshape(f @ sel, (1, bp.size), order="C"))


def _capability(evs: ZoneEVs, before: np.ndarray, after: np.ndarray) -> tuple[FloatArray, npt.NDArray[np.int8]]:
    """Per step and zone: the EVs' change from uncontrolled charging over the most they could change in that
    direction (peak shaving: stop all charging and discharge every V2G EV; valley filling: charge every plugged
    EV at full power)."""
    shave = before + evs.v2g_dis_kw.sum(axis=1).T
    fill = (evs.resp_p_kw + evs.v2g_ch_kw).sum(axis=1).T - before
    delta = after - before
    direction = np.where(delta < -_TOL_KW, -1, np.where(delta > _TOL_KW, 1, 0)).astype(np.int8)
    cap = np.where(direction < 0, shave, fill)
    share = np.where((direction != 0) & (cap > _TOL_KW), np.abs(delta) / np.maximum(cap, _TOL_KW), 0.0)
    return share, direction


# ------------------------------------------------------------------------------------------------ helpers


def _period(period: npt.ArrayLike) -> IntArray:
    p = np.asarray(period)
    if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer) or ((p < 0) | (p > 2)).any():
        raise ValueError(f"period: expected a 1-D array of period codes {VALLEY} (valley), {OFFPEAK} (off-peak), "
                         f"{PEAK} (peak), got {describe(p)}")
    return p.astype(np.int64)


def _zones(zone_of_bus: npt.ArrayLike, n_bus: int) -> IntArray:
    z = np.asarray(zone_of_bus)
    if z.shape != (n_bus,) or not np.issubdtype(z.dtype, np.integer) or z.min(initial=0) < 0:
        raise ValueError(f"zone_of_bus: expected ({n_bus},) integer zone numbers >= 0 (one per bus), got "
                         f"{describe(z)}")
    z = z.astype(np.int64)
    missing = np.setdiff1d(np.arange(int(z.max()) + 1), z)
    if missing.size:
        raise ValueError(f"zone_of_bus: expected zones numbered 0..Z-1 without gaps, zone {int(missing[0])} has no "
                         f"bus")
    return z


# ------------------------------------------------------------------------------------------------ seed 003's day


@dataclass(frozen=True)
class Seed003Setting:
    """Seed 003's case study on IEEE 33 (section 3.1); values the paper leaves out are ours."""

    n_ev: int = 3000
    """EVs (paper: 3,000)."""
    dt_min: int = 60
    """Step length, minutes (ours: hourly, as the paper's figures)."""
    seed: int = 0
    """Seed of the fleet and the wind."""
    base_load_scale: float = 0.5
    """Base load over IEEE 33's nominal load at the day's peak (ours, as ``experiments/seed003.yaml``: the nominal
    load alone takes the feeder's end below 0.92 p.u.)."""
    load_mix: tuple[float, float, float] = (0.5, 0.3, 0.2)
    """Shares of :func:`~evgrid.grid.profiles.load_shape`'s residential, commercial and industrial shapes in every
    bus's base load (ours: the paper's industrial and commercial load added to residential, giving a day-time
    plateau and an evening peak)."""
    p_charge_kw: tuple[float, float] = (3.3, 7.0)
    """Charger power range, kW (ours: AC home and workplace chargers)."""
    soc0_mean: float = 0.8
    """Mean SOC on arrival (ours: about 6.4 kWh charged per EV and day, 19 MWh for the fleet; the feeder's
    voltage limits do not hold much more)."""
    soc_target: float = 0.9
    """SOC wanted at departure."""
    v2g_share: float = 0.5
    """Share of users who allow V2G (ours)."""
    mix: tuple[float, float, float] = (0.5, 0.3, 0.2)
    """Home, work and public sessions (:class:`~evgrid.envs.fleet.FleetConfig`'s ``daily_mix``)."""
    v_min_pu: float = 0.95
    """Lowest bus voltage, p.u. (ours: the paper gives none)."""
    v_max_pu: float = 1.05
    """Highest bus voltage, p.u. (ours)."""
    wind_mean_m_per_s: float = 7.0
    """Mean wind speed at the turbine (ours)."""
    formulation: str = "socp"
    """The ED's OPF formulation (:class:`DistributionParams`)."""
    ev_model: str = "sessions"
    """How the OPF models the EVs (:class:`DistributionParams`)."""
    before: bool = True
    """Also dispatch the day with uncontrolled charging (Table 2's "before")."""


@dataclass(frozen=True, eq=False)
class Seed003Day:
    """Both layers on seed 003's day, with Table 2 beside the paper's."""

    setting: Seed003Setting
    feeder: Feeder
    zone_of_bus: IntArray  # (n_bus,)
    evs: ZoneEVs
    horizon: opf.Horizon
    distribution: DistributionPlan
    aggregation: AggregationPlan
    before: dict[str, float] | None  # eq 1's terms with uncontrolled charging
    before_soft: bool  # uncontrolled charging broke a limit: the before case was dispatched with soft limits
    timings_s: dict[str, float]
    fleet: EVFleet | None = None  # the day's EVs (bus, stay, powers, energies), e.g. to place a zone's EV power

    def table(self) -> list[dict[str, float | str | None]]:
        """Table 2: each cost term, ours before / after and the paper's; our purchase beside the paper's is the
        energy plus the capacity charge (the paper's table has no capacity column)."""
        rows = []
        after = dict(self.distribution.costs)
        before = dict(self.before) if self.before is not None else None
        for term in ("purchase", "diesel", "curtailment", "carbon", "total"):
            rows.append({"term": term, "ours_before": _table_term(before, term),
                         "paper_before": PAPER_TABLE2["before"][term], "ours_after": _table_term(after, term),
                         "paper_after": PAPER_TABLE2["after"][term]})
        return rows


def _table_term(costs: dict[str, float] | None, term: str) -> float | None:
    if costs is None:
        return None
    return costs["purchase"] + costs["capacity"] if term == "purchase" else costs[term]


def _seed003_inputs(s: Seed003Setting):
    """The day's feeder, horizon (base load, DER availability), EV fleet, zones (modularity) and tariff periods."""
    from evgrid.envs import fleet as fl
    from evgrid.grid.feeders import build_feeder
    from evgrid.grid.profiles import LOAD_KINDS, load_shape, pv_profile, step_count, wind_profile
    from evgrid.grid.zoning import zoning

    feeder = build_feeder("ieee33", der=True, v_min_pu=s.v_min_pu, v_max_pu=s.v_max_pu)
    rng = np.random.default_rng(s.seed)
    T = step_count(s.dt_min)
    dt = s.dt_min / 60.0
    mix = np.asarray(s.load_mix, dtype=float)
    shape = sum(w * load_shape(k, dt_min=s.dt_min) for w, k in zip(mix, LOAD_KINDS))
    shape = shape / shape.max()
    load_p = s.base_load_scale * shape[:, None] * feeder.base_p_kw[None, :]
    load_q = s.base_load_scale * shape[:, None] * feeder.base_q_kvar[None, :]
    kinds = np.array(feeder.der_kind)
    per_kind = {"pv": pv_profile(dt_min=s.dt_min),
                "wind": wind_profile(dt_min=s.dt_min, rng=np.random.default_rng([s.seed, 1]),
                                     mean_speed_m_per_s=s.wind_mean_m_per_s),
                "diesel": np.ones(T)}
    avail = np.stack([per_kind[k] for k in kinds], axis=1) * feeder.der_p_max_kw[None, :]
    horizon = opf.Horizon(dt, load_p, load_q, avail)
    # EVs at the load buses in proportion to their load
    load_bus = np.flatnonzero(feeder.base_p_kw > 0)
    cfg = fl.FleetConfig(n_ev=s.n_ev, scenario="daily_mix", mix=s.mix, p_charge_kw=s.p_charge_kw,
                         soc0_mean=s.soc0_mean, soc_target=s.soc_target, v2g_share=s.v2g_share,
                         station_weights=tuple(float(x) for x in feeder.base_p_kw[load_bus]))
    sessions = fl.generate(cfg, rng, n_station=load_bus.size)
    ev = fleet_from_sessions(sessions, load_bus[sessions.station], dt_h=dt, n_step=T, v2g_soc_min=cfg.v2g_soc_min)
    gen = np.zeros_like(load_p)
    np.add.at(gen.T, feeder.der_bus, avail.T)
    ev_flex_kw = np.zeros(feeder.n_bus)
    np.add.at(ev_flex_kw, ev.bus, ev.p_ch_max_kw * ev.stay / T)
    zn = zoning(feeder, "modularity", load_kw=load_p, gen_kw=gen, ev_flex_kw=ev_flex_kw)
    zob = zn.zone_of_bus
    tariff = _MC.tariff
    period = tariff.period(dt_min=s.dt_min)
    return feeder, horizon, ev, zob, period


def seed003_day(setting: Seed003Setting | None = None) -> Seed003Day:
    """Seed 003's setting on IEEE 33 (Table 1's DER, 3,000 EVs in the four user categories, industrial /
    commercial base load, the carbon and price parameters of section 3.1) through both layers.  Numbers are
    reported as they come, not tuned to the paper's."""
    s = setting if setting is not None else Seed003Setting()
    times = {}
    t0 = time.perf_counter()
    feeder, horizon, ev, zob, period = _seed003_inputs(s)
    T, dt = horizon.n_step, horizon.dt_h
    load_p, load_q, avail = horizon.load_p_kw, horizon.load_q_kvar, horizon.der_avail_kw
    evs = zone_evs(ev, zob, period, dt)
    times["setup"] = time.perf_counter() - t0
    price = mk.purchase_price_per_kwh(period, _MC)
    params = DistributionParams(purchase_price_per_kwh=price, formulation=s.formulation, ev_model=s.ev_model)
    t1 = time.perf_counter()
    dist = distribution_layer(feeder, horizon, zob, evs, params)
    times["distribution"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    agg = aggregation_layer(dist.zone_target_kw, dist.zone_base_kw, evs, price, mk.SEED003_ELASTICITY,
                            AggregationParams(), trade_price_per_kwh=dist.trade_price_cap_per_kwh)
    times["aggregation"] = time.perf_counter() - t1
    before, soft = None, False
    if s.before:
        t1 = time.perf_counter()
        x0 = np.zeros((T, feeder.n_bus))
        np.add.at(x0.T, ev.bus, uncontrolled_kw(ev, T, dt))
        hz0 = opf.Horizon(dt, load_p + x0, load_q, avail)
        try:
            before = economic_dispatch(feeder, hz0, None, params).costs
        except opf.InfeasibleError as exc:
            log.warning("uncontrolled charging breaks the network's limits (%s); the before case is dispatched with "
                        "soft limits", exc)
            before, soft = economic_dispatch(feeder, hz0, None, params, soft=True).costs, True
        times["before"] = time.perf_counter() - t1
    times["total"] = time.perf_counter() - t0
    return Seed003Day(setting=s, feeder=feeder, zone_of_bus=zob, evs=evs, horizon=horizon, distribution=dist,
                      aggregation=agg, before=before, before_soft=soft, timings_s=times, fleet=ev)
