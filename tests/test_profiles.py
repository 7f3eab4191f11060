"""Tests for evgrid.grid.profiles: synthetic series, time-of-use tariff, file loaders."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evgrid.grid.profiles import (
    LOAD_KINDS,
    OFFPEAK,
    PEAK,
    VALLEY,
    TouTariff,
    load_series,
    load_shape,
    pv_profile,
    step_count,
    wind_power_curve,
    wind_profile,
    wind_speed,
)

DT_MINS = (5, 15, 30, 60)
FAST = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)
dt_mins = st.sampled_from(DT_MINS)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def start_h(dt_min: int, n: int) -> np.ndarray:
    """Hour of day at each step start."""
    return (np.arange(n) * dt_min % 1440) / 60.0


# every generator, called with (dt_min, days, generator or None)
SERIES = {
    "load": lambda dt, d, g: load_shape("residential", dt_min=dt, days=d, rng=g),
    "pv": lambda dt, d, g: pv_profile(dt_min=dt, days=d, rng=g),
    "wind": lambda dt, d, g: wind_profile(dt_min=dt, days=d, rng=g if g is not None else rng()),
    "wind_speed": lambda dt, d, g: wind_speed(dt_min=dt, days=d, rng=g if g is not None else rng()),
    "tou_period": lambda dt, d, g: TouTariff().period(dt, d),
    "tou_prices": lambda dt, d, g: TouTariff().prices(dt, d),
}


# ---------------------------------------------------------------------------------------------------------------
# time grid


@pytest.mark.parametrize("name", SERIES)
@pytest.mark.parametrize("dt_min", DT_MINS)
@pytest.mark.parametrize("days", (1, 3))
def test_shape_and_length(name: str, dt_min: int, days: int) -> None:
    n = days * 1440 // dt_min
    assert step_count(dt_min, days) == n
    for g in (None, rng(1)):
        s = SERIES[name](dt_min, days, g)
        assert s.shape == (n,)
        assert s.dtype == (np.int8 if name == "tou_period" else np.float64)
        assert np.all(np.isfinite(s))


@pytest.mark.parametrize("name", SERIES)
@pytest.mark.parametrize("bad", (0, -15, 7, 17, 1441, 15.0, "15", True, None))
def test_bad_dt_min_raises(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match=r"dt_min.*1440"):
        SERIES[name](bad, 1, rng())


@pytest.mark.parametrize("bad", (0, -1, 1.5, True))
def test_bad_days_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="days"):
        step_count(15, bad)
    with pytest.raises(ValueError, match="days"):
        pv_profile(days=bad)


def test_step_count_accepts_every_divisor_of_a_day() -> None:
    for dt_min in (1, 32, 96, 120, 1440):
        assert step_count(dt_min, 2) * dt_min == 2 * 1440


@pytest.mark.parametrize("name", ["load", "pv", "wind", "wind_speed"])
def test_same_seed_same_series_different_seed_different(name: str) -> None:
    f = SERIES[name]
    a, b, c = f(15, 2, rng(7)), f(15, 2, rng(7)), f(15, 2, rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rng_of_wrong_type_raises() -> None:
    with pytest.raises(TypeError, match="rng"):
        load_shape("residential", rng=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rng"):
        pv_profile(rng=np.random.RandomState(0))  # type: ignore[arg-type]


def test_grid_modules_do_not_import_agent_frameworks() -> None:
    code = ("import sys, evgrid.grid.profiles; "
            "bad = [m for m in ('gymnasium', 'pettingzoo', 'ray') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------------
# base load

PEAK_WINDOW_H = {"residential": (18.0, 21.0), "commercial": (8.0, 18.0), "industrial": (6.0, 22.0)}


@pytest.mark.parametrize("kind", LOAD_KINDS)
@pytest.mark.parametrize("dt_min", DT_MINS + (96, 120))
def test_load_peak_in_documented_hours(kind: str, dt_min: int) -> None:
    s = load_shape(kind, dt_min=dt_min, days=2)
    n_day = 1440 // dt_min
    assert s.max() == 1.0  # exact, also when the steps miss the table's peak hour (96, 120 min)
    assert np.all(s > 0.0)
    assert np.array_equal(s[:n_day], s[n_day:])  # without noise every day is the same
    lo, hi = PEAK_WINDOW_H[kind]
    h = start_h(dt_min, n_day)
    assert lo <= h[np.argmax(s[:n_day])] < hi
    # the whole peak lies there, and the day outside it stays clearly lower
    assert np.all(s[:n_day][(h < lo) | (h >= hi)] < 0.9)


def test_load_shape_features() -> None:
    res, com, ind = (load_shape(k, dt_min=60) for k in LOAD_KINDS)
    assert res[8] > res[5] and res[8] > res[11]  # residential morning bump
    assert res[:6].max() < 0.5  # residential low at night
    assert com[8:18].mean() > 2 * com[0:6].mean()  # commercial office hours
    assert ind[7:22].min() >= 0.9 and ind[0:5].max() < 0.5  # industrial flat high during the shifts
    assert ind[6] < ind[7] and ind[22] < ind[21]  # shift edges


def test_load_interpolation_is_periodic_across_midnight() -> None:
    s = load_shape("residential", dt_min=30)  # steps hit every hour: no renormalisation
    assert s[47] == pytest.approx((s[46] + s[0]) / 2)  # 23:30 is halfway between 23:00 and the next 00:00
    assert s[1] == pytest.approx((s[0] + s[2]) / 2)


@FAST
@given(kind=st.sampled_from(LOAD_KINDS), seed=seeds, noise=st.floats(0.0, 0.5), dt_min=dt_mins,
       days=st.integers(1, 3))
def test_noisy_load_is_positive_and_at_most_one(kind: str, seed: int, noise: float, dt_min: int, days: int) -> None:
    s = load_shape(kind, dt_min=dt_min, days=days, rng=rng(seed), noise=noise)
    assert np.all(np.isfinite(s))
    assert np.all(s > 0.0)
    assert s.max() == 1.0


def test_load_noise_size_and_zero_noise() -> None:
    base = load_shape("commercial", dt_min=15, days=30)
    assert np.array_equal(load_shape("commercial", dt_min=15, days=30, rng=rng(3), noise=0.0), base)
    noisy = load_shape("commercial", dt_min=15, days=30, rng=rng(3), noise=0.05)
    log_ratio = np.log(noisy / base)  # a constant offset from the renormalisation, plus the noise
    assert np.std(log_ratio) == pytest.approx(0.05, rel=0.2)
    assert np.corrcoef(log_ratio[:-1], log_ratio[1:])[0, 1] > 0.6  # correlated, not white


@pytest.mark.parametrize("kind", ("household", "", "Residential", None, 3))
def test_unknown_load_kind_raises(kind: object) -> None:
    with pytest.raises(ValueError, match=r"kind.*residential, commercial, industrial"):
        load_shape(kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("noise", (-0.01, math.nan, math.inf, 2.0))
def test_bad_noise_raises(noise: float) -> None:
    with pytest.raises(ValueError, match="noise"):
        load_shape("residential", rng=rng(), noise=noise)


# ---------------------------------------------------------------------------------------------------------------
# PV


def night_steps(dt_min: int, n: int, sunrise_h: float, sunset_h: float) -> np.ndarray:
    """Steps that lie wholly before sunrise or after sunset."""
    h = start_h(dt_min, n)
    return (h + dt_min / 60.0 <= sunrise_h) | (h >= sunset_h)


@pytest.mark.parametrize("dt_min", DT_MINS + (1440,))
def test_clear_sky_pv_energy_and_night(dt_min: int) -> None:
    pv = pv_profile(dt_min=dt_min, days=2)
    n = pv.size
    assert np.all((pv >= 0.0) & (pv <= 1.0))
    assert np.all(pv[night_steps(dt_min, n, 6.0, 18.0)] == 0.0)
    # step means: a day's energy is the bell's integral, 2 * 12 h / pi, at every step length
    assert pv.sum() * dt_min / 60.0 == pytest.approx(2 * 2 * 12.0 / math.pi)
    if dt_min <= 60:
        assert pv[: n // 2].argmax() * dt_min / 60.0 in (11.0, 12.0 - dt_min / 60.0, 12.0)  # solar noon


def test_pv_peak_is_one_and_symmetric() -> None:
    pv = pv_profile(dt_min=5, sunrise_h=6.0, sunset_h=18.0)
    assert pv.max() == pytest.approx(1.0, abs=1e-4)
    day = pv[72:216]  # 06:00-18:00
    assert np.allclose(day, day[::-1])


def test_pv_without_rng_ignores_cloudiness() -> None:
    assert np.array_equal(pv_profile(cloudiness=0.9), pv_profile(cloudiness=0.0))


@FAST
@given(seed=seeds, dt_min=dt_mins, sunrise_h=st.floats(0.0, 11.0), day_h=st.floats(1.0, 13.0),
       cloudiness=st.floats(0.0, 1.0), days=st.integers(1, 2))
def test_cloudy_pv_within_bounds_and_below_clear_sky(seed: int, dt_min: int, sunrise_h: float, day_h: float,
                                                     cloudiness: float, days: int) -> None:
    kw = dict(dt_min=dt_min, days=days, sunrise_h=sunrise_h, sunset_h=sunrise_h + day_h)
    clear = pv_profile(**kw)
    pv = pv_profile(**kw, rng=rng(seed), cloudiness=cloudiness)
    assert np.all((pv >= 0.0) & (pv <= 1.0))
    assert np.all(pv <= clear)
    assert np.all(pv[night_steps(dt_min, pv.size, sunrise_h, sunrise_h + day_h)] == 0.0)


@pytest.mark.parametrize("cloudiness", (0.2, 0.5, 0.8))
def test_pv_mean_cloud_loss_is_cloudiness(cloudiness: float) -> None:
    clear = pv_profile(dt_min=60, days=365)
    pv = pv_profile(dt_min=60, days=365, rng=rng(11), cloudiness=cloudiness)
    assert 1.0 - pv.sum() / clear.sum() == pytest.approx(cloudiness, abs=0.03)


def test_pv_cloudiness_extremes() -> None:
    clear = pv_profile(dt_min=15, days=2)
    assert np.array_equal(pv_profile(dt_min=15, days=2, rng=rng(), cloudiness=0.0), clear)
    assert np.all(pv_profile(dt_min=15, days=2, rng=rng(), cloudiness=1.0) == 0.0)


@pytest.mark.parametrize(("kw", "name"), [
    (dict(sunrise_h=18.0, sunset_h=6.0), "sunrise_h"),
    (dict(sunrise_h=6.0, sunset_h=6.0), "sunrise_h"),
    (dict(sunrise_h=-1.0), "sunrise_h"),
    (dict(sunset_h=25.0), "sunset_h"),
    (dict(cloudiness=1.5), "cloudiness"),
    (dict(cloudiness=math.nan), "cloudiness"),
])
def test_bad_pv_arguments_raise(kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        pv_profile(rng=rng(), **kw)


# ---------------------------------------------------------------------------------------------------------------
# wind


def test_wind_power_curve_at_known_speeds() -> None:
    v = np.array([0.0, 2.9, 3.0, 7.5, 11.99, 12.0, 20.0, 25.0, 25.01, 40.0])
    expected = np.array([0.0, 0.0, 0.0, (7.5**3 - 27.0) / (12.0**3 - 27.0), (11.99**3 - 27.0) / (12.0**3 - 27.0),
                         1.0, 1.0, 1.0, 0.0, 0.0])
    assert np.allclose(wind_power_curve(v), expected)
    assert wind_power_curve(30.0, cut_out_m_per_s=35.0) == 1.0


@FAST
@given(speeds=st.lists(st.floats(0.0, 60.0), min_size=1, max_size=50),
       cut_in=st.floats(0.0, 5.0), ramp=st.floats(0.5, 15.0), plateau=st.floats(0.0, 20.0))
def test_wind_power_curve_properties(speeds: list[float], cut_in: float, ramp: float, plateau: float) -> None:
    kw = dict(cut_in_m_per_s=cut_in, rated_m_per_s=cut_in + ramp, cut_out_m_per_s=cut_in + ramp + plateau)
    v = np.sort(np.array(speeds))
    p = wind_power_curve(v, **kw)
    assert p.shape == v.shape
    assert np.all((p >= 0.0) & (p <= 1.0))
    assert np.all(p[v > kw["cut_out_m_per_s"]] == 0.0)
    assert np.all(p[v < cut_in] == 0.0)
    running = v <= kw["cut_out_m_per_s"]
    assert np.all(np.diff(p[running]) >= 0.0)  # non-decreasing up to cut-out


def test_wind_profile_is_power_curve_of_wind_speed_and_zero_above_cut_out() -> None:
    # a stormy mean puts many steps above cut-out
    speed = wind_speed(dt_min=15, days=20, rng=rng(5), mean_speed_m_per_s=20.0)
    p = wind_profile(dt_min=15, days=20, rng=rng(5), mean_speed_m_per_s=20.0)
    assert np.array_equal(p, wind_power_curve(speed))
    assert (speed > 25.0).sum() > 50
    assert np.all(p[speed > 25.0] == 0.0)
    assert np.all((p >= 0.0) & (p <= 1.0))
    assert np.any(p == 1.0) and np.any((p > 0.0) & (p < 1.0))


@FAST
@given(seed=seeds, dt_min=dt_mins, mean=st.floats(1.0, 30.0))
def test_wind_profile_within_bounds(seed: int, dt_min: int, mean: float) -> None:
    p = wind_profile(dt_min=dt_min, days=2, rng=rng(seed), mean_speed_m_per_s=mean)
    assert np.all((p >= 0.0) & (p <= 1.0))


def test_wind_speed_has_rayleigh_marginal_and_is_autocorrelated() -> None:
    v = wind_speed(dt_min=60, days=365, rng=rng(2), mean_speed_m_per_s=7.0)
    assert np.all(v >= 0.0)
    assert v.mean() == pytest.approx(7.0, rel=0.08)
    # Weibull k = 2: P(v > mean) = exp(-pi / 4), P(v > 2 mean) = exp(-pi)
    assert (v > 7.0).mean() == pytest.approx(math.exp(-math.pi / 4), abs=0.04)
    assert (v > 14.0).mean() == pytest.approx(math.exp(-math.pi), abs=0.02)
    v15 = wind_speed(dt_min=15, days=30, rng=rng(2))
    assert np.corrcoef(v15[:-1], v15[1:])[0, 1] > 0.8


def test_wind_needs_rng() -> None:
    with pytest.raises(TypeError, match="rng"):
        wind_profile()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="rng"):
        wind_profile(rng=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rng"):
        wind_speed(rng=123)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "name"), [
    (dict(cut_in_m_per_s=12.0), "cut_in_m_per_s"),
    (dict(rated_m_per_s=30.0), "cut_in_m_per_s"),
    (dict(cut_in_m_per_s=-1.0), "cut_in_m_per_s"),
    (dict(cut_out_m_per_s=math.nan), "cut_out_m_per_s"),
    (dict(mean_speed_m_per_s=0.0), "mean_speed_m_per_s"),
])
def test_bad_wind_arguments_raise(kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        wind_profile(rng=rng(), **kw)


@pytest.mark.parametrize("speed", ([-1.0, 5.0], [math.nan], [math.inf]))
def test_bad_wind_speed_raises(speed: list[float]) -> None:
    with pytest.raises(ValueError, match="speed_m_per_s"):
        wind_power_curve(speed)


# ---------------------------------------------------------------------------------------------------------------
# time-of-use prices


def test_tou_constants() -> None:
    assert (VALLEY, OFFPEAK, PEAK) == (0, 1, 2)


def test_tou_periods_at_known_hours() -> None:
    tariff = TouTariff()
    period = tariff.period(dt_min=15, days=2)
    expected = {0.0: VALLEY, 7.75: VALLEY, 8.0: PEAK, 11.75: PEAK, 12.0: OFFPEAK, 16.75: OFFPEAK, 17.0: PEAK,
                20.75: PEAK, 21.0: OFFPEAK, 23.75: OFFPEAK}
    for day in (0, 1):
        for hour, code in expected.items():
            assert period[day * 96 + int(hour * 4)] == code, hour
    prices = tariff.prices(dt_min=15, days=2)
    assert np.array_equal(prices, np.array([0.32, 0.65, 1.0])[period])


def test_tou_step_takes_the_period_of_its_start() -> None:
    period = TouTariff().period(dt_min=90)
    h = start_h(90, 16)
    assert period[h == 7.5] == VALLEY  # 07:30-09:00 starts in the valley though it runs into the peak
    assert period[h == 9.0] == PEAK
    assert period[h == 10.5] == PEAK  # 10:30-12:00
    assert period[h == 21.0] == OFFPEAK


def test_custom_tariff_and_normalised_hours() -> None:
    tariff = TouTariff(peak_price_per_kwh=2.0, offpeak_price_per_kwh=1.0, valley_price_per_kwh=0.0,
                       peak_hours=[[18, 22]], valley_hours=[(0, 6), (23.5, 24)])  # type: ignore[arg-type]
    assert tariff.peak_hours == ((18, 22),) and tariff.valley_hours == ((0, 6), (23.5, 24))
    hash(tariff)
    prices = tariff.prices(dt_min=30)
    assert prices[47] == 0.0 and prices[46] == 1.0 and prices[36] == 2.0 and prices[44] == 1.0
    assert np.all(TouTariff(valley_hours=()).period(60) != VALLEY)


def test_tariff_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TouTariff().peak_price_per_kwh = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(("kw", "name"), [
    (dict(peak_price_per_kwh=-0.1), "peak_price_per_kwh"),
    (dict(offpeak_price_per_kwh=math.nan), "offpeak_price_per_kwh"),
    (dict(valley_price_per_kwh=math.inf), "valley_price_per_kwh"),
    (dict(valley_price_per_kwh="cheap"), "valley_price_per_kwh"),
    (dict(peak_hours=((8, 25),)), "peak_hours"),
    (dict(peak_hours=((12, 8),)), "peak_hours"),
    (dict(peak_hours=((8, 8),)), "peak_hours"),
    (dict(peak_hours=(8, 12)), "peak_hours"),  # a bare pair, not a sequence of pairs
    (dict(valley_hours=((-1, 8),)), "valley_hours"),
    (dict(valley_hours=((0, 8, 9),)), "valley_hours"),
    (dict(peak_hours=((7, 12),)), r"peak_hours.*overlaps valley_hours"),
    (dict(valley_hours=((0, 8), (20, 24))), r"peak_hours.*overlaps valley_hours"),
])
def test_tariff_validation(kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TouTariff(**kw)


def test_touching_peak_and_valley_do_not_overlap() -> None:
    period = TouTariff(peak_hours=((8, 12),), valley_hours=((0, 8), (12, 13))).period(60)
    assert period[7] == VALLEY and period[8] == PEAK and period[12] == VALLEY and period[13] == OFFPEAK


# ---------------------------------------------------------------------------------------------------------------
# loaders

TIMES = pd.date_range("2024-03-01", periods=4, freq="15min")
FRAME = pd.DataFrame({
    "time": TIMES,
    "p_kw": [0.0, 1.5, 2.25, 10.0],
    "p_mw": [0.0, 0.25, 1.5, 0.001],
    "p_w": [0.0, 500.0, 1500.0, 2.0],
    "pv_pu": [0.0, 0.5, 1.0, 1.5],
    "price": [0.3, -0.05, 1.0, 0.0],
})


def write(frame: pd.DataFrame, path) -> None:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


@pytest.fixture(params=[".csv", ".parquet"])
def data_file(request, tmp_path):
    path = tmp_path / f"series{request.param}"
    write(FRAME, path)
    return path


def test_loader_values_and_units(data_file) -> None:
    assert np.array_equal(load_series(data_file, "p_kw", unit="kw"), FRAME["p_kw"].to_numpy())
    assert np.allclose(load_series(data_file, "p_mw", unit="mw"), [0.0, 250.0, 1500.0, 1.0])
    assert np.allclose(load_series(data_file, "p_w", unit="w"), [0.0, 0.5, 1.5, 0.002])
    assert np.array_equal(load_series(data_file, "pv_pu", unit="pu"), FRAME["pv_pu"].to_numpy())
    prices = load_series(data_file, "price", unit="price_per_kwh")  # negative prices are allowed
    assert np.array_equal(prices, FRAME["price"].to_numpy())
    out = load_series(data_file, "p_kw", unit="kw", n_steps=4, dt_min=15)
    assert out.dtype == np.float64 and out.shape == (4,)


def test_parquet_time_index_is_checked(tmp_path) -> None:
    path = tmp_path / "indexed.parquet"
    FRAME.set_index("time").to_parquet(path)
    assert load_series(path, "p_kw", unit="kw", dt_min=15).size == 4
    with pytest.raises(ValueError, match=r"dt_min.*'time'.*row 0 to row 1"):
        load_series(path, "p_kw", unit="kw", dt_min=30)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.floats(0.0, 1e6, allow_subnormal=False), min_size=1, max_size=40),
       suffix=st.sampled_from([".csv", ".parquet"]))
def test_loader_round_trip_is_exact(tmp_path, values: list[float], suffix: str) -> None:
    path = tmp_path / f"round_trip{suffix}"
    write(pd.DataFrame({"p": values}), path)
    assert np.array_equal(load_series(path, "p", unit="kw"), np.array(values))
    assert np.array_equal(load_series(path, "p", unit="mw"), np.array(values) * 1000.0)


def test_loader_bad_suffix_and_missing_file(tmp_path) -> None:
    txt = tmp_path / "series.txt"
    txt.write_text("p_kw\n1\n")
    with pytest.raises(ValueError, match=r"path.*'\.txt'.*\.csv or \.parquet"):
        load_series(txt, "p_kw", unit="kw")
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        load_series(tmp_path / "nowhere.csv", "p_kw", unit="kw")


def test_loader_unreadable_file(tmp_path) -> None:
    fake = tmp_path / "fake.parquet"
    fake.write_text("p_kw\n1\n")
    with pytest.raises(ValueError, match=r"path.*fake\.parquet"):
        load_series(fake, "p_kw", unit="kw")


def test_loader_missing_column_lists_available(data_file) -> None:
    with pytest.raises(ValueError, match=r"'nope' not found.*available columns.*'p_kw'.*'price'"):
        load_series(data_file, "nope", unit="kw")


def test_loader_unknown_unit(data_file) -> None:
    with pytest.raises(ValueError, match=r"unit.*'kwh'.*kw, mw, w, pu, price_per_kwh"):
        load_series(data_file, "p_kw", unit="kwh")


def test_loader_non_numeric(tmp_path) -> None:
    path = tmp_path / "text.csv"
    path.write_text("p_kw\n1.0\n2.0\nabc\n4.0\n")
    with pytest.raises(ValueError, match=r"'p_kw'.*1 non-numeric values at rows \[2\].*'abc'"):
        load_series(path, "p_kw", unit="kw")
    pq = tmp_path / "text.parquet"
    pd.DataFrame({"p_kw": ["1", "x"]}).to_parquet(pq)
    with pytest.raises(ValueError, match=r"'p_kw'.*non-numeric values at rows \[1\]"):
        load_series(pq, "p_kw", unit="kw")
    dates = tmp_path / "dates.parquet"
    FRAME.to_parquet(dates)
    with pytest.raises(ValueError, match=r"'time'.*expected numbers"):
        load_series(dates, "time", unit="kw")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_loader_missing_values(tmp_path, suffix: str) -> None:
    path = tmp_path / f"gaps{suffix}"
    write(pd.DataFrame({"p_kw": [1.0, None, 2.0, None, 3.0]}), path)
    with pytest.raises(ValueError, match=r"'p_kw'.*2 missing values.*rows \[1, 3\]"):
        load_series(path, "p_kw", unit="kw")
    many = tmp_path / f"many{suffix}"
    write(pd.DataFrame({"p_kw": [None] * 8 + [1.0]}), many)
    with pytest.raises(ValueError, match=r"8 missing values.*rows \[0, 1, 2, 3, 4, \.\.\.\]"):
        load_series(many, "p_kw", unit="kw")


def test_loader_empty_cells_in_csv(tmp_path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("time,p_kw\n00:00,1\n00:15,\n00:30,3\n")
    with pytest.raises(ValueError, match=r"'p_kw'.*1 missing values.*rows \[1\]"):
        load_series(path, "p_kw", unit="kw")


def test_loader_infinite_values(tmp_path) -> None:
    path = tmp_path / "inf.csv"
    path.write_text("p_kw\n1\ninf\n")
    with pytest.raises(ValueError, match=r"'p_kw'.*infinite.*rows \[1\]"):
        load_series(path, "p_kw", unit="kw")


def test_loader_wrong_length(data_file) -> None:
    with pytest.raises(ValueError, match=r"n_steps.*'p_kw'.*4 values, expected n_steps = 96"):
        load_series(data_file, "p_kw", unit="kw", n_steps=96)
    with pytest.raises(ValueError, match="n_steps"):
        load_series(data_file, "p_kw", unit="kw", n_steps=0)


def test_loader_no_rows(tmp_path) -> None:
    path = tmp_path / "header_only.csv"
    path.write_text("p_kw\n")
    with pytest.raises(ValueError, match=r"'p_kw'.*no values"):
        load_series(path, "p_kw", unit="kw")


@pytest.mark.parametrize("unit", ["kw", "mw", "w"])
def test_loader_negative_power(tmp_path, unit: str) -> None:
    path = tmp_path / "neg.csv"
    path.write_text("p\n1\n-2\n3\n-0.5\n")
    with pytest.raises(ValueError, match=rf"'p'.*2 negative values for power unit '{unit}'.*rows \[1, 3\]"):
        load_series(path, "p", unit=unit)


@pytest.mark.parametrize("bad", ["1.6", "-0.1"])
def test_loader_pu_out_of_range(tmp_path, bad: str) -> None:
    path = tmp_path / "pu.csv"
    path.write_text(f"pv\n0.5\n{bad}\n")
    with pytest.raises(ValueError, match=r"'pv'.*outside \[0, 1\.5\] for unit 'pu'.*rows \[1\]"):
        load_series(path, "pv", unit="pu")


def test_loader_time_spacing(tmp_path) -> None:
    path = tmp_path / "times.csv"
    path.write_text("timestamp,p_kw\n2024-03-01 00:00,1\n2024-03-01 00:15,1\n2024-03-01 00:30,1\n"
                    "2024-03-01 01:00,1\n")
    assert load_series(path, "p_kw", unit="kw").size == 4  # unchecked without dt_min
    with pytest.raises(ValueError, match=r"dt_min.*'timestamp'.*30 min from row 2 to row 3.*dt_min = 15"):
        load_series(path, "p_kw", unit="kw", dt_min=15)
    with pytest.raises(ValueError, match="dt_min"):
        load_series(path, "p_kw", unit="kw", dt_min=7)


def test_loader_time_across_dst_switch(tmp_path) -> None:
    # 02:45+01:00 -> 03:00+02:00 is 15 minutes of real time
    path = tmp_path / "dst.csv"
    path.write_text("time,p_kw\n2024-03-31T01:45+01:00,1\n2024-03-31T03:00+02:00,1\n2024-03-31T03:15+02:00,1\n")
    assert load_series(path, "p_kw", unit="kw", dt_min=15).size == 3


def test_loader_bad_time_column(tmp_path) -> None:
    path = tmp_path / "bad_time.csv"
    path.write_text("time,p_kw\n2024-03-01 00:00,1\nlater,1\n")
    with pytest.raises(ValueError, match=r"'time'.*1 missing or unparsable timestamps at rows \[1\]"):
        load_series(path, "p_kw", unit="kw", dt_min=15)
    numeric = tmp_path / "numeric_time.csv"
    numeric.write_text("time,p_kw\n0,1\n15,1\n")
    with pytest.raises(ValueError, match=r"dt_min.*'time'.*not timestamps"):
        load_series(numeric, "p_kw", unit="kw", dt_min=15)
    assert load_series(numeric, "p_kw", unit="kw").size == 2


def test_loader_without_time_column_accepts_dt_min(tmp_path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("p_kw\n1\n2\n")
    assert np.array_equal(load_series(path, "p_kw", unit="kw", dt_min=15), [1.0, 2.0])
