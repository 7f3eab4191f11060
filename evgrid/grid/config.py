"""The grid's configuration: which feeder(s), their base load and DER, and how limits are enforced.

Physics only: the environment's :class:`evgrid.envs.config.EnvConfig` nests it, and the power-flow
service (in process or the shared actor) builds its solvers from it alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from evgrid.grid.profiles import LOAD_KINDS
from evgrid.validate import check_bool, check_choice, check_int, check_real

FEEDERS = ("ieee33", "feeder14", "cigre_mv", "city")
# each single feeder's bus numbers in its source's own numbering, first and last (Feeder.numbers), for checks
# that run before a feeder is built: stations.buses, and n_zones (a zone holds at least one bus)
FEEDER_BUS_NUMBERS = {"ieee33": (1, 33), "feeder14": (1, 14), "cigre_mv": (0, 14)}
ZONINGS = ("equal_load", "modularity")  # evgrid.grid.zoning.METHODS: the config imports no pandapower


@dataclass(frozen=True)
class GridConfig:
    """The feeder(s), their base load and DER, and how limits are enforced."""

    feeder: str = "ieee33"
    """``ieee33``, ``feeder14`` (seed 001), ``cigre_mv`` or ``city`` (seed 002: ``city_networks`` copies of ``city_base``)."""
    der: bool = False
    """Place seed 003's PV, wind and diesel units (IEEE 33 only)."""
    n_zones: int | None = None
    """Operator zones per feeder (None: the feeder's default partition; ``city``: one zone per network); with
    ``zoning: modularity`` leave it unset."""
    zoning: str = "equal_load"
    """How a single feeder is split into operator zones: ``equal_load`` (connected zones of similar nominal load:
    the feeder's default partition, or ``n_zones`` of them) or ``modularity`` (seed 003's index of electrical-
    distance modularity, EV dispatchable potential and power balance, :mod:`evgrid.grid.zoning`, on the day's
    default profiles from ``load_kind``, ``base_load_scale`` and ``diesel_output``; it picks the number of zones
    itself, so ``n_zones`` must be unset)."""
    city_networks: int = 3
    """Networks in a ``city``, 1..64."""
    city_base: str = "ieee33"
    """Feeder each ``city`` network copies."""
    load_kind: str = "residential"
    """Daily base-load shape of a single feeder: residential, commercial or industrial."""
    base_load_scale: float = 0.5
    """Peak base load as a share of the feeder's nominal load, 0..3 (IEEE 33 at 1.0 already sits at 0.91 p.u.;
    at 0.5 its lowest voltage is 0.957, so EV charging is what pushes it under 0.95)."""
    v_min_pu: float = 0.95
    """Lower voltage limit, p.u."""
    v_max_pu: float = 1.05
    """Upper voltage limit, p.u."""
    loading_max: float = 1.0
    """Largest allowed line / transformer loading (1.0 = rating)."""
    enforce_limits: bool = True
    """Curtail EV charging (and raise V2G) where limits are violated, re-solving up to ``limit_rounds`` times."""
    limit_rounds: int = 8
    """Re-solves per step of the limit enforcement, 1..50."""
    backend: str = "auto"
    """Power-flow backend: ``auto`` (sweep for radial feeders), ``sweep`` or ``pandapower``."""
    diesel_output: float = 1.0
    """Diesel unit output as a share of its rating while the episode runs (seed 003 keeps it constant), 0..1."""
    export_limit_kw: float | None = None
    """Most power a feeder may send upstream, kW, >= 0 (0: no reverse flow at the substation); PV and wind
    beyond it are curtailed when ``enforce_limits`` is on, as is output that drives a bus above ``v_max_pu`` or
    a line past ``loading_max``.  None: no export limit."""

    def __post_init__(self) -> None:
        check_choice("feeder", self.feeder, FEEDERS)
        check_choice("city_base", self.city_base, FEEDERS[:3])
        check_bool("der", self.der)
        if self.der and self.feeder != "ieee33":
            raise ValueError(f"der: seed 003's DER sites exist for feeder 'ieee33' only, got feeder {self.feeder!r}")
        if self.n_zones is not None:
            # a zone holds at least one bus
            first, last = FEEDER_BUS_NUMBERS[self.city_base if self.feeder == "city" else self.feeder]
            check_int("n_zones", self.n_zones, 1, last - first + 1)
        check_choice("zoning", self.zoning, ZONINGS)
        if self.zoning == "modularity":
            if self.feeder == "city":
                raise ValueError("zoning: 'modularity' zones a single feeder; a 'city' has one zone per network, "
                                 "so use zoning 'equal_load'")
            if self.n_zones is not None:
                raise ValueError(f"n_zones: expected none with zoning 'modularity', which picks the number of zones "
                                 f"itself, got {self.n_zones}")
        check_int("city_networks", self.city_networks, 1, 64)
        check_choice("load_kind", self.load_kind, LOAD_KINDS)
        check_real("base_load_scale", self.base_load_scale, 0.0, 3.0)
        check_real("v_min_pu", self.v_min_pu, 0.8, 1.0)
        check_real("v_max_pu", self.v_max_pu, 1.0, 1.2)
        check_real("loading_max", self.loading_max, 0.0, 10.0, lo_open=True)
        check_bool("enforce_limits", self.enforce_limits)
        check_int("limit_rounds", self.limit_rounds, 1, 50)
        check_choice("backend", self.backend, ("auto", "sweep", "pandapower"))
        check_real("diesel_output", self.diesel_output, 0.0, 1.0)
        if self.export_limit_kw is not None:
            check_real("export_limit_kw", self.export_limit_kw, 0.0, 1e9)
