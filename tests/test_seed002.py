"""Seed 002: per-network TOU, the station reward of eqs 15-18, LBMS without herding, DDQN settings, the
study's metrics (user cost with compensation, eqs 29-31) and its quick reproduction (slow)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from evgrid.agents.rllib.algos import TrainConfig, _training_settings, load_run_config
from evgrid.agents.rllib.replay import REPLAY_TYPE
from evgrid.envs import market as mk
from evgrid.envs import routing as rt
from evgrid.envs.config import load_config
from evgrid.envs.sim import Sim, _route
from evgrid.envs.state import TRAVELLING
from evgrid.envs.views import rewards as rw
from evgrid.grid.profiles import OFFPEAK, PEAK, VALLEY
from evgrid.studies import common
from evgrid.studies.seed002 import combined_scores, user_cost_total


def test_each_zone_takes_its_peak_and_valley_from_its_own_base_load():
    clock = np.array([VALLEY, VALLEY, OFFPEAK, OFFPEAK, PEAK, PEAK])
    base = np.array([[1, 6], [2, 5], [3, 4], [4, 3], [5, 2], [6, 1]], dtype=float)  # (T, Z): opposite shapes
    p = mk.load_ranked_periods(base, clock)
    assert p[:, 0].tolist() == [VALLEY, VALLEY, OFFPEAK, OFFPEAK, PEAK, PEAK]
    assert p[:, 1].tolist() == [PEAK, PEAK, OFFPEAK, OFFPEAK, VALLEY, VALLEY]
    with pytest.raises(ValueError, match="clock_period: expected shape"):
        mk.load_ranked_periods(base, clock[:4])
    with pytest.raises(ValueError, match="tou_basis: expected one of 'clock', 'base_load'"):
        mk.MarketConfig(tou_basis="hourly")


def test_the_city_prices_each_network_by_its_own_base_load():
    sim = Sim(load_config("seed002", ["fleet.n_ev=50"]))
    sim.reset(3)
    base = sim.base_zone_load_kw()[0]  # (T, Z)
    tariff = sim.cfg.market.tariff
    assert not (sim.zone_period[0, :, 0] == sim.zone_period[0, :, 1]).all()
    for z in range(base.shape[1]):
        sim.t = int(np.argmax(base[:, z]))
        assert sim.retail_price()[0, z] == tariff.peak_price_per_kwh
        sim.t = int(np.argmin(base[:, z]))
        assert sim.retail_price()[0, z] == tariff.valley_price_per_kwh
    clock = Sim(load_config("seed002", ["fleet.n_ev=50", "market.tou_basis=clock"]))
    clock.reset(3)
    assert (clock.zone_period[0] == clock.day.period[:, None]).all()


def test_share_deviation_and_min_max_follow_eqs_16_and_17():
    base = np.array([[[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]]])  # (E, T, Z)
    dev = rw.share_deviation(base, np.ones(3))
    np.testing.assert_allclose(dev[0, 0], [0.5 - 1 / 3, 0.25 - 1 / 3, 0.25 - 1 / 3])
    np.testing.assert_allclose(dev[0, 1], 0.0, atol=1e-12)
    norm = rw.min_max(dev, axis=(1, 2))
    np.testing.assert_allclose(norm[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(norm[0, 1], (1 / 3 - 0.25) / (0.5 - 0.25))
    assert (rw.min_max(np.ones((1, 2, 3)), axis=(1, 2)) == 0).all()


def test_station_reward_weighs_charged_energy_by_normalised_price_and_disparity():
    cfg = load_config("seed002", ["reward.station_w1=0.3", "reward.station_w2=0.7", "reward.station_unmet_per_kwh=2",
                                  "reward.curtail_per_kwh=1", "reward.station_disparity=base"])
    layout = SimpleNamespace(n_station=2, station_zone=np.array([0, 1]))
    tariff = cfg.market.tariff
    rec = SimpleNamespace(
        t=1, feeder_load_kw=np.zeros((1, 2)), ev_station=np.array([0, 0, 1]), p_ev_kw=np.array([40.0, 20.0, 60.0]),
        cut_ev_kw=np.array([0.0, 4.0, 0.0]), progress_kwh=np.array([9.0, 4.5, 13.5]),
        price_zone=np.array([[tariff.peak_price_per_kwh, tariff.valley_price_per_kwh]]))
    disparity = np.zeros((1, 3, 2))
    disparity[0, 1] = [0.25, 1.0]
    r = rw.station_rewards(rec, cfg, layout, (disparity, np.ones((1, 1))))
    e_ref = cfg.stations.p_max_kw * 0.25
    want0 = -((0.3 * 1.0 + 0.7 * 0.25) * 15.0 + 1.0 - 2 * 13.5) / e_ref  # price^ 1 at the peak
    want1 = -((0.3 * 0.0 + 0.7 * 1.0) * 15.0 - 2 * 13.5) / e_ref  # price^ 0 in the valley
    np.testing.assert_allclose(r, [[want0, want1]])


def test_lbms_assigns_the_requests_of_a_step_one_after_another():
    xy = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    pos = np.ones((4, 2))  # all equally far from the stations
    reach = np.full(4, 100.0)
    load = np.array([100.0, 105.0, 130.0])
    # every request seeing the same load herds onto station 0
    assert rt.lbms(pos, reach, xy, load).tolist() == [0, 0, 0, 0]
    # each one sees what the earlier ones added: 100 -> 150 at 0, then 105 -> 155 at 1, 130 -> 180 at 2 ...
    assert rt.lbms(pos, reach, xy, load, add_kw=np.full(4, 50.0)).tolist() == [0, 1, 2, 0]
    # the same across chunk boundaries, and through route() with participation 1
    assert rt.lbms(pos, reach, xy, load, add_kw=np.full(4, 50.0), chunk_elements=3).tolist() == [0, 1, 2, 0]
    cfg = rt.RoutingConfig(policy="lbms", participation=1.0, consumption_kwh_per_km=0.01)
    r = rt.route(pos, np.full(4, 0.5), np.full(4, 60.0), xy, load, cfg, add_kw=np.full(4, 50.0))
    assert r.station.tolist() == [0, 1, 2, 0]
    # a request that does not follow LBMS still adds its load where it goes (its nearest station)
    cfg = rt.RoutingConfig(policy="lbms", participation=0.5, consumption_kwh_per_km=0.01)
    near = np.array([[0.1, 0.0], [1.0, 1.0]])
    r = rt.route(near, np.full(2, 0.5), np.full(2, 60.0), xy, load, cfg, np.random.default_rng(0),
                 add_kw=np.array([50.0, 50.0]))
    assert r.followed.tolist() == [False, True] and r.station.tolist() == [0, 1]
    with pytest.raises(ValueError, match="add_kw"):
        rt.lbms(pos, reach, xy, load, add_kw=np.full(3, 1.0))


def test_lbms_counts_the_evs_still_driving_only_under_the_committed_load():
    """``routing.lbms_load``: ``current`` compares the networks' loads now (the paper's), ``committed`` adds the
    charger power of the EVs assigned in earlier steps and still on their way (ours)."""
    for lbms_load, to_zero in (("current", True), ("committed", False)):
        sim = Sim(load_config("seed002", ["fleet.n_ev=50", f"routing.lbms_load={lbms_load}"]))
        sim.reset(seed=3)
        fleet, lay = sim.fleet, sim.layout
        driving, new = np.array([1, 2]), np.array([0])
        fleet.status[driving], fleet.station[driving] = TRAVELLING, 0
        fleet.station[new], fleet.soc[new] = -1, 1.0  # a fresh request that reaches every station
        feeder_kw = np.full((1, len(lay.feeders)), 110.0)
        feeder_kw[0, lay.station_feeder[0]] = 100.0  # station 0's network is the least loaded now ...
        assert sim.day.sessions.p_ch_max_kw[driving].sum() > 10.0  # ... but not with the EVs driving there
        _route(sim.cfg, lay, sim.day, fleet, 0, new, feeder_kw)
        assert (fleet.station[0] == 0) == to_zero, lbms_load
    with pytest.raises(ValueError, match="lbms_load: expected one of 'current', 'committed'"):
        load_config("seed002", ["routing.lbms_load=en_route"])


def test_ddqn_settings_come_from_the_train_section():
    _, train = load_run_config("seed002")
    s = _training_settings(train)
    assert s["double_q"] is True and s["dueling"] is False
    assert s["epsilon"] == [[0, 1.0], [train.exploration_steps, 0.0]]
    assert s["target_network_update_freq"] == train.target_update_steps
    assert s["replay_buffer_config"] == {"type": REPLAY_TYPE, "capacity": train.replay_capacity}  # uniform
    prio = _training_settings(TrainConfig(algorithm="DQN"))["replay_buffer_config"]
    assert prio["type"] == "MultiAgentPrioritizedEpisodeReplayBuffer"
    with pytest.raises(ValueError, match="replay: expected one of 'prioritized', 'uniform'"):
        TrainConfig(algorithm="DQN", replay="reservoir")
    with pytest.raises(ValueError, match="target_update_steps"):
        TrainConfig(algorithm="DQN", target_update_steps=0)


def test_user_cost_adds_the_compensation_for_unmet_energy():
    assert user_cost_total(100.0, 3.0, 2.0, compensation_per_kwh=1.5) == 107.5
    assert user_cost_total(100.0, 0.0, 0.0) == 100.0


def test_combined_score_reproduces_the_papers_worked_example():
    cost = {"DRL_Space": 2620.19, "DRL_Cost": 2594.48, "DRL_Both": 2611.23}
    std = {"DRL_Space": 117.32, "DRL_Cost": 122.78, "DRL_Both": 118.36}
    s = combined_scores(cost, std)
    assert s["DRL_Space"] == pytest.approx(1.0) and s["DRL_Cost"] == pytest.approx(1.0)
    assert s["DRL_Both"] == pytest.approx(1.16, abs=0.005)
    assert combined_scores({"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 1.0}) == {"a": 0.0, "b": 1.0}


def test_the_report_keeps_rows_of_other_ev_counts_apart():
    rows = [common.row("s", m, 0, "cost", v, n_ev=n) for m, v, n in
            (("a", 1.0, 1000), ("b", 2.0, 1000), ("a", 5.0, 1250), ("b", 4.0, 1250))]
    table = common.table_markdown(rows)
    assert "| cost (n_ev=1000) | a |" in table and "| cost (n_ev=1250) | b |" in table


def test_claims_read_the_orderings_off_the_rows():
    from evgrid.studies import seed002

    cost = {"greedy": 40.0, "DRL_Space": 35.0, "DRL_Cost": 30.0, "DRL_Both": 33.0}
    std = {"greedy": 150.0, "DRL_Space": 100.0, "DRL_Cost": 140.0, "DRL_Both": 90.0}
    rows = []
    for seed in (0, 1):
        for n_ev in (1000, 1250):
            rows += [common.row("seed002", m, seed, "user_cost_total", v, n_ev=n_ev, participation=1.0)
                     for m, v in cost.items()]
            rows += [common.row("seed002", m, seed, "spatial_std_kw", v, n_ev=n_ev, participation=1.0)
                     for m, v in std.items()]
            score = combined_scores({m: cost[m] for m in seed002.STRATEGIES}, {m: std[m] for m in seed002.STRATEGIES})
            rows += [common.row("seed002", m, seed, "combined_score", v, n_ev=n_ev, participation=1.0)
                     for m, v in score.items()]
        for p, k in ((0.0, 3.0), (0.5, 2.0)):
            rows += [common.row("seed002", m, seed, metric, v * k if metric == "spatial_std_kw" else 1 / k,
                                n_ev=1000, participation=p)
                     for m, v in std.items() for metric in ("spatial_std_kw", "slvtpr")]
    rows += [common.row("seed002", m, s, "slvtpr", 1.0, n_ev=1000, participation=1.0) for m in cost for s in (0, 1)]
    # the oracle is a reference beside the paper's strategies, never in their orderings
    rows += [common.row("seed002", "oracle", s, metric, 1.0, n_ev=n, participation=1.0)
             for s in (0, 1) for n in (1000, 1250) for metric in ("user_cost_total", "spatial_std_kw")]
    holds = {c.text.split(" (ours")[0]: c.holds for c in seed002._claims(rows, (0, 1))}
    assert holds["1000 EVs: greedy has the highest user cost"] and holds["1250 EVs: DRL_Cost has the lowest user cost"]
    assert not holds["1000 EVs: DRL_Space has the lowest spatial load std"]  # DRL_Both's is lower
    assert holds["1250 EVs: DRL_Both has the best combined score"]
    assert holds["1000 EVs, greedy: spatial_std_kw falls as participation rises from 0% to 100% (every step)"]
    assert holds["1000 EVs, DRL_Cost: slvtpr rises as participation rises from 0% to 100% (every step)"]
    assert "holds in 2/2 seeds" in seed002._claims(rows, (0, 1))[0].text


def test_the_load_disparity_charges_each_station_its_networks_imbalance_once_per_step():
    """``station_disparity: load``: on random loads and charging, the w2 term is the station's network's share
    deviation (EVs included) over the day's largest base-load deviation, whatever the station charged; the
    paper's reading weighs the charged energy by eq 16 instead."""
    rng = np.random.default_rng(5)
    cfg = load_config("seed002", ["reward.station_disparity=load", "reward.station_w1=0", "reward.station_w2=0.8",
                                  "reward.station_unmet_per_kwh=0", "reward.curtail_per_kwh=0"])
    nominal = np.array([1000.0, 1500.0, 2000.0])
    layout = SimpleNamespace(n_station=3, station_zone=np.array([0, 1, 2]), zone_nominal_kw=nominal)
    base = rng.uniform(200.0, 1500.0, (2, 96, 3))
    disparity = rw.episode_disparity(base, nominal)
    np.testing.assert_allclose(disparity[1][:, 0], np.abs(rw.share_deviation(base, nominal)).max(axis=(1, 2)))
    e_ref = cfg.stations.p_max_kw * cfg.dt_min / 60
    for _ in range(20):
        zone_kw = rng.uniform(200.0, 2500.0, (2, 3))
        n_ev = 12
        rec = SimpleNamespace(
            t=int(rng.integers(96)), feeder_load_kw=zone_kw, zone_load_kw=zone_kw,
            ev_station=rng.integers(0, 6, n_ev), p_ev_kw=rng.uniform(0.0, 50.0, n_ev), cut_ev_kw=np.zeros(n_ev),
            progress_kwh=rng.uniform(0.0, 10.0, n_ev), price_zone=rng.uniform(0.3, 1.2, (2, 3)))
        share = (zone_kw / nominal) / (zone_kw / nominal).sum(axis=1, keepdims=True)
        want = -0.8 * np.abs(share - 1 / 3) / disparity[1]
        np.testing.assert_allclose(rw.station_rewards(rec, cfg, layout, disparity), want)
    # the paper's reading on the same record weighs the charged energy instead
    paper = load_config(cfg, {"reward": {"station_disparity": "base"}})
    kwh = rw.per_station(rec, rec.p_ev_kw, 2, 3) * cfg.dt_min / 60
    np.testing.assert_allclose(rw.station_rewards(rec, paper, layout, disparity),
                               -0.8 * disparity[0][:, rec.t] * kwh / e_ref)
    with pytest.raises(ValueError, match="station_disparity: expected one of 'base', 'load'"):
        load_config("seed002", ["reward.station_disparity=ev"])


def test_stations_observe_their_networks_share_deviation():
    """A station network shared by the three stations sees which network each serves: eq 16 on the base load
    now, and the share of the whole load of the last step, both summing to zero over the networks."""
    from evgrid.envs.ev_grid import EVGridEnv
    from evgrid.envs.views.features import STATION

    env = EVGridEnv(load_config("seed002", ["fleet.n_ev=300"]))
    obs, _ = env.reset(seed=4)
    cols = [STATION.index(n) - len(STATION) for n in ("zone_base_share_dev", "zone_load_share_dev")]
    rng = np.random.default_rng(0)
    sim, lay = env.sim, env.sim.layout
    for _ in range(30):
        obs, *_ = env.step({a: int(rng.integers(6)) for a in obs})
        if not env.agents:
            break
        got = np.array([obs[f"station_{j}"][cols] for j in range(3)])  # (M, 2)
        base_dev = rw.share_deviation(sim.base_zone_load_kw()[0, sim.t], lay.zone_nominal_kw)
        load_dev = rw.share_deviation(env.step_records[-1].zone_load_kw[0], lay.zone_nominal_kw)
        np.testing.assert_allclose(got[:, 0], base_dev[lay.station_zone], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[:, 1], load_dev[lay.station_zone], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.sum(axis=0), 0.0, atol=1e-5)  # one station per network


def test_a_variant_of_the_study_reaches_every_config_it_loads_and_keeps_its_own_keys():
    from evgrid.config import ConfigError
    from evgrid.studies import seed002

    seed002.check_overrides(("routing.lbms_load=current", "train.gamma=0.9"))
    for bad, field in ((("fleet.n_ev=5",), "overrides: fleet.n_ev is set by the study itself"),
                       (("train={iterations: 3}",), "overrides: train.iterations is set by the study itself"),
                       (("routing.lbms_load=nope",), "routing.lbms_load: expected one of"),
                       (("train.nope=1",), "train.nope: unknown key")):
        with pytest.raises(ConfigError, match=field):
            seed002.check_overrides(bad)

    def ctx(*overrides: str) -> common.Context:
        return common.Context("seed002", quick=True, out_dir=None, address=None, seeds=(0,), overrides=overrides)

    # the study's own keys come after the variant's, so its per-run settings always hold
    assert seed002._overrides(ctx("routing.lbms_load=current"), 150, 0.5) == [
        "routing.lbms_load=current", "fleet.n_ev=150", "routing.participation=0.5"]
    std = {load: seed002._episodes(ctx(f"routing.lbms_load={load}"), 150, 1.0, None, range(1000, 1001))[0]
           ["spatial_std_kw"] for load in ("committed", "current")}
    assert std["committed"] != std["current"]  # the override reached the simulated day
    notes = {load: " ".join(seed002._notes(ctx(f"routing.lbms_load={load}"))) for load in ("committed", "current")}
    assert "routing.lbms_load: committed" in notes["committed"] and "lbms_load" not in notes["current"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The whole quick pipeline once: DDQN for the three reward weightings at 1,000 and 1,250 EVs, greedy
    beside them, the participation sweep (about 3 min on 2 cores)."""
    return common.reproduce("seed002", quick=True, out=tmp_path_factory.mktemp("seed002"), address=None)


@pytest.mark.slow
def test_seed002_quick_reproduction_writes_every_method_metric_and_figure(quick_run):
    rows = pq.read_table(quick_run / "results.parquet").to_pandas()
    assert {"n_ev", "participation"} <= set(rows.columns)
    assert set(rows.method) == {"greedy", "DRL_Space", "DRL_Cost", "DRL_Both", "oracle"}
    assert {"slvtpr", "spatial_std_kw", "user_cost_total", "combined_score"} <= set(rows.metric)
    assert set(rows.n_ev) == {1000, 1250} and {0.0, 1.0} <= set(rows.participation)
    paper = rows[(rows.method == "DRL_Both") & (rows.metric == "user_cost_total") & (rows.n_ev == 1000)
                 & (rows.participation == 1.0)]
    assert paper.paper_value.tolist() == [2611.23]
    assert not rows[rows.method.isin(["greedy", "oracle"])].metric.isin(["combined_score"]).any()
    # the oracle (greedy's day planned for balance) spreads the networks' loads less than every strategy
    std = rows[(rows.metric == "spatial_std_kw") & (rows.participation == 1.0)].groupby(["n_ev", "method"]).value.mean()
    for n_ev in (1000, 1250):
        assert std[n_ev].idxmin() == "oracle", std[n_ev]
    report = (quick_run / "report.md").read_text(encoding="utf-8")
    for name in ("training.png", "ev_distribution.png", "strategies.png", "participation.png"):
        assert (quick_run / name).stat().st_size > 10_000 and f"]({name})" in report


@pytest.mark.slow
def test_seed002_quick_reproduction_holds_the_price_weightings_saving_and_the_participation_trend(quick_run):
    """With the deadline shield the learned stations leave no more energy unmet than greedy, so the strategies
    that weigh the price (DRL_Cost, DRL_Both) make their users pay less than greedy's at both EV counts; and
    balance improves with participation for every strategy.  (DRL_Space weighs only the networks' balance: at
    the quick budget its users pay about greedy's, a little more or less by the seed.)"""
    rows = pq.read_table(quick_run / "results.parquet").to_pandas()
    cost = rows[(rows.metric == "user_cost_total") & (rows.participation == 1.0)].set_index(["n_ev", "method"]).value
    for n_ev in (1000, 1250):
        for method in ("DRL_Cost", "DRL_Both"):
            assert cost[(n_ev, method)] < cost[(n_ev, "greedy")], (n_ev, method)
    report = (quick_run / "report.md").read_text(encoding="utf-8")
    for method in ("greedy", "DRL_Space", "DRL_Cost", "DRL_Both"):
        assert f"- ✓ 1000 EVs, {method}: spatial_std_kw falls as participation rises" in report, method


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="at the quick budget (and at the full one, README) greedy balances the "
                                        "networks about as well as DRL_Space, and DRL_Both's combined score is not "
                                        "the best")
def test_seed002_quick_reproduction_orders_the_drl_strategies_as_the_paper(quick_run):
    report = (quick_run / "report.md").read_text(encoding="utf-8")
    for claim in ("DRL_Cost has the lowest user cost", "DRL_Space has the lowest spatial load std",
                  "DRL_Both has the best combined score"):
        for n_ev in (1000, 1250):
            assert f"- ✓ {n_ev} EVs: {claim}" in report, (claim, n_ev)
