"""The benchmark comparators (lightsim2grid, power-grid-model) against pandapower."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from evgrid.grid.flow import PandapowerBackend
from evgrid.grid.flow.external import LightSimRunner, PgmRunner, available
from tests.conftest import feeder

_AVAILABLE = available()
_FEEDERS = ("ieee33", "feeder14", "cigre_mv")  # each runner supports all three

# (solver, runner factory, feeder): every runner on every feeder, plus the
# non-default variants on IEEE 33
_CASES = [pytest.param("lightsim2grid", LightSimRunner, n, id=f"lightsim2grid-{n}") for n in _FEEDERS]
_CASES += [pytest.param("power-grid-model", PgmRunner, n, id=f"power-grid-model-{n}") for n in _FEEDERS]
_CASES += [
    pytest.param("lightsim2grid", functools.partial(LightSimRunner, mode="loop"), "ieee33",
                 id="lightsim2grid-loop-ieee33"),
    pytest.param("power-grid-model", functools.partial(PgmRunner, method="newton_raphson"), "ieee33",
                 id="power-grid-model-newton_raphson-ieee33"),
]

_reference: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _scenarios(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20 scenarios, every bus at uniform [0, 2] x nominal, and pandapower's vm_pu."""
    if name not in _reference:
        f = feeder(name)
        s = np.random.default_rng(20).uniform(0.0, 2.0, (20, f.n_bus))
        p, q = s * f.base_p_kw, s * f.base_q_kvar
        ref = PandapowerBackend(f).solve(p, q)
        assert ref.converged.all()
        _reference[name] = (p, q, ref.vm_pu)
    return _reference[name]


def _need(solver: str) -> None:
    # the [dev] extra installs both solvers: a missing one is a broken set-up, not a reason to skip
    if _AVAILABLE[solver] is not None:
        pytest.fail(f"{solver} does not import ({_AVAILABLE[solver]}); reinstall with pip install -e '.[dev]'")


@pytest.mark.parametrize(("solver", "make", "name"), _CASES)
def test_matches_pandapower_and_is_repeatable(solver, make, name):
    _need(solver)
    f = feeder(name)
    p, q, vm_ref = _scenarios(name)
    runner = make(f)
    runner.prepare(p, q)
    vm = runner.run()
    assert vm.shape == (20, f.n_bus)
    assert np.isfinite(vm).all()
    assert np.abs(vm - vm_ref).max() <= 1e-6
    assert np.array_equal(runner.run(), vm)


@pytest.mark.parametrize(("solver", "make"), [("lightsim2grid", LightSimRunner), ("power-grid-model", PgmRunner)],
                         ids=["lightsim2grid", "power-grid-model"])
def test_non_converged_scenarios_are_nan_rows(solver, make):
    _need(solver)
    f = feeder("ieee33")
    s = np.ones((3, f.n_bus))
    s[1] *= 50.0  # far beyond the feeder's loadability
    runner = make(f)
    runner.prepare(s * f.base_p_kw, s * f.base_q_kvar)
    vm = runner.run()
    assert np.isnan(vm[1]).all()
    assert np.isfinite(vm[[0, 2]]).all()
    assert np.array_equal(vm[0], vm[2])


def test_batch_size_can_change_between_prepares():
    _need("lightsim2grid")
    f = feeder("feeder14")
    p, q, vm_ref = _scenarios("feeder14")
    runner = LightSimRunner(f)
    runner.prepare(p[:3], q[:3])
    assert np.abs(runner.run() - vm_ref[:3]).max() <= 1e-6
    runner.prepare(p, q)
    assert np.abs(runner.run() - vm_ref).max() <= 1e-6


def test_available_reports_every_solver():
    assert set(available()) == {"lightsim2grid", "power-grid-model"}


def test_run_before_prepare_is_an_error():
    _need("power-grid-model")
    with pytest.raises(RuntimeError, match="prepare"):
        PgmRunner(feeder("feeder14")).run()


def _cigre_variant(vn_lv_kv: float):
    """CIGRE MV with off-neutral ratio taps (HV side on one trafo, LV on the
    other), a shunt, and the transformers' LV rating set to ``vn_lv_kv``."""
    import copy

    import pandapower as pp

    from evgrid.grid.feeders import feeder_from_net

    net = copy.deepcopy(feeder("cigre_mv").net)
    net.trafo["tap_side"] = ["hv", "lv"]
    net.trafo["tap_neutral"] = 0
    net.trafo["tap_min"] = -5
    net.trafo["tap_max"] = 5
    net.trafo["tap_pos"] = [2, -3]
    net.trafo["tap_step_percent"] = 2.5
    net.trafo["tap_step_degree"] = 0.0
    net.trafo["tap_changer_type"] = "Ratio"
    net.trafo["vn_lv_kv"] = vn_lv_kv
    pp.create_shunt(net, 5, q_mvar=-0.5, p_mw=0.01, vn_kv=20.0)
    f = feeder_from_net(net, "cigre_mv_variant")
    s = np.random.default_rng(5).uniform(0.0, 2.0, (4, f.n_bus))
    p, q = s * f.base_p_kw, s * f.base_q_kvar
    return f, p, q, PandapowerBackend(f).solve(p, q).vm_pu


def test_transformer_taps_and_shunts_convert_exactly():
    f, p, q, vm_ref = _cigre_variant(20.0)
    for solver, make in (("lightsim2grid", LightSimRunner), ("power-grid-model", PgmRunner)):
        if _AVAILABLE[solver] is not None:
            continue
        runner = make(f)
        runner.prepare(p, q)
        assert np.abs(runner.run() - vm_ref).max() <= 1e-6, solver


def test_transformers_rated_off_bus_voltage():
    """PGM models the rating; lightsim2grid's converter would ignore it, so the runner refuses."""
    f, p, q, vm_ref = _cigre_variant(21.0)
    if _AVAILABLE["power-grid-model"] is None:
        runner = PgmRunner(f)
        runner.prepare(p, q)
        assert np.abs(runner.run() - vm_ref).max() <= 1e-6
    if _AVAILABLE["lightsim2grid"] is None:
        with pytest.raises(NotImplementedError, match="nominal voltages"):
            LightSimRunner(f)
