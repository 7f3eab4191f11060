"""Seed 001 reproduced: two-stage charging scheduling of household EVs (``evgrid reproduce seed001``).

Stage 1 (the DSO's LinDistFlow OPF over the valley, :func:`evgrid.envs.start_time.solve_stage1`) gives each
charging station its optimal profile; stage 2 (``EVStartTime-v0``) picks each arriving EV's charging start.
PPO (the paper's settings), A2C (PPO's special case) and DQN are trained on Ray
(:func:`evgrid.agents.rllib.start_time.train_start_time`) once per training seed, every training a Ray task of
its own (side by side, one CPU each), and evaluated on held-out
days beside ``random`` and ``greedy`` (ours: each EV at the start that brings its station closest to the optimal
profile).  With ``--ours`` (:data:`OURS`, about twice the training time), ``PPO_ours``, ``A2C_ours`` and
``DQN_ours`` are trained too: the same algorithms and budgets on our observation (the paper's plus each start
slot's score, ``start_time.observation: scores``), with our network scoring each slot (``policy="slots"``: PPO's
and A2C's logits, DQN's Q-values), which score higher than the paper's setting (README, seed 001).  Methods in
``results.parquet``:

* ``PPO``, ``A2C``, ``DQN`` (``PPO_ours``, ``A2C_ours``, ``DQN_ours``), ``random``, ``greedy``: total reward
  (eq 22, per node and the mean over nodes, the paper's "total reward"), the average and maximum deviation of
  the scheduled from the optimal profile per node (MW), decision time per EV (ms) and training wall time (s);
* ``before``: every EV charging from plug-in (the paper's original case), ``after``: PPO's schedule, ``oracle``:
  stage 1's optimal profiles: the voltage nadir per node and the voltage swing at node 4 over the valley, from
  the AC power flow of the day.

Every value is a mean over the evaluation days of one training seed; the report's spread is over training seeds.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from evgrid.studies.common import Claim, Context, StudyOutput, row

log = logging.getLogger(__name__)

TITLE = "two-stage charging scheduling of household EVs: a LinDistFlow OPF, then PPO choosing start times"
USES_RAY = True
STUDY = "seed001"
PAPER_TIMESTEPS = 512_200
QUICK_TIMESTEPS = {"PPO": 4096, "A2C": 4096, "DQN": 8192}
ALGORITHMS = ("PPO", "A2C", "DQN")
# seconds per env step relative to PPO's (the full study on the idle 2-core machine, 2026-12-06: PPO 438 s, A2C
# 219 s, DQN 568 s per 512,200 steps): the longest trainings start first
RELATIVE_COST = {"DQN": 1.3, "PPO": 1.0, "A2C": 0.5}
# method -> (algorithm, start_time.observation, policy): the paper's setting, then ours on the same budgets
METHODS = {**{a: (a, "paper", "mlp") for a in ALGORITHMS},
           "PPO_ours": ("PPO", "scores", "slots"), "A2C_ours": ("A2C", "scores", "slots"),
           "DQN_ours": ("DQN", "scores", "slots")}
OURS = tuple(m for m, (_, observation, _) in METHODS.items() if observation != "paper")
"""Trained only with ``--ours`` (PPO_ours, A2C_ours, DQN_ours): the paper's four methods alone meet the study's
time budget."""
EVAL_DAYS = {True: range(1000, 1002), False: range(1000, 1010)}
SWING_NODE = 4
CURVE_FILE = "curve.json"  # an agent's training curve, (env steps, mean return per node) pairs, beside it
PAPER = {
    "total_reward": {"PPO": 937.0, "A2C": 908.0, "DQN": 825.0, "random": 600.0},
    "total_reward_node": {"PPO": {5: 939.5, 9: 923.1, 13: 946.6}},
    "deviation_avg_mw_node": {"PPO": {5: 0.101, 9: 0.067, 13: 0.044}},
    "deviation_max_mw_node": {"PPO": {5: 0.246, 9: 0.277, 13: 0.127}},
    "vm_min_pu_node": {"before": {9: 0.969}, "after": {9: 0.973}},
    "vm_swing_pu_node": {"before": {SWING_NODE: 0.0051}, "after": {SWING_NODE: 0.0028}},
    "decision_ms": {"PPO": 2.5},
}


def run(ctx: Context) -> StudyOutput:
    from evgrid.agents.rllib.start_time import evaluate_policies

    days = EVAL_DAYS[ctx.quick]
    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, int], list[tuple[int, float]]] = {}
    trained = _train_all(ctx, curves)
    last: dict[str, Any] = {}
    for seed in ctx.seeds:
        agents = {m: trained[m, seed] for m in _methods(ctx)}
        t0 = time.perf_counter()
        results = evaluate_policies(agents, days)
        log.info("seed %d: evaluated on %d days in %.1f s", seed, len(days), time.perf_counter() - t0)
        rows += _policy_rows(seed, results, agents)
        env = agents["PPO"].make_env()
        rows += _voltage_rows(seed, env, results["PPO"])
        last = {"env": env, "results": results}
    figures = _figures(ctx, last["env"], last["results"], curves)
    return StudyOutput(rows=rows, claims=_claims(rows), figures=figures, notes=_notes(ctx))


def _train_all(ctx: Context, curves: dict[tuple[str, int], list[tuple[int, float]]]) -> dict[tuple[str, int], Any]:
    """Every (method, training seed)'s agent, saved in ``agents/<method>-seed<seed>/`` (its ``curve.json``
    last).  The trainings run side by side as Ray tasks of one CPU each (sampling inside the task), the
    longest first, so a cluster (``--address``) or a machine with more cores finishes sooner.  With
    ``ctx.resume``, an agent the interrupted run saved whole is restored instead of trained again."""
    from evgrid.agents.rllib.start_time import StartTimeAgent

    agents, jobs = {}, []
    for seed in ctx.seeds:
        for method in _methods(ctx):
            where = _agent_dir(ctx, method, seed)
            if ctx.resume and (where / CURVE_FILE).is_file():
                agents[method, seed] = StartTimeAgent.restore(where)
                curves[method, seed] = [tuple(p) for p in json.loads((where / CURVE_FILE).read_text("utf-8"))]
                log.info("seed %d: %s kept from the interrupted run (%s)", seed, method, where)
            else:
                jobs.append((method, seed, ctx.quick))
    jobs.sort(key=lambda job: -RELATIVE_COST[METHODS[job[0]][0]])
    done = _as_completed(_train_one, jobs, ctx.address)
    for (method, seed, _), (archive, curve) in ctx.progress(done, desc="training", total=len(jobs)):
        where = _agent_dir(ctx, method, seed)
        _unpack(archive, where)
        agents[method, seed] = agent = StartTimeAgent.restore(where)
        curves[method, seed] = [tuple(p) for p in curve]
        (where / CURVE_FILE).write_text(json.dumps(curve), encoding="utf-8")
        log.info("seed %d: %s trained, %d steps in %.1f s", seed, method, agent.timesteps, agent.wall_s)
    return agents


def _methods(ctx: Context) -> list[str]:
    """The trained methods of this run: the paper's, and ours with ``ctx.ours``."""
    return [m for m in METHODS if ctx.ours or m not in OURS]


def _agent_dir(ctx: Context, method: str, seed: int) -> Path:
    return ctx.out_dir / "agents" / f"{method}-seed{seed}"


def _train_one(method: str, seed: int, quick: bool) -> tuple[bytes, list[tuple[int, float]]]:
    """Train one method for one seed (inside a Ray task); its saved agent and RLlib checkpoint as a gzipped
    tar (the task may run on another node) and its training curve."""
    from evgrid.agents.rllib.start_time import train_start_time

    algo, observation, policy = METHODS[method]
    curve: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        agent = train_start_time(
            algo, timesteps=QUICK_TIMESTEPS[algo] if quick else PAPER_TIMESTEPS, seed=seed, num_env_runners=0,
            out_dir=Path(tmp), progress=lambda n, ret: curve.append((n, ret)), policy=policy,
            start_time=None if observation == "paper" else {"observation": observation})
        agent.stop()
        return _pack(Path(tmp)), curve


def _as_completed(fn: Callable[..., Any], jobs: list[tuple], address: str | None) -> Iterator[tuple[tuple, Any]]:
    """``(job, fn(*job))`` for every job, run as Ray tasks of one CPU each, as they finish."""
    import ray

    from evgrid.cluster.runtime import connect

    if not jobs:
        return
    with connect(address, pinned=True):
        task = ray.remote(num_cpus=1)(fn)
        pending = {task.remote(*job): job for job in jobs}
        while pending:
            [ref], _ = ray.wait(list(pending))
            yield pending.pop(ref), ray.get(ref)


def _pack(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(path, arcname=".")
    return buf.getvalue()


def _unpack(archive: bytes, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")


def _policy_rows(seed: int, results: dict[str, list], agents: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for method, res in results.items():
        nodes = res[0].nodes
        reward = np.mean([r.total_reward for r in res], axis=0)  # (M,) per node, mean over days
        dev_avg = np.mean([r.dev_mean_mw for r in res], axis=0)
        dev_max = np.mean([r.dev_max_mw for r in res], axis=0)
        out.append(row(STUDY, method, seed, "total_reward", float(reward.mean()),
                       PAPER["total_reward"].get(method)))
        out.append(row(STUDY, method, seed, "deviation_avg_mw", float(dev_avg.mean())))
        out.append(row(STUDY, method, seed, "deviation_max_mw", float(dev_max.max())))
        for k, n in enumerate(nodes):
            for metric, values in (("total_reward", reward), ("deviation_avg_mw", dev_avg),
                                   ("deviation_max_mw", dev_max)):
                paper = PAPER[f"{metric}_node"].get(method, {}).get(n)
                out.append(row(STUDY, method, seed, f"{metric}_node{n}", float(values[k]), paper))
        if method in agents:
            a = agents[method]
            out.append(row(STUDY, method, seed, "decision_ms", a.decision_ms, PAPER["decision_ms"].get(method)))
            out.append(row(STUDY, method, seed, "wall_s", a.wall_s))
            out.append(row(STUDY, method, seed, "train_timesteps", float(a.timesteps)))
    return out


def _voltage_rows(seed: int, env, ppo: list) -> list[dict[str, Any]]:
    """Voltage nadir per node and the swing at node 4 over the valley, mean over the days: ``before`` (every
    EV from plug-in), ``after`` (PPO's schedule), ``oracle`` (stage 1's optimal profiles)."""
    feeder = env.layout.feeders[0]
    acc = {"before": [r.stage1.vm_orig_pu for r in ppo],
           "after": [env.ac_flow(r.p_sched_kw, r.stage1)[0] for r in ppo],
           "oracle": [r.stage1.vm_opt_pu for r in ppo]}
    out = []
    swing_bus = int(np.flatnonzero(feeder.numbers == SWING_NODE)[0])
    for method, vms in acc.items():
        vmin = np.mean([vm.min(axis=0) for vm in vms], axis=0)  # (n_bus,)
        swing = float(np.mean([np.ptp(vm[:, swing_bus]) for vm in vms]))
        for b, n in enumerate(feeder.numbers):
            paper = PAPER["vm_min_pu_node"].get(method, {}).get(int(n))
            out.append(row(STUDY, method, seed, f"vm_min_pu_node{int(n)}", float(vmin[b]), paper))
        out.append(row(STUDY, method, seed, "vm_min_pu", float(vmin.min())))
        out.append(row(STUDY, method, seed, f"vm_swing_pu_node{SWING_NODE}", swing,
                       PAPER["vm_swing_pu_node"].get(method, {}).get(SWING_NODE)))
    return out


def _mean(rows: list[dict[str, Any]], method: str, metric: str) -> float:
    v = [r["value"] for r in rows if r["method"] == method and r["metric"] == metric]
    return float(np.mean(v)) if v else float("nan")


def _claims(rows: list[dict[str, Any]]) -> list[Claim]:
    r = {m: _mean(rows, m, "total_reward") for m in (*METHODS, "random", "greedy")}
    order = sorted(("PPO", "A2C", "DQN", "random"), key=lambda m: -r[m])
    vm = {m: _mean(rows, m, "vm_min_pu") for m in ("before", "after")}
    swing = {m: _mean(rows, m, f"vm_swing_pu_node{SWING_NODE}") for m in ("before", "after")}
    ms = _mean(rows, "PPO", "decision_ms")
    dev = {m: _mean(rows, m, "deviation_avg_mw") for m in ("PPO", "PPO_ours", "random")}
    nodes = sorted({x["metric"] for x in rows if x["metric"].startswith("vm_min_pu_node")})
    worse = [n.removeprefix("vm_min_pu_node") for n in nodes if _mean(rows, "after", n) < _mean(rows, "before", n)]
    claims = [
        Claim(f"total reward PPO > A2C > DQN > random (paper 937 > 908 > 825 > 600; ours "
              f"{' > '.join(f'{m} {r[m]:.0f}' for m in order)})", order == ["PPO", "A2C", "DQN", "random"]),
        Claim(f"total reward PPO > DQN > random (paper 937 > 825 > 600; ours {r['PPO']:.0f}, {r['DQN']:.0f}, "
              f"{r['random']:.0f})", r["PPO"] > r["DQN"] > r["random"]),
        Claim("every trained algorithm beats random on total reward",
              all(r[a] > r["random"] for a in ALGORITHMS)),
        Claim(f"PPO's mean deviation from the optimal profile is below random's (ours: PPO {dev['PPO']:.3f}, "
              f"random {dev['random']:.3f} MW)", dev["PPO"] < dev["random"]),
        Claim(f"no node's voltage nadir is lower after scheduling than before (nodes lower: "
              f"{', '.join(worse) or 'none'})", not worse),
        Claim(f"PPO is within 10 % of the greedy copy of the optimal profile (ours, no paper value: greedy "
              f"{r['greedy']:.0f})", r["PPO"] >= 0.9 * r["greedy"]),
        Claim(f"the feeder's voltage nadir rises after scheduling (paper node 9 0.969 -> 0.973; ours "
              f"{vm['before']:.4f} -> {vm['after']:.4f})", vm["after"] > vm["before"]),
        Claim(f"the voltage swing at node {SWING_NODE} shrinks (paper 0.0051 -> 0.0028 p.u.; ours "
              f"{swing['before']:.4f} -> {swing['after']:.4f})", swing["after"] < swing["before"]),
        Claim(f"a decision takes at most the paper's 2.5 ms per EV (ours {ms:.2f} ms)", ms <= 2.5),
    ]
    if any(np.isnan(r[m]) for m in OURS):
        return claims  # a run without --ours
    ours = sorted((*OURS, "random"), key=lambda m: -r[m])
    return claims + [
        Claim(f"ours (score observation, slot-scoring networks): PPO > A2C > DQN > random "
              f"({' > '.join(f'{m} {r[m]:.0f}' for m in ours)})", ours == [*OURS, "random"]),
        Claim("ours: every trained algorithm beats random on total reward", all(r[m] > r["random"] for m in OURS)),
        Claim(f"ours: PPO_ours's mean deviation from the optimal profile is below random's ({dev['PPO_ours']:.3f} "
              f"MW)", dev["PPO_ours"] < dev["random"]),
    ]


def _notes(ctx: Context) -> list[str]:
    budget = ", ".join(f"{a} {QUICK_TIMESTEPS[a]:,}" for a in ALGORITHMS) if ctx.quick else \
        f"{PAPER_TIMESTEPS:,} each (the paper's)"
    return [
        f"Training budget: {budget} env steps per algorithm and training seed; evaluation on held-out days "
        f"{EVAL_DAYS[ctx.quick].start}-{EVAL_DAYS[ctx.quick].stop - 1} (training days start at 0).",
        "Our readings of what the paper lost (see evgrid/envs/start_time.py and evgrid/agents/rllib/start_time.py): "
        "absolute deviation in eq 21, C = 1000 in eq 23, a 50 kW per slot station ramp, stable-baselines3's "
        "defaults for the hyper-parameters the PPO table lost.  The paper's EVs and base load are private: "
        "ours are drawn (arrival N(19:00, 1.5 h), SOC N(0.4, 0.1), 3.5-7 kW).",
        "The paper's random policy scores ~600; ours scores more because eq 21's deviation is our reading and "
        "our EVs' windows are wide: a uniform start inside a wide window already spreads the load.",
        "'after' is PPO's schedule; 'oracle' stage 1's optimal profiles (deviation 0 by definition).",
        "PPO_ours, A2C_ours and DQN_ours (ours, not the paper's; trained with --ours): the same algorithms, settings "
        "and budgets on the paper's observation plus each start slot's score (the reward of starting there per "
        "unit of the block's energy), with one small network scoring every slot from its own features (PPO's and "
        "A2C's logits, DQN's Q-values) instead of the paper's MLP over the whole observation." if ctx.ours else
        "Run with --ours to add PPO_ours, A2C_ours and DQN_ours: the same algorithms and budgets on our "
        "observation and slot-scoring networks, which score higher than the paper's setting (README, seed 001).",
    ]


def _figures(ctx: Context, env, results: dict[str, list], curves) -> list:
    from matplotlib.figure import Figure

    from evgrid.io import save_figure

    out = []
    day = EVAL_DAYS[ctx.quick].start
    ppo = results["PPO"][0]
    s1 = ppo.stage1
    hours = env.st.valley_start_h + np.arange(env.n_slots) * env.dt_h
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.plot(hours, s1.tie_orig_kw / 1e3, label="original (charging from plug-in)")
    ax.plot(hours, s1.tie_opt_kw / 1e3, label="optimised (stage 1)")
    ax.plot(hours, env.ac_flow(ppo.p_sched_kw, s1)[1] / 1e3, label="PPO schedule")
    ax.plot(hours, s1.tie_target_kw / 1e3, "k--", lw=0.8, label="flat target (eqs 6-8)")
    ax.set(xlabel="hour (24 + h: next morning)", ylabel="tie-line power, MW", title=f"Tie-line, day {day}")
    ax.legend()
    out.append(save_figure(fig, ctx.out_dir / "tie_line.png"))

    fig = Figure(figsize=(12, 3.5))
    for k, ax in enumerate(fig.subplots(1, len(env.nodes), sharey=True)):
        ax.plot(hours, s1.p_opt_kw[k] / 1e3, "k", label="optimal")
        for m in (*(m for m in METHODS if m in results), "random"):
            ax.plot(hours, results[m][0].p_sched_kw[k] / 1e3, label=m, lw=0.9, ls="--" if "ours" in m else "-")
        ax.set(title=f"node {env.nodes[k]}", xlabel="hour", ylabel="MW" if k == 0 else None)
    ax.legend(fontsize=7)
    out.append(save_figure(fig, ctx.out_dir / "station_profiles.png"))

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for (algo, seed), c in curves.items():
        if c:
            n, ret = zip(*c)
            ax.plot(n, ret, label=f"{algo} seed {seed}")
    ax.set(xlabel="env steps", ylabel="mean episode return per node", title="Training")
    ax.legend(fontsize=7)
    out.append(save_figure(fig, ctx.out_dir / "training.png"))

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    nodes = env.layout.feeders[0].numbers
    for label, vm in (("before", s1.vm_orig_pu), ("optimal (stage 1)", s1.vm_opt_pu),
                      ("PPO", env.ac_flow(ppo.p_sched_kw, s1)[0])):
        ax.plot(nodes, vm.min(axis=0), marker="o", label=label)
    ax.set(xlabel="node", ylabel="lowest voltage over the valley, p.u.", title=f"Voltage nadir, day {day}")
    ax.legend()
    out.append(save_figure(fig, ctx.out_dir / "voltage.png"))
    return out
