"""`evgrid reproduce`: the framework (rows, results.parquet, report.md, input checks, the CLI) on synthetic
studies, and seed 003 reproduced for real: its AC replay settles like the distribution layer, the aggregators'
EV power lands on buses without changing a zone's total, and the paper's directions hold on the quick run."""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evgrid import cli
from evgrid.config import ConfigError
from evgrid.studies import common
from evgrid.studies.common import Claim, Context, StudyOutput, row, write_outputs

# ------------------------------------------------------------------------------------------- the framework


def _synthetic_rows() -> list[dict]:
    rows = []
    for seed, (a, b) in enumerate([(1.0, 4.0), (2.0, 6.0), (3.0, 8.0)]):
        rows.append(row("toy", "A", seed, "cost", a, 10.0, n_ev=100))
        rows.append(row("toy", "B", seed, "cost", b, 5.0))
        rows.append(row("toy", "A", seed, "fuel", 7.0, 7.0))
        rows.append(row("toy", "B", seed, "fuel", 7.0, 7.0))
    rows.append(row("toy", "A", 0, "share", 0.5))
    return rows


def _ctx(tmp_path, **kw) -> Context:
    base = dict(study="toy", quick=True, out_dir=tmp_path, address=None, seeds=(0, 1, 2))
    return Context(**{**base, **kw})


def test_row_checks_its_fields_and_keeps_extra_columns():
    r = row("s", "PPO", np.int64(3), "total_reward", np.float32(1.5), None, n_ev=10, participation=0.5)
    assert r == {"study": "s", "method": "PPO", "seed": 3, "metric": "total_reward", "value": 1.5,
                 "paper_value": None, "n_ev": 10, "participation": 0.5}
    assert type(r["seed"]) is int and type(r["value"]) is float
    with pytest.raises(ValueError, match="seed"):
        row("s", "PPO", 1.5, "m", 1.0)
    with pytest.raises(ValueError, match="method"):
        row("s", "", 0, "m", 1.0)
    with pytest.raises(ValueError, match="paper_value of m"):
        row("s", "PPO", 0, "m", 1.0, float("nan"))
    with pytest.raises(ValueError, match="value of m"):
        row("s", "PPO", 0, "m", "high")


def test_results_parquet_schema_dtypes_and_nulls(tmp_path):
    paths = write_outputs(_ctx(tmp_path), StudyOutput(rows=_synthetic_rows()), wall_s=1.0)
    table = pq.read_table(paths["results"])
    assert table.column_names[:6] == ["study", "method", "seed", "metric", "value", "paper_value"]
    assert table.column_names[6:] == ["n_ev"]
    types_ = {f.name: f.type for f in table.schema}
    assert types_ == {"study": pa.string(), "method": pa.string(), "seed": pa.int64(), "metric": pa.string(),
                      "value": pa.float64(), "paper_value": pa.float64(), "n_ev": pa.int64()}
    assert table.schema.field("paper_value").nullable
    d = table.to_pydict()
    share = d["metric"].index("share")
    assert d["paper_value"][share] is None and d["n_ev"][share] is None
    assert d["paper_value"][0] == 10.0 and d["n_ev"][0] == 100
    assert table.schema.field("value").metadata[b"description"] == b"our value"


def test_report_table_mean_spread_ordering_and_far_values(tmp_path):
    out = StudyOutput(rows=_synthetic_rows(), claims=[Claim("A beats B", True), Claim("B beats A", False),
                                                      Claim("unknowable", None)],
                      figures=[tmp_path / "fig.png"], notes=["a note"])
    report = write_outputs(_ctx(tmp_path), out, wall_s=12.34)["report"].read_text(encoding="utf-8")
    head = "| metric | method | paper | ours (mean ± spread over seeds, n) | ordering holds? | ours vs paper |"
    assert head in report
    assert "sample standard deviation" in report
    # A: 1, 2, 3 -> mean 2, sample std 1; B: 4, 6, 8 -> 6 ± 2; the paper has A > B, ours A < B
    assert "| cost | A | 10 | 2 ± 1 (n=3) | ✗ | -80% — **far from the paper** |" in report
    assert "| cost | B | 5 | 6 ± 2 (n=3) | ✗ | +20% |" in report
    # equal in the paper and equal in ours: the ordering holds
    assert "| fuel | A | 7 | 7 ± 0 (n=3) | ✓ | +0% |" in report
    assert "| share | A |  | 0.5 (n=1) |  |  |" in report
    assert "cost / A (paper 10, ours 2)" in report  # said plainly below the table
    assert "- ✓ A beats B" in report and "- ✗ B beats A" in report and "- n.a. unknowable" in report
    assert "- a note" in report and "![fig](fig.png)" in report and "Wall time: 12.3 s." in report
    assert "`evgrid reproduce toy --quick --out" in report and "--seeds 0 1 2`" in report


def test_summaries_in_numbers():
    s = {(x.metric, x.method): x for x in common.summarise(_synthetic_rows())}
    a = s["cost", "A"]
    assert (a.n, a.mean, a.spread, a.paper, a.ordering, a.far) == (3, 2.0, 1.0, 10.0, False, True)
    assert math.isnan(s["share", "A"].spread) and s["share", "A"].ordering is None
    assert common._ordering([(2.0, 1.0), (1.0, 0.5), (0.0, 0.0)]) is True
    assert common._ordering([(2.0, 1.0), (1.0, 1.0005)]) is False  # ours equal within 0.1 %, the paper's not


def test_unknown_study_names_the_allowed_ones(tmp_path):
    names = ", ".join(common.STUDIES)  # seed000, seed001, ...: every registered study
    with pytest.raises(ConfigError, match=f"study: expected one of {names}, got 'seed999'"):
        common.reproduce("seed999", quick=True, out=tmp_path, address=None)


def test_a_missing_study_module_fails_that_study_alone(monkeypatch, tmp_path):
    monkeypatch.setitem(common.STUDIES, "ghost", "evgrid.studies.ghost_not_written")
    with pytest.raises(ConfigError, match="'ghost' is registered but its module evgrid.studies.ghost_not_written"):
        common.reproduce("ghost", quick=True, out=tmp_path, address=None)


def test_bad_seeds_and_a_used_run_directory_fail_before_work(tmp_path):
    for seeds, match in (((1, 1), "distinct"), ((-1,), "integers >= 0"), ((), "one or more")):
        with pytest.raises(ConfigError, match=f"seeds: expected.*{match}"):
            common.check_reproduce("seed003", out=tmp_path, seeds=seeds, address=None)
    (tmp_path / "results.parquet").write_text("")
    with pytest.raises(ConfigError, match="out: .* holds results.parquet"):
        common.check_reproduce("seed003", out=tmp_path, seeds=None, address=None)
    with pytest.raises(ConfigError, match="ours: study 'seed003' has no methods of ours beside the paper's"):
        common.check_reproduce("seed003", out=tmp_path / "new", seeds=None, address=None, ours=True)
    assert common.check_reproduce("seed001", out=tmp_path / "new", seeds=None, address=None, ours=True) == \
        (tmp_path / "new", None)


def test_resume_continues_a_run_directory_of_the_same_study_and_budget_only(tmp_path):
    with pytest.raises(ConfigError, match="resume: continues the run directory given by out; got no out"):
        common.check_reproduce("seed001", out=None, seeds=None, address=None, resume=True)
    with pytest.raises(ConfigError, match="out: .* is not a run directory to resume"):
        common.check_reproduce("seed001", out=tmp_path, seeds=None, address=None, resume=True)
    (tmp_path / "config.yaml").write_text("study: seed001\nquick: true\n", encoding="utf-8")
    (tmp_path / "report.md").write_text("")  # a finished run may be resumed too (it rewrites its outputs)
    with pytest.raises(ConfigError, match=r"holds a run of \('seed001', 'quick'\); resume expected one of "
                                          r"\('seed001', 'full'\)"):
        common.check_reproduce("seed001", out=tmp_path, seeds=None, address=None, resume=True)
    with pytest.raises(ConfigError, match=r"resume expected one of \('seed003', 'quick'\)"):
        common.check_reproduce("seed003", out=tmp_path, seeds=None, address=None, resume=True, quick=True)
    assert common.check_reproduce("seed001", out=tmp_path, seeds=[2], address=None, resume=True,
                                  quick=True) == (tmp_path, (2,))


def test_seed001_resume_keeps_the_agents_the_interrupted_run_finished(tmp_path, monkeypatch):
    """Every (method, seed) trains as its own task, the longest (DQN) first, and lands unpacked in its agent
    directory; an agent saved whole (curve.json beside it) is restored with its curve; one without is trained
    again, and so is everything without ``resume``."""
    import evgrid.agents.rllib.start_time as st
    from evgrid.studies import seed001

    class Fake:
        timesteps, wall_s = 10, 0.1

        def stop(self):
            pass

    trained = []

    def train(algo, *, out_dir, progress, seed, num_env_runners, policy, **kw):
        assert num_env_runners == 0  # the task samples itself: one CPU per training
        trained.append((algo, policy, seed))
        (out_dir / "agent.json").write_text("{}", encoding="utf-8")
        progress(10, 5.0)
        return Fake()

    def in_process(fn, jobs, address):  # Ray's tasks, one after another in this process
        for job in jobs:
            yield job, fn(*job)

    monkeypatch.setattr(st, "train_start_time", train)
    monkeypatch.setattr(seed001, "_as_completed", in_process)
    monkeypatch.setattr(st.StartTimeAgent, "restore", classmethod(
        lambda cls, path: types.SimpleNamespace(restored=path.name, timesteps=10, wall_s=0.1)))
    ctx = Context(study="seed001", quick=True, out_dir=tmp_path, address=None, seeds=(0, 1), ours=True)
    curves: dict = {}
    agents = seed001._train_all(ctx, curves)
    assert sorted(agents) == sorted((m, s) for m in seed001.METHODS for s in (0, 1))
    assert [a for a, _, _ in trained] == ["DQN"] * 4 + ["PPO"] * 4 + ["A2C"] * 4
    assert agents["PPO", 1].restored == "PPO-seed1" and curves["DQN", 0] == [(10, 5.0)]
    assert (tmp_path / "agents" / "A2C_ours-seed1" / "agent.json").is_file()  # unpacked from the task's archive
    (tmp_path / "agents" / "A2C-seed0" / seed001.CURVE_FILE).unlink()  # interrupted before its curve
    trained.clear()
    agents = seed001._train_all(Context(**{**ctx.__dict__, "resume": True}), curves)
    assert trained == [("A2C", "mlp", 0)] and agents["PPO", 0].restored == "PPO-seed0"
    assert curves["PPO", 0] == [(10, 5.0)]
    trained.clear()  # without --ours, the paper's methods alone
    agents = seed001._train_all(Context(**{**ctx.__dict__, "out_dir": tmp_path / "paper", "ours": False}), {})
    assert sorted(agents) == sorted((m, s) for m in ("PPO", "A2C", "DQN") for s in (0, 1))
    assert [a for a, _, _ in trained] == ["DQN"] * 2 + ["PPO"] * 2 + ["A2C"] * 2
    assert {p for _, p, _ in trained} == {"mlp"}


@pytest.fixture
def toy_study(monkeypatch):
    """A registered study ``toy`` whose run records its context."""
    name = "evgrid.studies._toy_for_tests"
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    seen: list[Context] = []

    def run(ctx: Context) -> StudyOutput:
        seen.append(ctx)
        rows = [row("toy", m, s, "cost", 1.0 + s + (m == "after"), 2.0) for s in ctx.seeds for m in ("before", "after")]
        return StudyOutput(rows=rows, claims=[Claim("costs", True)])

    module.run = run
    module.TITLE = "A toy paper"
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(common.STUDIES, "toy", name)
    return seen


def test_reproduce_runs_a_study_into_its_run_directory(toy_study, tmp_path):
    out = common.reproduce("toy", quick=True, out=tmp_path / "run", address=None)
    ctx = toy_study[0]
    assert (ctx.seeds, ctx.quick, ctx.out_dir) == ((0,), True, tmp_path / "run")
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "results.parquet", "report.md"}
    assert "# Reproduction of toy: A toy paper" in (out / "report.md").read_text(encoding="utf-8")
    assert "seeds:\n- 0\n" in (out / "config.yaml").read_text(encoding="utf-8")
    common.reproduce("toy", quick=False, out=tmp_path / "full", address=None, seeds=(4, 7))
    assert toy_study[1].seeds == (4, 7)


def test_a_variant_runs_with_its_overrides_recorded_and_resumes_only_with_the_same(toy_study, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"overrides: study 'toy' runs from its own settings only; got "
                                          r"fleet.n_ev=5 \(studies that take overrides: seed002\)"):
        common.reproduce("toy", quick=True, out=tmp_path / "refused", address=None, overrides=["fleet.n_ev=5"])
    assert not toy_study and not (tmp_path / "refused").exists()  # refused before any work
    checked: list[tuple[str, ...]] = []
    monkeypatch.setattr(sys.modules[common.STUDIES["toy"]], "check_overrides", checked.append, raising=False)
    out = common.reproduce("toy", quick=True, out=tmp_path / "run", address=None, overrides=["fleet.n_ev=5"])
    assert checked == [("fleet.n_ev=5",)] and toy_study[0].overrides == ("fleet.n_ev=5",)
    saved = (out / "config.yaml").read_text(encoding="utf-8")
    assert "overrides:\n- fleet.n_ev=5\n" in saved and "fleet:\n    n_ev: 5\n" in saved
    head = (out / "report.md").read_text(encoding="utf-8").split("## Results")[0]
    assert "--seeds 0 fleet.n_ev=5`" in head and "A variant, not the study as shipped" in head
    for other in ((), ("fleet.n_ev=6",)):
        with pytest.raises(ConfigError, match="overrides: .* holds a run with overrides fleet.n_ev=5; resume got"):
            common.check_reproduce("toy", out=out, seeds=None, address=None, resume=True, quick=True, overrides=other)
    assert common.check_reproduce("toy", out=out, seeds=None, address=None, resume=True, quick=True,
                                  overrides=["fleet.n_ev=5"]) == (out, None)


def test_cli_reproduce_exits_2_on_bad_input_and_prints_the_table(toy_study, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["reproduce", "seed999"], ["reproduce", "seed003", "--seeds", "1", "1"],
                 ["reproduce", "seed003", "fleet.n_ev=5"], ["reproduce", "seed003", "--seeds", "-2"],
                 ["reproduce", "seed003", "--ours"]):
        assert cli.main(argv) == 2, argv
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "report.md").write_text("")
    assert cli.main(["reproduce", "seed003", "--out", "used"]) == 2
    err = capsys.readouterr().err
    assert "seed999" in err and "distinct" in err and "overrides" in err and "holds report.md" in err
    assert "ours: study 'seed003'" in err
    # the parser's study choices are the registry's when it is built: toy's among them
    assert cli.main(["reproduce", "toy", "--quick", "--out", "run"]) == 0
    out = capsys.readouterr().out
    assert "| cost | before | 2 | 1 (n=1) | ✗ | -50% |" in out  # the paper has both equal
    assert "run directory: run" in out and (tmp_path / "run" / "logs" / "reproduce.log").is_file()


def test_progress_goes_to_stderr(capsys):
    assert list(Context("toy", True, Path("."), None, (0,)).progress(range(3), desc="steps")) == [0, 1, 2]
    captured = capsys.readouterr()
    assert captured.out == ""


# ------------------------------------------------------------------------------------------- seed 003


@pytest.fixture(scope="module")
def small_day():
    from evgrid.grid import layers003 as L

    return L.seed003_day(L.Seed003Setting(n_ev=600, seed=1))


def test_seed003_settles_the_plan_like_the_distribution_layer(small_day):
    from evgrid.studies import seed003 as S

    day = small_day
    params = S._params(day)
    ev, der = S.distribution_injections(day, params)
    gen = np.zeros_like(ev)
    np.add.at(gen.T, day.feeder.der_bus, der.T)
    # the plan's bus injections rebuilt from its EV sessions and DER dispatch
    np.testing.assert_allclose(day.horizon.load_p_kw + ev - gen, day.distribution.ed.p_bus_kw, atol=1e-6)
    costs = S.settle(day, day.distribution.ed.tie_kw, der, params)
    for term, value in day.distribution.costs.items():
        assert costs[term] == pytest.approx(value, rel=1e-9, abs=1e-6), term
    rp = S.replay(day, ev, der, params)
    np.testing.assert_allclose(rp.flow.vm_pu, day.distribution.ed.ac.vm_pu, atol=1e-9)
    # AC and model differ by the losses' error only: within 0.1 % of the day's cost
    assert rp.costs["total"] == pytest.approx(day.distribution.costs["total"], rel=1e-3)


def test_seed003_places_the_aggregators_power_within_each_ev_and_zone(small_day):
    from evgrid.grid import layers003 as L
    from evgrid.studies import seed003 as S

    day = small_day
    ev_bus = S.place_zone_evs(day)  # (T, n_bus)
    onehot = np.eye(day.evs.n_zone)[day.zone_of_bus]  # (n_bus, Z)
    np.testing.assert_allclose(ev_bus @ onehot, day.aggregation.zone_ev_after_kw, atol=1e-6)
    before, _ = S.before_injections(day, S._params(day))
    fleet = day.fleet
    x0 = L.uncontrolled_kw(fleet, day.horizon.n_step, day.horizon.dt_h)
    assert before.sum() == pytest.approx(x0.sum())
    # no bus gets more than its plugged chargers could draw or its V2G EVs give
    on = fleet.plugged(day.horizon.n_step)
    cap_ch = np.zeros_like(ev_bus)
    np.add.at(cap_ch.T, fleet.bus, on * fleet.p_ch_max_kw[:, None])
    cap_dis = np.zeros_like(ev_bus)
    np.add.at(cap_dis.T, fleet.bus, on * fleet.p_dis_max_kw[:, None])
    assert (ev_bus <= cap_ch + 1e-6).all() and (ev_bus >= -cap_dis - 1e-6).all()


def test_seed003_quick_reproduction_holds_the_papers_directions(tmp_path):
    """The whole quick pipeline (one seed, 3,000 EVs, about 15 s)."""
    out = common.reproduce("seed003", quick=True, out=tmp_path, address=None)
    rows = pq.read_table(out / "results.parquet").to_pylist()
    v = {(r["method"], r["metric"]): r["value"] for r in rows}
    paper = {(r["method"], r["metric"]): r["paper_value"] for r in rows}
    assert paper["before", "total_cost"] == 11551.88 and paper["after", "peak_shaving_share"] == 0.211
    assert paper["after", "capacity_cost"] is None
    for m in ("before", "after", "after_distribution"):
        for term in ("purchase", "diesel", "curtailment", "carbon", "total", "capacity"):
            assert math.isfinite(v[m, f"{term}_cost"]), (m, term)
    assert v["after", "total_cost"] <= 0.7 * v["before", "total_cost"]  # the issue's: falls by >= 30 % (-33 %)
    assert v["after", "purchase_cost"] < v["before", "purchase_cost"]
    assert v["after", "carbon_cost"] < v["before", "carbon_cost"]
    assert v["after", "curtailment_cost"] < 1.0
    assert v["after", "diesel_cost"] == pytest.approx(v["before", "diesel_cost"], rel=1e-6)
    assert v["after", "peak_shaving_share"] > 0
    assert v["after", "voltage_violations"] <= v["before", "voltage_violations"]
    assert v["after", "n_zone"] >= 5
    # the AC replay of the distribution layer's plan settles within 0.5 % of the plan's own total; the
    # aggregators' day (their own schedule, placed on buses) within 10 %
    assert v["after_distribution", "total_cost"] == pytest.approx(v["after", "total_cost_opf"], rel=5e-3)
    assert v["after", "total_cost"] == pytest.approx(v["after", "total_cost_opf"], rel=0.1)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| total_cost | before | 11,551.9 |" in report and "| total_cost | after | 6,220.8 |" in report
    assert "- ✓ total cost falls" in report
    for name in ("load_curve.png", "voltage.png", "zones.png"):
        assert (out / name).stat().st_size > 10_000 and f"]({name})" in report


@pytest.mark.slow
def test_seed001_quick_reproduction_trains_every_algorithm_and_reports_the_papers_measures(tmp_path):
    """The whole quick pipeline (stage 1, PPO / A2C / DQN as Ray tasks side by side for a few thousand steps
    each, in the paper's setting and in ours (``--ours``), evaluation beside random and greedy, voltages before /
    after; about 2.5 min on 2 cores).  A few thousand steps do not order the algorithms (PPO's policy is still near uniform, its argmax
    a lottery); what the stages must show whatever the budget is checked, and that the off-policy slot-scoring
    DQN has learned."""
    out = common.reproduce("seed001", quick=True, out=tmp_path, address=None, ours=True)
    rows = pq.read_table(out / "results.parquet").to_pylist()
    v = {(r["method"], r["metric"]): r["value"] for r in rows}
    paper = {(r["method"], r["metric"]): r["paper_value"] for r in rows}
    assert paper["PPO", "total_reward"] == 937.0 and paper["PPO", "total_reward_node9"] == 923.1
    assert paper["after", "vm_min_pu_node9"] == 0.973 and paper["A2C", "deviation_avg_mw"] is None
    for m in ("PPO", "A2C", "DQN", "PPO_ours", "A2C_ours", "DQN_ours", "random", "greedy"):
        assert 0 < v[m, "total_reward"] < 1000, m  # a node's total is 1000 only on the optimal profile
        for node in (5, 9, 13):
            assert v[m, f"deviation_max_mw_node{node}"] >= v[m, f"deviation_avg_mw_node{node}"] > 0, (m, node)
    for m in ("PPO", "A2C", "DQN", "PPO_ours", "A2C_ours", "DQN_ours"):
        assert v[m, "train_timesteps"] >= 4000 and v[m, "wall_s"] > 0 and 0 < v[m, "decision_ms"] < 50
    # greedy copies the optimal profile step by step: better than a uniform start
    assert v["greedy", "total_reward"] > v["random", "total_reward"]
    # the slot-scoring DQN learns within the quick budget (822-831 on training seeds 0-2 against random's 717)
    assert v["DQN_ours", "total_reward"] > v["random", "total_reward"] + 50
    # stage 1's optimal profiles raise the night's nadir above charging at plug-in, and PPO's schedule leaves no
    # node lower (the issue's ordering; at this budget PPO's argmax may still start every EV at once, as before)
    assert v["oracle", "vm_min_pu"] > v["before", "vm_min_pu"]
    for node in range(1, 15):
        assert v["after", f"vm_min_pu_node{node}"] >= v["before", f"vm_min_pu_node{node}"] - 1e-9, node
    assert v["oracle", "vm_swing_pu_node4"] < v["before", "vm_swing_pu_node4"]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| total_reward | PPO | 937.0 |" in report
    for name in ("tie_line.png", "station_profiles.png", "training.png", "voltage.png"):
        assert (out / name).stat().st_size > 10_000 and f"]({name})" in report
    assert (out / "agents" / "PPO-seed0" / "agent.json").is_file()
    assert (out / "agents" / "PPO_ours-seed0" / "agent.json").is_file()


@pytest.mark.slow
def test_seed001_at_the_papers_budget_holds_the_issues_orderings(tmp_path):
    """The full study for training seed 0 (PPO, A2C and DQN at the paper's 512,200 steps each, side by side;
    about 11 min on 2 cores): the orderings a quick budget cannot show (PPO's policy is still near uniform, DQN
    below random) hold at the paper's.  The report over seeds 0-2 (README) holds them in every seed; seed 0 has
    the smallest margin of DQN over random (732 against 724)."""
    from evgrid.studies import seed001

    out = common.reproduce("seed001", quick=False, out=tmp_path, address=None, seeds=(0,))
    report = (out / "report.md").read_text(encoding="utf-8")
    for claim in ("total reward PPO > DQN > random", "PPO's mean deviation from the optimal profile is below "
                  "random's", "no node's voltage nadir is lower after scheduling than before"):
        assert f"- ✓ {claim}" in report, claim
    rows = pq.read_table(out / "results.parquet").to_pylist()
    steps = {r["method"]: r["value"] for r in rows if r["metric"] == "train_timesteps"}
    assert steps.keys() == {"PPO", "A2C", "DQN"} and min(steps.values()) >= seed001.PAPER_TIMESTEPS


def test_seed001_claims_read_the_orderings_off_the_rows():
    """The seed 001 report's claims on made-up results: which hold follows the numbers, ours apart from the
    paper's setting, and the nodes whose nadir falls are named."""
    from evgrid.studies import seed001

    reward = {"PPO": 800, "A2C": 850, "DQN": 700, "random": 720, "greedy": 880,
              "PPO_ours": 860, "A2C_ours": 840, "DQN_ours": 780}
    dev = {"PPO": 0.09, "PPO_ours": 0.07, "random": 0.11}
    rows = [row("seed001", m, 0, "total_reward", v) for m, v in reward.items()]
    rows += [row("seed001", m, 0, "deviation_avg_mw", v) for m, v in dev.items()]
    rows += [row("seed001", m, 0, f"vm_min_pu_node{n}", v) for m, n, v in
             (("before", 5, 0.95), ("after", 5, 0.96), ("before", 9, 0.94), ("after", 9, 0.93))]
    rows += [row("seed001", m, 0, metric, 0.9) for m in ("before", "after")
             for metric in ("vm_min_pu", f"vm_swing_pu_node{seed001.SWING_NODE}")]
    rows.append(row("seed001", "PPO", 0, "decision_ms", 0.3))
    claims = seed001._claims(rows)

    def holds(start: str) -> bool | None:
        (c,) = [c for c in claims if c.text.startswith(start)]
        return c.holds

    assert holds("total reward PPO > A2C > DQN > random") is False  # A2C 850 beats PPO, DQN 700 < random
    assert holds("total reward PPO > DQN > random") is False  # DQN 700 < random 720
    assert holds("ours (score observation, slot-scoring networks): PPO > A2C > DQN > random") is True
    assert holds("every trained algorithm beats random") is False
    assert holds("ours: every trained algorithm beats random") is True
    assert holds("PPO's mean deviation from the optimal profile is below random's") is True
    (nadir,) = [c for c in claims if c.text.startswith("no node's voltage nadir")]
    assert nadir.holds is False and "nodes lower: 9)" in nadir.text
    paper_only = seed001._claims([r for r in rows if not r["method"].endswith("_ours")])  # a run without --ours
    assert [c.text for c in paper_only] == [c.text for c in claims if not c.text.startswith("ours")]
    rows = [r if (r["method"], r["metric"]) != ("DQN", "total_reward") else {**r, "value": 750.0} for r in rows]
    (c,) = [c for c in seed001._claims(rows) if c.text.startswith("total reward PPO > DQN > random")]
    assert c.holds is True and "ours 800, 750, 720" in c.text
