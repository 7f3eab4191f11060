"""Seed 000 reproduced: microgrid operators price dynamically, EVs act with hybrid actions (``evgrid reproduce
seed000``).

The paper (Su et al. 2026; abstract only) reports four changes of its bilevel strategy against "traditional
methods": MG operating cost -21.6 %, peak-to-valley load -33.7 %, voltage violations -88.9 %, average EV user
cost -15.2 %.  Our setting (``experiments/seed000.yaml``, all ours): IEEE 33 in 4 microgrid zones with PV, wind,
diesel and one storage unit each, 8 stations, 500 EVs a day, 15-min steps.

Bilevel training (ours; one RLlib algorithm cannot train PPO operators beside P-DQN EVs), per training seed:

1. **upper level**: the zone operators learn price multipliers and storage set-points with PPO while the EVs
   follow the ``tou`` rule (charge in the valley unless the target would be missed), the operators' reward being
   their profit less the squared deviation of their zone load from its mean (economic benefit and peak shaving,
   :func:`evgrid.envs.views.rewards.operator_rewards`) and their voltage violations;
2. **lower level**: the EVs learn with P-DQN (``PDQN``) or MP-DQN (``MPDQN``), grouped per station (one shared
   per-EV network), physical limits embedded by the simulator, while the operators act by the policy of step 1
   held fixed inside the env (:class:`evgrid.agents.rllib.policy.FrozenOperatorPolicy`).  Our improvement of
   P-DQN is learning from demonstrations (DQfD, Hester et al. 2018): the networks are pre-trained on the
   perfect-foresight oracle's schedules of other days (:mod:`evgrid.agents.rllib.imitation`; the EVs see only
   their own observations), and the demonstrations' margin and power losses stay in every TD update.  A learned
   EV that would miss its target by waiting one more step charges at full power (``agents.ev_shield:
   deadline``, ours).

Methods: ``PDQN``, ``MPDQN``, ``tou_uncontrolled`` (the baseline, ours: TOU retail price, storage idle, every
EV at full power from plug-in), ``oracle`` (perfect-foresight schedule, :mod:`evgrid.agents.oracle`),
``operators_ppo`` (step 1 alone: learned operators, EVs on the ``tou`` rule) and ``tou_rules`` (no learning:
TOU price, storage charged in the valley and discharged in the peak, EVs on the ``tou`` rule).  Every method
runs on the same held-out days; each value is a mean over those days for one training seed.  Metrics:
``operator_cost`` (the zones' purchase + diesel + carbon + curtailment cost plus the storage's end-of-day
deficit valued at the day's mean purchase price), ``peak_valley_kw``, ``voltage_violations`` (bus-steps outside
the limits on the flow of the decisions, before enforcement), ``ev_cost_per_user``; ``<metric>_change_pct`` is
the change against ``tou_uncontrolled`` of the same seed, whose mean and 95 % t-interval over seeds the claims
report.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from evgrid.studies.common import Claim, Context, StudyOutput, row

log = logging.getLogger(__name__)

TITLE = "hierarchical microgrid pricing with P-DQN EV agents (Su et al. 2026)"
USES_RAY = True
STUDY = "seed000"
BASELINE = "tou_uncontrolled"
LEARNED = ("PDQN", "MPDQN")
HEADLINE = ("operator_cost", "peak_valley_kw", "voltage_violations", "ev_cost_per_user")
PAPER_CHANGE_PCT = {"operator_cost": -21.6, "peak_valley_kw": -33.7, "voltage_violations": -88.9,
                    "ev_cost_per_user": -15.2}
EXTRA = ("storage_deficit_cost", "unmet_kwh", "ev_cost_per_kwh", "curtailed_kwh")
EVAL_DAYS = {True: range(1000, 1002), False: range(1000, 1004)}
# (stage-1 PPO iterations, stage-2 P-DQN iterations); one iteration samples ENVS days of 96 steps
ITERATIONS = {True: (5, 10), False: (20, 60)}
ENVS = 2
# days of the oracle's schedules the EVs are pre-trained on (DQfD), apart from the training and evaluation days
DEMO_DAYS = {True: 10, False: 20}
CONFIDENCE = 0.95
# the EVs discount little: at 0.99 the unmet-energy reward paid 30 steps later loses a quarter of its worth,
# more than any price difference of the day, so waiting for a cheaper hour could never pay
EV_GAMMA = 0.999


def default_seeds(quick: bool) -> tuple[int, ...]:
    return (0,) if quick else (0, 1, 2, 3, 4)


# ------------------------------------------------------------------------------------------- statistics


def relative_change_pct(ours: float, baseline: float) -> float:
    """100 (ours - baseline) / |baseline|; 0 where both are 0, NaN where only the baseline is (no scale) or
    either is NaN (a metric that could not be measured, as in :func:`evgrid.studies.common.row`)."""
    for name, x in (("ours", ours), ("baseline", baseline)):
        if math.isinf(x):
            raise ValueError(f"{name}: expected a finite number or NaN, got {x}")
    if math.isnan(ours) or math.isnan(baseline):
        return math.nan
    if baseline == 0:
        return 0.0 if ours == 0 else math.nan
    return 100.0 * (ours - baseline) / abs(baseline)


def mean_ci(values: Any, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` (NaNs left out) and its two-sided ``confidence`` interval from
    the t-distribution with n - 1 degrees of freedom; the interval is NaN for fewer than two values."""
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence}")
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def change_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``<metric>_change_pct`` rows: each method's headline metric against the baseline's of the same seed
    (the paper's value on ``PDQN``, the paper's method)."""
    base = {(r["seed"], r["metric"]): r["value"] for r in rows if r["method"] == BASELINE}
    out = []
    for r in rows:
        key = (r["seed"], r["metric"])
        if r["method"] == BASELINE or r["metric"] not in HEADLINE or key not in base:
            continue
        paper = PAPER_CHANGE_PCT[r["metric"]] if r["method"] == "PDQN" else None
        out.append(row(STUDY, r["method"], r["seed"], f"{r['metric']}_change_pct",
                       relative_change_pct(r["value"], base[key]), paper))
    return out


def claims(rows: list[dict[str, Any]]) -> list[Claim]:
    """For each learned method and headline metric: the mean change against the baseline is negative (the
    paper's direction), with its interval over seeds."""
    out = []
    for method in LEARNED:
        for metric in HEADLINE:
            v = [r["value"] for r in rows if r["method"] == method and r["metric"] == f"{metric}_change_pct"]
            if not v:
                continue
            mean, lo, hi = mean_ci(v)
            ci = f"{CONFIDENCE:.0%} CI [{lo:+.1f}, {hi:+.1f}] %" if math.isfinite(lo) else "no CI for one seed"
            out.append(Claim(f"{method}: {metric} falls against {BASELINE} (paper {PAPER_CHANGE_PCT[metric]:+.1f} %; "
                             f"ours {mean:+.1f} %, {ci}, n={len(v)})", None if math.isnan(mean) else mean < 0))
    return out + _unmet_claims(rows)


def _unmet_claims(rows: list[dict[str, Any]]) -> list[Claim]:
    """Ours, not the paper's: a lower cost per user must not come from delivering less energy."""
    def unmet(method: str) -> float:
        v = [r["value"] for r in rows if r["method"] == method and r["metric"] == "unmet_kwh"]
        return float(np.mean(v)) if v else math.nan

    base = unmet(BASELINE)
    return [Claim(f"{m}: EVs leave no more energy undelivered than under {BASELINE} (ours, not the paper's: "
                  f"{unmet(m):,.0f} vs {base:,.0f} kWh a day)", unmet(m) <= base)
            for m in LEARNED if not (math.isnan(base) or math.isnan(unmet(m)))]


# ------------------------------------------------------------------------------------------- the pipeline


def run(ctx: Context) -> StudyOutput:
    from evgrid.cluster.runtime import connect

    base, stage1 = _configs()
    days = EVAL_DAYS[ctx.quick]
    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, int], list[tuple[float, float]]] = {}
    fixed = _rule_and_oracle(base, days)  # no training: the same on every seed, computed once
    for seed in ctx.seeds:
        rows += _metric_rows(seed, fixed)
    with connect(ctx.address, num_cpus=2, pinned=True):  # as `evgrid train`: workers on reproducible paths
        for seed in ctx.progress(ctx.seeds, desc="seeds"):
            rows += _learned(ctx, base, stage1, seed, days, curves)
    rows += change_rows(rows)
    figures = _figures(ctx, rows, curves)
    return StudyOutput(rows=rows, claims=claims(rows), figures=figures, notes=_notes(ctx))


def _configs() -> tuple[Any, Any]:
    """(the study's config: grouped EVs, learned operators; stage 1's: the EVs on the ``tou`` rule)."""
    from evgrid.envs.config import load_config

    base = load_config(STUDY)
    return base, load_config(base, {"agents": {"ev_view": "rule", "ev_rule": "tou"}})


def train_config(algorithm: str, iterations: int, seed: int, demo_days: int = 0) -> Any:
    """The training settings of a stage (ours): samples in the driver (2 cores), ``ENVS`` days per iteration;
    P-DQN pre-trained on ``demo_days`` of the oracle's schedules, their margin and power losses kept in every
    update (DQfD), and then exploring as little as the final schedule's ε and noise from the start (the
    pre-trained policy is what is refined; fully random modes would only fill the buffer with unplanned days)."""
    from evgrid.agents.rllib.algos import TrainConfig

    common = dict(algorithm=algorithm, iterations=iterations, checkpoint_every=iterations, num_env_runners=0,
                  envs_per_runner=ENVS, rollout_fragment_length=96, seed=seed, hidden=(64, 64))
    if algorithm == "PPO":
        return TrainConfig(train_batch_size=96 * ENVS, minibatch_size=64, num_epochs=4, entropy_coeff=0.01,
                           **common)
    steps = iterations * 96 * ENVS
    return TrainConfig(train_batch_size=64, minibatch_size=64, learning_starts=96, gamma=EV_GAMMA,
                       training_intensity=6.0, exploration_steps=1 if demo_days else max(1, int(0.6 * steps)),
                       replay_capacity=steps, imitation_days=demo_days, **common)


def train_stage(env_cfg: Any, train_cfg: Any, curve: list[tuple[float, float]],
                operator_policy: Any = None) -> tuple[Any, float]:
    """Train ``env_cfg``'s learned levels per ``train_cfg``; returns (the modules, wall seconds) and appends
    (env steps, mean return of the first module) per iteration to ``curve``.  Ray must be running."""
    from evgrid.agents.rllib.experiment import Experiment

    t0 = time.perf_counter()
    with Experiment(env_cfg, train_cfg, operator_policy=operator_policy) as exp:
        for _ in range(train_cfg.iterations):
            s = exp.step()
            curve.append((s.env_steps, float(np.mean(list(s.returns.values()))) if s.returns else math.nan))
        modules = exp.modules()
    return modules, time.perf_counter() - t0


def _learned(ctx: Context, base: Any, stage1: Any, seed: int, days: range,
             curves: dict[tuple[str, int], list[tuple[float, float]]]) -> list[dict[str, Any]]:
    """Stage 1 (PPO operators), then each P-DQN variant under its operators; their metric rows."""
    from evgrid.agents.rllib.policy import FrozenOperatorPolicy, TrainedPolicy
    from evgrid.envs.ev_grid import EVGridVectorEnv
    from evgrid.evaluate import policy_episodes

    it1, it2 = ITERATIONS[ctx.quick]
    ops, wall1 = train_stage(stage1, train_config("PPO", it1, seed), curves.setdefault(("operators_ppo", seed), []))
    log.info("seed %d: operators trained in %.1f s", seed, wall1)
    # the module learns in [-1, 1]; the policy scales its actions into the env's operator space
    op_policy = FrozenOperatorPolicy(ops["operator"], EVGridVectorEnv(stage1).action_space("operator_0"))
    results = {"operators_ppo": list(policy_episodes(stage1, lambda env: TrainedPolicy(ops, env), days))}
    walls = {"operators_ppo": wall1}
    for algo in LEARNED:
        evs, wall = train_stage(base, train_config(algo, it2, seed, DEMO_DAYS[ctx.quick]),
                                curves.setdefault((algo, seed), []), operator_policy=op_policy)
        log.info("seed %d: %s EVs trained in %.1f s", seed, algo, wall)
        results[algo] = list(policy_episodes(base, lambda env, m=evs: TrainedPolicy(m, env), days,
                                             operator_policy=op_policy))
        walls[algo] = wall1 + wall
    out = _metric_rows(seed, results)
    out += [row(STUDY, m, seed, "train_wall_s", w) for m, w in walls.items()]
    return out


def _rule_and_oracle(base: Any, days: range) -> dict[str, list[dict[str, float]]]:
    from evgrid.agents.baselines import rule_overrides
    from evgrid.agents.oracle import oracle_episodes
    from evgrid.envs.config import load_config
    from evgrid.evaluate import rule_episodes

    rule = load_config(base, rule_overrides("uncontrolled", routed=False))
    tou = load_config(base, rule_overrides("tou", routed=False))
    return {BASELINE: list(rule_episodes(rule, days)), "tou_rules": list(rule_episodes(tou, days)),
            "oracle": [r for r, _ in oracle_episodes(base, days)]}


def _metric_rows(seed: int, results: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Each method's metrics, means over its evaluation days; ``operator_cost`` with the storage's end-of-day
    deficit at the day's mean purchase price (a day that drains the storage is not cheaper for it)."""
    out = []
    for method, days in results.items():
        for metric in (*HEADLINE, *EXTRA):
            if metric == "operator_cost":
                v = [d["operator_cost"] + d["storage_deficit_cost"] for d in days]
            else:
                v = [d[metric] for d in days]
            out.append(row(STUDY, method, seed, metric, float(np.nanmean(v)), n_days=len(days)))
    return out


# ------------------------------------------------------------------------------------------- report


def _notes(ctx: Context) -> list[str]:
    it1, it2 = ITERATIONS[ctx.quick]
    weight = train_config("PDQN", it2, 0, DEMO_DAYS[ctx.quick]).imitation_weight
    return [
        f"Budget per training seed: stage 1 PPO {it1} iterations, stage 2 P-DQN / MP-DQN {it2} iterations each, "
        f"{ENVS} days of 96 steps per iteration, sampled in the driver, after pre-training on "
        f"{DEMO_DAYS[ctx.quick]} days of the oracle's schedules (seeds from 1,000,000); evaluation on held-out "
        f"days {EVAL_DAYS[ctx.quick].start}-{EVAL_DAYS[ctx.quick].stop - 1} (training days start at the seed).",
        "The P-DQN EVs learn from demonstrations (DQfD, ours): the oracle plans other days with perfect foresight "
        "and the EVs' networks are pre-trained on its decisions (a large-margin loss on the Q-values, the powers "
        "by regression, each station's Q fitted to the day's returns); the margin and power losses stay in every "
        f"TD update with weight {weight:g} (weight 1 let the TD updates undo much of the pre-training within 10 "
        "iterations).  The EVs act on their own observations only.  Without the demonstrations, P-DQN's EVs "
        "charged in nearly every slot and raised the operating cost and the users' cost (README).",
        "Only the four percentages are the paper's.  The feeder, zones, DER, storage, fleet, tariffs, the baseline "
        "(TOU retail price, storage idle, EVs at full power from plug-in), the idle EV mode, the bilevel training "
        "scheme and every budget are ours.",
        "Upper level: operators' reward = profit (EV revenue - operating cost) / 1000 - (zone load deviation from "
        "its mean / nominal)^2 - 0.1 x voltage violations in the zone (reward weights of the config).  The "
        "operators learn against EVs on the tou rule, then act by that policy, fixed, while the EVs learn.",
        "operator_cost adds the storage's end-of-day deficit (energy stored at the start minus at the end, in the "
        "cells) at the day's mean purchase price; the simulator's operating cost alone would credit a policy that "
        "empties the storage.",
        "ev_cost_per_user: what the EV users paid (V2G income netted) / sessions that plugged in; unmet_kwh "
        "shows what a cheap policy leaves undelivered.",
        "The deadline shield (agents.ev_shield: deadline, ours): a learned EV that would miss its target by "
        "waiting one more step charges at full power, and no discharge forces it to charge later.",
        "Changes (<metric>_change_pct) are per seed against the baseline on the same days; the claims give their "
        f"mean and {CONFIDENCE:.0%} t-interval over seeds.  A change is NaN where the baseline's value is 0.",
    ]


def _figures(ctx: Context, rows: list[dict[str, Any]], curves) -> list:
    from matplotlib.figure import Figure

    from evgrid.io import save_figure

    out = []
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    methods = [*LEARNED, "operators_ppo", "tou_rules", "oracle"]
    width = 0.8 / (len(methods) + 1)
    x = np.arange(len(HEADLINE))
    ax.bar(x, [PAPER_CHANGE_PCT[m] for m in HEADLINE], width, label="paper", color="0.6")
    for k, method in enumerate(methods):
        stats = [mean_ci([r["value"] for r in rows if r["method"] == method and r["metric"] == f"{m}_change_pct"])
                 for m in HEADLINE]
        mean = np.array([s[0] for s in stats])
        err = np.array([[s[0] - s[1], s[2] - s[0]] for s in stats]).T
        ax.bar(x + (k + 1) * width, mean, width, yerr=None if np.isnan(err).all() else err, label=method,
               capsize=3)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x + width * len(methods) / 2, HEADLINE)
    ax.set(ylabel=f"change vs {BASELINE}, % (mean, {CONFIDENCE:.0%} CI)", title="Headline changes")
    ax.legend(fontsize=8)
    out.append(save_figure(fig, ctx.out_dir / "changes.png"))

    stages = ("operators_ppo", *LEARNED)
    fig = Figure(figsize=(12, 3.5))
    for ax, stage in zip(fig.subplots(1, len(stages)), stages):
        for (name, seed), c in curves.items():
            if name == stage and c:
                ax.plot(*zip(*c), label=f"seed {seed}")
        who = "operators (EVs on the tou rule)" if stage == "operators_ppo" else "EVs (operators fixed)"
        ax.set(xlabel="env steps", ylabel="mean episode return per agent", title=f"{stage}: {who}")
        ax.legend(fontsize=7)
    out.append(save_figure(fig, ctx.out_dir / "training.png"))
    return out
