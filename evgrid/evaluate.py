"""Episode metrics and ``evgrid evaluate``: baselines on the same seeds, one table.

Metric columns (other tools read these names):

| column | meaning |
|---|---|
| policy, episode | what ran, on which seed (episode e uses seed ``seed + e`` for every policy) |
| operator_cost | Σ over steps and zones: purchase + diesel + carbon + curtailment cost |
| ev_cost_per_kwh | what EV users paid / the energy they drew (V2G income netted) |
| user_paid | what EV users paid in all (V2G income netted), currency |
| peak_valley_kw | max − min over the episode of the total feeder load |
| voltage_violations | bus-steps outside [v_min, v_max] that the decisions caused: the power flow of the dispatch, before limit enforcement curtails it |
| violations_enforced | bus-steps still outside after enforcement (e.g. base load alone, or no flexible EV near) |
| max_line_loading | largest line / transformer loading of the episode |
| curtailed_kwh | EV charging curtailed by limit enforcement |
| unmet_kwh | energy short of the target of EVs that left (or were turned away) |
| owed_kwh | energy short of the target of EVs still plugged in when the episode ends (their stay is cut): what a policy that defers charging past the end leaves to the next day, counted in neither unmet_kwh nor operator_cost |
| slvtpr | multi-network: mean over steps of min / max network load; NaN on one feeder |
| spatial_std_kw | multi-network: mean over steps of the std of network loads; NaN on one feeder |
| carbon_cost | the stepped carbon cost part of operator_cost |
| cost_with_unmet | operator_cost + reward.ev_unmet_per_kwh × unmet_kwh: a cheap day that leaves EVs short is not cheap (what the oracle's ``operator_cost`` plan minimises) |
| ev_cost_per_user | what EV users paid (V2G income netted) / the sessions that plugged in |
| storage_deficit_cost | (storage energy at the start − at the end, kWh) × mean purchase price; not in operator_cost |
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from evgrid.agents.baselines import EVALUATE_POLICIES
from evgrid.config import ConfigError
from evgrid.envs.config import EnvConfig, load_config
from evgrid.envs.market import purchase_price_per_kwh
from evgrid.envs.sim import DEPARTED, PLUGGED, TRUNCATED, TURNED_AWAY, Sim, StepRecord
from evgrid.validate import check_int

log = logging.getLogger(__name__)

METRICS = ("operator_cost", "ev_cost_per_kwh", "user_paid", "peak_valley_kw", "voltage_violations",
           "violations_enforced",
           "max_line_loading",
           "curtailed_kwh", "unmet_kwh", "owed_kwh", "slvtpr", "spatial_std_kw", "carbon_cost", "cost_with_unmet",
           "ev_cost_per_user", "storage_deficit_cost")


class EpisodeMetrics:
    """Accumulates a Sim's step records into the METRICS of each environment."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        e = sim.n_env
        self.op_cost = np.zeros(e)
        self.carbon = np.zeros(e)
        self.load_max = np.full(e, -np.inf)
        self.load_min = np.full(e, np.inf)
        self.violations = np.zeros(e, dtype=np.int64)
        self.violations_enforced = np.zeros(e, dtype=np.int64)
        self.max_loading = np.zeros(e)
        self.curtailed = np.zeros(e)
        self.slvtpr = np.zeros(e)
        self.spatial_std = np.zeros(e)
        self.storage_in_kwh = np.zeros(e)  # net energy into the storage cells
        self.purchase_price_sum = 0.0
        self.steps = 0

    def add(self, rec: StepRecord) -> None:
        c = rec.zone_cost
        self.op_cost += c.total.sum(axis=1)
        self.carbon += c.carbon_cost.sum(axis=1)
        total = rec.total_load_kw
        self.load_max = np.fmax(self.load_max, total)
        self.load_min = np.fmin(self.load_min, total)
        self.violations += rec.violations
        self.violations_enforced += rec.violations_enforced
        self.max_loading = np.fmax(self.max_loading, np.nanmax(rec.line_loading, axis=1))
        self.curtailed += rec.curtail_kw.sum(axis=1) * self.sim.dt_h
        fl = rec.feeder_load_kw
        if fl.shape[1] > 1:
            hi = fl.max(axis=1)
            self.slvtpr += np.where(hi > 0, fl.min(axis=1) / np.where(hi > 0, hi, 1.0), 0.0)
            self.spatial_std += fl.std(axis=1)
        self.storage_in_kwh += rec.storage_e_kwh.sum(axis=1)
        self.purchase_price_sum += float(purchase_price_per_kwh(rec.period, self.sim.cfg.market))
        self.steps += 1

    def rows(self) -> list[dict[str, float]]:
        sim, fleet, env = self.sim, self.sim.fleet, self.sim.day.env
        ended = (fleet.status == DEPARTED) | (fleet.status == TURNED_AWAY)
        unmet = np.bincount(env, np.where(ended, np.nan_to_num(fleet.unmet_kwh), 0.0), sim.n_env)
        owed = np.bincount(env, np.where(fleet.status == TRUNCATED, np.nan_to_num(fleet.unmet_kwh), 0.0), sim.n_env)
        drawn = np.bincount(env, np.maximum(fleet.e_grid_kwh, 0.0), sim.n_env)
        paid = np.bincount(env, fleet.cost, sim.n_env)
        served = (fleet.status == PLUGGED) | (fleet.status == DEPARTED) | (fleet.status == TRUNCATED)
        users = np.bincount(env, served.astype(float), sim.n_env)
        multi = len(sim.layout.feeders) > 1
        n = max(self.steps, 1)
        deficit = -self.storage_in_kwh * self.purchase_price_sum / n
        return [dict(operator_cost=float(self.op_cost[e]),
                     ev_cost_per_kwh=float(paid[e] / drawn[e]) if drawn[e] > 0 else float("nan"),
                     user_paid=float(paid[e]),
                     peak_valley_kw=float(self.load_max[e] - self.load_min[e]),
                     voltage_violations=int(self.violations[e]),
                     violations_enforced=int(self.violations_enforced[e]), max_line_loading=float(self.max_loading[e]),
                     curtailed_kwh=float(self.curtailed[e]), unmet_kwh=float(unmet[e]),
                     owed_kwh=float(owed[e]),
                     slvtpr=float(self.slvtpr[e] / n) if multi else float("nan"),
                     spatial_std_kw=float(self.spatial_std[e] / n) if multi else float("nan"),
                     carbon_cost=float(self.carbon[e]),
                     cost_with_unmet=float(self.op_cost[e] + sim.cfg.reward.ev_unmet_per_kwh * unmet[e]),
                     ev_cost_per_user=float(paid[e] / users[e]) if users[e] > 0 else float("nan"),
                     storage_deficit_cost=float(deficit[e]))
                for e in range(sim.n_env)]


def rule_episodes(cfg: EnvConfig, seeds: Iterable[int], log_dir: str | os.PathLike[str] | None = None
                  ) -> Iterator[dict[str, float]]:
    """Episodes with every level on its rule (the simulator alone), one metric row each; with ``log_dir``,
    their ``steps.parquet`` and ``sessions.parquet`` there (episode numbers count from 0)."""
    from evgrid.io import EpisodeLog

    sim = Sim(cfg, 1)
    log = EpisodeLog(log_dir, sim) if log_dir is not None else None
    try:
        for episode, seed in enumerate(seeds):
            sim.reset(seed)
            if log is not None:
                log.start(episode)
            m = EpisodeMetrics(sim)
            while sim.t < sim.n_steps:
                rec = sim.step()
                m.add(rec)
                if log is not None:
                    log.add_step(rec)
            if log is not None:
                log.end_episode()
            yield m.rows()[0]
    finally:
        if log is not None:
            log.close()


def policy_episodes(cfg: EnvConfig, make_policy: Callable[[Any], Any], seeds: Iterable[int],
                    log_dir: str | os.PathLike[str] | None = None, *,
                    operator_policy: Any = None) -> Iterator[dict[str, float]]:
    """Episodes of an :class:`EVGridEnv` whose learned agents follow ``make_policy(env)`` (anything with
    ``act(obs) -> actions``), one metric row each; with ``log_dir``, the env's step and session logs there;
    ``operator_policy``: acts for the operators inside the env (:class:`evgrid.envs.ev_grid.OperatorPolicy`)."""
    from evgrid.envs.ev_grid import EVGridEnv

    env = EVGridEnv(load_config(cfg, {"log_dir": None if log_dir is None else os.fspath(log_dir)}),
                    operator_policy=operator_policy)
    try:
        policy = make_policy(env)
        for seed in seeds:
            obs, _ = env.reset(seed=seed)
            m = EpisodeMetrics(env.sim)
            while True:
                # every simulator step the call ran (reset too: individual EVs with rule levels skip the steps
                # with no EV plugged in)
                for rec in env.step_records:
                    m.add(rec)
                if not env.agents:
                    break
                obs, *_ = env.step(policy.act(obs))
            yield m.rows()[0]
    finally:
        env.close()


def output_dir(name: str, path: str | os.PathLike[str]) -> Path:
    """Create the directory ``path`` (and its parents) for results, or a ConfigError naming ``name`` — before
    any work whose results it would hold."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{name}: cannot create the directory {os.fspath(path)!r} ({e.strerror or e}); "
                          f"expected a new or existing directory") from None
    return out


def episode_seeds(episodes: int, seed: int) -> range:
    """The seeds of ``episodes`` episodes from ``seed`` (episode e: ``seed + e``); a ConfigError naming
    ``episodes`` or ``seed`` when out of range."""
    try:
        check_int("episodes", episodes, 1, 1_000_000)
        check_int("seed", seed, 0, 2**62)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return range(int(seed), int(seed) + int(episodes))


def check_evaluation(config: Any, policies: Sequence[str], episodes: int, *, seed: int | None = None,
                     overrides: Any = (), checkpoint: str | os.PathLike[str] | None = None) -> tuple[EnvConfig, range]:
    """(config, seeds of the episodes) after checking every input of :func:`evaluate_baselines`; a ConfigError
    names the first that cannot work."""
    bad = [p for p in policies if p not in EVALUATE_POLICIES]
    if bad or not (policies or checkpoint is not None):
        raise ConfigError(f"policy: expected one or more of {', '.join(EVALUATE_POLICIES)}, got "
                          f"{bad[0] if bad else 'none'!r}")
    base = load_config(config, overrides)
    seeds = episode_seeds(episodes, base.seed if seed is None else seed)
    if checkpoint is not None:
        from evgrid.agents.rllib.policy import checkpoint_dir

        checkpoint_dir(checkpoint)
    return base, seeds


def evaluate_baselines(config: Any, policies: Sequence[str], episodes: int, *,
                       out_dir: str | os.PathLike[str] | None, seed: int | None = None, overrides: Any = (),
                       progress: bool = True, checkpoint: str | os.PathLike[str] | None = None) -> list[dict]:
    """Run each baseline or the oracle (and, with ``checkpoint``, the trained policies as ``trained``) for ``episodes``
    episodes on seeds ``seed``, ``seed + 1``, ...; write ``metrics.parquet`` and ``summary.md`` to ``out_dir``
    after every episode.  With the config's ``log_dir`` set, each policy's ``steps.parquet`` and
    ``sessions.parquet`` go to ``<log_dir>/<policy>/``.  Every input is checked before the first episode."""
    from tqdm import tqdm

    from evgrid.agents.baselines import rule_overrides

    base, seeds = check_evaluation(config, policies, episodes, seed=seed, overrides=overrides, checkpoint=checkpoint)
    out = output_dir("out_dir", out_dir) if out_dir is not None else None

    def log_dir(policy: str) -> Path | None:
        return Path(base.log_dir) / policy if base.log_dir is not None else None

    runs: list[tuple[str, Callable[[], Iterator[dict]]]] = []
    if checkpoint is not None:
        from evgrid.agents.rllib.policy import TrainedPolicy, load_modules

        modules = load_modules(checkpoint)
        runs.append(("trained", lambda: policy_episodes(base, lambda env: TrainedPolicy(modules, env), seeds,
                                                        log_dir("trained"))))
    for policy in policies:
        if policy == "oracle":
            from evgrid.agents.oracle import oracle_episodes

            runs.append((policy, lambda: (row for row, _ in oracle_episodes(base, seeds, log_dir("oracle")))))
            continue
        cfg = load_config(base, rule_overrides(policy, routed=base.routing is not None))
        runs.append((policy, lambda cfg=cfg, policy=policy: rule_episodes(cfg, seeds, log_dir(policy))))
    rows: list[dict] = []
    with tqdm(total=len(runs) * episodes, desc="evaluate", unit="episode", disable=not progress) as bar:
        for policy, episodes_of in runs:
            bar.set_postfix(policy=policy)
            for episode, metrics in enumerate(episodes_of()):
                rows.append({"policy": policy, "episode": episode, **metrics})
                if out is not None:
                    write_metrics(rows, out)  # an interrupted evaluation keeps every episode it finished
                bar.update(1)
    return rows


def write_metrics(rows: list[dict], out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "metrics.parquet")
    (out / "summary.md").write_text(summary_table(rows), encoding="utf-8")
    return out


def summary_table(rows: list[dict]) -> str:
    """Markdown table of each policy's mean metrics over its episodes."""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    head = "| policy | episodes | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for p in policies:
        sel = [r for r in rows if r["policy"] == p]
        cells = []
        for m in METRICS:
            v = np.array([r[m] for r in sel], dtype=float)
            cells.append("n/a" if np.isnan(v).all() else f"{np.nanmean(v):.4g}")
        lines.append(f"| {p} | {len(sel)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
