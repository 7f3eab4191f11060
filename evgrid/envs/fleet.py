"""EV populations as arrays: session generators per study, and battery physics.

A *session* is one EV's stay: it requests (or arrives) at ``t_request_h``,
charges at a station, and leaves at ``t_depart_h``.  A population is a
:class:`Sessions` struct of arrays, one row per session; nothing here is a
per-EV object.  Times are hours after midnight of the simulated day (values
above 24 are the next morning).

Generators (``FleetConfig.scenario``), with the parameters of each study:

* ``daily_mix`` (seeds 000, 003; ours where the papers are silent): home,
  work and public charging, shares ``mix``.  Home: arrive N(18.5 h, 1.5 h),
  leave N(07:30 next day, 1 h); work: arrive N(08:30, 1 h), stay N(8.5 h, 1 h);
  public: arrive U(07:00, 22:00), stay U(0.5, 3) h.
* ``household_valley`` (seed 001): 50 kWh batteries, efficiency 90 %,
  target SOC 100 %, charger U(3.5, 7) kW, SOC0 N(0.4, 0.1), arrival
  N(19:00, 1.5 h) in [15:00, 23:30] (``household_arrival_h``), departure
  08:00 next morning.
* ``city_requests`` (seed 002): a charging request with a position in the
  city square and SOC0 U(0.1, 0.5), request times spread over 07:00-22:00,
  parking U(1, 4) h after arrival, target SOC 0.9 (ours); the station is
  chosen by routing when the request is made.

Seed 003's four user categories are derived from the tariff periods a stay
spans (:func:`user_category`).  Random draws that fall outside physical
ranges (a negative SOC from a normal distribution) are truncated by
redrawing into the range, which is part of the population model, not input
handling.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import numpy.typing as npt

from evgrid.config import check_choice, check_int, check_real
from evgrid.grid.profiles import PEAK, VALLEY, TouTariff

SCENARIOS = ("daily_mix", "household_valley", "city_requests")
KINDS = ("home", "work", "public", "household", "request")  # session kind codes, index = code

# seed 003's user categories: which priced periods the stay spans
CATEGORIES = ("offpeak_only", "valley", "peak", "peak_and_valley")


@dataclass(frozen=True)
class FleetConfig:
    """The EV population of one environment (one episode)."""

    scenario: str = "daily_mix"
    """Session generator: ``daily_mix`` (seeds 000/003), ``household_valley`` (seed 001), ``city_requests`` (seed 002)."""
    n_ev: int = 300
    """Sessions per episode and environment (the cap on EV agents), 1..10,000,000."""
    mix: tuple[float, float, float] = (0.5, 0.3, 0.2)
    """``daily_mix`` shares of home, work and public sessions; >= 0, summing to 1."""
    cap_kwh: tuple[float, float] = (40.0, 80.0)
    """Battery capacity range, kWh, drawn uniformly (``household_valley`` uses 50 kWh)."""
    p_charge_kw: tuple[float, float] = (7.0, 11.0)
    """Charger power range, kW, drawn uniformly (``household_valley``: 3.5-7 kW)."""
    discharge_ratio: float = 1.0
    """Discharge (V2G) power limit as a share of the charge limit, 0..1."""
    eta_charge: float = 0.9
    """Charging efficiency (grid kWh -> battery kWh), 0.5..1."""
    eta_discharge: float = 0.9
    """Discharging efficiency (battery kWh -> grid kWh), 0.5..1."""
    soc0_mean: float = 0.4
    """Mean SOC on arrival, 0..1 (``city_requests`` draws U(0.1, 0.5))."""
    soc0_std: float = 0.1
    """Standard deviation of the SOC on arrival, 0..0.5."""
    soc_target: float = 0.9
    """SOC the user wants at departure, 0..1 (``household_valley``: 1.0)."""
    v2g_share: float = 0.5
    """Share of EVs whose users allow discharge (V2G), 0..1."""
    v2g_soc_min: float = 0.3
    """No discharge below this SOC, 0..1."""
    uninterruptible: bool = False
    """Seed 001: once an EV starts charging it charges at full power until its target."""
    household_arrival_h: tuple[float, float, float, float] = (19.0, 1.5, 15.0, 23.5)
    """``household_valley`` arrival time, hours after midnight: (mean, standard deviation, earliest, latest) of a
    normal truncated to [earliest, latest] (seed 001 gives no numbers: N(19:00, 1.5 h) is ours); 0 <= earliest <=
    mean <= latest < 32 (the 08:00 departure)."""
    station_weights: tuple[float, ...] | None = None
    """Relative share of sessions per station when no routing assigns them (seed 001: 179, 225, 146); None = equal."""

    def __post_init__(self) -> None:
        check_choice("scenario", self.scenario, SCENARIOS)
        check_int("n_ev", self.n_ev, 1, 10_000_000)
        if len(self.mix) != 3 or any(check_real("mix", m, 0.0) < 0 for m in self.mix) or \
                not np.isclose(sum(self.mix), 1.0):
            raise ValueError(f"mix: expected three shares >= 0 summing to 1 (home, work, public), got {self.mix!r}")
        for name, lo in (("cap_kwh", 1.0), ("p_charge_kw", 0.1)):
            pair = getattr(self, name)
            if len(pair) != 2:
                raise ValueError(f"{name}: expected a (low, high) pair, got {pair!r}")
            a = check_real(name, pair[0], lo, 1e4)
            b = check_real(name, pair[1], lo, 1e4)
            if b < a:
                raise ValueError(f"{name}: expected low <= high, got {pair!r}")
        check_real("discharge_ratio", self.discharge_ratio, 0.0, 1.0)
        check_real("eta_charge", self.eta_charge, 0.5, 1.0)
        check_real("eta_discharge", self.eta_discharge, 0.5, 1.0)
        check_real("soc0_mean", self.soc0_mean, 0.0, 1.0)
        check_real("soc0_std", self.soc0_std, 0.0, 0.5)
        check_real("soc_target", self.soc_target, 0.0, 1.0)
        check_real("v2g_share", self.v2g_share, 0.0, 1.0)
        check_real("v2g_soc_min", self.v2g_soc_min, 0.0, 1.0)
        if not isinstance(self.uninterruptible, bool):
            raise ValueError(f"uninterruptible: expected true or false, got {self.uninterruptible!r}")
        arr = self.household_arrival_h
        if len(arr) != 4:
            raise ValueError(f"household_arrival_h: expected (mean, std, earliest, latest) hours, got {arr!r}")
        mean, std, lo, hi = (check_real("household_arrival_h", x, 0.0, 32.0, hi_open=True) for x in arr)
        if not lo <= mean <= hi or std > 12.0:
            raise ValueError(f"household_arrival_h: expected earliest <= mean <= latest in [0, 32) h and a standard "
                             f"deviation in [0, 12] h, got {arr!r}")
        if self.station_weights is not None:
            w = [check_real("station_weights", x, 0.0) for x in self.station_weights]
            if not w or sum(w) <= 0:
                raise ValueError(f"station_weights: expected shares >= 0 with a positive sum, got {self.station_weights!r}")


@dataclass
class Sessions:
    """One row per session.  Times in hours after midnight of the simulated day."""

    t_request_h: npt.NDArray[np.float64]  # (n,) arrival, or the charging request when routed
    stay_h: npt.NDArray[np.float64]  # (n,) planned time parked at the station
    t_depart_h: npt.NDArray[np.float64]  # (n,) fixed departure (NaN: request + travel + stay)
    cap_kwh: npt.NDArray[np.float64]  # (n,)
    soc0: npt.NDArray[np.float64]  # (n,) SOC at the request
    soc_target: npt.NDArray[np.float64]  # (n,)
    p_ch_max_kw: npt.NDArray[np.float64]  # (n,)
    p_dis_max_kw: npt.NDArray[np.float64]  # (n,)
    eta_ch: npt.NDArray[np.float64]  # (n,)
    eta_dis: npt.NDArray[np.float64]  # (n,)
    v2g: npt.NDArray[np.bool_]  # (n,)
    kind: npt.NDArray[np.int8]  # (n,) index into KINDS
    pos_km: npt.NDArray[np.float64]  # (n, 2) position at the request (routing)
    station: npt.NDArray[np.int64] = field(default=None)  # (n,) -1: chosen by routing

    @property
    def n(self) -> int:
        return int(self.cap_kwh.shape[0])

    def take(self, idx: npt.NDArray[np.int64]) -> Sessions:
        return Sessions(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def concat(parts: list[Sessions]) -> Sessions:
        return Sessions(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Sessions)})


def _truncnorm(rng: np.random.Generator, mean: float, std: float, lo: float, hi: float, n: int) -> np.ndarray:
    """Normal draws restricted to [lo, hi] by redrawing the ones outside (vectorised rounds)."""
    x = rng.normal(mean, std, n)
    for _ in range(64):
        bad = (x < lo) | (x > hi)
        if not bad.any():
            return x
        x[bad] = rng.normal(mean, std, int(bad.sum()))
    return np.clip(x, lo, hi)  # only reachable for a mean far outside [lo, hi]; documented truncation


def generate(cfg: FleetConfig, rng: np.random.Generator, *, n_station: int, area_km: float = 10.0) -> Sessions:
    """``cfg.n_ev`` sessions of ``cfg.scenario``, sorted by request time."""
    n = cfg.n_ev
    lo_c, hi_c = cfg.cap_kwh
    lo_p, hi_p = cfg.p_charge_kw
    soc_target = np.full(n, cfg.soc_target)
    t_depart = np.full(n, np.nan)
    pos = np.zeros((n, 2))
    if cfg.scenario == "household_valley":
        kind = np.full(n, KINDS.index("household"), dtype=np.int8)
        cap = np.full(n, 50.0)
        p_ch = rng.uniform(3.5, 7.0, n)
        soc0 = _truncnorm(rng, cfg.soc0_mean, cfg.soc0_std, 0.05, 0.95, n)
        t_req = _truncnorm(rng, *cfg.household_arrival_h, n)
        t_depart[:] = 32.0  # 08:00 next morning
        stay = t_depart - t_req
        soc_target[:] = 1.0
    elif cfg.scenario == "city_requests":
        kind = np.full(n, KINDS.index("request"), dtype=np.int8)
        cap = rng.uniform(lo_c, hi_c, n)
        p_ch = rng.uniform(lo_p, hi_p, n)
        soc0 = rng.uniform(0.1, 0.5, n)
        t_req = rng.uniform(7.0, 22.0, n)
        stay = rng.uniform(1.0, 4.0, n)
        pos = rng.uniform(0.0, area_km, (n, 2))
    else:
        kind = rng.choice(3, size=n, p=np.asarray(cfg.mix)).astype(np.int8)
        cap = rng.uniform(lo_c, hi_c, n)
        p_ch = rng.uniform(lo_p, hi_p, n)
        soc0 = _truncnorm(rng, cfg.soc0_mean, cfg.soc0_std, 0.05, 0.95, n)
        t_req = np.empty(n)
        stay = np.empty(n)
        home, work, pub = (kind == 0), (kind == 1), (kind == 2)
        t_req[home] = _truncnorm(rng, 18.5, 1.5, 14.0, 23.75, int(home.sum()))
        stay[home] = _truncnorm(rng, 31.5, 1.0, 29.0, 34.0, int(home.sum())) - t_req[home]
        t_req[work] = _truncnorm(rng, 8.5, 1.0, 6.0, 11.0, int(work.sum()))
        stay[work] = _truncnorm(rng, 8.5, 1.0, 6.0, 11.0, int(work.sum()))
        t_req[pub] = rng.uniform(7.0, 22.0, int(pub.sum()))
        stay[pub] = rng.uniform(0.5, 3.0, int(pub.sum()))
        t_depart = t_req + stay
    v2g = rng.random(n) < cfg.v2g_share
    if cfg.scenario == "city_requests":
        station = np.full(n, -1, dtype=np.int64)
    else:
        w = np.ones(n_station) if cfg.station_weights is None else np.asarray(cfg.station_weights, dtype=float)
        if w.shape[0] != n_station:
            raise ValueError(f"station_weights: expected {n_station} shares (one per station), got {w.shape[0]}")
        station = rng.choice(n_station, size=n, p=w / w.sum()).astype(np.int64)
    s = Sessions(t_request_h=t_req, stay_h=stay, t_depart_h=t_depart, cap_kwh=cap, soc0=soc0, soc_target=soc_target,
                 p_ch_max_kw=p_ch, p_dis_max_kw=p_ch * cfg.discharge_ratio, eta_ch=np.full(n, cfg.eta_charge),
                 eta_dis=np.full(n, cfg.eta_discharge), v2g=v2g, kind=kind, pos_km=pos, station=station)
    return s.take(np.argsort(t_req, kind="stable"))


def user_category(t_arrive_h: npt.NDArray[np.float64], t_depart_h: npt.NDArray[np.float64],
                  tariff: TouTariff) -> npt.NDArray[np.int8]:
    """Seed 003's four user categories (index into CATEGORIES) by the priced periods a stay spans."""
    period = tariff.period(dt_min=15, days=3)  # (288,) quarter hours, enough for stays into the next day
    start = np.clip(np.floor(t_arrive_h * 4).astype(np.int64), 0, period.shape[0] - 1)
    end = np.clip(np.ceil(t_depart_h * 4).astype(np.int64), 1, period.shape[0])
    cum_peak = np.concatenate([[0], np.cumsum(period == PEAK)])
    cum_valley = np.concatenate([[0], np.cumsum(period == VALLEY)])
    peak = cum_peak[end] - cum_peak[start] > 0
    valley = cum_valley[end] - cum_valley[start] > 0
    return (valley.astype(np.int8) + 2 * peak.astype(np.int8)).astype(np.int8)


def power_bounds(soc: npt.NDArray[np.float64], cap_kwh, p_ch_max_kw, p_dis_max_kw, eta_ch, eta_dis, v2g,
                 v2g_soc_min: float, dt_h: float) -> tuple[np.ndarray, np.ndarray]:
    """Largest charge and discharge power (kW, both >= 0) this step without leaving SOC [0, 1]
    or going below ``v2g_soc_min`` by discharging; discharge is 0 for non-V2G EVs."""
    p_ch = np.minimum(p_ch_max_kw, np.maximum(1.0 - soc, 0.0) * cap_kwh / (eta_ch * dt_h))
    p_dis = np.minimum(p_dis_max_kw, np.maximum(soc - v2g_soc_min, 0.0) * cap_kwh * eta_dis / dt_h)
    return p_ch, np.where(v2g, p_dis, 0.0)


def apply_power(soc, p_kw, cap_kwh, eta_ch, eta_dis, dt_h: float) -> npt.NDArray[np.float64]:
    """SOC after one step at grid-side power ``p_kw`` (charging positive, discharging negative)."""
    e_batt_kwh = np.where(p_kw >= 0.0, p_kw * eta_ch, p_kw / eta_dis) * dt_h
    return soc + e_batt_kwh / cap_kwh
