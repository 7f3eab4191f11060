"""Each agent level's observation features, declared once: name, unit, range and meaning.

The environment's docstring table, the order the observation code writes them in, the compiled EV
kernel's columns and the baselines' indices all come from these declarations, so adding a feature is
one entry here and its computation where the level's observation is built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Feature:
    name: str
    unit: str
    range: str
    meaning: str


class FeatureSet(tuple):
    """An ordered, immutable set of features; position = column of the observation."""

    def __new__(cls, features):
        self = super().__new__(cls, features)
        self.names = tuple(f.name for f in self)  # read on every observation: computed once
        return self

    def index(self, name: str) -> int:  # type: ignore[override]
        """Column of feature ``name``."""
        for i, f in enumerate(self):
            if f.name == name:
                return i
        raise KeyError(f"feature: unknown feature {name!r}; expected one of {', '.join(self.names)}")

    def table(self, offset: int = 0) -> str:
        """Markdown rows: index | name | unit | range | meaning."""
        rows = ["| index | name | unit | range | meaning |", "|---|---|---|---|---|"]
        rows += [f"| {i + offset} | {f.name} | {f.unit} | {f.range} | {f.meaning} |" for i, f in enumerate(self)]
        return "\n".join(rows)


_PERIOD = (
    Feature("valley", "0/1", "{0, 1}", "tariff period one-hot: valley now"),
    Feature("offpeak", "0/1", "{0, 1}", "off-peak now"),
    Feature("peak", "0/1", "{0, 1}", "peak now"),
)
_CLOCK = (
    Feature("clock_sin", "-", "[-1, 1]", "sin(2 pi clock / 24 h)"),
    Feature("clock_cos", "-", "[-1, 1]", "cos(2 pi clock / 24 h)"),
)
_TIME_LEFT = Feature("time_left", "share", "[0, 1]", "share of the episode left")

OPERATOR = FeatureSet((
    Feature("zone_load_pu", "p.u. of zone nominal load", "(-inf, inf)", "zone net load, last step"),
    Feature("zone_pv_pu", "p.u. of zone nominal load", "[0, inf)", "zone PV output available this step"),
    Feature("zone_wind_pu", "p.u. of zone nominal load", "[0, inf)", "zone wind output available this step"),
    Feature("multiplier_now", "-", "[min, max]", "price multiplier in effect"),
    Feature("multiplier_next", "-", "[min, max]", "multiplier announced for the next step"),
    *_PERIOD, *_CLOCK,
    Feature("zone_v_min_pu", "p.u.", "[0, 2]", "lowest bus voltage in the zone, last step (1 before the "
                                              "first, 0 where the flow did not converge)"),
    Feature("plugged_share", "share", "[0, 1]", "plugged EVs / ports in the zone"),
    Feature("need_h", "h", "[0, inf)", "battery energy the zone's EVs still miss / zone nominal load"),
    _TIME_LEFT,
))

# appended to OPERATOR where the config has stationary storage (``storage``); a zone without a unit shows 0
OPERATOR_STORAGE = FeatureSet((
    Feature("storage_soc", "share", "[0, 1]", "energy stored in the zone's storage / its capacity"),
    Feature("storage_charge_av", "share", "[0, 1]", "charging power the zone's storage can take this step / its "
                                                     "p_max_kw"),
    Feature("storage_discharge_av", "share", "[0, 1]", "discharging power the zone's storage can give this step / "
                                                        "its p_max_kw"),
))


def operator_features(storage: bool) -> FeatureSet:
    """The operator's features: OPERATOR, then OPERATOR_STORAGE where the config has storage."""
    return FeatureSet((*OPERATOR, *OPERATOR_STORAGE)) if storage else OPERATOR


_STATION_OWN = (
    Feature("bus_vm_pu", "p.u.", "[0, 2]", "voltage at the station's bus, last step"),
    Feature("price_now", "currency/kWh", "[0, inf)", "retail price in the station's zone now"),
    *_PERIOD, *_CLOCK,
    Feature("load_share", "share", "[0, 1]", "charging power / station limit, last step"),
    Feature("plugged_share", "share", "[0, 1]", "plugged EVs / ports"),
)

STATION_CONTEXT = FeatureSet((*_STATION_OWN, _TIME_LEFT))
"""What grouped EVs see of their station (``context``)."""

STATION = FeatureSet((
    *_STATION_OWN,
    Feature("zone_base_share_dev", "share", "[-1, 1]", "zone's share of the zones' base load now - 1 / Z (eq 16)"),
    Feature("zone_load_share_dev", "share", "[-1, 1]", "zone's share of the zones' whole load, last step, - 1 / Z"),
    _TIME_LEFT,
))
"""A station agent's features after its count matrix: the context and its network's imbalance (seed 002's
disparity terms), from which a network shared by every station tells which network it serves."""

EV = FeatureSet((
    Feature("soc", "share", "[0, 1]", "state of charge"),
    Feature("soc_target", "share", "[0, 1]", "SOC the user wants at departure"),
    Feature("need_share", "share", "[0, 1]", "battery energy missing to the target / capacity"),
    Feature("hours_left_per_day", "days", "[0, inf)", "time to departure / 24 h"),
    Feature("p_ch_max_per_50kw", "per 50 kW", "[0, inf)", "charger limit / 50 kW"),
    Feature("p_dis_max_per_50kw", "per 50 kW", "[0, inf)", "discharge limit / 50 kW"),
    Feature("v2g", "0/1", "{0, 1}", "the user allows discharge"),
    Feature("price_now", "currency/kWh", "[0, inf)", "retail price in the EV's zone now"),
    Feature("price_next", "currency/kWh", "[0, inf)", "retail price announced for the next step"),
    Feature("bus_vm_pu", "p.u.", "[0, 2]", "voltage at the station's bus, last step"),
    Feature("laxity", "-", "[0, inf)", "remaining charge slots / remaining parking slots (seed 002's c / e)"),
    Feature("uninterruptible_on", "0/1", "{0, 1}", "charging has started and can no longer stop"),
    Feature("valley", "0/1", "{0, 1}", "the tariff's valley period now"),
))
