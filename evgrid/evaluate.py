"""Episode metrics and ``evgrid evaluate``: baselines on the same seeds, one table.

Metric columns (other tools read these names):

| column | meaning |
|---|---|
| policy, episode | what ran, on which seed (episode e uses seed ``seed + e`` for every policy) |
| operator_cost | Σ over steps and zones: purchase + diesel + carbon + curtailment cost |
| ev_cost_per_kwh | what EV users paid / the energy they drew (V2G income netted) |
| peak_valley_kw | max − min over the episode of the total feeder load |
| voltage_violations | bus-steps outside [v_min, v_max] that the decisions caused: the power flow of the dispatch, before limit enforcement curtails it |
| violations_enforced | bus-steps still outside after enforcement (e.g. base load alone, or no flexible EV near) |
| max_line_loading | largest line / transformer loading of the episode |
| curtailed_kwh | EV charging curtailed by limit enforcement |
| unmet_kwh | energy short of the target of EVs that left (or were turned away) |
| slvtpr | multi-network: mean over steps of min / max network load; NaN on one feeder |
| spatial_std_kw | multi-network: mean over steps of the std of network loads; NaN on one feeder |
| carbon_cost | the stepped carbon cost part of operator_cost |
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from evgrid.envs.config import EnvConfig, load_config
from evgrid.envs.sim import DEPARTED, TURNED_AWAY, Sim, StepRecord

log = logging.getLogger(__name__)

METRICS = ("operator_cost", "ev_cost_per_kwh", "peak_valley_kw", "voltage_violations", "violations_enforced",
           "max_line_loading",
           "curtailed_kwh", "unmet_kwh", "slvtpr", "spatial_std_kw", "carbon_cost")


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
        self.steps += 1

    def rows(self) -> list[dict[str, float]]:
        sim, fleet, env = self.sim, self.sim.fleet, self.sim.day.env
        ended = (fleet.status == DEPARTED) | (fleet.status == TURNED_AWAY)
        unmet = np.bincount(env, np.where(ended, np.nan_to_num(fleet.unmet_kwh), 0.0), sim.n_env)
        drawn = np.bincount(env, np.maximum(fleet.e_grid_kwh, 0.0), sim.n_env)
        paid = np.bincount(env, fleet.cost, sim.n_env)
        multi = len(sim.layout.feeders) > 1
        n = max(self.steps, 1)
        return [dict(operator_cost=float(self.op_cost[e]),
                     ev_cost_per_kwh=float(paid[e] / drawn[e]) if drawn[e] > 0 else float("nan"),
                     peak_valley_kw=float(self.load_max[e] - self.load_min[e]),
                     voltage_violations=int(self.violations[e]),
                     violations_enforced=int(self.violations_enforced[e]), max_line_loading=float(self.max_loading[e]),
                     curtailed_kwh=float(self.curtailed[e]), unmet_kwh=float(unmet[e]),
                     slvtpr=float(self.slvtpr[e] / n) if multi else float("nan"),
                     spatial_std_kw=float(self.spatial_std[e] / n) if multi else float("nan"),
                     carbon_cost=float(self.carbon[e]))
                for e in range(sim.n_env)]


def run_rule_episode(cfg: EnvConfig, seed: int) -> dict[str, float]:
    """One episode with every level on its rule; the episode's metrics."""
    sim = Sim(cfg, 1)
    sim.reset(seed)
    m = EpisodeMetrics(sim)
    while sim.t < sim.n_steps:
        m.add(sim.step())
    return m.rows()[0]


def run_trained_episode(cfg: EnvConfig, checkpoint: str | os.PathLike[str], seed: int) -> dict[str, float]:
    """One episode of the config's learned levels acting greedily with a checkpoint's modules."""
    from evgrid.agents.rllib.policy import TrainedPolicy
    from evgrid.envs.ev_grid import EVGridEnv

    env = EVGridEnv(cfg)
    policy = TrainedPolicy(checkpoint, env)
    obs, _ = env.reset(seed=seed)
    m = EpisodeMetrics(env.sim)
    while env.agents:
        obs, *_ = env.step(policy.act(obs))
        m.add(env.last_rec)
    return m.rows()[0]


def evaluate_baselines(config: Any, policies: list[str], episodes: int, *, out_dir: str | os.PathLike[str] | None,
                       seed: int | None = None, overrides: Any = (), progress: bool = True,
                       checkpoint: str | os.PathLike[str] | None = None) -> list[dict]:
    """Run each baseline (and, with ``checkpoint``, the trained policies as ``trained``) for ``episodes``
    episodes on seeds ``seed``, ``seed + 1``, ...; write ``metrics.parquet`` and ``summary.md`` to ``out_dir``."""
    from tqdm import tqdm

    from evgrid.agents.baselines import rule_overrides

    if episodes < 1:
        raise ValueError(f"episodes: expected >= 1, got {episodes}")
    base = load_config(config, overrides)
    seed = base.seed if seed is None else seed
    rows: list[dict] = []
    runs = (["trained"] if checkpoint is not None else []) + list(policies)
    bar = tqdm(total=len(runs) * episodes, desc="evaluate", unit="episode", disable=not progress)
    if checkpoint is not None:
        for ep in range(episodes):
            rows.append({"policy": "trained", "episode": ep, **run_trained_episode(base, checkpoint, seed + ep)})
            bar.update(1)
    for policy in policies:
        cfg = load_config(base, rule_overrides(policy, routed=base.routing is not None))
        for ep in range(episodes):
            row = {"policy": policy, "episode": ep}
            row.update(run_rule_episode(cfg, seed + ep))
            rows.append(row)
            bar.update(1)
            bar.set_postfix(policy=policy)
    bar.close()
    if out_dir is not None:
        write_metrics(rows, out_dir)
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
