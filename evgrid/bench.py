"""Benchmarks behind ``evgrid bench``: JSON rows, ratios measured in one run.

``powerflow``: our sweep (cold and warm-started, one thread and all threads),
pandapower ``runpp``, lightsim2grid (its C++ batch class, and ``GridModel.ac_pf``
scenario by scenario) and power-grid-model (one batch call), on the same random
load scenarios (uniform 0..2 x nominal per bus, seeded).  Warm starts solve a
"next step": every load moved by up to +-3 % from the scenario whose solution
seeds the solver, as consecutive environment steps do.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable

import numpy as np

from evgrid.grid.feeders import build_feeder
from evgrid.grid.flow import PandapowerBackend, SweepBackend
from evgrid.validate import check_choice

log = logging.getLogger(__name__)


def _best_us(fn: Callable[[], object], n_scenarios: int, min_s: float = 0.3, repeats: int = 5) -> float:
    """Best-of-``repeats`` microseconds per scenario; each repeat runs ``fn`` for >= min_s / repeats."""
    fn()  # compile / warm caches
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(min_s / repeats / one))
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best / n_scenarios * 1e6


def scenarios(feeder, batch: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(p, q) loads uniform in [0, 2] x nominal per bus, and a +-3 % "next step" (p2, q2)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.0, 2.0, (batch, feeder.n_bus))
    s2 = s * rng.uniform(0.97, 1.03, s.shape)
    return feeder.base_p_kw * s, feeder.base_q_kvar * s, feeder.base_p_kw * s2, feeder.base_q_kvar * s2


def bench_powerflow(
    feeder_name: str = "ieee33",
    batches: Iterable[int] = (1, 64, 1024, 8192),
    *,
    pandapower_max: int = 64,
    external: bool = True,
    seed: int = 0,
    min_s: float = 0.3,
) -> list[dict]:
    """One row per backend x mode x batch.

    pandapower is timed and used as the accuracy reference on the first
    ``pandapower_max`` scenarios of each batch (runpp costs ~20 ms each);
    ``timed_scenarios`` says how many a row's time covers.
    """
    feeder = build_feeder(feeder_name)
    ref = PandapowerBackend(feeder)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    runners = _external_runners(feeder) if external else []
    rows: list[dict] = []
    for batch in batches:
        if batch < 1:
            raise ValueError(f"batch: expected sizes >= 1, got {batch}")
        p, q, p2, q2 = scenarios(feeder, batch, seed)
        k = min(batch, pandapower_max)
        ref_res = ref.solve(p2[:k], q2[:k])
        ref_vm = ref_res.vm_pu
        pp_us = _best_us(lambda: ref.solve(p2[:k], q2[:k]), k, min_s=min_s, repeats=1)

        def row(backend, mode, us, vm, n_threads=1, timed=batch, **extra):
            dv = float(np.nanmax(np.abs(vm[:k] - ref_vm))) if vm is not None else None
            rows.append(dict(backend=backend, feeder=feeder_name, batch=batch, mode=mode, threads=n_threads,
                             timed_scenarios=timed, us_per_scenario=round(us, 4), max_dv_pu_vs_pandapower=dv,
                             speedup_vs_pandapower=round(pp_us / us, 1), **extra))

        row("pandapower", "runpp", pp_us, ref_vm, timed=k)
        for n_threads in sorted({1, threads}):
            sw = SweepBackend(feeder, threads=n_threads)
            first = sw.solve(p, q)
            cold = sw.solve(p2, q2)
            warm = sw.solve(p2, q2, init=first)
            row("sweep", "cold", _best_us(lambda: sw.solve(p2, q2), batch, min_s), cold.vm_pu, n_threads,
                iterations_mean=float(cold.iterations.mean()), converged=int(cold.converged.sum()))
            row("sweep", "warm", _best_us(lambda: sw.solve(p2, q2, init=first), batch, min_s), warm.vm_pu,
                n_threads, iterations_mean=float(warm.iterations.mean()), converged=int(warm.converged.sum()))
        for mode, r in runners:
            r.prepare(p2, q2)
            vm = r.run()
            row(r.name, mode, _best_us(r.run, batch, min_s), vm)
        log.info("bench powerflow: batch %d done", batch)
    return rows


def _external_runners(feeder) -> list[tuple[str, object]]:
    """(mode, runner) of the field's fast solvers that are installed (a warning names those that are not)."""
    from evgrid.grid.flow.external import LightSimRunner, PgmRunner, available

    runners = []
    # lightsim2grid twice: its C++ batch class, and GridModel.ac_pf per scenario
    for cls, mode, kwargs in ((LightSimRunner, "batch", {}), (LightSimRunner, "ac_pf", {"mode": "loop"}),
                              (PgmRunner, "batch", {})):
        why = available().get(cls.name)
        if why is None:
            runners.append((mode, cls(feeder, **kwargs)))
        else:
            log.warning("bench: %s unavailable (%s); not measured", cls.name, why)
    return runners


# ---------------------------------------------------------------------------
# env


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def bench_env(feeder_name: str = "ieee33", evs: Iterable[int] = (1000, 10000, 100000), *, n_station: int = 6,
              steps: int = 24, seed: int = 0, views: Iterable[str] = ("rule", "grouped")) -> list[dict]:
    """ms per step of one day's busiest ``steps`` steps (evening, most EVs plugged in), per fleet size.

    ``rule``: the simulator with every level on its rule (``Sim.step``: rules, dispatch, power flow,
    limits, settlement).  ``grouped`` / ``individual``: the PettingZoo ``step`` with learned operators
    and stations and that EV view, fed fixed valid actions (decoding, observations and rewards
    included).  ``bytes_per_ev``: resident memory growth from before building the environment to
    after the timed steps, per EV session.
    """
    from evgrid.envs.config import load_config
    from evgrid.envs.sim import Sim

    # build and step a small one first: imports, feeder caches and compiled kernels are not per-EV memory
    warm = Sim(load_config({"grid": {"feeder": feeder_name}, "fleet": {"n_ev": 10}, "n_steps": 2}), 1)
    warm.reset(seed)
    warm.step()
    rows = []
    for n_ev in evs:
        # ports for everyone a station may see at once: no EV is turned away in the benchmark
        ports = int(np.ceil(n_ev / n_station * 1.5)) + 10
        base = {"seed": seed, "grid": {"feeder": feeder_name}, "fleet": {"n_ev": n_ev},
                "stations": {"n_station": n_station, "ports": ports}}
        for view in views:
            if view == "rule":
                cfg = load_config(base, {"agents": {"operator": "rule", "station": "rule", "ev_view": "rule"}})
            else:
                cfg = load_config(base, {"agents": {"ev_view": view}})
            rss0 = _rss_bytes()
            dt, plugged = (_time_rule_steps if view == "rule" else _time_env_steps)(cfg, steps, seed)
            rss1 = _rss_bytes()
            rows.append(dict(bench="env", feeder=feeder_name, view=view, n_ev=n_ev, plugged_at_end=plugged,
                             steps=steps, ms_per_step=round(dt / steps * 1e3, 3),
                             us_per_plugged_ev=round(dt / steps * 1e6 / max(plugged, 1), 4),
                             bytes_per_ev=round((rss1 - rss0) / n_ev, 1)))
            log.info("bench env: %s %d EVs done", view, n_ev)
    return rows


def _evening_start(cfg) -> int:
    """The step at 17:00, when home sessions pile up."""
    return int(17 * 60 / cfg.dt_min)


def _time_rule_steps(cfg, steps: int, seed: int) -> tuple[float, int]:
    """Seconds of ``steps`` simulator steps with every level on its rule from 17:00, and EVs plugged after."""
    from evgrid.envs.sim import Sim

    sim = Sim(cfg, 1)
    sim.reset(seed)
    for _ in range(_evening_start(cfg)):
        sim.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        sim.step()
    return time.perf_counter() - t0, int(sim.plugged().size)


def _time_env_steps(cfg, steps: int, seed: int) -> tuple[float, int]:
    """Seconds inside ``steps`` PettingZoo steps from 17:00 (fixed valid actions, not timed), and EVs plugged
    after."""
    from evgrid.envs.ev_grid import EVGridEnv

    env = EVGridEnv(cfg)
    obs, _ = env.reset(seed=seed)
    acts = _fixed_actions(env)
    for _ in range(_evening_start(cfg)):
        obs, *_ = env.step(acts(obs))
    total = 0.0
    for _ in range(steps):
        a = acts(obs)  # the policy's time is not the env's
        t0 = time.perf_counter()
        obs, *_ = env.step(a)
        total += time.perf_counter() - t0
    return total, int(env.sim.plugged().size)


def _fixed_actions(env) -> Callable[[dict], dict]:
    """Valid actions for every live agent: neutral prices, stations at full allowance, EVs charging."""
    from evgrid.agents.baselines import BaselinePolicy

    policy = BaselinePolicy("uncontrolled", env)
    return policy.act


# ---------------------------------------------------------------------------
# shared power-flow actor


def _actor_inputs(feeder, batch: int, n_steps: int, rng: np.random.Generator) -> np.ndarray:
    """(n_steps, 5, batch, n_bus): p_kw, q_kvar, flex_charge_kw, flex_v2g_kw, flex_gen_kw (no DER: 0) of
    consecutive env-like steps, in the order ``GridService`` requests take them.

    Base load 0.4..1.0 x nominal, EV charging 0..400 kW at six load buses (the enforcer curtails now and then),
    loads drifting by up to +-3 % a step as consecutive steps do (so warm starts matter as in an env).
    """
    n_bus = feeder.n_bus
    ev_bus = np.argsort(-feeder.base_p_kw, kind="stable")[:6]
    level = rng.uniform(0.4, 1.0, (batch, n_bus))
    ev = np.zeros((batch, n_bus))
    ev[:, ev_bus] = rng.uniform(0.0, 400.0, (batch, ev_bus.size))
    out = np.zeros((n_steps, 5, batch, n_bus))
    for t in range(n_steps):
        level = np.clip(level * rng.uniform(0.97, 1.03, level.shape), 0.0, 1.2)
        ev = np.clip(ev * rng.uniform(0.97, 1.03, ev.shape), 0.0, 400.0)
        out[t, 0] = feeder.base_p_kw * level + ev
        out[t, 1] = feeder.base_q_kvar * level
        out[t, 2] = ev
    return out


def _check_transport(bench: str, stats: dict | None, transport: str | None) -> None:
    """A row's label must be the way its calls went: all through the same-node socket, or none."""
    if stats and (stats["socket_requests"] > 0) != (transport == "socket"):
        raise RuntimeError(f"{bench}: the {transport} row's calls went {stats['socket_requests']}/"
                           f"{stats['requests']} through the socket")


def bench_actor(clients: Iterable[int] = (1, 2, 4, 8), scenarios_per_call: Iterable[int] = (1, 8),
                feeder: str = "ieee33", calls: int = 300, seed: int = 0, *, modes: Iterable[str] = ("local", "actor"),
                transports: Iterable[str] = ("socket", "ray"), micro_batching: Iterable[bool] = (True, False),
                max_wait_ms: float = 1.0) -> list[dict]:
    """Solve + enforce throughput and latency: the shared power-flow actor against solving in-process.

    Callers are real parallel clients: small Ray actors (``num_cpus=0``, one process each), each holding a
    ``LocalGrid`` and a ``PowerFlowClient`` of one power-flow actor (``num_cpus=0``).  For a row, ``clients``
    callers start together at a wall-clock instant and each makes ``calls`` timed calls of ``scenarios_per_call``
    scenarios (after 10 untimed ones), cycling through 16 env-like consecutive steps (warm-started).
    ``mode`` ``local``: each caller solves in its own process; ``actor``: it calls the actor through
    ``transport`` ``socket`` (the same-node channel) or ``ray`` (Ray calls), with ``micro_batching`` on
    (concurrent calls merged, at most ``max_wait_ms`` of waiting) or off.
    ``scenarios_per_s``: all callers' scenarios / (last caller's end - start); ``p50_ms``, ``p99_ms``: latency
    of one call over all callers' calls; ``requests_per_solve``: the actor's requests / batched solves.

    Starts Ray on loopback (``evgrid.cluster.runtime.connect``) unless it is running, and stops only what it
    started (the Ray instance, else its own actors).
    """
    import ray

    from evgrid.cluster.powerflow import get_or_create_actor
    from evgrid.cluster.runtime import connect
    from evgrid.envs.config import load_config
    from evgrid.grid.service import build_feeders

    clients, spcs, modes, transports = _check_actor_args(clients, scenarios_per_call, calls, feeder, modes, transports)
    plan = [("local", None, False)] if "local" in modes else []
    plan += [("actor", t, bool(mb)) for t in transports for mb in micro_batching] if "actor" in modes else []
    cfg = load_config(None, {"grid": {"feeder": feeder}, "seed": seed})
    name, namespace = "evgrid-bench-powerflow", "evgrid-bench"
    rows: list[dict] = []
    started_ray = not ray.is_initialized()
    f = build_feeders(cfg.grid).feeders[0]
    rng = np.random.default_rng(seed)
    with connect():
        handles: list = []
        try:
            pf_actor = get_or_create_actor(cfg, name=name, namespace=namespace, max_wait_ms=max_wait_ms)[0]
            handles.append(pf_actor)
            caller_cls = ray.remote(num_cpus=0)(_ActorCaller)
            callers = [caller_cls.remote(cfg, name, namespace) for _ in range(clients[-1])]
            handles += callers
            ray.get([c.ready.remote() for c in callers])  # no caller still building its feeder while others run
            for spc in spcs:
                inputs = [ray.put(_actor_inputs(f, spc, _ACTOR_STEPS, rng)) for _ in callers]
                for n in clients:
                    for mode, transport, mb in plan:
                        if mode == "actor":
                            ray.get(pf_actor.configure.remote(micro_batching=mb, max_wait_ms=max_wait_ms))
                        row = _actor_row(pf_actor, callers[:n], inputs, transport or mode, calls)
                        rows.append(dict(bench="actor", feeder=feeder, mode=mode, transport=transport, clients=n,
                                         scenarios_per_call=spc, micro_batching=mb, calls_per_client=calls,
                                         scenarios_per_s=round(n * calls * spc / row.pop("wall_s"), 1), **row))
                        log.info("bench actor: %s", rows[-1])
        finally:
            if not started_ray:  # someone else's Ray: leave it, minus our actors
                for h in handles:
                    ray.kill(h)
    return rows


_ACTOR_WARMUP, _ACTOR_STEPS = 10, 16  # untimed calls per caller and row; env-like steps cycled through


def _check_actor_args(clients: Iterable[int], scenarios_per_call: Iterable[int], calls: int, feeder: str,
                      modes: Iterable[str], transports: Iterable[str]) -> tuple[list[int], list[int], list, list]:
    """(clients sorted, scenarios per call, modes, transports), or a ValueError naming the argument."""
    clients = sorted({int(c) for c in clients})
    spcs = [int(s) for s in scenarios_per_call]
    modes, transports = list(modes), list(transports)
    if not clients or clients[0] < 1 or clients[-1] > 256:
        raise ValueError(f"clients: expected counts in [1, 256], got {clients}")
    if not spcs or min(spcs) < 1 or max(spcs) > 65536:
        raise ValueError(f"scenarios_per_call: expected sizes in [1, 65536], got {spcs}")
    if not 1 <= calls <= 1_000_000:
        raise ValueError(f"calls: expected 1..1,000,000 calls per client, got {calls}")
    if feeder == "city":
        raise ValueError("feeder: expected one feeder (ieee33, feeder14, cigre_mv), got 'city'")
    if not modes or not set(modes) <= {"local", "actor"}:
        raise ValueError(f"modes: expected a non-empty subset of local, actor, got {modes}")
    if not transports or not set(transports) <= {"socket", "ray"}:
        raise ValueError(f"transports: expected a non-empty subset of socket, ray, got {transports}")
    return clients, spcs, modes, transports


class _ActorCaller:
    """One client process of ``bench actor`` (a Ray actor): its own LocalGrid and a PowerFlowClient per
    transport."""

    def __init__(self, cfg, name, namespace):
        from evgrid.cluster.powerflow import PowerFlowClient, build_feeders
        from evgrid.grid.service import LocalGrid

        self.grids = {"local": LocalGrid(build_feeders(cfg.grid).feeders, cfg.grid),
                      "socket": PowerFlowClient(cfg, name=name, namespace=namespace, transport="auto"),
                      "ray": PowerFlowClient(cfg, name=name, namespace=namespace, transport="ray")}

    def ready(self) -> bool:
        return True

    def warm(self, mode, inputs, warmup):
        grid = self.grids[mode]
        grid.reset()
        for i in range(warmup):
            grid.solve(0, *inputs[i % inputs.shape[0]])

    def run(self, mode, inputs, calls, warmup, start_at):
        grid = self.grids[mode]
        n = inputs.shape[0]
        while time.time() < start_at:
            time.sleep(1e-4)
        lat = np.empty(calls)
        for i in range(calls):
            t0 = time.perf_counter()
            grid.solve(0, *inputs[(warmup + i) % n])
            lat[i] = time.perf_counter() - t0
        return lat, time.time()


def _actor_row(pf_actor, callers: list, inputs: list, grid: str, calls: int) -> dict:
    """One measurement: every caller warms up, then all make ``calls`` timed calls through ``grid`` (local,
    socket or ray) from a common start; wall seconds, latency percentiles and the actor's requests per solve."""
    import ray

    ray.get([c.warm.remote(grid, inputs[k], _ACTOR_WARMUP) for k, c in enumerate(callers)])
    ray.get(pf_actor.stats.remote(True))  # count this row's timed calls only
    # callers start together at a wall-clock instant every one of them receives in time
    start_at = time.time() + 0.5
    res = ray.get([c.run.remote(grid, inputs[k], calls, _ACTOR_WARMUP, start_at) for k, c in enumerate(callers)])
    stats = ray.get(pf_actor.stats.remote(True)) if grid != "local" else None
    _check_transport("bench actor", stats, None if grid == "local" else grid)
    lat_ms = np.concatenate([r[0] for r in res]) * 1e3
    return dict(wall_s=max(r[1] for r in res) - start_at, p50_ms=round(float(np.percentile(lat_ms, 50)), 3),
                p99_ms=round(float(np.percentile(lat_ms, 99)), 3),
                requests_per_solve=round(stats["requests"] / max(stats["solves"], 1), 2) if stats else None)


def bench_actor_sampling(envs_per_runner: int = 8, n_ev: int = 300, *, steps: int = 96, repeats: int = 3,
                         seed: int = 0) -> list[dict]:
    """RLlib sampling throughput with the power flow in-process (``local``) and through the shared actor.

    The quickstart (IEEE 33, operators, stations and grouped EVs learned) with ``envs_per_runner``
    environments stepping together in one env runner (sampling in the driver), so each step is one
    power-flow call for all of them: a function call, or one round trip to the actor through its same-node
    socket (``transport`` ``socket``, what ``powerflow: actor`` uses on the actor's node) or a Ray call
    (``ray``).  The best of ``repeats`` timed ``steps``-step samples (a whole day by default) after a
    warm-up day.  ``env_steps_per_s`` counts environment steps (K per vector step); on actor rows,
    ``vs_local`` is the throughput over the local row's and ``actor_requests_per_step`` the actor's requests
    per vector step.
    """
    import ray

    from evgrid.agents.rllib.algos import load_run_config
    from evgrid.agents.rllib.experiment import Experiment
    from evgrid.cluster.runtime import connect, powerflow_factory, start_powerflow_actors

    k = int(envs_per_runner)
    if not 1 <= k <= 1024:
        raise ValueError(f"envs_per_runner: expected 1..1024, got {envs_per_runner!r}")
    rows: list[dict] = []
    with connect():
        for mode, transport in (("local", None), ("actor", "socket"), ("actor", "ray")):
            env_cfg, train_cfg = load_run_config("quickstart", [
                f"fleet.n_ev={n_ev}", f"train.powerflow={mode}", "train.num_env_runners=0",
                f"train.envs_per_runner={k}", f"train.rollout_fragment_length={steps}",
                f"train.train_batch_size={steps * k}", f"train.minibatch_size={steps * k}", f"train.seed={seed}"])
            shards = start_powerflow_actors(env_cfg, train_cfg)
            try:
                with Experiment(env_cfg, train_cfg, grid_factory=powerflow_factory(train_cfg)) as exp:
                    best_s, stats = _time_sampling(exp.algo.env_runner, steps * k, repeats, transport, shards)
            finally:
                for h in shards:
                    ray.kill(h, no_restart=True)
            _check_transport("bench actor sampling", stats, transport)
            rows.append(dict(bench="actor_sampling", feeder="ieee33", mode=mode, transport=transport,
                             envs_per_runner=k, n_ev=n_ev,
                             env_steps_per_s=round(steps * k / best_s, 1),
                             actor_requests_per_step=(round(stats["requests"] / (repeats * steps), 2)
                                                      if stats else None)))
            log.info("bench actor sampling: %s", rows[-1])
    for r in rows[1:]:
        r["vs_local"] = round(r["env_steps_per_s"] / rows[0]["env_steps_per_s"], 3)
    return rows


def _time_sampling(runner, env_steps: int, repeats: int, transport: str | None, shards: list
                   ) -> tuple[float, dict | None]:
    """Best seconds of ``repeats`` samples of ``env_steps`` env steps after a warm-up sample, and the first
    actor's counters over the timed samples (None without actors)."""
    import ray

    if transport == "ray":
        runner.env.vec.sim.grid.transport = "ray"
    runner.sample(num_timesteps=env_steps, explore=True)  # warm-up: modules, kernels, actor
    if shards:
        ray.get(shards[0].stats.remote(True))
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.sample(num_timesteps=env_steps, explore=True)
        best = min(best, time.perf_counter() - t0)
    return best, (ray.get(shards[0].stats.remote()) if shards else None)


# ---------------------------------------------------------------------------
# train


def bench_train(views: Iterable[str] = ("grouped", "individual"), n_ev: int = 1000, *, env_runners: int = 0,
                envs_per_runner: int = 8, iterations: int = 2, min_sample_s: float = 5.0, seed: int = 0,
                algorithm: str = "PPO") -> list[dict]:
    """RLlib sampling and learning throughput per EV view with ``n_ev`` EVs in every environment.

    ``algorithm``: PPO (the quickstart's operators, stations and EVs, all learned) or PDQN / MPDQN (EVs only,
    operators and stations on their rules; every timed iteration runs one update on a replayed minibatch of
    as many transitions as it samples env steps).  Seed 001's household fleet arrives at 18:00, so all
    ``n_ev`` EVs are plugged in and decide at every step of the evening (18:00-24:00, 24 steps);
    ``envs_per_runner`` environments per runner step together.  Times ``iterations`` training iterations after
    one warm-up (module build, first compile), and more until ``min_sample_s`` seconds of sampling.
    ``ev_decisions_per_s``: per-EV actions sampled per second of sampling; ``env_share_of_sampling``: seconds
    inside the env's step (simulator, power flow, observations) over sampling seconds; on the grouped row,
    ``ev_decisions_vs_individual`` divides its ``ev_decisions_per_s`` by the individual view's of the run.
    """
    from evgrid.agents.rllib.algos import HYBRID_ALGORITHMS, load_run_config
    from evgrid.agents.rllib.experiment import Experiment
    from evgrid.cluster.runtime import connect

    check_choice("algorithm", algorithm, ("PPO", *HYBRID_ALGORITHMS))
    rows = []
    n_station = 6
    ports = int(np.ceil(n_ev / n_station * 1.3)) + 10  # a plug for every EV the station draws
    steps = 24
    batch = steps * envs_per_runner * max(env_runners, 1)
    if algorithm == "PPO":
        extra = [f"train.minibatch_size={batch}", "train.num_epochs=1"]
    else:
        # the buffer holds one iteration's steps after the warm-up, so every timed iteration updates once
        extra = ["agents.operator=rule", "agents.station=rule", f"train.learning_starts={batch}",
                 f"train.minibatch_size={batch}"]
    with connect():
        for view in views:
            env_cfg, train_cfg = load_run_config("quickstart", [
                f"train.algorithm={algorithm}", *extra, f"agents.ev_view={view}", "fleet.scenario=household_valley",
                f"fleet.n_ev={n_ev}", "fleet.household_arrival_h=[18.0,0.0,18.0,18.0]",
                f"stations.n_station={n_station}", f"stations.ports={ports}", f"n_steps={steps}", "start_hour=18.0",
                f"train.num_env_runners={env_runners}", f"train.envs_per_runner={envs_per_runner}",
                f"train.rollout_fragment_length={steps}", f"train.train_batch_size={batch}", f"train.seed={seed}"])
            with Experiment(env_cfg, train_cfg) as exp:
                timed = _timed_iterations(exp, iterations, min_sample_s)
            rows.append(dict(bench="train", algorithm=algorithm, ev_view=view, n_ev=n_ev, env_runners=env_runners,
                             envs_per_runner=envs_per_runner, **_throughput(timed, batch)))
            log.info("bench train: %s %s done", algorithm, view)
    by_view = {r["ev_view"]: r for r in rows}
    if {"grouped", "individual"} <= by_view.keys():
        g, i = by_view["grouped"], by_view["individual"]
        g["ev_decisions_vs_individual"] = round(g["ev_decisions_per_s"] / i["ev_decisions_per_s"], 3)
    return rows


def _timed_iterations(exp, iterations: int, min_sample_s: float) -> list:
    """One warm-up iteration (module build, first compile), then ``iterations`` timed ones and more until
    ``min_sample_s`` seconds of sampling."""
    exp.step()
    timed = [exp.step() for _ in range(iterations)]
    while sum(s.sample_s for s in timed) < min_sample_s:
        timed.append(exp.step())
    return timed


def _throughput(timed: list, batch: int) -> dict:
    """The rate fields of a ``bench train`` row from its timed iterations of ``batch`` env steps each."""
    ev_decisions, sample_s, learn_s, env_step_s = (sum(getattr(s, k) for s in timed) for k in (
        "ev_decisions", "sample_s", "learn_s", "env_step_s"))
    env_steps = batch * len(timed)
    return dict(ev_decisions_per_step=round(ev_decisions / env_steps, 1),
                env_steps_per_s=round(env_steps / sample_s, 2), ev_decisions_per_s=round(ev_decisions / sample_s, 1),
                iterations=len(timed), sample_s=round(sample_s / len(timed), 4),
                learn_s=round(learn_s / len(timed), 4), env_share_of_sampling=round(env_step_s / sample_s, 4))


# ------------------------------------------------------------------------------------------------- opf


def opf_case(feeder, n_step: int, n_ev: int, seed: int = 0, load_scale: float = 0.5, ev_share: float = 0.2):
    """A day on ``feeder``: residential load at ``load_scale`` x nominal, and ``n_ev`` sessions (arrivals
    spread over the day, 7 kW chargers, 30 % with V2G) whose energy is ``ev_share`` of the day's load."""
    from evgrid.grid import opf
    from evgrid.grid.profiles import load_shape, pv_profile

    rng = np.random.default_rng(seed)
    dt_h = 24.0 / n_step
    dt_min = int(round(dt_h * 60))
    shape = load_shape("residential", dt_min=dt_min, rng=rng)[:n_step] * load_scale
    kinds = np.array(feeder.der_kind)
    # PV follows the sun, wind a steady 30 %, diesel may run at its rating
    der = np.where(kinds == "pv", pv_profile(dt_min=dt_min, rng=rng)[:n_step, None],
                   np.where(kinds == "wind", 0.3, 1.0)) * feeder.der_p_max_kw
    hz = opf.Horizon(dt_h, shape[:, None] * feeder.base_p_kw, shape[:, None] * feeder.base_q_kvar,
                     np.broadcast_to(der, (n_step, kinds.size)).copy())
    loads = np.flatnonzero(feeder.base_p_kw > 0)
    start = rng.integers(0, n_step * 3 // 4, n_ev)
    end = np.minimum(start + rng.integers(max(n_step // 6, 1), max(n_step // 2, 2), n_ev), n_step)  # >= 1 step
    p_max = np.full(n_ev, 7.0)
    reach = 0.9 * p_max * (end - start) * dt_h
    need = np.minimum(rng.uniform(0.5, 1.5, n_ev) * ev_share * hz.load_p_kw.sum() * dt_h / n_ev, 0.6 * reach)
    cap = np.full(n_ev, 60.0)
    e0 = cap * rng.uniform(0.15, 0.3, n_ev)
    ss = opf.Sessions(bus=rng.choice(loads, n_ev), start=start, end=end, p_ch_max_kw=p_max,
                      p_dis_max_kw=np.where(rng.random(n_ev) < 0.3, 7.0, 0.0), cap_kwh=cap, e0_kwh=e0,
                      e_target_kwh=np.minimum(e0 + need, cap), e_min_kwh=0.1 * cap, eta_ch=np.full(n_ev, 0.9),
                      eta_dis=np.full(n_ev, 0.9), station=np.full(n_ev, -1, dtype=np.int64))
    return hz, ss


def bench_opf(feeders: Iterable[str] = ("ieee33",), horizons: Iterable[int] = (24, 96),
              evs: Iterable[int] = (300, 3000), formulations: Iterable[str] = ("lindistflow",), seed: int = 0,
              single_period: bool = True, ev_models: Iterable[str] = ("sessions",),
              single_period_repeats: int = 15, ac_rounds: int = 0,
              methods: Iterable[str] = ("direct", "lazy"),
              problems: Iterable[str] = ("min_cost", "seed001_stage1"),
              parallel_simplex: bool = False) -> Iterable[dict]:
    """Build + solve time of the multi-period OPF (LinDistFlow with ``ac_rounds`` AC correction rounds), with
    its AC check, per problem, feeder, horizon, fleet, formulation and method (``lazy``: LinDistFlow only);
    and a single-period OPF beside
    pandapower's ``runopp`` on the same problem, with one and with two AC rounds (``single_period_repeats``
    timed solves each)."""
    from evgrid.grid import opf

    for name in feeders:
        f = build_feeder(name, der=name != "feeder14")
        net = opf.Network.of(f)
        for T in horizons:
            for n_ev in evs:
                hz, ss = opf_case(f, T, n_ev, seed)
                tou = np.where((np.arange(T) * hz.dt_h % 24 >= 8) & (np.arange(T) * hz.dt_h % 24 < 22), 1.0, 0.3)
                ev_kwh = float(((ss.e_target_kwh - ss.e0_kwh) / ss.eta_ch).sum())
                objectives = {"min_cost": opf.Objective(energy_price_per_kwh=tou, curtail_cost_per_kwh=0.1,
                                                        diesel_cost=(1e-4, 0.8)),
                              "seed001_stage1": opf.Objective(tie_target_kw=opf.flat_target_kw(
                                  hz.load_p_kw.sum(1) - hz.der_avail_kw.sum(1), ev_kwh, hz.dt_h))}
                for problem in problems:
                    objective = objectives[problem]
                    for form, ev_model, method in itertools.product(formulations, ev_models, methods):
                        if method == "lazy" and form != "lindistflow":
                            continue
                        t0 = time.perf_counter()
                        r = opf.solve_opf(net, hz, ss, objective, opf.OPFOptions(
                            formulation=form, ev_model=ev_model, ac_rounds=ac_rounds if form == "lindistflow" else 0,
                            method=method, parallel_simplex=parallel_simplex))
                        yield {"bench": "opf", "problem": problem, "feeder": name, "horizon": T, "n_ev": n_ev,
                               "formulation": form, "ev_model": ev_model, "method": method,
                               "parallel_simplex": parallel_simplex, "ac_rounds": ac_rounds,
                               "solver": r.solver,
                               "build_s": r.build_s,
                               "solve_s": r.solve_s, "total_s": time.perf_counter() - t0,
                               "objective": r.objective, "optimality_gap": r.optimality_gap,
                               "max_dv_pu_vs_ac": r.ac.max_dv_pu,
                               "max_loss_error_kw": r.ac.max_loss_error_kw, "cone_gap": r.ac.cone_gap,
                               "tracking_kwh": r.tracking_kwh}
        if single_period:
            for rounds in (1, 2):
                yield _single_period_row(f, seed, repeats=single_period_repeats, ac_rounds=rounds)


def _median_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Each ``fns[k]()``'s last result and its median wall time over ``repeats`` calls after a warm-up call,
    the calls interleaved so that a slow spell of the machine weighs on each alike."""
    out = {k: fn() for k, fn in fns.items()}
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return out, {k: float(np.median(v)) for k, v in times.items()}


def _single_period_row(f, seed: int, repeats: int = 15, ac_rounds: int = 2) -> dict:
    """One step: EV loads at every loaded bus (0..p_max) bring the purchase to a target,
    min (P_purchase - target)² in MW², under voltage and line limits: our model (LinDistFlow with ``ac_rounds``
    AC correction rounds) beside pandapower's AC ``runopp`` (PIPS) on a copy of the feeder, each judged by
    AC power flow.  Times are medians of ``repeats`` solves after a warm-up (imports, JIT compilation):
    ``total_s`` on a :class:`~evgrid.grid.opf.Network` built once, as a controller solving every step uses it
    (its matrices for a horizon length are built once), ``total_cold_s`` on a fresh one each time."""
    import copy

    import pandapower as pp

    from evgrid.grid import opf

    rng = np.random.default_rng(seed)
    loads = np.flatnonzero(f.base_p_kw > 0)
    p_max = rng.uniform(50.0, 150.0, loads.size)
    base_p, base_q = f.base_p_kw * 0.5, f.base_q_kvar * 0.5
    target_kw = base_p.sum() + 0.6 * p_max.sum()
    hz = opf.Horizon(1.0, base_p[None, :], base_q[None, :], np.zeros((1, len(f.der_kind))))
    n = loads.size
    ss = opf.Sessions(bus=loads, start=np.zeros(n, np.int64), end=np.ones(n, np.int64), p_ch_max_kw=p_max,
                      p_dis_max_kw=np.zeros(n), cap_kwh=np.full(n, 1e3), e0_kwh=np.zeros(n), e_target_kwh=np.zeros(n),
                      e_min_kwh=np.zeros(n), eta_ch=np.ones(n), eta_dis=np.ones(n), station=np.full(n, -1, np.int64))
    obj, opt = opf.Objective(tie_target_kw=np.array([target_kw])), opf.OPFOptions(ac_rounds=ac_rounds)
    net = opf.Network.of(f)
    # the same problem in pandapower: fixed loads, a controllable EV load per bus, the purchase's cost
    pn = copy.deepcopy(f.net)
    pn.load["p_mw"] *= 0.5
    pn.load["q_mvar"] *= 0.5
    pn.load["controllable"] = False
    pn.sgen.drop(pn.sgen.index, inplace=True)
    pn.gen.drop(pn.gen.index, inplace=True)
    for k, b in enumerate(loads):
        pp.create_load(pn, int(f.bus_ids[b]), p_mw=0.0, controllable=True, min_p_mw=0.0, max_p_mw=p_max[k] / 1e3,
                       min_q_mvar=0.0, max_q_mvar=0.0)
    pn.bus["min_vm_pu"], pn.bus["max_vm_pu"] = f.v_min_pu, f.v_max_pu
    pn.line["max_loading_percent"] = 100.0
    pn.ext_grid["min_p_mw"], pn.ext_grid["max_p_mw"] = -1e3, 1e3
    pn.ext_grid["min_q_mvar"], pn.ext_grid["max_q_mvar"] = -1e3, 1e3
    pn.poly_cost.drop(pn.poly_cost.index, inplace=True)
    tgt = target_kw / 1e3
    pp.create_poly_cost(pn, int(pn.ext_grid.index[0]), "ext_grid", cp1_eur_per_mw=-2 * tgt, cp0_eur=tgt ** 2,
                        cp2_eur_per_mw2=1.0)
    out, times = _median_times({"warm": lambda: opf.solve_opf(net, hz, ss, obj, opt),
                                "cold": lambda: opf.solve_opf(opf.Network.of(f), hz, ss, obj, opt),
                                "runopp": lambda: pp.runopp(pn, verbose=False)}, repeats)
    ours = out["warm"]
    runopp_obj = float((pn.res_ext_grid.p_mw.iloc[0] - tgt) ** 2)
    ours_ac = float(((base_p.sum() + ours.p_ch_kw.sum() + ours.ac.loss_kw[0]) / 1e3 - tgt) ** 2)
    vm_pp = pn.res_bus.vm_pu.loc[f.bus_ids].to_numpy()
    return {"bench": "opf", "problem": "single_period", "feeder": f.name, "horizon": 1, "n_ev": int(n),
            "formulation": "lindistflow", "ac_rounds": ac_rounds, "solver": ours.solver, "build_s": ours.build_s,
            "solve_s": ours.solve_s, "total_s": times["warm"], "total_cold_s": times["cold"],
            "objective": ours_ac, "max_dv_pu_vs_ac": ours.ac.max_dv_pu,
            "ac_v_violation_pu": _v_violation(ours.ac.vm_pu[0], f), "ac_max_loading": ours.ac.max_loading,
            "runopp_s": times["runopp"], "runopp_objective": runopp_obj,
            "runopp_v_violation_pu": _v_violation(vm_pp, f),
            "speedup_vs_runopp": times["runopp"] / times["warm"],
            "speedup_cold_vs_runopp": times["runopp"] / times["cold"],
            "objective_vs_runopp": (ours_ac - runopp_obj) / max(abs(runopp_obj), 1e-12)}


def _v_violation(vm_pu: np.ndarray, f) -> float:
    """The largest excursion of AC voltages outside the feeder's limits (0: none), p.u."""
    return float(max(0.0, np.max(f.v_min_pu - vm_pu), np.max(vm_pu - f.v_max_pu)))


