"""Reference backend: pandapower's AC Newton-Raphson, one ``runpp`` per scenario."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pandapower as pp

from evgrid.grid.feeders import Feeder
from evgrid.grid.flow.base import FlowResult, PowerFlowBackend, nan_result

log = logging.getLogger(__name__)


class PandapowerBackend(PowerFlowBackend):
    """Loops ``pandapower.runpp`` over the batch.

    Works on any feeder, meshed ones included.  The net's own loads and
    static generators are replaced by one load per bus that carries the
    scenario's net injection, so inputs mean exactly what they mean for the
    fast backend.
    """

    name = "pandapower"

    def __init__(self, feeder: Feeder, tolerance_mva: float = 1e-9, max_iteration: int = 30) -> None:
        super().__init__(feeder)
        net = copy.deepcopy(feeder.net)
        for table in ("load", "sgen", "storage"):
            if len(net[table]):
                net[table] = net[table].iloc[0:0]
        for b in feeder.bus_ids:
            pp.create_load(net, bus=int(b), p_mw=0.0, q_mvar=0.0)
        self.net = net
        self.tolerance_mva = tolerance_mva
        self.max_iteration = max_iteration

    def _solve(self, p_kw: np.ndarray, q_kvar: np.ndarray, init: FlowResult | None) -> FlowResult:
        f = self.feeder
        out = nan_result(p_kw.shape[0], f)
        net = self.net
        for b in range(p_kw.shape[0]):
            net.load["p_mw"] = p_kw[b] / 1e3
            net.load["q_mvar"] = q_kvar[b] / 1e3
            try:
                pp.runpp(net, calculate_voltage_angles=True, tolerance_mva=self.tolerance_mva,
                         max_iteration=self.max_iteration, init="flat")
            except pp.LoadflowNotConverged:
                log.debug("pandapower: scenario %d did not converge", b)
                continue
            out["vm_pu"][b] = net.res_bus.vm_pu.loc[f.bus_ids].to_numpy()
            out["va_deg"][b] = net.res_bus.va_degree.loc[f.bus_ids].to_numpy()
            out["line_loading"][b] = net.res_line.loading_percent.loc[f.line_ids].to_numpy() / 100.0
            out["trafo_loading"][b] = net.res_trafo.loading_percent.loc[f.trafo_ids].to_numpy() / 100.0
            out["slack_p_kw"][b] = net.res_ext_grid.p_mw.sum() * 1e3
            out["slack_q_kvar"][b] = net.res_ext_grid.q_mvar.sum() * 1e3
            out["loss_kw"][b] = out["slack_p_kw"][b] - p_kw[b].sum()
            out["converged"][b] = True
            out["iterations"][b] = int(net._ppc["iterations"]) if "iterations" in net._ppc else 0
        return FlowResult(**out)
