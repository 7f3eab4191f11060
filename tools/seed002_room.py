"""Where seed 002's room over greedy lies: station control measured against the oracle on the same days.

    python tools/seed002_room.py [--n-ev 1000] [--days 1000-1003]

Per day, the mean over steps of the std of the networks' loads (kW, as the study's ``spatial_std_kw``) of:

* ``greedy``: LBMS routing, every station charging all its EVs (the study's greedy);
* ``oracle``: greedy's day planned again for balance (``oracle.objective: spatial_balance``) and replayed;
* ``react gain g``: each station charges its EVs' full power less ``g`` times the amount by which its network's
  load, if they all charged, would exceed the networks' mean (a reactive rule with the simulator's full state);
* ``follow``: each station charges the share of its EVs' full power that the oracle planned for it at that step,
  as the stations' action allows (continuous, or snapped to ``stations.fraction_levels``), with the oracle's
  routing fixed or LBMS routing live.

Prints one row per policy (means over the days, unmet kWh beside) and, with ``--json``, the same as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np

from evgrid.agents import oracle as orc
from evgrid.envs.config import load_config
from evgrid.envs.sim import Sim, SimActions
from evgrid.evaluate import EpisodeMetrics

Fractions = Callable[[Sim], np.ndarray]


def _day(cfg, day: int, fractions: Fractions | None, stations: np.ndarray | None = None
         ) -> tuple[tuple[float, float], Sim]:
    """((spatial std kW, unmet kWh), the simulator at the day's end) of ``day`` with the stations charging
    ``fractions(sim)`` of their EVs (None: all of them, the station rule); ``stations``: each session's station
    fixed in advance."""
    sim = Sim(cfg if fractions is not None else load_config(cfg, {"agents": {"station": "rule"}}), 1)
    sim.reset(day, stations=stations)
    m = EpisodeMetrics(sim)
    while sim.t < sim.n_steps:
        m.add(sim.step(SimActions(station_fraction=fractions(sim)) if fractions is not None else None))
    row = m.rows()[0]
    return (row["spatial_std_kw"], row["unmet_kwh"]), sim


def _full_kw(sim: Sim) -> np.ndarray:
    """(M,) each station's charging power if all its plugged EVs charged what they still need, within its limit."""
    idx = sim.plugged()
    s = sim.day.sessions
    need = sim.need_kwh(idx)
    p = np.where(need > 1e-9, np.minimum(s.p_ch_max_kw[idx], need / s.eta_ch[idx] / sim.dt_h), 0.0)
    return np.minimum(np.bincount(sim.fleet.station[idx], p, sim.layout.n_station), sim.cfg.stations.p_max_kw)


def _share(want_kw: np.ndarray, full_kw: np.ndarray, levels: np.ndarray | None) -> np.ndarray:
    frac = np.divide(want_kw, full_kw, out=np.ones_like(full_kw), where=full_kw > 0).clip(0.0, 1.0)
    return frac if levels is None else levels[np.abs(levels[:, None] - frac[None, :]).argmin(axis=0)]


def _react(gain: float) -> Fractions:
    def fractions(sim: Sim) -> np.ndarray:
        full = _full_kw(sim)
        load = sim.base_zone_load_kw()[0, sim.t][sim.layout.station_zone] + full
        return _share(full - gain * np.maximum(load - load.mean(), 0.0), full, None)
    return fractions


def _follow(target_kw: np.ndarray, levels: np.ndarray | None) -> Fractions:
    return lambda sim: _share(target_kw[sim.t], _full_kw(sim), levels)


def measure(n_ev: int, days: range) -> dict[str, tuple[float, float]]:
    """Policy -> (mean spatial std kW, mean unmet kWh) over ``days``."""
    cfg = load_config("seed002", {"fleet": {"n_ev": n_ev}, "agents": {"station": "learned"},
                                  "oracle": {"objective": "spatial_balance"}})
    levels = np.asarray(cfg.stations.fraction_levels, dtype=float)
    out: dict[str, list[tuple[float, float]]] = {}
    for day in days:
        metrics, greedy = _day(cfg, day, None)
        out.setdefault("greedy", []).append(metrics)
        life = orc.Lifecycle.of(greedy)  # the oracle's first pass: greedy's day as it came
        row, plan = next(orc.oracle_episodes(cfg, [day]))
        out.setdefault("oracle", []).append((row["spatial_std_kw"], row["unmet_kwh"]))
        fixed = np.where(plan.planned, life.station, -1)
        n_st = greedy.layout.n_station
        target = np.stack([plan.p_kw[plan.planned & (life.station % n_st == j)].sum(axis=0) for j in range(n_st)],
                          axis=1)  # (T, M) the plan's charging power per station
        for gain in (0.5, 1.0, 2.0):
            out.setdefault(f"react gain {gain}", []).append(_day(cfg, day, _react(gain))[0])
        for routing, stations in (("oracle's routing", fixed), ("LBMS live", None)):
            for name, lv in (("continuous", None), ("levels", levels)):
                metrics, _ = _day(cfg, day, _follow(target, lv), stations)
                out.setdefault(f"follow, {name}, {routing}", []).append(metrics)
    return {k: tuple(float(x) for x in np.mean(v, axis=0)) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-ev", type=int, default=1000)
    ap.add_argument("--days", default="1000-1003", help="first-last evaluation day (seeds)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    first, last = (int(x) for x in a.days.split("-"))
    res = measure(a.n_ev, range(first, last + 1))
    if a.json:
        print(json.dumps({k: {"spatial_std_kw": v[0], "unmet_kwh": v[1]} for k, v in res.items()}, indent=1))
        return
    print(f"| policy ({a.n_ev} EVs, days {a.days}) | spatial std kW | unmet kWh |\n|---|---:|---:|")
    for k, (std, unmet) in res.items():
        print(f"| {k} | {std:.1f} | {unmet:,.0f} |")


if __name__ == "__main__":
    main()
