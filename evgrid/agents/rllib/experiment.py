"""The one training loop: an :class:`Experiment` builds the RLlib algorithm of an (EnvConfig, TrainConfig), steps
it, checkpoints, restores and evaluates it, and tells its callbacks (BenchMARL's ``Experiment``).  ``evgrid
train``, every ``evgrid sweep`` trial and the training benchmarks drive it::

    with Experiment(env_cfg, train_cfg, run_dir="runs/mine") as exp:
        exp.run()                       # train.iterations iterations, a checkpoint every train.checkpoint_every
        rows = exp.evaluate(episodes=3)  # greedy episodes with the modules as they are now

With a run directory the experiment writes there (:class:`RunRecorder`)::

    config.yaml                  the resolved config (env sections + train:)
    checkpoints/iter_000005/     algorithm checkpoints
    metrics.parquet              one row per iteration and module (IterationSummary.rows)
    learning_curves.png          mean episode return per module
    summary.md                   the last iteration's returns and agent steps
    imitation.json               with train.imitation_days: the oracle days cloned, the loss per epoch, times

Ray must be running (``evgrid.cluster.runtime.connect``) before :meth:`Experiment.setup`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evgrid.agents.rllib.algos import (HYBRID_ALGORITHMS, TrainConfig, algo_config, check_run,
                                      iteration_timings, prepare_algorithm)
from evgrid.agents.rllib.env import ENV_NAME, register_env
from evgrid.agents.rllib.policy import checkpoint_dir
from evgrid.config import to_dict
from evgrid.envs.config import EnvConfig

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"iter_(\d+)")


@dataclass(frozen=True, slots=True)
class IterationSummary:
    """One training iteration; NaN where RLlib did not report a number."""

    iteration: int
    """Iterations done, counting those before a restore."""
    wall_s: float
    """Seconds this iteration took in the driver."""
    elapsed_s: float
    """Seconds since the experiment was created."""
    env_steps: float
    """Environment steps sampled over the algorithm's lifetime."""
    episodes: float
    """Episodes finished over the algorithm's lifetime."""
    ev_decisions: float
    """Per-EV actions sampled this iteration (one per plugged EV agent or occupied slot)."""
    env_step_s: float
    """Seconds inside the environments' step this iteration (simulator, power flow, observations)."""
    sample_s: float
    """Seconds of sampling this iteration."""
    learn_s: float
    """Seconds of learner updates this iteration."""
    returns: dict[str, float]
    """Mean episode return per module (``operator``, ``station``, ``ev``)."""
    agent_steps: dict[str, float]
    """Agent steps sampled per module."""

    @classmethod
    def from_result(cls, result: dict, *, iteration: int, wall_s: float, elapsed_s: float) -> IterationSummary:
        """The summary of an RLlib ``Algorithm.train()`` result."""
        er = result.get("env_runners", {})
        sample_s, learn_s = iteration_timings(result)
        return cls(iteration=iteration, wall_s=wall_s, elapsed_s=elapsed_s,
                   env_steps=float(er.get("num_env_steps_sampled_lifetime", math.nan)),
                   episodes=float(er.get("num_episodes_lifetime", math.nan)),
                   ev_decisions=float(er.get("ev_decisions", math.nan)),
                   env_step_s=float(er.get("env_step_s", math.nan)),
                   sample_s=sample_s, learn_s=learn_s,
                   returns={m: float(v) for m, v in (er.get("module_episode_returns_mean") or {}).items()},
                   agent_steps={m: float(v) for m, v in (er.get("num_module_steps_sampled") or {}).items()})

    @property
    def modules(self) -> list[str]:
        return sorted(self.returns.keys() | self.agent_steps.keys())

    def scalars(self) -> dict[str, float]:
        """The numbers shared by every module, by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("returns", "agent_steps")}

    def flat(self) -> dict[str, float]:
        """One flat mapping: the scalars, ``return_<module>`` and ``agent_steps_<module>`` (a sweep's columns)."""
        return {**self.scalars(), **{f"return_{m}": v for m, v in self.returns.items()},
                **{f"agent_steps_{m}": v for m, v in self.agent_steps.items()}}

    def rows(self) -> list[dict[str, Any]]:
        """One row per module: the scalars, ``return_mean`` and ``agent_steps`` (``metrics.parquet``)."""
        base = self.scalars()
        iteration = base.pop("iteration")
        return [{"iteration": iteration, "module": m, **base, "return_mean": self.returns.get(m, math.nan),
                 "agent_steps": self.agent_steps.get(m, math.nan)} for m in self.modules]


class ExperimentCallback:
    """Hooks into an :class:`Experiment`; each does nothing unless overridden."""

    def on_setup(self, experiment: Experiment) -> None:
        """The algorithm is built (before any restore)."""

    def on_iteration(self, experiment: Experiment, summary: IterationSummary) -> None:
        """An iteration is done."""

    def on_checkpoint(self, experiment: Experiment, path: Path) -> None:
        """A checkpoint was written to ``path``."""

    def on_close(self, experiment: Experiment) -> None:
        """The experiment is closing (also after an error): the algorithm is still there."""


class RunRecorder(ExperimentCallback):
    """Keeps a run directory's ``metrics.parquet`` current after every iteration and writes
    ``learning_curves.png`` and ``summary.md`` at the end.  A resumed run keeps the rows of the iterations
    before the one it continues from."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = []
        self._trimmed = False

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.parquet"

    def on_setup(self, experiment: Experiment) -> None:
        import pandas as pd

        if self.metrics_path.is_file():
            self.rows = pd.read_parquet(self.metrics_path).to_dict("records")

    def on_iteration(self, experiment: Experiment, summary: IterationSummary) -> None:
        import pandas as pd

        if not self._trimmed:  # rows past a restored checkpoint belong to a run that was not kept
            self.rows = [r for r in self.rows if r["iteration"] < summary.iteration]
            self._trimmed = True
        self.rows += summary.rows()
        pd.DataFrame(self.rows).to_parquet(self.metrics_path, index=False)

    def on_close(self, experiment: Experiment) -> None:
        if self.rows:
            write_report(self.run_dir, self.rows)


def write_report(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``learning_curves.png`` (mean episode return per module) and ``summary.md`` from metrics rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    for mid, g in df.groupby("module"):
        ax.plot(g.iteration, g.return_mean, label=mid)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean episode return")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "learning_curves.png", dpi=100)
    plt.close(fig)
    last = df[df.iteration == df.iteration.max()]
    lines = [f"# {run_dir.name}", "", f"iterations: {int(df.iteration.max())}", "",
             "| module | return (last iteration) | agent steps |", "|---|---|---|"]
    lines += [f"| {r.module} | {r.return_mean:.3f} | {r.agent_steps:.0f} |" for r in last.itertuples()]
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


class Experiment:
    """Training of ``env``'s learned levels per ``train``.

    Args:
        env, train: what to train and how; a combination that cannot work is a ConfigError here, before Ray.
        run_dir: where config, checkpoints, metrics and report go (:class:`RunRecorder`); None: nowhere
            (:meth:`checkpoint` then needs a path).
        grid_factory: a picklable callable each env runner calls with the config's ``GridConfig`` for the
            power-flow service of its environments (e.g. ``evgrid.cluster.powerflow.ActorGridFactory``);
            None: in-process.
        callbacks: :class:`ExperimentCallback` objects, told in order.
        operator_policy: a picklable :class:`evgrid.envs.ev_grid.OperatorPolicy` acting for the operators
            (``agents.operator: learned``) in training and :meth:`evaluate`; they are then not trained.
        progress: progress bars on stderr for the work before the first iteration (``train.imitation_days``).

    With ``train.imitation_days``, :meth:`setup` first clones the oracle into the EV module
    (:mod:`evgrid.agents.rllib.imitation`), unless the experiment continues from a checkpoint (:meth:`restore`).
    """

    def __init__(self, env: EnvConfig, train: TrainConfig, run_dir: str | os.PathLike[str] | None = None, *,
                 grid_factory: Callable[..., Any] | None = None,
                 callbacks: Iterable[ExperimentCallback] = (), operator_policy: Any = None,
                 progress: bool = False) -> None:
        check_run(env, train, operator_policy is not None)
        self.operator_policy = operator_policy
        self.env_config = env
        self.train_config = train
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.grid_factory = grid_factory
        self.callbacks = list(callbacks) + ([RunRecorder(self.run_dir)] if self.run_dir is not None else [])
        self.algo: Any = None
        self.iteration = 0
        self._t0 = time.perf_counter()
        self._eval_modules: Any = None
        self.progress = progress
        self._warm = train.imitation_days == 0  # False: the EV module still has to imitate the oracle

    def setup(self) -> Experiment:
        """Register the env and build the algorithm (once); with a run directory, write its ``config.yaml``."""
        if self.algo is not None:
            return self
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = {**to_dict(self.env_config), "train": to_dict(self.train_config)}
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        register_env(ENV_NAME)
        self.algo = prepare_algorithm(algo_config(self.env_config, self.train_config, ENV_NAME,
                                                  self.grid_factory, self.operator_policy).build_algo())
        if not self._warm:
            self._imitate()
        for cb in self.callbacks:
            cb.on_setup(self)
        return self

    def step(self) -> IterationSummary:
        """One training iteration."""
        self.setup()
        t0 = time.perf_counter()
        result = self.algo.train()
        self.iteration += 1
        now = time.perf_counter()
        summary = IterationSummary.from_result(result, iteration=self.iteration, wall_s=now - t0,
                                               elapsed_s=now - self._t0)
        for cb in self.callbacks:
            cb.on_iteration(self, summary)
        return summary

    def run(self, iterations: int | None = None) -> list[IterationSummary]:
        """Step until ``iterations`` (default ``train.iterations``) are done in all, counting those before a
        restore; with a run directory, checkpoint every ``train.checkpoint_every`` iterations and at the end."""
        total = self.train_config.iterations if iterations is None else iterations
        done = []
        while self.iteration < total:
            done.append(self.step())
            if self.run_dir is not None and (self.iteration % self.train_config.checkpoint_every == 0
                                             or self.iteration == total):
                self.checkpoint()
        return done

    def checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Save the algorithm to ``path`` (default ``<run_dir>/checkpoints/iter_<iteration>``); returns it."""
        if path is None:
            if self.run_dir is None:
                raise ValueError("path: this experiment has no run directory; give a checkpoint path")
            path = self.run_dir / "checkpoints" / f"iter_{self.iteration:06d}"
        path = Path(path)
        self.setup().algo.save_to_path(str(path.resolve()))
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path

    def restore(self, path: str | os.PathLike[str]) -> int:
        """Load a checkpoint (or a run directory's last one); returns the iteration it continues from (from
        the ``iter_<n>`` name; 0 for other names)."""
        ckpt = checkpoint_dir(path)
        fresh = self.algo is None
        self._warm = True  # the checkpoint's modules replace whatever a warm start would give
        self.setup().algo.restore_from_path(str(ckpt.resolve()))
        if fresh and self.train_config.imitation_days:
            self._imitate(fit=False)
        found = _CHECKPOINT.fullmatch(ckpt.name)
        self.iteration = int(found[1]) if found else 0
        log.info("restored %s at iteration %d", ckpt, self.iteration)
        return self.iteration

    def _imitate(self, fit: bool = True) -> None:
        """Clone the oracle into the learner's EV module (``fit``) and send it to the env runners; a P-DQN
        learner is also given the demonstrations for its demonstration loss (after a restore too, ``fit``
        False: the checkpoint holds the modules, not the demonstrations)."""
        import json

        from evgrid.agents.rllib.imitation import decisions, imitate, oracle_demonstrations

        train = self.train_config
        hybrid = train.algorithm in HYBRID_ALGORITHMS
        if not fit and not (hybrid and train.imitation_weight > 0):
            return
        seeds = range(train.imitation_seed, train.imitation_seed + train.imitation_days)
        demos = oracle_demonstrations(self.env_config, seeds, train.gamma, self.progress, self.operator_policy)
        module = self.modules()["ev"]
        if fit:
            report = imitate(module, demos, train, self.progress)
            if hybrid:
                module.make_target_networks()  # TD targets start from the pre-trained networks too
            # the other modules' weights stay as they are (a multi-module state may name some modules only)
            self.algo.learner_group.set_weights({"ev": {k: v.detach().numpy() for k, v in module.state_dict().items()}})
            self.algo.env_runner_group.sync_weights(from_worker_or_learner_group=self.algo.learner_group,
                                                    inference_only=True)
            if self.run_dir is not None:
                (self.run_dir / "imitation.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        if hybrid and train.imitation_weight > 0:
            items, mode, unit, _ = decisions(module, demos)
            kwargs = dict(weight=train.imitation_weight, margin=train.imitation_margin, seed=train.seed)
            self.algo.learner_group.foreach_learner(
                lambda learner: learner.set_demonstrations("ev", items, mode, unit, **kwargs))
        self._warm = True

    def modules(self) -> Any:
        """The learners' modules as they are now, copied into a ``MultiRLModule`` in this process."""
        self.setup()
        if self._eval_modules is None:
            spec = self.algo.config.rl_module_spec
            spaces = {mid: (s.observation_space, s.action_space) for mid, s in spec.rl_module_specs.items()}
            self._eval_modules = self.algo.config.get_multi_rl_module_spec(spaces=spaces).build()
        self._eval_modules.set_state(self.algo.learner_group.get_weights())
        return self._eval_modules

    def evaluate(self, episodes: int = 1, *, seed: int | None = None,
                 log_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
        """``episodes`` greedy episodes of the current modules on seeds ``seed``, ``seed + 1``, ... (default: the
        config's seed): one row of :data:`evgrid.evaluate.METRICS` each, ``policy`` ``trained``; with
        ``log_dir``, the episodes' step and session logs there."""
        from evgrid.agents.rllib.policy import TrainedPolicy
        from evgrid.evaluate import episode_seeds, policy_episodes

        seeds = episode_seeds(episodes, self.env_config.seed if seed is None else seed)
        modules = self.modules()
        rows = policy_episodes(self.env_config, lambda env: TrainedPolicy(modules, env), seeds, log_dir,
                               operator_policy=self.operator_policy)
        return [{"policy": "trained", "episode": e, **row} for e, row in enumerate(rows)]

    def close(self) -> None:
        """Tell the callbacks, then stop the algorithm and its workers."""
        if self.algo is None:
            return
        try:
            for cb in self.callbacks:
                cb.on_close(self)
        finally:
            self.algo.stop()
            self.algo = None

    def __enter__(self) -> Experiment:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.close()
