"""Ray Tune sweeps: every combination of ``--grid key=v1,v2`` values x ``--seeds`` seeds, one trial each.

Each trial trains the config (with its overrides and ``train.seed``) for ``train.iterations`` iterations and
reports the per-iteration numbers of :func:`evgrid.agents.rllib.algos.summary_of`.  All trials' iterations
land in one Parquet table, ``sweep.parquet``: one row per trial and iteration, with a column per grid key.
Algorithm benchmarks sweep ``train.algorithm``; scale studies sweep ``fleet.n_ev`` or ``train.num_env_runners``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from evgrid.config import ConfigError

log = logging.getLogger(__name__)


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["train.lr=1e-4,3e-4", "fleet.n_ev=300,1000"]`` -> ``{"train.lr": [1e-4, 3e-4], ...}`` (YAML scalars)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        if not sep or not key or not values:
            raise ConfigError(f"grid {item!r}: expected key=v1,v2,... e.g. train.algorithm=PPO,IMPALA")
        grid[key] = values
    return grid


def _trial(params: dict[str, Any]) -> None:
    from ray import tune

    from evgrid.agents.rllib.algos import algo_config, summary_of
    from evgrid.cluster.runtime import _register_env, load_run_config

    overrides = list(params["overrides"]) + [f"{k}={v}" for k, v in params["point"].items()]
    overrides.append(f"train.seed={params['seed']}")
    env_cfg, train_cfg = load_run_config(params["config"], overrides)
    _register_env()
    algo = algo_config(env_cfg, train_cfg).build_algo()
    try:
        for it in range(1, train_cfg.iterations + 1):
            t0 = time.perf_counter()
            s = summary_of(algo.train())
            tune.report({"iteration": it, "wall_s": time.perf_counter() - t0, **s})
    finally:
        algo.stop()


def sweep(config: str | os.PathLike[str], grid: dict[str, list[Any]], *, seeds: int = 1,
          overrides: Iterable[str] = (), out_dir: str | os.PathLike[str] | None = None,
          address: str | None = None, max_concurrent: int = 0) -> Path:
    """Run the sweep; returns the directory holding ``sweep.parquet``."""
    import pandas as pd
    from ray import tune

    from evgrid.cluster.runtime import connect, load_run_config

    if seeds < 1:
        raise ConfigError(f"seeds: expected >= 1, got {seeds}")
    base = list(overrides)
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] or [{}]
    # every point must make a valid config before anything starts
    for p in points:
        load_run_config(config, base + [f"{k}={v}" for k, v in p.items()])
    _, train_cfg = load_run_config(config, base)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    trials = [{"config": str(Path(config).resolve()), "overrides": base, "point": p, "seed": s}
              for p in points for s in range(seeds)]
    cpus = 1 + train_cfg.num_env_runners
    with connect(address):
        # the trial index selects its settings: grid values stay plain columns, not nested search spaces
        tuner = tune.Tuner(
            tune.with_resources(lambda p: _trial(trials[p["trial"]]), {"cpu": cpus}),
            param_space={"trial": tune.grid_search(list(range(len(trials))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or None),
            run_config=tune.RunConfig(name="sweep", storage_path=str((out / "tune").resolve()), verbose=0))
        results = tuner.fit()
    frames = []
    for r in results:
        if r.error is not None:
            log.error("sweep trial %s failed: %s", r.config, r.error)
        df = r.metrics_dataframe
        if df is None or df.empty:
            continue
        t = trials[r.config["trial"]]
        keep = [c for c in df.columns if c in ("iteration", "wall_s") or c.startswith(
            ("env_steps", "episodes", "ev_decisions", "env_step_s", "sample_s", "learn_s", "return_", "agent_steps_"))]
        df = df[keep].copy()
        df.insert(0, "trial", r.config["trial"])
        df.insert(1, "seed", t["seed"])
        for k, v in t["point"].items():
            df.insert(2, k, v)
        frames.append(df)
    failed = sum(r.error is not None for r in results)
    if not frames:
        raise RuntimeError(f"sweep: no trial reported a result ({failed} failed); see {out / 'tune'}")
    pd.concat(frames, ignore_index=True).to_parquet(out / "sweep.parquet", index=False)
    if failed:
        log.warning("sweep: %d of %d trials failed; their rows are missing from sweep.parquet", failed, len(trials))
    return out
