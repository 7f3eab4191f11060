"""Record and compare evgrid trajectories: the "no behaviour change" check of a refactor.

    python tools/trajectories.py record OUT_DIR          # with the code under test on sys.path
    python tools/trajectories.py compare BASE_DIR NEW_DIR

``record`` runs every shipped experiment config under every EV view (and a few variants that reach
other code paths: discrete operator levels, LLF and cap dispatch, the TOU and random EV rules, two
environments in lock-step), acting with a seeded random policy that depends only on (case, step,
agent id), and stores per case the observations, rewards and termination flags of every step, the
``steps.parquet`` / ``sessions.parquet`` rows of the episode, and the evaluation metrics of every
rule baseline.  ``compare`` prints, per case, the largest absolute difference of each recorded
quantity (0 where bit-identical) and any column or agent that exists on one side only.

It uses the public API only (``evgrid.make``, ``EVGridVectorEnv``, ``evgrid.evaluate``), so the same
file records a baseline checkout (``PYTHONPATH=/path/to/baseline python tools/trajectories.py record``).
"""

from __future__ import annotations

import pickle
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

CONFIGS = ("quickstart", "seed000", "seed001", "seed002", "seed003")
VIEWS = ("individual", "grouped", "rule")
# extra cases: (label, config, overrides, n_env)
VARIANTS = (
    ("quickstart-level", "quickstart", {"agents": {"operator_action": "level"}}, 1),
    ("quickstart-llf", "quickstart", {"stations": {"dispatch": "llf"}}, 1),
    ("quickstart-cap", "quickstart", {"stations": {"dispatch": "cap"}}, 1),
    ("quickstart-tou-rule", "quickstart", {"agents": {"ev_view": "rule", "ev_rule": "tou"}}, 1),
    ("quickstart-random-rule", "quickstart", {"agents": {"ev_view": "rule", "ev_rule": "random"}}, 1),
    ("quickstart-vec3", "quickstart", {}, 3),
    ("seed000-vec2-individual", "seed000", {"agents": {"ev_view": "individual"}}, 2),
    ("seed002-vec2", "seed002", {}, 2),
)
BASELINES = ("uncontrolled", "tou", "llf", "lbms", "random")


def _config_path(name: str) -> str:
    """The shipped YAML: a packaged one when the package ships them, else the repository's experiments/."""
    try:
        from importlib import resources

        p = resources.files("evgrid") / "experiments" / f"{name}.yaml"
        if p.is_file():
            return str(p)
    except (ModuleNotFoundError, AttributeError):
        pass
    import evgrid

    return str(Path(evgrid.__file__).resolve().parents[1] / "experiments" / f"{name}.yaml")


def _rng(case: str, t: int, agent: str) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(case.encode()), t, zlib.crc32(agent.encode())])


def _action(space, rng: np.random.Generator):
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        return {k: _action(space[k], rng) for k in sorted(space.spaces)}
    if isinstance(space, spaces.Discrete):
        return np.int64(rng.integers(space.n))
    if isinstance(space, spaces.MultiDiscrete):
        return rng.integers(space.nvec).astype(np.int64)
    if isinstance(space, spaces.Box):
        return rng.uniform(space.low, space.high).astype(space.dtype)
    raise TypeError(space)


def _flat(o) -> np.ndarray:
    if isinstance(o, dict):
        return np.concatenate([_flat(o[k]) for k in sorted(o)])
    return np.asarray(o, dtype=np.float64).ravel()


def _read_parquet(path: Path) -> dict:
    import pyarrow.parquet as pq

    if not path.is_file():
        return {}
    t = pq.read_table(path)
    return {c: t.column(c).to_pylist() for c in t.column_names}


def _episode(label: str, config: str, overrides: dict, n_env: int, log_dir: Path) -> dict:
    from evgrid.envs.ev_grid import EVGridVectorEnv

    overrides = {**overrides, "log_dir": str(log_dir)}
    env = EVGridVectorEnv(_config_path(config), n_env, **overrides)
    obs, _ = env.reset(seed=7)
    steps = [[(a, _flat(o)) for a, o in sorted(ob.items())] for ob in obs]
    out = {"reset": steps, "steps": []}
    t = 0
    while any(env.agents):
        acts = [{a: _action(env.action_space(a), _rng(f"{label}/{e}", t, a)) for a in live}
                for e, live in enumerate(env.agents)]
        obs, rew, term, trunc, _ = env.step(acts)
        out["steps"].append([
            {a: (_flat(obs[e][a]), float(rew[e][a]), bool(term[e][a]), bool(trunc[e][a])) for a in sorted(obs[e])}
            for e in range(n_env)])
        t += 1
    env.close()
    out["steps.parquet"] = _read_parquet(log_dir / "steps.parquet")
    out["sessions.parquet"] = _read_parquet(log_dir / "sessions.parquet")
    return out


def _cases() -> list[tuple[str, str, dict, int]]:
    cases = []
    for config in CONFIGS:
        for view in VIEWS:
            cases.append((f"{config}-{view}", config, {"agents": {"ev_view": view}}, 1))
    return cases + list(VARIANTS)


def record(out_dir: str) -> None:
    from evgrid.evaluate import evaluate_baselines

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for label, config, overrides, n_env in _cases():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                data = _episode(label, config, overrides, n_env, Path(tmp))
            except Exception as e:  # a case the env refuses (every level a rule): recorded as refused
                data = {"error": f"{type(e).__name__}: {e}"}
        (out / f"{label}.pkl").write_bytes(pickle.dumps(data))
        print(label, "error" if "error" in data else f"{len(data['steps'])} steps", flush=True)
    for config in CONFIGS:
        rows = evaluate_baselines(_config_path(config), list(BASELINES), 2, out_dir=None, seed=3, progress=False)
        (out / f"baselines-{config}.pkl").write_bytes(pickle.dumps(rows))
        print("baselines", config, flush=True)


def _maxdiff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return np.inf
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        a, b = a.astype(float), b.astype(float)
        same_nan = np.isnan(a) & np.isnan(b)
        d = np.where(same_nan, 0.0, np.abs(a - b))
        return float(np.nanmax(np.where(np.isnan(d), np.inf, d))) if d.size else 0.0
    return 0.0 if np.array_equal(a, b) else np.inf


def _column(values: list) -> np.ndarray:
    if values and isinstance(values[0], list):
        return np.array([np.asarray(v, dtype=float) for v in values], dtype=object)
    return np.asarray(values)


def _compare_table(name: str, a: dict, b: dict, report: list[str]) -> None:
    for c in sorted(set(a) | set(b)):
        if c not in a or c not in b:
            report.append(f"  {name}.{c}: only in {'new' if c in b else 'base'}")
            continue
        ca, cb = _column(a[c]), _column(b[c])
        if ca.dtype == object and cb.dtype == object and len(ca) == len(cb):
            d = max((_maxdiff(x, y) for x, y in zip(ca, cb)), default=0.0)
        else:
            d = _maxdiff(ca, cb)
        if d:
            report.append(f"  {name}.{c}: max |diff| {d:.3g}")


def compare(base_dir: str, new_dir: str) -> int:
    base, new = Path(base_dir), Path(new_dir)
    worst = 0.0
    for f in sorted(base.glob("*.pkl")):
        g = new / f.name
        report: list[str] = []
        if not g.is_file():
            print(f"{f.stem}: missing in {new_dir}")
            continue
        a, b = pickle.loads(f.read_bytes()), pickle.loads(g.read_bytes())
        if f.stem.startswith("baselines-"):
            for ra, rb in zip(a, b):
                for k in sorted(set(ra) | set(rb)):
                    if k not in ra or k not in rb:
                        report.append(f"  {ra['policy']}.{k}: only in {'new' if k in rb else 'base'}")
                    elif isinstance(ra[k], float | int) and _maxdiff(ra[k], rb[k]):
                        report.append(f"  {ra['policy']} ep {ra['episode']}.{k}: {ra[k]!r} -> {rb[k]!r}")
        elif "error" in a or "error" in b:
            if a.get("error") != b.get("error"):
                report.append(f"  error: {a.get('error')!r} -> {b.get('error')!r}")
        else:
            d_obs = d_rew = 0.0
            flags = agents = 0
            for ea, eb in zip(a["reset"], b["reset"]):
                if [x for x, _ in ea] != [x for x, _ in eb]:
                    agents += 1
                d_obs = max([d_obs] + [_maxdiff(x, y) for (_, x), (_, y) in zip(ea, eb)])
            if len(a["steps"]) != len(b["steps"]):
                report.append(f"  steps: {len(a['steps'])} -> {len(b['steps'])}")
            for sa, sb in zip(a["steps"], b["steps"]):
                for ea, eb in zip(sa, sb):
                    if list(ea) != list(eb):
                        agents += 1
                    for ag in set(ea) & set(eb):
                        (oa, ra_, ta, ua), (ob, rb_, tb, ub) = ea[ag], eb[ag]
                        d_obs = max(d_obs, _maxdiff(oa, ob))
                        d_rew = max(d_rew, abs(ra_ - rb_))
                        flags += (ta != tb) + (ua != ub)
            if d_obs:
                report.append(f"  observations: max |diff| {d_obs:.3g}")
            if d_rew:
                report.append(f"  rewards: max |diff| {d_rew:.3g}")
            if flags or agents:
                report.append(f"  agents differ at {agents} steps, flags at {flags}")
            worst = max(worst, d_obs, d_rew)
            for name in ("steps.parquet", "sessions.parquet"):
                _compare_table(name, a[name], b[name], report)
        print(f"{f.stem}: {'identical' if not report else 'differs'}")
        for line in report:
            print(line)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
