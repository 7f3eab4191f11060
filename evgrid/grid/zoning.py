"""Zoning of a radial feeder into aggregation areas: equal load, or seed 003's comprehensive index.

Seed 003 (Ji et al. 2025, section 2.5, eqs 12-21) splits the feeder into aggregation areas by a weighted sum of
three indicators.  Its text survives without symbols and leaves normalisations and the search out, so each
reading below marked (ours) is our choice.

* **Electrical distance and modularity** (eqs 12-13).  The sensitivity of bus voltages to reactive injections
  is LinDistFlow's ``dV_i / dQ_n ~ X_in``, the reactance of the path the slack -> i and slack -> n share, from
  :class:`~evgrid.grid.feeders.RadialTree`'s branch reactances (pandapower's own branch model).  The distance of
  bus i from reactive source n is ``d_in = -ln(X_in / X_nn)``, the attenuation of a voltage change made at n as
  seen at i; eq 12: ``s_ij = sqrt(sum_n (d_in - d_jn)^2)``.  The reactive sources are the DER buses (their
  inverters and machines can supply Q) or, on a feeder without DER, every bus (ours).  Eq 13 is printed with
  the distance ``s_ij`` where modularity's edge weight belongs; we weight each *branch* (the paper: "k_i is the
  sum of the edge weights of all branches connected to node i") with the closeness ``A_ij = 1 - s_ij / max s``
  (max over all pairs of buses), so ``f1 = 1/(2m) sum_ij (A_ij - k_i k_j / 2m) delta(z_i, z_j)`` with
  ``k_i = sum_j A_ij`` and ``2m = sum_ij A_ij``.  The slack bus holds its voltage, so it has no sensitivity: it
  takes no part in ``f1`` and always joins the zone of the bus next to it.
* **EV dispatchable potential** (eqs 14-18), per zone d, from its EV flexible power ``F_d`` and base load
  ``L_d`` (means over the horizon, kW; :func:`ev_dispatchable_energy_kwh` gives eqs 15-16's flexible energy per
  bus) and the DSO's desired regulation ratio ``gamma_r`` (eq 17's gamma).  With ``rho_d = F_d / L_d``, the
  share of the zone's load its EVs can move: user side (eq 14, normalised by the zone's regulation demand
  ``gamma_r L_d``) ``f_a,d = min(rho_d / gamma_r, 1)``, whether the zone's EVs can cover it; grid side (eq 17)
  ``f_e,d = |rho_d - gamma_r| / gamma_r``, the mismatch, entering as ``1 - min(f_e,d, 1)``; eq 18
  ``f2_d = w_a f_a,d + w_e (1 - min(f_e,d, 1))``, and the feeder's ``f2`` is the mean over zones (ours: the
  paper reports that in its areas the EVs cover the regulation demand, which is what this rewards).  A zone
  without load or EVs scores 0.
* **Power balance** (eqs 19-20).  ``P_eq,d = |sum_t (P_a,d(t) - P_an,d(t))| / T`` with the zone's adjustable
  power ``P_a`` its EV flexible power plus DER output and its required regulation ``P_an`` its base load
  (ours); ``f3 = sum_d (P_eq,d - mean P_eq)^2`` (kW^2), to be minimised.  It enters the index as
  ``1 - min(sqrt(f3) / P_ref, 1)`` with ``P_ref`` the feeder's mean gross power (load + DER + EV flexibility),
  a constant per feeder, in the part of eq 21's scaling parameters tau (ours).
* **Comprehensive index** (eq 21): ``F = alpha f1 + beta f2 + gamma b``, maximised, with the paper's weights
  ``alpha = 0.5, beta = 0.9, gamma = 0.4``.  Eq 21's penalty ``f_c`` on the buses per zone is a bound here
  (``min_zone_buses``, ``max_zone_buses``): the search prefers partitions that violate it less, and only
  partitions within it are returned.

Every indicator needs only each bus's means over the horizon (eq 19 takes the absolute value of a sum over
time), so profiles may be a day of steps or one row.

The paper does not say how it searches.  A partition of a radial feeder into connected zones is a set of cut
branches, so :func:`zoning` adds cuts one at a time (the best cut each time) until a few zone counts past the best
one found, then removes them one at a time; after every step it swaps single cuts, and slides pairs of cuts onto
neighbouring branches, while the index rises.  With the default profiles this reaches the exhaustive optimum for
every zone count up to 6 on each shipped feeder (up to 7 on IEEE 33 with seed 003's DER).

Sign convention: inputs are magnitudes, kW >= 0 (load, DER output, EV flexibility), not evgrid's signed
injections.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from evgrid.grid.feeders import Feeder, partition_zones
from evgrid.grid.profiles import LOAD_KINDS, load_shape, pv_profile
from evgrid.validate import as_array, check_choice, check_int, check_real, describe

log = logging.getLogger(__name__)

METHODS = ("modularity", "equal_load")

# Default profiles (ours): one day in hourly steps; wind has no clear-sky shape, so a constant capacity factor;
# EVs sit where the load sits (stations go to load buses) with a flexible power of a fifth of its nominal value.
_DT_MIN = 60
WIND_CAPACITY_FACTOR = 0.3
EV_FLEX_SHARE = 0.2
# zone counts tried past the best one found before the search stops: the index falls off past its peak
_PATIENCE = 3


@dataclass(frozen=True, slots=True)
class IndexWeights:
    """Weights of seed 003's comprehensive index (eq 21) and of its EV sub-indicator (eq 18)."""

    alpha: float = 0.5
    """Weight of the electrical-distance modularity f1, >= 0 (seed 003: 0.5)."""
    beta: float = 0.9
    """Weight of the EV dispatchable potential f2, >= 0 (seed 003: 0.9)."""
    gamma: float = 0.4
    """Weight of the power balance, >= 0 (seed 003: 0.4)."""
    w_a: float = 0.5
    """Weight of the user side f_a within f2, >= 0 (ours)."""
    w_e: float = 0.5
    """Weight of the grid side f_e within f2, >= 0 (ours)."""
    regulation_ratio: float = 0.2
    """Desired regulation ratio gamma_r of eq 17: the share of a zone's mean base load its EVs should be able to
    move, in (0, 10] (ours)."""

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "w_a", "w_e"):
            check_real(name, getattr(self, name), 0.0, math.inf)
        check_real("regulation_ratio", self.regulation_ratio, 0.0, 10.0, lo_open=True)
        if self.alpha + self.beta + self.gamma == 0.0:
            raise ValueError("alpha, beta, gamma: expected at least one weight > 0, got all 0")


class Profiles(NamedTuple):
    """Per-bus inputs of the indicators, each (T, n_bus) kW >= 0."""

    load_kw: npt.NDArray[np.float64]  # base load
    gen_kw: npt.NDArray[np.float64]  # DER output available
    ev_flex_kw: npt.NDArray[np.float64]  # EV flexible power


@dataclass(frozen=True, eq=False, slots=True)
class Zoning:
    """A feeder's partition into zones and its seed 003 indicators.  Zone arrays are (n_zone,).  ``modularity``
    numbers zones by their first bus in ``bus_ids`` order (zone 0 holds the slack); ``equal_load`` keeps the
    feeder's numbering, and a given partition its own unless its labels leave gaps."""

    method: str
    zone_of_bus: npt.NDArray[np.int64]  # (n_bus,)
    bus_numbers: npt.NDArray[np.int64]  # (n_bus,) the feeder's own bus numbers (Feeder.numbers)
    weights: IndexWeights
    combined: float  # alpha f1 + beta f2 + gamma balance_index
    modularity: float  # f1, eq 13
    ev_index: float  # f2, eq 18, mean over zones
    balance_var_kw2: float  # f3, eq 20
    balance_index: float  # 1 - min(sqrt(f3) / balance_ref_kw, 1)
    balance_ref_kw: float  # P_ref: the feeder's mean gross power
    zone_modularity: npt.NDArray[np.float64]  # each zone's term of f1 (they sum to f1)
    zone_load_kw: npt.NDArray[np.float64]  # L_d, mean base load
    zone_gen_kw: npt.NDArray[np.float64]  # mean DER output
    zone_ev_flex_kw: npt.NDArray[np.float64]  # F_d, mean EV flexible power
    zone_ev_user: npt.NDArray[np.float64]  # f_a,d = min(rho_d / gamma_r, 1)
    zone_ev_grid: npt.NDArray[np.float64]  # f_e,d = |rho_d - gamma_r| / gamma_r (inf: EVs but no load)
    zone_ev_index: npt.NDArray[np.float64]  # f2_d
    zone_balance_kw: npt.NDArray[np.float64]  # P_eq,d, eq 19

    @property
    def n_zone(self) -> int:
        return int(self.zone_modularity.shape[0])

    def zones(self) -> list[list[int]]:
        """Each zone's buses in the feeder's own numbering, ascending."""
        return [sorted(int(b) for b in self.bus_numbers[self.zone_of_bus == k]) for k in range(self.n_zone)]

    def table(self) -> dict[str, list]:
        """One row per zone, as columns (``pandas.DataFrame(z.table())`` shows it)."""
        return {
            "zone": list(range(self.n_zone)),
            "buses": self.zones(),
            "n_bus": np.bincount(self.zone_of_bus, minlength=self.n_zone).tolist(),
            "modularity": self.zone_modularity.tolist(),
            "load_kw": self.zone_load_kw.tolist(),
            "gen_kw": self.zone_gen_kw.tolist(),
            "ev_flex_kw": self.zone_ev_flex_kw.tolist(),
            "ev_user": self.zone_ev_user.tolist(),
            "ev_grid": self.zone_ev_grid.tolist(),
            "ev_index": self.zone_ev_index.tolist(),
            "balance_kw": self.zone_balance_kw.tolist(),
        }

    def summary(self) -> dict[str, float | int | str]:
        """The feeder-wide values."""
        return {"method": self.method, "n_zone": self.n_zone, "combined": self.combined,
                "modularity": self.modularity, "ev_index": self.ev_index, "balance_var_kw2": self.balance_var_kw2,
                "balance_index": self.balance_index, "balance_ref_kw": self.balance_ref_kw}


# ---------------------------------------------------------------------------------------------------------------
# inputs


def default_profiles(feeder: Feeder, *, load_kind: str = "residential", base_load_scale: float = 1.0,
                     diesel_output: float = 1.0) -> Profiles:
    """One day, hourly: the feeder's nominal load times ``load_kind``'s shape and ``base_load_scale``; PV at its
    clear-sky output, wind at a constant capacity factor, diesel at ``diesel_output`` of its rating; EV flexible
    power a fixed share of each bus's nominal load (ours)."""
    check_choice("load_kind", load_kind, LOAD_KINDS)
    check_real("base_load_scale", base_load_scale, 0.0, math.inf)
    check_real("diesel_output", diesel_output, 0.0, 1.0)
    shape = load_shape(load_kind, dt_min=_DT_MIN)  # (T,)
    load_kw = shape[:, None] * (base_load_scale * feeder.base_p_kw)[None, :]
    per_kind = {"pv": pv_profile(dt_min=_DT_MIN), "wind": np.full(shape.size, WIND_CAPACITY_FACTOR),
                "diesel": np.full(shape.size, diesel_output)}
    gen_kw = np.zeros_like(load_kw)
    for b, kind, p_kw in zip(feeder.der_bus, feeder.der_kind, feeder.der_p_max_kw):
        gen_kw[:, b] += per_kind[kind] * p_kw
    ev_flex_kw = np.broadcast_to(EV_FLEX_SHARE * feeder.base_p_kw, load_kw.shape).copy()
    return Profiles(load_kw, gen_kw, ev_flex_kw)


def ev_dispatchable_energy_kwh(n_bus: int, bus: npt.ArrayLike, p_ch_kw: npt.ArrayLike, arrive_h: npt.ArrayLike,
                               depart_h: npt.ArrayLike, soc_arrive: npt.ArrayLike, soc_depart: npt.ArrayLike,
                               cap_kwh: npt.ArrayLike, eta: float = 0.95,
                               margin: float = 0.0) -> npt.NDArray[np.float64]:  # (n_bus,)
    """Eqs 14-16 per bus: the chargeable energy of its EVs over their stays less the energy they need, kWh.

    Per EV (arrays of one entry each): ``min(p_ch (1 + margin) (depart - arrive) eta, cap (1 - soc_arrive) / eta)
    - (soc_depart - soc_arrive) cap / eta``, summed per bus position ``bus``; ``margin`` is eq 15's epsilon.
    Divide by the horizon's hours for :func:`zoning`'s ``ev_flex_kw``.
    """
    n_bus = check_int("n_bus", n_bus, 1)
    b = np.asarray(bus)
    if b.ndim != 1 or not np.issubdtype(b.dtype, np.integer) or (b.size and (b.min() < 0 or b.max() >= n_bus)):
        raise ValueError(f"bus: expected a 1-D array of bus positions in [0, {n_bus - 1}], got {describe(b)}")
    n = b.size
    p = as_array("p_ch_kw", p_ch_kw, shape=(n,), lo=0.0)
    t_a = as_array("arrive_h", arrive_h, shape=(n,))
    t_d = as_array("depart_h", depart_h, shape=(n,))
    if (t_d < t_a).any():
        raise ValueError("depart_h: expected depart_h >= arrive_h for every EV")
    s_a = as_array("soc_arrive", soc_arrive, shape=(n,), lo=0.0, hi=1.0)
    s_d = as_array("soc_depart", soc_depart, shape=(n,), lo=0.0, hi=1.0)
    cap = as_array("cap_kwh", cap_kwh, shape=(n,), lo=0.0)
    eta = check_real("eta", eta, 0.0, 1.0, lo_open=True)
    margin = check_real("margin", margin, -1.0, math.inf)
    chargeable = np.minimum(p * (1.0 + margin) * (t_d - t_a) * eta, cap * (1.0 - s_a) / eta)
    needed = (s_d - s_a) * cap / eta
    return np.bincount(b, chargeable - needed, minlength=n_bus)


def _profile(name: str, x: npt.ArrayLike, n_bus: int) -> npt.NDArray[np.float64]:  # (T, n_bus)
    a = as_array(name, x, lo=0.0, what="kW")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != n_bus or a.shape[0] == 0:
        raise ValueError(f"{name}: expected shape ({n_bus},) or (T, {n_bus}) [steps x buses], got {np.shape(x)}")
    return a


def _check_profiles(feeder: Feeder, load_kw, gen_kw, ev_flex_kw) -> Profiles:
    arrays = [_profile(n, x, feeder.n_bus) for n, x in zip(Profiles._fields, (load_kw, gen_kw, ev_flex_kw))]
    t = max(a.shape[0] for a in arrays)
    for name, a in zip(Profiles._fields, arrays):
        if a.shape[0] not in (1, t):
            raise ValueError(f"{name}: expected {t} rows (steps) like the other profiles, or 1, got {a.shape[0]}")
    return Profiles(*(np.broadcast_to(a, (t, feeder.n_bus)) for a in arrays))


# ---------------------------------------------------------------------------------------------------------------
# electrical distance (eqs 12-13)


def _require_tree(feeder: Feeder):
    if feeder.tree is None:
        raise ValueError(f"feeder: zoning needs a radial feeder; {feeder.name!r} is not ({feeder.mesh_error})")
    return feeder.tree


def _vq_sensitivity(feeder: Feeder) -> npt.NDArray[np.float64]:  # (n_bus, n_bus)
    """LinDistFlow ``dV_i / dQ_j`` up to a constant: the reactance of the path slack -> i and slack -> j share."""
    tree = _require_tree(feeder)
    paths = tree.paths()  # (n_node, n_node)
    s_node = (paths * tree.x_pu[None, :]) @ paths.T
    nb = tree.node_of_bus
    return s_node[np.ix_(nb, nb)]


def _grounded(sens: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:  # (n_bus,)
    # buses whose voltage no reactive injection moves: the slack and buses fused with it by zero-impedance ties
    diag = np.diag(sens)
    return diag <= 1e-12 * max(float(diag.max()), 1e-300)


def electrical_distance(feeder: Feeder, q_sources: npt.ArrayLike | None = None) -> npt.NDArray[np.float64]:
    """Eq 12's ``s_ij`` between buses (``bus_ids`` order), NaN on the slack's row and column.

    ``q_sources``: reactive-power source buses in the feeder's own numbering (default: the DER buses, or every
    bus of a feeder without DER).
    """
    sens = _vq_sensitivity(feeder)
    grounded = _grounded(sens)
    src = _source_positions(feeder, q_sources, grounded)
    # attenuation of a voltage change made at source n, seen at bus i: in (0, 1] off the slack
    with np.errstate(divide="ignore"):
        d = -np.log(sens[:, src] / np.diag(sens)[src][None, :])  # (n_bus, n_q)
    # a bus whose path shares no branch with the source's (another feeder off the same substation bus) is
    # decoupled from it under LinDistFlow: the largest finite distance stands in for infinity
    finite = np.isfinite(d) & ~grounded[:, None]
    d = np.where(finite, d, float(d[finite].max()) if finite.any() else 1.0)
    d[grounded] = np.nan
    diff = d[:, None, :] - d[None, :, :]
    return np.sqrt((diff * diff).sum(axis=2))


def _source_positions(feeder: Feeder, q_sources, grounded) -> npt.NDArray[np.int64]:
    if q_sources is None:
        src = np.unique(feeder.der_bus) if feeder.der_bus.size else np.arange(feeder.n_bus)
    else:
        numbers = np.asarray(q_sources)
        if numbers.ndim != 1 or numbers.size == 0:
            raise ValueError(f"q_sources: expected a non-empty list of bus numbers, got {describe(q_sources)}")
        src = np.unique([feeder.position_of(b, "q_sources") for b in numbers.tolist()])
    src = src[~grounded[src]]
    if src.size == 0:
        raise ValueError("q_sources: expected at least one source bus off the slack, got none")
    return src


def bus_tree_edges(feeder: Feeder) -> list[tuple[int, int]]:
    """The feeder's branches as (parent, child) bus positions, parents nearer the slack.  Buses that pandapower
    fuses into one node (closed bus-bus switches) hang from the node's first bus; a node without a bus (a line
    end at an open switch) is skipped, so a bus hangs from its nearest ancestor that holds one."""
    tree = _require_tree(feeder)
    first: dict[int, int] = {}
    edges = []
    for pos, node in sorted(enumerate(tree.node_of_bus.tolist()), key=lambda x: (x[1], x[0])):
        if node in first:
            edges.append((first[node], pos))
            continue
        first[node] = pos
        p = int(tree.parent[node])
        while p >= 0 and p not in first:
            p = int(tree.parent[p])
        if p >= 0:
            edges.append((first[p], pos))
    return edges


def closeness_weights(feeder: Feeder, q_sources: npt.ArrayLike | None = None) -> npt.NDArray[np.float64]:
    """Modularity's edge weights, (n_bus, n_bus): ``A_ij = 1 - s_ij / max s`` on each branch (the maximum over
    all pairs of buses), 0 between buses no branch joins and on branches at the slack."""
    s = electrical_distance(feeder, q_sources)
    off = ~np.isnan(s)
    np.fill_diagonal(off, False)
    s_max = float(s[off].max()) if off.any() else 0.0
    a = np.zeros_like(s)
    for i, j in bus_tree_edges(feeder):
        if off[i, j]:
            a[i, j] = a[j, i] = 1.0 - (s[i, j] / s_max if s_max > 0 else 0.0)
    return a


# ---------------------------------------------------------------------------------------------------------------
# indicators


class _Scores(NamedTuple):
    combined: float
    modularity: float
    ev_index: float
    balance_var_kw2: float
    balance_index: float
    balance_ref_kw: float
    zone_modularity: np.ndarray
    zone_load_kw: np.ndarray
    zone_gen_kw: np.ndarray
    zone_ev_flex_kw: np.ndarray
    zone_ev_user: np.ndarray
    zone_ev_grid: np.ndarray
    zone_ev_index: np.ndarray
    zone_balance_kw: np.ndarray


def _score(inner: np.ndarray, deg: np.ndarray, two_m: float, f_kw: np.ndarray, l_kw: np.ndarray,
           g_kw: np.ndarray, ref_kw: float, w: IndexWeights) -> _Scores:
    """The indicators from zone sums, each (K,): ``inner`` closeness inside each zone (both directions), ``deg``
    its buses' weighted degrees, and the means over the horizon of EV flexible power, base load and DER output
    (eqs 14-19 need no more: eq 19 takes the absolute value of a sum over time)."""
    q_zone = inner / two_m - (deg / two_m) ** 2 if two_m > 0 else np.zeros(inner.shape[0])
    g_r = w.regulation_ratio
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(l_kw > 0, f_kw / l_kw, np.where(f_kw > 0, np.inf, 0.0))
    ev_user = np.minimum(rho / g_r, 1.0)
    ev_grid = np.abs(rho - g_r) / g_r
    ev_zone = w.w_a * ev_user + w.w_e * (1.0 - np.minimum(ev_grid, 1.0))
    p_eq = np.abs(f_kw + g_kw - l_kw)
    f3 = float(((p_eq - p_eq.mean()) ** 2).sum())
    balance = 1.0 - min(math.sqrt(f3) / ref_kw, 1.0) if ref_kw > 0 else 1.0
    f1 = float(q_zone.sum())
    f2 = float(ev_zone.mean())
    combined = w.alpha * f1 + w.beta * f2 + w.gamma * balance
    return _Scores(combined, f1, f2, f3, balance, ref_kw, q_zone, l_kw, g_kw, f_kw, ev_user, ev_grid, ev_zone, p_eq)


class _Problem:
    """A feeder's zoning problem on its *units*, the buses no partition separates (:func:`_units`), as a tree
    rooted at the slack's unit; zone sums follow from unit sums by one matrix product."""

    def __init__(self, feeder: Feeder, profiles: Profiles, weights: IndexWeights, q_sources) -> None:
        self.feeder = feeder
        self.w = weights
        n_bus = feeder.n_bus
        self.a = closeness_weights(feeder, q_sources)  # (n_bus, n_bus)
        self.two_m = float(self.a.sum())
        # (n_bus,) each: means over the horizon
        self.bus_means = tuple(x.mean(axis=0) for x in (profiles.ev_flex_kw, profiles.load_kw, profiles.gen_kw))
        self.ref_kw = float(sum(x.sum() for x in self.bus_means))
        self.unit_of_bus, edges = _units(feeder)
        n_u = int(self.unit_of_bus.max()) + 1
        self.n_unit = n_u
        m = np.zeros((n_bus, n_u))
        m[np.arange(n_bus), self.unit_of_bus] = 1.0
        self.a_unit = m.T @ self.a @ m  # (n_u, n_u), diagonal: closeness inside the unit
        self.deg_unit = m.T @ self.a.sum(axis=1)  # (n_u,)
        self.size_unit = np.bincount(self.unit_of_bus, minlength=n_u)  # buses per unit
        self.means_unit = tuple(m.T @ x for x in self.bus_means)  # (n_u,) each
        # the unit tree, breadth first from the slack's unit: cutting the branch into unit u starts a zone at u
        nbrs: list[list[int]] = [[] for _ in range(n_u)]
        for u, v in edges:
            nbrs[u].append(v)
            nbrs[v].append(u)
        root = int(self.unit_of_bus[feeder.slack_bus])
        self.parent = np.full(n_u, -1, dtype=np.int64)
        self.order = [root]
        for u in self.order:
            for v in nbrs[u]:
                if v != root and self.parent[v] < 0:
                    self.parent[v] = u
                    self.order.append(v)

    def labels(self, cut: np.ndarray) -> tuple[np.ndarray, int]:
        """Zone per unit for the cut branches ``cut`` (n_u,) bool (a branch is named by the unit below it),
        zones numbered in breadth-first order from the slack's, and the number of zones."""
        lab = np.empty(self.n_unit, dtype=np.int64)
        k = 0
        for u in self.order:
            if self.parent[u] < 0 or cut[u]:
                lab[u] = k
                k += 1
            else:
                lab[u] = lab[self.parent[u]]
        return lab, k

    def score(self, labels: np.ndarray, k: int) -> _Scores:
        mz = np.zeros((self.n_unit, k))
        mz[np.arange(self.n_unit), labels] = 1.0
        inner = ((self.a_unit @ mz) * mz).sum(axis=0)
        return _score(inner, mz.T @ self.deg_unit, self.two_m, *(mz.T @ x for x in self.means_unit), self.ref_kw,
                      self.w)


def _units(feeder: Feeder) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Units of buses no partition separates, (n_bus,) unit per bus, and the branches between units.  A tree node's
    buses form one unit; the slack has no voltage sensitivity, so it may not stand alone and joins its first
    child (lowest in sweep order)."""
    tree = _require_tree(feeder)
    edges = bus_tree_edges(feeder)
    node = tree.node_of_bus
    unit_of_bus = np.unique(node, return_inverse=True)[1].astype(np.int64)
    slack = int(unit_of_bus[feeder.slack_bus])
    children = [c for p, c in edges if unit_of_bus[p] == slack and unit_of_bus[c] != slack]
    if children:
        first = min(children, key=lambda c: (node[c], c))
        unit_of_bus[unit_of_bus == unit_of_bus[first]] = slack
        unit_of_bus = np.unique(unit_of_bus, return_inverse=True)[1].astype(np.int64)
    unit_edges = sorted({(int(min(unit_of_bus[p], unit_of_bus[c])), int(max(unit_of_bus[p], unit_of_bus[c])))
                         for p, c in edges if unit_of_bus[p] != unit_of_bus[c]})
    return unit_of_bus, unit_edges


# ---------------------------------------------------------------------------------------------------------------
# search


def _search(pb: _Problem, n_zones: int | None, min_buses: int, max_buses: int) -> np.ndarray:
    """Zone per unit: the best partition within the size bounds found by adding cuts one at a time, then (from the
    last partition reached) removing them one at a time, each step followed by the local search of :func:`_swap`.
    Candidates compare first by how many buses lie outside the bounds (eq 21's f_c), then by the index."""

    def key(cut: np.ndarray) -> tuple[int, float]:
        lab, k = pb.labels(cut)
        size = np.bincount(lab, weights=pb.size_unit, minlength=k)
        outside = int(np.maximum(min_buses - size, 0).sum() + np.maximum(size - max_buses, 0).sum())
        return -outside, pb.score(lab, k).combined

    def better(a: tuple[int, float], b: tuple[int, float]) -> bool:
        return a[0] > b[0] or (a[0] == b[0] and a[1] > b[1] + 1e-12)

    def step(cut: np.ndarray, flip: np.ndarray) -> tuple[int, float]:
        """Flip the one branch of ``flip`` that gives the best key, then swap; the new key."""
        best_key, best_b = None, -1
        for b in flip:
            cut[b] = not cut[b]
            trial = key(cut)
            cut[b] = not cut[b]
            if best_key is None or better(trial, best_key):
                best_key, best_b = trial, b
        cut[best_b] = not cut[best_b]
        return _swap(cut, best_key, branches, key, better, near)

    per_k: dict[int, tuple[tuple[int, float], np.ndarray]] = {}

    def keep(k: int, k_key: tuple[int, float], cut: np.ndarray) -> None:
        if k not in per_k or better(k_key, per_k[k][0]):
            per_k[k] = (k_key, cut.copy())

    def best_k() -> int | None:
        ok = [k for k, (kk, _) in per_k.items() if kk[0] == 0 and (n_zones is None or k == n_zones)]
        return max(ok, key=lambda k: per_k[k][0][1]) if ok else None

    branches, near = _branches(pb)
    cut = np.zeros(pb.n_unit, dtype=bool)
    keep(1, key(cut), cut)
    top = pb.n_unit if n_zones is None else min(n_zones + _PATIENCE, pb.n_unit)
    k = 1
    while k < top:
        k += 1
        keep(k, step(cut, branches[~cut[branches]]), cut)
        found = best_k()
        if n_zones is None and found is not None and k >= found + _PATIENCE:
            break
    # the way down starts where the way up stopped, so it meets other partitions
    while k > (n_zones or 1):
        k -= 1
        keep(k, step(cut, branches[cut[branches]]), cut)
    found = best_k()
    if found is None:
        count = f"{n_zones} zones" if n_zones is not None else "zones"
        raise ValueError(f"n_zones, min_zone_buses, max_zone_buses: feeder {pb.feeder.name!r} has no partition into "
                         f"{count} of {min_buses}..{max_buses} connected buses")
    return pb.labels(per_k[found][1])[0]


def _branches(pb: _Problem) -> tuple[np.ndarray, dict[int, list[int]]]:
    """The branches that may be cut, each named by the unit below it, and the branches next to each: its
    parent's and its children's."""
    branches = np.array([u for u in pb.order if pb.parent[u] >= 0], dtype=np.int64)
    near: dict[int, list[int]] = {int(u): [] for u in branches}
    for u in branches.tolist():
        p = int(pb.parent[u])
        if pb.parent[p] >= 0:
            near[u].append(p)
            near[p].append(u)
    return branches, near


def _swap(cut, current, branches, key, better, near):
    """Local search in place until nothing improves; the final key.  Moves: swap one cut branch for any uncut
    one (best improvement), and, when no swap helps, slide two cuts at once each to a branch next to it, which
    shifts two zone borders together (a single swap cannot, when each shift alone lowers the index)."""
    while True:
        move = None
        for a in branches[cut[branches]]:
            cut[a] = False
            for b in branches[~cut[branches]]:
                if b == a:
                    continue
                cut[b] = True
                trial = key(cut)
                cut[b] = False
                if better(trial, current if move is None else move[0]):
                    move = (trial, (a,), (b,))
            cut[a] = True
        if move is None:
            move = _slide_pair(cut, current, branches, key, better, near)
        if move is None:
            return current
        current, out, into = move
        cut[list(out)], cut[list(into)] = False, True


def _slide_pair(cut, current, branches, key, better, near):
    """The best move of two cuts each onto a free neighbouring branch, if it improves ``current``."""
    move = None
    cuts = branches[cut[branches]].tolist()
    for i, a1 in enumerate(cuts):
        for a2 in cuts[i + 1:]:
            cut[a1] = cut[a2] = False
            for b1 in near[a1]:
                if cut[b1]:
                    continue
                cut[b1] = True
                for b2 in near[a2]:
                    if cut[b2]:
                        continue
                    cut[b2] = True
                    trial = key(cut)
                    cut[b2] = False
                    if better(trial, current if move is None else move[0]):
                        move = (trial, (a1, a2), (b1, b2))
                cut[b1] = False
            cut[a1] = cut[a2] = True
    return move


def _canonical(zone_of_bus: np.ndarray) -> np.ndarray:
    """Zones renumbered by their first bus."""
    first: dict[int, int] = {}
    for z in zone_of_bus.tolist():
        first.setdefault(z, len(first))
    return np.array([first[z] for z in zone_of_bus.tolist()], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------
# entry points


def zoning(feeder: Feeder, method: str = "modularity", *, n_zones: int | None = None,
           load_kw: npt.ArrayLike | None = None, gen_kw: npt.ArrayLike | None = None,
           ev_flex_kw: npt.ArrayLike | None = None, weights: IndexWeights | None = None,
           q_sources: npt.ArrayLike | None = None, min_zone_buses: int = 2,
           max_zone_buses: int | None = None) -> Zoning:
    """Partition ``feeder`` into connected zones and score the result with seed 003's indicators.

    Args:
        feeder: a radial feeder.
        method: ``modularity`` (maximise seed 003's comprehensive index) or ``equal_load`` (zones of similar
            nominal load, :func:`~evgrid.grid.feeders.partition_zones`: ``n_zones`` of them, or the feeder's own
            partition when ``n_zones`` is None).
        n_zones: number of zones, 1..n_bus; None: ``modularity`` picks the number that maximises the index.
        load_kw, gen_kw, ev_flex_kw: per-bus base load, available DER output and EV flexible power, kW >= 0,
            each (T, n_bus) or (n_bus,) (constant over the horizon); a profile left None comes from
            :func:`default_profiles`.
        weights: the index's weights (default: seed 003's alpha = 0.5, beta = 0.9, gamma = 0.4).
        q_sources: reactive-power source buses of the electrical distance, in the feeder's own numbering
            (default: the DER buses, or every bus of a feeder without DER).
        min_zone_buses, max_zone_buses: buses per zone (eq 21's f_c), ``modularity`` only; the slack always
            shares its zone, and ``max_zone_buses`` None sets no upper bound.
    """
    method = check_choice("method", method, METHODS)
    if n_zones is not None:
        n_zones = check_int("n_zones", n_zones, 1, feeder.n_bus)
    min_b = check_int("min_zone_buses", min_zone_buses, 1, feeder.n_bus)
    max_b = (feeder.n_bus if max_zone_buses is None
             else check_int("max_zone_buses", max_zone_buses, min_b, feeder.n_bus))
    pb = _Problem(feeder, _profiles_or_default(feeder, load_kw, gen_kw, ev_flex_kw), _check_weights(weights),
                  q_sources)
    if method == "equal_load":
        z = (feeder.zone_of_bus if n_zones is None else
             partition_zones(feeder.net, feeder.bus_ids, feeder.base_p_kw, feeder.slack_bus, n_zones))
        return _result(pb, np.asarray(z), method, renumber=False)
    out = _result(pb, _search(pb, n_zones, min_b, max_b)[pb.unit_of_bus], method, renumber=True)
    log.info("feeder %s: %d zones by seed 003's index %.4f (modularity %.4f, EV %.4f, balance %.4f)", feeder.name,
             out.n_zone, out.combined, out.modularity, out.ev_index, out.balance_index)
    return out


def score_partition(feeder: Feeder, zone_of_bus: npt.ArrayLike, *, load_kw: npt.ArrayLike | None = None,
                    gen_kw: npt.ArrayLike | None = None, ev_flex_kw: npt.ArrayLike | None = None,
                    weights: IndexWeights | None = None, q_sources: npt.ArrayLike | None = None,
                    method: str = "given") -> Zoning:
    """Seed 003's indicators of a given partition ``zone_of_bus`` ((n_bus,) zone per bus, ``bus_ids`` order; any
    labels, connected or not); the other arguments as for :func:`zoning`."""
    z = np.asarray(zone_of_bus)
    if z.shape != (feeder.n_bus,) or not np.issubdtype(z.dtype, np.integer) or z.min() < 0:
        raise ValueError(f"zone_of_bus: expected ({feeder.n_bus},) integer zone labels >= 0, got {describe(z)}")
    pb = _Problem(feeder, _profiles_or_default(feeder, load_kw, gen_kw, ev_flex_kw), _check_weights(weights),
                  q_sources)
    return _result(pb, z, method, renumber=False)


def _check_weights(weights: IndexWeights | None) -> IndexWeights:
    if weights is None:
        return IndexWeights()
    if not isinstance(weights, IndexWeights):
        raise ValueError(f"weights: expected an IndexWeights, got {describe(weights)}")
    return weights


def _profiles_or_default(feeder: Feeder, load_kw, gen_kw, ev_flex_kw) -> Profiles:
    if load_kw is None or gen_kw is None or ev_flex_kw is None:
        d = default_profiles(feeder)
        load_kw = d.load_kw if load_kw is None else load_kw
        gen_kw = d.gen_kw if gen_kw is None else gen_kw
        ev_flex_kw = d.ev_flex_kw if ev_flex_kw is None else ev_flex_kw
    return _check_profiles(feeder, load_kw, gen_kw, ev_flex_kw)


def _result(pb: _Problem, zone_of_bus: np.ndarray, method: str, renumber: bool) -> Zoning:
    """The :class:`Zoning` of a bus partition (zones renumbered by their first bus if ``renumber`` or if the labels
    leave gaps), its sums taken bus by bus: a given partition may split a unit."""
    z = np.asarray(zone_of_bus, dtype=np.int64)
    if renumber or np.bincount(z).min() == 0:
        z = _canonical(z)
    k = int(z.max()) + 1
    mz = np.zeros((pb.feeder.n_bus, k))
    mz[np.arange(pb.feeder.n_bus), z] = 1.0
    inner = ((pb.a @ mz) * mz).sum(axis=0)
    s = _score(inner, mz.T @ pb.a.sum(axis=1), pb.two_m, *(mz.T @ x for x in pb.bus_means), pb.ref_kw, pb.w)
    return Zoning(method=method, zone_of_bus=z, bus_numbers=pb.feeder.numbers.copy(), weights=pb.w, **s._asdict())
