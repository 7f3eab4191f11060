"""Run outputs: per-step and per-session Parquet logs (pyarrow).

``steps.parquet``: one row per environment and step — time, total feeder
load, losses, bus voltages, line loadings, zone loads, prices, curtailment,
violations (caused by the dispatch, and left after enforcement).  ``sessions.parquet``: one row per EV session — energy
requested, delivered, discharged, curtailed, cost, unmet energy, status.
Each finished episode is written as its own row group, so an interrupted
run keeps every episode it completed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from evgrid.envs.sim import Sim

log = logging.getLogger(__name__)


class EpisodeLog:
    """Collects a :class:`Sim`'s step records and writes them per episode."""

    def __init__(self, directory: str | os.PathLike[str], sim: Sim) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sim = sim
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._rows: list[dict] = []
        self.episode = -1

    def start(self, episode: int) -> None:
        self.episode = episode
        self._rows = []

    def add_step(self, rec: dict) -> None:
        sim = self.sim
        dt = sim.dt_h
        for e in range(sim.n_env):
            self._rows.append(dict(
                episode=self.episode, env=e, t=rec["t"], clock_h=rec["clock_h"], period=rec["period"],
                total_load_kw=float(rec["total_load_kw"][e]), loss_kw=float(rec["loss_kw"][e]),
                min_vm_pu=float(np.nanmin(rec["vm_pu"][e])) if rec["converged"][e] else float("nan"),
                violations=int(rec["violations"][e]), violations_enforced=int(rec["violations_enforced"][e]),
                converged=bool(rec["converged"][e]),
                curtailed_kwh=float(rec["curtail_kw"][e].sum() * dt), v2g_added_kwh=float(rec["v2g_add_kw"][e].sum() * dt),
                ev_kw=float(rec["p_ev_kw"][sim.env[rec["idx"]] == e].sum()),
                vm_pu=rec["vm_pu"][e].tolist(), line_loading=rec["line_loading"][e].tolist(),
                zone_load_kw=rec["zone_load_kw"][e].tolist(), price_multiplier=rec["price_mult"][e].tolist(),
                price_per_kwh=rec["price_zone"][e].tolist()))

    def end_episode(self) -> None:
        """Write this episode's steps and sessions."""
        if self._rows:
            self._write("steps", pa.Table.from_pylist(self._rows))
        self._write("sessions", pa.table(session_columns(self.sim, self.episode)))
        self._rows = []

    def _write(self, name: str, table: pa.Table) -> None:
        w = self._writers.get(name)
        if w is None:
            w = self._writers[name] = pq.ParquetWriter(self.dir / f"{name}.parquet", table.schema)
        w.write_table(table)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


def session_columns(sim: Sim, episode: int) -> dict[str, np.ndarray]:
    """One row per session of the episode just run (all environments)."""
    from evgrid.envs.sim import STATUS

    s = sim.s
    n = s.n
    requested = np.maximum(s.soc_target - sim.soc_arrive, 0.0) * s.cap_kwh
    return dict(
        episode=np.full(n, episode), env=sim.env, session=np.arange(n), ev_index=sim.ev_index,
        station=np.where(sim.station >= 0, sim.station % sim.n_station, -1), kind=s.kind,
        category=sim.category, status=np.asarray(STATUS, dtype=object)[sim.status], v2g=s.v2g,
        t_request_h=s.t_request_h, plug_step=sim.plug_step, depart_step=sim.dep_step, cap_kwh=s.cap_kwh,
        soc_arrive=sim.soc_arrive, soc_final=sim.soc, soc_target=s.soc_target, e_requested_kwh=requested,
        e_delivered_kwh=sim.e_grid_kwh, e_v2g_kwh=sim.e_v2g_kwh, e_curtailed_kwh=sim.e_curtailed_kwh,
        e_travel_kwh=sim.e_travel_kwh, cost=sim.cost, unmet_kwh=sim.unmet_kwh,
    )
