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

from evgrid.config import from_dict, merge, parse_overrides, read_yaml
from evgrid.validate import check_choice, check_int, check_real, check_type
from evgrid.envs.fleet import FleetConfig
from evgrid.envs.market import MarketConfig
from evgrid.envs.routing import RoutingConfig
from evgrid.envs.stations import StationConfig
from evgrid.envs.storage import STORAGE_RULES, StorageConfig
from evgrid.grid.config import FEEDER_BUS_NUMBERS, GridConfig
from evgrid.grid.opf import EV_MODELS, FORMULATIONS, METHODS, SOFT_PENALTY, SOLVERS, OPFOptions

LEVEL_MODES = ("learned", "rule")
EV_VIEWS = ("individual", "grouped", "rule")
EV_RULES = ("uncontrolled", "tou", "random")
EV_SHIELDS = ("none", "deadline")
OPERATOR_RULES = ("tou",)
OPERATOR_ACTIONS = ("multiplier", "level")
ORACLE_OBJECTIVES = ("operator_cost", "peak_valley", "spatial_balance")
STATION_DISPARITIES = ("base", "load")


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
    ev_shield: str = "none"
    """Safety layer over the learned levels' charging decisions: ``deadline`` makes an EV that would miss its
    target by waiting one more step charge at full power whatever its agent asked (the TOU rule's own fallback)
    and holds back a discharge after which it would; under ``stations.dispatch: llf`` such an EV also charges
    whatever share of EVs its (learned) station lets charge; or ``none``."""
    storage_rule: str = "idle"
    """Rule for the stationary storage (``storage``) of rule operators: ``idle`` (0 kW) or ``tou`` (charge in the
    tariff's valley, discharge in its peak, as fast as the bounds allow).  Learned operators set it themselves."""

    def __post_init__(self) -> None:
        check_choice("operator", self.operator, LEVEL_MODES)
        check_choice("operator_rule", self.operator_rule, OPERATOR_RULES)
        check_choice("operator_action", self.operator_action, OPERATOR_ACTIONS)
        check_choice("station", self.station, LEVEL_MODES)
        check_choice("ev_view", self.ev_view, EV_VIEWS)
        check_choice("ev_rule", self.ev_rule, EV_RULES)
        check_choice("ev_shield", self.ev_shield, EV_SHIELDS)
        if self.ev_slots is not None:
            check_int("ev_slots", self.ev_slots, 1, 4096)
        check_choice("storage_rule", self.storage_rule, STORAGE_RULES)


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
    station_disparity: str = "base"
    """What w2 weighs (:func:`evgrid.envs.views.rewards.station_rewards`): ``base``, the paper's eq 16 on the
    zone's base load, per kWh the station charges; ``load`` (ours), the zone's share deviation of its whole
    load (EVs included) after the step, once per step."""
    station_unmet_per_kwh: float = 2.5
    """Station: penalty per kWh its EVs miss at departure (paid per step as progress).  Above station_w1 +
    station_w2, each charged kWh's largest cost, or withholding charge beats charging at the dearest steps (at
    0.2 the quickstart's stations learned to charge nothing)."""
    operator_profit: float = 1.0
    """Operator: weight of its zone profit (EV revenue minus purchase, diesel, carbon and curtailment costs), per 1000 currency."""
    operator_peak_valley: float = 1.0
    """Operator: penalty on the squared deviation of zone load from its episode mean, per (zone nominal load)^2."""
    operator_violation: float = 0.1
    """Operator: penalty per bus-step outside voltage limits in its zone after enforcement."""

    def __post_init__(self) -> None:
        check_choice("station_disparity", self.station_disparity, STATION_DISPARITIES)
        for name in self.__dataclass_fields__:
            if name != "station_disparity":
                check_real(name, getattr(self, name), 0.0, 1e6)


@dataclass(frozen=True)
class OracleConfig:
    """How the oracle policy (``evgrid evaluate --policy oracle``, :mod:`evgrid.agents.oracle`) plans an episode."""

    objective: str = "operator_cost"
    """``operator_cost``: purchase and carbon cost as the market settles them per zone, plus PV / wind
    curtailment; ``peak_valley``: the spread between each feeder's highest and lowest load; ``spatial_balance``
    (several networks, seed 002): the mean over steps of the standard deviation of the networks' loads, planned
    over all networks at once, then each feeder drawing that load within its limits."""
    formulation: str = "lindistflow"
    """Network model of the plan: ``lindistflow`` (with AC offsets) or ``socp``."""
    solver: str = "auto"
    """``auto`` (HiGHS for linear programs, Clarabel otherwise), ``CLARABEL``, ``HIGHS`` or ``SCS``."""
    ev_model: str = "sessions"
    """``sessions``: a variable per session and step (exact; the problem grows with the fleet), or ``aggregate``:
    the sessions of each station as one flexible load, shared out afterwards (a relaxation whose size does not
    grow with the fleet; see ``evgrid.grid.opf.OPFOptions``)."""
    method: str = "direct"
    """``direct`` (every row of the plan at once) or ``lazy`` (``lindistflow`` with ``auto`` or ``HIGHS``:
    network rows added as the plan breaks them, the same plan ~10-30x faster on a day of thousands of EVs; no
    ``soft`` network limits)."""
    ac_rounds: int = 0
    """``lindistflow``: re-solves with the AC flow's residuals at the previous solution, 0..10 (each brings the
    plan's voltages closer to AC, ~2e-3 to ~2e-4 p.u., at the price of a solve)."""
    v_margin_pu: float = 0.003
    """The plan keeps this far inside the voltage limits, p.u., 0..0.05: the linear model's error against AC
    (up to ~2e-3 p.u. without ``ac_rounds``) plus the limit enforcement's own margin (5e-4 p.u.), so the replay
    needs no curtailment."""
    soft: tuple[str, ...] = ("target_kwh",)
    """Limits the plan may give at a named penalty (``evgrid.grid.opf.SOFT_PENALTY``) rather than fail:
    ``target_kwh`` (energy a session cannot get within the network's and the station's limits is left unmet, as
    the simulator lets it be), ``voltage_pu``, ``voltage_high_pu``, ``loading_kw``, ``ramp_kw``.  What gives is
    logged.  Any other limit that cannot be held is an error naming it."""
    rounds: int = 3
    """Plans per episode, 1..10: where routing depends on the load (LBMS), the replay may send EVs elsewhere than
    the plan assumed; the oracle then plans again on the sessions as they came."""
    unmet_price_per_kwh: float | None = None
    """``operator_cost``: what a kWh a session leaves short of its target costs the plan, [0, 1e6]; None: the
    config's ``reward.ev_unmet_per_kwh``, the price at which ``evgrid evaluate``'s ``cost_with_unmet`` charges
    every policy, so the oracle minimises what it is compared on."""

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, ORACLE_OBJECTIVES)
        check_choice("formulation", self.formulation, FORMULATIONS)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("ev_model", self.ev_model, EV_MODELS)
        check_choice("method", self.method, METHODS)
        check_int("ac_rounds", self.ac_rounds, 0, 10)
        check_real("v_margin_pu", self.v_margin_pu, 0.0, 0.05)
        bad = [k for k in self.soft if k not in SOFT_PENALTY] if isinstance(self.soft, tuple) else [self.soft]
        if bad:
            raise ValueError(f"soft: expected a list of {', '.join(SOFT_PENALTY)}, got {bad[0]!r}")
        check_int("rounds", self.rounds, 1, 10)
        # the combinations the OPF refuses (method lazy with socp, another solver or soft network limits)
        OPFOptions(formulation=self.formulation, solver=self.solver, method=self.method, soft=self.soft)
        if self.unmet_price_per_kwh is not None:
            check_real("unmet_price_per_kwh", self.unmet_price_per_kwh, 0.0, 1e6)


@dataclass(frozen=True)
class EnvConfig:
    """One EVGrid environment: time, grid, stations, fleet, market, routing, storage, agents, rewards, oracle."""

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
    storage: StorageConfig | None = None
    """Stationary storage of the zone operators (seed 000); None: none."""
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
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
        check_type("name", self.name, str, "a text label")
        if self.log_dir is not None:
            check_type("log_dir", self.log_dir, str, "a directory path or null")
        if self.fleet.scenario == "city_requests" and self.routing is None:
            raise ValueError("routing: fleet.scenario 'city_requests' needs a routing section (policy nearest or lbms)")
        self._check_stations()

    def _check_stations(self) -> None:
        """What the sections say of each other's stations and the storage's buses, checked before anything is built."""
        n = self.stations.n_station
        self._check_buses("stations.buses", self.stations.buses, "a city's stations go one per network in turn")
        if self.storage is not None:
            self._check_buses("storage.buses", self.storage.buses, "a city's storage goes one unit per zone")
        for name in ("station_counts", "station_weights"):
            given = getattr(self.fleet, name)
            if given is not None and len(given) != n:
                raise ValueError(f"fleet.{name}: expected {n} values (one per station, stations.n_station), got "
                                 f"{len(given)}")

    def _check_buses(self, name: str, buses: tuple[int, ...] | None, city: str) -> None:
        """Configured bus numbers exist on the feeder (checked before anything is built)."""
        if buses is None:
            return
        if self.grid.feeder == "city":
            raise ValueError(f"{name}: {city}; leave buses out")
        first, last = FEEDER_BUS_NUMBERS[self.grid.feeder]
        bad = [b for b in buses if not first <= b <= last]
        if bad:
            raise ValueError(f"{name}: {bad[0]} is not a bus of feeder {self.grid.feeder!r}, whose buses are "
                             f"numbered {first}-{last} in its source's own numbering (Feeder.numbering)")


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
