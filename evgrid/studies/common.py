"""The reproduction framework behind ``evgrid reproduce STUDY``.

A study is a module ``evgrid.studies.<study>`` registered in :data:`STUDIES`.  It provides

* ``run(ctx: Context) -> StudyOutput`` (required): the whole study for ``ctx.seeds``, on a small budget when
  ``ctx.quick`` (the same pipeline), its figures written under ``ctx.out_dir``;
* ``default_seeds(quick: bool) -> tuple[int, ...]`` (optional; else ``(0,)`` quick and ``(0, 1, 2)`` full);
* ``resolved_config(ctx: Context) -> dict`` (optional; else the shipped experiment YAML of the study's name),
  saved as ``config.yaml`` before the study starts;
* ``TITLE: str`` (optional): the paper, for the report's title; ``USES_RAY: bool`` (optional): Ray's and
  RLlib's own messages go to ``logs/ray.log`` while the study runs;
* ``OURS: tuple[str, ...]`` (optional): methods of ours beside the paper's, run only when asked
  (``--ours``, :attr:`Context.ours`);
* ``check_overrides(overrides: tuple[str, ...]) -> None`` (optional): the study runs a variant of its config
  with ``key=value`` overrides (:attr:`Context.overrides`); raises a ConfigError naming a key it cannot take.
  A study without it refuses overrides.

:func:`reproduce` checks the input, makes the run directory, saves the config, runs the study and writes
(:func:`write_outputs`):

* ``results.parquet``: one row per method x seed x metric, columns ``study, method, seed, metric, value,
  paper_value`` (:data:`evgrid.io.RESULT_COLUMNS`; ``paper_value`` null where the paper gives none) and any
  extra keys the study's rows carry (e.g. ``n_ev``, ``participation``; the report summarises rows that differ
  in them apart);
* ``report.md``: the table ``metric | method | paper | ours | ordering holds? | ours vs paper``, the paper's
  claims checked, the study's notes, its figures and the wall time.

"ours" is the mean over seeds ± the **sample standard deviation** over seeds (ddof = 1) and n, the number of
seeds (no spread for n = 1).  "ordering holds?" compares, for a metric the paper reports for two or more
methods, the order of the paper's values with the order of our means, pair by pair (values within 0.1 % of the
metric's largest magnitude count as equal): ✓ every pair agrees, ✗ one does not, blank where not assessable.
"ours vs paper" is the relative difference; beyond :data:`FAR` (or in sign) the report says so plainly.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from evgrid.config import ConfigError
from evgrid.validate import describe

log = logging.getLogger(__name__)

T = TypeVar("T")

# study name -> module path; imported only when that study runs, so a missing module fails that study alone
STUDIES: dict[str, str] = {
    "seed000": "evgrid.studies.seed000",
    "seed001": "evgrid.studies.seed001",
    "seed002": "evgrid.studies.seed002",
    "seed003": "evgrid.studies.seed003",
}
KEY_COLUMNS = ("study", "method", "seed", "metric", "value", "paper_value")
DEFAULT_SEEDS = {True: (0,), False: (0, 1, 2)}
FAR = 0.5
"""Ours differs "a lot" from the paper beyond this relative difference (or in sign)."""
_EQUAL_RTOL = 1e-3
_OUTPUT_FILES = ("results.parquet", "report.md")


# ------------------------------------------------------------------------------------------- the interface


@dataclass(frozen=True)
class Context:
    """What a study's ``run`` gets: its name, the budget (``quick``: small, for CI), the run directory for its
    figures and files, the Ray address (None: embedded) and the seeds to run."""

    study: str
    quick: bool
    out_dir: Path
    address: str | None
    seeds: tuple[int, ...]
    resume: bool = False
    """Continue an interrupted run in ``out_dir``: a study may keep what it finished there (seed 001: its
    trained agents) instead of computing it again."""
    ours: bool = False
    """Also run the study's methods of ours (its ``OURS``), beside the paper's."""
    overrides: tuple[str, ...] = ()
    """``key=value`` changes to the study's config (as ``evgrid train`` takes them): a variant of the study, not
    its shipped setting; ``config.yaml``, the report and its command line show them."""

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """``iterable`` with a progress bar on stderr (never stdout, which the CLI's tables own)."""
        return progress(iterable, desc, total)


@dataclass
class Claim:
    """One of the paper's orderings or directions (e.g. "PPO > A2C > DQN > random on total reward") and whether
    ours shows it: True, False, or None where it cannot be assessed."""

    text: str
    holds: bool | None


@dataclass
class StudyOutput:
    """What a study's ``run`` returns: result rows (:func:`row`), the paper's claims checked, the figures it
    wrote (PNG paths) and notes for the report (what differs from the paper and why, definitions)."""

    rows: list[dict]
    claims: list[Claim] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def row(study: str, method: str, seed: int, metric: str, value: float, paper_value: float | None = None,
        **extra: Any) -> dict:
    """One result row; ``extra`` keys become extra columns of ``results.parquet``.  A ValueError names the
    field that is not of its kind."""
    for name, text in (("study", study), ("method", method), ("metric", metric)):
        if not isinstance(text, str) or not text:
            raise ValueError(f"{name}: expected a non-empty string, got {describe(text)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed: expected an integer, got {describe(seed)}")
    return {"study": study, "method": method, "seed": int(seed), "metric": metric,
            "value": _real("value", value, metric), "paper_value": None if paper_value is None else
            _real("paper_value", paper_value, metric), **extra}


def _real(name: str, value: Any, metric: str) -> float:
    """A float (NaN allowed for ``value``: a metric that could not be measured), else ValueError."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} of {metric}: expected a number, got {describe(value)}") from None
    if math.isinf(x) or (math.isnan(x) and name == "paper_value"):
        raise ValueError(f"{name} of {metric}: expected a finite number, got {x}")
    return x


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar on stderr, or (without tqdm) a log line per item."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _logged(iterable, desc, total)
    return iter(tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True))


def _logged(iterable: Iterable[T], desc: str, total: int | None) -> Iterator[T]:
    t0 = time.perf_counter()
    for k, item in enumerate(iterable):
        yield item
        log.info("%s: %d%s done, %.1f s", desc, k + 1, f"/{total}" if total else "", time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- running a study


def default_out(study: str) -> Path:
    """The default run directory, ``runs/reproduce-<study>-<time>``."""
    return Path("runs") / f"reproduce-{study}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_reproduce(study: str, *, out: str | os.PathLike[str] | None, seeds: Iterable[int] | None,
                    address: str | None, resume: bool = False, quick: bool = False, ours: bool = False,
                    overrides: Iterable[str] = ()) -> tuple[Path, tuple[int, ...] | None]:
    """Check every input of :func:`reproduce` before any work: the study (registered, its module present), the
    seeds (distinct integers >= 0), ``ours`` (the study has methods of ours), ``overrides`` (the study takes
    them, each a key of its config), the run directory (creatable, not holding another run's results; with
    ``resume``, a run directory of the same study, budget and overrides) and the Ray address (something
    answers).  Returns (run directory, seeds or None); a ConfigError names the field."""
    if study not in STUDIES:
        raise ConfigError(f"study: expected one of {', '.join(STUDIES)}, got {study!r}")
    if importlib.util.find_spec(STUDIES[study]) is None:
        present = [s for s, m in STUDIES.items() if importlib.util.find_spec(m) is not None]
        raise ConfigError(f"study: {study!r} is registered but its module {STUDIES[study]} is not installed "
                          f"(studies available: {', '.join(present) or 'none'})")
    if ours and not getattr(load_study(study), "OURS", ()):
        raise ConfigError(f"ours: study {study!r} has no methods of ours beside the paper's; expected ours only "
                          f"with a study that lists some (its module's OURS)")
    overrides = tuple(overrides)
    if overrides:
        check = getattr(load_study(study), "check_overrides", None)
        if not callable(check):
            raise ConfigError(f"overrides: study {study!r} runs from its own settings only; got "
                              f"{' '.join(overrides)} (studies that take overrides: "
                              f"{', '.join(_overridable()) or 'none'})")
        check(overrides)
    if resume:
        _check_resumable(study, out, quick, overrides)
    out_dir = Path(out) if out is not None else default_out(study)
    held = [name for name in _OUTPUT_FILES if (out_dir / name).exists()]
    if held and not resume:
        raise ConfigError(f"out: {os.fspath(out_dir)!r} holds {held[0]} of another reproduction; expected a new "
                          f"directory or one without {' or '.join(_OUTPUT_FILES)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out: {os.fspath(out_dir)!r} is a file; expected a directory")
    nearest = out_dir if out_dir.exists() else next((p for p in out_dir.absolute().parents if p.exists()), None)
    if nearest is None or not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"out: cannot write to {os.fspath(out_dir)!r} ({os.fspath(nearest)!r} is not a writable "
                          f"directory)")
    checked = None if seeds is None else _check_seeds(seeds)
    if address is not None:
        from evgrid.cluster.runtime import check_reachable

        check_reachable(address)
    return out_dir, checked


def _overridable() -> list[str]:
    """The registered studies whose module is installed and takes config overrides."""
    return [s for s, m in STUDIES.items() if importlib.util.find_spec(m) is not None
            and callable(getattr(load_study(s), "check_overrides", None))]


def _check_resumable(study: str, out: str | os.PathLike[str] | None, quick: bool, overrides: tuple[str, ...]
                     ) -> None:
    """``--resume`` continues a run directory of the same study, budget and overrides (its ``config.yaml``
    says)."""
    import yaml

    if out is None:
        raise ConfigError("resume: continues the run directory given by out; got no out")
    path = Path(out) / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"out: {os.fspath(out)!r} is not a run directory to resume (no readable config.yaml: "
                          f"{exc})") from exc
    if not isinstance(saved, dict) or (saved.get("study"), bool(saved.get("quick"))) != (study, bool(quick)):
        got = (saved.get("study"), "quick" if saved.get("quick") else "full") if isinstance(saved, dict) else None
        raise ConfigError(f"out: {os.fspath(out)!r} holds a run of {got}; resume expected one of "
                          f"{(study, 'quick' if quick else 'full')}")
    held = tuple(saved.get("overrides") or ())
    if held != overrides:
        raise ConfigError(f"overrides: {os.fspath(out)!r} holds a run with overrides {' '.join(held) or 'none'}; "
                          f"resume got {' '.join(overrides) or 'none'}")


def _check_seeds(seeds: Iterable[int]) -> tuple[int, ...]:
    s = tuple(seeds)
    bad = [x for x in s if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0]
    if not s or bad:
        raise ConfigError(f"seeds: expected one or more integers >= 0, got {describe(bad[0]) if bad else 'none'}")
    if len(set(s)) != len(s):
        raise ConfigError(f"seeds: expected distinct seeds, got {' '.join(str(x) for x in s)}")
    return tuple(int(x) for x in s)


def load_study(study: str) -> ModuleType:
    """The study's module (imported now); a ConfigError naming the registered studies if it is not one."""
    if study not in STUDIES:
        raise ConfigError(f"study: expected one of {', '.join(STUDIES)}, got {study!r}")
    try:
        module = importlib.import_module(STUDIES[study])
    except ModuleNotFoundError as e:
        if e.name is None or not STUDIES[study].startswith(e.name):
            raise  # the module is there but something it imports is not: a bug or an install problem
        raise ConfigError(f"study: {study!r} is registered but its module {STUDIES[study]} is not installed") \
            from None
    if not callable(getattr(module, "run", None)):
        raise ConfigError(f"study: module {STUDIES[study]} has no run(ctx) function")
    return module


def reproduce(study: str, *, quick: bool, out: str | os.PathLike[str] | None, address: str | None,
              seeds: tuple[int, ...] | None = None, ray_log: bool = True, resume: bool = False,
              ours: bool = False, overrides: Iterable[str] = ()) -> Path:
    """Run ``study`` end to end and write its run directory (``out``, default :func:`default_out`): the
    resolved ``config.yaml``, ``results.parquet``, ``report.md`` and figures.  ``seeds`` default to the study's
    (one seed with ``quick``); ``address``: a Ray cluster for studies that train (None: embedded);
    ``ray_log``: Ray's own messages go to ``logs/ray.log``; ``resume``: continue the interrupted run in ``out``
    (:attr:`Context.resume`); ``ours``: also the study's methods of ours (:attr:`Context.ours`); ``overrides``:
    a variant of the study's config (:attr:`Context.overrides`).  Returns the run directory."""
    overrides = tuple(overrides)
    out_dir, checked = check_reproduce(study, out=out, seeds=seeds, address=address, resume=resume, quick=quick,
                                       ours=ours, overrides=overrides)
    module = load_study(study)
    if checked is None:
        choose = getattr(module, "default_seeds", None)
        checked = _check_seeds(choose(bool(quick)) if callable(choose) else DEFAULT_SEEDS[bool(quick)])
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(study=study, quick=bool(quick), out_dir=out_dir, address=address, seeds=checked,
                  resume=bool(resume), ours=bool(ours), overrides=overrides)
    _save_config(ctx, module)
    log.info("reproduce %s (%s, seeds %s) in %s", study, "quick" if quick else "full", checked, out_dir)
    t0 = time.perf_counter()
    with _ray_output(module, out_dir, ray_log):
        output = module.run(ctx)
    wall_s = time.perf_counter() - t0
    if not isinstance(output, StudyOutput):
        raise TypeError(f"{STUDIES[study]}.run: expected a StudyOutput, got {describe(output)}")
    write_outputs(ctx, output, wall_s)
    return out_dir


def _save_config(ctx: Context, module: ModuleType) -> Path:
    """``config.yaml``: how the study was called and the study's resolved configuration."""
    import yaml

    from evgrid.config import experiment_names, merge, parse_overrides, read_yaml

    resolve = getattr(module, "resolved_config", None)
    if callable(resolve):
        study_cfg = resolve(ctx)
    else:
        study_cfg = read_yaml(ctx.study) if ctx.study in experiment_names() else {}
        study_cfg = merge(study_cfg, parse_overrides(ctx.overrides))
    data = {"study": ctx.study, "quick": ctx.quick, "ours": ctx.ours, "seeds": list(ctx.seeds),
            "address": ctx.address, "overrides": list(ctx.overrides), "config": study_cfg}
    path = ctx.out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@contextlib.contextmanager
def _ray_output(module: ModuleType, out_dir: Path, ray_log: bool) -> Iterator[None]:
    if not (ray_log and getattr(module, "USES_RAY", False)):
        yield
        return
    from evgrid.cluster.runtime import ray_output_to

    with ray_output_to(out_dir / "logs" / "ray.log"):
        yield


# ------------------------------------------------------------------------------------------- the outputs


@dataclass(frozen=True)
class Summary:
    """One (metric, method) over seeds: n seeds, mean, sample standard deviation (NaN for n = 1), the paper's
    value, whether the paper's ordering of methods holds on this metric and whether ours is far from it."""

    metric: str
    method: str
    n: int
    mean: float
    spread: float
    paper: float | None
    ordering: bool | None
    far: bool


def metric_labels(rows: list[dict]) -> list[str]:
    """Each row's metric, labelled with the extra columns whose values differ among that metric's rows (e.g.
    ``slvtpr (n_ev=1250)``): rows that differ in them are summarised apart."""
    values: dict[str, dict[str, set]] = {}
    for r in rows:
        for k, v in r.items():
            if k not in KEY_COLUMNS and v is not None:
                values.setdefault(r["metric"], {}).setdefault(k, set()).add(v)
    out = []
    for r in rows:
        split = [f"{k}={r[k]}" for k, vs in values.get(r["metric"], {}).items() if len(vs) > 1 and r.get(k) is not None]
        out.append(r["metric"] + (f" ({', '.join(split)})" if split else ""))
    return out


def summarise(rows: list[dict]) -> list[Summary]:
    """Each (metric, method) of ``rows`` (the metric labelled with the extra columns that tell its rows apart,
    :func:`metric_labels`), metrics in first-seen order and each metric's methods in first-seen order (NaN
    values left out of the mean)."""
    labelled = list(zip(metric_labels(rows), rows))
    metrics = list(dict.fromkeys(label for label, _ in labelled))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups: dict[tuple[str, str], list[dict]] = {}
    for label, r in sorted(labelled, key=lambda lr: (metrics.index(lr[0]), methods.index(lr[1]["method"]))):
        groups.setdefault((label, r["method"]), []).append(r)
    stats = {}
    for key, rs in groups.items():
        v = np.array([r["value"] for r in rs], dtype=float)
        v = v[~np.isnan(v)]
        papers = [r["paper_value"] for r in rs if r.get("paper_value") is not None]
        if len(set(papers)) > 1:
            log.warning("%s / %s: rows give several paper values %s; the first is shown", *key, sorted(set(papers)))
        stats[key] = (int(v.size), float(v.mean()) if v.size else math.nan,
                      float(v.std(ddof=1)) if v.size > 1 else math.nan, papers[0] if papers else None)
    orders = {m: _ordering([(s[3], s[1]) for (mm, _), s in stats.items() if mm == m and s[3] is not None])
              for m, _ in stats}
    out = []
    for (metric, method), (n, mean, spread, paper) in stats.items():
        out.append(Summary(metric, method, n, mean, spread, paper, orders[metric],
                           _far(mean, paper, [s[3] for (m, _), s in stats.items() if m == metric])))
    return out


def _ordering(pairs: list[tuple[float, float]]) -> bool | None:
    """Whether our values order like the paper's, pair by pair (None with fewer than two methods or a NaN)."""
    if len(pairs) < 2 or any(math.isnan(o) for _, o in pairs):
        return None
    p_tol = _EQUAL_RTOL * max(abs(p) for p, _ in pairs) + 1e-12
    o_tol = _EQUAL_RTOL * max(abs(o) for _, o in pairs) + 1e-9
    for i in range(len(pairs)):
        for j in range(i + 1, len(pairs)):
            if _sign(pairs[i][0] - pairs[j][0], p_tol) != _sign(pairs[i][1] - pairs[j][1], o_tol):
                return False
    return True


def _sign(x: float, tol: float) -> int:
    return 0 if abs(x) <= tol else (1 if x > 0 else -1)


def _far(mean: float, paper: float | None, metric_papers: list[float | None]) -> bool:
    """Ours differs from the paper by more than FAR of the paper's value (or in sign); against a paper value of
    0, by more than FAR of the metric's largest paper value."""
    if paper is None or math.isnan(mean):
        return False
    scale = abs(paper) if paper != 0 else max((abs(p) for p in metric_papers if p is not None), default=0.0)
    if scale == 0:
        return False
    return abs(mean - paper) > FAR * scale or (paper != 0 and mean * paper < 0)


def fmt(x: float | None) -> str:
    """A number for the report: thousands separated above 100, three significant digits below."""
    if x is None:
        return ""
    if math.isnan(x):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.1f}"
    return f"{x:.3g}"


def _vs_paper(s: Summary) -> str:
    if s.paper is None or math.isnan(s.mean):
        return ""
    diff = f"{(s.mean - s.paper) / abs(s.paper):+.0%}" if s.paper != 0 else f"{s.mean - s.paper:+.3g} (abs.)"
    return diff + (" — **far from the paper**" if s.far else "")


def table_markdown(rows: list[dict]) -> str:
    """The report's table of ``rows`` (see the module docstring)."""
    lines = ["| metric | method | paper | ours (mean ± spread over seeds, n) | ordering holds? | ours vs paper |",
             "|---|---|---:|---:|:---:|---|"]
    for s in summarise(rows):
        # a spread below a millionth of the mean is solver noise, not a difference between seeds
        spread = 0.0 if s.spread <= 1e-6 * abs(s.mean) else s.spread
        ours = fmt(s.mean) + (f" ± {fmt(spread)}" if s.n > 1 else "") + f" (n={s.n})"
        mark = {True: "✓", False: "✗", None: ""}[s.ordering] if s.paper is not None else ""
        lines.append(f"| {s.metric} | {s.method} | {fmt(s.paper)} | {ours} | {mark} | {_vs_paper(s)} |")
    return "\n".join(lines) + "\n"


def read_table(run_dir: str | os.PathLike[str]) -> str:
    """The report's table from a run directory's ``results.parquet`` (what the CLI prints)."""
    import pyarrow.parquet as pq

    return table_markdown(pq.read_table(Path(run_dir) / "results.parquet").to_pylist())


def write_outputs(ctx: Context, out: StudyOutput, wall_s: float) -> dict[str, Path]:
    """Write ``results.parquet`` and ``report.md`` of ``out`` to ``ctx.out_dir``; returns their paths (and the
    figures', by file stem)."""
    from evgrid.io import write_results

    if not out.rows:
        raise ValueError(f"rows: study {ctx.study} returned no result rows")
    missing = [k for k in KEY_COLUMNS if any(k not in r for r in out.rows)]
    if missing:
        raise ValueError(f"rows: every row needs the columns {', '.join(KEY_COLUMNS)}; {missing[0]!r} is missing "
                         f"(build rows with evgrid.studies.common.row)")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": write_results(out.rows, ctx.out_dir / "results.parquet")}
    report = ctx.out_dir / "report.md"
    report.write_text(report_markdown(ctx, out, wall_s), encoding="utf-8")
    paths["report"] = report
    paths.update({Path(f).stem: Path(f) for f in out.figures})
    log.info("%s: %d result rows, report %s", ctx.study, len(out.rows), report)
    return paths


def command_line(ctx: Context) -> str:
    """The ``evgrid reproduce`` command that makes this run."""
    args = ["evgrid", "reproduce", ctx.study] + (["--quick"] if ctx.quick else []) + (["--ours"] if ctx.ours else [])
    args += ["--out", os.fspath(ctx.out_dir)] + (["--address", ctx.address] if ctx.address else [])
    args += ["--seeds", *map(str, ctx.seeds), *ctx.overrides]
    return shlex.join(args)


def report_markdown(ctx: Context, out: StudyOutput, wall_s: float) -> str:
    """``report.md``: title, command, config, the table, far-off metrics, claims, notes, figures, wall time."""
    module = sys.modules.get(STUDIES.get(ctx.study, ""))
    title = getattr(module, "TITLE", None)
    lines = [f"# Reproduction of {ctx.study}" + (f": {title}" if isinstance(title, str) else ""), "",
             f"Command: `{command_line(ctx)}`  ", f"Budget: {'quick' if ctx.quick else 'full'}, "
             f"seeds {', '.join(map(str, ctx.seeds))}; Ray: {ctx.address or 'embedded'}.", ""]
    if ctx.overrides:
        lines += [f"**A variant, not the study as shipped**: config overrides {', '.join(ctx.overrides)}.", ""]
    cfg = ctx.out_dir / "config.yaml"
    if cfg.is_file():
        lines += ["<details><summary>Resolved config (config.yaml)</summary>", "", "```yaml",
                  cfg.read_text(encoding="utf-8").rstrip(), "```", "</details>", ""]
    lines += ["## Results", "", "ours: mean over seeds ± sample standard deviation over seeds (ddof = 1), n = "
              "seeds (no spread for n = 1); ordering holds?: the paper's order of the methods on that metric "
              "is ours too (values within 0.1 % count as equal); ours vs paper: relative difference.", "",
              table_markdown(out.rows)]
    far = [s for s in summarise(out.rows) if s.far]
    if far:
        lines += [f"**Far from the paper** (more than {FAR:.0%} apart, or of the other sign): "
                  + "; ".join(f"{s.metric} / {s.method} (paper {fmt(s.paper)}, ours {fmt(s.mean)})" for s in far)
                  + ". The notes below say why.", ""]
    mark = {True: "✓", False: "✗", None: "n.a."}
    lines += ["## The paper's claims", ""] + [f"- {mark[c.holds]} {c.text}" for c in out.claims] + [""]
    if out.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in out.notes] + [""]
    if out.figures:
        lines += ["## Figures", ""]
        for f in out.figures:
            rel = os.path.relpath(Path(f).absolute(), ctx.out_dir.absolute())
            lines += [f"![{Path(f).stem}]({Path(rel).as_posix()})", ""]
    lines += [f"Wall time: {wall_s:.1f} s.", ""]
    return "\n".join(lines)
