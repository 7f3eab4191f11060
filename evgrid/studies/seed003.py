"""Seed 003 reproduced: Ji et al. (2025), a bilevel zonal dispatch with EV users' price-based demand response.

Each seed is one simulated day (:func:`evgrid.grid.layers003.seed003_day`): IEEE 33 at 12.66 kV with Table 1's
PV, wind and diesel, 3,000 EVs in the paper's four user categories, industrial / commercial base load, the
carbon and price parameters of section 3.1; the feeder zoned by modularity with alpha 0.5, beta 0.9, gamma 0.4;
the distribution layer's economic dispatch and zone targets (eqs 1-11); each zone's aggregator meeting its
target at least cost with price-responsive EVs (the full 3x3 elasticity matrix) and V2G (eqs 22-26).  The seed
draws the fleet and the wind; the study's values shared with ``experiments/seed003.yaml`` come from it.

Methods (every one's bus injections solved with the AC sweep, :class:`~evgrid.grid.flow.SweepBackend`, and
settled as Table 2 from the AC flow at the substation, :func:`settle`):

* ``before``: the same day without the two layers: EVs charge uncontrolled (full power from plug-in until their
  target, whatever the tariff: the paper's base case), PV and wind at their available output (nothing schedules
  a curtailment), diesel at its must-run output.
* ``after``: the scheduled day: PV, wind and diesel as the distribution layer dispatched them, EVs as the
  zones' aggregators dispatched them.  The aggregators schedule each zone's user categories, not single EVs;
  each zone-category-step power is placed on the zone's buses in proportion to the chargers plugged there
  (:func:`place_zone_evs`).
* ``after_distribution``: the distribution layer's own schedule (its EV sessions, exact per bus), replayed: the
  AC check of the plan the aggregators' targets come from.

Metrics ending in ``_opf`` are the plans' own numbers (the economic dispatch's cost terms recomputed from its
model's substation power; for ``before`` the dispatch of the day with uncontrolled charging fixed, soft voltage
limits where uncontrolled charging breaks them), beside the AC replay's.  Definitions are in :data:`NOTES`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from evgrid.envs import market as mk
from evgrid.grid import layers003 as L
from evgrid.grid.flow import SweepBackend
from evgrid.grid.flow.base import FlowResult
from evgrid.studies.common import Claim, Context, StudyOutput, row

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

TITLE = "Ji et al. (2025), a bilevel zonal dispatch strategy considering EV users' demand response (IJRED)"
USES_RAY = False
STUDY = "seed003"
N_SEEDS = {True: 1, False: 5}  # quick, full: a day takes about 10 s
METHODS = ("before", "after", "after_distribution")
COST_TERMS = ("purchase", "diesel", "curtailment", "carbon", "total")
_V_TOL_PU = 1e-6  # a bus-step counts as a violation beyond this margin (the sweep's own accuracy is ~3e-8)

NOTES = (
    "Costs (yuan per day) come from the AC replay: the substation's power of the AC sweep priced at the purchase "
    "tariff (exports earn nothing), diesel at its cost curve, curtailed PV / wind at 0.1 yuan/kWh, the stepped "
    "carbon cost on the day's emission excess.  purchase_cost includes the capacity charge (32 yuan/kVA per "
    "month, a 30-day month's share, on the day's peak kW; the paper's Table 2 has no capacity column), shown "
    "alone as capacity_cost.",
    "peak_shaving_share = (peak before - peak after) / peak before of the feeder's load: base load plus the EVs' "
    "net charging (V2G negative), hourly, before PV / wind / diesel.  Our reading of the paper's \"EVs achieved a "
    "reduction of 21.1 % in load peak shaving\" with its two load peaks (11-16 h, 19-23 h) that V2G cuts.  "
    "purchase_peak_reduction_share is the same on the substation's AC power (net of DER, losses included), and "
    "net_peak_shaving_share the aggregation plan's own (zone net loads, layers003).",
    "EV capability shares (layers003's AggregationPlan.capability_share): per zone and hour, the EVs' change from "
    "uncontrolled charging over the most they could change in that direction (peak shaving: stop all charging "
    "and discharge every plugged V2G EV; valley filling: charge every plugged EV at full power).  The paper "
    "quotes three such shares at single hours (area 2: 87.0 % peak shaving at 5:00, 83.4 % valley filling at "
    "7:00; area 5: 89.1 % valley filling at 14:00).  Its partition (Figure 5) is lost from the text, so no zone "
    "of ours maps to its areas: per zone (numbered 1..Z in our zoning's order) we report the day's largest share "
    "in each direction, and the largest over zones beside the paper's largest quoted share of that direction.",
    "before's curtailment is 0: nothing curtails PV / wind without a schedule here, exports are allowed and no "
    "voltage ceiling binds; the paper's base case curtails 632.60 yuan (6,326 kWh), which it does not explain "
    "(a reverse-flow limit, or no export, would do it).  So the paper's curtailment ordering (before > after) "
    "cannot show.",
    "diesel_cost is the same before and after by construction (must-run at full output, the paper's reading: "
    "its 3,288.6 yuan both, with MarketConfig's cost curve).",
    "Our carbon cost is negative (a revenue): the feeder earns quota at 0.7 kg/kWh on PV, wind and diesel "
    "delivered, more than it emits (diesel 0.8 kg/kWh, 47.6 % of purchases at 0.9 kg/kWh, both ours), and "
    "unused quota sells at the base price (ours).  The paper's is positive; its emission factors and whether it "
    "sells quota are not given.",
    "Absolute costs differ from the paper's: its base load (Xu et al. 2019), EV data (Xu et al. 2012) and tariffs "
    "are not public.  Ours: IEEE 33's nominal load x 0.5 at the day's peak with residential / commercial / "
    "industrial shapes, MarketConfig's purchase tariff, 3,000 EVs of the daily_mix scenario (about 6.4 kWh each).",
    "after places each zone's EV power on its buses in proportion to the plugged chargers of each user category "
    "(the aggregators decide per zone and category, not per EV), so its bus injections differ from the "
    "distribution layer's plan; after_distribution replays that plan exactly.  Both are AC power flows of hourly "
    "injections; EVs and DER at unity power factor, as in the OPF.",
    "Seed 003 trains nothing: it runs in this process and --address is not used.",
    "The two layers differ in what V2G costs: the distribution layer's plan pays no battery wear, the aggregators "
    "0.1 yuan/kWh discharged (ours), so the plan cycles V2G EVs more (v2g_discharge_kwh).  Zone targets (eq 9, the "
    "larger of two dispatches) are ceilings, so the aggregators' day may buy above the plan's peak "
    "(peak_purchase_kw, capacity_cost).",
)


# ----------------------------------------------------------------------------------------------- settings


def _experiment():
    from evgrid.envs.config import load_config

    return load_config(STUDY)


def setting(seed: int, cfg=None) -> L.Seed003Setting:
    """The day of ``seed``: ``experiments/seed003.yaml``'s fleet size, V2G share, session mix, SOC target and
    base-load scale; the rest :class:`~evgrid.grid.layers003.Seed003Setting`'s (hourly steps, as the paper's
    figures; the YAML's 15-minute steps are the environment's)."""
    cfg = cfg if cfg is not None else _experiment()
    return L.Seed003Setting(n_ev=cfg.fleet.n_ev, seed=int(seed), base_load_scale=cfg.grid.base_load_scale,
                            mix=tuple(cfg.fleet.mix), v2g_share=cfg.fleet.v2g_share,
                            soc_target=cfg.fleet.soc_target)


def default_seeds(quick: bool) -> tuple[int, ...]:
    """The config's seed and the next ones: one quick, five full."""
    first = _experiment().seed
    return tuple(range(first, first + N_SEEDS[bool(quick)]))


def resolved_config(ctx: Context) -> dict:
    from evgrid.config import to_dict

    cfg = _experiment()
    return {"experiment": STUDY, "days": [to_dict(setting(s, cfg)) for s in ctx.seeds],
            "distribution": {k: v for k, v in to_dict(_params(None)).items() if k != "purchase_price_per_kwh"},
            "aggregation": to_dict(L.AggregationParams())}


def _params(day: L.Seed003Day | None) -> L.DistributionParams:
    """The distribution layer's prices as :func:`~evgrid.grid.layers003.seed003_day` sets them."""
    mc = mk.MarketConfig()
    period = day.evs.period if day is not None else mc.tariff.period(dt_min=L.Seed003Setting().dt_min)
    return L.DistributionParams(purchase_price_per_kwh=mk.purchase_price_per_kwh(period, mc))


# ----------------------------------------------------------------------------------------------- the replay


@dataclass(frozen=True, eq=False)
class Replay:
    """One day's bus injections solved with the AC sweep and settled as Table 2."""

    ev_kw: FloatArray  # (T, n_bus) EVs' net charging per bus, grid side (V2G negative)
    der_kw: FloatArray  # (T, n_der) output of each DER site, diesel included
    flow: FlowResult  # batch = the day's steps
    costs: dict[str, float]  # purchase (energy), capacity, diesel, carbon, curtailment, total
    violations: int  # bus-steps outside [v_min, v_max]
    solve_s: float

    @property
    def purchase_kw(self) -> FloatArray:  # (T,)
        return self.flow.slack_p_kw


def replay(day: L.Seed003Day, ev_kw: FloatArray, der_kw: FloatArray,
           params: L.DistributionParams | None = None) -> Replay:
    """The AC power flow of the day's base load, ``ev_kw`` (T, n_bus) and the DER output ``der_kw`` (T, n_der),
    settled by :func:`settle`.  A step whose flow does not converge leaves NaN costs (and a warning)."""
    t0 = time.perf_counter()
    f, hz = day.feeder, day.horizon
    gen = np.zeros_like(hz.load_p_kw)
    np.add.at(gen.T, f.der_bus, der_kw.T)
    flow = SweepBackend(f).solve(hz.load_p_kw + ev_kw - gen, hz.load_q_kvar)
    if not flow.converged.all():
        log.warning("seed003: the AC flow did not converge at steps %s", np.flatnonzero(~flow.converged).tolist())
    vm = flow.vm_pu
    bad = (vm < f.v_min_pu[None, :] - _V_TOL_PU) | (vm > f.v_max_pu[None, :] + _V_TOL_PU)
    costs = settle(day, flow.slack_p_kw, der_kw, params if params is not None else _params(day))
    return Replay(ev_kw=ev_kw, der_kw=der_kw, flow=flow, costs=costs, violations=int(bad.sum()),
                  solve_s=time.perf_counter() - t0)


def settle(day: L.Seed003Day, tie_kw: FloatArray, der_kw: FloatArray, params: L.DistributionParams
           ) -> dict[str, float]:
    """Eq 1's terms of a day (yuan) from the substation's power ``tie_kw`` (T,) and the DER output ``der_kw``
    (T, n_der), as the distribution layer settles its dispatch: purchases (> 0 only) at the tariff plus the
    capacity charge on their peak, diesel's cost curve, the day's stepped carbon cost on emissions less quota,
    curtailed PV / wind."""
    f, hz, c = day.feeder, day.horizon, params.carbon
    dt = hz.dt_h
    kinds = np.array(f.der_kind)
    dsl, ren = kinds == "diesel", np.isin(kinds, ("pv", "wind"))
    buy = np.maximum(np.asarray(tie_kw, dtype=float), 0.0)
    diesel_kw = der_kw[:, dsl]
    ren_kw = der_kw[:, ren].sum(axis=1)
    curtailed_kw = np.maximum(hz.der_avail_kw[:, ren].sum(axis=1) - ren_kw, 0.0)
    mc = dataclasses.replace(mk.MarketConfig(), diesel_a_per_kw2h=params.diesel_a_per_kw2h,
                             diesel_b_per_kwh=params.diesel_b_per_kwh, diesel_c_per_h=params.diesel_c_per_h)
    emission_kg = mk.carbon_emissions_kg(buy.sum() * dt, diesel_kw.sum() * dt, c)
    quota_kg = mk.carbon_quota_kg(diesel_kw.sum() * dt, ren_kw.sum() * dt, c)
    costs = {"purchase": float(params.purchase_price_per_kwh @ buy * dt),
             "capacity": float(params.capacity_price_per_kw_day * buy.max(initial=0.0)),
             "diesel": float(mk.diesel_cost(diesel_kw, dt, mc).sum()),
             "carbon": float(mk.stepped_carbon_cost((emission_kg - quota_kg) / 1e3, c)),
             "curtailment": float(params.curtail_cost_per_kwh * curtailed_kw.sum() * dt)}
    costs["total"] = float(sum(costs.values()))
    return costs


def _diesel_floor_kw(day: L.Seed003Day, params: L.DistributionParams) -> FloatArray:  # (T, n_der)
    """Each diesel unit's must-run output (zero elsewhere)."""
    floor = np.zeros_like(day.horizon.der_avail_kw)
    dsl = np.array(day.feeder.der_kind) == "diesel"
    floor[:, dsl] = params.diesel_min_pu * day.horizon.der_avail_kw[:, dsl]
    return floor


def before_injections(day: L.Seed003Day, params: L.DistributionParams) -> tuple[FloatArray, FloatArray]:
    """``before``'s (EV kW per bus (T, n_bus), DER kW (T, n_der)): uncontrolled charging, PV / wind available,
    diesel at its must-run output."""
    fleet, hz = _fleet(day), day.horizon
    ev = np.zeros_like(hz.load_p_kw)
    np.add.at(ev.T, fleet.bus, L.uncontrolled_kw(fleet, hz.n_step, hz.dt_h))
    dsl = np.array(day.feeder.der_kind) == "diesel"
    der = np.where(dsl[None, :], _diesel_floor_kw(day, params), hz.der_avail_kw)
    return ev, der


def distribution_injections(day: L.Seed003Day, params: L.DistributionParams) -> tuple[FloatArray, FloatArray]:
    """The distribution layer's plan: its EV sessions per bus and its DER dispatch (diesel: floor + dispatch)."""
    ed, evs = day.distribution.ed, day.evs
    ev = np.zeros_like(day.horizon.load_p_kw)
    np.add.at(ev.T, evs.sessions.bus, ed.p_ch_kw - ed.p_dis_kw)
    return ev, ed.der_kw + _diesel_floor_kw(day, params)


def place_zone_evs(day: L.Seed003Day) -> FloatArray:  # (T, n_bus)
    """The aggregators' EV power per bus: each zone-category-step power (price-responsive charging, V2G charging,
    V2G discharging) shared among that zone's EVs of that category plugged in at the step, in proportion to
    their charger (or discharge) power; the most any EV gets is its own limit, since the zone's total is within
    the plugged total."""
    fleet, evs, agg = _fleet(day), day.evs, day.aggregation
    T = day.horizon.n_step
    on = fleet.plugged(T)
    group = evs.ev_zone * L.N_CATEGORY + (evs.category - 1)  # (n_ev,)
    n_group = evs.n_zone * L.N_CATEGORY
    v2g = fleet.v2g
    p_ev = np.zeros((fleet.n, T))
    for weight_kw, plan_kw, sign in ((fleet.p_ch_max_kw * ~v2g, agg.charge_kw, 1.0),
                                     (fleet.p_ch_max_kw * v2g, agg.v2g_charge_kw, 1.0),
                                     (fleet.p_dis_max_kw * v2g, agg.v2g_discharge_kw, -1.0)):
        w = on * weight_kw[:, None]  # (n_ev, T)
        total = np.zeros((n_group, T))
        np.add.at(total, group, w)
        plan = plan_kw.reshape(n_group, T)
        stranded = np.where(total <= 0, plan, 0.0).sum()
        if stranded > 1e-6:
            log.warning("seed003: %.3f kWh of the aggregators' EV power has no plugged EV to carry it", stranded)
        share = np.divide(w, total[group], out=np.zeros_like(w), where=total[group] > 0)
        p_ev += sign * share * plan[group]
    ev = np.zeros((T, day.feeder.n_bus))
    np.add.at(ev.T, fleet.bus, p_ev)
    return ev


def _fleet(day: L.Seed003Day) -> L.EVFleet:
    if day.fleet is None:
        raise ValueError("day.fleet: expected the day's EVFleet (seed003_day sets it), got None")
    return day.fleet


def replays(day: L.Seed003Day) -> dict[str, Replay]:
    """The AC replays of :data:`METHODS` for ``day``."""
    params = _params(day)
    _, der_after = distribution_injections(day, params)
    return {"before": replay(day, *before_injections(day, params), params),
            "after": replay(day, place_zone_evs(day), der_after, params),
            "after_distribution": replay(day, *distribution_injections(day, params), params)}


# ----------------------------------------------------------------------------------------------- the rows


def _paper_cost(method: str, term: str) -> float | None:
    return L.PAPER_TABLE2[method][term] if method in L.PAPER_TABLE2 else None


def cost_rows(seed: int, method: str, costs: dict[str, float], suffix: str = "", paper: bool = True) -> list[dict]:
    """Table 2's terms of one method (purchase with the capacity charge), and the capacity charge alone."""
    table = {**costs, "purchase": costs["purchase"] + costs["capacity"]}
    rows = [row(STUDY, method, seed, f"{term}_cost{suffix}", table[term],
                _paper_cost(method, term) if paper else None) for term in COST_TERMS]
    return rows + [row(STUDY, method, seed, f"capacity_cost{suffix}", costs["capacity"])]


def grid_rows(seed: int, method: str, day: L.Seed003Day, rp: Replay) -> list[dict]:
    """Voltages, losses, loading and the load and purchase peaks of one AC replay."""
    fl, dt = rp.flow, day.horizon.dt_h
    demand = day.horizon.load_p_kw.sum(axis=1) + rp.ev_kw.sum(axis=1)
    values = {"voltage_violations": rp.violations, "vm_min_pu": np.nanmin(fl.vm_pu), "vm_max_pu": np.nanmax(fl.vm_pu),
              "loss_kwh": np.nansum(fl.loss_kw) * dt, "max_line_loading": np.nanmax(fl.line_loading),
              "peak_load_kw": demand.max(), "peak_purchase_kw": np.nanmax(fl.slack_p_kw),
              "ev_energy_kwh": rp.ev_kw.sum() * dt}
    return [row(STUDY, method, seed, k, float(v)) for k, v in values.items()]


def ev_rows(seed: int, day: L.Seed003Day, rps: dict[str, Replay]) -> list[dict]:
    """Peak shaving (after and after_distribution against before) and the aggregators' use of each zone's EV
    capability (see NOTES)."""
    load = {m: day.horizon.load_p_kw.sum(axis=1) + rp.ev_kw.sum(axis=1) for m, rp in rps.items()}
    buy = {m: np.nanmax(rp.purchase_kw) for m, rp in rps.items()}
    rows = []
    for m in ("after", "after_distribution"):
        rows.append(row(STUDY, m, seed, "peak_shaving_share", 1 - load[m].max() / load["before"].max(),
                        L.PAPER_PEAK_SHAVING_SHARE if m == "after" else None))
        rows.append(row(STUDY, m, seed, "purchase_peak_reduction_share", 1 - buy[m] / buy["before"]))
    agg = day.aggregation
    rows.append(row(STUDY, "after", seed, "net_peak_shaving_share", agg.peak_shaving_share))
    share, direction = agg.capability_share, agg.capability_direction  # (T, Z)
    paper = {"peak_shaving": L.PAPER_CAPABILITY_SHARES[0], "valley_filling": max(L.PAPER_CAPABILITY_SHARES[1:])}
    for name, sign in (("peak_shaving", -1), ("valley_filling", 1)):
        per_zone = np.where(direction == sign, share, 0.0).max(axis=0)  # (Z,)
        rows.append(row(STUDY, "after", seed, f"ev_{name}_capability_share_max", per_zone.max(), paper[name]))
        rows += [row(STUDY, "after", seed, f"ev_{name}_capability_share_zone{k + 1}", v)
                 for k, v in enumerate(per_zone)]
    rows.append(row(STUDY, "after", seed, "n_zone", day.evs.n_zone))
    # how much each layer uses V2G and the price response (the elasticity matrix acts only through m != 1)
    dt = day.horizon.dt_h
    rows.append(row(STUDY, "after", seed, "v2g_discharge_kwh", agg.v2g_discharge_kw.sum() * dt))
    rows.append(row(STUDY, "after_distribution", seed, "v2g_discharge_kwh", day.distribution.ed.p_dis_kw.sum() * dt))
    rows.append(row(STUDY, "after", seed, "price_multiplier_max_change", np.abs(agg.multiplier - 1).max()))
    return rows


def day_rows(seed: int, day: L.Seed003Day, rps: dict[str, Replay]) -> list[dict]:
    """Every row of one seed's day."""
    rows = []
    for m, rp in rps.items():
        rows += cost_rows(seed, m, rp.costs)
        rows += grid_rows(seed, m, day, rp)
    if day.before is not None:
        rows += cost_rows(seed, "before", day.before, "_opf", paper=False)
    rows += cost_rows(seed, "after", day.distribution.costs, "_opf", paper=False)
    rows += ev_rows(seed, day, rps)
    t = day.timings_s
    walls = {"before": t["setup"] + t.get("before", 0.0), "after": t["setup"] + t["distribution"] + t["aggregation"],
             "after_distribution": t["setup"] + t["distribution"]}
    rows += [row(STUDY, m, seed, "wall_s", walls[m] + rps[m].solve_s) for m in rps]
    return rows


# ----------------------------------------------------------------------------------------------- claims, notes


def _values(rows: list[dict], metric: str, method: str) -> FloatArray:  # (n_seed,) in seed order
    return np.array([r["value"] for r in rows if r["metric"] == metric and r["method"] == method], dtype=float)


def _change(before: float, after: float) -> str:
    """The change as a share of before's magnitude (a negative cost, a revenue, may fall too)."""
    return f"{(after - before) / abs(before):+.1%}" if before != 0 else "n.a."


def claims(rows: list[dict]) -> list[Claim]:
    """The paper's directions, each checked on every seed (the text gives our mean)."""
    v = {(m, k): _values(rows, f"{k}_cost", m) for m in ("before", "after") for k in COST_TERMS}
    p = L.PAPER_TABLE2

    def falls(term: str) -> Claim:
        b, a = v["before", term], v["after", term]
        return Claim(f"{term} cost falls with the two layers (paper {p['before'][term]:,.2f} -> "
                     f"{p['after'][term]:,.2f} yuan, {_change(p['before'][term], p['after'][term])}; ours "
                     f"{b.mean():,.2f} -> {a.mean():,.2f}, {_change(b.mean(), a.mean())} on the mean)",
                     bool((a < b).all()))

    curt_a, curt_b = v["after", "curtailment"], v["before", "curtailment"]
    db, da = v["before", "diesel"], v["after", "diesel"]
    share = _values(rows, "peak_shaving_share", "after")
    viol_b, viol_a = _values(rows, "voltage_violations", "before"), _values(rows, "voltage_violations", "after")
    n_zone = _values(rows, "n_zone", "after")
    cap = np.concatenate([_values(rows, f"ev_{k}_capability_share_max", "after")
                          for k in ("peak_shaving", "valley_filling")])
    return [
        falls("total"), falls("purchase"), falls("carbon"),
        Claim(f"no PV / wind is curtailed after scheduling (paper 632.60 -> 0 yuan; ours {curt_b.mean():.3g} -> "
              f"{curt_a.mean():.3g} yuan)", bool((curt_a < 1.0).all())),
        Claim(f"diesel cost is unchanged (paper 3,288.6 yuan both; ours {db.mean():,.1f} -> {da.mean():,.1f})",
              bool((np.abs(da - db) <= 1e-4 * np.abs(db)).all())),
        Claim(f"EVs shave the load peak (paper 21.1 %; ours {share.mean():.1%} on the mean)", bool((share > 0).all())),
        Claim(f"voltage violations are not more after than before (bus-hours, ours {viol_b.mean():.1f} -> "
              f"{viol_a.mean():.1f} on the mean)", bool((viol_a <= viol_b).all())),
        Claim(f"the feeder is split into at least 5 aggregation areas (ours {n_zone.min():.0f}-{n_zone.max():.0f})",
              bool((n_zone >= 5).all())),
        Claim(f"each zone's EV use stays within its EVs' peak-shaving / valley-filling capability (paper: up to "
              f"87.0-89.1 % at single hours; ours up to {cap.max():.1%})", bool(((cap > 0) & (cap <= 1 + 1e-6)).all())),
    ]


def run_notes(rows: list[dict], soft_seeds: list[int]) -> list[str]:
    """What this run measured beside the static NOTES: the AC replays against the plans' own numbers."""
    notes = []
    opf_after = _values(rows, "total_cost_opf", "after")
    for m in ("after_distribution", "after"):
        gap = np.abs(_values(rows, "total_cost", m) / opf_after - 1)
        notes.append(f"AC replay of {m} vs the distribution layer's own total (total_cost_opf of after): largest "
                     f"relative difference {gap.max():.2%} over seeds.")
    mult = _values(rows, "price_multiplier_max_change", "after")
    if mult.size and mult.max() < 1e-4:
        notes.append("The aggregators kept every period price at its base on every seed (price_multiplier_max_change "
                     "< 1e-4): the elasticity matrix never acted, and the day's shift comes from orderly charging "
                     "within each tariff block and from V2G.")
    elif mult.size:
        notes.append(f"The aggregators moved period prices by up to {mult.max():.1%} (price_multiplier_max_change); "
                     f"users answered through the full elasticity matrix.")
    if soft_seeds:
        notes.append(f"Seed(s) {', '.join(map(str, soft_seeds))}: uncontrolled charging takes buses below the voltage "
                     f"floor, so before's *_opf numbers come from a dispatch with soft voltage limits (the AC "
                     f"replay counts those violations).")
    return notes


# ----------------------------------------------------------------------------------------------- figures


def load_curve_figure(day: L.Seed003Day, rps: dict[str, Replay], path: Path) -> Path:
    """The paper's main figure: the feeder's hourly load and purchase before and after, PV / wind available,
    and the EVs' net charging before and after."""
    from matplotlib.figure import Figure

    from evgrid.io import save_figure

    hz = day.horizon
    hours = np.arange(hz.n_step) * hz.dt_h
    edges = np.arange(hz.n_step + 1) * hz.dt_h  # each hour's value held over the hour
    ren = np.isin(np.array(day.feeder.der_kind), ("pv", "wind"))
    fig = Figure(figsize=(9, 7))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.stairs(hz.der_avail_kw[:, ren].sum(axis=1) / 1e3, edges, fill=True, color="gold", alpha=0.4,
               label="PV + wind available")
    for m, color in (("before", "tab:red"), ("after", "tab:blue")):
        load = hz.load_p_kw.sum(axis=1) + rps[m].ev_kw.sum(axis=1)
        top.stairs(load / 1e3, edges, baseline=None, color=color, label=f"load (base + EVs), {m}")
        top.stairs(rps[m].purchase_kw / 1e3, edges, baseline=None, color=color, ls="--", label=f"purchase (AC), {m}")
    top.stairs(hz.load_p_kw.sum(axis=1) / 1e3, edges, baseline=None, color="grey", lw=1, label="base load")
    top.axhline(0, color="black", lw=0.5)
    top.set_ylabel("MW")
    top.legend(fontsize=7, ncol=2)
    top.set_title(f"Seed 003, day of seed {day.setting.seed}: load and purchase before / after the two layers")
    width = 0.4 * hz.dt_h
    bottom.bar(hours + 0.5 * hz.dt_h - width / 2, rps["before"].ev_kw.sum(axis=1) / 1e3, width, color="tab:red",
               label="EVs before (uncontrolled)")
    bottom.bar(hours + 0.5 * hz.dt_h + width / 2, rps["after"].ev_kw.sum(axis=1) / 1e3, width, color="tab:blue",
               label="EVs after (aggregators, V2G < 0)")
    bottom.axhline(0, color="black", lw=0.5)
    bottom.set_xlabel("hour of the day")
    bottom.set_ylabel("MW")
    bottom.set_xticks(np.arange(0, 25, 3))
    bottom.legend(fontsize=7)
    return save_figure(fig, path)


def voltage_figure(day: L.Seed003Day, rps: dict[str, Replay], path: Path) -> Path:
    """The lowest bus voltage per hour, and the voltage along the buses at before's worst hour."""
    from matplotlib.figure import Figure

    from evgrid.io import save_figure

    f, hz = day.feeder, day.horizon
    edges = np.arange(hz.n_step + 1) * hz.dt_h
    worst = int(np.nanargmin(rps["before"].flow.vm_pu.min(axis=1)))
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for m, color in (("before", "tab:red"), ("after", "tab:blue"), ("after_distribution", "tab:green")):
        vm = rps[m].flow.vm_pu
        left.stairs(vm.min(axis=1), edges, baseline=None, color=color, label=m)
        right.plot(f.numbers, vm[worst], marker=".", color=color, label=m)
    for ax in (left, right):
        ax.axhline(float(f.v_min_pu.min()), color="black", ls=":", lw=1, label="v_min")
        ax.set_ylabel("p.u.")
        ax.legend(fontsize=7)
    left.set_xlabel("hour of the day")
    left.set_title("lowest bus voltage (AC)")
    right.set_xlabel(f"bus ({f.numbering.split(';')[0]})")
    right.set_title(f"voltage along the feeder at {worst}:00 (before's lowest)")
    return save_figure(fig, path)


def _tree_layout(day: L.Seed003Day) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """(x, y) per bus for a drawing of the radial feeder, and each bus's parent bus (-1 at the slack): x is the
    number of branches from the slack; the longest path lies on line 0, each lateral on a line of its own below,
    the nearest free one (laterals further out placed first), so that no drop or line crosses another."""
    t, n = day.feeder.tree, day.feeder.n_bus
    bus_of_node = np.full(t.n_node, -1)
    bus_of_node[t.node_of_bus] = np.arange(n)
    parent = np.where(t.parent[t.node_of_bus] >= 0, bus_of_node[np.maximum(t.parent[t.node_of_bus], 0)], -1)
    children: dict[int, list[int]] = {b: [int(c) for c in np.flatnonzero(parent == b)] for b in range(n)}
    x = t.paths().sum(axis=1)[t.node_of_bus].astype(float)  # (n_bus,) branches from the slack
    height = np.zeros(n)
    for b in np.argsort(-x, kind="stable"):  # children before their parents
        height[b] = max((height[c] + 1 for c in children[b]), default=0)

    def chain(b: int) -> list[int]:  # from b along the tallest child
        path = [b]
        while children[path[-1]]:
            path.append(max(children[path[-1]], key=lambda c: height[c]))
        return path

    y = np.zeros(n)
    main = chain(int(np.flatnonzero(parent < 0)[0]))
    lines: dict[float, list[tuple[float, float]]] = {0.0: [(x[main[0]], x[main[-1]])]}
    pending = [(p, c) for p in main for c in children[p] if c not in main]
    while pending:
        pending.sort(key=lambda pc: -x[pc[0]])
        p, c = pending.pop(0)
        path = chain(c)
        lo, hi = x[p], x[path[-1]]
        lane = y[p] - 1
        while any(not (b < lo or a > hi) for a, b in lines.get(lane, [])) or any(
                a <= lo <= b for k in np.arange(lane + 1, y[p]) for a, b in lines.get(float(k), [])):
            lane -= 1
        y[path] = lane
        lines.setdefault(float(lane), []).append((lo, hi))
        pending += [(q, d) for q in path for d in children[q] if d not in path]
    return x, y, parent


def zones_figure(day: L.Seed003Day, path: Path) -> Path:
    """The feeder drawn as a tree, buses coloured by aggregation zone, DER sites marked."""
    from matplotlib.figure import Figure

    from evgrid.io import save_figure

    f = day.feeder
    x, y, parent = _tree_layout(day)
    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    for b in np.flatnonzero(parent >= 0):
        ax.plot([x[parent[b]], x[parent[b]], x[b]], [y[parent[b]], y[b], y[b]], color="grey", lw=1, zorder=1)
    zone = day.zone_of_bus
    sc = ax.scatter(x, y, c=zone, cmap="tab10", vmin=0, vmax=9, s=120, zorder=2, edgecolors="black")
    for b in range(f.n_bus):
        ax.annotate(str(f.numbers[b]), (x[b], y[b]), fontsize=6, ha="center", va="center", zorder=3)
    kinds = np.array(f.der_kind)
    for kind, marker in (("pv", "^"), ("wind", "s"), ("diesel", "D")):
        sel = f.der_bus[kinds == kind]
        ax.scatter(x[sel], y[sel] + 0.35, marker=marker, color="black", s=25, label=kind)
    handles = [ax.scatter([], [], color=sc.cmap(sc.norm(z)), s=60, label=f"zone {z + 1}")
               for z in range(int(zone.max()) + 1)]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0][:3], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"IEEE 33: {int(zone.max()) + 1} aggregation zones (modularity, alpha 0.5, beta 0.9, gamma 0.4)")
    ax.set_axis_off()
    return save_figure(fig, path)


def figures(out_dir: Path, day: L.Seed003Day, rps: dict[str, Replay]) -> list[Path]:
    return [load_curve_figure(day, rps, out_dir / "load_curve.png"), voltage_figure(day, rps, out_dir / "voltage.png"),
            zones_figure(day, out_dir / "zones.png")]


# ----------------------------------------------------------------------------------------------- the study


def run(ctx: Context) -> StudyOutput:
    """Both layers on each seed's day, every method replayed with the AC flow; figures of the first seed."""
    cfg = _experiment()
    rows: list[dict] = []
    first = None
    soft = []
    for seed in ctx.progress(ctx.seeds, desc="seed003 days", total=len(ctx.seeds)):
        day = L.seed003_day(setting(seed, cfg))
        rps = replays(day)
        rows += day_rows(seed, day, rps)
        if day.before_soft:
            soft.append(seed)
        if first is None:
            first = (day, rps)
    figs = figures(ctx.out_dir, *first) if first is not None else []
    notes = list(NOTES) + run_notes(rows, soft)
    if ctx.address is not None:
        log.info("seed003 trains nothing; --address %s is not used", ctx.address)
    if ctx.seeds:
        notes.append(f"Figures show the day of seed {ctx.seeds[0]}.")
    return StudyOutput(rows=rows, claims=claims(rows), figures=figs, notes=notes)
