"""Market: stepped carbon cost (seed 003), elasticity orientation, zone prices, operating cost, validation."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evgrid.config import ConfigError, from_dict, to_dict
from evgrid.envs import market as mk
from evgrid.envs.market import CarbonConfig, MarketConfig, ZonePrices
from evgrid.grid.profiles import OFFPEAK, PEAK, VALLEY, TouTariff

CARBON = CarbonConfig()
MARKET = MarketConfig()
excess = st.floats(-500.0, 500.0, allow_nan=False, allow_infinity=False)


# ---------------------------------------------------------------------------------------------------------------
# stepped carbon cost


@pytest.mark.parametrize("excess_t,cost", [
    (0.0, 0.0),
    (-10.0, -10.0 * 200.0),                              # unused quota sold at s = 200
    (30.0, 30.0 * 200.0),
    (50.0, 50.0 * 200.0),
    (100.0, 50.0 * 200.0 + 50.0 * 250.0),
    (120.0, 50.0 * 200.0 + 50.0 * 250.0 + 20.0 * 300.0),  # seed 003's parameters, by hand
    (400.0, 50.0 * 200.0 + 50.0 * 250.0 + 300.0 * 300.0),  # the third interval is open-ended
])
def test_stepped_cost_hand_values(excess_t, cost):
    assert mk.stepped_carbon_cost(excess_t, CARBON) == pytest.approx(cost, rel=1e-12, abs=1e-9)


def test_stepped_cost_more_tiers_and_vector_shape():
    cfg = CarbonConfig(n_tiers=5)
    assert mk.stepped_carbon_cost(220.0, cfg) == pytest.approx(50 * (200 + 250 + 300 + 350) + 20 * 400)
    x = np.array([[-1.0, 0.0, 60.0], [100.0, 150.0, 220.0]])
    out = mk.stepped_carbon_cost(x, cfg)
    assert out.shape == x.shape
    assert out[1, 2] == pytest.approx(50 * (200 + 250 + 300 + 350) + 20 * 400)


def test_stepped_cost_is_continuous_at_every_breakpoint():
    for b in (0.0, 50.0, 100.0):
        lo, hi = mk.stepped_carbon_cost([b - 1e-9, b + 1e-9], CARBON)
        assert abs(hi - lo) < 1e-5


@given(excess, excess)
def test_stepped_cost_monotone_lipschitz_and_convex(x1, x2):
    lo, hi = sorted((x1, x2))
    c_lo, c_mid, c_hi = mk.stepped_carbon_cost([lo, 0.5 * (lo + hi), hi], CARBON)
    max_price = CARBON.tier_prices_per_t()[-1]
    assert c_lo <= c_hi + 1e-9
    assert c_hi - c_lo <= max_price * (hi - lo) + 1e-6  # continuous: no jumps
    assert c_mid <= 0.5 * (c_lo + c_hi) + 1e-6


@settings(max_examples=60)
@given(st.lists(st.floats(-40.0, 80.0, allow_nan=False), min_size=1, max_size=60))
def test_increments_sum_to_the_period_cost(steps_t):
    cum_t = 0.0
    total = 0.0
    for s in steps_t:
        total += float(mk.incremental_carbon_cost(cum_t, s, CARBON))
        cum_t += s
    assert total == pytest.approx(float(mk.stepped_carbon_cost(cum_t, CARBON)), rel=1e-9, abs=1e-6)


def test_emissions_and_quota():
    # imports: thermal share x thermal factor; exports emit nothing; diesel at its own factor
    e = mk.carbon_emissions_kg([100.0, -50.0], [0.0, 10.0], CARBON)
    assert e == pytest.approx([100 * 0.476 * CARBON.thermal_kg_per_kwh, 10 * CARBON.diesel_kg_per_kwh])
    assert mk.carbon_quota_kg(10.0, 30.0, CARBON) == pytest.approx(0.7 * 40.0)
    with pytest.raises(ValueError, match="^diesel_kwh:"):
        mk.carbon_emissions_kg(1.0, -1.0, CARBON)
    with pytest.raises(ValueError, match="^excess_t:"):
        mk.stepped_carbon_cost(np.nan, CARBON)


# ---------------------------------------------------------------------------------------------------------------
# elasticity


def test_elasticity_matrix_orientation():
    e = MARKET.elasticity_by_period
    # paper eq. (35): e_pp, e_pv, e_vp, e_oo, e_op
    assert e[PEAK, PEAK] == -0.21 and e[PEAK, VALLEY] == 0.07 and e[VALLEY, PEAK] == 0.01
    assert e[OFFPEAK, OFFPEAK] == -0.16 and e[OFFPEAK, PEAK] == 0.02 and e[VALLEY, VALLEY] == -0.11
    mult = np.ones(3)
    mult[PEAK] = 1.5
    f = mk.elastic_demand_factor(mult, MARKET)
    assert f[PEAK] == pytest.approx(1 - 0.21 * 0.5) and f[PEAK] < 1.0  # dearer peak: less peak demand
    assert f[VALLEY] == pytest.approx(1 + 0.01 * 0.5) and f[VALLEY] > 1.0  # ... some moves to the valley
    assert f[OFFPEAK] == pytest.approx(1 + 0.02 * 0.5)
    mult = np.ones(3)
    mult[VALLEY] = 0.5
    f = mk.elastic_demand_factor(mult, MARKET)
    assert f[VALLEY] > 1.0 and f[PEAK] < 1.0  # cheaper valley draws demand from the peak


def test_demand_factor_now_is_the_own_price_response():
    m = np.array([[0.5, 1.0, 1.5]])  # (E, Z)
    for p in (VALLEY, OFFPEAK, PEAK):
        got = mk.elastic_demand_factor_now(m, p, MARKET)
        full = np.ones((3, 3))
        full[:, p] = m[0]
        assert got[0] == pytest.approx(mk.elastic_demand_factor(full, MARKET)[:, p])
    # period per env broadcasts over zones
    f = mk.elastic_demand_factor_now(np.full((2, 3), 1.5), np.array([[VALLEY], [PEAK]]), MARKET)
    assert f[0] == pytest.approx(1 - 0.11 * 0.5) and f[1] == pytest.approx(1 - 0.21 * 0.5)


@given(st.lists(st.floats(0.5, 1.5), min_size=3, max_size=3))
def test_demand_factor_nonnegative_in_range(mult):
    assert np.all(mk.elastic_demand_factor(mult, MARKET) >= 0.0)


def test_demand_factor_rejects_bad_input():
    with pytest.raises(ValueError, match=r"^multiplier: .*\[0.5, 1.5\]"):
        mk.elastic_demand_factor([1.0, 1.0, 1.6], MARKET)
    with pytest.raises(ValueError, match="^multiplier:"):
        mk.elastic_demand_factor([1.0, 1.0], MARKET)
    with pytest.raises(ValueError, match="^period:"):
        mk.elastic_demand_factor_now(1.0, 3, MARKET)


def test_elasticity_that_could_go_negative_is_rejected():
    with pytest.raises(ValueError, match="^elasticity: demand factor"):
        MarketConfig(elasticity=((-2.5, 0.0, 0.0), (0.0, -0.1, 0.0), (0.0, 0.0, -0.1)))
    with pytest.raises(ValueError, match="^elasticity: expected self-elasticities"):
        MarketConfig(elasticity=((0.2, 0.0, 0.0), (0.0, -0.1, 0.0), (0.0, 0.0, -0.1)))


# ---------------------------------------------------------------------------------------------------------------
# zone prices


def test_zone_prices_announce_takes_effect_one_step_later():
    zp = ZonePrices(2, 3, MARKET)
    assert np.all(zp.current == 1.0) and np.all(zp.next == 1.0)
    m = np.array([[0.5, 1.0, 1.5], [1.25, 0.75, 1.0]])
    zp.announce(m)
    assert np.all(zp.current == 1.0) and np.array_equal(zp.next, m)
    assert np.allclose(zp.price_per_kwh(PEAK), MARKET.tariff.peak_price_per_kwh)
    zp.advance()
    assert np.array_equal(zp.current, m)
    assert np.allclose(zp.price_per_kwh(PEAK), MARKET.tariff.peak_price_per_kwh * m)
    zp.advance()  # no new announcement: the price is held
    assert np.array_equal(zp.current, m)
    # period per env
    got = zp.price_per_kwh(np.array([VALLEY, PEAK], dtype=np.int8))
    assert np.allclose(got[0], MARKET.tariff.valley_price_per_kwh * m[0])
    assert np.allclose(got[1], MARKET.tariff.peak_price_per_kwh * m[1])
    assert np.allclose(zp.v2g_price_per_kwh(PEAK), zp.price_per_kwh(PEAK) * MARKET.v2g_price_ratio)
    assert zp.demand_factor(np.array([VALLEY, PEAK])).shape == (2, 3)
    with pytest.raises(ValueError):
        zp.current[0, 0] = 2.0  # read-only views
    zp.reset(np.array([True, False]))
    assert np.all(zp.current[0] == 1.0) and np.array_equal(zp.current[1], m[1])
    zp.reset()
    assert np.all(zp.current == 1.0) and np.all(zp.next == 1.0)


def test_zone_prices_validation_and_levels():
    zp = ZonePrices(2, 3, MARKET)
    with pytest.raises(ValueError, match=r"^multiplier: expected finite values in \[0.5, 1.5\]"):
        zp.announce(np.full((2, 3), 1.6))
    with pytest.raises(ValueError, match="^multiplier:"):
        zp.announce(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="^multiplier: expected a shape"):
        zp.announce(np.ones((3, 2)))
    zp.announce(np.float32(1.5))  # scalars broadcast
    assert np.all(zp.next == 1.5)
    # a float32 Box action at a bound that float32 cannot represent is the bound, not an error
    zp7 = ZonePrices(1, 1, MarketConfig(price_multiplier_min=0.7, price_levels=(0.7, 1.0)))
    zp7.announce(np.float32(0.7))
    assert zp7.next[0, 0] == 0.7
    lv = np.array([[0, 2, 4], [1, 3, 2]])
    assert np.array_equal(zp.level_to_multiplier(lv), np.asarray(MARKET.price_levels)[lv])
    zp.announce_levels(lv)
    assert np.array_equal(zp.next, np.asarray(MARKET.price_levels)[lv])
    for bad in (np.array([[5, 0, 0], [0, 0, 0]]), np.array([[-1, 0, 0], [0, 0, 0]]), np.full((2, 3), 1.0)):
        with pytest.raises(ValueError, match=r"^level_idx: expected integer level indices in \[0, 4\]"):
            zp.level_to_multiplier(bad)
    with pytest.raises(ValueError, match="^period:"):
        zp.price_per_kwh(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="^n_zone:"):
        ZonePrices(1, 0, MARKET)


# ---------------------------------------------------------------------------------------------------------------
# operating cost


def test_diesel_cost_matches_the_paper_day():
    # seed 003: 3,288.6 per day for the 200 kW unit at full output
    assert float(mk.diesel_cost(200.0, 24.0, MARKET)) == pytest.approx(3288.6)
    day = sum(float(mk.diesel_cost(200.0, 0.25, MARKET)) for _ in range(96))
    assert day == pytest.approx(3288.6)
    assert float(mk.diesel_cost(0.0, 1.0, MARKET)) == 0.0  # off: no no-load cost


def test_operating_cost_by_hand_and_shapes():
    dt_h = 0.25
    purchase = np.array([[100.0, -20.0]])  # (E, Z); the second zone exports
    diesel = np.array([[200.0, 0.0]])
    curtailed = np.array([[0.0, 4.0]])
    renewable = np.array([[10.0, 30.0]])
    out = mk.operating_cost(purchase_kwh=purchase, diesel_kw=diesel, curtailed_kwh=curtailed, dt_h=dt_h,
                            cum_excess_t=np.zeros((1, 2)), cfg=MARKET, period=PEAK, renewable_kwh=renewable)
    assert all(getattr(out, f.name).shape == (1, 2) for f in dataclasses.fields(out))
    price = MARKET.purchase_tariff.peak_price_per_kwh
    assert out.purchase_cost == pytest.approx(np.array([[100 * price, -20 * price]]))  # export is revenue
    assert out.diesel_cost == pytest.approx(np.array([[137.025 * dt_h, 0.0]]))
    assert out.curtailment_cost == pytest.approx(np.array([[0.0, 0.4]]))
    c = MARKET.carbon
    emis = np.array([[100 * c.thermal_share * c.thermal_kg_per_kwh + 50 * c.diesel_kg_per_kwh, 0.0]])
    quota = np.array([[0.7 * 60.0, 0.7 * 30.0]])
    assert out.emission_kg == pytest.approx(emis) and out.quota_kg == pytest.approx(quota)
    assert out.excess_t == pytest.approx((emis - quota) / 1000)
    assert out.carbon_cost == pytest.approx(200.0 * (emis - quota) / 1000)  # first interval / sold at 200
    assert out.cum_excess_t == pytest.approx(out.excess_t)
    parts = ("purchase_cost", "diesel_cost", "carbon_cost", "curtailment_cost")
    assert out.total == pytest.approx(sum(getattr(out, k) for k in parts))


@settings(max_examples=25)
@given(st.lists(st.tuples(st.floats(-2e3, 3e4), st.floats(0.0, 200.0), st.integers(0, 2)), min_size=1,
                max_size=40))
def test_operating_cost_carbon_sums_to_the_episode_cost(steps):
    cum = np.zeros(1)
    carbon = 0.0
    for purchase_kwh, diesel_kw, period in steps:
        out = mk.operating_cost(purchase_kwh=np.array([purchase_kwh]), diesel_kw=np.array([diesel_kw]),
                                curtailed_kwh=np.zeros(1), dt_h=1.0, cum_excess_t=cum, cfg=MARKET, period=period)
        carbon += float(out.carbon_cost[0])
        cum = out.cum_excess_t
    assert carbon == pytest.approx(float(mk.stepped_carbon_cost(cum[0], MARKET.carbon)), rel=1e-9, abs=1e-6)


def test_operating_cost_rejects_bad_arrays():
    kw = dict(purchase_kwh=np.ones(2), diesel_kw=np.ones(2), curtailed_kwh=np.zeros(2), dt_h=0.25,
              cum_excess_t=np.zeros(2), cfg=MARKET, period=0)
    for name, bad in (("diesel_kw", -np.ones(2)), ("curtailed_kwh", -np.ones(2)), ("purchase_kwh", [np.inf, 0]),
                      ("renewable_kwh", -np.ones(2)), ("dt_h", 0.0), ("period", 5)):
        with pytest.raises(ValueError, match=f"^{name}:"):
            mk.operating_cost(**{**kw, name: bad})


# ---------------------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("cls,name,bad", [
    (CarbonConfig, "base_price_per_t", -1.0),
    (CarbonConfig, "base_price_per_t", float("nan")),
    (CarbonConfig, "sell_price_per_t", 250.0),  # above the buy price
    (CarbonConfig, "step_t", 0.0),
    (CarbonConfig, "growth", -0.1),
    (CarbonConfig, "n_tiers", 0),
    (CarbonConfig, "n_tiers", 2.5),
    (CarbonConfig, "quota_kg_per_kwh", -0.7),
    (CarbonConfig, "thermal_share", 1.2),
    (CarbonConfig, "thermal_kg_per_kwh", "0.9"),
    (CarbonConfig, "diesel_kg_per_kwh", True),
    (MarketConfig, "tariff", 1.0),
    (MarketConfig, "purchase_tariff", "cheap"),
    (MarketConfig, "v2g_price_ratio", -1.0),
    (MarketConfig, "price_multiplier_min", 0.0),
    (MarketConfig, "price_multiplier_min", 1.2),
    (MarketConfig, "price_multiplier_max", 0.9),
    (MarketConfig, "price_levels", ()),
    (MarketConfig, "price_levels", (0.5, 2.0)),
    (MarketConfig, "price_levels", (1.0, 0.5)),
    (MarketConfig, "price_levels", ("a",)),
    (MarketConfig, "elasticity", ((-0.1, 0.0), (0.0, -0.1))),
    (MarketConfig, "elasticity", ((-0.1, 0, 0), (0, -0.1, 0), (0, 0, float("inf")))),
    (MarketConfig, "elasticity_scale", 2.0),
    (MarketConfig, "diesel_a_per_kw2h", -1e-4),
    (MarketConfig, "diesel_b_per_kwh", float("inf")),
    (MarketConfig, "diesel_c_per_h", -1.0),
    (MarketConfig, "curtailment_cost_per_kwh", -0.1),
    (MarketConfig, "carbon", 3),
])
def test_every_validation_error_names_its_field(cls, name, bad):
    with pytest.raises(ValueError, match=f"^{name}:"):
        cls(**{name: bad})


@dataclasses.dataclass(frozen=True)
class _Holder:
    market: MarketConfig = dataclasses.field(default_factory=MarketConfig)


def test_nested_mapping_errors_keep_the_dotted_name():
    with pytest.raises(ValueError, match=r"^carbon\.growth:"):
        MarketConfig(carbon={"growth": -1.0})
    with pytest.raises(ConfigError, match=r"^market\.carbon\.step_t:"):
        from_dict(_Holder, {"market": {"carbon": {"step_t": -5}}})


def test_yaml_style_lists_and_mappings_are_accepted():
    cfg = MarketConfig(
        price_levels=[0.5, 1, 1.5],
        elasticity=[[-0.21, 0.04, 0.07], [0.02, -0.16, 0.06], [0.01, 0.01, -0.11]],
        tariff={"peak_price_per_kwh": 1.2, "peak_hours": [[17, 21]]},
        carbon={"growth": 0.5},
    )
    assert cfg.price_levels == (0.5, 1.0, 1.5) and isinstance(cfg.price_levels, tuple)
    assert cfg.elasticity == MARKET.elasticity and isinstance(cfg.elasticity[0], tuple)
    assert isinstance(cfg.tariff, TouTariff) and cfg.tariff.peak_hours == ((17, 21),)
    assert cfg.carbon.growth == 0.5
    hash(cfg)  # frozen and hashable: lists did not survive
    # a YAML round trip through the project's loader
    assert from_dict(MarketConfig, to_dict(MARKET)) == MARKET
    assert dataclasses.replace(MARKET, price_multiplier_max=2.0).price_multiplier_max == 2.0


def test_defaults_follow_seed003():
    c = MARKET.carbon
    assert (c.base_price_per_t, c.step_t, c.growth, c.quota_kg_per_kwh, c.thermal_share) == (200, 50, 0.25, 0.7,
                                                                                            0.476)
    assert MARKET.curtailment_cost_per_kwh == 0.1
    assert (MARKET.price_multiplier_min, MARKET.price_multiplier_max) == (0.5, 1.5)
    assert MARKET.elasticity == mk.SEED003_ELASTICITY
    # purchase below retail in every period, so charging earns a margin
    assert np.all(MARKET.purchase_by_period < MARKET.retail_by_period)


def test_market_is_pure_numpy():
    tree = ast.parse(Path(mk.__file__).read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"gymnasium", "pettingzoo", "ray", "torch"}
