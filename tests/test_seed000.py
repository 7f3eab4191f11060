"""Seed 000 (evgrid.studies.seed000): the changes against the baseline and their t-intervals on hand-made rows,
a fixed operator policy acting inside the env (the bilevel scheme's hook), the seed-000 metrics, and the quick
reproduction's four directions (slow)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from evgrid.config import ConfigError
from evgrid.envs.ev_grid import EVGridEnv, EVGridVectorEnv
from evgrid.studies import seed000 as s0
from evgrid.studies.common import row

SMALL = {"fleet": {"n_ev": 60}, "n_steps": 24, "start_hour": 16.0}

# ------------------------------------------------------------------------------------------- statistics


def test_relative_change_in_percent_and_its_edge_cases():
    assert s0.relative_change_pct(78.4, 100.0) == pytest.approx(-21.6)
    assert s0.relative_change_pct(-5.0, -10.0) == pytest.approx(50.0)  # against |baseline|
    assert s0.relative_change_pct(0.0, 0.0) == 0.0
    assert math.isnan(s0.relative_change_pct(3.0, 0.0))
    assert math.isnan(s0.relative_change_pct(float("nan"), 1.0))
    with pytest.raises(ValueError, match="ours"):
        s0.relative_change_pct(float("inf"), 1.0)


def test_mean_and_t_interval_by_hand():
    mean, lo, hi = s0.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n), s = 1
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert s0.mean_ci([4.0, float("nan")])[0] == 4.0 and math.isnan(s0.mean_ci([4.0])[1])
    assert all(math.isnan(x) for x in s0.mean_ci([]))
    with pytest.raises(ValueError, match="confidence"):
        s0.mean_ci([1.0, 2.0], confidence=1.0)


def _rows() -> list[dict]:
    out = []
    for seed, (base, pdqn) in enumerate([(100.0, 80.0), (200.0, 150.0)]):
        for metric in s0.HEADLINE:
            out.append(row("seed000", s0.BASELINE, seed, metric, base))
            out.append(row("seed000", "PDQN", seed, metric, pdqn))
            out.append(row("seed000", "MPDQN", seed, metric, base * 1.1))
    out.append(row("seed000", "PDQN", 0, "unmet_kwh", 3.0))
    out.append(row("seed000", s0.BASELINE, 0, "unmet_kwh", 2.0))
    return out


def test_change_rows_and_claims_on_hand_made_rows():
    changes = s0.change_rows(_rows())
    pdqn = {(r["seed"], r["metric"]): r for r in changes if r["method"] == "PDQN"}
    assert pdqn[(0, "operator_cost_change_pct")]["value"] == pytest.approx(-20.0)
    assert pdqn[(1, "operator_cost_change_pct")]["value"] == pytest.approx(-25.0)
    assert pdqn[(0, "operator_cost_change_pct")]["paper_value"] == -21.6
    assert all(r["paper_value"] is None for r in changes if r["method"] == "MPDQN")
    assert not any(r["metric"].startswith("unmet") for r in changes)
    claims = s0.claims(_rows() + changes)
    assert len(claims) == 9  # four headline metrics per method, and PDQN's undelivered energy
    assert all(c.holds for c in claims[:4]) and claims[8].holds is False and "3 vs 2 kWh" in claims[8].text
    assert not any(c.holds for c in claims if c.text.startswith("MPDQN"))
    assert "-22.5 %" in claims[0].text and "95% CI" in claims[0].text and "n=2" in claims[0].text


# ------------------------------------------------------------------------------------------- the hook


class _Fixed:
    """An operator policy: multiplier 1.3, storage share -0.5, and the observations it was shown."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, obs):
        self.shapes.append(obs.shape)
        return np.tile(np.array([1.3, -0.5], np.float32), (obs.shape[0], 1))


def test_a_fixed_operator_policy_prices_inside_the_env_and_hides_the_operators():
    policy = _Fixed()
    env = EVGridVectorEnv("seed000", 2, operator_policy=policy, **SMALL)
    assert not any(a.startswith("operator") for a in env.possible_agents)
    obs, _ = env.reset(seed=5)
    n_op_features = len(obs[0]["evs_0"]["context"])  # any agent: operators are absent
    assert n_op_features > 0 and not any(a.startswith("operator") for a in obs[0])
    steps = 0
    while any(env.agents):
        acts = [{a: {"mode": np.zeros(env.n_slots, np.int64), "power": np.ones(env.n_slots, np.float32)}
                 for a in ag} for ag in env.agents]
        obs, rew, *_ = env.step(acts)
        steps += 1
        assert not any(a.startswith("operator") for r in rew for a in r)
        if steps > 1:  # prices are announced one interval ahead
            assert np.allclose(env.sim.last.price_mult, 1.3)
    assert steps == 24 and len(policy.shapes) == 24
    assert policy.shapes[0] == (2 * env.sim.layout.n_zone, env.observation_space("operator_0").shape[0])


def test_the_operator_policy_replays_like_operator_agents_taking_the_same_actions():
    with_policy = EVGridEnv("seed000", operator_policy=_Fixed(), **SMALL)
    agents = EVGridEnv("seed000", **SMALL)
    for env in (with_policy, agents):
        env.reset(seed=2)
    while agents.agents:
        acts = {a: {"mode": np.zeros(agents.vec.n_slots, np.int64), "power": np.ones(agents.vec.n_slots, np.float32)}
                for a in with_policy.agents}
        with_policy.step(acts)
        agents.step({**acts, **{a: np.array([1.3, -0.5], np.float32) for a in agents.agents
                                if a.startswith("operator")}})
        for field in ("zone_load_kw", "price_zone", "storage_p_kw", "vm_pu"):
            assert np.array_equal(getattr(with_policy.last_rec, field), getattr(agents.last_rec, field))


def test_operator_policy_bad_input_names_the_field():
    with pytest.raises(ValueError, match="operator_policy"):
        EVGridEnv("seed000", operator_policy=3, **SMALL)
    env = EVGridEnv("seed000", operator_policy=lambda obs: obs[:1, :2], **SMALL)
    env.reset(seed=0)
    idle = {a: {"mode": np.ones(env.vec.n_slots, np.int64), "power": np.ones(env.vec.n_slots, np.float32)}
            for a in env.agents}
    with pytest.raises(ValueError, match="operator_policy: expected one action per operator"):
        env.step(idle)
    with pytest.raises(ValueError, match="'operator_0' acts by the operator_policy"):
        env.step({**idle, "operator_0": np.ones(2, np.float32)})
    with pytest.raises(ConfigError, match="agents.operator"):
        EVGridEnv("seed000", operator_policy=_Fixed(), agents={"operator": "rule"}, **SMALL)


def test_a_frozen_module_acts_inside_its_box_and_pickles():
    from evgrid.agents.rllib.algos import TrainConfig, algo_config
    from evgrid.agents.rllib.policy import FrozenOperatorPolicy
    from evgrid.envs.config import load_config

    cfg = algo_config(load_config("seed000", SMALL), TrainConfig(hidden=(8,)))
    spaces = {mid: (s.observation_space, s.action_space) for mid, s in cfg.rl_module_spec.rl_module_specs.items()}
    module = cfg.get_multi_rl_module_spec(spaces=spaces).build()["operator"]
    space = EVGridEnv("seed000", **SMALL).action_space("operator_0")  # the module learns in [-1, 1]
    policy = pickle.loads(pickle.dumps(FrozenOperatorPolicy(module, space)))
    obs = np.random.default_rng(0).normal(size=(6, module.observation_space.shape[0])).astype(np.float32) * 50
    a = policy(obs)
    assert a.shape == (6, 2) and np.all(a >= space.low) and np.all(a <= space.high)
    assert module.action_space.low.min() == -1.0 and space.low[0] > 0  # scaled into the multiplier's range
    env = EVGridEnv("seed000", operator_policy=policy, **SMALL)
    env.reset(seed=0)  # the env takes its actions


# ------------------------------------------------------------------------------------------- metrics


def test_idle_storage_owes_nothing_and_cost_per_user_is_what_users_paid():
    from evgrid.agents.baselines import rule_overrides
    from evgrid.envs.config import load_config
    from evgrid.evaluate import rule_episodes

    base = load_config("seed000", SMALL)
    idle, = rule_episodes(load_config(base, rule_overrides("uncontrolled", routed=False)), [7])
    tou, = rule_episodes(load_config(base, rule_overrides("tou", routed=False)), [7])
    assert idle["storage_deficit_cost"] == 0.0
    assert math.isfinite(tou["storage_deficit_cost"]) and tou["storage_deficit_cost"] != 0.0
    assert idle["ev_cost_per_user"] > 0.0


# ------------------------------------------------------------------------------------------- the reproduction


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``evgrid reproduce seed000 --quick`` once for the module's slow tests: (run directory, result rows)."""
    import pyarrow.parquet as pq

    from evgrid.studies.common import reproduce

    out = reproduce("seed000", quick=True, out=tmp_path_factory.mktemp("seed000") / "run", address=None)
    return out, pq.read_table(out / "results.parquet").to_pylist()


@pytest.mark.slow
def test_seed000_quick_reproduction_writes_every_method_metric_and_the_report(quick_run):
    out, rows = quick_run
    assert {r["method"] for r in rows} >= {"PDQN", "MPDQN", "tou_uncontrolled", "oracle"}
    assert {r["metric"] for r in rows} >= set(s0.HEADLINE) | {f"{m}_change_pct" for m in s0.HEADLINE}
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Wall time" in report and (out / "changes.png").is_file() and (out / "training.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", s0.LEARNED)
@pytest.mark.parametrize("metric", s0.HEADLINE)
def test_seed000_quick_reproduction_moves_the_headline_metrics_the_papers_way(quick_run, method, metric):
    v = [r["value"] for r in quick_run[1] if r["method"] == method and r["metric"] == f"{metric}_change_pct"]
    assert v and np.mean(v) < 0, f"{method}: {metric} changes by {v} % against the baseline"


@pytest.mark.slow
@pytest.mark.parametrize("method", s0.LEARNED)
def test_seed000_quick_reproduction_leaves_no_more_energy_undelivered_than_the_baseline(quick_run, method):
    def unmet(m):
        return np.mean([r["value"] for r in quick_run[1] if r["method"] == m and r["metric"] == "unmet_kwh"])

    assert unmet(method) <= unmet(s0.BASELINE)
