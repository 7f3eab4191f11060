"""Stationary storage (seed 000's microgrid batteries): configuration, placement and one step's physics.

The units are a struct of arrays, one entry per unit (``U``), placed once per configuration; a step's
state is the SOC of every unit in every environment, ``(E, U)``.  Storage belongs to the zone operators:
its grid energy is part of its zone's net load, so the operator buys and sells it at the zone's purchase
price in the settlement.

Sign convention as for EVs: grid-side ``p_kw`` > 0 charges (a load), < 0 discharges.  The battery formulas
are the fleet's (:mod:`evgrid.envs.fleet`): a unit's usable window ``[soc_min, soc_max]`` of ``e_kwh`` is a
battery of ``(soc_max - soc_min) e_kwh`` whose charge limit keeps it full at most and whose discharge limit
keeps it empty at least.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from evgrid.envs import fleet as fl
from evgrid.grid.feeders import Feeder
from evgrid.grid.profiles import PEAK, VALLEY
from evgrid.validate import check_ints, check_real, check_reals

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

STORAGE_RULES = ("idle", "tou")


@dataclass(frozen=True)
class StorageConfig:
    """Stationary storage units owned by the zone operators: one per zone, or one per listed bus.  Every unit
    has the ratings below."""

    buses: tuple[int, ...] | None = None
    """Buses of the units, in the feeder's own numbering (``Feeder.numbering``), one unit each; None: one unit
    per operator zone, at the zone's bus with the largest base load (the first in bus order on a tie)."""
    e_kwh: float = 500.0
    """Capacity of each unit, kWh, (0, 1e6]."""
    p_max_kw: float = 250.0
    """Largest charging and discharging power of each unit, grid side, kW, [0, 1e5]."""
    eta_ch: float = 0.95
    """Charging efficiency (grid kWh -> stored kWh), [0.5, 1]."""
    eta_dis: float = 0.95
    """Discharging efficiency (stored kWh -> grid kWh), [0.5, 1]."""
    soc_min: float = 0.1
    """Lowest state of charge, [0, 1), below ``soc_max``."""
    soc_max: float = 0.9
    """Highest state of charge, (0, 1], above ``soc_min``."""
    soc0: float = 0.5
    """State of charge at every reset, [soc_min, soc_max]."""
    levels: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
    """Set-points a learned operator with ``agents.operator_action: level`` picks from, as shares of ``p_max_kw``
    (> 0 charges), each in [-1, 1]."""

    def __post_init__(self) -> None:
        if self.buses is not None and not check_ints("buses", self.buses, 0):
            raise ValueError("buses: expected one or more bus numbers (or null: one unit per zone), got []")
        check_real("e_kwh", self.e_kwh, 0.0, 1e6, lo_open=True)
        check_real("p_max_kw", self.p_max_kw, 0.0, 1e5)
        check_real("eta_ch", self.eta_ch, 0.5, 1.0)
        check_real("eta_dis", self.eta_dis, 0.5, 1.0)
        check_real("soc_min", self.soc_min, 0.0, 1.0, hi_open=True)
        check_real("soc_max", self.soc_max, 0.0, 1.0, lo_open=True)
        if self.soc_min >= self.soc_max:
            raise ValueError(f"soc_max: expected a state of charge above soc_min ({self.soc_min}) and at most 1, got "
                             f"{self.soc_max}")
        check_real("soc0", self.soc0, self.soc_min, self.soc_max)
        check_reals("levels", self.levels, -1.0, 1.0, min_len=1)


@dataclass(frozen=True, eq=False)
class StorageUnits:
    """The configured units, one entry per unit (U,); every environment has the same units."""

    bus: IntArray  # global bus
    zone: IntArray  # zone of the bus
    e_kwh: FloatArray  # capacity
    p_max_kw: FloatArray  # charge and discharge limit, grid side
    eta_ch: FloatArray
    eta_dis: FloatArray
    soc_min: FloatArray
    soc_max: FloatArray
    soc0: FloatArray

    @property
    def n(self) -> int:
        return int(self.bus.shape[0])

    def by_zone(self, x: FloatArray, n_zone: int) -> FloatArray:
        """(E, U) per-unit values summed over each zone's units, (E, Z)."""
        n_env = x.shape[0]
        lin = (np.arange(n_env)[:, None] * n_zone + self.zone[None, :]).ravel()
        return np.bincount(lin, x.ravel(), n_env * n_zone).reshape(n_env, n_zone)


def place(cfg: StorageConfig | None, feeders: list[Feeder], zone_of_bus: IntArray,
          base_p_kw: FloatArray) -> StorageUnits:
    """The units of ``cfg`` on the concatenated buses of ``feeders`` (none without a config)."""
    if cfg is None:
        bus = np.zeros(0, dtype=np.int64)
    elif cfg.buses is not None:  # on one feeder (EnvConfig refuses a city's)
        bus = np.array([feeders[0].position_of(b, "storage.buses") for b in cfg.buses], dtype=np.int64)
    else:
        n_zone = int(zone_of_bus.max()) + 1
        # the zone's most loaded bus: where its load, and so the storage's use, concentrates
        order = np.lexsort((np.arange(zone_of_bus.size), -base_p_kw, zone_of_bus))
        bus = order[np.searchsorted(zone_of_bus[order], np.arange(n_zone))]
    n = bus.size

    def full(name: str) -> FloatArray:
        return np.full(n, getattr(cfg, name) if cfg is not None else 0.0)

    return StorageUnits(bus=bus, zone=zone_of_bus[bus], e_kwh=full("e_kwh"), p_max_kw=full("p_max_kw"),
                        eta_ch=full("eta_ch"), eta_dis=full("eta_dis"), soc_min=full("soc_min"),
                        soc_max=full("soc_max"), soc0=full("soc0"))


class StorageStep(NamedTuple):
    """One step of every unit in every environment, (E, U)."""

    p_kw: FloatArray  # grid-side power within the bounds, kW (> 0 charges)
    limited_kw: FloatArray  # requested minus delivered: what the bounds held back, kW
    e_batt_kwh: FloatArray  # energy into the cells (negative: out of them), kWh
    soc: FloatArray  # state of charge after the step


def limits_kw(units: StorageUnits, soc: FloatArray, dt_h: float) -> tuple[FloatArray, FloatArray]:
    """Largest grid-side charging and discharging power this step, (E, U) each, kW >= 0, that keep every unit's
    SOC in [soc_min, soc_max]."""
    window_kwh = (units.soc_max - units.soc_min) * units.e_kwh
    u = (soc - units.soc_min) / (units.soc_max - units.soc_min)  # the SOC within the window
    return (fl.charge_limit_kw(u, window_kwh, units.p_max_kw, units.eta_ch, dt_h),
            fl.discharge_limit_kw(u, window_kwh, units.p_max_kw, units.eta_dis, True, 0.0, dt_h))


def step(units: StorageUnits, soc: FloatArray, setpoint_kw: npt.ArrayLike, dt_h: float) -> StorageStep:
    """The units' power and SOC after one step at the requested grid-side ``setpoint_kw`` (E, U).  A request
    beyond a unit's power or SOC bounds is held at the bound, as an EV's is, and the amount held back recorded;
    a non-finite request is an error."""
    req = np.asarray(setpoint_kw, dtype=float)
    if req.shape != soc.shape or not np.isfinite(req).all():
        raise ValueError(f"storage set-point: expected finite kW of shape {soc.shape} (environments, units), got "
                         f"{'shape ' + str(req.shape) if req.shape != soc.shape else 'non-finite values'}")
    p_ch_av, p_dis_av = limits_kw(units, soc, dt_h)
    p = np.minimum(np.maximum(req, -p_dis_av), p_ch_av)
    e_batt = fl.battery_kwh(p, units.eta_ch, units.eta_dis, dt_h)
    return StorageStep(p, req - p, e_batt, soc + e_batt / units.e_kwh)


def tou_setpoint_kw(units: StorageUnits, soc: FloatArray, period: int, dt_h: float) -> FloatArray:
    """The TOU rule's set-point (E, U): charge as fast as the bounds allow in the tariff's valley, discharge
    likewise in its peak, idle off-peak."""
    if period == VALLEY:
        return limits_kw(units, soc, dt_h)[0]
    if period == PEAK:
        return -limits_kw(units, soc, dt_h)[1]
    return np.zeros_like(soc)


def rule_setpoint_kw(rule: str, units: StorageUnits, soc: FloatArray, period: int, dt_h: float) -> FloatArray:
    """The set-point of storage ``rule`` (:data:`STORAGE_RULES`): ``idle`` holds every unit at 0 kW."""
    if rule == "tou":
        return tou_setpoint_kw(units, soc, period, dt_h)
    return np.zeros_like(soc)


__all__ = ["STORAGE_RULES", "StorageConfig", "StorageStep", "StorageUnits", "limits_kw", "place", "rule_setpoint_kw",
           "step", "tou_setpoint_kw"]
