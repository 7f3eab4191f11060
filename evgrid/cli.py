"""Command line: ``evgrid demo | train | evaluate | sweep | bench | reproduce``.

The CLI is the one place that prints; the library logs.  Each command checks all its input (options, the
config and its ``key=value`` overrides, which may stand anywhere after the command) before any work starts:
bad input exits with status 2 and a message naming the option or field, without a traceback.  Ray's and
RLlib's own messages go to ``logs/ray.log`` in the run (or output) directory; ``-v`` shows them, INFO logs
and tracebacks on the terminal instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# a key=value override: a dotted key of identifiers, then "="
_OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*=")
_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?|-\.\d+")
# options whose own values are key=value items
_KEY_VALUE_OPTIONS = ("--grid",)


def split_overrides(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the other tokens, the ``key=value`` overrides): an override may stand anywhere after the command,
    except among the values of an option that takes ``key=value`` items itself (``--grid``) or after ``--``."""
    rest: list[str] = []
    overrides: list[str] = []
    in_key_values = False
    for k, tok in enumerate(tokens):
        if tok == "--":
            rest += tokens[k:]
            break
        if tok.startswith("-") and not _NUMBER.fullmatch(tok):
            in_key_values = tok.split("=", 1)[0] in _KEY_VALUE_OPTIONS
            rest.append(tok)
        elif _OVERRIDE.match(tok) and not in_key_values:
            overrides.append(tok)
        else:
            rest.append(tok)
    return rest, overrides


# ---------------------------------------------------------------------------------------------- argument types


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text!r}")
        return value

    return parse


def _positive_real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------- commands


def _check_demo(args: argparse.Namespace) -> None:
    from evgrid.agents.rllib.algos import check_run, load_run_config

    if args.what == "train":
        check_run(*load_run_config(args.config, args.overrides))
    elif args.overrides:
        from evgrid.config import ConfigError

        raise ConfigError(f"overrides: demo powerflow takes none, got {' '.join(args.overrides)}")


def _run_demo(args: argparse.Namespace) -> int:
    if args.what == "powerflow":
        return _demo_powerflow()
    return _demo_train(args)


def _demo_train(args: argparse.Namespace) -> int:
    """The main job: train the demo config's grouped EVs (the quickstart's day; imitation of the oracle, then
    PPO), then compare them with uncontrolled and TOU charging and the perfect-foresight oracle on the same
    seeds."""
    import pandas as pd

    from evgrid.cluster.runtime import ray_output_to, train
    from evgrid.evaluate import METRICS, evaluate_baselines

    out = train(args.config, args.overrides, ray_log=not args.verbose)
    with ray_output_to(None if args.verbose else out / "logs" / "ray.log"):  # loading the modules logs too
        rows = evaluate_baselines(args.config, ["uncontrolled", "tou", "oracle"], args.episodes,
                                  out_dir=out / "evaluation",
                                  overrides=[o for o in args.overrides if not o.startswith("train.")],
                                  checkpoint=out)
    table = pd.DataFrame(rows).groupby("policy", sort=False)[list(METRICS)].mean().reset_index()
    table.to_parquet(out / "comparison.parquet", index=False)
    cols = ["operator_cost", "ev_cost_per_kwh", "peak_valley_kw", "voltage_violations", "unmet_kwh", "owed_kwh"]
    print(f"\n{'policy':<14}" + "".join(f"{c:>20}" for c in cols))
    for r in table.itertuples():
        print(f"{r.policy:<14}" + "".join(f"{getattr(r, c):>20.2f}" for c in cols))
    print(f"\nmeans over {args.episodes} episodes on the same seeds; run directory: {out}")
    return 0


def _demo_powerflow() -> int:
    """IEEE 33 base case, our sweep next to pandapower, then a short benchmark."""
    from evgrid.bench import bench_powerflow
    from evgrid.grid.feeders import build_feeder
    from evgrid.grid.flow import PandapowerBackend, SweepBackend

    f = build_feeder("ieee33")
    p, q = f.base_p_kw[None], f.base_q_kvar[None]
    ours = SweepBackend(f).solve(p, q)
    ref = PandapowerBackend(f).solve(p, q)
    print("IEEE 33-bus (Baran-Wu) base case: fast sweep vs pandapower runpp")
    print(f"{'bus':>4}{'vm_pu sweep':>14}{'vm_pu pandapower':>18}{'|dV| pu':>10}")
    for j in range(f.n_bus):
        a, b = ours.vm_pu[0, j], ref.vm_pu[0, j]
        print(f"{int(f.bus_ids[j]):>4}{a:>14.6f}{b:>18.6f}{abs(a - b):>10.1e}")
    print(f"losses: sweep {ours.loss_kw[0]:.3f} kW, pandapower {ref.loss_kw[0]:.3f} kW "
          f"(load {p.sum():.1f} kW; lowest voltage {ours.vm_pu.min():.4f} p.u. at bus "
          f"{int(f.bus_ids[np.argmin(ours.vm_pu[0])])})")
    print()
    print("benchmark (evgrid bench powerflow --feeder ieee33 --batch 1 1024):")
    _print_table(bench_powerflow("ieee33", (1, 1024), pandapower_max=16, min_s=0.2))
    return 0


def _check_train(args: argparse.Namespace) -> None:
    from evgrid.cluster.runtime import plan_run

    plan_run(args.config, args.overrides, resume=args.resume, run_dir=args.run_dir, address=args.address)


def _run_train(args: argparse.Namespace) -> int:
    from evgrid.cluster.runtime import train

    out = train(args.config, args.overrides, address=args.address, resume=args.resume, run_dir=args.run_dir,
                ray_log=not args.verbose)
    print((out / "summary.md").read_text(encoding="utf-8"), end="")
    print(f"run directory: {out}")
    return 0


def _evaluate_out(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("runs") / f"evaluate-{Path(args.config).stem}"


def _check_evaluate(args: argparse.Namespace) -> None:
    from evgrid.evaluate import check_evaluation, output_dir

    check_evaluation(args.config, args.policy, args.episodes, seed=args.seed, overrides=args.overrides,
                     checkpoint=args.checkpoint)
    output_dir("--out", _evaluate_out(args))


def _run_evaluate(args: argparse.Namespace) -> int:
    from evgrid.cluster.runtime import ray_output_to
    from evgrid.evaluate import evaluate_baselines, summary_table

    out = _evaluate_out(args)
    quiet = args.checkpoint is not None and not args.verbose  # loading RLlib modules logs
    with ray_output_to(out / "logs" / "ray.log" if quiet else None):
        rows = evaluate_baselines(args.config, args.policy, args.episodes, out_dir=out, seed=args.seed,
                                  overrides=args.overrides, checkpoint=args.checkpoint)
    print(summary_table(rows), end="")
    print(f"metrics: {out / 'metrics.parquet'}  summary: {out / 'summary.md'}")
    return 0


def _check_sweep(args: argparse.Namespace) -> None:
    from evgrid.cluster.runtime import check_reachable
    from evgrid.cluster.sweeps import parse_grid, plan_sweep
    from evgrid.evaluate import output_dir

    plan_sweep(args.config, parse_grid(args.grid), seeds=args.seeds, overrides=args.overrides)
    if args.address is not None:
        check_reachable(args.address)
    args.out = output_dir("--out", args.out or Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")


def _run_sweep(args: argparse.Namespace) -> int:
    import pandas as pd

    from evgrid.cluster.sweeps import parse_grid, sweep

    out = sweep(args.config, parse_grid(args.grid), seeds=args.seeds, overrides=args.overrides, out_dir=args.out,
                address=args.address, ray_log=not args.verbose)
    table = pd.read_parquet(out / "sweep.parquet")
    last = table.sort_values("iteration").groupby("trial").tail(1)
    print(last.to_string(index=False))
    print(f"results: {out / 'sweep.parquet'}")
    return 0


def _check_bench(args: argparse.Namespace) -> None:
    from evgrid.config import ConfigError

    if args.overrides:
        raise ConfigError(f"overrides: bench takes options only, got {' '.join(args.overrides)}")
    if args.what == "train" and args.envs_per_runner < 1:
        raise ConfigError(f"--envs-per-runner: bench train expects an integer in [1, 1024], got {args.envs_per_runner}")


def _run_bench(args: argparse.Namespace) -> int:
    if args.what in ("actor", "train"):
        from evgrid.cluster.runtime import ray_output_to

        log_file = Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}" / "logs" / "ray.log"
        with ray_output_to(None if args.verbose else log_file):
            rows = _bench_ray(args)
        for r in rows:
            print(json.dumps(r), flush=True)
        return 0
    if args.what == "opf":
        from evgrid.bench import bench_opf

        for r in bench_opf(args.feeder, args.horizons, args.evs or (300, 3000), args.formulations, seed=args.seed,
                           ev_models=args.ev_models, ac_rounds=args.ac_rounds, methods=args.methods,
                           problems=args.problems, single_period=not args.no_single_period,
                           parallel_simplex=args.parallel_simplex):
            print(json.dumps(r) if args.json else
                  f"{r['problem']:<15}{r['feeder']:<10}{r['horizon']:>4} steps{r['n_ev']:>7} EVs {r['formulation']:<12}"
                  f"{r.get('ev_model', ''):<10}{r.get('method', ''):<7}"
                  f"{r['solver']:<9}{r['build_s']:>7.2f} s build{r['solve_s']:>8.2f} s solve  "
                  f"max|dV| vs AC {r['max_dv_pu_vs_ac']:.1e}"
                  + (f"  runopp x{r['speedup_vs_runopp']:.1f}" if "runopp_s" in r else ""), flush=True)
        return 0
    if args.what == "env":
        from evgrid.bench import bench_env

        for feeder in args.feeder:
            for r in bench_env(feeder, args.evs or (1000, 10000, 100000), steps=args.steps, seed=args.seed,
                               views=args.views):
                print(json.dumps(r) if args.json else
                      f"{r['view']:<11}{r['n_ev']:>8} EVs {r['plugged_at_end']:>7} plugged "
                      f"{r['ms_per_step']:>10.3f} ms/step {r['bytes_per_ev']:>9.1f} B/EV", flush=True)
        return 0
    from evgrid.bench import bench_powerflow

    for feeder in args.feeder:
        rows = bench_powerflow(feeder, args.batch, pandapower_max=args.pandapower_max,
                               external=not args.no_external, seed=args.seed, min_s=args.min_time)
        if args.json:
            for r in rows:
                print(json.dumps(r), flush=True)
        else:
            _print_table(rows)
    return 0


def _bench_ray(args: argparse.Namespace) -> list[dict]:
    from evgrid.bench import bench_actor, bench_actor_sampling, bench_train

    if args.what == "actor":
        rows = bench_actor(args.clients, args.scenarios_per_call, args.feeder[0], calls=args.calls, seed=args.seed)
        if args.envs_per_runner > 0:
            rows += bench_actor_sampling(args.envs_per_runner, seed=args.seed)
        return rows
    return bench_train(args.views_train, args.n_ev, env_runners=args.env_runners,
                       envs_per_runner=args.envs_per_runner, seed=args.seed, algorithm=args.algorithm)


def _print_table(rows: list[dict]) -> None:
    print(f"{'backend':<17}{'mode':<7}{'thr':>4}{'batch':>7}{'us/scn':>12}{'x pandapower':>14}{'max|dV| pu':>12}")
    for r in rows:
        dv = r["max_dv_pu_vs_pandapower"]
        print(f"{r['backend']:<17}{r['mode']:<7}{r['threads']:>4}{r['batch']:>7}{r['us_per_scenario']:>12.3f}"
              f"{r['speedup_vs_pandapower']:>14.1f}{dv if dv is None else format(dv, '.1e'):>12}")


def _check_reproduce(args: argparse.Namespace) -> None:
    from evgrid.studies.common import check_reproduce

    args.out, args.seeds = check_reproduce(args.study, out=args.out, seeds=args.seeds, address=args.address,
                                           resume=args.resume, quick=args.quick, ours=args.ours,
                                           overrides=args.overrides)


def _run_reproduce(args: argparse.Namespace) -> int:
    from evgrid.studies.common import read_table, reproduce

    with _log_file(args.out / "logs" / "reproduce.log"):
        out = reproduce(args.study, quick=args.quick, out=args.out, address=args.address, seeds=args.seeds,
                        ray_log=not args.verbose, resume=args.resume, ours=args.ours, overrides=args.overrides)
    print(read_table(out), end="")
    print(f"run directory: {out}  report: {out / 'report.md'}  results: {out / 'results.parquet'}")
    return 0


@contextlib.contextmanager
def _log_file(path: Path) -> Iterator[None]:
    """For the block, INFO logs also go to ``path``; the terminal keeps the level it had."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = root.level, [(h, h.level) for h in root.handlers]
    for h, _ in saved[1]:
        h.setLevel(max(h.level, root.level))
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(saved[0])
        for h, level in saved[1]:
            h.setLevel(level)


# ---------------------------------------------------------------------------------------------- parser


def _subparser(sub: Any, name: str, help_text: str, check: Callable, run: Callable) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    # also after the command; SUPPRESS keeps `evgrid -v train` from being reset by this default
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="INFO logs, Ray's own messages and tracebacks on the terminal")
    p.set_defaults(check=check, run=run)
    return p


def _add_bench(sub: Any) -> None:
    from evgrid.grid.feeders import FEEDERS

    b = _subparser(sub, "bench", "benchmarks with JSON output", _check_bench, _run_bench)
    b.add_argument("what", choices=["powerflow", "env", "actor", "train", "opf"], help="what to measure")
    b.add_argument("--feeder", nargs="+", default=["ieee33"], choices=FEEDERS, help="feeders")
    b.add_argument("--batch", nargs="+", type=_int_in(1, 1 << 20), default=[1, 64, 1024, 8192],
                   help="batch sizes (scenarios)")
    b.add_argument("--json", action="store_true", help="one JSON object per line")
    b.add_argument("--pandapower-max", type=_int_in(1, 1 << 20), default=64,
                   help="scenarios per batch that pandapower times and checks (runpp is ~10 ms each)")
    b.add_argument("--no-external", action="store_true", help="skip lightsim2grid and power-grid-model")
    b.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="scenario generator seed")
    b.add_argument("--min-time", type=_positive_real, default=0.3, help="seconds of timing per measurement")
    b.add_argument("--evs", nargs="+", type=_int_in(1, 10_000_000), default=None,
                   help="env: EV sessions per day (default 1000 10000 100000); opf: sessions (default 300 3000)")
    b.add_argument("--horizons", nargs="+", type=_int_in(2, 1440), default=[24, 96],
                   help="opf: steps of the day-ahead horizon")
    b.add_argument("--formulations", nargs="+", default=["lindistflow"], choices=["lindistflow", "socp"],
                   help="opf: network models")
    b.add_argument("--ev-models", nargs="+", default=["sessions"], choices=["sessions", "aggregate"],
                   help="opf: EVs one variable per session and step, or aggregated per bus and station")
    b.add_argument("--methods", nargs="+", default=["direct", "lazy"], choices=["direct", "lazy"],
                   help="opf: every row at once, or network rows added as a solution breaks them (LinDistFlow)")
    b.add_argument("--problems", nargs="+", default=["min_cost", "seed001_stage1"],
                   choices=["min_cost", "seed001_stage1"], help="opf: the multi-period problems")
    b.add_argument("--no-single-period", action="store_true", help="opf: skip the single period beside runopp")
    b.add_argument("--parallel-simplex", action="store_true",
                   help="opf: HiGHS's parallel dual simplex (faster on an idle machine, far slower on a busy one)")
    b.add_argument("--ac-rounds", type=_int_in(0, 10), default=0,
                   help="opf: AC correction rounds of the multi-period LinDistFlow solves")
    b.add_argument("--steps", type=_int_in(1, 10_000), default=24, help="env: timed steps (from 17:00)")
    b.add_argument("--views", nargs="+", default=["rule", "grouped"], choices=["rule", "grouped", "individual"],
                   help="env: simulator with rules, and/or the PettingZoo step with this EV view")
    b.add_argument("--clients", nargs="+", type=_int_in(1, 256), default=[1, 2, 4, 8],
                   help="actor: concurrent callers")
    b.add_argument("--scenarios-per-call", nargs="+", type=_int_in(1, 65536), default=[1, 8],
                   help="actor: scenarios per call")
    b.add_argument("--calls", type=_int_in(1, 1_000_000), default=300, help="actor: timed calls per caller")
    b.add_argument("--views-train", nargs="+", default=["grouped", "individual"], choices=["grouped", "individual"],
                   help="train: EV views to compare")
    b.add_argument("--n-ev", type=_int_in(1, 1_000_000), default=1000,
                   help="train: EVs per environment, all plugged in")
    b.add_argument("--envs-per-runner", type=_int_in(0, 1024), default=8,
                   help="train, actor: environments stepped together per runner (actor: 0 skips the sampling rows)")
    b.add_argument("--env-runners", type=_int_in(0, 4096), default=0,
                   help="train: RLlib env runners (0: sample in the driver)")
    b.add_argument("--algorithm", default="PPO", choices=["PPO", "PDQN", "MPDQN"],
                   help="train: PPO (every level learned) or PDQN / MPDQN (EVs learned, other levels on rules)")


def _add_training(sub: Any) -> None:
    d = _subparser(sub, "demo", "train the demo's EVs and compare with baselines (or: demo powerflow)",
                   _check_demo, _run_demo)
    d.add_argument("what", nargs="?", default="train", choices=["train", "powerflow"],
                   help="train (default): the main job; powerflow: IEEE 33 vs pandapower and a short benchmark")
    d.add_argument("--config", default="demo", help="experiment YAML or shipped name (default demo)")
    d.add_argument("--episodes", type=_int_in(1, 10_000), default=3, help="evaluation episodes per policy")

    t = _subparser(sub, "train", "train the learned levels with RLlib (Ray embedded, or --address a cluster)",
                   _check_train, _run_train)
    t.add_argument("config", nargs="?", default=None,
                   help="experiment YAML or shipped name (quickstart, seed000, ...) with an optional train: section")
    t.add_argument("--address", default=None, help="join a Ray cluster: auto or ray://host:10001 (default: embedded)")
    t.add_argument("--resume", default=None, help="run directory to continue from its last checkpoint")
    t.add_argument("--run-dir", default=None, help="new run directory (default runs/<name>-<time>)")

    w = _subparser(sub, "sweep", "Ray Tune sweep: grid x seeds, results in one sweep.parquet", _check_sweep, _run_sweep)
    w.add_argument("config", help="experiment YAML or shipped name")
    w.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="values to sweep (e.g. train.algorithm=PPO,IMPALA)")
    w.add_argument("--seeds", type=_int_in(1, 10_000), default=1, help="seeds per grid point")
    w.add_argument("--address", default=None, help="join a Ray cluster (default: embedded)")
    w.add_argument("--out", default=None, help="output directory (default runs/sweep-<time>)")


def _add_evaluate(sub: Any) -> None:
    from evgrid.agents.baselines import EVALUATE_POLICIES

    e = _subparser(sub, "evaluate", "run baselines, the oracle (and trained policies) on a config; writes "
                   "metrics.parquet and summary.md", _check_evaluate, _run_evaluate)
    e.add_argument("config", help="experiment YAML or shipped name, e.g. quickstart")
    e.add_argument("--policy", nargs="+", default=["uncontrolled", "tou"], choices=EVALUATE_POLICIES,
                   help="rule baselines, or oracle: the perfect-foresight optimal schedule replayed in the simulator")
    e.add_argument("--episodes", type=_int_in(1, 1_000_000), default=3, help="episodes per policy")
    e.add_argument("--seed", type=_int_in(0, 2**62), default=None, help="seed of episode 0 (default: the config's)")
    e.add_argument("--out", default=None, help="output directory (default runs/evaluate-<config>)")
    e.add_argument("--checkpoint", default=None, help="also run trained policies: a checkpoint or a run directory")


def _add_reproduce(sub: Any) -> None:
    from evgrid.studies.common import STUDIES

    r = _subparser(sub, "reproduce", "run one paper's study end to end: results.parquet, report.md (paper beside "
                   "ours) and figures in a run directory; key=value overrides run a variant of its config "
                   "(seed002)", _check_reproduce, _run_reproduce)
    r.add_argument("study", choices=list(STUDIES), help="the study (SEEDS.md)")
    r.add_argument("--quick", action="store_true", help="the same pipeline on a small budget (CI)")
    r.add_argument("--out", default=None, help="run directory (default runs/reproduce-<study>-<time>)")
    r.add_argument("--address", default=None, help="join a Ray cluster for training: auto or ray://host:10001 "
                   "(default: embedded)")
    r.add_argument("--seeds", nargs="+", type=_int_in(0, 2**32 - 1), default=None,
                   help="seeds to run (default: the study's; one with --quick)")
    r.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (same study and "
                   "budget), keeping what it finished (seed001: its trained agents)")
    r.add_argument("--ours", action="store_true", help="also run the study's methods of ours beside the paper's "
                   "(seed001: PPO_ours, A2C_ours, DQN_ours; about twice the training time)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="evgrid", description=__doc__.splitlines()[0],
                                 epilog="key=value overrides of the config (e.g. fleet.n_ev=500 train.iterations=5) "
                                        "may follow the command anywhere.")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="INFO logs, Ray's own messages and tracebacks on the terminal")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_training(sub)
    _add_evaluate(sub)
    _add_bench(sub)
    _add_reproduce(sub)
    return ap


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line as a namespace whose ``overrides`` holds its ``key=value`` tokens; argparse exits 2
    with a usage message on anything else it cannot read."""
    argv = list(argv)
    parser = build_parser()
    if "" in argv:  # (argparse would report it as an unrecognized argument that reads as nothing)
        parser.error("an empty argument ('') is neither an option, a value nor a key=value override")
    at = next((k for k, a in enumerate(argv) if not a.startswith("-")), len(argv))
    rest, overrides = split_overrides(argv[at + 1:])
    args = parser.parse_args(argv[:at + 1] + rest)
    args.overrides = overrides
    return args


# commands whose driver runs RLlib (its learner, or the env runner when sampling in the driver)
_TRAINING = ("train", "sweep", "demo", "reproduce")


def _pin_training_process() -> None:
    """Re-run a training command with the settings that make it reproducible, unless it has them.

    RLlib orders agents by iterating sets of their ids, so a run is reproducible from ``train.seed`` only when
    every process, the driver included, hashes strings the same way; and the numeric libraries must take the
    same code paths on every CPU (:mod:`evgrid.cluster.environment`; Ray's workers get both through their
    ``runtime_env``).  Python reads PYTHONHASHSEED, and the libraries their settings, only at start-up, hence
    the exec, done before anything heavy is imported.
    """
    from evgrid.cluster.environment import missing

    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    unset = missing(os.environ) if command in _TRAINING else {}
    if unset:
        os.environ.update(unset)
        os.execv(sys.executable, [sys.executable, "-m", "evgrid.cli", *sys.argv[1:]])


class _Terminal(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each message (it moves while Ray's output goes to a log file)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # a program run, not a call from Python: the process is ours to replace
        _pin_training_process()
        argv = sys.argv[1:]
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse printed the usage and what it could not read
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[_Terminal()],
                        format="%(levelname)s %(name)s: %(message)s")
    from evgrid.config import ConfigError

    try:
        args.check(args)  # all input, before any work starts
        return args.run(args)
    except (ConfigError, ConnectionError) as e:
        # the user's input or cluster, not a bug: the message names the field; -v shows the traceback
        if args.verbose:
            raise
        print(f"evgrid {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"evgrid {args.command}: interrupted (finished iterations, checkpoints and episodes are kept)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
