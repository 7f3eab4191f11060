"""The field's fast power-flow solvers, driven through their own native APIs.

These runners exist for one purpose: a fair benchmark of evgrid's batched
backends against lightsim2grid and power-grid-model (PGM) on *identical*
scenarios.  Each runner

* builds the solver's model once from the feeder's pandapower net
  (``__init__``, untimed),
* stores a batch of scenarios in the solver's native form (``prepare``,
  untimed),
* solves the whole batch with no pandapower in the loop (``run``, the part to
  time) and returns ``vm_pu[B, n_bus]`` in ``feeder.bus_ids`` order, NaN rows
  for scenarios that did not converge.

Inputs mean what they mean for every evgrid backend (see
:mod:`evgrid.grid.flow.base`): ``p_kw[B, n_bus]``, ``q_kvar[B, n_bus]`` are net
loads per bus (load positive, generation negative) that *replace* the net's
own loads, static generators and storage, exactly as
:class:`evgrid.grid.flow.PandapowerBackend` does.

Both solver packages are imported lazily, so this module imports without them;
:func:`available` says which of them can be used.

Topology handling shared by both runners (:func:`solver_net`): out-of-service
lines and transformers are left out (PGM) or kept out of service
(lightsim2grid); an open line switch is replaced, as pandapower itself does
internally, by an auxiliary bus at that end of the line, so the line's
charging still loads the feeder; closed line and transformer switches are
no-ops, and so are open bus-bus switches; closed bus-bus switches and open
transformer switches are not supported.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import numpy.typing as npt
import pandapower as pp
import pandas as pd

from evgrid.validate import as_batch
from evgrid.grid.feeders import Feeder

log = logging.getLogger(__name__)

_SOLVER_MODULES = {"lightsim2grid": "lightsim2grid", "power-grid-model": "power_grid_model"}


def available() -> dict[str, str | None]:
    """Solver name -> ``None`` if importable, else the import error text."""
    import importlib

    out: dict[str, str | None] = {}
    for name, module in _SOLVER_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken binary wheel (OSError)
            out[name] = f"{type(exc).__name__}: {exc}"
        else:
            out[name] = None
    return out


# ---------------------------------------------------------------------------
# the net as the solvers see it


def solver_net(feeder: Feeder) -> tuple[pp.pandapowerNet, npt.NDArray[np.int64]]:
    """A copy of ``feeder.net`` ready for an external solver.

    * loads, static generators and storage are replaced by one load per feeder
      bus, in ``feeder.bus_ids`` order (load ``i`` sits at ``bus_ids[i]``), all
      at zero until a scenario sets them;
    * switches are resolved and removed: closed line/trafo switches are no-ops,
      an open line switch moves that end of the line onto a new auxiliary bus
      (pandapower's own treatment; a line open at both ends is put out of
      service);
    * bus indices are made contiguous from 0.

    Returns the net and, for each feeder bus, its index in the returned net.
    """
    net = copy.deepcopy(feeder.net)
    for table in ("load", "sgen", "storage"):
        if len(net[table]):
            net[table] = net[table].iloc[0:0]
    _refuse_unsupported_elements(net, feeder.name)
    if len(net.switch):
        _resolve_switches(net, feeder.name)
    if len(net.trafo):
        _normalise_taps(net, feeder.name)
    new_of_old = _contiguous_bus_index(net)
    bus_pos = np.array([new_of_old[int(b)] for b in feeder.bus_ids], dtype=np.int64)
    for b in bus_pos:
        pp.create_load(net, bus=int(b), p_mw=0.0, q_mvar=0.0)
    return net, bus_pos


def _refuse_unsupported_elements(net: pp.pandapowerNet, name: str) -> None:
    """NotImplementedError for in-service elements that neither runner converts."""
    for table in ("trafo3w", "impedance", "ward", "xward", "dcline", "motor", "asymmetric_load",
                  "asymmetric_sgen", "svc", "tcsc", "ssc", "vsc"):
        if table in net and len(net[table]) and net[table].in_service.any():
            raise NotImplementedError(f"feeder {name!r}: in-service {table} elements are not supported "
                                      "by the external solver runners")


def _resolve_switches(net: pp.pandapowerNet, name: str) -> None:
    """Apply the switches to the lines in place and drop them (see :func:`solver_net`)."""
    sw = net.switch
    bad = sw[(sw.et == "b") & sw.closed]
    if len(bad):
        raise NotImplementedError(f"feeder {name!r}: closed bus-bus switches {list(bad.index)} are not "
                                  "supported by the external solver runners")
    bad = sw[(sw.et == "t") & ~sw.closed]
    if len(bad):
        raise NotImplementedError(f"feeder {name!r}: open transformer switches {list(bad.index)} are not "
                                  "supported by the external solver runners")
    opened = sw[(sw.et == "l") & ~sw.closed]
    for line, group in opened.groupby("element"):
        row = net.line.loc[line]
        ends = set(int(b) for b in group.bus)
        if not row.in_service:
            continue
        if ends >= {int(row.from_bus), int(row.to_bus)}:
            net.line.loc[line, "in_service"] = False
            continue
        for bus in ends:
            side = "from_bus" if bus == int(row.from_bus) else "to_bus"
            aux = pp.create_bus(net, vn_kv=float(net.bus.vn_kv.at[bus]), name=f"aux: line {line} open at bus {bus}")
            net.line.loc[line, side] = aux
    net.switch = net.switch.iloc[0:0]


def _normalise_taps(net: pp.pandapowerNet, name: str) -> None:
    """Set untyped tap changers to neutral in place; refuse taps the runners cannot model."""
    tr = net.trafo
    if "tap_dependency_table" in tr and tr.tap_dependency_table.fillna(False).astype(bool).any():
        raise NotImplementedError(f"feeder {name!r}: transformers with tap dependency tables are not "
                                  "supported by the external solver runners")
    kind = tr.tap_changer_type if "tap_changer_type" in tr else pd.Series(None, index=tr.index, dtype=object)
    # pandapower applies a tap only where a tap changer type is given
    net.trafo.loc[kind.isna(), "tap_pos"] = tr.tap_neutral[kind.isna()]
    off = tr.tap_pos.fillna(0.0) != tr.tap_neutral.fillna(0.0)
    bad = tr[off & ~kind.isna() & ~kind.isin(["Ratio", "Symmetrical"])]
    if len(bad):
        raise NotImplementedError(f"feeder {name!r}: transformers {list(bad.index)} sit off their neutral "
                                  f"tap with tap changer type {list(bad.tap_changer_type)}; only 'Ratio' and "
                                  "'Symmetrical' are supported")


def _contiguous_bus_index(net: pp.pandapowerNet) -> dict[int, int]:
    """Renumber the buses 0..n-1 in place; returns each old bus index's new one."""
    if not np.array_equal(net.bus.index.to_numpy(), np.arange(len(net.bus))):
        old = net.bus.index.to_numpy()
        pp.toolbox.create_continuous_bus_index(net, start=0)
        return dict(zip(old.tolist(), range(len(old))))
    return {int(b): int(b) for b in net.bus.index}


def _as_batch(feeder: Feeder, p_kw: npt.ArrayLike, q_kvar: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = as_batch("p_kw", p_kw, feeder.n_bus)
    q = as_batch("q_kvar", q_kvar, feeder.n_bus)
    if q.shape != p.shape:
        raise ValueError(f"q_kvar: expected shape {p.shape} like p_kw, got {q.shape}")
    return p, q


# ---------------------------------------------------------------------------
# lightsim2grid


class LightSimRunner:
    """lightsim2grid: one Newton-Raphson per scenario inside its C++ batch class.

    Model: ``lightsim2grid.network.init_from_pandapower(net, pp_orig_file="pandapower_v2")``
    on :func:`solver_net`'s copy of the net (one load per bus).  The
    ``pandapower_v2`` transformer formulas are the ones that reproduce
    pandapower 3.5's ``runpp`` exactly (``pandapower_v3`` differs by ~3e-4 p.u.
    once a transformer has a magnetising branch).  lightsim2grid's converter
    takes transformer ratios from the *bus* nominal voltages and ignores
    ``vn_hv_kv`` / ``vn_lv_kv``, so a transformer rated off its buses' nominal
    voltages raises ``NotImplementedError`` here instead of giving voltages
    off by the ratio mismatch; it also refuses ``parallel != 1`` elements.

    ``mode="sweep"`` (default, the fastest documented way): one
    ``InjectionSweepCPP(grid)``, loads set for the whole batch with
    ``modify_load_p`` / ``modify_load_q`` ([B, n_load] MW / MVAr), then one
    ``compute(V0, max_iter, tol)`` in C++; every scenario starts from the same
    flat voltage ``V0``, so scenarios are independent (the results do not
    depend on batch order or size).  ``InjectionSweepCPP`` keeps its base case
    (admittance matrix, bus labelling, the symbolic analysis of the Jacobian)
    between ``compute`` calls of the same batch size.

    ``mode="loop"``: the per-scenario GridModel API, for comparison:
    ``change_p_load`` / ``change_q_load`` on every load, then
    ``LSGrid.ac_pf(V0, max_iter, tol)``, scenario by scenario from Python.

    Args:
        feeder: the feeder.
        mode: ``"sweep"`` or ``"loop"``.
        algorithm: a ``lightsim2grid.algorithm.AlgorithmType`` name; default
            the single-slack Newton-Raphson with KLU (``NRSing_KLU``) where
            this build has KLU, else ``NRSing_SparseLU``.
        tolerance_mva: convergence threshold on the largest bus power mismatch,
            MVA (pandapower's criterion; lightsim2grid's ``tol`` is this over
            ``net.sn_mva``).
        max_iteration: Newton-Raphson iterations per scenario.
    """

    name = "lightsim2grid"

    def __init__(self, feeder: Feeder, *, mode: str = "sweep", algorithm: str | None = None,
                 tolerance_mva: float = 1e-9, max_iteration: int = 30,
                 pp_orig_file: str = "pandapower_v2") -> None:
        import warnings

        from lightsim2grid.algorithm import AlgorithmType
        from lightsim2grid.network import init_from_pandapower

        if mode not in ("sweep", "loop"):
            raise ValueError(f"mode: expected 'sweep' or 'loop', got {mode!r}")
        if not tolerance_mva > 0.0:
            raise ValueError(f"tolerance_mva: expected > 0, got {tolerance_mva}")
        self.feeder = feeder
        self.mode = mode
        net, bus_pos = solver_net(feeder)
        _check_lightsim_trafos(net, feeder.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. NaN tap columns "replaced by 0"
            grid = init_from_pandapower(net, pp_orig_file=pp_orig_file)
        if algorithm is None:
            have = set(grid.available_default_algorithms())
            algorithm = "NRSing_KLU" if AlgorithmType.NRSing_KLU in have else "NRSing_SparseLU"
        algo = getattr(AlgorithmType, algorithm)
        grid.change_algorithm(algo)
        self.algorithm = algorithm
        self.grid = grid
        self.bus_pos = bus_pos
        self.n_load = int(len(net.load))
        self.tol_pu = float(tolerance_mva) / float(net.sn_mva)
        self.max_iteration = int(max_iteration)
        eg = net.ext_grid[net.ext_grid.in_service].iloc[0]
        # flat start: every bus at 1 p.u., the slack at its set point
        v0 = np.ones(grid.total_bus(), dtype=np.complex128)
        v0[int(eg.bus)] = float(eg.vm_pu) * np.exp(1j * math.radians(float(eg.va_degree)))
        self.v0 = v0
        self._sweep = None
        if mode == "sweep":
            from lightsim2grid.lightsim2grid_cpp import InjectionSweepCPP

            sweep = InjectionSweepCPP(grid)
            sweep.change_algorithm(algo)
            sweep.nb_thread = 1
            self._sweep = sweep
        self._p_mw: np.ndarray | None = None
        self._q_mvar: np.ndarray | None = None
        log.debug("lightsim2grid runner for %s: %d buses (%d in the model), %s, %s, tol %.1e p.u.",
                  feeder.name, feeder.n_bus, grid.total_bus(), mode, algorithm, self.tol_pu)

    def prepare(self, p_kw: npt.ArrayLike, q_kvar: npt.ArrayLike) -> None:
        """Store the batch as [B, n_load] MW / MVAr (untimed)."""
        p, q = _as_batch(self.feeder, p_kw, q_kvar)
        if self._sweep is not None and self._p_mw is not None and self._p_mw.shape[0] != p.shape[0]:
            # the batch size is fixed by the first modify_* call; clear() also
            # drops the kept base case, which the next compute() rebuilds
            self._sweep.clear()
        self._p_mw = p / 1e3
        self._q_mvar = q / 1e3
        if self._sweep is not None:
            self._sweep.modify_load_p(self._p_mw)
            self._sweep.modify_load_q(self._q_mvar)

    def run(self) -> np.ndarray:
        """Solve every prepared scenario; ``vm_pu[B, n_bus]``, NaN rows where not converged."""
        if self._p_mw is None:
            raise RuntimeError("run: call prepare(p_kw, q_kvar) first")
        if self._sweep is not None:
            self._sweep.compute(self.v0, self.max_iteration, self.tol_pu)
            vm = np.abs(self._sweep.get_voltages()[:, self.bus_pos])
            ok = np.asarray(self._sweep.converged_mask(), dtype=bool)
            vm[~ok] = np.nan
            return vm
        grid = self.grid
        p, q = self._p_mw, self._q_mvar
        n_load = self.n_load
        out = np.full((p.shape[0], self.feeder.n_bus), np.nan)
        for b in range(p.shape[0]):
            pb, qb = p[b], q[b]
            for i in range(n_load):
                grid.change_p_load(i, pb[i])
                grid.change_q_load(i, qb[i])
            v = grid.ac_pf(self.v0.copy(), self.max_iteration, self.tol_pu)
            if v.shape[0]:
                out[b] = np.abs(v[self.bus_pos])
        return out


def _check_lightsim_trafos(net: pp.pandapowerNet, name: str) -> None:
    tr = net.trafo[net.trafo.in_service]
    if not len(tr):
        return
    vn_hv = net.bus.vn_kv.loc[tr.hv_bus].to_numpy(dtype=float)
    vn_lv = net.bus.vn_kv.loc[tr.lv_bus].to_numpy(dtype=float)
    off = ~(np.isclose(tr.vn_hv_kv.to_numpy(dtype=float), vn_hv, rtol=1e-12, atol=0.0)
            & np.isclose(tr.vn_lv_kv.to_numpy(dtype=float), vn_lv, rtol=1e-12, atol=0.0))
    if off.any():
        raise NotImplementedError(
            f"feeder {name!r}: transformers {list(tr.index[off])} are rated off their buses' nominal voltages; "
            "lightsim2grid's pandapower converter ignores vn_hv_kv / vn_lv_kv and would solve a different grid")


# ---------------------------------------------------------------------------
# power-grid-model


class PgmRunner:
    """power-grid-model: one batch ``calculate_power_flow`` call.

    The PGM model (node, line, transformer, source, one ``sym_load`` per feeder
    bus) is converted from the pandapower tables by :func:`pgm_input_data`
    (power-grid-model ships no pandapower converter; that lives in the separate
    power-grid-model-io package).  ``prepare`` builds the batch update dataset,
    a row-based ``sym_load`` update array of shape [B, n_bus] (``id``,
    ``p_specified`` in W, ``q_specified`` in var; a few per cent faster than
    the columnar form); it updates no status, so PGM treats the batch as one
    topology and caches it (for ``iterative_current`` that includes the
    factorised admittance matrix).  ``run`` is one
    ``PowerGridModel.calculate_power_flow(update_data=..., symmetric=True,
    calculation_method=..., error_tolerance=..., threading=...,
    output_component_types={"node": ["u_pu"]}, continue_on_batch_error=True)``.

    Args:
        feeder: the feeder.
        method: ``"iterative_current"`` (default: the fastest on our feeders
            for batches, ~20 % less time per scenario than Newton-Raphson on
            IEEE 33 at B >= 64, as the admittance matrix is factorised once
            per batch) or ``"newton_raphson"`` (more robust near voltage
            collapse), or any other ``CalculationMethod`` name.
        error_tolerance: PGM's stopping criterion, the largest voltage update
            of an iteration in p.u.; default 1e-8 for Newton-Raphson (quadratic
            convergence: the voltages then agree with pandapower to ~1e-9) and
            1e-10 for the linearly converging iterative current method (1e-8
            leaves ~6e-9 p.u. on IEEE 33 at twice nominal load; 1e-10 matches
            Newton-Raphson's accuracy for ~10 % more time).
        max_iterations: iterations per scenario; default 100 for the iterative
            current method (IEEE 33 at 2-3x nominal load needs 20-30 at 1e-10),
            30 otherwise.
        threading: PGM's batch threading: ``-1`` sequential in the calling
            thread (default; one core), ``0`` all hardware threads, ``n > 0``
            ``n`` worker threads.
        source_sk_va: short-circuit power of the PGM source.  pandapower's
            ext_grid is an ideal voltage source in a power flow; PGM's source
            has an internal impedance ``u_rated**2 / sk`` (PGM's default
            ``sk`` of 1e10 VA costs 3e-4 p.u. on IEEE 33 at nominal load, 1e15
            still 3e-9), so we make it stiff.
    """

    name = "power-grid-model"

    def __init__(self, feeder: Feeder, *, method: str = "iterative_current", error_tolerance: float | None = None,
                 max_iterations: int | None = None, threading: int = -1, source_sk_va: float = 1e20) -> None:
        from power_grid_model import CalculationMethod, PowerGridModel
        from power_grid_model.validation import assert_valid_input_data

        self.feeder = feeder
        self.method = CalculationMethod[method]
        if error_tolerance is None:
            error_tolerance = 1e-10 if self.method == CalculationMethod.iterative_current else 1e-8
        if not error_tolerance > 0.0:
            raise ValueError(f"error_tolerance: expected > 0, got {error_tolerance}")
        self.error_tolerance = float(error_tolerance)
        if max_iterations is None:
            max_iterations = 100 if self.method == CalculationMethod.iterative_current else 30
        if max_iterations < 1:
            raise ValueError(f"max_iterations: expected >= 1, got {max_iterations}")
        self.max_iterations = int(max_iterations)
        self.threading = int(threading)
        net, bus_pos = solver_net(feeder)
        input_data, node_of_bus, load_ids = pgm_input_data(net, bus_pos, source_sk_va=source_sk_va)
        assert_valid_input_data(input_data, symmetric=True)
        self.input_data = input_data
        self.model = PowerGridModel(input_data, system_frequency=float(net.f_hz))
        self.node_of_bus = node_of_bus  # (n_bus,) row of each feeder bus in PGM's node output
        self.load_ids = load_ids
        self._update: dict | None = None
        log.debug("power-grid-model runner for %s: %d nodes, %s, tol %.1e, threading %d", feeder.name,
                  len(input_data["node"]), method, self.error_tolerance, self.threading)

    def prepare(self, p_kw: npt.ArrayLike, q_kvar: npt.ArrayLike) -> None:
        """Build the batch update dataset (untimed)."""
        from power_grid_model import ComponentType, DatasetType, initialize_array

        p, q = _as_batch(self.feeder, p_kw, q_kvar)
        upd = initialize_array(DatasetType.update, ComponentType.sym_load, p.shape)
        upd["id"] = self.load_ids
        upd["p_specified"] = p * 1e3  # W
        upd["q_specified"] = q * 1e3  # var
        self._update = {ComponentType.sym_load: upd}

    def run(self) -> np.ndarray:
        """Solve every prepared scenario; ``vm_pu[B, n_bus]``, NaN rows where not converged."""
        if self._update is None:
            raise RuntimeError("run: call prepare(p_kw, q_kvar) first")
        res = self.model.calculate_power_flow(
            update_data=self._update, symmetric=True, calculation_method=self.method,
            error_tolerance=self.error_tolerance, max_iterations=self.max_iterations, threading=self.threading,
            output_component_types={"node": ["u_pu"]}, continue_on_batch_error=True)
        vm = res["node"]["u_pu"][:, self.node_of_bus]
        err = self.model.batch_error
        if err is not None:
            vm[np.asarray(err.failed_scenarios, dtype=np.int64)] = np.nan
            log.debug("power-grid-model: %d scenarios failed: %s", len(err.failed_scenarios),
                      err.error_messages[:1])
        return vm


def pgm_input_data(net: pp.pandapowerNet, bus_pos: npt.NDArray[np.int64], *,
                   source_sk_va: float = 1e20) -> tuple[dict, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """PGM input dataset for a :func:`solver_net` net (SI units: V, W, var, ohm, F).

    Converts in-service buses (``node``), lines (``line``: ``r1``, ``x1`` in ohm,
    ``c1`` in F, ``tan1 = g / (omega c)``, parallel lines combined),
    two-winding transformers (``transformer``: ``uk = vk_percent / 100``,
    ``pk = vkr_percent / 100 * sn``, clock from ``shift_degree``, ratio taps on
    either side; no magnetising branch: PGM's transformer and pandapower's T
    model then differ by ~1e-5 p.u.), shunts (``g1``, ``b1`` in S), the one
    ext_grid (``source``) and one ``sym_load`` per feeder bus;
    :func:`solver_net` has already refused other in-service element types.
    Raises ``NotImplementedError`` for what does not convert exactly.

    Returns the dataset, the row in the node table of each feeder bus, and the
    ``sym_load`` ids in feeder bus order.
    """
    from power_grid_model import ComponentType

    ids = _PgmIds()
    node, node_id, row_of_bus = _pgm_nodes(net, ids)
    line = _pgm_lines(net, ids, node_id)
    trafo = _pgm_transformers(net, ids, node_id)
    shunt = _pgm_shunts(net, ids, node_id)
    source = _pgm_source(net, ids, node_id, source_sk_va)
    sym_load = _pgm_loads(net, ids, node_id, bus_pos)
    data = {ComponentType.node: node, ComponentType.line: line, ComponentType.source: source,
            ComponentType.sym_load: sym_load}
    if len(trafo):
        data[ComponentType.transformer] = trafo
    if len(shunt):
        data[ComponentType.shunt] = shunt
    missing = [int(b) for b in bus_pos if int(b) not in row_of_bus]
    if missing:
        raise NotImplementedError(f"out-of-service feeder buses {missing} (solver net indices)")
    node_of_bus = np.array([row_of_bus[int(b)] for b in bus_pos], dtype=np.int64)
    return data, node_of_bus, sym_load["id"].astype(np.int32)


class _PgmIds:
    """Consecutive ids for PGM components: all components of a dataset share one id space."""

    def __init__(self) -> None:
        self.next_id = 0

    def __call__(self, n: int) -> np.ndarray:
        out = np.arange(self.next_id, self.next_id + n, dtype=np.int32)
        self.next_id += n
        return out


def _pgm_input_array(component: str, n: int) -> np.ndarray:
    """An empty PGM input array of ``n`` rows of ``component`` (a ``ComponentType`` name)."""
    from power_grid_model import ComponentType, DatasetType, initialize_array

    return initialize_array(DatasetType.input, ComponentType[component], n)


def _pgm_node_ids(node_id: dict[int, int], buses) -> np.ndarray:
    """PGM node ids of the solver-net ``buses`` an in-service element connects to."""
    try:
        return np.array([node_id[int(x)] for x in buses], dtype=np.int32)
    except KeyError as exc:
        raise NotImplementedError(f"an in-service element is connected to out-of-service bus {exc}") from None


def _pgm_nodes(net: pp.pandapowerNet, ids: _PgmIds) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    """In-service buses: the ``node`` array, each bus's node id and its row in that array."""
    buses = net.bus[net.bus.in_service]
    node = _pgm_input_array("node", len(buses))
    node["id"] = ids(len(buses))
    node["u_rated"] = buses.vn_kv.to_numpy() * 1e3
    node_id = dict(zip(buses.index.tolist(), node["id"].tolist()))
    row_of_bus = dict(zip(buses.index.tolist(), range(len(buses))))
    return node, node_id, row_of_bus


def _pgm_lines(net: pp.pandapowerNet, ids: _PgmIds, node_id: dict[int, int]) -> np.ndarray:
    lines = net.line[net.line.in_service]
    line = _pgm_input_array("line", len(lines))
    if not len(lines):
        return line
    km = lines.length_km.to_numpy(dtype=float)
    par = lines.parallel.to_numpy(dtype=float)
    c_f = lines.c_nf_per_km.to_numpy(dtype=float) * 1e-9 * km * par
    g_s = lines.g_us_per_km.to_numpy(dtype=float) * 1e-6 * km * par
    if np.any((g_s > 0) & (c_f <= 0)):
        raise NotImplementedError("lines with conductance g_us_per_km but no capacitance")
    line["id"] = ids(len(lines))
    line["from_node"] = _pgm_node_ids(node_id, lines.from_bus)
    line["to_node"] = _pgm_node_ids(node_id, lines.to_bus)
    line["from_status"] = 1
    line["to_status"] = 1
    line["r1"] = lines.r_ohm_per_km.to_numpy(dtype=float) * km / par
    line["x1"] = lines.x_ohm_per_km.to_numpy(dtype=float) * km / par
    line["c1"] = c_f
    line["tan1"] = np.divide(g_s, 2.0 * math.pi * float(net.f_hz) * c_f, out=np.zeros_like(c_f), where=c_f > 0)
    return line


def _pgm_transformers(net: pp.pandapowerNet, ids: _PgmIds, node_id: dict[int, int]) -> np.ndarray:
    from power_grid_model import WindingType

    trafos = net.trafo[net.trafo.in_service]
    trafo = _pgm_input_array("transformer", len(trafos))
    if not len(trafos):
        return trafo
    if np.any(trafos.i0_percent.fillna(0.0).to_numpy() != 0) or np.any(trafos.pfe_kw.fillna(0.0).to_numpy() != 0):
        raise NotImplementedError("transformers with a magnetising branch (i0_percent, pfe_kw != 0): pandapower's "
                                  "T model and PGM's transformer model differ")
    tap_nom, tap_pos, tap_step, tap_lv = _pgm_taps(trafos)
    shift = trafos.shift_degree.fillna(0.0).to_numpy(dtype=float)
    clock = np.round(shift / 30.0).astype(int) % 12
    if np.any(np.abs(shift - 30.0 * np.round(shift / 30.0)) > 1e-9):
        raise NotImplementedError("transformer phase shifts that are not a multiple of 30 degrees")
    par = trafos.parallel.to_numpy(dtype=float)
    sn_va = trafos.sn_mva.to_numpy(dtype=float) * 1e6 * par
    trafo["id"] = ids(len(trafos))
    trafo["from_node"] = _pgm_node_ids(node_id, trafos.hv_bus)
    trafo["to_node"] = _pgm_node_ids(node_id, trafos.lv_bus)
    trafo["from_status"] = 1
    trafo["to_status"] = 1
    trafo["u1"] = trafos.vn_hv_kv.to_numpy(dtype=float) * 1e3
    trafo["u2"] = trafos.vn_lv_kv.to_numpy(dtype=float) * 1e3
    trafo["sn"] = sn_va
    trafo["uk"] = trafos.vk_percent.to_numpy(dtype=float) / 100.0
    trafo["pk"] = trafos.vkr_percent.to_numpy(dtype=float) / 100.0 * sn_va
    trafo["i0"] = 0.0
    trafo["p0"] = 0.0
    # an odd clock needs one delta winding; the winding types only matter
    # for asymmetric and short-circuit calculations
    trafo["winding_from"] = np.where(clock % 2 == 1, WindingType.delta, WindingType.wye_n)
    trafo["winding_to"] = WindingType.wye_n
    trafo["clock"] = clock
    # pandapower: the tap-side rated voltage times 1 + (pos - neutral) * step%;
    # PGM: u1 (tap_side 0, from = hv) or u2 (1) plus (tap_pos - tap_nom) * tap_size
    trafo["tap_side"] = np.where(tap_lv, 1, 0)
    trafo["tap_pos"] = tap_pos
    trafo["tap_nom"] = tap_nom
    trafo["tap_min"] = np.minimum(trafos.tap_min.fillna(0.0).to_numpy(), np.minimum(tap_pos, tap_nom))
    trafo["tap_max"] = np.maximum(trafos.tap_max.fillna(0.0).to_numpy(), np.maximum(tap_pos, tap_nom))
    trafo["tap_size"] = tap_step / 100.0 * np.where(tap_lv, trafo["u2"], trafo["u1"])
    return trafo


def _pgm_taps(trafos: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tap changers as PGM takes them: neutral and actual positions, step [%], tap on the LV side.

    Raises ``NotImplementedError`` for fractional positions and for a
    phase-shifting tap changer that sits off neutral.
    """
    tap_nom = trafos.tap_neutral.fillna(0.0).to_numpy()
    tap_pos = trafos.tap_pos.fillna(pd.Series(tap_nom, index=trafos.index)).to_numpy()
    tap_step = trafos.tap_step_percent.fillna(0.0).to_numpy(dtype=float)
    if np.any(tap_pos != np.round(tap_pos)) or np.any(tap_nom != np.round(tap_nom)):
        raise NotImplementedError("transformer tap positions must be integers")
    step_deg = trafos.tap_step_degree.fillna(0.0).to_numpy() if "tap_step_degree" in trafos else 0.0 * tap_nom
    if np.any(step_deg[tap_pos != tap_nom] != 0):
        raise NotImplementedError("phase-shifting tap changers are not converted")
    tap_lv = (trafos.tap_side == "lv").to_numpy()
    return tap_nom, tap_pos, tap_step, tap_lv


def _pgm_shunts(net: pp.pandapowerNet, ids: _PgmIds, node_id: dict[int, int]) -> np.ndarray:
    shunts = net.shunt[net.shunt.in_service] if len(net.shunt) else net.shunt
    shunt = _pgm_input_array("shunt", len(shunts))
    if not len(shunts):
        return shunt
    # pandapower: p_mw, q_mvar drawn at vn_kv (per step); PGM: admittance in S
    vn2 = (shunts.vn_kv.to_numpy(dtype=float)) ** 2
    step = shunts.step.to_numpy(dtype=float)
    shunt["id"] = ids(len(shunts))
    shunt["node"] = _pgm_node_ids(node_id, shunts.bus)
    shunt["status"] = 1
    shunt["g1"] = shunts.p_mw.to_numpy(dtype=float) * step / vn2
    shunt["b1"] = -shunts.q_mvar.to_numpy(dtype=float) * step / vn2
    return shunt


def _pgm_source(net: pp.pandapowerNet, ids: _PgmIds, node_id: dict[int, int], source_sk_va: float) -> np.ndarray:
    egs = net.ext_grid[net.ext_grid.in_service]
    if len(egs) != 1:
        raise NotImplementedError(f"expected one in-service ext_grid, found {len(egs)}")
    source = _pgm_input_array("source", 1)
    source["id"] = ids(1)
    source["node"] = _pgm_node_ids(node_id, egs.bus)
    source["status"] = 1
    source["u_ref"] = float(egs.vm_pu.iloc[0])
    source["u_ref_angle"] = math.radians(float(egs.va_degree.iloc[0]))
    source["sk"] = float(source_sk_va)
    source["rx_ratio"] = 0.1
    source["z01_ratio"] = 1.0
    return source


def _pgm_loads(net: pp.pandapowerNet, ids: _PgmIds, node_id: dict[int, int],
               bus_pos: npt.NDArray[np.int64]) -> np.ndarray:
    """One constant-power ``sym_load`` per feeder bus, at zero until a scenario sets it."""
    from power_grid_model import LoadGenType

    loads = net.load
    sym_load = _pgm_input_array("sym_load", len(loads))
    sym_load["id"] = ids(len(loads))
    sym_load["node"] = _pgm_node_ids(node_id, loads.bus)
    sym_load["status"] = 1
    sym_load["type"] = LoadGenType.const_power
    sym_load["p_specified"] = 0.0
    sym_load["q_specified"] = 0.0
    if not np.array_equal(loads.bus.to_numpy(dtype=np.int64), bus_pos):
        raise AssertionError("solver_net must create one load per feeder bus, in feeder bus order")
    return sym_load
