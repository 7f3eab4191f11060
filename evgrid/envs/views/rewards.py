"""Rewards of every level: pure functions of a :class:`StepRecord`, the reward weights and the layout.

* EV: ``-ev_cost * cost - ev_throughput_per_kwh * battery kWh - curtail_per_kwh * curtailed kWh +
  ev_unmet_per_kwh * progress``, progress being the step's reduction of the battery energy still missing to
  the target.  Summed over a stay, the progress term is ``-ev_unmet_per_kwh * kWh short at departure`` plus a
  constant (the need on arrival): the unmet-energy penalty, paid on the steps that cause it.
* Grouped EVs (``evs_<j>``): the sum over the station's EVs.
* Station: ``-(station_w1 * price cost / (p_max dt max price) + station_w2 * load disparity)`` (seed 002;
  disparity = (max - min) / max of network loads, of zone loads over their nominal on a single feeder) minus
  its EVs' curtailment penalty, plus ``station_unmet_per_kwh`` times its EVs' progress.
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


def station_rewards(rec: StepRecord, cfg: EnvConfig, layout: Layout, max_price_per_kwh: float) -> FloatArray:
    """(E, M) each station's reward; ``max_price_per_kwh``: the highest retail price operators can set."""
    w, dt_h, sc = cfg.reward, cfg.dt_min / 60.0, cfg.stations
    n_env, n_st = rec.feeder_load_kw.shape[0], layout.n_station
    # a station's EVs all pay its zone's price: the price times the energy they drew
    charge_kwh = per_station(rec, np.maximum(rec.p_ev_kw, 0.0), n_env, n_st) * dt_h
    norm_cost = charge_kwh * rec.price_zone[:, layout.station_zone] / (sc.p_max_kw * dt_h * max_price_per_kwh)
    loads = rec.feeder_load_kw if len(layout.feeders) > 1 else rec.zone_load_kw / layout.zone_nominal_kw
    hi = np.max(np.abs(loads), axis=1)
    spread = loads.max(axis=1) - loads.min(axis=1)
    disparity = np.divide(spread, hi, out=np.zeros(n_env), where=hi > 0)  # (E,)
    curtailed = per_station(rec, rec.cut_ev_kw * dt_h, n_env, n_st)
    progress = per_station(rec, rec.progress_kwh, n_env, n_st)
    return -(w.station_w1 * norm_cost + w.station_w2 * disparity[:, None]) - w.curtail_per_kwh * curtailed \
        + w.station_unmet_per_kwh * progress


def operator_rewards(rec: StepRecord, w: RewardConfig, layout: Layout) -> FloatArray:
    """(E, Z) each zone operator's reward."""
    profit = rec.zone_ev_revenue - rec.zone_cost.total
    dev = (rec.zone_load_kw - rec.zone_mean_load_kw) / layout.zone_nominal_kw
    return w.operator_profit * profit / 1000.0 - w.operator_peak_valley * dev ** 2 \
        - w.operator_violation * rec.zone_violations
