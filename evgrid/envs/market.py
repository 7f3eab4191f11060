"""Market side of the simulator: tariffs, operators' dynamic zone prices, price-elastic EV demand, operating cost.

Pure numpy, no agent API.  Every function is vectorised and broadcasts elementwise, so arrays may carry any
leading axes (environments ``E``, zones ``Z``); nothing loops over EVs.

Models follow seed 003 (Ji et al., *Int. J. Renewable Energy Development*, 2025), "the paper" below:

* **Operating cost** of the distribution network, eq. (1): external purchase + diesel generation + stepped
  carbon cost + PV/wind curtailment.
* **Stepped carbon cost**, eqs. (2)-(5), on the emission *excess* over the free quota, accumulated over an
  accounting period (an episode here).  Rewards are per step, so :func:`incremental_carbon_cost` charges each
  step the change of the cumulative cost; the increments telescope to the period's cost.
* **Price elasticity** of EV charging demand, eqs. (25), (26), (35): ``dQ/Q = E dP/P`` over the peak,
  off-peak and valley periods.

Sign conventions, stated once:

* ``purchase_kwh`` is energy bought from the upstream grid, positive; negative is export, paid at the same
  purchase tariff (a revenue, negative cost), and carries no emissions.
* Costs are positive; revenues are negative costs (carbon quota sold, energy exported).
* Emission excess = actual emissions - free quota, in tonnes; negative means quota to spare.

Currency: the paper's yuan.  Its carbon, diesel and curtailment figures are in yuan, and the synthetic TOU
tariffs of :mod:`evgrid.grid.profiles` (retail peak 1.0 per kWh) are plausible yuan prices, so one currency unit
is read as one yuan throughout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np
import numpy.typing as npt

from evgrid.validate import as_array, check_choice, check_int, check_real, check_reals
from evgrid.grid.profiles import OFFPEAK, PEAK, VALLEY, TouTariff

log = logging.getLogger(__name__)

N_PERIOD = 3
TOU_BASES = ("clock", "base_load")
PERIOD_NAMES = {VALLEY: "valley", OFFPEAK: "off-peak", PEAK: "peak"}

# The paper orders the rows and columns of its elasticity matrix (peak, off-peak, valley); our period codes are
# VALLEY, OFFPEAK, PEAK.  Entry k of this tuple is the period code of the paper's row/column k.
PAPER_PERIOD_ORDER: tuple[int, int, int] = (PEAK, OFFPEAK, VALLEY)

# Seed 003 eq. (35), rows and columns in the paper's order (peak, off-peak, valley): row i is the relative demand
# change of period i, column j the relative price change of period j.
SEED003_ELASTICITY: tuple[tuple[float, float, float], ...] = (
    (-0.21, 0.04, 0.07),
    (0.02, -0.16, 0.06),
    (0.01, 0.01, -0.11),
)

# Box actions arrive as float32: a bound rounded to float32 may lie this far (relative) outside the range.
_MULT_RTOL = 1e-6

FloatArray = npt.NDArray[np.float64]


def _purchase_tariff_default() -> TouTariff:
    return TouTariff(peak_price_per_kwh=0.6, offpeak_price_per_kwh=0.4, valley_price_per_kwh=0.2)


# ---------------------------------------------------------------------------------------------------------------
# carbon


@dataclass(frozen=True)
class CarbonConfig:
    """Stepped carbon trading (seed 003 eqs. (2)-(5) and its case-study parameters).

    Emissions: diesel output at ``diesel_kg_per_kwh`` (eq. (2), (5)) plus the thermal share of purchased energy at
    ``thermal_kg_per_kwh``.  Eq. (5) names only the diesel units, but the case study gives the thermal share of
    external purchases (47.6 %), which matters only if purchases carry their upstream emissions; we count them.

    Free quota, eq. (3): ``quota_kg_per_kwh`` times the energy *generated inside the feeder* (diesel output plus
    PV and wind output actually delivered), not the load and not the purchases.  That is our reading of eq. (3),
    which sums the generators' output, PV and wind; curtailed PV/wind is not generated and earns no quota.
    """

    base_price_per_t: float = 200.0
    """c, price of quota bought for the first excess interval, currency per tonne CO2 (paper: 200 yuan/t), 0..1e6."""
    sell_price_per_t: float = 200.0
    """s, price received for unused quota (excess < 0), currency per tonne CO2, 0..base_price_per_t.  Ours: the
    paper gives none; equal to the base price makes the cost linear across the quota."""
    step_t: float = 50.0
    """d, length of each priced excess interval, tonnes CO2 (paper: 50 t), > 0."""
    growth: float = 0.25
    """k, price growth per interval: interval i (0-based) costs ``(1 + i k) c`` per tonne (paper: 25 %), 0..10."""
    n_tiers: int = 3
    """Priced intervals above the quota, the last one open-ended (paper eq. (4): 3), 1..50."""
    quota_kg_per_kwh: float = 0.7
    """Free quota per kWh generated inside the feeder (diesel + PV + wind), kg CO2/kWh (paper: 0.7), 0..5."""
    thermal_share: float = 0.476
    """Share of purchased energy generated by thermal plants (paper: 47.6 %), 0..1."""
    thermal_kg_per_kwh: float = 0.9
    """Emission factor of thermal (coal-fired) generation, kg CO2/kWh, 0..5.  Ours: Chinese coal-fired units emit
    about 0.85-0.95 kg/kWh."""
    diesel_kg_per_kwh: float = 0.8
    """Emission factor of the diesel units, kg CO2/kWh, 0..5.  Ours: diesel fuel emits about 2.68 kg CO2 per litre
    and a small genset near full load makes about 3.3 kWh per litre."""

    def __post_init__(self) -> None:
        check_real("base_price_per_t", self.base_price_per_t, 0.0, 1e6)
        # a sell price above the buy price would make buying quota and selling it back a profit (and the cost
        # non-convex in the excess)
        check_real("sell_price_per_t", self.sell_price_per_t, 0.0, float(self.base_price_per_t))
        check_real("step_t", self.step_t, 0.0, 1e9, lo_open=True)
        check_real("growth", self.growth, 0.0, 10.0)
        check_int("n_tiers", self.n_tiers, 1, 50)
        for name in ("quota_kg_per_kwh", "thermal_kg_per_kwh", "diesel_kg_per_kwh"):
            check_real(name, getattr(self, name), 0.0, 5.0)
        check_real("thermal_share", self.thermal_share, 0.0, 1.0)

    def tier_prices_per_t(self) -> FloatArray:  # (n_tiers,)
        """Price of each excess interval, currency per tonne: ``c (1 + i k)``, i = 0 .. n_tiers - 1."""
        return self.base_price_per_t * (1.0 + self.growth * np.arange(self.n_tiers, dtype=np.float64))

    def cost_lines(self) -> tuple[tuple[float, float], ...]:
        """The stepped cost as the maximum of lines ``slope * excess_t + intercept`` (currency per tonne, currency):
        the sell line below the quota, then one per priced interval.  Exact because the cost is convex (the sell
        price is at most the first interval's), which lets an optimiser price it with linear rows."""
        prices = self.tier_prices_per_t()
        start = self.step_t * np.arange(self.n_tiers)
        # cost reached at each interval's start
        at_start = np.concatenate([[0.0], np.cumsum(prices[:-1] * self.step_t)])
        return ((float(self.sell_price_per_t), 0.0),
                *((float(p), float(c - p * x)) for p, c, x in zip(prices, at_start, start)))


def _finite(name: str, value: npt.ArrayLike) -> FloatArray:
    return as_array(name, value)


def _nonneg(name: str, value: npt.ArrayLike) -> FloatArray:
    return as_array(name, value, lo=0.0)


def stepped_carbon_cost(excess_t: npt.ArrayLike, cfg: CarbonConfig) -> FloatArray:  # same shape as excess_t
    """Carbon trading cost of an accounting period's emission excess (actual - quota, tonnes), currency.

    Seed 003 eq. (4): below the quota (excess < 0) the unused quota is sold at ``s``, a revenue (negative cost);
    above it interval i of length ``d`` is bought at ``(1 + i k) c`` per tonne, the last interval open-ended.
    The paper's last branch writes ``(M - M_cq - d_c)`` where continuity needs ``(M - M_cq - 2 d_c)``; we use the
    continuous form.  The cost is continuous, non-decreasing and convex in the excess.
    """
    return _stepped_cost(_finite("excess_t", excess_t), cfg)


def _stepped_cost(x: FloatArray, cfg: CarbonConfig) -> FloatArray:
    """:func:`stepped_carbon_cost` of a checked array (the per-step cost checks its inputs once)."""
    tier = np.arange(cfg.n_tiers, dtype=np.float64)
    start_t = tier * cfg.step_t  # (n_tiers,)
    width_t = np.full(cfg.n_tiers, cfg.step_t)
    width_t[-1] = np.inf
    in_tier_t = np.clip(x[..., None] - start_t, 0.0, width_t)  # (..., n_tiers)
    return cfg.sell_price_per_t * np.minimum(x, 0.0) + in_tier_t @ cfg.tier_prices_per_t()


def incremental_carbon_cost(cum_excess_before_t: npt.ArrayLike, step_excess_t: npt.ArrayLike,
                            cfg: CarbonConfig) -> FloatArray:  # broadcast shape
    """Carbon cost of one step: ``cost(before + step) - cost(before)``, currency.

    ``cum_excess_before_t`` is the excess accumulated since the accounting period began (tonnes), ``step_excess_t``
    this step's excess.  Summed over the period the increments give ``stepped_carbon_cost`` of the period's total
    excess (they telescope), so per-step rewards add up to the paper's cost.  The caller keeps
    ``cum_excess_before_t + step_excess_t`` as the next step's ``cum_excess_before_t`` and zeroes it at reset.
    """
    before_t = _finite("cum_excess_before_t", cum_excess_before_t)
    step_t = _finite("step_excess_t", step_excess_t)
    return _stepped_cost(before_t + step_t, cfg) - _stepped_cost(before_t, cfg)


def carbon_emissions_kg(purchase_kwh: npt.ArrayLike, diesel_kwh: npt.ArrayLike,
                        cfg: CarbonConfig) -> FloatArray:  # broadcast shape
    """CO2 emitted for ``purchase_kwh`` bought (thermal share of it) and ``diesel_kwh`` generated, kg.

    Exports (``purchase_kwh < 0``) earn no negative emissions: the energy they displace upstream is unknown.
    """
    return _emissions_kg(_finite("purchase_kwh", purchase_kwh), _nonneg("diesel_kwh", diesel_kwh), cfg)


def _emissions_kg(purchase_kwh: FloatArray, diesel_kwh: FloatArray, cfg: CarbonConfig) -> FloatArray:
    return (cfg.thermal_share * cfg.thermal_kg_per_kwh * np.maximum(purchase_kwh, 0.0)
            + cfg.diesel_kg_per_kwh * diesel_kwh)


def carbon_quota_kg(diesel_kwh: npt.ArrayLike, renewable_kwh: npt.ArrayLike,
                    cfg: CarbonConfig) -> FloatArray:  # broadcast shape
    """Free carbon quota earned by energy generated inside the feeder, kg (seed 003 eq. (3), baseline method).

    ``diesel_kwh`` is the diesel units' output, ``renewable_kwh`` the PV and wind output delivered (curtailed
    energy excluded).  Purchased energy earns no quota.
    """
    return _quota_kg(_nonneg("diesel_kwh", diesel_kwh), _nonneg("renewable_kwh", renewable_kwh), cfg)


def _quota_kg(diesel_kwh: FloatArray, renewable_kwh: FloatArray | float, cfg: CarbonConfig) -> FloatArray:
    return cfg.quota_kg_per_kwh * (diesel_kwh + renewable_kwh)


# ---------------------------------------------------------------------------------------------------------------
# market configuration


def _tupled(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_tupled(v) for v in value)
    return value


def _nested(name: str, value: Any, cls: type) -> Any:
    """A nested config given as a mapping (hand-written YAML) becomes ``cls``; errors keep the dotted name."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return cls(**value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}.{exc}") from exc
    raise ValueError(f"{name}: expected a {cls.__name__} or a mapping of its fields, got {value!r}")


def tariff_by_period(tariff: TouTariff) -> FloatArray:  # (3,) price_per_kwh, indexed by period code
    """The tariff's prices as an array indexed by period code (VALLEY, OFFPEAK, PEAK), currency per kWh."""
    out = np.empty(N_PERIOD, dtype=np.float64)
    out[VALLEY] = tariff.valley_price_per_kwh
    out[OFFPEAK] = tariff.offpeak_price_per_kwh
    out[PEAK] = tariff.peak_price_per_kwh
    return out


def paper_to_period_order(matrix_paper: npt.ArrayLike) -> FloatArray:  # (3, 3)
    """Reorder a 3x3 matrix from the paper's (peak, off-peak, valley) rows/columns to our period codes."""
    m = np.asarray(matrix_paper, dtype=np.float64)
    order = np.asarray(PAPER_PERIOD_ORDER)
    out = np.empty((N_PERIOD, N_PERIOD), dtype=np.float64)
    out[np.ix_(order, order)] = m  # out[order[a], order[b]] = m[a, b]
    return out


@dataclass(frozen=True)
class MarketConfig:
    """Prices and costs of the market: retail and purchase tariffs, operators' price range, elasticity, costs.

    Operators (zone aggregators) set a price multiplier per zone on the retail TOU tariff; EV demand responds
    through the elasticity matrix.  The distribution network's operating cost is seed 003's eq. (1).
    """

    tariff: TouTariff = field(default_factory=TouTariff)
    """Retail TOU tariff for EV charging (before the operators' multiplier), currency per kWh."""
    purchase_tariff: TouTariff = field(default_factory=_purchase_tariff_default)
    """Price at which operators buy from the upstream grid, currency per kWh.  Ours: 0.6 / 0.4 / 0.2 peak /
    off-peak / valley with the retail tariff's hours, below retail so charging EVs earns a margin."""
    v2g_price_ratio: float = 1.0
    """V2G energy is paid at the zone's retail price of the step times this, 0..10 (ours)."""
    price_multiplier_min: float = 0.5
    """Lowest multiplier on the retail price an operator may set, (0, 1] (paper: the elastic price floats at most
    50 %)."""
    price_multiplier_max: float = 1.5
    """Highest multiplier on the retail price an operator may set, [1, 10] (paper: 50 %)."""
    price_levels: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    """Multipliers of the discrete operator action, strictly increasing, each in [min, max]."""
    elasticity: tuple[tuple[float, float, float], ...] = SEED003_ELASTICITY
    """Price elasticity matrix, rows and columns in the **paper's** order (peak, off-peak, valley): entry
    (i, j) is the relative demand change in period i per relative price change in period j (paper eq. (35)).
    Diagonal <= 0.  Use :attr:`elasticity_by_period` for the matrix indexed by our period codes."""
    elasticity_scale: float = 1.0
    """Factor on the elasticity matrix, 0..1.  The paper's eq. (25) carries a 1/T; we read the fitted matrix of
    eq. (35) as the full response (1.0); 1/3 follows eq. (25) literally with its three periods."""
    diesel_a_per_kw2h: float = 1e-4
    """Quadratic diesel cost coefficient a in ``a P^2 + b P + c`` per hour while running, currency/(kW^2 h), >= 0."""
    diesel_b_per_kwh: float = 0.6
    """Linear diesel cost coefficient b, currency/kWh, >= 0."""
    diesel_c_per_h: float = 13.025
    """No-load diesel cost c while running (P > 0), currency/h, >= 0.  Ours: a, b, c give 137.025 per hour at
    200 kW, i.e. the paper's 3,288.6 per day for its 200 kW unit at full output all day."""
    curtailment_cost_per_kwh: float = 0.1
    """Penalty on curtailed PV/wind energy, currency/kWh (paper: 0.1 yuan/kWh), 0..1e3."""
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    """Stepped carbon trading."""
    tou_basis: str = "clock"
    """What sets each zone's retail tariff periods: ``clock`` (the tariff's hours, the same everywhere) or
    ``base_load`` (seed 002: each zone's own base load, :func:`load_ranked_periods`)."""

    def __post_init__(self) -> None:
        for name, cls in (("tariff", TouTariff), ("purchase_tariff", TouTariff), ("carbon", CarbonConfig)):
            object.__setattr__(self, name, _nested(name, getattr(self, name), cls))
        check_real("v2g_price_ratio", self.v2g_price_ratio, 0.0, 10.0)
        lo = check_real("price_multiplier_min", self.price_multiplier_min, 0.0, 1.0, lo_open=True)
        hi = check_real("price_multiplier_max", self.price_multiplier_max, 1.0, 10.0)
        self._check_levels(lo, hi)
        self._check_elasticity(lo, hi)
        for name in ("diesel_a_per_kw2h", "diesel_b_per_kwh", "diesel_c_per_h"):
            check_real(name, getattr(self, name), 0.0, 1e6)
        check_real("curtailment_cost_per_kwh", self.curtailment_cost_per_kwh, 0.0, 1e3)
        check_choice("tou_basis", self.tou_basis, TOU_BASES)
        # derived arrays, read-only; not fields, so equality, hashing and to_dict see only the config
        for name, arr in (("_retail_by_period", tariff_by_period(self.tariff)),
                          ("_purchase_by_period", tariff_by_period(self.purchase_tariff)),
                          ("_elasticity_by_period",
                           self.elasticity_scale * paper_to_period_order(self.elasticity)),
                          ("_levels", np.asarray(self.price_levels, dtype=np.float64))):
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)

    def _check_levels(self, lo: float, hi: float) -> None:
        levels = check_reals("price_levels", _tupled(self.price_levels), lo, hi, min_len=1, increasing=True)
        object.__setattr__(self, "price_levels", levels)

    def _check_elasticity(self, lo: float, hi: float) -> None:
        rows = _tupled(self.elasticity)
        expected = "elasticity: expected a 3x3 matrix of finite numbers (rows/columns peak, off-peak, valley)"
        if not isinstance(rows, tuple) or len(rows) != N_PERIOD or any(
                not isinstance(r, tuple) or len(r) != N_PERIOD for r in rows) or any(
                isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v))
                for r in rows for v in r):
            raise ValueError(f"{expected}, got {self.elasticity!r}")
        rows = tuple(tuple(float(v) for v in r) for r in rows)
        m = np.asarray(rows)
        if np.any(np.diag(m) > 0.0):
            raise ValueError(f"elasticity: expected self-elasticities (diagonal) <= 0, demand falls as its own "
                             f"price rises; got diagonal {np.diag(m).tolist()}")
        scale = check_real("elasticity_scale", self.elasticity_scale, 0.0, 1.0)
        # demand factor 1 + scale * E r is linear in r = multiplier - 1, so its minimum over the allowed box of
        # multipliers takes each entry at whichever end makes E_ij r_j smallest
        worst = 1.0 + scale * np.minimum(m * (lo - 1.0), m * (hi - 1.0)).sum(axis=1)  # (3,)
        if np.any(worst < 0.0):
            raise ValueError(f"elasticity: demand factor would fall below 0 for multipliers in [{lo}, {hi}] "
                             f"(minimum per row, paper order: {worst.tolist()}); reduce the elasticities, "
                             f"elasticity_scale or the multiplier range")
        object.__setattr__(self, "elasticity", rows)

    @property
    def elasticity_by_period(self) -> FloatArray:  # (3, 3) read-only
        """Scaled elasticity matrix indexed by our period codes: ``[i, j]`` = dQ_i/Q_i per dP_j/P_j."""
        return self._elasticity_by_period  # type: ignore[attr-defined, no-any-return]

    @property
    def retail_by_period(self) -> FloatArray:  # (3,) read-only
        """Base retail price per period code, currency per kWh."""
        return self._retail_by_period  # type: ignore[attr-defined, no-any-return]

    @property
    def purchase_by_period(self) -> FloatArray:  # (3,) read-only
        """Purchase price per period code, currency per kWh."""
        return self._purchase_by_period  # type: ignore[attr-defined, no-any-return]


# ---------------------------------------------------------------------------------------------------------------
# prices and demand response


def _period(period: npt.ArrayLike) -> npt.NDArray[np.intp]:
    p = np.asarray(period)
    if p.dtype == np.bool_ or not np.issubdtype(p.dtype, np.integer) or np.any((p < 0) | (p >= N_PERIOD)):
        raise ValueError(f"period: expected integer period codes {VALLEY} (valley), {OFFPEAK} (off-peak), "
                         f"{PEAK} (peak), got {period!r}")
    return p.astype(np.intp, copy=False)


def check_multiplier(multiplier: npt.ArrayLike, cfg: MarketConfig) -> FloatArray:
    """``multiplier`` as a float array within [price_multiplier_min, price_multiplier_max], else ValueError.

    Values within a relative 1e-6 of a bound (float32 rounding of a Box action) are set to the bound; anything
    further out is an error, never clipped.
    """
    lo, hi = cfg.price_multiplier_min, cfg.price_multiplier_max
    m = np.asarray(multiplier, dtype=np.float64)
    bad = ~np.isfinite(m) | (m < lo * (1.0 - _MULT_RTOL)) | (m > hi * (1.0 + _MULT_RTOL))
    if np.any(bad):
        raise ValueError(f"multiplier: expected finite values in [{lo}, {hi}], got {m[bad][:5].tolist()} "
                         f"({int(bad.sum())} of {m.size} outside)")
    return np.clip(m, lo, hi)


def load_ranked_periods(base_kw: npt.ArrayLike, clock_period: npt.ArrayLike) -> npt.NDArray[np.int8]:
    """Tariff periods from each zone's own base load (seed 002: "according to the basic load of the
    distribution network, the time-of-use price is formulated"), shape of ``base_kw`` ``(..., T, Z)``.

    Ours, the paper gives no rule: each zone's highest-load steps are peak and its lowest-load steps valley,
    as many of each as the clock tariff ``clock_period`` ``(T,)`` has, so every zone keeps the tariff's
    share of peak, off-peak and valley hours; ties go to the earlier step.
    """
    load = _finite("base_kw", base_kw)
    clock = _period(clock_period)
    if load.ndim < 2 or clock.shape != (load.shape[-2],):
        raise ValueError(f"clock_period: expected shape ({load.shape[-2] if load.ndim >= 2 else 'T'},), one "
                         f"period per step of base_kw (..., T, Z), got {clock.shape}")
    n_step = load.shape[-2]
    rank = np.argsort(np.argsort(load, axis=-2, kind="stable"), axis=-2, kind="stable")  # 0: lowest load
    out = np.full(load.shape, OFFPEAK, dtype=np.int8)
    out[rank < np.count_nonzero(clock == VALLEY)] = VALLEY
    out[rank >= n_step - np.count_nonzero(clock == PEAK)] = PEAK
    return out


def retail_price_per_kwh(period: npt.ArrayLike, cfg: MarketConfig) -> FloatArray:  # shape of period
    """Base retail price (multiplier 1) of each period code, currency per kWh."""
    return cfg.retail_by_period[_period(period)]


def purchase_price_per_kwh(period: npt.ArrayLike, cfg: MarketConfig) -> FloatArray:  # shape of period
    """Upstream purchase price of each period code, currency per kWh."""
    return cfg.purchase_by_period[_period(period)]


def level_to_multiplier(level_idx: npt.ArrayLike, cfg: MarketConfig) -> FloatArray:  # shape of level_idx
    """Multiplier of each discrete price level index (0 .. len(price_levels) - 1)."""
    idx = np.asarray(level_idx)
    n = len(cfg.price_levels)
    if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer) or np.any((idx < 0) | (idx >= n)):
        raise ValueError(f"level_idx: expected integer level indices in [0, {n - 1}], got {level_idx!r}")
    return cfg._levels[idx]  # type: ignore[attr-defined, no-any-return]


def elastic_demand_factor(multiplier: npt.ArrayLike, cfg: MarketConfig) -> FloatArray:  # (..., 3)
    """Relative charging demand of each period given the price multiplier of each period, ``(..., 3)``.

    ``multiplier[..., j]`` is the price of period code j over its base TOU price (period codes VALLEY, OFFPEAK,
    PEAK index the last axis).  Returns ``1 + E @ (multiplier - 1)`` per row (paper eq. (25): dQ/Q = E dP/P, with
    ``E`` = :attr:`MarketConfig.elasticity_by_period`); multiply a period's base demand by it.  Multipliers must
    lie in the configured range, where the config guarantees a factor >= 0.
    """
    m = check_multiplier(multiplier, cfg)
    if m.ndim == 0 or m.shape[-1] != N_PERIOD:
        raise ValueError(f"multiplier: expected a last axis of {N_PERIOD} periods, got shape {m.shape}")
    return 1.0 + (m - 1.0) @ cfg.elasticity_by_period.T


def elastic_demand_factor_now(multiplier: npt.ArrayLike, period: npt.ArrayLike,
                              cfg: MarketConfig) -> FloatArray:  # broadcast shape
    """Relative charging demand in the current period when its price carries ``multiplier``.

    For a per-step simulator: an operator's multiplier prices the current step; the other periods are taken at
    their base price, so only the self-elasticity acts, ``1 + E[p, p] (multiplier - 1)``.  The cross terms of
    :func:`elastic_demand_factor` describe demand moved to other periods; a fleet that carries unmet energy
    forward in its SOC already moves it, and adding them would count it twice.  ``multiplier`` and ``period``
    (codes) broadcast, e.g. ``(E, Z)`` with ``(E, 1)`` or a scalar period.
    """
    m = check_multiplier(multiplier, cfg)
    self_e = np.diagonal(cfg.elasticity_by_period)[_period(period)]
    return 1.0 + self_e * (m - 1.0)


class ZonePrices:
    """Operators' price multipliers per environment and zone, announced one step ahead.

    ``announce`` sets the multiplier for the next step, ``advance`` (at the end of a step) puts it into effect;
    it then stays in effect, and stays announced, until another announcement.  ``reset`` puts every multiplier
    back to 1 (the plain TOU tariff).  All arrays are ``(E, Z)``.
    """

    def __init__(self, n_env: int, n_zone: int, cfg: MarketConfig) -> None:
        self.n_env = check_int("n_env", n_env, 1)
        self.n_zone = check_int("n_zone", n_zone, 1)
        if not isinstance(cfg, MarketConfig):
            raise TypeError(f"cfg: expected a MarketConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self._current = np.ones((self.n_env, self.n_zone))  # (E, Z)
        self._next = np.ones((self.n_env, self.n_zone))  # (E, Z)

    def reset(self, env: npt.ArrayLike | None = None) -> None:
        """All multipliers back to 1; ``env`` (indices or a boolean mask over E) resets only those environments."""
        sel: Any = slice(None) if env is None else np.asarray(env)
        self._current[sel] = 1.0
        self._next[sel] = 1.0

    def announce(self, multiplier: npt.ArrayLike) -> None:
        """Set the multiplier that takes effect at the next ``advance``; broadcastable to ``(E, Z)``."""
        m = check_multiplier(multiplier, self.cfg)
        try:
            self._next[...] = np.broadcast_to(m, self._next.shape)
        except ValueError:
            raise ValueError(f"multiplier: expected a shape broadcastable to (E, Z) = {self._next.shape}, "
                             f"got {m.shape}") from None

    def announce_levels(self, level_idx: npt.ArrayLike) -> None:
        """Announce the multipliers of discrete price levels, ``(E, Z)`` indices."""
        self.announce(level_to_multiplier(level_idx, self.cfg))

    def advance(self) -> None:
        """Put the announced multipliers into effect (call once at the end of every step)."""
        self._current[...] = self._next

    @property
    def current(self) -> FloatArray:  # (E, Z) read-only view
        """Multipliers in effect this step."""
        v = self._current.view()
        v.flags.writeable = False
        return v

    @property
    def next(self) -> FloatArray:  # (E, Z) read-only view
        """Multipliers announced for the next step."""
        v = self._next.view()
        v.flags.writeable = False
        return v

    def level_to_multiplier(self, level_idx: npt.ArrayLike) -> FloatArray:
        """See :func:`level_to_multiplier`."""
        return level_to_multiplier(level_idx, self.cfg)

    def _by_env(self, period: npt.ArrayLike) -> npt.NDArray[np.intp]:  # (), (E, 1) or (E, Z)
        p = _period(period)
        if p.ndim == 0 or p.shape == (self.n_env, self.n_zone):
            return p
        if p.shape != (self.n_env,):
            raise ValueError(f"period: expected a scalar, shape (E,) = ({self.n_env},) or (E, Z) = ({self.n_env}, "
                             f"{self.n_zone}), got shape {p.shape}")
        return p[:, None]

    def price_per_kwh(self, period: npt.ArrayLike) -> FloatArray:  # (E, Z)
        """Retail price per zone in effect this step: base tariff of ``period`` (scalar, (E,) or (E, Z)) x
        multiplier."""
        return self.cfg.retail_by_period[self._by_env(period)] * self._current

    def v2g_price_per_kwh(self, period: npt.ArrayLike) -> FloatArray:  # (E, Z)
        """Price paid for V2G energy per zone this step: retail price x ``v2g_price_ratio``."""
        return self.price_per_kwh(period) * self.cfg.v2g_price_ratio

    def demand_factor(self, period: npt.ArrayLike) -> FloatArray:  # (E, Z)
        """Relative EV demand per zone this step, :func:`elastic_demand_factor_now` of the current multipliers."""
        return elastic_demand_factor_now(self._current, self._by_env(period), self.cfg)


# ---------------------------------------------------------------------------------------------------------------
# operating cost


def diesel_cost(diesel_kw: npt.ArrayLike, dt_h: float, cfg: MarketConfig) -> FloatArray:  # shape of diesel_kw
    """Diesel generation cost over a step, currency: ``(a P^2 + b P + c) dt`` while running (P > 0), else 0.

    There is no unit commitment state: zero output means the unit is off and pays no no-load cost.
    """
    return _diesel_cost(_nonneg("diesel_kw", diesel_kw), dt_h, cfg)


def _diesel_cost(p_kw: FloatArray, dt_h: float, cfg: MarketConfig) -> FloatArray:
    per_h = np.where(p_kw > 0.0, (cfg.diesel_a_per_kw2h * p_kw + cfg.diesel_b_per_kwh) * p_kw + cfg.diesel_c_per_h,
                     0.0)
    return per_h * dt_h


@dataclass(frozen=True, slots=True, eq=False)
class OperatingCost:
    """One step of seed 003's operating cost, eq. (1), per carbon account; every field has the accounts' shape."""

    purchase_cost: FloatArray
    """Energy bought upstream at the purchase tariff (export: a revenue, negative), currency."""
    diesel_cost: FloatArray
    """Diesel generation, currency."""
    carbon_cost: FloatArray
    """The step's increment of the stepped carbon cost, currency."""
    curtailment_cost: FloatArray
    """PV / wind energy curtailed, at ``curtailment_cost_per_kwh``, currency."""
    total: FloatArray
    """The sum of the four, currency."""
    emission_kg: FloatArray
    """CO2 emitted this step, kg."""
    quota_kg: FloatArray
    """Free quota earned this step, kg."""
    excess_t: FloatArray
    """This step's emission excess over the quota, tonnes."""
    cum_excess_t: FloatArray
    """Excess accumulated since the accounting period began, tonnes (pass it back next step)."""


def operating_cost(*, purchase_kwh: npt.ArrayLike, diesel_kw: npt.ArrayLike, curtailed_kwh: npt.ArrayLike,
                   dt_h: float, cum_excess_t: npt.ArrayLike, cfg: MarketConfig, period: npt.ArrayLike,
                   renewable_kwh: npt.ArrayLike | None = None) -> OperatingCost:
    """One step of seed 003's operating cost, eq. (1), per carbon account (environment, or environment and zone).

    Arguments broadcast elementwise, e.g. all ``(E,)`` or all ``(E, Z)`` (``period`` scalar, ``(E,)`` with
    ``(E,)`` arrays, or ``(E, 1)`` with ``(E, Z)`` arrays):

    * ``purchase_kwh``: energy bought upstream this step, kWh; negative is export, paid at the purchase tariff.
    * ``diesel_kw``: diesel output, kW, >= 0, held for the step.
    * ``curtailed_kwh``: PV/wind energy curtailed this step, kWh, >= 0.
    * ``renewable_kwh``: PV/wind energy delivered this step, kWh, >= 0; it earns carbon quota (eq. (3)).
      None: no renewables.
    * ``cum_excess_t``: emission excess accumulated since the accounting period began, tonnes (zero at reset).
    * ``period``: period codes of the step; ``dt_h``: step length, hours.

    The stepped cost is not additive across accounts: zone accounts cost more than one feeder account.
    """
    # each input checked once here; the pieces below are the public functions' unchecked cores
    dt_h = check_real("dt_h", dt_h, 0.0, 24.0 * 366, lo_open=True)
    purchase_kwh = _finite("purchase_kwh", purchase_kwh)
    curtailed_kwh = _nonneg("curtailed_kwh", curtailed_kwh)
    renewable = 0.0 if renewable_kwh is None else _nonneg("renewable_kwh", renewable_kwh)
    cum_before_t = _finite("cum_excess_t", cum_excess_t)
    diesel_kw = _nonneg("diesel_kw", diesel_kw)
    c_diesel = _diesel_cost(diesel_kw, dt_h, cfg)
    diesel_kwh = diesel_kw * dt_h
    emission_kg = _emissions_kg(purchase_kwh, diesel_kwh, cfg.carbon)
    quota_kg = _quota_kg(diesel_kwh, renewable, cfg.carbon)
    excess_t = (emission_kg - quota_kg) / 1000.0
    c_purchase = purchase_price_per_kwh(period, cfg) * purchase_kwh
    c_carbon = _stepped_cost(cum_before_t + excess_t, cfg.carbon) - _stepped_cost(cum_before_t, cfg.carbon)
    c_curtail = cfg.curtailment_cost_per_kwh * curtailed_kwh
    total = c_purchase + c_diesel + c_carbon + c_curtail
    shape = total.shape
    parts = dict(purchase_cost=c_purchase, diesel_cost=c_diesel, carbon_cost=c_carbon, curtailment_cost=c_curtail,
                 total=total, emission_kg=emission_kg, quota_kg=quota_kg, excess_t=excess_t,
                 cum_excess_t=cum_before_t + excess_t)
    # every part is a fresh array (no input is returned as it is): only those of a smaller shape need a copy
    return OperatingCost(**{k: v if np.shape(v) == shape else np.broadcast_to(v, shape).astype(np.float64)
                            for k, v in parts.items()})


__all__ = [
    "N_PERIOD", "PAPER_PERIOD_ORDER", "PERIOD_NAMES", "SEED003_ELASTICITY", "CarbonConfig", "MarketConfig",
    "OperatingCost",
    "ZonePrices", "carbon_emissions_kg", "carbon_quota_kg", "check_multiplier", "diesel_cost",
    "elastic_demand_factor", "elastic_demand_factor_now", "incremental_carbon_cost", "level_to_multiplier",
    "load_ranked_periods", "operating_cost", "paper_to_period_order", "purchase_price_per_kwh", "retail_price_per_kwh",
    "stepped_carbon_cost", "tariff_by_period",
]
