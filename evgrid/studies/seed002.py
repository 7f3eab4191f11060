"""Seed 002 reproduced: LBMS station selection + in-station DDQN across distribution networks
(``evgrid reproduce seed002``).

A city of three networks (residential, commercial, industrial base loads), one large station each
(``experiments/seed002.yaml``).  LBMS sends each request to the reachable station of the least loaded network,
the requests of a step one after another; each network's TOU price follows its own base load.  Strategies:

* ``greedy``: LBMS, every EV charging on arrival (the stations' LLF rule at fraction 1);
* ``DRL_Space`` (w1 = 0, w2 = 1), ``DRL_Cost`` (w1 = 1, w2 = 0), ``DRL_Both`` (w1 = w2 = 0.5): one DDQN per
  strategy (RLlib DQN, double-Q, uniform replay, epsilon 1 -> 0, target sync every B steps: the ``train:``
  section), the three stations sharing its network, choosing the share of present EVs to charge (w2 weighs
  the network's share deviation with its EVs, once per step: ``reward.station_disparity: load``, ours); an EV that
  would miss its target by waiting one more step charges whatever share its station picked (ours: the deadline
  shield, ``agents.ev_shield``; without it the learned stations left 2-3.5 times greedy's energy unmet).

* ``oracle`` (ours, a reference, not the paper's): with greedy's arrivals (the LBMS day, stations then fixed)
  and each EV's energy as greedy gives it, the perfect-foresight schedule of every EV's power with the least
  mean spatial std, each feeder within its limits (``oracle.objective: spatial_balance``,
  :mod:`evgrid.agents.oracle`): how low the stations' control could bring the spread on each day.

Each strategy is trained once per seed and EV count (1,000 and 1,250) and evaluated on held-out days; the
participation sweep evaluates the 1,000-EV policies with 0-100 % of the users following LBMS (ours: the
policies trained at 100 %).  Metrics (``results.parquet``, with ``n_ev`` and ``participation`` columns):
``slvtpr`` and ``spatial_std_kw`` (eqs 26-27, per step over the networks' loads, averaged over the day),
``user_cost_total`` (what users paid plus the compensation for the energy they were left short,
:func:`user_cost_total`) and ``combined_score`` (eqs 29-31, :func:`combined_scores`); ``user_paid`` and
``unmet_kwh`` show its parts, ``train_s`` the training time.  Every value is a mean over the evaluation days of
one seed; the report's spread is over seeds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from evgrid.studies.common import Claim, Context, StudyOutput, row

log = logging.getLogger(__name__)

TITLE = "load balancing across distribution networks: LBMS station selection and in-station DDQN charging"
USES_RAY = True
STUDY = "seed002"
STRATEGIES = {"DRL_Space": (0.0, 1.0), "DRL_Cost": (1.0, 0.0), "DRL_Both": (0.5, 0.5)}
"""Reward weights (station_w1, station_w2) of each DRL strategy; DRL_Both's w1 = w2 = 0.5 (ours: the paper
says only w1 = w2, with weights in [0, 1])."""
METHODS = ("greedy", *STRATEGIES)
"""The paper's strategies, which its orderings compare (``oracle`` is a reference beside them)."""
N_EVS = (1000, 1250)
PARTICIPATION = {True: (0.0, 0.5), False: (0.0, 0.25, 0.5, 0.75)}
"""Participation rates of the sweep besides the 100 % of the main runs (ours: the paper's rates were lost)."""
ITERATIONS = {True: 5, False: 20}
"""DQN iterations per training (epsilon falls from 1 to 0 over all of them)."""
MIN_STEPS_PER_ITERATION = 1000
"""RLlib's DQN samples at least this many env steps per iteration (``min_sample_timesteps_per_iteration``)."""
EVAL_DAYS = {True: range(1000, 1002), False: range(1000, 1004)}
TRAIN_SEED_STRIDE = 10_000
"""Training seed s draws its days from ``TRAIN_SEED_STRIDE * (s + 1)`` on: never an evaluation day."""
COMPENSATION_PER_KWH = 1.5
"""What a station pays a user per kWh short of the target at departure (ours, the paper's formula was lost):
1.5 times the tariff's peak price, more than the dearest price the user could buy the missing energy for, so a
default costs more than charging at the peak would (the paper: defaults "significantly" raise the cost)."""
PAPER = {  # 1,000 EVs
    "user_cost_total": {"DRL_Space": 2620.19, "DRL_Cost": 2594.48, "DRL_Both": 2611.23},
    "spatial_std_kw": {"DRL_Space": 117.32, "DRL_Cost": 122.78, "DRL_Both": 118.36},
    "combined_score": {"DRL_Space": 1.0, "DRL_Cost": 1.0, "DRL_Both": 1.16},
}


def user_cost_total(user_paid: float, unmet_kwh: float, owed_kwh: float,
                    compensation_per_kwh: float = COMPENSATION_PER_KWH) -> float:
    """Total user charging cost of a day: what users paid plus the compensation for every kWh short of their
    targets, of EVs that left (or were turned away, ``unmet_kwh``) and of EVs whose stay the day's end cut
    (``owed_kwh``, ours: counted as unmet)."""
    return user_paid + compensation_per_kwh * (unmet_kwh + owed_kwh)


def combined_scores(cost: dict[str, float], std: dict[str, float]) -> dict[str, float]:
    """Eqs 29-31 over the strategies given (the paper: the three DRL ones): cost and spatial standard deviation
    each min-max normalised so the best is 1 and the worst 0, then summed; higher is better.  A metric on which
    all strategies tie adds 0."""
    out = {m: 0.0 for m in cost}
    for values in (cost, std):
        hi, lo = max(values.values()), min(values.values())
        for m, v in values.items():
            out[m] += (hi - v) / (hi - lo) if hi > lo else 0.0
    return out


# ------------------------------------------------------------------------------------------- the study


def run(ctx: Context) -> StudyOutput:
    from evgrid.cluster.runtime import connect

    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, int], list[float]] = {}
    traces: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    # no training: the same on every seed, computed once
    oracle = {n_ev: _oracle_means(ctx, n_ev, EVAL_DAYS[ctx.quick]) for n_ev in N_EVS}
    with connect(ctx.address, pinned=True):
        for seed in ctx.seeds:
            for n_ev in N_EVS:
                policies = {"greedy": None}
                for strategy in ctx.progress(STRATEGIES, desc=f"seed {seed}, {n_ev} EVs: training"):
                    modules, curve, train_s = _train(ctx, seed, n_ev, strategy)
                    policies[strategy] = modules
                    curves[(f"{strategy} {n_ev} EVs", seed)] = curve
                    rows.append(row(STUDY, strategy, seed, "train_s", train_s, n_ev=n_ev, participation=1.0))
                rates = (1.0, *PARTICIPATION[ctx.quick]) if n_ev == N_EVS[0] else (1.0,)
                for rate in rates:
                    rows += _evaluate(ctx, seed, n_ev, rate, policies, oracle[n_ev] if rate == 1.0 else None)
                if seed == ctx.seeds[0] and n_ev == N_EVS[-1]:
                    traces = {m: _trace(ctx, n_ev, policies[m]) for m in ("greedy", "DRL_Both")}
    return StudyOutput(rows=rows, claims=_claims(rows, ctx.seeds), figures=_figures(ctx, rows, curves, traces),
                       notes=_notes(ctx))


OWN_KEYS = ("seed", "fleet.n_ev", "routing.participation", "reward.station_w1", "reward.station_w2", "train.seed",
            "train.iterations", "train.exploration_steps")
"""Config keys the study sets itself per run (seeds, EV count, participation, each strategy's weights, the
budget): a variant (:attr:`Context.overrides`) may change any other."""


def check_overrides(overrides: tuple[str, ...]) -> None:
    """A variant's ``key=value`` overrides: keys of the study's config (env or ``train:``) other than
    :data:`OWN_KEYS`; a ConfigError names the first that is not."""
    from evgrid.agents.rllib.algos import load_run_config
    from evgrid.config import ConfigError, parse_overrides

    def keys(tree: dict, prefix: str = "") -> list[str]:
        return [k for name, v in tree.items()
                for k in (keys(v, f"{prefix}{name}.") if isinstance(v, dict) else [f"{prefix}{name}"])]

    own = [k for k in keys(parse_overrides(overrides)) if k in OWN_KEYS]
    if own:
        raise ConfigError(f"overrides: {own[0]} is set by the study itself (per EV count, participation, strategy "
                          f"or seed); expected keys other than {', '.join(OWN_KEYS)}")
    load_run_config(STUDY, overrides)


def _overrides(ctx: Context, n_ev: int, participation: float = 1.0) -> list[str]:
    """The run's config changes: the variant's (:attr:`Context.overrides`), then the study's own."""
    return [*ctx.overrides, f"fleet.n_ev={n_ev}", f"routing.participation={participation}"]


def _train(ctx: Context, seed: int, n_ev: int, strategy: str) -> tuple[Any, list[float], float]:
    """One strategy's DDQN trained per the shipped ``train:`` section at ``ITERATIONS``: (modules, mean
    station return per iteration, seconds)."""
    from evgrid.agents.rllib.algos import load_run_config
    from evgrid.agents.rllib.experiment import Experiment

    w1, w2 = STRATEGIES[strategy]
    iterations = ITERATIONS[ctx.quick]
    _, base = load_run_config(STUDY, ctx.overrides)
    per_call = base.rollout_fragment_length * base.envs_per_runner  # env steps of one sample call
    steps = iterations * math.ceil(MIN_STEPS_PER_ITERATION / per_call) * per_call
    env, train = load_run_config(STUDY, _overrides(ctx, n_ev) + [
        f"reward.station_w1={w1}", f"reward.station_w2={w2}", f"seed={TRAIN_SEED_STRIDE * (seed + 1)}",
        f"train.seed={seed}", f"train.iterations={iterations}", f"train.exploration_steps={steps}"])
    t0 = time.perf_counter()
    with Experiment(env, train) as exp:
        curve = [s.returns.get("station", np.nan) for s in exp.run()]
        modules = exp.modules()
    wall_s = time.perf_counter() - t0
    log.info("seed %d, %d EVs: %s trained, %d iterations in %.1f s", seed, n_ev, strategy, iterations, wall_s)
    return modules, curve, wall_s


def _episodes(ctx: Context, n_ev: int, participation: float, modules: Any, days: range) -> list[dict[str, float]]:
    """Metric rows of ``days``: the greedy rule (``modules`` None) or the trained stations."""
    from evgrid.agents.rllib.policy import TrainedPolicy
    from evgrid.envs.config import load_config
    from evgrid.evaluate import policy_episodes, rule_episodes

    cfg = load_config(STUDY, _overrides(ctx, n_ev, participation))
    if modules is None:
        return list(rule_episodes(load_config(cfg, {"agents": {"station": "rule"}}), days))
    return list(policy_episodes(cfg, lambda env: TrainedPolicy(modules, env), days))


def _oracle_means(ctx: Context, n_ev: int, days: range) -> dict[str, float]:
    """The oracle's metrics at ``n_ev`` (100 % participation: its first pass is greedy's LBMS day)."""
    from evgrid.agents.oracle import oracle_episodes
    from evgrid.envs.config import load_config

    return _means([r for r, _ in oracle_episodes(load_config(STUDY, _overrides(ctx, n_ev)), days)])


def _means(eps: list[dict[str, float]]) -> dict[str, float]:
    """The study's metrics of episode rows ``eps``, means over the days."""
    cost = [user_cost_total(e["user_paid"], e["unmet_kwh"], e["owed_kwh"]) for e in eps]
    return {"user_cost_total": float(np.mean(cost)),
            **{k: float(np.mean([e[k] for e in eps])) for k in ("slvtpr", "spatial_std_kw", "user_paid", "unmet_kwh")}}


def _evaluate(ctx: Context, seed: int, n_ev: int, participation: float, policies: dict[str, Any],
              oracle: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Every method's metrics at (n_ev, participation), the combined score over the DRL strategies; ``oracle``:
    its metrics (:func:`_oracle_means`), added as they are."""
    means = {method: _means(_episodes(ctx, n_ev, participation, modules, EVAL_DAYS[ctx.quick]))
             for method, modules in policies.items()}
    if oracle is not None:
        means["oracle"] = oracle
    drl = [m for m in STRATEGIES if m in means]
    score = combined_scores({m: means[m]["user_cost_total"] for m in drl},
                            {m: means[m]["spatial_std_kw"] for m in drl})
    main = n_ev == N_EVS[0] and participation == 1.0
    out = []
    for method, values in means.items():
        values = {**values, **({"combined_score": score[method]} if method in score else {})}
        for metric, v in values.items():
            paper = PAPER.get(metric, {}).get(method) if main else None
            out.append(row(STUDY, method, seed, metric, v, paper, n_ev=n_ev, participation=participation))
    return out


def _trace(ctx: Context, n_ev: int, modules: Any) -> tuple[np.ndarray, np.ndarray]:
    """(plugged EVs per station and step (T, M), base load per network (T, M)) of the first evaluation day."""
    from evgrid.agents.rllib.policy import TrainedPolicy
    from evgrid.envs.config import load_config
    from evgrid.envs.ev_grid import EVGridEnv

    cfg = load_config(STUDY, _overrides(ctx, n_ev))
    env = EVGridEnv(cfg)
    full = np.int64(np.argmax(cfg.stations.fraction_levels))  # greedy: every station charges every EV
    policy: Callable[[dict], dict] = (TrainedPolicy(modules, env).act if modules is not None else
                                      (lambda obs: {a: full for a in obs}))
    obs, _ = env.reset(seed=EVAL_DAYS[True].start)
    n_st = env.sim.layout.n_station
    counts = []
    while env.agents:
        obs, *_ = env.step(policy(obs))
        counts += [np.bincount(r.ev_station, minlength=n_st) for r in env.step_records]
    base = env.sim.base_zone_load_kw()[0][:, env.sim.layout.station_zone]
    return np.array(counts, dtype=float), base


# ------------------------------------------------------------------------------------------- claims


def _values(rows: list[dict], metric: str, n_ev: int, participation: float = 1.0) -> dict[str, dict[int, float]]:
    """method -> seed -> value of ``metric`` at (n_ev, participation), the paper's methods (:data:`METHODS`)."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if (r["metric"] == metric and r["n_ev"] == n_ev and r["participation"] == participation
                and r["method"] in METHODS):
            out.setdefault(r["method"], {})[r["seed"]] = r["value"]
    return out


def _ordering_claim(text: str, values: dict[str, dict[int, float]], test: Callable[[dict[str, float]], bool],
                    seeds: tuple[int, ...]) -> Claim:
    """``test`` on the means over seeds decides; the text adds in how many seeds it holds alone."""
    mean = {m: float(np.mean(list(v.values()))) for m, v in values.items()}
    per_seed = sum(test({m: v[s] for m, v in values.items()}) for s in seeds)
    shown = ", ".join(f"{m} {mean[m]:,.4g}" for m in values)
    return Claim(f"{text} (ours, mean over seeds: {shown}; holds in {per_seed}/{len(seeds)} seeds)",
                 test(mean))


def _claims(rows: list[dict], seeds: tuple[int, ...]) -> list[Claim]:
    out = []
    for n_ev in N_EVS:
        cost = _values(rows, "user_cost_total", n_ev)
        std = _values(rows, "spatial_std_kw", n_ev)
        score = _values(rows, "combined_score", n_ev)
        out += [
            _ordering_claim(f"{n_ev} EVs: greedy has the highest user cost", cost,
                            lambda v: max(v, key=v.get) == "greedy", seeds),
            _ordering_claim(f"{n_ev} EVs: DRL_Cost has the lowest user cost", cost,
                            lambda v: min(v, key=v.get) == "DRL_Cost", seeds),
            _ordering_claim(f"{n_ev} EVs: DRL_Space has the lowest spatial load std", std,
                            lambda v: min(v, key=v.get) == "DRL_Space", seeds),
            _ordering_claim(f"{n_ev} EVs: DRL_Both has the best combined score", score,
                            lambda v: max(v, key=v.get) == "DRL_Both", seeds)]
    rates = sorted({r["participation"] for r in rows})
    for metric, better in (("spatial_std_kw", -1), ("slvtpr", 1)):
        by_rate = {p: _values(rows, metric, N_EVS[0], p) for p in rates}
        for method in METHODS:
            series = {f"{p:.0%}": by_rate[p][method] for p in rates}
            out.append(_ordering_claim(
                f"{N_EVS[0]} EVs, {method}: {metric} {'falls' if better < 0 else 'rises'} as participation "
                f"rises from {rates[0]:.0%} to {rates[-1]:.0%} (every step)", series,
                lambda v, b=better: bool(np.all(b * np.diff(list(v.values())) > 0)), seeds))
    return out


def _notes(ctx: Context) -> list[str]:
    from evgrid.envs.config import load_config

    days = EVAL_DAYS[ctx.quick]
    cfg = load_config(STUDY, ctx.overrides)
    reward = cfg.reward
    unmet = reward.station_unmet_per_kwh
    w2_term = ("w2 share-deviation^ per kWh charged (eq 16 on the network's base load)"
               if reward.station_disparity == "base" else
               "w2 |share deviation| of the network's whole load (EVs included) after the step, once per step, over "
               "the day's largest base-load deviation (ours, reward.station_disparity: load: eq 16's base-load term "
               "moved charging to hours whose base load left room, LBMS then sent those networks more EVs, and the "
               "spatial std rose)")
    return [
        f"Training: {ITERATIONS[ctx.quick]} DQN iterations per strategy, seed and EV count (each at least "
        f"{MIN_STEPS_PER_ITERATION:,} env steps, 12 days), epsilon falling from 1 to 0 over them, the rest of the "
        f"settings from the train: section of experiments/seed002.yaml (ours: the paper's Table 1 was lost).  "
        f"Evaluation on held-out days "
        f"{days.start}-{days.stop - 1}, greedy on the same days.",
        "Ours where the paper is silent or lost: three networks (IEEE 33-bus copies with residential, commercial "
        "and industrial load shapes), 22-50 kW chargers, requests uniform over the city and 07:00-22:00, stays "
        "U(1, 4) h, target SOC 0.9; each network's peak and valley hours are its highest- and lowest-load "
        "steps, as many as the clock tariff has; LBMS adds each assigned EV's charger power to its network's "
        "load for the later requests of the step" + (
            " and, while the EV drives there, for those of the later steps (routing.lbms_load: committed; the "
            "paper compares the current load, under which consecutive steps herd: README)."
            if cfg.routing.lbms_load == "committed" else "."),
        f"Station reward (eqs 15-18, our reading): -(w1 price^ per kWh charged + {w2_term}), price^ min-max "
        "normalised, " + (f"plus {unmet} per kWh brought towards an EV's target (ours: without it the stations "
                          "defer charging to their EVs' deadlines and leave more energy unmet, README)" if unmet else
                          "with no term of ours for the energy delivered (the deadline shield alone serves the EVs)")
        + ", over the station's largest step energy.  A station observes its network's share deviation of "
        "the base load now and of the whole load of the last step (ours: the three stations share one network).",
        f"user_cost_total = what users paid + {COMPENSATION_PER_KWH} per kWh short of the target at departure "
        "(ours: 1.5 x the peak price, the compensation the paper's eq 28 adds for unmet users; its formula was "
        "lost).  Our currency and "
        "scale differ from the paper's (their data are private), so absolute costs and standard deviations are "
        "far from theirs; the orderings are what carries over.",
        "combined_score: eqs 29-31 over the three DRL strategies of each seed (normalised cost and spatial std, "
        "best 1, worst 0, summed); greedy has none.",
        "Participation sweep: the 1,000-EV policies trained at 100 % participation evaluated with the share of "
        "users following LBMS lowered; the others drive to their nearest reachable station (ours).",
        "oracle (ours, not in the orderings): greedy's LBMS day planned again with perfect foresight, stations "
        "fixed, each EV taking exactly the energy greedy gives it within the day, at powers chosen for the least "
        "mean spatial std (losses included, each feeder within its limits), replayed in the simulator: how low "
        "the stations' control could bring the spread with the same arrivals.  It is not a bound on LBMS, which "
        "would route differently under other loads.",
    ]


# ------------------------------------------------------------------------------------------- figures


def _mean_by(rows: list[dict], metric: str, method: str, **where: Any) -> float:
    v = [r["value"] for r in rows if r["metric"] == metric and r["method"] == method
         and all(r[k] == x for k, x in where.items())]
    return float(np.mean(v)) if v else float("nan")


def _figures(ctx: Context, rows: list[dict], curves: dict, traces: dict) -> list:
    from matplotlib.figure import Figure

    from evgrid.io import save_figure

    out = []
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for (label, seed), c in curves.items():
        ax.plot(np.arange(1, len(c) + 1), c, label=f"{label}, seed {seed}", lw=0.9)
    ax.set(xlabel="iteration (>= 1,000 env steps)", ylabel="mean station episode return",
           title="DDQN training (paper Figs 4-6)")
    ax.legend(fontsize=6)
    out.append(save_figure(fig, ctx.out_dir / "training.png"))

    if traces:
        fig = Figure(figsize=(11, 3.5))
        for ax, (method, (counts, base)) in zip(fig.subplots(1, len(traces), sharey=True), traces.items()):
            hours = np.arange(counts.shape[0]) * 0.25
            for j in range(counts.shape[1]):
                ax.plot(hours, counts[:, j], label=f"station {j}")
            twin = ax.twinx()
            twin.plot(np.arange(base.shape[0]) * 0.25, base / 1e3, ls=":", lw=0.8)
            twin.set_ylabel("network base load, MW (dotted)")
            ax.set(title=f"{method}, {N_EVS[-1]} EVs", xlabel="hour", ylabel="EVs plugged in")
        ax.legend(fontsize=7)
        out.append(save_figure(fig, ctx.out_dir / "ev_distribution.png"))

    fig = Figure(figsize=(13, 3.5))
    metrics = ("slvtpr", "spatial_std_kw", "user_cost_total", "combined_score")
    titles = ("average SLVTPR (Fig 10)", "average spatial std, kW (Fig 11)", "user cost (Fig 12)",
              "combined score (Fig 13)")
    for ax, metric, title in zip(fig.subplots(1, 4), metrics, titles):
        for k, method in enumerate((*METHODS, "oracle")):
            vals = [_mean_by(rows, metric, method, n_ev=n, participation=1.0) for n in N_EVS]
            ax.bar(np.arange(len(N_EVS)) + 0.16 * k, vals, width=0.16, label=method)
        ax.set_xticks(np.arange(len(N_EVS)) + 0.32, [f"{n} EVs" for n in N_EVS])
        ax.set(title=title)
    ax.legend(fontsize=7)
    out.append(save_figure(fig, ctx.out_dir / "strategies.png"))

    fig = Figure(figsize=(9, 3.5))
    rates = sorted({r["participation"] for r in rows})
    for ax, metric in zip(fig.subplots(1, 2), ("slvtpr", "spatial_std_kw")):
        for method in METHODS:
            ax.plot([100 * p for p in rates], [_mean_by(rows, metric, method, n_ev=N_EVS[0], participation=p)
                                               for p in rates], marker="o", label=method)
        ax.set(xlabel="users following LBMS, %", title=f"{metric}, {N_EVS[0]} EVs")
    ax.legend(fontsize=7)
    out.append(save_figure(fig, ctx.out_dir / "participation.png"))
    return out
