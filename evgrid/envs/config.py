"""The environment's configuration: one frozen dataclass per concern.

``EnvConfig`` nests them; :func:`load_config` builds it from a YAML file
(``experiments/*.yaml``) plus dotted ``key=value`` overrides, rejecting
unknown keys and out-of-range values with the field's dotted path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from evgrid.config import check_choice, check_int, check_real, from_dict, merge, parse_overrides, read_yaml
from evgrid.envs.fleet import FleetConfig
from evgrid.envs.market import MarketConfig
from evgrid.envs.routing import RoutingConfig
from evgrid.envs.stations import StationConfig
from evgrid.grid.profiles import LOAD_KINDS

FEEDERS = ("ieee33", "feeder14", "cigre_mv", "city")
LEVEL_MODES = ("learned", "rule")
EV_VIEWS = ("individual", "grouped", "rule")
EV_RULES = ("uncontrolled", "tou", "random")
OPERATOR_RULES = ("tou",)
OPERATOR_ACTIONS = ("multiplier", "level")


@dataclass(frozen=True)
class GridConfig:
    """The feeder(s), their base load and DER, and how limits are enforced."""

    feeder: str = "ieee33"
    """``ieee33``, ``feeder14`` (seed 001), ``cigre_mv`` or ``city`` (seed 002: ``city_networks`` copies of ``city_base``)."""
    der: bool = False
    """Place seed 003's PV, wind and diesel units (IEEE 33 only)."""
    n_zones: int | None = None
    """Operator zones per feeder (None: the feeder's default partition; ``city``: one zone per network)."""
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

    def __post_init__(self) -> None:
        check_choice("feeder", self.feeder, FEEDERS)
        check_choice("city_base", self.city_base, FEEDERS[:3])
        if not isinstance(self.der, bool):
            raise ValueError(f"der: expected true or false, got {self.der!r}")
        if self.der and self.feeder != "ieee33":
            raise ValueError(f"der: seed 003's DER sites exist for feeder 'ieee33' only, got feeder {self.feeder!r}")
        if self.n_zones is not None:
            check_int("n_zones", self.n_zones, 1, 64)
        check_int("city_networks", self.city_networks, 1, 64)
        check_choice("load_kind", self.load_kind, LOAD_KINDS)
        check_real("base_load_scale", self.base_load_scale, 0.0, 3.0)
        check_real("v_min_pu", self.v_min_pu, 0.8, 1.0)
        check_real("v_max_pu", self.v_max_pu, 1.0, 1.2)
        check_real("loading_max", self.loading_max, 0.0, 10.0, lo_open=True)
        if not isinstance(self.enforce_limits, bool):
            raise ValueError(f"enforce_limits: expected true or false, got {self.enforce_limits!r}")
        check_int("limit_rounds", self.limit_rounds, 1, 50)
        check_choice("backend", self.backend, ("auto", "sweep", "pandapower"))
        check_real("diesel_output", self.diesel_output, 0.0, 1.0)


@dataclass(frozen=True)
class AgentsConfig:
    """Which levels are learned agents and which run built-in rules."""

    operator: str = "learned"
    """Zone operators: ``learned`` (agents ``operator_<k>`` set price multipliers) or ``rule``."""
    operator_rule: str = "tou"
    """Rule for operators: ``tou`` (the plain time-of-use tariff, multiplier 1)."""
    operator_action: str = "multiplier"
    """Learned operators act with a continuous ``multiplier`` or a discrete price ``level``."""
    station: str = "learned"
    """Stations: ``learned`` (agents ``station_<j>`` pick a fraction level) or ``rule`` (``stations.dispatch`` at full allowance)."""
    ev_view: str = "grouped"
    """EVs: ``individual`` (agent ``ev_<k>`` per plugged EV), ``grouped`` (agent ``evs_<j>`` per station) or ``rule``."""
    ev_rule: str = "uncontrolled"
    """Rule for EVs when ``ev_view`` is ``rule``: ``uncontrolled`` (full power on arrival), ``tou`` (wait for the valley) or ``random``."""
    ev_slots: int | None = None
    """Padded EV slots per station in the grouped view (None: the station's ports), 1..4096."""

    def __post_init__(self) -> None:
        check_choice("operator", self.operator, LEVEL_MODES)
        check_choice("operator_rule", self.operator_rule, OPERATOR_RULES)
        check_choice("operator_action", self.operator_action, OPERATOR_ACTIONS)
        check_choice("station", self.station, LEVEL_MODES)
        check_choice("ev_view", self.ev_view, EV_VIEWS)
        check_choice("ev_rule", self.ev_rule, EV_RULES)
        if self.ev_slots is not None:
            check_int("ev_slots", self.ev_slots, 1, 4096)


@dataclass(frozen=True)
class RewardConfig:
    """Reward weights per level (costs enter with a minus sign)."""

    ev_cost: float = 1.0
    """EV: weight of its charging cost (currency; V2G income counts negative)."""
    ev_unmet_per_kwh: float = 2.0
    """EV: penalty per kWh short of the target at departure (paid per step as progress, see EVGridEnv)."""
    ev_throughput_per_kwh: float = 0.02
    """EV: battery wear per kWh through the battery."""
    curtail_per_kwh: float = 1.0
    """EV and station: penalty per kWh of their charging curtailed by grid limits."""
    station_w1: float = 1.0
    """Station: seed 002's w1, normalised price cost."""
    station_w2: float = 1.0
    """Station: seed 002's w2, normalised load disparity between networks (zones on one feeder)."""
    station_unmet_per_kwh: float = 0.2
    """Station: penalty per kWh its EVs miss at departure (paid per step as progress)."""
    operator_profit: float = 1.0
    """Operator: weight of its zone profit (EV revenue minus purchase, diesel, carbon and curtailment costs), per 1000 currency."""
    operator_peak_valley: float = 1.0
    """Operator: penalty on the squared deviation of zone load from its episode mean, per (zone nominal load)^2."""
    operator_violation: float = 0.1
    """Operator: penalty per bus-step outside voltage limits in its zone after enforcement."""

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            check_real(name, getattr(self, name), 0.0, 1e6)


@dataclass(frozen=True)
class EnvConfig:
    """One EVGrid environment: time, grid, stations, fleet, market, routing, agents, rewards."""

    name: str = "quickstart"
    """A label for runs and logs."""
    seed: int = 0
    """Seed of the first episode when ``reset`` gets none."""
    dt_min: int = 15
    """Step length, minutes; divides 1440."""
    start_hour: float = 0.0
    """Clock time of the first step, hours 0..24 (seed 001: 12 so the night lies inside the episode)."""
    n_steps: int = 96
    """Steps per episode, 1..100,000 (96 = one day at 15 min)."""
    grid: GridConfig = field(default_factory=GridConfig)
    stations: StationConfig = field(default_factory=StationConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    market: MarketConfig = field(default_factory=MarketConfig)
    routing: RoutingConfig | None = None
    """Station selection (seed 002); None: sessions come with their station."""
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    log_dir: str | None = None
    """Directory for ``steps.parquet`` and ``sessions.parquet``; None: no files."""

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_int("dt_min", self.dt_min, 1, 1440)
        if 1440 % self.dt_min:
            raise ValueError(f"dt_min: expected a divisor of 1440 minutes, got {self.dt_min}")
        check_real("start_hour", self.start_hour, 0.0, 24.0, hi_open=True)
        if (self.start_hour * 60) % self.dt_min:
            raise ValueError(f"start_hour: expected a multiple of dt_min ({self.dt_min} min), got {self.start_hour}")
        check_int("n_steps", self.n_steps, 1, 100_000)
        if self.fleet.scenario == "city_requests" and self.routing is None:
            raise ValueError("routing: fleet.scenario 'city_requests' needs a routing section (policy nearest or lbms)")


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | EnvConfig | None = None,
                overrides: Iterable[str] | Mapping[str, Any] = ()) -> EnvConfig:
    """EnvConfig from a YAML path, a mapping or an EnvConfig, plus overrides (``fleet.n_ev=500`` strings or a
    nested mapping).  A ``train:`` section (training settings) is not the env's and is left out."""
    from evgrid.config import to_dict

    if isinstance(source, EnvConfig):
        data: dict[str, Any] = to_dict(source)
    elif isinstance(source, Mapping):
        data = dict(source)
    elif source is None:
        data = {}
    else:
        data = read_yaml(source)
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    data = merge(data, extra)
    # an experiment YAML's train: section is for `evgrid train` (evgrid.agents.rllib.algos.TrainConfig)
    data.pop("train", None)
    return from_dict(EnvConfig, data)
