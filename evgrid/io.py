"""Run outputs: per-step and per-session Parquet logs, reproductions' results (pyarrow), figures.

``steps.parquet`` has one row per environment and step, ``sessions.parquet`` one row per EV session.
Each finished episode is written as its own row group, so an interrupted run keeps every episode it
completed.  Every column's unit and meaning (for energies: where it is measured, at the **grid** side of
the charger or the **battery** side, which differ by the charging and discharging efficiencies) is in
:data:`STEP_COLUMNS` / :data:`SESSION_COLUMNS`, in the tables below and in each Parquet field's metadata
(``unit``, ``description``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from evgrid.envs.state import STATUS

if TYPE_CHECKING:
    from evgrid.envs.sim import Sim
    from evgrid.envs.state import StepRecord

log = logging.getLogger(__name__)

# column -> (unit, meaning)
STEP_COLUMNS: dict[str, tuple[str, str]] = {
    "episode": ("-", "episode index since the environment was built"),
    "env": ("-", "environment of the vector env"),
    "t": ("step", "step index in the episode"),
    "clock_h": ("h", "clock time at the step's start"),
    "period": ("code", "tariff period: 0 valley, 1 off-peak, 2 peak"),
    "total_load_kw": ("kW", "power all feeders draw from upstream after limit enforcement (negative: export)"),
    "loss_kw": ("kW", "active losses of all feeders"),
    "min_vm_pu": ("p.u.", "lowest bus voltage after enforcement (NaN where the flow did not converge)"),
    "violations": ("buses", "buses outside the voltage limits on the flow of the decisions, before enforcement"),
    "violations_enforced": ("buses", "buses still outside the voltage limits after enforcement"),
    "converged": ("-", "every feeder's power flow converged"),
    "curtailed_kwh": ("kWh", "EV charging curtailed by limit enforcement, grid side"),
    "v2g_added_kwh": ("kWh", "V2G discharge added by limit enforcement, grid side"),
    "res_curtailed_kwh": ("kWh", "PV and wind energy curtailed by limit enforcement"),
    "ev_kw": ("kW", "EVs' net power after enforcement, grid side (charging positive)"),
    "vm_pu": ("p.u.", "voltage of every bus, feeders' bus order (Feeder.numbers gives each bus's number)"),
    "line_loading": ("-", "current / rating of every line then transformer, feeder by feeder"),
    "zone_load_kw": ("kW", "net load of every zone (base load + EVs - PV - wind - diesel)"),
    "price_multiplier": ("-", "operators' price multiplier of every zone in effect"),
    "price_per_kwh": ("currency/kWh", "retail price of every zone in effect"),
}
SESSION_COLUMNS: dict[str, tuple[str, str]] = {
    "episode": ("-", "episode index since the environment was built"),
    "env": ("-", "environment of the vector env"),
    "session": ("-", "session index within the episode (all environments)"),
    "ev_index": ("-", "k of agent ev_<k> (plug-in order in its environment), -1 if it never plugged in"),
    "station": ("-", "station of its environment, -1 if routing never chose one"),
    "kind": ("code", "session kind, index into evgrid.envs.fleet.KINDS"),
    "category": ("code", "seed 003's user category, index into evgrid.envs.fleet.CATEGORIES"),
    "status": ("-", "how the session ended: " + ", ".join(STATUS)),
    "v2g": ("-", "the user allows discharge"),
    "t_request_h": ("h", "arrival or charging request, hours after midnight of the simulated day"),
    "plug_step": ("step", "step it plugged in (or reaches the station), -1 if never"),
    "depart_step": ("step", "step it leaves, -1 if it never plugged in"),
    "cap_kwh": ("kWh", "battery capacity"),
    "soc_arrive": ("share", "state of charge when it plugged in"),
    "soc_final": ("share", "state of charge at the episode's end"),
    "soc_target": ("share", "state of charge the user wants at departure"),
    "e_requested_kwh": ("kWh", "energy missing to the target on arrival, battery side"),
    "e_delivered_kwh": ("kWh", "net energy from the grid (charged minus discharged), grid side: charging losses "
                               "make it exceed the energy stored"),
    "e_stored_kwh": ("kWh", "net energy into the battery, battery side ((soc_final - soc_arrive) x cap_kwh)"),
    "e_v2g_kwh": ("kWh", "energy discharged to the grid, grid side"),
    "e_curtailed_kwh": ("kWh", "charging curtailed by limit enforcement, grid side"),
    "e_travel_kwh": ("kWh", "energy spent driving to the station (routing), battery side"),
    "cost": ("currency", "paid by the user, V2G income netted"),
    "unmet_kwh": ("kWh", "energy short of the target when it left or was turned away, battery side (NaN "
                         "while it has not left)"),
}


def _table(rows: dict[str, object], columns: dict[str, tuple[str, str]]) -> pa.Table:
    """A table of ``rows`` (column -> values) whose fields carry their unit and meaning."""
    if list(rows) != list(columns):
        raise RuntimeError(f"log columns {sorted(set(rows) ^ set(columns))} are written or documented only once")
    arrays = [pa.array(v) for v in rows.values()]
    fields = [pa.field(name, a.type, metadata={"unit": columns[name][0], "description": columns[name][1]})
              for name, a in zip(rows, arrays)]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


class EpisodeLog:
    """Collects a :class:`Sim`'s step records and writes them per episode."""

    def __init__(self, directory: str | os.PathLike[str], sim: Sim) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sim = sim
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._rows: dict[str, list] = {k: [] for k in STEP_COLUMNS}
        self.episode = -1

    def start(self, episode: int) -> None:
        self.episode = episode
        self._rows = {k: [] for k in STEP_COLUMNS}

    def add_step(self, rec: StepRecord) -> None:
        """One row per environment of the step ``rec``."""
        sim, dt_h, n_env = self.sim, self.sim.dt_h, self.sim.n_env
        ev_env = sim.day.env[rec.plugged]
        finite_min = np.where(rec.converged, np.nanmin(np.where(rec.converged[:, None], rec.vm_pu, 1.0), axis=1),
                              np.nan)
        cols = dict(
            episode=[self.episode] * n_env, env=list(range(n_env)), t=[rec.t] * n_env,
            clock_h=[rec.clock_h] * n_env, period=[rec.period] * n_env, total_load_kw=rec.total_load_kw.tolist(),
            loss_kw=rec.loss_kw.tolist(), min_vm_pu=finite_min.tolist(), violations=rec.violations.tolist(),
            violations_enforced=rec.violations_enforced.tolist(), converged=rec.converged.tolist(),
            curtailed_kwh=(rec.curtail_kw.sum(axis=1) * dt_h).tolist(),
            v2g_added_kwh=(rec.v2g_add_kw.sum(axis=1) * dt_h).tolist(),
            res_curtailed_kwh=(rec.res_curtail_kw.sum(axis=1) * dt_h).tolist(),
            ev_kw=[float(rec.p_ev_kw[ev_env == e].sum()) for e in range(n_env)], vm_pu=rec.vm_pu.tolist(),
            line_loading=rec.line_loading.tolist(), zone_load_kw=rec.zone_load_kw.tolist(),
            price_multiplier=rec.price_mult.tolist(), price_per_kwh=rec.price_zone.tolist())
        for k, v in cols.items():
            self._rows[k].extend(v)

    def end_episode(self) -> None:
        """Write this episode's steps and sessions."""
        if self._rows["t"]:
            self._write("steps", _table(self._rows, STEP_COLUMNS))
        self._write("sessions", _table(session_columns(self.sim, self.episode), SESSION_COLUMNS))
        self._rows = {k: [] for k in STEP_COLUMNS}

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
    """One row per session of the episode just run (all environments), columns in SESSION_COLUMNS order."""
    s, fleet, n_st = sim.day.sessions, sim.fleet, sim.layout.n_station
    n = s.n
    return dict(
        episode=np.full(n, episode), env=sim.day.env, session=np.arange(n), ev_index=fleet.ev_index,
        station=np.where(fleet.station >= 0, fleet.station % n_st, -1), kind=s.kind, category=fleet.category,
        status=np.asarray(STATUS, dtype=object)[fleet.status], v2g=s.v2g, t_request_h=s.t_request_h,
        plug_step=fleet.plug_step, depart_step=fleet.dep_step, cap_kwh=s.cap_kwh, soc_arrive=fleet.soc_arrive,
        soc_final=fleet.soc, soc_target=s.soc_target,
        e_requested_kwh=np.maximum(s.soc_target - fleet.soc_arrive, 0.0) * s.cap_kwh,
        e_delivered_kwh=fleet.e_grid_kwh, e_stored_kwh=(fleet.soc - fleet.soc_arrive) * s.cap_kwh,
        e_v2g_kwh=fleet.e_v2g_kwh, e_curtailed_kwh=fleet.e_curtailed_kwh, e_travel_kwh=fleet.e_travel_kwh,
        cost=fleet.cost, unmet_kwh=fleet.unmet_kwh,
    )


# results.parquet of `evgrid reproduce`: one row per method x seed x metric; studies may add columns
RESULT_COLUMNS: dict[str, tuple[str, str]] = {
    "study": ("-", "study name (seed001, seed002, seed003, ...)"),
    "method": ("-", "method, policy or case (PPO, random, before, after, ...)"),
    "seed": ("-", "seed of the run (training and evaluation, or the simulated day)"),
    "metric": ("-", "metric name; its unit is in its name or in the study's report.md"),
    "value": ("metric's", "our value"),
    "paper_value": ("metric's", "the paper's value of the same method and metric; null where the paper gives none"),
}
_RESULT_TYPES = {"study": pa.string(), "method": pa.string(), "seed": pa.int64(), "metric": pa.string(),
                 "value": pa.float64(), "paper_value": pa.float64()}


def results_table(rows: list[dict[str, object]]) -> pa.Table:
    """``rows`` (dicts holding at least :data:`RESULT_COLUMNS`) as a table: the six columns typed (``seed``
    int64, ``value`` and ``paper_value`` float64, null where None), then any other keys in first-seen order,
    their types inferred, null where a row lacks them."""
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in RESULT_COLUMNS))
    arrays, fields = [], []
    for name, typ in _RESULT_TYPES.items():
        arrays.append(pa.array([r.get(name) for r in rows], type=typ))
        unit, meaning = RESULT_COLUMNS[name]
        fields.append(pa.field(name, typ, nullable=name == "paper_value",
                               metadata={"unit": unit, "description": meaning}))
    for name in extra:
        a = pa.array([r.get(name) for r in rows])
        arrays.append(a)
        fields.append(pa.field(name, a.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_results(rows: list[dict[str, object]], path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` as ``results.parquet`` (:func:`results_table`); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(results_table(rows), out)
    return out


def save_figure(fig: object, path: str | os.PathLike[str]) -> Path:
    """Save a matplotlib ``Figure`` as PNG at ``path`` (no pyplot: nothing global changes, no display needed)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # type: ignore[attr-defined]
    return out


def columns_table(columns: dict[str, tuple[str, str]]) -> str:
    """Markdown: column | unit | meaning."""
    return "\n".join(["| column | unit | meaning |", "|---|---|---|"] +
                     [f"| {name} | {unit} | {meaning} |" for name, (unit, meaning) in columns.items()])


__doc__ += f"""
``steps.parquet``:

{columns_table(STEP_COLUMNS)}

``sessions.parquet``:

{columns_table(SESSION_COLUMNS)}

``results.parquet`` (``evgrid reproduce``; a study may add columns):

{columns_table(RESULT_COLUMNS)}
"""
