"""Observations of every level, built from the simulator's state and its last :class:`StepRecord`.

Column order is the declarations' (:mod:`evgrid.envs.views.features`): each builder computes its
features by name and stacks them in declared order; the EV features come from one compiled pass over
the EVs shown, writing each quantity into its declared column.
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np
import numpy.typing as npt

from evgrid.envs import fleet as fl
from evgrid.envs import stations as st
from evgrid.envs import storage as sg
from evgrid.envs.sim import Sim
from evgrid.envs.state import StepRecord
from evgrid.envs.views.features import EV, STATION, STATION_CONTEXT, operator_features
from evgrid.envs.views.rewards import share_deviation
from evgrid.grid.profiles import VALLEY

# the EV kernel's quantities, in the order it computes them; each goes to its declared column of EV
_EV_KERNEL = ("soc", "soc_target", "need_share", "hours_left_per_day", "p_ch_max_per_50kw", "p_dis_max_per_50kw",
              "v2g", "price_now", "price_next", "bus_vm_pu", "laxity", "uninterruptible_on", "valley")


class Observer:
    """Observations of the live agents of ``sim``'s environments; ``ops``, ``stns``: the operator and station
    agent ids (empty where the level runs its rule); ``view``: the EV view."""

    def __init__(self, sim: Sim, ops: list[str], stns: list[str], view: str) -> None:
        lay = sim.layout
        self.sim, self.ops, self.stns, self.view = sim, ops, stns, view
        sc = sim.cfg.stations
        self._ports_zone = np.maximum(np.bincount(lay.station_zone, minlength=lay.n_zone) * sc.ports, 1)
        # buses grouped by zone, for one minimum.reduceat over them (every zone has buses)
        self._zone_bus_order = np.argsort(lay.zone_of_bus, kind="stable")
        self._zone_bus_starts = np.searchsorted(lay.zone_of_bus[self._zone_bus_order], np.arange(lay.n_zone))
        self._station_in_zone = np.eye(lay.n_zone)[lay.station_zone]  # (M, Z): a station's zone, one-hot
        self._zone_der_kw = {kind: lay.zone_der_kw(kind) for kind in ("pv", "wind")}
        t = sim.cfg.market.tariff
        self._tariff = np.array([t.valley_price_per_kwh, t.offpeak_price_per_kwh, t.peak_price_per_kwh])
        self._ev_cols = np.array([EV.index(name) for name in _EV_KERNEL], dtype=np.int64)
        self._op_names = operator_features(lay.storage.n > 0).names

    def __call__(self, rec: StepRecord | None, agents: list[list[str]], slot_owner: npt.NDArray[np.int64] | None,
                 left: npt.NDArray[np.int64] | None = None) -> list[dict[str, Any]]:
        """Observations of ``agents`` (per environment) after the step ``rec`` (None: right after a reset);
        ``slot_owner``: the grouped view's (E * M, slots) sessions; ``left``: sessions that left in the last
        step, whose EVs are still shown (an individual EV's last observation)."""
        if not any(agents):
            return [{} for _ in agents]
        sim = self.sim
        n_env, n_st = sim.n_env, sim.layout.n_station
        out: list[dict[str, Any]] = [{} for _ in range(n_env)]
        vm = rec.vm_pu if rec is not None else np.ones((n_env, sim.layout.n_bus))  # (E, n_bus)
        idx = sim.plugged()
        stn = sim.fleet.station[idx]
        # plugged EVs per station, (E * M,): operators sum them over their zone; stations and grouped EVs see
        # their own.  The missing energy only for the levels that observe it
        plugged = np.bincount(stn, minlength=n_env * n_st).astype(float)
        need = sim.need_kwh(idx) if self.ops or self.stns else None
        if self.ops:
            feats = self._operator(rec, vm, plugged, np.bincount(stn, need, n_env * n_st))  # (E, Z, F)
            for e in range(n_env):
                out[e].update(zip(self.ops, feats[e]))
        ctx = self._station_context(rec, vm, plugged) if self.stns or self.view == "grouped" else None
        if self.stns:
            own = {**ctx, **self._station_network(rec)}
            flat = np.column_stack([self._counts(idx, stn, need), *(own[n] for n in STATION.names)])
            flat = flat.astype(np.float32)
            for e in range(n_env):
                out[e].update(zip(self.stns, flat[e * n_st:(e + 1) * n_st]))
        if self.view == "individual":
            self._individual(out, agents, idx, left, vm)
        elif self.view == "grouped":
            self._grouped(out, slot_owner, np.column_stack([ctx[n] for n in STATION_CONTEXT.names]), vm)
        return [{a: o[a] for a in ag} for o, ag in zip(out, agents)]

    def _clock(self) -> dict[str, Any]:
        """Period one-hot, clock and time left: what several levels see alike."""
        sim = self.sim
        t = min(sim.t, sim.n_steps - 1)
        angle = 2 * np.pi * sim.day.clock_h[t] / 24
        period = np.eye(3)[sim.day.period[t]]
        return dict(valley=period[0], offpeak=period[1], peak=period[2], clock_sin=np.sin(angle),
                    clock_cos=np.cos(angle), time_left=(sim.n_steps - sim.t) / sim.n_steps)

    def _operator(self, rec: StepRecord | None, vm, plugged_st, need_st) -> np.ndarray:
        """(E, Z, len(operator_features)); ``plugged_st``, ``need_st``: plugged EVs and their missing kWh per
        station."""
        sim, lay = self.sim, self.sim.layout
        n_env, n_zone = sim.n_env, lay.n_zone
        t = min(sim.t, sim.n_steps - 1)
        nom = lay.zone_nominal_kw
        vmin = np.minimum.reduceat(vm[:, self._zone_bus_order], self._zone_bus_starts, axis=1)
        ones = np.ones((n_env, n_zone))
        f = {name: ones * v for name, v in self._clock().items()}
        f.update(
            zone_load_pu=rec.zone_load_kw / nom if rec is not None else np.zeros((n_env, n_zone)),
            zone_pv_pu=sim.day.pv_pu[:, t, None] * self._zone_der_kw["pv"] / nom,
            zone_wind_pu=sim.day.wind_pu[:, t, None] * self._zone_der_kw["wind"] / nom,
            multiplier_now=sim.prices.current, multiplier_next=sim.prices.next,
            zone_v_min_pu=np.where(np.isnan(vmin), 0.0, vmin),  # a bus without a solution (collapse) shows as 0
            plugged_share=plugged_st.reshape(n_env, -1) @ self._station_in_zone / self._ports_zone,
            need_h=need_st.reshape(n_env, -1) @ self._station_in_zone / nom)
        if lay.storage.n:
            f.update(self._storage())
        return np.stack([f[name] for name in self._op_names], axis=-1).astype(np.float32)

    def _storage(self) -> dict[str, np.ndarray]:
        """The zones' storage features (E, Z): stored energy and available power over capacity and rating."""
        sim, units = self.sim, self.sim.layout.storage
        soc, n_zone = sim.fleet.storage_soc, sim.layout.n_zone
        p_ch, p_dis = sg.limits_kw(units, soc, sim.dt_h)

        def share(x: np.ndarray, of: np.ndarray) -> np.ndarray:  # zone sums of x over zone sums of ``of``
            whole = units.by_zone(np.broadcast_to(of, soc.shape), n_zone)
            return np.divide(units.by_zone(x, n_zone), whole, out=np.zeros_like(whole), where=whole > 0)

        return dict(storage_soc=share(soc * units.e_kwh, units.e_kwh), storage_charge_av=share(p_ch, units.p_max_kw),
                    storage_discharge_av=share(p_dis, units.p_max_kw))

    def _station_context(self, rec: StepRecord | None, vm, plugged_st) -> dict[str, np.ndarray]:
        """The STATION_CONTEXT features by name, (E * M,) each, in global station order."""
        sim, lay = self.sim, self.sim.layout
        sc = sim.cfg.stations
        n = sim.n_env * lay.n_station
        load = np.zeros(n)
        if rec is not None:
            load = np.bincount(rec.ev_station, np.maximum(rec.p_ev_kw, 0.0), n) / sc.p_max_kw
        f = {name: np.full(n, v) for name, v in self._clock().items()}
        # a station sees its own zone's tariff period (per-zone periods with market.tou_basis: base_load)
        period = np.eye(3)[sim.zone_period[:, min(sim.t, sim.n_steps - 1)][:, lay.station_zone].ravel()]
        f.update(valley=period[:, 0], offpeak=period[:, 1], peak=period[:, 2])
        f.update(bus_vm_pu=vm[:, lay.station_bus].ravel(), price_now=sim.retail_price()[:, lay.station_zone].ravel(),
                 load_share=load, plugged_share=plugged_st / sc.ports)
        return f

    def _station_network(self, rec: StepRecord | None) -> dict[str, np.ndarray]:
        """A station's network's share deviations (E * M,) each: of the base load now (eq 16) and of the whole
        load of the last step (the base load's before the first)."""
        sim, lay = self.sim, self.sim.layout
        base_dev = share_deviation(sim.base_zone_load_kw()[:, min(sim.t, sim.n_steps - 1)], lay.zone_nominal_kw)
        load_dev = share_deviation(rec.zone_load_kw, lay.zone_nominal_kw) if rec is not None else base_dev
        return dict(zone_base_share_dev=base_dev[:, lay.station_zone].ravel(),
                    zone_load_share_dev=load_dev[:, lay.station_zone].ravel())

    def _counts(self, idx, stn, need) -> np.ndarray:
        """Seed 002's count matrix N[c, e] per station over its ports, (E * M, (c_max + 1) (e_max + 1))."""
        sim, sc = self.sim, self.sim.cfg.stations
        c, e_slots = sim.slots(idx, need)
        n_st = sim.n_env * sim.layout.n_station
        return (st.count_matrix(c, e_slots, stn, n_st, sc.c_max, sc.e_max) / sc.ports).reshape(n_st, -1)

    def _individual(self, out, agents, idx, left, vm) -> None:
        sim = self.sim
        shown = idx if left is None or left.size == 0 else np.union1d(idx, left)  # sessions with EV features
        feats = np.empty((shown.size, len(EV)), np.float32)
        self.ev_features(feats, np.arange(shown.size), shown, vm)
        bounds = np.searchsorted(sim.day.env[shown], np.arange(sim.n_env + 1))
        for e in range(sim.n_env):
            rows = slice(bounds[e], bounds[e + 1])
            want = {a for a in agents[e] if a.startswith("ev_")}
            for k, row in zip(sim.fleet.ev_index[shown[rows]], feats[rows]):
                name = f"ev_{k}"
                if name in want:
                    out[e][name] = row

    def _grouped(self, out, slot_owner, ctx, vm) -> None:
        sim = self.sim
        n_st = sim.layout.n_station
        occ = slot_owner >= 0
        owner = slot_owner.ravel()
        flat = np.flatnonzero(occ)  # occupied slots, (station, slot) flattened
        feats = np.zeros((owner.size, len(EV)), np.float32)
        self.ev_features(feats, flat, owner[flat], vm)
        feats = feats.reshape(sim.n_env * n_st, slot_owner.shape[1], -1)
        mask = occ.astype(np.float32)
        ctx32 = ctx.astype(np.float32)
        for e in range(sim.n_env):
            for j in range(n_st):
                g = e * n_st + j
                out[e][f"evs_{j}"] = {"evs": feats[g], "mask": mask[g], "context": ctx32[g]}

    def ev_features(self, out: np.ndarray, rows: npt.NDArray[np.int64], idx: npt.NDArray[np.int64],
                    vm: np.ndarray) -> None:
        """Write sessions ``idx``'s EV features into ``out[rows]`` (float32, (n, len(EV)))."""
        sim = self.sim
        s, lay, fleet = sim.day.sessions, sim.layout, sim.fleet
        t = min(sim.t, sim.n_steps - 1)
        t_next = min(sim.t + 1, sim.n_steps - 1)
        _ev_feature_rows(out, rows, self._ev_cols, idx, sim.day.env, fleet.station, lay.n_station, lay.station_bus,
                         lay.zone_of_bus, fleet.soc, s.soc_target, s.cap_kwh, fleet.dep_step, s.p_ch_max_kw,
                         s.p_dis_max_kw, s.eta_ch, s.v2g, fleet.started, sim.retail_price(),
                         sim.prices.next * self._tariff[sim.zone_period[:, t_next]], vm, sim.t, sim.dt_h,
                         bool(sim.cfg.fleet.uninterruptible), float(sim.day.period[t] == VALLEY))


@nb.njit(cache=True, nogil=True)
def _ev_feature_rows(out, rows, col, idx, env_of, station_of, n_station, station_bus, zone_of_bus, soc, soc_target,
                     cap_kwh, dep_step, p_ch_max_kw, p_dis_max_kw, eta_ch, v2g, started, price_now, price_next, vm, t,
                     dt_h, uninterruptible, valley):  # pragma: no cover (compiled)
    """The EV features of sessions ``idx`` into ``out[rows]``, quantity q of ``_EV_KERNEL`` into column
    ``col[q]``: one pass instead of ~30 numpy gathers over the fleet."""
    for k in range(idx.shape[0]):
        i = idx[k]
        r = rows[k]
        e = env_of[i]
        bus = station_bus[station_of[i] % n_station]
        z = zone_of_bus[bus]
        need = fl.nb_need_kwh(soc[i], soc_target[i], cap_kwh[i])
        c = fl.nb_charge_slots(need, p_ch_max_kw[i], eta_ch[i], dt_h)
        left = dep_step[i] - t
        out[r, col[0]] = soc[i]
        out[r, col[1]] = soc_target[i]
        out[r, col[2]] = need / cap_kwh[i]
        out[r, col[3]] = left * dt_h / 24.0
        out[r, col[4]] = p_ch_max_kw[i] / 50.0
        out[r, col[5]] = p_dis_max_kw[i] / 50.0
        out[r, col[6]] = 1.0 if v2g[i] else 0.0
        out[r, col[7]] = price_now[e, z]
        out[r, col[8]] = price_next[e, z]
        out[r, col[9]] = vm[e, bus]
        out[r, col[10]] = c / max(left, 1)
        out[r, col[11]] = 1.0 if (started[i] and uninterruptible) else 0.0
        out[r, col[12]] = valley
