"""Ray connection and the training run: embedded by default, or an existing cluster.

``connect()`` with no address starts Ray inside this process, bound to
127.0.0.1 with no dashboard; ``connect("auto")`` or ``connect("ray://host:10001")``
joins a running cluster and ships the ``evgrid`` package to its workers via
``runtime_env.py_modules``.  Every worker runs one thread
(``OMP_NUM_THREADS=1``): on small machines more threads stall RLlib.

``train()`` writes a run directory::

    <run_dir>/config.yaml        the resolved config (env sections + train:)
    <run_dir>/checkpoints/iter_000005/ ...
    <run_dir>/metrics.parquet    one row per iteration and module (elapsed_s: seconds since train() began)
    <run_dir>/learning_curves.png
    <run_dir>/summary.md
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from evgrid.config import ConfigError, from_dict, merge, parse_overrides, read_yaml, to_dict
from evgrid.envs.config import EnvConfig

log = logging.getLogger(__name__)

# PYTHONHASHSEED: RLlib 2.60's MultiAgentEpisode walks *sets* of agent ids, so which agent gets which row of a
# module's batch (and of its sampled actions) follows each process's string-hash seed; fixed, a seed reproduces
# a run (the CLI fixes the driver's own: evgrid.cli)
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", "PYTHONHASHSEED": "0"}


@contextlib.contextmanager
def connect(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Ray for the duration of the block; shuts down only what it started."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address is None:
        loopback_only()
        # address="local": a new embedded instance, never a cluster that /tmp/ray/ray_current_cluster names
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
    else:
        import evgrid

        check_reachable(address)
        pkg = str(Path(evgrid.__file__).parent)
        kwargs: dict[str, Any] = {}
        host = address.split("://")[-1].rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost"):
            # a cluster of nodes on this machine bound to loopback (the multi-node test): the driver must
            # announce 127.0.0.1 too, or Ray 2.60 swaps in the interface address and finds no local node
            keep_loopback_addresses()
            kwargs["_node_ip_address"] = "127.0.0.1"
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV, "py_modules": [pkg]}, log_to_driver=False,
                 **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at ``host:port`` (or ``ray://host:port``): ``ray.init`` would wait
    minutes for the GCS before giving up.  ``auto`` is left to Ray, which fails at once without a cluster."""
    import socket

    if address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address: expected auto, host:port or ray://host:port, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(f"address: no Ray cluster answers at {target} ({e.strerror or e}); start one "
                              f"(`ray start --head`, experiments/cluster/) or leave --address out to run "
                              f"embedded") from None


def loopback_only() -> None:
    """Keep an embedded Ray on 127.0.0.1.

    Ray 2.60 rewrites a loopback ``_node_ip_address`` to the machine's interface address unless
    "clusters" are disabled, which is what ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` does on Linux too:
    node, GCS and workers then bind to 127.0.0.1.  The variable reaches the processes Ray starts; the
    constant is also set in this process, where ray may already have been imported.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def keep_loopback_addresses() -> None:
    """Let an explicit 127.0.0.1 stand (Ray 2.60 rewrites it to the interface address) while multi-node
    clusters stay enabled: for ``ray start --node-ip-address=127.0.0.1`` nodes on one machine."""
    from ray._private import services

    services.resolve_ip_for_localhost = lambda host: host


def load_run_config(source: Any, overrides: Iterable[str] | dict = ()) -> tuple[EnvConfig, Any]:
    """(EnvConfig, TrainConfig) from an experiment YAML whose optional ``train:`` section holds the training
    settings; ``train.iterations=5`` style overrides go to that section."""
    from evgrid.agents.rllib.algos import TrainConfig

    data = dict(read_yaml(source)) if isinstance(source, str | os.PathLike) else dict(source or {})
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    data = merge(data, extra)
    train = from_dict(TrainConfig, data.pop("train", None), "train.")
    env = from_dict(EnvConfig, data)
    return env, train


def _register_env() -> None:
    from ray.tune.registry import register_env

    from evgrid.agents.rllib.env import RLlibEVGrid

    register_env("evgrid", lambda c: RLlibEVGrid(c))


def _latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    ckpts = sorted((run_dir / "checkpoints").glob("iter_*"))
    if not ckpts:
        return None
    return ckpts[-1], int(ckpts[-1].name.split("_")[1])


def train(config: Any = None, overrides: Iterable[str] = (), *, address: str | None = None,
          resume: str | os.PathLike[str] | None = None, run_dir: str | os.PathLike[str] | None = None,
          progress: bool = True) -> Path:
    """Train the config's learned levels; returns the run directory."""
    t_start = time.perf_counter()
    import pandas as pd
    from tqdm import tqdm

    from evgrid.agents.rllib.algos import algo_config, check_run, summary_of

    if resume is not None:
        out = Path(resume)
        if not (out / "config.yaml").is_file():
            raise ConfigError(f"resume: {os.fspath(out)!r} is not a run directory (no config.yaml)")
        env_cfg, train_cfg = load_run_config(out / "config.yaml", overrides)
    else:
        if config is None:
            raise ConfigError("config: give an experiment YAML (e.g. experiments/quickstart.yaml)")
        env_cfg, train_cfg = load_run_config(config, overrides)
        out = Path(run_dir) if run_dir is not None else Path("runs") / f"{env_cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_run(env_cfg, train_cfg)  # a bad combination fails here, before Ray or any worker starts
    if os.environ.get("PYTHONHASHSEED", "random") == "random":
        log.warning("PYTHONHASHSEED is not set in this process: two runs with train.seed=%d will differ (RLlib "
                    "orders agents by string hash); the evgrid CLI sets it", train_cfg.seed)
    if address is not None:
        check_reachable(address)  # (connect checks too) before a run directory exists for a run that cannot start
    if resume is None:
        out.mkdir(parents=True, exist_ok=False)
    (out / "config.yaml").write_text(yaml.safe_dump({**to_dict(env_cfg), "train": to_dict(train_cfg)},
                                                    sort_keys=False), encoding="utf-8")
    metrics_path = out / "metrics.parquet"
    rows: list[dict] = []
    start = 0
    with connect(address):
        _register_env()
        shards: list = []
        if train_cfg.powerflow == "actor":
            from evgrid.cluster.powerflow import get_or_create_actor

            # before the env runners start, so each finds the shards by name; the handles are held for the
            # whole run: Ray collects a named, non-detached actor once no handle to it is left
            shards = get_or_create_actor(env_cfg, num_actors=train_cfg.num_powerflow_actors)
        algo = algo_config(env_cfg, train_cfg).build_algo()
        try:
            found = _latest_checkpoint(out) if resume is not None else None
            if found is not None:
                algo.restore_from_path(str(found[0].resolve()))
                start = found[1]
                if metrics_path.is_file():
                    old = pd.read_parquet(metrics_path)
                    rows = old[old.iteration <= start].to_dict("records")
                log.info("resumed %s at iteration %d", out, start)
            bar = tqdm(total=train_cfg.iterations, initial=start, desc="train", unit="it", disable=not progress)
            for it in range(start + 1, train_cfg.iterations + 1):
                t0 = time.perf_counter()
                result = algo.train()
                s = summary_of(result)
                base = {k: v for k, v in s.items() if not k.startswith(("return_", "agent_steps_"))}
                modules = sorted({k.split("_", 1)[1] for k in s if k.startswith("return_")} |
                                 {k.split("_", 2)[2] for k in s if k.startswith("agent_steps_")})
                for mid in modules:
                    rows.append({"iteration": it, "module": mid, "wall_s": time.perf_counter() - t0,
                                 "elapsed_s": time.perf_counter() - t_start, **base,
                                 "return_mean": s.get(f"return_{mid}", float("nan")),
                                 "agent_steps": s.get(f"agent_steps_{mid}", float("nan"))})
                pd.DataFrame(rows).to_parquet(metrics_path, index=False)
                bar.update(1)
                bar.set_postfix({m: f"{s[f'return_{m}']:.1f}" for m in modules if f"return_{m}" in s})
                if it % train_cfg.checkpoint_every == 0 or it == train_cfg.iterations:
                    algo.save_to_path(str((out / "checkpoints" / f"iter_{it:06d}").resolve()))
            bar.close()
            if shards:
                _save_powerflow_stats(shards, out)
        finally:
            algo.stop()
    _report(out, rows)
    return out


def _save_powerflow_stats(shards: list, out: Path) -> None:
    """The shared actors' counters (requests, batched solves, requests per node) as powerflow_stats.json."""
    import json

    import ray

    stats = ray.get([h.stats.remote() for h in shards])
    (out / "powerflow_stats.json").write_text(json.dumps(stats, indent=1, default=str), encoding="utf-8")


def _report(out: Path, rows: list[dict]) -> None:
    """learning_curves.png (return per level) and summary.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    if not rows:
        return
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    for mid, g in df.groupby("module"):
        ax.plot(g.iteration, g.return_mean, label=mid)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean episode return")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    plt.close(fig)
    last = df[df.iteration == df.iteration.max()]
    lines = [f"# {out.name}", "", f"iterations: {int(df.iteration.max())}", "",
             "| module | return (last iteration) | agent steps |", "|---|---|---|"]
    lines += [f"| {r.module} | {r.return_mean:.3f} | {r.agent_steps:.0f} |" for r in last.itertuples()]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
