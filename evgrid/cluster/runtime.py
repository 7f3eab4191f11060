"""Ray connection and the training run: embedded by default, or an existing cluster.

``connect()`` with no address starts Ray inside this process, bound to
127.0.0.1 with no dashboard; ``connect("auto")`` or ``connect("ray://host:10001")``
joins a running cluster and ships the ``evgrid`` package to its workers via
``runtime_env.py_modules``.  Every worker runs one thread
(``OMP_NUM_THREADS=1``): on small machines more threads stall RLlib.

``train()`` connects, starts the shared power-flow actors for ``train.powerflow: actor``, and drives an
:class:`evgrid.agents.rllib.experiment.Experiment`, which writes the run directory (``config.yaml``,
``checkpoints/``, ``metrics.parquet``, ``learning_curves.png``, ``summary.md``); Ray's and RLlib's own
messages go to ``<run_dir>/logs/ray.log`` (:func:`ray_output_to`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evgrid.agents.rllib.algos import TrainConfig, check_run, load_run_config
from evgrid.agents.rllib.experiment import Experiment, ExperimentCallback, IterationSummary
from evgrid.config import ConfigError
from evgrid.cluster.environment import missing, worker_env
from evgrid.envs.config import EnvConfig

log = logging.getLogger(__name__)



@contextlib.contextmanager
def connect(address: str | None = None, *, num_cpus: int | None = None, pinned: bool = False) -> Iterator[None]:
    """Ray for the duration of the block; shuts down only what it started.  ``pinned``: the workers run with
    :data:`evgrid.cluster.environment.REPRODUCIBLE_ENV` (training runs)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address is None:
        loopback_only()
        # address="local": a new embedded instance, never a cluster that /tmp/ray/ray_current_cluster names
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": worker_env(pinned)}, log_to_driver=False)
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
        ray.init(address=address, runtime_env={"env_vars": worker_env(pinned), "py_modules": [pkg]},
                 log_to_driver=False,
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


@contextlib.contextmanager
def ray_output_to(log_file: str | os.PathLike[str] | None) -> Iterator[None]:
    """For the block, Ray's and RLlib's own messages go to ``log_file`` (appended), not the terminal: the
    ``ray`` loggers (RLlib's and Tune's included), Python warnings, and what Ray's C++ core writes straight
    to this process's stderr (file descriptor 2, which no Python setting reaches; the Ray processes started
    meanwhile inherit it).  ``sys.stderr`` keeps the terminal, so progress bars and this package's own log
    messages still show.  None: everything stays where it is."""
    if log_file is None:
        yield
        return
    import ray  # noqa: F401  (ray, and RLlib imported with this module, install the terminal handlers replaced here)

    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # "ray" and every "ray.*" logger with handlers of its own (ray.rllib does not propagate), Python warnings
    loggers = [logging.getLogger("ray"), logging.getLogger("py.warnings")] + [
        lg for name, lg in logging.root.manager.loggerDict.items()
        if name.startswith("ray.") and isinstance(lg, logging.Logger) and lg.handlers]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    logging.captureWarnings(True)
    try:
        with _stderr_fd_to(path):
            yield
    finally:
        logging.captureWarnings(False)
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


@contextlib.contextmanager
def _stderr_fd_to(path: Path) -> Iterator[None]:
    """File descriptor 2 appends to ``path``; ``sys.stderr``, when it writes to descriptor 2, moves to a copy
    of the terminal's descriptor."""
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    try:
        writes_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced (a notebook, pytest's capture): not descriptor 2
        writes_fd2 = False
    stderr = sys.stderr
    if writes_fd2:
        sys.stderr = os.fdopen(os.dup(terminal_fd), "w", buffering=1, encoding=stderr.encoding,
                               errors="backslashreplace")
    with open(path, "ab") as fh:
        os.dup2(fh.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal_fd, 2)
        os.close(terminal_fd)
        if writes_fd2:
            sys.stderr.close()
            sys.stderr = stderr


def powerflow_factory(train: TrainConfig) -> Callable[..., Any] | None:
    """What each env runner calls for its environments' power-flow service (``Experiment(grid_factory=...)``):
    None, in-process, for ``train.powerflow: local``; for ``actor``, a client of the job's shared actors
    (:func:`start_powerflow_actors`), in-process where they are missing."""
    if train.powerflow != "actor":
        return None
    from evgrid.cluster import powerflow

    return powerflow.ActorGridFactory(powerflow.DEFAULT_NAME, powerflow.DEFAULT_NAMESPACE)


def start_powerflow_actors(env: EnvConfig, train: TrainConfig) -> list:
    """The shared power-flow actors of a ``powerflow: actor`` run (none otherwise), started or found before
    any env runner so each finds them by name.  Hold the handles for the whole run: Ray collects a named,
    non-detached actor once no handle to it is left."""
    if train.powerflow != "actor":
        return []
    from evgrid.cluster.powerflow import get_or_create_actor

    return get_or_create_actor(env, num_actors=train.num_powerflow_actors)


@dataclass(frozen=True)
class RunPlan:
    """A training run that passed every check :func:`plan_run` makes."""

    env: EnvConfig
    train: TrainConfig
    run_dir: Path
    resume: bool
    """True: continue ``run_dir`` from its last checkpoint (from iteration 0 when it has none)."""


def plan_run(config: Any = None, overrides: Iterable[str] = (), *, resume: str | os.PathLike[str] | None = None,
             run_dir: str | os.PathLike[str] | None = None, address: str | None = None) -> RunPlan:
    """Check everything a training run needs before anything starts: the config and its overrides, the
    levels against the algorithm, the run directory (a new one, or one to resume) and the cluster address.
    Creates nothing; a ConfigError (ConnectionError for an address where no cluster answers) names the field."""
    if resume is not None:
        out = Path(resume)
        if config is not None or run_dir is not None:
            raise ConfigError("resume: a resumed run keeps its own directory and config.yaml; give overrides only, "
                              "not a config or a run directory")
        if not (out / "config.yaml").is_file():
            raise ConfigError(f"resume: expected a run directory (holding config.yaml), got {os.fspath(out)!r}")
        env_cfg, train_cfg = load_run_config(out / "config.yaml", overrides)
    else:
        if config is None:
            raise ConfigError("config: give an experiment YAML (e.g. quickstart) or a run directory to resume")
        env_cfg, train_cfg = load_run_config(config, overrides)
        out = Path(run_dir) if run_dir is not None else \
            Path("runs") / f"{env_cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        _check_new_dir("run_dir", out)
    check_run(env_cfg, train_cfg)
    if address is not None:
        check_reachable(address)
    return RunPlan(env_cfg, train_cfg, out, resume is not None)


def _check_new_dir(name: str, path: Path) -> None:
    if path.exists():
        raise ConfigError(f"{name}: {os.fspath(path)!r} exists; expected a new directory (continue a run with "
                          f"resume)")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: cannot create {os.fspath(path)!r} ({os.fspath(parent)!r} is not a writable "
                          f"directory)")


def train(config: Any = None, overrides: Iterable[str] = (), *, address: str | None = None,
          resume: str | os.PathLike[str] | None = None, run_dir: str | os.PathLike[str] | None = None,
          progress: bool = True, ray_log: bool = True) -> Path:
    """Train the config's learned levels, or continue ``resume``'s run from its last checkpoint (overrides such
    as ``train.iterations=N`` apply to it); returns the run directory.  ``progress``: a progress bar on
    stderr; ``ray_log``: Ray's and RLlib's own messages go to ``<run_dir>/logs/ray.log``, not the terminal."""
    plan = plan_run(config, overrides, resume=resume, run_dir=run_dir, address=address)
    unset = missing(os.environ)
    if unset:
        log.warning("%s not set in this process: two runs with train.seed=%d may differ (RLlib orders agents by "
                    "string hash; numeric libraries pick code paths by CPU); the evgrid CLI sets them",
                    ", ".join(sorted(unset)), plan.train.seed)
    plan.run_dir.mkdir(parents=True, exist_ok=plan.resume)
    exp = Experiment(plan.env, plan.train, plan.run_dir, grid_factory=powerflow_factory(plan.train),
                     callbacks=[ProgressBar(plan.train.iterations)] if progress else [], progress=progress)
    with ray_output_to(plan.run_dir / "logs" / "ray.log" if ray_log else None), connect(address, pinned=True):
        shards = start_powerflow_actors(plan.env, plan.train)
        with exp:
            if plan.resume and any((plan.run_dir / "checkpoints").glob("iter_*")):
                exp.restore(plan.run_dir)
            exp.run()
            if shards:
                _save_powerflow_stats(shards, plan.run_dir)
    return plan.run_dir


class ProgressBar(ExperimentCallback):
    """A progress bar (stderr) over a run's iterations, with each module's last mean return."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    def on_setup(self, experiment: Experiment) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc="train", unit="it")

    def on_iteration(self, experiment: Experiment, summary: IterationSummary) -> None:
        self.bar.update(summary.iteration - self.bar.n)  # (a restored run starts past 0)
        self.bar.set_postfix({m: f"{r:.1f}" for m, r in summary.returns.items()})

    def on_close(self, experiment: Experiment) -> None:
        self.bar.close()


def _save_powerflow_stats(shards: list, out: Path) -> None:
    """The shared actors' counters (requests, batched solves, requests per node) as powerflow_stats.json."""
    import json

    import ray

    stats = ray.get([h.stats.remote() for h in shards])
    (out / "powerflow_stats.json").write_text(json.dumps(stats, indent=1, default=str), encoding="utf-8")
