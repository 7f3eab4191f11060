"""Time series over one or several days: base load, PV, wind, time-of-use prices, and loaders for measured series.

Conventions, for every series here:

* A series has ``n_steps = days * 1440 // dt_min`` values.  Value ``i`` belongs to the step that starts at minute
  ``i * dt_min`` after midnight of the first day and is held for the whole step.  ``dt_min`` must divide 1440, so
  every day has whole steps and all days line up.
* Power series are per unit: of a load's peak, of installed PV or wind capacity.  Scale them by a rating in kW.
  All values are non-negative (the sign convention load positive / generation negative is applied by the caller).
* Shapes, tariffs and noise parameters are synthetic ("ours"): plausible and documented, not fitted to a data set.
* Randomness comes only from the ``np.random.Generator`` the caller passes as ``rng``; the same seeded generator
  gives the same series, and no global random state is read or written.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from statistics import NormalDist

import numpy as np
import numpy.typing as npt
import pandas as pd

from evgrid.validate import check_real

log = logging.getLogger(__name__)

MIN_PER_DAY = 1440
ALLOWED_DT_MIN: tuple[int, ...] = tuple(d for d in range(1, MIN_PER_DAY + 1) if MIN_PER_DAY % d == 0)

LOAD_KINDS = ("residential", "commercial", "industrial")

# Time-of-use period codes, as returned by TouTariff.period.
VALLEY, OFFPEAK, PEAK = 0, 1, 2

# Hourly base-load tables, ours (synthetic), per unit of the day's peak; entry h is the value at hh:00 and the
# series is interpolated linearly between hours, wrapping from 23:00 to the next 00:00.
_LOAD_TABLES_PU: dict[str, tuple[float, ...]] = {
    # low at night, morning bump around 8 h, midday plateau, evening peak 18-21 h (peak at 19 h)
    "residential": (0.42, 0.36, 0.33, 0.32, 0.32, 0.35, 0.45, 0.58, 0.62, 0.55, 0.50, 0.48,
                    0.50, 0.48, 0.46, 0.48, 0.55, 0.68, 0.85, 1.00, 0.97, 0.85, 0.68, 0.52),
    # office hours 8-18 h, peak late morning, lunch dip at 12 h
    "commercial": (0.30, 0.28, 0.28, 0.28, 0.28, 0.30, 0.38, 0.55, 0.80, 0.92, 0.97, 1.00,
                   0.96, 0.97, 0.99, 0.96, 0.92, 0.85, 0.70, 0.55, 0.45, 0.38, 0.33, 0.31),
    # two shifts 6-14 h and 14-22 h: flat high with ramps at 6 h and 22 h and a dip at the 14 h changeover
    "industrial": (0.35, 0.35, 0.35, 0.35, 0.35, 0.40, 0.85, 0.97, 1.00, 1.00, 1.00, 0.98,
                   0.95, 0.98, 0.90, 0.98, 1.00, 1.00, 0.99, 0.98, 0.97, 0.95, 0.55, 0.38),
}

# Correlation times of the random processes, ours: load noise decorrelates within an hour or so, clouds pass in
# a couple of hours, wind speed changes over several hours.
_LOAD_NOISE_TAU_MIN = 60.0
_CLOUD_TAU_MIN = 120.0
_WIND_TAU_MIN = 180.0
# Spread of the cloud process (the b in Phi(a + b z)); larger values make steps more often fully clear or overcast.
_CLOUD_SPREAD = 2.0

POWER_UNIT_TO_KW = {"kw": 1.0, "mw": 1000.0, "w": 1e-3}
UNITS = ("kw", "mw", "w", "pu", "price_per_kwh")
PU_MAX = 1.5  # per-unit series above this are taken as a unit mistake (kW read as pu), not as data
TIME_COLUMNS = ("time", "timestamp")
_N_ROWS_SHOWN = 5

_erfc = np.frompyfunc(math.erfc, 1, 1)  # numpy has no erfc, and evgrid.grid keeps to numpy/pandas here


# ---------------------------------------------------------------------------------------------------------------
# time grid


def _check_dt_min(dt_min: object) -> int:
    if isinstance(dt_min, bool) or not isinstance(dt_min, Integral) or int(dt_min) not in ALLOWED_DT_MIN:
        raise ValueError(f"dt_min: expected an integer number of minutes that divides 1440, one of "
                         f"{', '.join(map(str, ALLOWED_DT_MIN))}; got {dt_min!r}")
    return int(dt_min)


def step_count(dt_min: int = 15, days: int = 1) -> int:
    """Number of steps in ``days`` days of ``dt_min``-minute steps (ValueError naming the bad argument)."""
    dt_min = _check_dt_min(dt_min)
    if isinstance(days, bool) or not isinstance(days, Integral) or days < 1:
        raise ValueError(f"days: expected an integer >= 1, got {days!r}")
    return int(days) * MIN_PER_DAY // dt_min


def _minute_of_day(dt_min: int, n_step: int) -> npt.NDArray[np.int64]:  # (n_step,)
    return (np.arange(n_step, dtype=np.int64) * dt_min) % MIN_PER_DAY


def _check_rng(rng: object, *, required: bool) -> None:
    if rng is None and not required:
        return
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")


def _ar1(rng: np.random.Generator, n_step: int, dt_min: int, tau_min: float) -> npt.NDArray[np.float64]:  # (n_step,)
    """Stationary AR(1) series, unit variance, correlation ``exp(-lag / tau_min)`` at a lag in minutes.

    It samples an Ornstein-Uhlenbeck process, so the correlation over a given time does not depend on ``dt_min``.
    It starts in the stationary distribution: no warm-up transient at the start of a series.
    """
    phi = math.exp(-dt_min / tau_min)
    innov = math.sqrt(1.0 - phi * phi)
    e = rng.standard_normal(n_step).tolist()
    # A plain loop over Python floats: bit-identical on every machine (a blocked matrix form would depend on the
    # BLAS), and ~0.1 us per step is negligible next to a power flow.
    x = e[0]
    out = [x]
    for ei in e[1:]:
        x = phi * x + innov * ei
        out.append(x)
    return np.asarray(out, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# base load


def load_shape(kind: str, *, dt_min: int = 15, days: int = 1, rng: np.random.Generator | None = None,
               noise: float = 0.03) -> npt.NDArray[np.float64]:  # (n_steps,)
    """Daily base-load shape, per unit of its peak, for ``kind`` in :data:`LOAD_KINDS`.

    Without ``rng`` the shape is the hourly table of ``kind`` (ours, synthetic) interpolated linearly to the step
    starts, periodic across midnight, and its maximum is exactly 1.  With ``rng`` it is multiplied by
    ``exp(noise * z)``, ``z`` an AR(1) series of unit variance (correlation time 60 min), so the noise is
    multiplicative lognormal with log-standard deviation ``noise`` and the load stays positive by construction;
    the series is then divided by its own maximum, so it is per unit of the noisy peak and lies in (0, 1].
    """
    if not isinstance(kind, str) or kind not in _LOAD_TABLES_PU:
        raise ValueError(f"kind: unknown load kind {kind!r}; expected one of {', '.join(LOAD_KINDS)}")
    n_step = step_count(dt_min, days)
    _check_rng(rng, required=False)
    noise = check_real("noise", noise, 0.0, 1.0)
    table_pu = np.asarray(_LOAD_TABLES_PU[kind], dtype=np.float64)  # (24,)
    # the 00:00 value repeated at 24:00 makes np.interp periodic across midnight
    shape = np.interp(_minute_of_day(dt_min, n_step), np.arange(25) * 60.0, np.append(table_pu, table_pu[0]))
    if rng is not None:
        shape = shape * np.exp(noise * _ar1(rng, n_step, dt_min, _LOAD_NOISE_TAU_MIN))
    # also needed without noise: a dt_min that does not divide 60 can step over the peak hour
    return shape / shape.max()


# ---------------------------------------------------------------------------------------------------------------
# PV


def pv_profile(*, dt_min: int = 15, days: int = 1, rng: np.random.Generator | None = None, sunrise_h: float = 6.0,
               sunset_h: float = 18.0, cloudiness: float = 0.2) -> npt.NDArray[np.float64]:  # (n_steps,)
    """PV output per unit of installed capacity, in [0, 1].

    Clear sky is a sine bell, 0 at ``sunrise_h`` and ``sunset_h`` and 1 halfway between, zero at night.  Each
    value is the bell's mean over its step, not its value at the step start, so the energy of a day is the same
    at every ``dt_min`` (``2 (sunset_h - sunrise_h) / pi`` kWh per kW) and a step that straddles sunrise or sunset
    gets its share.  With ``rng`` the clear sky is multiplied by a cloud factor ``1 - Phi(a + b z)``, ``z`` an AR(1)
    series of unit variance (correlation time 120 min) and ``a`` chosen so the mean loss is exactly
    ``cloudiness``; the factor lies in [0, 1] by construction.  Without ``rng`` the output is the clear sky
    (``cloudiness`` is then unused).
    """
    n_step = step_count(dt_min, days)
    _check_rng(rng, required=False)
    sunrise_h = check_real("sunrise_h", sunrise_h, 0.0, 24.0)
    sunset_h = check_real("sunset_h", sunset_h, 0.0, 24.0)
    if not sunrise_h < sunset_h:
        raise ValueError(f"sunrise_h: expected sunrise_h < sunset_h, got sunrise_h={sunrise_h}, sunset_h={sunset_h}")
    cloudiness = check_real("cloudiness", cloudiness, 0.0, 1.0)

    day_h = sunset_h - sunrise_h
    start_h = _minute_of_day(dt_min, n_step) / 60.0

    def phase(t_h: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:  # (n_step,)
        # clamping time to daylight makes the integral below zero for the night part of a step
        return np.pi * (np.clip(t_h, sunrise_h, sunset_h) - sunrise_h) / day_h

    dt_h = dt_min / 60.0
    # mean of sin over the step: integral of sin(pi (t - sunrise) / day) dt = -(day / pi) cos(...)
    clear = (day_h / np.pi) * (np.cos(phase(start_h)) - np.cos(phase(start_h + dt_h))) / dt_h
    if rng is None:
        return clear
    return clear * _cloud_factor(rng, n_step, dt_min, cloudiness)


def _cloud_factor(rng: np.random.Generator, n_step: int, dt_min: int,
                  cloudiness: float) -> npt.NDArray[np.float64]:  # (n_step,)
    # drawn for every cloudiness, so what the generator yields next does not depend on it
    z = _ar1(rng, n_step, dt_min, _CLOUD_TAU_MIN)
    if cloudiness == 0.0:
        return np.ones(n_step)
    if cloudiness == 1.0:
        return np.zeros(n_step)
    # The loss d = Phi(a + b z) has E[d] = Phi(a / sqrt(1 + b^2)) for z ~ N(0, 1), which fixes a.
    b = _CLOUD_SPREAD
    a = math.sqrt(1.0 + b * b) * NormalDist().inv_cdf(cloudiness)
    # 1 - Phi(y) = erfc(y / sqrt 2) / 2, accurate where the sky is nearly clear
    return 0.5 * _erfc((a + b * z) / math.sqrt(2.0)).astype(np.float64)


# ---------------------------------------------------------------------------------------------------------------
# wind


def _check_power_curve(cut_in_m_per_s: float, rated_m_per_s: float, cut_out_m_per_s: float) -> tuple[float, ...]:
    cut_in = check_real("cut_in_m_per_s", cut_in_m_per_s, 0.0, 100.0)
    rated = check_real("rated_m_per_s", rated_m_per_s, 0.0, 100.0)
    cut_out = check_real("cut_out_m_per_s", cut_out_m_per_s, 0.0, 100.0)
    if not cut_in < rated <= cut_out:
        raise ValueError(f"cut_in_m_per_s, rated_m_per_s, cut_out_m_per_s: expected cut_in < rated <= cut_out, "
                         f"got {cut_in}, {rated}, {cut_out}")
    return cut_in, rated, cut_out


def wind_power_curve(speed_m_per_s: npt.ArrayLike, *, cut_in_m_per_s: float = 3.0, rated_m_per_s: float = 12.0,
                     cut_out_m_per_s: float = 25.0) -> npt.NDArray[np.float64]:  # same shape as speed_m_per_s
    """Turbine output per unit of rated power at hub-height wind speed ``speed_m_per_s``.

    0 below cut-in, ``(v^3 - v_in^3) / (v_rated^3 - v_in^3)`` from cut-in to rated (cubic and continuous at both
    ends), 1 from rated up to and including cut-out, 0 above cut-out (the turbine shuts down).
    """
    cut_in, rated, cut_out = _check_power_curve(cut_in_m_per_s, rated_m_per_s, cut_out_m_per_s)
    v = np.asarray(speed_m_per_s, dtype=np.float64)
    if not np.all(np.isfinite(v)) or np.any(v < 0.0):
        raise ValueError("speed_m_per_s: expected finite speeds >= 0")
    # clipped: at v == cut_in numpy's vectorised cube and Python's may differ in the last bit (-1.6e-16)
    ramp = np.clip((v**3 - cut_in**3) / (rated**3 - cut_in**3), 0.0, 1.0)
    return np.where(v < cut_in, 0.0, np.where(v < rated, ramp, np.where(v <= cut_out, 1.0, 0.0)))


def wind_speed(*, dt_min: int = 15, days: int = 1, rng: np.random.Generator,
               mean_speed_m_per_s: float = 7.0) -> npt.NDArray[np.float64]:  # (n_steps,) m/s
    """Autocorrelated wind speed with a Weibull marginal of shape k = 2 (Rayleigh) and mean ``mean_speed_m_per_s``.

    A Rayleigh variable is the norm of two independent standard normals times a scale; taking both as AR(1)
    series (correlation time 180 min, ours) keeps that marginal exactly and makes the speed autocorrelated.
    """
    n_step = step_count(dt_min, days)
    _check_rng(rng, required=True)
    mean_speed_m_per_s = check_real("mean_speed_m_per_s", mean_speed_m_per_s, 1e-9, 100.0)
    # Rayleigh(sigma) has mean sigma * sqrt(pi / 2)
    sigma_m_per_s = mean_speed_m_per_s * math.sqrt(2.0 / math.pi)
    x = _ar1(rng, n_step, dt_min, _WIND_TAU_MIN)
    y = _ar1(rng, n_step, dt_min, _WIND_TAU_MIN)
    return sigma_m_per_s * np.hypot(x, y)


def wind_profile(*, dt_min: int = 15, days: int = 1, rng: np.random.Generator, mean_speed_m_per_s: float = 7.0,
                 cut_in_m_per_s: float = 3.0, rated_m_per_s: float = 12.0,
                 cut_out_m_per_s: float = 25.0) -> npt.NDArray[np.float64]:  # (n_steps,)
    """Wind output per unit of rated power, in [0, 1]: :func:`wind_speed` through :func:`wind_power_curve`.

    For the same generator state it equals ``wind_power_curve(wind_speed(...))``.
    """
    # checked before drawing, so a bad curve leaves the generator untouched
    _check_power_curve(cut_in_m_per_s, rated_m_per_s, cut_out_m_per_s)
    speed_m_per_s = wind_speed(dt_min=dt_min, days=days, rng=rng, mean_speed_m_per_s=mean_speed_m_per_s)
    return wind_power_curve(speed_m_per_s, cut_in_m_per_s=cut_in_m_per_s, rated_m_per_s=rated_m_per_s,
                            cut_out_m_per_s=cut_out_m_per_s)


# ---------------------------------------------------------------------------------------------------------------
# time-of-use prices


def _check_hours(name: str, value: object) -> tuple[tuple[float, float], ...]:
    expected = f"{name}: expected a sequence of (start, end) hour pairs with 0 <= start < end <= 24"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{expected}, got {value!r}")
    out = []
    for pair in value:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"{expected}, got {value!r}")
        start, end = pair
        if any(isinstance(h, bool) or not isinstance(h, Real) for h in (start, end)) \
                or not 0 <= start < end <= 24:
            raise ValueError(f"{expected}, got interval {tuple(pair)!r}")
        out.append((start, end))
    return tuple(out)


@dataclass(frozen=True)
class TouTariff:
    """Time-of-use energy tariff: valley, off-peak and peak prices by hour of day (ours, synthetic).

    Hour intervals are half-open ``[start, end)`` in hours after midnight; hours in neither ``peak_hours`` nor
    ``valley_hours`` are off-peak.  A step belongs to the period of its start time.
    """

    peak_price_per_kwh: float = 1.0
    """Price in peak hours, currency units per kWh."""
    offpeak_price_per_kwh: float = 0.65
    """Price outside peak and valley hours, currency units per kWh."""
    valley_price_per_kwh: float = 0.32
    """Price in valley hours, currency units per kWh."""
    peak_hours: tuple[tuple[float, float], ...] = ((8, 12), (17, 21))
    """Peak intervals ``[start, end)``, hours 0-24."""
    valley_hours: tuple[tuple[float, float], ...] = ((0, 8),)
    """Valley intervals ``[start, end)``, hours 0-24; must not overlap ``peak_hours``."""

    def __post_init__(self) -> None:
        for name in ("peak_price_per_kwh", "offpeak_price_per_kwh", "valley_price_per_kwh"):
            price = getattr(self, name)
            if isinstance(price, bool) or not isinstance(price, Real) or not 0.0 <= float(price) < math.inf:
                raise ValueError(f"{name}: expected a finite price >= 0, got {price!r}")
        # lists from YAML become tuples: the tariff stays hashable and immutable
        for name in ("peak_hours", "valley_hours"):
            object.__setattr__(self, name, _check_hours(name, getattr(self, name)))
        for p0, p1 in self.peak_hours:
            for v0, v1 in self.valley_hours:
                if p0 < v1 and v0 < p1:
                    raise ValueError(f"peak_hours: interval {(p0, p1)} overlaps valley_hours interval {(v0, v1)}")

    def period(self, dt_min: int = 15, days: int = 1) -> npt.NDArray[np.int8]:  # (n_steps,)
        """Period of each step: :data:`VALLEY`, :data:`OFFPEAK` or :data:`PEAK`, by the step's start time."""
        n_step = step_count(dt_min, days)
        minute = _minute_of_day(dt_min, n_step)
        out = np.full(n_step, OFFPEAK, dtype=np.int8)
        # compared in minutes: step starts are whole minutes, so hour boundaries are hit exactly
        for code, intervals in ((VALLEY, self.valley_hours), (PEAK, self.peak_hours)):
            for start_h, end_h in intervals:
                out[(minute >= start_h * 60) & (minute < end_h * 60)] = code
        return out

    def prices(self, dt_min: int = 15, days: int = 1) -> npt.NDArray[np.float64]:  # (n_steps,) price_per_kwh
        """Energy price of each step, currency units per kWh."""
        by_period = np.array([self.valley_price_per_kwh, self.offpeak_price_per_kwh, self.peak_price_per_kwh],
                             dtype=np.float64)
        return by_period[self.period(dt_min, days)]


# ---------------------------------------------------------------------------------------------------------------
# loaders


def _rows(mask: npt.NDArray[np.bool_]) -> str:
    rows = np.flatnonzero(mask)
    more = ", ..." if rows.size > _N_ROWS_SHOWN else ""
    return f"[{', '.join(map(str, rows[:_N_ROWS_SHOWN].tolist()))}{more}] (0-based data rows)"


def _read_table(path: Path, suffix: str) -> pd.DataFrame:
    try:
        if suffix == ".csv":
            # round_trip: the default fast float parser can be off by one ulp
            df = pd.read_csv(path, float_precision="round_trip")
        else:
            df = pd.read_parquet(path, engine="pyarrow")
    except ValueError as exc:  # pandas' parser errors and pyarrow's ArrowInvalid are ValueErrors
        raise ValueError(f"path: cannot read {str(path)!r} as {suffix[1:]}: {exc}") from exc
    if not isinstance(df.index, pd.RangeIndex):
        # a pandas-written Parquet file keeps its index (often the time stamps) out of the columns
        df = df.reset_index()
    return df


def _numeric(col: pd.Series, where: str) -> npt.NDArray[np.float64]:  # (n,)
    dtype = col.dtype
    if pd.api.types.is_bool_dtype(dtype) or not (
            pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_object_dtype(dtype)
            or pd.api.types.is_string_dtype(dtype)):
        raise ValueError(f"{where}: expected numbers, got a column of dtype {dtype}")
    missing = col.isna().to_numpy()
    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna().to_numpy() & ~missing
    if bad.any():
        shown = col[bad].head(_N_ROWS_SHOWN).tolist()
        raise ValueError(f"{where}: {int(bad.sum())} non-numeric values at rows {_rows(bad)}, e.g. {shown}")
    if missing.any():
        raise ValueError(f"{where}: {int(missing.sum())} missing values (NaN/empty) at rows {_rows(missing)}; "
                         f"fill or drop them before loading")
    values = num.to_numpy(dtype=np.float64, na_value=np.nan)
    nonfinite = ~np.isfinite(values)
    if nonfinite.any():
        raise ValueError(f"{where}: {int(nonfinite.sum())} infinite values at rows {_rows(nonfinite)}")
    return values


def _check_spacing(df: pd.DataFrame, name: str, dt_min: int) -> None:
    time_col = next((c for c in TIME_COLUMNS if c in df.columns), None)
    if time_col is None:
        log.debug("%s: no %s column, spacing of dt_min=%d not checked", name, " or ".join(TIME_COLUMNS), dt_min)
        return
    raw = df[time_col]
    where = f"column {time_col!r} in {name}"
    if pd.api.types.is_numeric_dtype(raw.dtype):
        raise ValueError(f"dt_min: {where} holds numbers, not timestamps, so its spacing cannot be checked "
                         f"(pass dt_min=None to skip the check)")
    # utc=True: offsets that change at a DST switch are compared as absolute times
    t = pd.to_datetime(raw, errors="coerce", utc=True)
    nat = t.isna().to_numpy()
    if nat.any():
        raise ValueError(f"{where}: {int(nat.sum())} missing or unparsable timestamps at rows {_rows(nat)}")
    step = t.diff().to_numpy()[1:]  # (n - 1,) timedelta64
    off = np.flatnonzero(step != np.timedelta64(dt_min, "m"))
    if off.size:
        row = int(off[0]) + 1
        got_min = pd.Timedelta(step[off[0]]).total_seconds() / 60.0
        raise ValueError(f"dt_min: {where} steps by {got_min:g} min from row {row - 1} to row {row} "
                         f"(0-based data rows), expected dt_min = {dt_min} min")


def load_series(path: str | os.PathLike[str], column: str, *, unit: str, n_steps: int | None = None,
                dt_min: int | None = None) -> npt.NDArray[np.float64]:  # (n,)
    """One numeric column of a CSV (``.csv``) or Parquet (``.parquet``) file as a float array.

    ``unit`` is the unit of the values in the file, one of :data:`UNITS`: power units ("kw", "mw", "w") are
    converted to kW and must be >= 0; "pu" values are returned unchanged and must lie in [0, PU_MAX];
    "price_per_kwh" values are returned unchanged (negative prices are allowed: markets have them).  With
    ``n_steps`` the column must have exactly that many values.  With ``dt_min``, and a ``time`` or ``timestamp``
    column in the file, consecutive time stamps must be exactly ``dt_min`` minutes apart.

    Nothing is clipped or filled: every problem is a ValueError (FileNotFoundError for a missing file) naming the
    argument or column, what was expected and, for bad values, how many and the first rows (0-based data rows,
    the header not counted).
    """
    if unit not in UNITS:
        raise ValueError(f"unit: unknown unit {unit!r}; expected one of {', '.join(UNITS)}")
    if n_steps is not None and (isinstance(n_steps, bool) or not isinstance(n_steps, Integral) or n_steps < 1):
        raise ValueError(f"n_steps: expected an integer >= 1 or None, got {n_steps!r}")
    if dt_min is not None:
        dt_min = _check_dt_min(dt_min)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"path: unsupported file type {path.suffix!r} ({str(path)!r}); expected .csv or .parquet")
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")

    df = _read_table(path, suffix)
    if column not in df.columns:
        raise ValueError(f"column {column!r} not found in {path.name}; available columns: {list(df.columns)}")
    where = f"column {column!r} in {path.name}"
    values = _numeric(df[column], where)
    if values.size == 0:
        raise ValueError(f"{where}: no values (the file has no data rows)")
    if n_steps is not None and values.size != n_steps:
        raise ValueError(f"n_steps: {where} has {values.size} values, expected n_steps = {n_steps}")
    if unit in POWER_UNIT_TO_KW:
        negative = values < 0.0
        if negative.any():
            raise ValueError(f"{where}: {int(negative.sum())} negative values for power unit {unit!r} at rows "
                             f"{_rows(negative)}; power series here are magnitudes >= 0")
        values = values * POWER_UNIT_TO_KW[unit]
    elif unit == "pu":
        outside = (values < 0.0) | (values > PU_MAX)
        if outside.any():
            raise ValueError(f"{where}: {int(outside.sum())} values outside [0, {PU_MAX}] for unit 'pu' at rows "
                             f"{_rows(outside)}, e.g. {values[outside][:_N_ROWS_SHOWN].tolist()}")
    if dt_min is not None:
        _check_spacing(df, path.name, dt_min)
    log.debug("%s: %d values (%s)", where, values.size, unit)
    return values
