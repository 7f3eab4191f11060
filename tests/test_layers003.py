"""Seed 003's two layers (``evgrid.grid.layers003``): zone targets against eqs 9-11 recomputed from the dispatches and
the pandapower line data, the elastic response against a hand computation with cross terms, each zone within its
target (or an error naming it), cost terms recomputed from the schedule, and bad input."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from evgrid.envs import market as mk
from evgrid.grid import layers003 as L
from evgrid.grid import opf
from evgrid.grid.profiles import OFFPEAK, PEAK, VALLEY, TouTariff, load_shape, pv_profile
from tests.conftest import feeder

T, DT = 24, 1.0
MC = mk.MarketConfig()


def small_fleet(f, n: int = 90, seed: int = 7) -> L.EVFleet:
    rng = np.random.default_rng(seed)
    load_bus = np.flatnonzero(f.base_p_kw > 0)
    p = rng.uniform(3.3, 7.0, n)
    stay = rng.integers(2, 15, n)
    cap = rng.uniform(40.0, 60.0, n)
    e0 = rng.uniform(0.5, 0.8, n) * cap
    target = np.minimum(np.minimum(e0 + rng.uniform(2.0, 10.0, n), e0 + 0.9 * p * stay * DT), cap)
    v2g = rng.random(n) < 0.5
    return L.EVFleet(bus=rng.choice(load_bus, n), arrive=rng.integers(0, T, n), stay=stay, p_ch_max_kw=p,
                     p_dis_max_kw=np.where(v2g, p, 0.0), cap_kwh=cap, e0_kwh=e0, e_target_kwh=target,
                     e_min_kwh=np.where(v2g, np.minimum(0.3 * cap, e0), 0.0), eta_ch=np.full(n, 0.9),
                     eta_dis=np.full(n, 0.9))


@pytest.fixture(scope="module")
def case():
    f = feeder("ieee33", der=True)
    zob = f.zone_of_bus  # the feeder's three default zones
    period = TouTariff().period(dt_min=60)
    evs = L.zone_evs(small_fleet(f), zob, period, DT)
    shape = load_shape("residential", dt_min=60)
    load_p = 0.4 * shape[:, None] * f.base_p_kw[None, :]
    load_q = 0.4 * shape[:, None] * f.base_q_kvar[None, :]
    per_kind = {"pv": pv_profile(dt_min=60), "wind": np.full(T, 0.3), "diesel": np.ones(T)}
    avail = np.stack([per_kind[k] for k in f.der_kind], axis=1) * f.der_p_max_kw[None, :]
    hz = opf.Horizon(DT, load_p, load_q, avail)
    price = mk.purchase_price_per_kwh(period, MC)
    params = L.DistributionParams(purchase_price_per_kwh=price)
    plan = L.distribution_layer(f, hz, zob, evs, params)
    agg = L.aggregation_layer(plan.zone_target_kw, plan.zone_base_kw, evs, price,
                              trade_price_per_kwh=plan.trade_price_cap_per_kwh)
    return SimpleNamespace(f=f, zob=zob, period=period, evs=evs, hz=hz, price=price, params=params, plan=plan,
                           agg=agg)


# ------------------------------------------------------------------------------------------------ eqs 9-11


def _path_ohm(net, bus: int) -> tuple[float, float]:
    """Series R, X (ohm) of the lines from the external grid's bus to ``bus``, walked on pandapower's tables."""
    slack = int(net.ext_grid.bus.iloc[0])
    lines = net.line[net.line.in_service]
    adj: dict[int, list[tuple[int, float, float]]] = {}
    for _, ln in lines.iterrows():
        r = ln.r_ohm_per_km * ln.length_km / ln.parallel
        x = ln.x_ohm_per_km * ln.length_km / ln.parallel
        adj.setdefault(int(ln.from_bus), []).append((int(ln.to_bus), r, x))
        adj.setdefault(int(ln.to_bus), []).append((int(ln.from_bus), r, x))
    stack, seen = [(slack, 0.0, 0.0)], {slack}
    while stack:
        b, r, x = stack.pop()
        if b == bus:
            return r, x
        for nb, dr, dx in adj.get(b, []):
            if nb not in seen:
                seen.add(nb)
                stack.append((nb, r + dr, x + dx))
    raise AssertionError(f"bus {bus} not reached")


def test_zone_targets_are_the_larger_of_the_two_dispatches_eqs_9_10(case):
    plan, f = case.plan, case.f
    for d in range(int(case.zob.max()) + 1):
        buses = [i for i in range(f.n_bus) if case.zob[i] == d]
        p_ed = sum(plan.ed.p_bus_kw[:, i] for i in buses)
        p_lm = sum(plan.lm.p_bus_kw[:, i] for i in buses)
        q_ed = sum(plan.ed.q_bus_kvar[:, i] for i in buses)
        q_lm = sum(plan.lm.q_bus_kvar[:, i] for i in buses)
        np.testing.assert_allclose(plan.zone_target_kw[:, d], np.maximum(p_ed, p_lm), atol=1e-9)
        np.testing.assert_allclose(plan.zone_target_kvar[:, d], np.maximum(q_ed, q_lm), atol=1e-9)
        np.testing.assert_array_equal(plan.target_from_lm[:, d], p_lm > p_ed)
    # the two dispatches differ, so the target is not simply one of them
    assert plan.target_from_lm.any() and (~plan.target_from_lm).any()
    # each is a dispatch of its own objective: the LM has the lower AC losses, the ED the lower eq 1 cost
    assert plan.ac["lm"]["loss_kwh_ac"] <= plan.ac["ed"]["loss_kwh_ac"] + 1e-6


def test_trade_price_cap_follows_eq_11(case):
    plan, f, price = case.plan, case.f, case.price
    net = f.net
    vm = plan.ed.ac.vm_pu
    slack_pos = f.bus_position(int(net.ext_grid.bus.iloc[0]))
    for d in range(int(case.zob.max()) + 1):
        buses = np.flatnonzero(case.zob == d)
        # the zone's purchase node: its bus with the fewest lines to the slack
        depth = [len(_path_buses(net, int(f.bus_ids[i]))) for i in buses]
        a = int(buses[int(np.argmin(depth))])
        r, x = _path_ohm(net, int(f.bus_ids[a]))
        vn = float(net.bus.vn_kv.loc[f.bus_ids[a]])
        va, vb = vm[:, a] * vn, vm[:, slack_pos] * vn
        g_s = r / (r * r + x * x) if r or x else 0.0
        loss_kw = g_s * (va ** 2 + vb ** 2 - 2 * va * vb) * 1e3  # S x kV^2 = MW, three-phase
        np.testing.assert_allclose(plan.path_loss_kw[:, d], loss_kw, rtol=1e-6, atol=1e-9)
        p_b = np.maximum(plan.zone_p_ed_kw[:, d], 0.0)
        cap = plan.trade_price_cap_per_kwh[:, d]
        # eq 11: omega_Z P_B <= omega_g (P_B + G (...)), with equality at the cap
        assert (cap * p_b <= price * (p_b + loss_kw) + 1e-9).all()
        buying = p_b > 1e-3
        np.testing.assert_allclose((cap * p_b)[buying], (price * (p_b + loss_kw))[buying], rtol=1e-9)
        assert (cap >= price - 1e-12).all()


def _path_buses(net, bus: int) -> list[int]:
    import networkx as nx
    import pandapower.topology as top

    g = top.create_nxgraph(net)
    return nx.shortest_path(g, int(net.ext_grid.bus.iloc[0]), bus)


# ------------------------------------------------------------------------------------------ elastic response


def test_elastic_factor_matches_a_hand_computation_with_cross_terms():
    e = np.array(mk.SEED003_ELASTICITY)  # paper order: peak, off-peak, valley
    m_peak, m_off, m_valley = 1.3, 0.9, 0.6
    dp = (m_peak - 1, m_off - 1, m_valley - 1)
    hand = {PEAK: 1 + (-0.21 * dp[0] + 0.04 * dp[1] + 0.07 * dp[2]),
            OFFPEAK: 1 + (0.02 * dp[0] - 0.16 * dp[1] + 0.06 * dp[2]),
            VALLEY: 1 + (0.01 * dp[0] + 0.01 * dp[1] - 0.11 * dp[2])}
    m = np.empty(3)
    m[PEAK], m[OFFPEAK], m[VALLEY] = m_peak, m_off, m_valley
    got = L.elastic_factor(m, mk.paper_to_period_order(e))
    for code, want in hand.items():
        assert got[code] == pytest.approx(want, abs=1e-12)
    # the cross terms matter: the self-elasticities alone give another answer
    assert got[PEAK] != pytest.approx(1 - 0.21 * dp[0])


def test_aggregators_apply_the_elastic_response_block_by_block(case):
    # without the users' needs held the aggregators cut demand through the prices: multipliers leave 1
    agg = L.aggregation_layer(case.plan.zone_target_kw, case.plan.zone_base_kw, case.evs, case.price,
                              params=L.AggregationParams(keep_total_energy=False))
    assert np.abs(agg.multiplier - 1).max() > 0.1
    e = np.array(mk.SEED003_ELASTICITY)
    for d in range(case.evs.n_zone):
        m = agg.multiplier[d]
        dp = {PEAK: m[PEAK] - 1, OFFPEAK: m[OFFPEAK] - 1, VALLEY: m[VALLEY] - 1}
        order = (PEAK, OFFPEAK, VALLEY)
        factor = {order[i]: 1 + sum(e[i, j] * dp[order[j]] for j in range(3)) for i in range(3)}
        for b, code in enumerate(case.evs.block_period):
            np.testing.assert_allclose(agg.energy_kwh[d, :, b], agg.base_energy_kwh[d, :, b] * factor[int(code)],
                                       atol=1e-6)
    # and with them held (the default), no category ends with less energy than its baseline
    held = case.agg
    assert (held.energy_kwh.sum(axis=2) >= held.base_energy_kwh.sum(axis=2) - 1e-6).all()


# ------------------------------------------------------------------------------------------------ targets


def test_each_zone_keeps_within_its_target(case):
    agg, evs = case.agg, case.evs
    assert (agg.zone_net_kw <= agg.zone_target_kw + 1e-3).all()
    np.testing.assert_allclose(agg.zone_net_kw, case.plan.zone_base_kw + agg.zone_ev_after_kw, atol=1e-9)
    # every EV power within what is plugged in, V2G energy within its envelope
    assert (agg.charge_kw <= evs.resp_p_kw + 1e-6).all()
    assert (agg.v2g_charge_kw <= evs.v2g_ch_kw + 1e-6).all()
    assert (agg.v2g_discharge_kw <= evs.v2g_dis_kw + 1e-6).all()
    cum = np.cumsum(evs.v2g_eta_ch[..., None] * agg.v2g_charge_kw
                    - evs.v2g_inv_eta_dis[..., None] * agg.v2g_discharge_kw, axis=2) * DT
    assert (cum >= evs.v2g_lo_kwh - 1e-5).all() and (cum <= evs.v2g_hi_kwh + 1e-5).all()
    assert ((agg.capability_share >= 0) & (agg.capability_share <= 1 + 1e-6)).all()


def test_a_zone_that_cannot_meet_its_target_is_named(case):
    target = case.plan.zone_target_kw.copy()
    target[19, 1] -= 5e3  # far below anything zone 1's EVs can shave
    with pytest.raises(L.TargetError, match=r"zone 1 .*steps 19\b") as err:
        L.aggregation_layer(target, case.plan.zone_base_kw, case.evs, case.price)
    assert "zone 0" not in str(err.value) and "zone 2" not in str(err.value)


# ---------------------------------------------------------------------------------------------------- costs


def paper_ladder(excess_t: float, c: float = 200.0, d: float = 50.0, k: float = 0.25) -> float:
    """Eq 4 (continuous form), three tiers, unused quota sold at c."""
    if excess_t < 0:
        return c * excess_t
    return (c * min(excess_t, d) + (1 + k) * c * min(max(excess_t - d, 0.0), d)
            + (1 + 2 * k) * c * max(excess_t - 2 * d, 0.0))


def test_cost_terms_recomputed_from_the_schedule(case):
    plan, f, hz, price = case.plan, case.f, case.hz, case.price
    kinds = np.array(f.der_kind)
    ren = np.isin(kinds, ("pv", "wind"))
    buy = np.maximum(plan.ed.tie_kw, 0.0)
    diesel_kw = hz.der_avail_kw[:, kinds == "diesel"].sum(axis=1)  # must-run at its rating
    ren_kw = plan.ed.der_kw[:, ren].sum(axis=1)
    want = {"purchase": float((price * buy).sum() * DT),
            "capacity": 32.0 / 30.0 * float(buy.max()),
            "diesel": float(((1e-4 * diesel_kw ** 2 + 0.6 * diesel_kw + 13.025) * DT).sum()),
            "curtailment": 0.1 * float((hz.der_avail_kw[:, ren].sum(axis=1) - ren_kw).sum() * DT)}
    emission = (0.476 * 0.9 * buy.sum() + 0.8 * diesel_kw.sum()) * DT / 1e3
    quota = 0.7 * (diesel_kw.sum() + ren_kw.sum()) * DT / 1e3
    want["carbon"] = paper_ladder(emission - quota)
    want["total"] = sum(want.values())
    for k, v in want.items():
        assert plan.costs[k] == pytest.approx(v, rel=1e-9, abs=1e-6), k
    assert plan.emission_t == pytest.approx(emission) and plan.quota_t == pytest.approx(quota)
    # the OPF priced the same terms (its carbon ladder agrees while curtailment is nil)
    for k in ("purchase", "capacity", "carbon"):
        assert plan.opf_costs[k] == pytest.approx(plan.costs[k], rel=1e-6, abs=1e-3), k
    assert plan.opf_costs["diesel_fixed"] == pytest.approx(plan.costs["diesel"])
    # the aggregators' eq 22 terms from their schedule
    agg = case.agg
    w = agg.v2g_discharge_kw
    energy = float((price[:, None] * agg.zone_ev_after_kw).sum() * DT)
    trade = float((plan.trade_price_cap_per_kwh * agg.trade_kw).sum() * DT)
    assert agg.costs["energy"] == pytest.approx(energy)
    assert agg.costs["v2g"] == pytest.approx(0.1 * w.sum() * DT)
    assert agg.costs["total"] == pytest.approx(energy + trade + 0.1 * w.sum() * DT)
    assert agg.zone_costs.sum() == pytest.approx(agg.costs["total"])


# ------------------------------------------------------------------------------------------------ categories


def test_paper_categories_from_the_periods_a_stay_spans():
    period = TouTariff().period(dt_min=60)  # valley 0-8, peak 8-12 and 17-21, off-peak otherwise
    arrive = np.array([12, 9, 22, 22, 7])
    stay = np.array([4, 5, 8, 3, 2])
    need = np.array([5.0, 5.0, 10.0, 30.0, 20.0])
    n = arrive.size
    p = np.full(n, 7.0)
    ev = L.EVFleet(bus=np.zeros(n, np.int64), arrive=arrive, stay=stay, p_ch_max_kw=p, p_dis_max_kw=np.zeros(n),
                   cap_kwh=np.full(n, 60.0), e0_kwh=np.full(n, 20.0), e_target_kwh=20.0 + need,
                   e_min_kwh=np.zeros(n), eta_ch=np.full(n, 0.9), eta_dis=np.full(n, 0.9))
    # off-peak only; peak + off-peak; overnight, covered by valley + off-peak; overnight 22-01 too short for 30
    # kWh off the peak; valley + peak, 20 kWh not covered by the valley hour alone
    np.testing.assert_array_equal(L.paper_categories(ev, period, DT), [1, 2, 3, 4, 4])


# ---------------------------------------------------------------------------------------------------- inputs


def test_bad_input_names_the_field_and_the_allowed_range(case):
    plan, evs, price = case.plan, case.evs, case.price
    with pytest.raises(ValueError, match=r"zone_target_kw: expected shape \(24, 3\)"):
        L.aggregation_layer(plan.zone_target_kw[:, :2], plan.zone_base_kw, evs, price)
    bad_price = price.copy()
    bad_price[3] = -0.1
    with pytest.raises(ValueError, match=r"price_per_kwh: expected prices >= 0"):
        L.aggregation_layer(plan.zone_target_kw, plan.zone_base_kw, evs, bad_price)
    e = np.array(mk.SEED003_ELASTICITY)
    e[1, 1] = 0.16
    with pytest.raises(ValueError, match=r"elasticity: expected self-elasticities \(diagonal\) <= 0"):
        L.aggregation_layer(plan.zone_target_kw, plan.zone_base_kw, evs, price, e)
    with pytest.raises(ValueError, match=r"elasticity: expected shape \(3, 3\)"):
        L.aggregation_layer(plan.zone_target_kw, plan.zone_base_kw, evs, price, e[:2])
    with pytest.raises(ValueError, match=r"purchase_price_per_kwh: expected prices >= 0"):
        L.DistributionParams(purchase_price_per_kwh=bad_price)
    with pytest.raises(ValueError, match=r"purchase_price_per_kwh: expected shape \(24,\)"):
        L.distribution_layer(case.f, case.hz, case.zob, evs, L.DistributionParams(purchase_price_per_kwh=price[:12]))
    with pytest.raises(ValueError, match=r"zone_of_bus: expected \(33,\) integer zone numbers >= 0"):
        L.distribution_layer(case.f, case.hz, case.zob[:-1], evs, case.params)
    with pytest.raises(ValueError, match=r"multiplier_min: expected a finite number in \(0.0, 1.0\]"):
        L.AggregationParams(multiplier_min=0.0)
    with pytest.raises(ValueError, match=r"diesel_min_pu: expected a finite number in \[0.0, 1.0\]"):
        L.DistributionParams(purchase_price_per_kwh=price, diesel_min_pu=1.5)
    with pytest.raises(ValueError, match=r"priority: expected ranks of user types"):
        L.AggregationParams(priority=((4,), (1,), (2,)))
    fleet = small_fleet(case.f, n=5)
    short = L.EVFleet(**{**fleet.__dict__, "stay": np.array([3, 0, 2, 2, 2])})
    with pytest.raises(ValueError, match=r"ev.stay: EV 1 has 0, expected \[1, 24\]"):
        L.zone_evs(short, case.zob, case.period, DT)
    with pytest.raises(ValueError, match=r"period: expected a 1-D array of period codes"):
        L.zone_evs(fleet, case.zob, case.period + 3, DT)


# ---------------------------------------------------------------------------------------------- seed 003's day


def test_seed003_day_reports_table_2_beside_the_paper():
    day = L.seed003_day(L.Seed003Setting(n_ev=600, before=False))
    rows = {r["term"]: r for r in day.table()}
    assert set(rows) == {"purchase", "diesel", "curtailment", "carbon", "total"}
    assert rows["total"]["paper_after"] == 6220.84 and rows["purchase"]["paper_after"] == 2258.82
    assert all(np.isfinite(r["ours_after"]) for r in rows.values())
    assert rows["diesel"]["ours_after"] == pytest.approx(3288.6)  # must-run at full output, as the paper's
    assert day.distribution.ac["ed"]["converged"] and day.distribution.ac["ed"]["cone_gap"] < 1e-2
    agg = day.aggregation
    assert (agg.zone_net_kw <= agg.zone_target_kw + 1e-3).all()
    assert day.evs.n_ev.sum() == 600 and day.evs.n_zone >= 5
