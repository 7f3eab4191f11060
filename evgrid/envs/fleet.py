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

import numba as nb
import numpy as np
import numpy.typing as npt

from evgrid.validate import check_bool, check_choice, check_int, check_ints, check_pair, check_real, check_reals
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
    cap_kwh: tuple[float, float] | None = None
    """Battery capacity range (low, high), kWh, 1..1e4, drawn uniformly (low = high: that capacity); None: the
    scenario's own, (40, 80), or 50 kWh for ``household_valley`` (seed 001)."""
    p_charge_kw: tuple[float, float] | None = None
    """Charger power range (low, high), kW, 0.1..1e4, drawn uniformly; None: the scenario's own, (7, 11), or
    (3.5, 7) for ``household_valley`` (seed 001)."""
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
    """Relative share of sessions per station when no routing assigns them, each session drawn independently;
    None = equal shares."""
    station_counts: tuple[int, ...] | None = None
    """Exact sessions per station when no routing assigns them (seed 001: 179, 225, 146), summing to ``n_ev``;
    which sessions go where is drawn at random.  Instead of ``station_weights``."""

    def __post_init__(self) -> None:
        check_choice("scenario", self.scenario, SCENARIOS)
        check_int("n_ev", self.n_ev, 1, 10_000_000)
        mix = check_reals("mix", self.mix, 0.0, 1.0, n=3)
        if not np.isclose(sum(mix), 1.0):
            raise ValueError(f"mix: expected three shares >= 0 summing to 1 (home, work, public), got {self.mix!r}")
        if self.cap_kwh is not None:
            check_pair("cap_kwh", self.cap_kwh, 1.0, 1e4)
        if self.p_charge_kw is not None:
            check_pair("p_charge_kw", self.p_charge_kw, 0.1, 1e4)
        check_real("discharge_ratio", self.discharge_ratio, 0.0, 1.0)
        check_real("eta_charge", self.eta_charge, 0.5, 1.0)
        check_real("eta_discharge", self.eta_discharge, 0.5, 1.0)
        check_real("soc0_mean", self.soc0_mean, 0.0, 1.0)
        check_real("soc0_std", self.soc0_std, 0.0, 0.5)
        check_real("soc_target", self.soc_target, 0.0, 1.0)
        check_real("v2g_share", self.v2g_share, 0.0, 1.0)
        check_real("v2g_soc_min", self.v2g_soc_min, 0.0, 1.0)
        check_bool("uninterruptible", self.uninterruptible)
        mean, std, lo, hi = check_reals("household_arrival_h", self.household_arrival_h, 0.0, 32.0, n=4)
        if not lo <= mean <= hi or hi >= 32.0 or std > 12.0:
            raise ValueError(f"household_arrival_h: expected (mean, standard deviation, earliest, latest) with "
                             f"earliest <= mean <= latest in [0, 32) h and a deviation in [0, 12] h, got "
                             f"{self.household_arrival_h!r}")
        if self.station_weights is not None:
            w = check_reals("station_weights", self.station_weights, 0.0, min_len=1)
            if sum(w) <= 0:
                raise ValueError(f"station_weights: expected shares >= 0 with a positive sum, got {w!r}")
        if self.station_counts is not None:
            if self.station_weights is not None:
                raise ValueError("station_counts: give station_counts or station_weights, not both")
            counts = check_ints("station_counts", self.station_counts, 0)
            if sum(counts) != self.n_ev:
                raise ValueError(f"station_counts: expected counts summing to n_ev = {self.n_ev}, got {counts!r} "
                                 f"(sum {sum(counts)})")

    def ranges(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(capacity kWh, charger kW) ranges the sessions are drawn from: the configured ones, else the
        scenario's own."""
        household = self.scenario == "household_valley"
        cap = self.cap_kwh if self.cap_kwh is not None else ((50.0, 50.0) if household else (40.0, 80.0))
        p = self.p_charge_kw if self.p_charge_kw is not None else ((3.5, 7.0) if household else (7.0, 11.0))
        return cap, p


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
    cap_range, p_range = cfg.ranges()
    soc_target = np.full(n, cfg.soc_target)
    t_depart = np.full(n, np.nan)
    pos = np.zeros((n, 2))
    if cfg.scenario == "household_valley":
        kind = np.full(n, KINDS.index("household"), dtype=np.int8)
        cap = _uniform(rng, cap_range, n)
        p_ch = _uniform(rng, p_range, n)
        soc0 = _truncnorm(rng, cfg.soc0_mean, cfg.soc0_std, 0.05, 0.95, n)
        t_req = _truncnorm(rng, *cfg.household_arrival_h, n)
        t_depart[:] = 32.0  # 08:00 next morning
        stay = t_depart - t_req
        soc_target[:] = 1.0
    elif cfg.scenario == "city_requests":
        kind = np.full(n, KINDS.index("request"), dtype=np.int8)
        cap = _uniform(rng, cap_range, n)
        p_ch = _uniform(rng, p_range, n)
        soc0 = rng.uniform(0.1, 0.5, n)
        t_req = rng.uniform(7.0, 22.0, n)
        stay = rng.uniform(1.0, 4.0, n)
        pos = rng.uniform(0.0, area_km, (n, 2))
    else:
        kind = rng.choice(3, size=n, p=np.asarray(cfg.mix)).astype(np.int8)
        cap = _uniform(rng, cap_range, n)
        p_ch = _uniform(rng, p_range, n)
        soc0 = _truncnorm(rng, cfg.soc0_mean, cfg.soc0_std, 0.05, 0.95, n)
        t_req, stay = _daily_mix_times(rng, kind)
        t_depart = t_req + stay
    v2g = rng.random(n) < cfg.v2g_share
    station = _stations(cfg, rng, n_station)
    s = Sessions(t_request_h=t_req, stay_h=stay, t_depart_h=t_depart, cap_kwh=cap, soc0=soc0, soc_target=soc_target,
                 p_ch_max_kw=p_ch, p_dis_max_kw=p_ch * cfg.discharge_ratio, eta_ch=np.full(n, cfg.eta_charge),
                 eta_dis=np.full(n, cfg.eta_discharge), v2g=v2g, kind=kind, pos_km=pos, station=station)
    return s.take(np.argsort(t_req, kind="stable"))


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float], n: int) -> npt.NDArray[np.float64]:
    """U(lo, hi) draws; a fixed value (lo = hi) draws nothing."""
    lo, hi = lo_hi
    return np.full(n, lo) if lo == hi else rng.uniform(lo, hi, n)


def _daily_mix_times(rng: np.random.Generator, kind: npt.NDArray[np.int8]) -> tuple[np.ndarray, np.ndarray]:
    """Request time and stay, hours, of home, work and public sessions."""
    n = kind.shape[0]
    t_req = np.empty(n)
    stay = np.empty(n)
    home, work, pub = (kind == 0), (kind == 1), (kind == 2)
    t_req[home] = _truncnorm(rng, 18.5, 1.5, 14.0, 23.75, int(home.sum()))
    stay[home] = _truncnorm(rng, 31.5, 1.0, 29.0, 34.0, int(home.sum())) - t_req[home]
    t_req[work] = _truncnorm(rng, 8.5, 1.0, 6.0, 11.0, int(work.sum()))
    stay[work] = _truncnorm(rng, 8.5, 1.0, 6.0, 11.0, int(work.sum()))
    t_req[pub] = rng.uniform(7.0, 22.0, int(pub.sum()))
    stay[pub] = rng.uniform(0.5, 3.0, int(pub.sum()))
    return t_req, stay


def _stations(cfg: FleetConfig, rng: np.random.Generator, n_station: int) -> npt.NDArray[np.int64]:
    """Each session's station: exact counts in a random order, independent draws by weight, or -1 (routed)."""
    n = cfg.n_ev
    if cfg.scenario == "city_requests":
        return np.full(n, -1, dtype=np.int64)
    if cfg.station_counts is not None:
        if len(cfg.station_counts) != n_station:
            raise ValueError(f"station_counts: expected {n_station} counts (one per station), got "
                             f"{len(cfg.station_counts)}")
        return rng.permutation(np.repeat(np.arange(n_station, dtype=np.int64), cfg.station_counts))
    w = np.ones(n_station) if cfg.station_weights is None else np.asarray(cfg.station_weights, dtype=float)
    if w.shape[0] != n_station:
        raise ValueError(f"station_weights: expected {n_station} shares (one per station), got {w.shape[0]}")
    return rng.choice(n_station, size=n, p=w / w.sum()).astype(np.int64)


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


# ---------------------------------------------------------------------------------------------------------------
# battery physics, written once
#
# Each formula is one plain function of scalars, compiled twice: ``nb_<name>`` inlined into the simulator's
# numba kernels, and ``<name>``, a numpy ufunc for array code and tests.  Both run the same operations in the
# same order, so they agree to the last bit and cannot drift apart.  Grid-side power ``p_kw`` > 0 charges.

def _charge_limit_kw(soc, cap_kwh, p_max_kw, eta_ch, dt_h):
    """Largest grid-side charging power this step (kW, >= 0) that keeps the SOC <= 1."""
    return min(p_max_kw, max(1.0 - soc, 0.0) * cap_kwh / (eta_ch * dt_h))


def _discharge_limit_kw(soc, cap_kwh, p_max_kw, eta_dis, v2g, soc_min, dt_h):
    """Largest grid-side discharging power this step (kW, >= 0) that keeps the SOC >= ``soc_min``; 0 when the
    user allows no V2G."""
    return min(p_max_kw, max(soc - soc_min, 0.0) * cap_kwh * eta_dis / dt_h) if v2g else 0.0


def _need_kwh(soc, soc_target, cap_kwh):
    """Battery energy still missing to the target, kWh (>= 0)."""
    return max(soc_target - soc, 0.0) * cap_kwh


def _battery_kwh(p_kw, eta_ch, eta_dis, dt_h):
    """Energy into the battery over a step at grid-side ``p_kw`` (negative: out of it), kWh."""
    return (p_kw * eta_ch if p_kw >= 0.0 else p_kw / eta_dis) * dt_h


def _charge_slots(need_kwh, p_max_kw, eta_ch, dt_h):
    """Seed 002's remaining charge slots: steps at full power still needed, rounded up (conservative)."""
    return np.ceil(max(need_kwh, 0.0) / max(p_max_kw * eta_ch * dt_h, 1e-12) - 1e-9)


def _compiled(fn, types: str):
    scalar = nb.njit(inline="always", cache=True)(fn)
    # the plain numpy ufunc numba builds: called directly, without its dispatcher's Python layer
    array = nb.vectorize([f"float64({types})"], cache=True)(fn).ufunc
    return scalar, array


nb_charge_limit_kw, charge_limit_kw = _compiled(_charge_limit_kw, "float64, float64, float64, float64, float64")
nb_discharge_limit_kw, discharge_limit_kw = _compiled(
    _discharge_limit_kw, "float64, float64, float64, float64, boolean, float64, float64")
nb_need_kwh, need_kwh = _compiled(_need_kwh, "float64, float64, float64")
nb_battery_kwh, battery_kwh = _compiled(_battery_kwh, "float64, float64, float64, float64")
nb_charge_slots, _charge_slots_f = _compiled(_charge_slots, "float64, float64, float64, float64")


def charge_slots(need_kwh_: npt.ArrayLike, p_max_kw, eta_ch, dt_h: float) -> npt.NDArray[np.int64]:
    """Remaining charge slots c (:func:`_charge_slots`) as integers."""
    return _charge_slots_f(need_kwh_, p_max_kw, eta_ch, dt_h).astype(np.int64)


def soc_after(soc, p_kw, cap_kwh, eta_ch, eta_dis, dt_h: float) -> npt.NDArray[np.float64]:
    """SOC after one step at grid-side ``p_kw``."""
    return soc + battery_kwh(p_kw, eta_ch, eta_dis, dt_h) / cap_kwh
