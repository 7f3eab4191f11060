"""Command line: ``evgrid demo | train | evaluate | bench``.

The CLI is the one place that prints; the library logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np


def _bench(args: argparse.Namespace) -> int:
    from evgrid.bench import bench_powerflow

    if args.what in ("actor", "train"):
        from evgrid.bench import bench_actor, bench_actor_sampling, bench_train

        if args.what == "actor":
            rows = bench_actor(args.clients, args.scenarios_per_call, args.feeder[0], calls=args.calls, seed=args.seed)
            if args.envs_per_runner > 0:
                rows += bench_actor_sampling(args.envs_per_runner, seed=args.seed)
        else:
            rows = bench_train(args.views_train, args.n_ev, env_runners=args.env_runners,
                                   envs_per_runner=args.envs_per_runner, seed=args.seed)
        for r in rows:
            print(json.dumps(r), flush=True)
        return 0
    if args.what == "env":
        from evgrid.bench import bench_env

        for feeder in args.feeder:
            rows = bench_env(feeder, args.evs, steps=args.steps, seed=args.seed, views=args.views)
            for r in rows:
                print(json.dumps(r) if args.json else
                      f"{r['view']:<11}{r['n_ev']:>8} EVs {r['plugged_at_end']:>7} plugged "
                      f"{r['ms_per_step']:>10.3f} ms/step {r['bytes_per_ev']:>9.1f} B/EV", flush=True)
        return 0
    for feeder in args.feeder:
        rows = bench_powerflow(feeder, args.batch, pandapower_max=args.pandapower_max,
                               external=not args.no_external, seed=args.seed, min_s=args.min_time)
        if args.json:
            for r in rows:
                print(json.dumps(r), flush=True)
        else:
            _print_table(rows)
    return 0


def _print_table(rows: list[dict]) -> None:
    print(f"{'backend':<17}{'mode':<7}{'thr':>4}{'batch':>7}{'us/scn':>12}{'x pandapower':>14}{'max|dV| pu':>12}")
    for r in rows:
        dv = r["max_dv_pu_vs_pandapower"]
        print(f"{r['backend']:<17}{r['mode']:<7}{r['threads']:>4}{r['batch']:>7}{r['us_per_scenario']:>12.3f}"
              f"{r['speedup_vs_pandapower']:>14.1f}{dv if dv is None else format(dv, '.1e'):>12}")


def _demo(args: argparse.Namespace) -> int:
    if args.what == "powerflow":
        return _demo_powerflow(args)
    return _demo_train(args)


def _demo_train(args: argparse.Namespace) -> int:
    """The main job: train the quickstart's operators, stations and grouped EVs, then compare them with
    uncontrolled and TOU charging on the same seeds."""
    import pandas as pd

    from evgrid.cluster.runtime import connect, train
    from evgrid.evaluate import METRICS, evaluate_baselines

    with connect():
        out = train(args.config, args.overrides)
        rows = evaluate_baselines(args.config, ["uncontrolled", "tou"], args.episodes, out_dir=out / "evaluation",
                                  overrides=[o for o in args.overrides if not o.startswith("train.")],
                                  checkpoint=out)
    table = pd.DataFrame(rows).groupby("policy", sort=False)[list(METRICS)].mean().reset_index()
    table.to_parquet(out / "comparison.parquet", index=False)
    cols = ["operator_cost", "ev_cost_per_kwh", "peak_valley_kw", "voltage_violations", "unmet_kwh"]
    print(f"\n{'policy':<14}" + "".join(f"{c:>20}" for c in cols))
    for r in table.itertuples():
        print(f"{r.policy:<14}" + "".join(f"{getattr(r, c):>20.2f}" for c in cols))
    print(f"\nmeans over {args.episodes} episodes on the same seeds; run directory: {out}")
    return 0


def _demo_powerflow(args: argparse.Namespace) -> int:
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


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evgrid.evaluate import evaluate_baselines, summary_table

    out = Path(args.out) if args.out else Path("runs") / f"evaluate-{Path(args.config).stem}"
    if args.checkpoint is not None:
        from evgrid.cluster.runtime import connect

        with connect():  # restoring RLlib modules needs Ray
            rows = evaluate_baselines(args.config, args.policy, args.episodes, out_dir=out, seed=args.seed,
                                      overrides=args.overrides, checkpoint=args.checkpoint)
    else:
        rows = evaluate_baselines(args.config, args.policy, args.episodes, out_dir=out, seed=args.seed,
                                  overrides=args.overrides)
    print(summary_table(rows), end="")
    print(f"metrics: {out / 'metrics.parquet'}  summary: {out / 'summary.md'}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import pandas as pd

    from evgrid.cluster.sweeps import parse_grid, sweep

    out = sweep(args.config, parse_grid(args.grid), seeds=args.seeds, overrides=args.overrides, out_dir=args.out,
                address=args.address)
    table = pd.read_parquet(out / "sweep.parquet")
    last = table.sort_values("iteration").groupby("trial").tail(1)
    print(last.to_string(index=False))
    print(f"results: {out / 'sweep.parquet'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from evgrid.cluster.runtime import train

    if args.config is not None and "=" in args.config:  # `evgrid train key=value --resume RUN`: no config path
        args.overrides.insert(0, args.config)
        args.config = None
    if args.config is None and args.resume is None:
        raise SystemExit("evgrid train: give a config (experiments/quickstart.yaml) or --resume RUN_DIR")
    out = train(args.config, args.overrides, address=args.address, resume=args.resume, run_dir=args.run_dir)
    print((out / "summary.md").read_text(encoding="utf-8"), end="")
    print(f"run directory: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="evgrid", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train the quickstart and compare with baselines (or: demo powerflow)")
    d.add_argument("what", nargs="?", default="train", choices=["train", "powerflow"],
                   help="train (default): the main job; powerflow: IEEE 33 vs pandapower and a short benchmark")
    d.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart, e.g. train.iterations=5")
    d.add_argument("--config", default="experiments/quickstart.yaml")
    d.add_argument("--episodes", type=int, default=3, help="evaluation episodes per policy")
    d.set_defaults(fn=_demo)

    b = sub.add_parser("bench", help="benchmarks with JSON output")
    b.add_argument("what", choices=["powerflow", "env", "actor", "train"], help="what to measure")
    b.add_argument("--feeder", nargs="+", default=["ieee33"], help="feeders: ieee33, feeder14, cigre_mv")
    b.add_argument("--batch", nargs="+", type=int, default=[1, 64, 1024, 8192], help="batch sizes (scenarios)")
    b.add_argument("--json", action="store_true", help="one JSON object per line")
    b.add_argument("--pandapower-max", type=int, default=64,
                   help="scenarios per batch that pandapower times and checks (runpp is ~20 ms each)")
    b.add_argument("--no-external", action="store_true", help="skip lightsim2grid and power-grid-model")
    b.add_argument("--seed", type=int, default=0, help="scenario generator seed")
    b.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per measurement")
    b.add_argument("--evs", nargs="+", type=int, default=[1000, 10000, 100000], help="env: EV sessions per day")
    b.add_argument("--steps", type=int, default=24, help="env: timed steps (from 17:00)")
    b.add_argument("--views", nargs="+", default=["rule", "grouped"], choices=["rule", "grouped", "individual"],
                   help="env: simulator with rules, and/or the PettingZoo step with this EV view")
    b.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8], help="actor: concurrent callers")
    b.add_argument("--scenarios-per-call", nargs="+", type=int, default=[1, 8], help="actor: scenarios per call")
    b.add_argument("--calls", type=int, default=300, help="actor: timed calls per caller")
    b.add_argument("--views-train", nargs="+", default=["grouped", "individual"], choices=["grouped", "individual"],
                   help="train: EV views to compare")
    b.add_argument("--n-ev", type=int, default=1000, help="train: EVs per environment, all plugged in")
    b.add_argument("--envs-per-runner", type=int, default=8,
                   help="train, actor: environments stepped together per runner (actor: 0 skips the sampling rows)")
    b.add_argument("--env-runners", type=int, default=0, help="train: RLlib env runners (0: sample in the driver)")
    b.set_defaults(fn=_bench)

    t = sub.add_parser("train", help="train the learned levels with RLlib (Ray embedded, or --address a cluster)")
    t.add_argument("config", nargs="?", default=None, help="experiment YAML with an optional train: section")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iterations=50 fleet.n_ev=500")
    t.add_argument("--address", default=None, help="join a Ray cluster: auto or ray://host:10001 (default: embedded)")
    t.add_argument("--resume", default=None, help="run directory to continue from its last checkpoint")
    t.add_argument("--run-dir", default=None, help="new run directory (default runs/<name>-<time>)")
    t.set_defaults(fn=_train)

    w = sub.add_parser("sweep", help="Ray Tune sweep: grid x seeds, results in one sweep.parquet")
    w.add_argument("config", help="experiment YAML")
    w.add_argument("overrides", nargs="*", help="key=value overrides for every trial")
    w.add_argument("--grid", nargs="+", default=[], help="key=v1,v2 ... (e.g. train.algorithm=PPO,IMPALA)")
    w.add_argument("--seeds", type=int, default=1, help="seeds per grid point")
    w.add_argument("--address", default=None, help="join a Ray cluster (default: embedded)")
    w.add_argument("--out", default=None, help="output directory (default runs/sweep-<time>)")
    w.set_defaults(fn=_sweep)

    from evgrid.agents.baselines import POLICIES

    e = sub.add_parser("evaluate", help="run baselines on a config; writes metrics.parquet and summary.md")
    e.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    e.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. fleet.n_ev=500")
    e.add_argument("--policy", nargs="+", default=["uncontrolled", "tou"], choices=POLICIES)
    e.add_argument("--episodes", type=int, default=3)
    e.add_argument("--seed", type=int, default=None, help="seed of episode 0 (default: the config's)")
    e.add_argument("--out", default=None, help="output directory (default runs/evaluate-<config>)")
    e.add_argument("--checkpoint", default=None, help="also run trained policies: a checkpoint or a run directory")
    e.set_defaults(fn=_evaluate)
    return ap


# commands whose driver runs RLlib (its learner, or the env runner when sampling in the driver)
_TRAINING = ("train", "sweep", "demo")


def _fix_hash_seed() -> None:
    """Re-run a training command with a fixed string-hash seed unless it has one.

    RLlib orders agents by iterating sets of their ids, so a run is reproducible from ``train.seed`` only when
    every process, the driver included, hashes strings the same way (Ray's workers get the seed from
    ``runtime.WORKER_ENV``).  Python reads PYTHONHASHSEED only at start-up, hence the exec, done before
    anything heavy is imported.
    """
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command in _TRAINING and os.environ.get("PYTHONHASHSEED", "random") == "random":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "evgrid.cli", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a program run, not a call from Python: the process is ours to replace
        _fix_hash_seed()
    from evgrid.config import ConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (ConfigError, ConnectionError) as e:
        # the user's input or cluster, not a bug: the message names the field; -v shows the traceback
        if args.verbose:
            raise
        print(f"evgrid {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
