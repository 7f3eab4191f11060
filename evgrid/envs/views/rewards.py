"""Rewards of every level: pure functions of a :class:`StepRecord`, the reward weights and the layout.

* EV: ``-ev_cost * cost - ev_throughput_per_kwh * battery kWh - curtail_per_kwh * curtailed kWh +
  ev_unmet_per_kwh * progress``, progress being the step's reduction of the battery energy still missing to
  the target.  Summed over a stay, the progress term is ``-ev_unmet_per_kwh * kWh short at departure`` plus a
  constant (the need on arrival): the unmet-energy penalty, paid on the steps that cause it.
* Grouped EVs (``evs_<j>``): the sum over the station's EVs.
* Station (seed 002, eqs 15-18), ``reward.station_disparity: base`` (the paper's reading):
  ``-((station_w1 * price^ + station_w2 * disparity^) * charged kWh + curtail_per_kwh * curtailed kWh -
  station_unmet_per_kwh * progress) / (p_max dt)``.  ``price^``: the retail price of the station's zone,
  min-max normalised over the prices the tariff (and a learned operator's multipliers) can take;
  ``disparity^``: eq 16's share deviation of the zone's base load (per unit of its nominal, no EVs) from the
  ideal 1 / Z, min-max normalised over the day's zones and steps.  Both are in [0, 1] per kWh charged, so
  charging is cheapest where the price is low and the network's share lies below the ideal (ours: the paper's
  terms weigh the station's charged energy; its unmet-energy progress is ours, so the station still serves its
  EVs; dividing by the station's largest step energy keeps rewards of order 1).
  ``station_disparity: load`` (ours): the w2 term is instead ``station_w2 * |deviation| / D`` once per step,
  the deviation being the zone's share of the networks' whole load after the step (EVs included) from 1 / Z,
  and D the day's largest base-load deviation (eq 17's scale).  The base-load term rewards charging at the
  hours the base load leaves a network room, whatever the EVs already there add; with LBMS routing new
  requests to the least-loaded network, deferring charge there drew more EVs and raised the spatial std
  (README, seed 002).  This term is the network's imbalance itself, which a station lowers by charging more
  when its network is under-loaded and less when over-loaded.
* Operator: ``operator_profit * (EV revenue - purchase - diesel - carbon - curtailment cost) / 1000 -
  operator_peak_valley * ((zone load - its episode mean) / zone nominal)^2 - operator_violation * bus-steps
  outside voltage limits in the zone``, counted on the power flow of the step's dispatch before enforcement.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from evgrid.envs.config import EnvConfig, RewardConfig
from evgrid.envs.state import Layout, StepRecord

FloatArray = npt.NDArray[np.float64]


def ev_rewards(rec: StepRecord, w: RewardConfig, dt_h: float) -> FloatArray:
    """(P,) each plugged EV's reward."""
    return -(w.ev_cost * rec.ev_cost + w.ev_throughput_per_kwh * rec.e_batt_kwh
             + w.curtail_per_kwh * rec.cut_ev_kw * dt_h) + w.ev_unmet_per_kwh * rec.progress_kwh


def per_station(rec: StepRecord, values: FloatArray, n_env: int, n_station: int) -> FloatArray:
    """(E, M) per-EV ``values`` summed over each station's EVs."""
    return np.bincount(rec.ev_station, values, n_env * n_station).reshape(n_env, n_station)


def min_max(x: FloatArray, axis: tuple[int, ...]) -> FloatArray:
    """Seed 002's eq 17, ``(x - min) / (max - min)`` over ``axis`` (0 where max = min)."""
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    return np.divide(x - lo, hi - lo, out=np.zeros_like(x), where=hi > lo)


def share_deviation(base_zone_kw: FloatArray, zone_nominal_kw: FloatArray) -> FloatArray:
    """(E, T, Z) seed 002's eq 16: each zone's share of the total base load (per unit of its nominal, so zones
    of unequal size compare) minus the ideal share 1 / Z; positive: more loaded than its share."""
    pu = base_zone_kw / zone_nominal_kw
    total = pu.sum(axis=-1, keepdims=True)
    return np.divide(pu, total, out=np.zeros_like(pu), where=total > 0) - 1.0 / pu.shape[-1]


def price_bounds(cfg: EnvConfig) -> tuple[float, float]:
    """Lowest and highest retail price a station can see, per kWh: the tariff's, times the multiplier range
    when operators are learned (their rule keeps multiplier 1)."""
    m = cfg.market
    lo, hi = float(m.retail_by_period.min()), float(m.retail_by_period.max())
    if cfg.agents.operator == "learned":
        return lo * m.price_multiplier_min, hi * m.price_multiplier_max
    return lo, hi


def episode_disparity(base_zone_kw: FloatArray, zone_nominal_kw: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The stations' disparity terms of an episode from its base loads (E, T, Z): eq 16's share deviation
    normalised per eq 17 over the day's zones and steps (E, T, Z), and the day's largest absolute deviation
    (E, 1), the ``load`` term's scale (1 where the base load is balanced throughout)."""
    dev = share_deviation(base_zone_kw, zone_nominal_kw)
    scale = np.abs(dev).max(axis=(1, 2))[:, None]
    return min_max(dev, axis=(1, 2)), np.where(scale > 0, scale, 1.0)


def station_rewards(rec: StepRecord, cfg: EnvConfig, layout: Layout,
                    disparity: tuple[FloatArray, FloatArray]) -> FloatArray:
    """(E, M) each station's reward; ``disparity``: the episode's :func:`episode_disparity`."""
    w, dt_h, sc = cfg.reward, cfg.dt_min / 60.0, cfg.stations
    n_env, n_st = rec.feeder_load_kw.shape[0], layout.n_station
    charge_kwh = per_station(rec, np.maximum(rec.p_ev_kw, 0.0), n_env, n_st) * dt_h
    lo, hi = price_bounds(cfg)
    price = rec.price_zone[:, layout.station_zone]  # (E, M): a station's EVs all pay its zone's price
    norm_price = (price - lo) / (hi - lo) if hi > lo else np.zeros_like(price)
    curtailed = per_station(rec, rec.cut_ev_kw * dt_h, n_env, n_st)
    progress = per_station(rec, rec.progress_kwh, n_env, n_st)
    normalised, scale = disparity
    e_ref = sc.p_max_kw * dt_h
    if w.station_disparity == "base":
        cost = (w.station_w1 * norm_price + w.station_w2 * normalised[:, rec.t][:, layout.station_zone]) * charge_kwh
    else:
        imbalance = np.abs(share_deviation(rec.zone_load_kw, layout.zone_nominal_kw)) / scale  # (E, Z)
        cost = w.station_w1 * norm_price * charge_kwh + w.station_w2 * imbalance[:, layout.station_zone] * e_ref
    return -(cost + w.curtail_per_kwh * curtailed - w.station_unmet_per_kwh * progress) / e_ref


def operator_rewards(rec: StepRecord, w: RewardConfig, layout: Layout) -> FloatArray:
    """(E, Z) each zone operator's reward."""
    profit = rec.zone_ev_revenue - rec.zone_cost.total
    dev = (rec.zone_load_kw - rec.zone_mean_load_kw) / layout.zone_nominal_kw
    return w.operator_profit * profit / 1000.0 - w.operator_peak_valley * dev ** 2 \
        - w.operator_violation * rec.zone_violations
