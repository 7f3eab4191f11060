"""Ray Tune sweeps: every combination of ``--grid key=v1,v2`` values x ``--seeds`` seeds, one trial each.

Each trial drives an :class:`evgrid.agents.rllib.experiment.Experiment` of the config (with its overrides and
``train.seed``) for ``train.iterations`` iterations and reports each :class:`IterationSummary`.  All trials' iterations
land in one Parquet table, ``sweep.parquet``: one row per trial and iteration, with a column per grid key.
Algorithm benchmarks sweep ``train.algorithm``; scale studies sweep ``fleet.n_ev`` or ``train.num_env_runners``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from evgrid.agents.rllib.algos import check_run, load_run_config
from evgrid.agents.rllib.experiment import Experiment, ExperimentCallback, IterationSummary
from evgrid.cluster.runtime import connect, powerflow_factory, ray_output_to
from evgrid.config import ConfigError
from evgrid.evaluate import output_dir

log = logging.getLogger(__name__)


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["train.lr=1e-4,3e-4", "fleet.n_ev=300,1000"]`` -> ``{"train.lr": [1e-4, 3e-4], ...}`` (YAML scalars)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        try:
            values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        except yaml.YAMLError:
            values = []
        if not sep or not key or not values:
            raise ConfigError(f"grid {item!r}: expected key=v1,v2,... (YAML scalars), e.g. train.algorithm=PPO,IMPALA")
        grid[key] = values
    return grid


class _TuneReport(ExperimentCallback):
    """Each iteration's numbers to Ray Tune (one row of ``sweep.parquet``)."""

    def on_iteration(self, experiment: Experiment, summary: IterationSummary) -> None:
        from ray import tune

        tune.report(summary.flat())


def _trial(trial: dict[str, Any]) -> None:
    env_cfg, train_cfg = trial["env"], trial["train"]
    with Experiment(env_cfg, train_cfg, grid_factory=powerflow_factory(train_cfg), callbacks=[_TuneReport()]) as exp:
        exp.run()


def plan_sweep(config: str | os.PathLike[str], grid: dict[str, list[Any]], *, seeds: int = 1,
               overrides: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The trials of a sweep (grid point x seed) as ``{"env", "train", "point", "seed"}``, each checked to make
    a run that can work before anything starts."""
    if not isinstance(seeds, int) or not 1 <= seeds <= 10_000:
        raise ConfigError(f"seeds: expected an integer in [1, 10000], got {seeds!r}")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] or [{}]
    trials = []
    for p in points:
        for s in range(seeds):
            env_cfg, train_cfg = load_run_config(config, [*overrides, *(f"{k}={v}" for k, v in p.items()),
                                                          f"train.seed={s}"])
            check_run(env_cfg, train_cfg)
            trials.append({"env": env_cfg, "train": train_cfg, "point": p, "seed": s})
    return trials


def sweep(config: str | os.PathLike[str], grid: dict[str, list[Any]], *, seeds: int = 1,
          overrides: Iterable[str] = (), out_dir: str | os.PathLike[str] | None = None,
          address: str | None = None, max_concurrent: int = 0, ray_log: bool = True) -> Path:
    """Run the sweep; returns the directory holding ``sweep.parquet`` (Ray's and RLlib's own messages in its
    ``logs/ray.log`` with ``ray_log``)."""
    import pandas as pd
    from ray import tune

    trials = plan_sweep(config, grid, seeds=seeds, overrides=overrides)
    out = output_dir("out_dir", out_dir if out_dir is not None else
                     Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    cpus = 1 + max(t["train"].num_env_runners for t in trials)
    with ray_output_to(out / "logs" / "ray.log" if ray_log else None), connect(address, pinned=True):
        # the trial index selects its settings: grid values stay plain columns, not nested search spaces
        tuner = tune.Tuner(
            tune.with_resources(lambda p: _trial(trials[p["trial"]]), {"cpu": cpus}),
            param_space={"trial": tune.grid_search(list(range(len(trials))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or None),
            run_config=tune.RunConfig(name="sweep", storage_path=str((out / "tune").resolve()), verbose=0))
        results = tuner.fit()
    frames = [_trial_frame(r, trials) for r in results]
    frames = [f for f in frames if f is not None]
    failed = sum(r.error is not None for r in results)
    if not frames:
        raise RuntimeError(f"sweep: no trial reported a result ({failed} failed); see {out / 'tune'}")
    pd.concat(frames, ignore_index=True).to_parquet(out / "sweep.parquet", index=False)
    if failed:
        log.warning("sweep: %d of %d trials failed; their rows are missing from sweep.parquet", failed, len(trials))
    return out


def _trial_frame(result: Any, trials: list[dict[str, Any]]) -> Any:
    """A trial's reported rows with its trial index, seed and grid values as columns (None if it reported none)."""
    if result.error is not None:
        log.error("sweep trial %s failed: %s", result.config, result.error)
    df = result.metrics_dataframe
    if df is None or df.empty:
        return None
    t = trials[result.config["trial"]]
    keep = [c for c in df.columns if c in _COLUMNS or c.startswith(("return_", "agent_steps_"))]
    df = df[keep].copy()
    df.insert(0, "trial", result.config["trial"])
    df.insert(1, "seed", t["seed"])
    for k, v in t["point"].items():
        df.insert(2, k, v)
    return df


# IterationSummary's scalars: the columns of sweep.parquet besides returns and agent steps per module
_COLUMNS = tuple(f.name for f in dataclasses.fields(IterationSummary) if f.name not in ("returns", "agent_steps"))
