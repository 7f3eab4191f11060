"""Benchmarks behind ``evgrid bench``: JSON rows, ratios measured in one run.

``powerflow``: our sweep (cold and warm-started, one thread and all threads),
pandapower ``runpp``, lightsim2grid (its C++ batch class, and ``GridModel.ac_pf``
scenario by scenario) and power-grid-model (one batch call), on the same random
load scenarios (uniform 0..2 x nominal per bus, seeded).  Warm starts solve a
"next step": every load moved by up to +-3 % from the scenario whose solution
seeds the solver, as consecutive environment steps do.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable

import numpy as np

from evgrid.grid.feeders import build_feeder
from evgrid.grid.flow import PandapowerBackend, SweepBackend

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
    runners = []
    if external:
        from evgrid.grid.flow.external import LightSimRunner, PgmRunner, available

        # lightsim2grid twice: its C++ batch class, and GridModel.ac_pf per scenario
        for cls, mode, kwargs in ((LightSimRunner, "batch", {}), (LightSimRunner, "ac_pf", {"mode": "loop"}),
                                  (PgmRunner, "batch", {})):
            why = available().get(cls.name)
            if why is None:
                runners.append((mode, cls(feeder, **kwargs)))
            else:
                log.warning("bench: %s unavailable (%s); not measured", cls.name, why)
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
    from evgrid.envs.ev_grid import EVGridEnv
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
            # the evening: from 17:00, when home sessions pile up
            first = int(17 * 60 / cfg.dt_min)
            rss0 = _rss_bytes()
            if view == "rule":
                sim = Sim(cfg, 1)
                sim.reset(seed)
                for _ in range(first):
                    sim.step()
                t0 = time.perf_counter()
                for _ in range(steps):
                    sim.step()
                dt = time.perf_counter() - t0
                plugged = int(sim.plugged().size)
            else:
                env = EVGridEnv(cfg)
                obs, _ = env.reset(seed=seed)
                acts = _fixed_actions(env)
                for _ in range(first):
                    obs, *_ = env.step(acts(obs))
                total = 0.0
                for _ in range(steps):
                    a = acts(obs)  # the policy's time is not the env's
                    t0 = time.perf_counter()
                    obs, *_ = env.step(a)
                    total += time.perf_counter() - t0
                dt = total
                plugged = int(env.sim.plugged().size)
            rss1 = _rss_bytes()
            rows.append(dict(bench="env", feeder=feeder_name, view=view, n_ev=n_ev, plugged_at_end=plugged,
                             steps=steps, ms_per_step=round(dt / steps * 1e3, 3),
                             us_per_plugged_ev=round(dt / steps * 1e6 / max(plugged, 1), 4),
                             bytes_per_ev=round((rss1 - rss0) / n_ev, 1)))
            log.info("bench env: %s %d EVs done", view, n_ev)
    return rows


def _fixed_actions(env) -> Callable[[dict], dict]:
    """Valid actions for every live agent: neutral prices, stations at full allowance, EVs charging."""
    from evgrid.agents.baselines import BaselinePolicy

    policy = BaselinePolicy("uncontrolled", env)
    return policy.act
