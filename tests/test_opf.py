"""The multi-period OPF (``evgrid.grid.opf``): closed-form optima, constraint residuals recomputed from the
schedule, AC checks, relaxation tightness, named infeasibility and bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandapower as pp
import pytest

from evgrid.grid import opf
from evgrid.grid.feeders import build_feeder, feeder_from_net
from tests.conftest import feeder

DT = 0.25
PLAIN = opf.OPFOptions(ac_offsets=False)  # plain LinDistFlow, for closed forms


def two_bus(r_ohm: float = 2.0, x_ohm: float = 1.0, load_kw: float = 500.0, v_min: float = 0.95):
    net = pp.create_empty_network(sn_mva=1.0)
    b0 = pp.create_bus(net, vn_kv=10.0)
    b1 = pp.create_bus(net, vn_kv=10.0)
    pp.create_ext_grid(net, b0, vm_pu=1.0)
    pp.create_line_from_parameters(net, b0, b1, length_km=1.0, r_ohm_per_km=r_ohm, x_ohm_per_km=x_ohm,
                                   c_nf_per_km=0.0, max_i_ka=1.0)
    pp.create_load(net, b1, p_mw=load_kw / 1e3, q_mvar=0.0)
    return feeder_from_net(net, "two_bus", n_zones=1, v_min_pu=v_min)


def sessions(bus, start, end, need_kwh, *, p_max=7.0, v2g=0.0, cap=50.0, e0=10.0, station=None):
    n = len(bus)
    full = lambda v: np.full(n, float(v))  # noqa: E731
    return opf.Sessions(bus=np.asarray(bus), start=np.asarray(start), end=np.asarray(end), p_ch_max_kw=full(p_max),
                        p_dis_max_kw=np.broadcast_to(np.asarray(v2g, float), (n,)).copy(), cap_kwh=full(cap),
                        e0_kwh=full(e0), e_target_kwh=e0 + np.broadcast_to(np.asarray(need_kwh, float), (n,)),
                        e_min_kwh=full(min(0.1 * cap, e0)),
                        eta_ch=full(0.9), eta_dis=full(0.9),
                        station=np.asarray(station if station is not None else np.zeros(n, int)))


def horizon(f, scale, T):
    s = np.asarray(scale, float).reshape(T, 1)
    return opf.Horizon(DT, s * f.base_p_kw, s * f.base_q_kvar, np.zeros((T, len(f.der_kind))))


def der_horizon(f, T, load_scale, renew_share):
    """Flat load at ``load_scale`` x nominal; PV and wind at ``renew_share`` of their rating, diesel at its own."""
    kinds = np.array(f.der_kind)
    avail = np.tile(f.der_p_max_kw, (T, 1)) * np.where(kinds == "diesel", 1.0, renew_share)
    return opf.Horizon(DT, np.full((T, 1), load_scale) * f.base_p_kw, np.full((T, 1), load_scale) * f.base_q_kvar,
                       avail)


def random_case(rng, T=24, n=40, scale=0.4):
    f = feeder("ieee33")
    hz = horizon(f, scale * (1 + 0.3 * np.sin(np.arange(T) / T * 2 * np.pi)), T)
    start = rng.integers(0, T // 2, n)
    end = np.minimum(start + rng.integers(T // 4, T // 2, n), T)
    reach = 0.9 * 7.0 * DT * (T // 4)  # kWh a session of the shortest window can store
    ss = sessions(rng.integers(1, f.n_bus, n), start, end, rng.uniform(0.1, 0.8, n) * reach,
                  v2g=np.where(rng.random(n) < 0.4, 5.0, 0.0), station=rng.integers(0, 3, n))
    return f, hz, ss


# ------------------------------------------------------------------------------------------ closed forms


def test_flat_target_fills_the_valley_then_rises_flat():
    base = np.array([4.0, 1.0, 3.0, 2.0])
    np.testing.assert_allclose(opf.flat_target_kw(base, 3.0, 1.0), [4, 3, 3, 3])  # 2 + 0 + 1 = 3 kWh
    np.testing.assert_allclose(opf.flat_target_kw(base, 10.0, 1.0), [5, 5, 5, 5])  # beyond the peak: flat
    rng = np.random.default_rng(0)
    for _ in range(50):
        b, e, dt = rng.uniform(0, 100, 17), rng.uniform(0, 2000), rng.choice([0.25, 0.5, 1.0])
        t = opf.flat_target_kw(b, e, dt)
        assert np.sum(t - b) * dt == pytest.approx(e, rel=1e-9)
        assert (t >= b - 1e-12).all() and np.ptp(t[t > b + 1e-9]) < 1e-9 if (t > b + 1e-9).any() else True


def test_two_bus_voltage_limit_caps_charging_at_the_hand_computed_headroom():
    """One EV at bus 1, cheap energy in step 0: it charges there up to the power at which LinDistFlow's
    v1² = 1 - 2 r P / base reaches v_min², and the rest later."""
    r_ohm, load, v_min = 2.0, 500.0, 0.95
    f = two_bus(r_ohm=r_ohm, x_ohm=0.5, load_kw=load, v_min=v_min)  # no reactive power: x drops out
    r_pu = r_ohm / (10.0 ** 2 / 1.0)
    p_total_kw = (1 - v_min ** 2) / (2 * r_pu) * 1e3  # the most bus 1 may draw
    headroom = p_total_kw - load
    assert 0 < headroom < 2000
    T = 2
    hz = horizon(f, np.ones(T), T)
    ss = sessions([1], [0], [2], need_kwh=0.9 * 1.5 * headroom * DT, p_max=2 * headroom, cap=1e4, e0=0.0)
    res = opf.solve_opf(f, hz, ss, opf.Objective(energy_price_per_kwh=np.array([0.1, 1.0])), PLAIN)
    assert res.p_ch_kw[0, 0] == pytest.approx(headroom, rel=1e-5)
    assert res.p_ch_kw[0, 1] == pytest.approx(0.5 * headroom, rel=1e-5)
    assert res.vm_pu[0, 1] == pytest.approx(v_min, abs=1e-7)


@pytest.mark.parametrize("method", opf.METHODS)
def test_a_stationary_battery_spanning_the_horizon_buys_cheap_and_sells_dear_less_its_losses(method):
    """Stationary storage is a session plugged in for the whole horizon that must end no emptier than it began:
    at 0.3 then 1.0 per kWh it charges fully (50 kW, 2 steps: 25 kWh bought, 22.5 kWh stored) and gives back
    what the cells hold, 22.5 x 0.9 = 20.25 kWh, at the dear price: 20.25 - 7.5 = 12.75 saved."""
    f = two_bus(load_kw=500.0)
    T = 4
    hz = horizon(f, np.ones(T), T)
    price = np.array([0.3, 0.3, 1.0, 1.0])
    battery = sessions([1], [0], [T], 0.0, p_max=50.0, v2g=50.0, cap=100.0, e0=10.0, station=[-1])
    options = dataclasses.replace(PLAIN, method=method)
    alone = opf.solve_opf(f, hz, None, opf.Objective(energy_price_per_kwh=price), options)
    res = opf.solve_opf(f, hz, battery, opf.Objective(energy_price_per_kwh=price), options)
    np.testing.assert_allclose(res.p_ch_kw[0], [50.0, 50.0, 0.0, 0.0], atol=1e-6)
    assert res.p_dis_kw[0, 2:].sum() * DT == pytest.approx(20.25, rel=1e-7)
    np.testing.assert_allclose(res.e_kwh[0, [0, 2, 4]], [10.0, 32.5, 10.0], atol=1e-6)
    assert alone.objective - res.objective == pytest.approx(12.75, rel=1e-7)


def test_single_ev_fills_the_cheapest_steps_first():
    f = feeder("ieee33")
    T = 8
    price = np.array([5, 3, 1, 2, 4, 6, 7, 8], float)
    hz = horizon(f, np.full(T, 0.3), T)
    need = 0.9 * 7.0 * DT * 2.5  # two and a half steps at full power
    res = opf.solve_opf(f, hz, sessions([5], [0], [T], [need]), opf.Objective(energy_price_per_kwh=price))
    want = np.zeros(T)
    want[[2, 3]] = 7.0
    want[1] = 3.5
    np.testing.assert_allclose(res.p_ch_kw[0], want, atol=1e-5)


@pytest.mark.parametrize("unmet_price, delivered", [(2.0, 0.0), (4.0, 1.0)])
def test_a_priced_shortfall_is_left_unmet_only_where_delivering_costs_more(unmet_price, delivered):
    """Energy at 3 per grid kWh costs 3 / 0.9 per stored kWh: an unmet kWh priced at 2 is cheaper than
    delivering it, one priced at 4 is not."""
    f = feeder("ieee33")
    T = 4
    need = 0.9 * 7.0 * DT * 2
    opt = opf.OPFOptions(soft=("target_kwh",), penalties={"target_kwh": unmet_price})
    res = opf.solve_opf(f, horizon(f, np.full(T, 0.3), T), sessions([5], [0], [T], [need]),
                        opf.Objective(energy_price_per_kwh=np.full(T, 3.0)), opt)
    stored = 0.9 * res.p_ch_kw.sum() * DT
    assert stored == pytest.approx(delivered * need, abs=1e-4)
    assert res.slack["target_kwh"] == pytest.approx((1 - delivered) * need, abs=1e-4)


def test_a_reachable_flat_target_is_met_exactly():
    f = feeder("ieee33")
    T = 16
    base = 0.3 + 0.2 * np.sin(np.arange(T) / T * 2 * np.pi)
    hz = horizon(f, base, T)
    need = np.full(6, 15.0)
    ss = sessions([3, 7, 12, 18, 25, 30], np.zeros(6, int), np.full(6, T), need, p_max=50.0, cap=200.0)
    target = opf.flat_target_kw(hz.load_p_kw.sum(1), need.sum() / 0.9, DT)
    res = opf.solve_opf(f, hz, ss, opf.Objective(tie_target_kw=target), PLAIN)  # lossless: reachable exactly
    assert res.costs["tie_deviation_mw2"] < 1e-8
    np.testing.assert_allclose(res.tie_kw, target, atol=1e-2)


def test_the_carbon_ladder_is_a_convex_staircase_and_the_model_prices_it_exactly():
    lad = opf.CarbonLadder(base_price_per_t=200, step_t=50, growth=0.25, n_steps=4, quota_t=10)
    assert lad.cost(10) == 0 and lad.cost(0) == -2000  # below the quota the allowance sells
    assert lad.cost(60) == pytest.approx(200 * 50)
    assert lad.cost(80) == pytest.approx(200 * 50 + 250 * 20)
    xs = np.linspace(-50, 300, 200)
    c = np.array([lad.cost(x) for x in xs])
    assert (np.diff(c, 2) >= -1e-6).all(), "convex"
    f = feeder("ieee33")
    T = 4
    hz = horizon(f, np.full(T, 0.5), T)
    obj = opf.Objective(carbon=opf.CarbonLadder(quota_t=0.5, step_t=0.5), grid_kg_per_kwh=0.7)
    res = opf.solve_opf(f, hz, None, obj)
    assert res.loss_kw.min() > 0, "LinDistFlow starts from the AC losses of the loads"
    emissions_t = 0.7 * np.maximum(res.tie_kw, 0).sum() * DT / 1e3
    assert res.costs["carbon"] == pytest.approx(obj.carbon.cost(emissions_t), rel=1e-6)


# ---------------------------------------------------------------------------- residuals on random inputs


@pytest.mark.parametrize("method", opf.METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schedules_keep_every_bound_and_agree_with_ac_power_flow(seed, method):
    rng = np.random.default_rng(seed)
    f, hz, ss = random_case(rng)
    price = rng.uniform(0.2, 1.0, hz.n_step)
    res = opf.solve_opf(f, hz, ss, opf.Objective(energy_price_per_kwh=price, peak_valley_weight=0.05),
                        opf.OPFOptions(station_ramp_kw=15.0, method=method))
    tol = 1e-5
    plugged = np.zeros_like(res.p_ch_kw, dtype=bool)
    for k in range(ss.n):
        plugged[k, ss.start[k]:ss.end[k]] = True
    assert (res.p_ch_kw[~plugged] == 0).all() and (res.p_dis_kw[~plugged] == 0).all()
    assert (res.p_ch_kw <= ss.p_ch_max_kw[:, None] + tol).all()
    assert (res.p_dis_kw <= ss.p_dis_max_kw[:, None] + tol).all()
    assert (res.p_dis_kw[ss.p_dis_max_kw == 0] == 0).all(), "discharge only where V2G is allowed"
    e = res.e_kwh
    assert (e[np.arange(ss.n), ss.end] >= ss.e_target_kwh - tol).all()
    assert (e <= ss.cap_kwh[:, None] + tol).all() and (e >= ss.e_min_kwh[:, None] - tol).all()
    # the bus injections are the loads plus the sessions' net power
    ev_bus = np.zeros((hz.n_step, f.n_bus))
    np.add.at(ev_bus.T, ss.bus, res.p_ch_kw - res.p_dis_kw)
    np.testing.assert_allclose(res.p_bus_kw, hz.load_p_kw + ev_bus, atol=1e-6)
    station = np.zeros((3, hz.n_step))
    np.add.at(station, ss.station, res.p_ch_kw - res.p_dis_kw)
    assert np.abs(np.diff(station, axis=1)).max() <= 15.0 + tol
    assert (res.vm_pu >= f.v_min_pu - 1e-6).all()
    # the reported objective is the schedule's cost, recomputed
    np.testing.assert_allclose(res.tie_kw, res.p_bus_kw.sum(1) + res.loss_kw, atol=1e-6)
    buy = np.maximum(res.tie_kw, 0)
    assert res.costs["purchase"] == pytest.approx(np.sum(price * buy) * DT, rel=1e-6)
    assert res.ac.converged and res.ac.max_dv_pu <= 0.005


def _objectives(hz, T):
    return {"price": opf.Objective(energy_price_per_kwh=np.where(np.arange(T) < T // 2, 1.0, 0.3)),
            "peak_valley": opf.Objective(energy_price_per_kwh=np.full(T, 0.5), peak_valley_weight=0.2),
            "tie_target": opf.Objective(tie_target_kw=opf.flat_target_kw(hz.load_p_kw.sum(1), 300.0, DT))}


@pytest.mark.parametrize("objective", ["price", "peak_valley", "tie_target"])
def test_the_lazy_method_reaches_the_direct_optimum_where_the_network_binds(objective):
    """Loads at 47 % with the evening's price high: the cheap steps' charging would sag the far buses below
    0.95 p.u., so the lazy model must find and add those voltage rows (and V2G sessions' stored-energy rows)."""
    f, hz, ss = random_case(np.random.default_rng(2), scale=0.47)
    obj = _objectives(hz, hz.n_step)[objective]
    direct = opf.solve_opf(f, hz, ss, obj, opf.OPFOptions(method="direct"))
    lazy = opf.solve_opf(f, hz, ss, obj, opf.OPFOptions(method="lazy"))
    assert lazy.solver == "HIGHS"
    assert lazy.objective == pytest.approx(direct.objective, rel=1e-6)
    # the solvers' own certificates: each dual bound within the gap asked (and the solvers' tolerances)
    assert abs(direct.optimality_gap) < 1e-7 and -1e-9 < lazy.optimality_gap < 1e-6
    assert lazy.vm_pu.min() >= f.v_min_pu.min() - 1e-7
    assert lazy.vm_pu.min() <= f.v_min_pu.min() + 1e-6, "the voltage limit binds: rows were added"
    assert (lazy.e_kwh >= ss.e_min_kwh[:, None] - 1e-6).all() and (lazy.e_kwh <= ss.cap_kwh[:, None] + 1e-6).all()
    assert lazy.ac.max_dv_pu <= 0.005


def test_the_lazy_method_prices_quadratic_diesel_to_the_gap_and_keeps_ac_rounds():
    f, T = build_feeder("ieee33", der=True), 12
    kinds, hz = np.array(f.der_kind), der_horizon(f, T, load_scale=0.5, renew_share=0.5)
    avail = hz.der_avail_kw
    ss = sessions(np.arange(2, 32), np.zeros(30, int), np.full(30, T), 8.0, v2g=5.0)
    obj = opf.Objective(energy_price_per_kwh=np.linspace(0.3, 1.2, T), curtail_cost_per_kwh=0.1,
                        diesel_cost=(2e-3, 0.5))
    ref = opf.solve_opf(f, hz, ss, obj, opf.OPFOptions(method="direct"))
    res = opf.solve_opf(f, hz, ss, obj, opf.OPFOptions(method="lazy"))
    diesel = res.der_kw[:, kinds == "diesel"]
    assert ((diesel > 1.0) & (diesel < avail[:, kinds == "diesel"] - 1.0)).any(), "diesel runs part-loaded"
    assert res.objective == pytest.approx(ref.objective, rel=1e-6)
    assert res.costs["diesel"] == pytest.approx(np.sum(2e-3 * DT * diesel ** 2 + 0.5 * DT * diesel), rel=1e-9)
    parallel = opf.solve_opf(f, hz, ss, obj, opf.OPFOptions(method="lazy", parallel_simplex=True))
    assert parallel.objective == pytest.approx(res.objective, rel=1e-7)
    # an AC round re-solves the program with its cuts and tangents, from the corrected constants
    rounds = opf.solve_opf(f, hz, ss, obj, opf.OPFOptions(method="lazy", ac_rounds=2))
    assert rounds.ac.max_dv_pu < 1e-6 < res.ac.max_dv_pu
    assert rounds.ac.max_loss_error_kw < 0.01 * res.ac.max_loss_error_kw


def test_ac_correction_takes_the_model_to_the_ac_voltages():
    f, hz, ss = random_case(np.random.default_rng(3), scale=0.45)
    target = opf.flat_target_kw(hz.load_p_kw.sum(1), 0.0, DT) + 100.0
    plain = opf.solve_opf(f, hz, ss, opf.Objective(tie_target_kw=target))
    corrected = opf.solve_opf(f, hz, ss, opf.Objective(tie_target_kw=target), opf.OPFOptions(ac_rounds=2))
    # the first round already starts from the AC flow of the loads alone; later rounds close the rest
    assert plain.ac.max_dv_pu < 0.005
    assert corrected.ac.max_dv_pu <= plain.ac.max_dv_pu and corrected.ac.max_dv_pu < 1e-4
    assert corrected.ac.max_loss_error_kw < 0.05 * corrected.ac.loss_kw.max()


def test_the_cone_relaxation_is_tight_on_ieee33_when_losses_cost_something():
    f, hz, ss = random_case(np.random.default_rng(4), T=12, n=20)
    res = opf.solve_opf(f, hz, ss, opf.Objective(energy_price_per_kwh=np.full(hz.n_step, 0.5),
                                                  loss_price_per_kwh=0.1),
                        opf.OPFOptions(formulation="socp"))
    assert res.ac.cone_gap < 1e-4
    assert res.ac.max_dv_pu < 1e-4
    np.testing.assert_allclose(res.loss_kw, res.ac.loss_kw, rtol=1e-3)


# ----------------------------------------------------------------------------------------- infeasibility


def test_an_unreachable_energy_target_names_its_sessions():
    f = feeder("ieee33")
    hz = horizon(f, np.full(4, 0.3), 4)
    ss = sessions([2, 3, 4], [0, 0, 2], [4, 4, 4], [1.0, 1.0, 20.0])  # 2 steps x 7 kW x 0.25 h < 20 kWh
    with pytest.raises(opf.InfeasibleError, match=r"sessions 2: energy target out of reach"):
        opf.solve_opf(f, hz, ss)


@pytest.mark.parametrize("method", opf.METHODS)
def test_a_voltage_that_cannot_be_held_names_its_bus(method):
    f = feeder("ieee33")
    hz = horizon(f, np.full(3, 1.2), 3)  # IEEE 33 at 120 % of its peak load sags below 0.95 p.u.
    with pytest.raises(opf.InfeasibleError, match=r"voltage below v_min_pu cannot be held at bus [0-9, .]+ \(as in Baran & Wu 1989.*\) at steps 0-2"):
        opf.solve_opf(f, hz, options=opf.OPFOptions(method=method))
    res = opf.solve_opf(f, hz, options=opf.OPFOptions(soft=True))
    assert res.slack["voltage_pu"] > 0 and res.slack["target_kwh"] == 0


def test_bad_input_names_the_field():
    f = feeder("ieee33")
    with pytest.raises(ValueError, match="solver: expected one of"):
        opf.OPFOptions(solver="GUROBI")
    with pytest.raises(ValueError, match="formulation: expected one of"):
        opf.OPFOptions(formulation="dc")
    with pytest.raises(ValueError, match="method: expected one of"):
        opf.OPFOptions(method="benders")
    with pytest.raises(ValueError, match="method: lazy needs formulation lindistflow and solver auto or HIGHS"):
        opf.OPFOptions(method="lazy", formulation="socp")
    with pytest.raises(ValueError, match="soft: method lazy .* cannot soften voltage_pu"):
        opf.OPFOptions(method="lazy", soft=("voltage_pu", "target_kwh"))
    with pytest.raises(ValueError, match="lazy_gap"):
        opf.OPFOptions(lazy_gap=0.5)
    with pytest.raises(ValueError, match="parallel_simplex"):
        opf.OPFOptions(parallel_simplex="yes")
    with pytest.raises(ValueError, match="penalties: expected kinds among"):
        opf.OPFOptions(penalties={"unmet": 1.0})
    with pytest.raises(ValueError, match="penalties.target_kwh"):
        opf.OPFOptions(penalties={"target_kwh": -1.0})
    hz = horizon(f, np.full(4, 0.3), 4)
    with pytest.raises(ValueError, match=r"load_p_kw: expected finite numbers of shape \(4, 33\)"):
        opf.solve_opf(f, opf.Horizon(DT, hz.load_p_kw[:, :5], hz.load_q_kvar, hz.der_avail_kw))
    with pytest.raises(ValueError, match=r"sessions.end: session 0 has 9, expected <= 4"):
        opf.solve_opf(f, hz, sessions([2], [0], [9], [1.0]))
    with pytest.raises(ValueError, match=r"tie_target_kw: expected 4 finite numbers"):
        opf.solve_opf(f, hz, None, opf.Objective(tie_target_kw=np.zeros(3)))


def test_der_curtailment_and_diesel_follow_their_costs():
    f, T = build_feeder("ieee33", der=True), 4
    kinds, hz = np.array(f.der_kind), der_horizon(f, T, load_scale=0.2, renew_share=0.8)
    avail = hz.der_avail_kw
    res = opf.solve_opf(f, hz, None, opf.Objective(energy_price_per_kwh=np.full(T, 1.0), curtail_cost_per_kwh=0.1,
                                                    diesel_cost=(0.0, 5.0)))
    renew = kinds != "diesel"
    # energy bought costs 1/kWh and diesel 5/kWh: diesel stays off; PV/wind run unless the network refuses
    assert np.allclose(res.der_kw[:, ~renew], 0, atol=1e-6)
    assert (res.der_kw[:, renew] <= avail[:, renew] + 1e-6).all()
    spilled = (avail[:, renew] - res.der_kw[:, renew]).sum() * DT
    assert res.costs["curtailment"] == pytest.approx(0.1 * spilled, abs=1e-6)
    assert (res.ac.vm_pu <= f.v_max_pu + 0.005).all()


def test_bench_opf_reports_its_fields_on_every_feeder():
    from evgrid.bench import bench_opf

    rows = list(bench_opf(("ieee33", "feeder14", "cigre_mv"), (8,), (30,), ("lindistflow", "socp"),
                          single_period_repeats=1))
    multi = [r for r in rows if r["problem"] != "single_period"]
    assert {(r["feeder"], r["problem"], r["formulation"]) for r in multi} == {
        (f, p, m) for f in ("ieee33", "feeder14", "cigre_mv") for p in ("min_cost", "seed001_stage1")
        for m in ("lindistflow", "socp")}
    by_method = {(r["feeder"], r["problem"], r["formulation"], r["method"]): r["objective"] for r in multi}
    assert {k[2] for k in by_method if k[3] == "lazy"} == {"lindistflow"}
    for (feeder_name, problem, form, method), objective in by_method.items():
        if method == "lazy":
            assert objective == pytest.approx(by_method[feeder_name, problem, form, "direct"], rel=1e-5)
    for r in multi:
        assert r["build_s"] > 0 and r["solve_s"] > 0 and np.isfinite(r["objective"])
        assert abs(r["optimality_gap"]) < 1e-5, r  # the solver's dual bound certifies the schedule
        if r["formulation"] == "lindistflow":  # transformers (CIGRE MV) included, through the AC offsets
            assert r["max_dv_pu_vs_ac"] <= 0.005, r
        else:
            assert r["cone_gap"] is not None and np.isfinite(r["max_dv_pu_vs_ac"])
    single = [r for r in rows if r["problem"] == "single_period"]
    assert sorted((r["feeder"], r["ac_rounds"]) for r in single) == [
        (f, k) for f in ("cigre_mv", "feeder14", "ieee33") for k in (1, 2)]
    for r in single:
        assert r["runopp_s"] > 0 and r["speedup_vs_runopp"] > 0 and r["total_cold_s"] > 0
        # our LinDistFlow (after AC rounds) against pandapower's AC optimum, both scored on AC power flow, and
        # within the limits there
        assert r["objective_vs_runopp"] < 0.01, r
        assert r["ac_v_violation_pu"] < 1e-4 and r["runopp_v_violation_pu"] < 1e-4, r


def test_bench_opf_json_output_is_json_only():
    """HiGHS prints a banner on file descriptor 1 when it is first used: ``--json`` output must stay parseable."""
    out = subprocess.run([sys.executable, "-m", "evgrid.cli", "bench", "opf", "--feeder", "feeder14", "--horizons", "4",
                          "--evs", "5", "--json"], capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["problem"] for r in rows} == {"min_cost", "seed001_stage1", "single_period"}
    assert any(r["solver"] == "HIGHS" for r in rows)
    out = subprocess.run([sys.executable, "-m", "evgrid.cli", "bench", "opf", "--feeder", "feeder14", "--horizons", "4",
                          "--evs", "5", "--problems", "min_cost", "--methods", "lazy", "--no-single-period", "--json"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert [(r["problem"], r["method"]) for r in map(json.loads, out.splitlines())] == [("min_cost", "lazy")]


# ------------------------------------------------------------------------------------------ aggregate EV model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_model_bounds_the_sessions_optimum_and_its_shares_keep_every_session_feasible(seed):
    """The aggregate is a relaxation (all sessions here share their efficiencies, so exactly one): its optimum is
    at most the session-by-session one; its disaggregated schedule keeps each session's power, energy and SOC
    bounds, and tracks the groups' profiles."""
    rng = np.random.default_rng(seed)
    f, hz, ss = random_case(rng, T=24, n=40)
    price = rng.uniform(0.2, 1.0, 24)
    obj = opf.Objective(energy_price_per_kwh=price)
    exact = opf.solve_opf(f, hz, ss, obj, opf.OPFOptions(station_p_max_kw=40.0))
    agg = opf.solve_opf(f, hz, ss, obj, opf.OPFOptions(station_p_max_kw=40.0, ev_model="aggregate"))
    assert agg.objective <= exact.objective * (1 + 1e-7) + 1e-7
    T = hz.n_step
    k = np.arange(T)[None, :]
    plugged = (k >= ss.start[:, None]) & (k < ss.end[:, None])
    assert np.all(agg.p_ch_kw <= ss.p_ch_max_kw[:, None] * plugged + 1e-7)
    assert np.all(agg.p_dis_kw <= ss.p_dis_max_kw[:, None] * plugged + 1e-7)
    assert np.all(agg.e_kwh[:, -1] >= ss.e_target_kwh - 1e-6)
    assert np.all(agg.e_kwh <= ss.cap_kwh[:, None] + 1e-6)
    v2g = ss.p_dis_max_kw > 0
    assert np.all(agg.e_kwh[v2g] >= ss.e_min_kwh[v2g, None] - 1e-6)
    station_kw = np.zeros((3, T))
    np.add.at(station_kw, ss.station, agg.p_ch_kw)
    assert station_kw.max() <= 40.0 + 1e-6
    assert agg.ac.max_dv_pu < 0.01


def test_disaggregation_reproduces_a_profile_the_sessions_can_follow():
    """A profile the sessions' own schedule makes is shared out exactly (zero tracking error)."""
    rng = np.random.default_rng(7)
    f, hz, ss = random_case(rng, T=24, n=30)
    exact = opf.solve_opf(f, hz, ss, opf.Objective(energy_price_per_kwh=rng.uniform(0.2, 1.0, 24)))
    group = ss.station * f.n_bus + ss.bus
    _, group = np.unique(group, return_inverse=True)
    G = group.max() + 1
    pc, pd = np.zeros((G, 24)), np.zeros((G, 24))
    np.add.at(pc, group, exact.p_ch_kw)
    np.add.at(pd, group, exact.p_dis_kw)
    p_ch, p_dis, off_kwh = opf.disaggregate(ss, DT, group, pc, pd)
    assert off_kwh == pytest.approx(0.0, abs=1e-5)
    net = np.zeros((G, 24))
    np.add.at(net, group, p_ch - p_dis)
    np.testing.assert_allclose(net, pc - pd, atol=1e-5)


def test_capacitor_steps_are_whole_and_cost_no_less_than_their_relaxation():
    """Integer capacitor steps (a MILP for HiGHS): every bank's output a whole number of steps, and the optimum
    no better than with continuous banks; the quadratic or conic problems refuse them by name."""
    f = feeder("ieee33")
    T = 6
    hz = horizon(f, np.full(T, 0.58), T)  # the far buses just inside v_min with the base load alone
    ss = sessions([17, 32, 17], [0, 1, 2], [6, 6, 6], [6.0, 5.0, 4.0])
    far = np.array([17, 32])  # the far ends of the two long laterals
    obj = opf.Objective(energy_price_per_kwh=np.linspace(1.0, 0.2, T), peak_valley_weight=0.01)
    relaxed = opf.solve_opf(f, hz, ss, obj, capacitors=opf.Capacitors(far, np.array([400.0, 400.0])))
    whole = opf.solve_opf(f, hz, ss, obj, capacitors=opf.Capacitors(far, np.array([400.0, 400.0]),
                                                                    np.array([150.0, 100.0])))
    assert whole.solver == "HIGHS"
    steps = whole.q_cap_kvar / np.array([150.0, 100.0])
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-6)
    assert (whole.q_cap_kvar <= 400.0 + 1e-6).all() and (np.round(steps)[:, 0] <= 2).all()
    assert whole.objective >= relaxed.objective - 1e-6
    with pytest.raises(ValueError, match="capacitors.step_kvar: integer capacitor steps need a linear problem"):
        opf.solve_opf(f, hz, ss, opf.Objective(tie_target_kw=np.zeros(T)),
                      capacitors=opf.Capacitors(far, np.array([400.0, 400.0]), np.array([150.0, 100.0])))
    with pytest.raises(ValueError, match="capacitors.step_kvar: expected 2 step sizes > 0"):
        opf.solve_opf(f, hz, ss, obj, capacitors=opf.Capacitors(far, np.array([400.0, 400.0]), np.array([0.0, 1.0])))


def test_aggregate_model_without_sessions_is_the_network_alone():
    f = feeder("ieee33")
    hz = horizon(f, np.full(6, 0.5), 6)
    obj = opf.Objective(energy_price_per_kwh=np.ones(6))
    agg = opf.solve_opf(f, hz, opf.Sessions.empty(), obj, opf.OPFOptions(ev_model="aggregate"))
    alone = opf.solve_opf(f, hz, opf.Sessions.empty(), obj)
    assert agg.p_ch_kw.shape == (0, 6) and agg.objective == pytest.approx(alone.objective, rel=1e-9)


def test_running_sums_add_up_each_group_in_order():
    group = np.array([3, 3, 3, 7, 9, 9])
    x = np.arange(1.0, 7.0)
    np.testing.assert_array_equal(opf._running_sums(group) @ x, [1, 3, 6, 4, 5, 11])
    assert opf._running_sums(np.zeros(0, int)).shape == (0, 0)


# ------------------------------------------------------------------------------- seed 002's balancing plan


def _spread(load_kw):
    return float(load_kw.std(axis=1).mean())


def test_balanced_schedule_fills_the_lighter_network_within_the_station_limit():
    base = np.array([[0.0, 100.0], [100.0, 100.0]])  # network 0 lighter at step 0 only
    ss = sessions([0], [0], [2], [90.0], p_max=100.0, cap=100.0)  # 90 kWh stored = 100 kWh drawn at eta 0.9
    p, spread = opf.balanced_schedule(base, ss, np.array([0]), 1.0)
    np.testing.assert_allclose(p, [[100.0, 0.0]], atol=1e-3)
    assert spread == pytest.approx(0.0, abs=1e-3)
    # at most 50 kW at the station: half of the energy has to go where network 0 is already level
    p, spread = opf.balanced_schedule(base, ss, np.array([0]), 1.0, station_p_max_kw=50.0)
    np.testing.assert_allclose(p, [[50.0, 50.0]], atol=1e-3)
    assert spread == pytest.approx(25.0, abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_schedule_keeps_every_session_whole_and_spreads_less_than_charging_on_arrival(seed):
    rng = np.random.default_rng(seed)
    T, Z, n = 24, 3, 30
    base = rng.uniform(50.0, 300.0, (T, Z))
    start = rng.integers(0, T - 6, n)
    end = np.minimum(start + rng.integers(4, 12, n), T)
    need = rng.uniform(0.2, 0.9, n) * 0.9 * 7.0 * DT * (end - start)  # each within reach of its window
    ss = sessions(np.zeros(n, int), start, end, need, station=rng.integers(0, Z, n))
    ss = dataclasses.replace(ss, cap_kwh=ss.e_target_kwh)  # no energy beyond the targets
    network = ss.station.copy()
    p, spread = opf.balanced_schedule(base, ss, network, DT)
    k = np.arange(T)[None, :]
    inside = (k >= start[:, None]) & (k < end[:, None])
    assert np.all(p >= -1e-6) and np.all(p <= 7.0 + 1e-6) and np.all(np.abs(p[~inside]) < 1e-6)
    np.testing.assert_allclose(0.9 * p.sum(axis=1) * DT, need, rtol=1e-5, atol=1e-5)
    load = base + p.T @ np.eye(Z)[network]
    assert spread == pytest.approx(_spread(load), rel=1e-5, abs=1e-4)
    # charging at full power from arrival until each target is one schedule among those the plan chose from
    steps_full = need / (0.9 * 7.0 * DT)
    on_arrival = np.clip(steps_full[:, None] - (k - start[:, None]), 0.0, 1.0) * 7.0 * inside
    assert spread <= _spread(base + on_arrival.T @ np.eye(Z)[network]) + 1e-6


def test_balanced_schedule_names_bad_input():
    ss = sessions([0], [0], [2], [5.0])
    with pytest.raises(ValueError, match="base_kw: expected .*networks >= 2"):
        opf.balanced_schedule(np.ones((2, 1)), ss, np.array([0]), DT)
    with pytest.raises(ValueError, match=r"network: expected 1 network numbers in \[0, 1\]"):
        opf.balanced_schedule(np.ones((2, 2)), ss, np.array([2]), DT)
    with pytest.raises(ValueError, match="sessions.end: expected <= 1"):
        opf.balanced_schedule(np.ones((1, 2)), ss, np.array([0]), DT)
    with pytest.raises(opf.InfeasibleError, match="sessions 0: energy target out of reach"):
        opf.balanced_schedule(np.ones((2, 2)), sessions([0], [0], [1], [50.0]), np.array([0]), DT)
