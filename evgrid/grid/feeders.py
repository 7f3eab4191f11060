"""Distribution feeders: pandapower nets plus the arrays the solvers need.

Every feeder is a pandapower net (the reference model that users, plots and
the pandapower backend read) wrapped in a :class:`Feeder` that adds

* the bus order of every ``[..., n_bus]`` array in evgrid (``bus_ids``),
* nominal loads, DER sites, voltage limits, line ampacities and zones,
* a :class:`RadialTree`: the network as seen by pandapower's own internal
  model (bus admittance matrices after switches, transformer models, taps and
  phase shifts are applied) re-expressed as parent pointers and one two-port
  per branch, ready for a backward/forward sweep.

Taking the branch admittances from pandapower's internal model, rather than
re-deriving them from the tables, is what makes the fast backend agree with
pandapower to numerical precision on every feeder (lines with charging,
transformers in the T model, open switches that leave dangling line ends).

Sign convention, used throughout evgrid: load is positive, generation negative.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandapower as pp
import pandapower.networks as pn

from evgrid.grid.profiles import LOAD_KINDS

log = logging.getLogger(__name__)

FEEDERS = ("ieee33", "feeder14", "cigre_mv")

# Seed 003 (Ji et al. 2025), DER table for the IEEE 33-bus feeder; bus numbers
# are 1-based as in the paper, capacities in kW.  The paper's table lists 13 PV
# sites although its text says 12; we keep all 13.
SEED003_PV_KW = {2: 550, 4: 200, 6: 300, 7: 200, 11: 200, 13: 200, 15: 100, 18: 100,
                 23: 650, 26: 350, 29: 400, 31: 250, 32: 100}
SEED003_WIND_KW = {33: 200}
SEED003_DIESEL_KW = {3: 200}

# Default operator zones of IEEE 33 (0-based pandapower bus indices), three
# contiguous areas of similar load: the substation area with the first lateral,
# the end of the main trunk, and the two laterals that leave buses 2 and 5.
IEEE33_ZONES = (
    (0, 1, 2, 3, 4, 5, 18, 19, 20, 21),
    (6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17),
    (22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32),
)

# CIGRE MV (pandapower bus indices): the HV bus with the first section of
# feeder 1, the rest of feeder 1 beyond bus 7, and feeder 2.
CIGRE_MV_ZONES = ((0, 1, 2, 3, 4, 5, 6), (7, 8, 9, 10, 11), (12, 13, 14))
DEFAULT_ZONES = {"ieee33": IEEE33_ZONES, "cigre_mv": CIGRE_MV_ZONES}

# Standard ampacities [kA] used to rate lines of feeders published without ratings.
_STANDARD_AMPACITY_KA = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


class MeshedFeederError(ValueError):
    """The in-service network contains a loop; the radial sweep cannot solve it."""


@dataclass(frozen=True, eq=False)
class RadialTree:
    """A radial network in sweep order (parents before children).

    Node 0 is the slack.  Node ``i > 0`` hangs from ``parent[i]`` through one
    branch modelled as a two-port; with ``J[i]`` the current that flows out of
    that branch into node ``i`` (its loads, shunts and subtree):

    * forward:  ``V[i] = c[i] * V[parent] - z[i] * J[i]``
    * backward: current drawn from the parent, ``I_from = s[i] * V[parent] + a[i] * J[i]``

    ``s, a, c, z`` follow exactly from the branch admittances (Yff, Yft, Ytf,
    Ytt): ``s = Yff - Yft*Ytf/Ytt``, ``a = -Yft/Ytt``, ``c = -Ytf/Ytt``,
    ``z = 1/Ytt``.  A plain series impedance gives ``s = 0, a = c = 1``.
    All quantities are per unit on ``base_mva``.
    """

    parent: npt.NDArray[np.int64]  # (n_node,), parent[0] = -1
    coef: npt.NDArray[np.float64]  # (n_node, 10): s, a, c, z, y_shunt as (re, im) pairs
    node_of_bus: npt.NDArray[np.int64]  # (n_bus,) node of each feeder bus
    v_slack: complex  # slack voltage phasor, p.u.
    va_slack_deg: float
    base_mva: float
    # Rated elements (lines then transformers): the node whose incoming branch
    # they are, whether the branch runs parent->node in the element's own
    # from->to direction, and the kA per p.u. current on each side.
    elem_node: npt.NDArray[np.int64]  # (n_elem,)
    elem_ibase_ka: npt.NDArray[np.float64]  # (n_elem, 2): kA per p.u. at parent side, node side
    elem_rating_ka: npt.NDArray[np.float64]  # (n_elem, 2): rated current at parent side, node side
    # Series impedance of each node's incoming branch, for LinDistFlow sensitivities.
    r_pu: npt.NDArray[np.float64]  # (n_node,)
    x_pu: npt.NDArray[np.float64]  # (n_node,)

    @property
    def n_node(self) -> int:
        return int(self.parent.shape[0])

    def paths(self) -> npt.NDArray[np.float64]:
        """(n_node, n_node): ``[i, k] = 1`` where the branch into node k lies on the path slack -> node i
        (so column k marks the subtree that branch feeds).  The LinDistFlow sensitivities are built on it."""
        n = self.n_node
        anc = np.zeros((n, n))
        for i in range(1, n):
            k = i
            while k > 0:
                anc[i, k] = 1.0
                k = self.parent[k]
        return anc


@dataclass(frozen=True, eq=False)
class Feeder:
    """A distribution feeder.  Arrays over buses follow ``bus_ids``.

    Attributes carry units in their names; ``p`` and ``q`` are loads (positive)
    at nominal, i.e. the peak of the daily load shape.
    """

    name: str
    net: pp.pandapowerNet
    bus_ids: npt.NDArray[np.int64]  # (n_bus,) pandapower bus index
    vn_kv: npt.NDArray[np.float64]  # (n_bus,)
    v_min_pu: npt.NDArray[np.float64]  # (n_bus,)
    v_max_pu: npt.NDArray[np.float64]  # (n_bus,)
    base_p_kw: npt.NDArray[np.float64]  # (n_bus,) nominal load, DER excluded
    base_q_kvar: npt.NDArray[np.float64]  # (n_bus,)
    line_ids: npt.NDArray[np.int64]  # (n_line,) in-service pandapower lines
    line_i_max_ka: npt.NDArray[np.float64]  # (n_line,) ampacity incl. derating and parallels
    trafo_ids: npt.NDArray[np.int64]  # (n_trafo,)
    slack_bus: int  # position in bus_ids
    zone_of_bus: npt.NDArray[np.int64]  # (n_bus,) zone index per bus
    der_bus: npt.NDArray[np.int64]  # (n_der,) position in bus_ids
    der_kind: tuple[str, ...]  # "pv" | "wind" | "diesel"
    der_p_max_kw: npt.NDArray[np.float64]  # (n_der,)
    tree: RadialTree | None = field(repr=False)
    mesh_error: str | None = None  # why the fast backend cannot solve it
    bus_numbers: npt.NDArray[np.int64] | None = None  # (n_bus,) the source's own bus numbers (None: bus_ids)
    numbering: str = "pandapower bus indices"  # how the source numbers its buses

    @property
    def n_bus(self) -> int:
        return int(self.bus_ids.shape[0])

    @property
    def n_line(self) -> int:
        return int(self.line_ids.shape[0])

    @property
    def n_trafo(self) -> int:
        return int(self.trafo_ids.shape[0])

    @property
    def n_zone(self) -> int:
        return int(self.zone_of_bus.max()) + 1

    @property
    def zones(self) -> tuple[npt.NDArray[np.int64], ...]:
        return tuple(np.flatnonzero(self.zone_of_bus == k) for k in range(self.n_zone))

    def bus_position(self, pp_bus: int) -> int:
        """Position (in ``bus_ids`` order) of pandapower bus index ``pp_bus``."""
        hits = np.flatnonzero(self.bus_ids == pp_bus)
        if hits.size == 0:
            raise ValueError(f"bus {pp_bus} is not a bus of feeder {self.name!r}")
        return int(hits[0])

    @property
    def numbers(self) -> npt.NDArray[np.int64]:
        """(n_bus,) each bus's number in the source's own numbering (:attr:`numbering`)."""
        return self.bus_ids if self.bus_numbers is None else self.bus_numbers

    def position_of(self, number: int, name: str = "bus") -> int:
        """Position (in ``bus_ids`` order) of the bus the source numbers ``number``; a ValueError naming
        ``name`` and the feeder's numbering otherwise."""
        hits = np.flatnonzero(self.numbers == number) if isinstance(number, int | np.integer) else []
        if len(hits) == 0:
            raise ValueError(f"{name}: {number!r} is not a bus of feeder {self.name!r}, whose buses are numbered "
                             f"{int(self.numbers.min())}-{int(self.numbers.max())} ({self.numbering})")
        return int(hits[0])


@dataclass(frozen=True, eq=False)
class City:
    """Seed 002's city: M independent distribution networks, one load shape each."""

    feeders: tuple[Feeder, ...]
    load_kinds: tuple[str, ...]  # one of LOAD_KINDS per network

    @property
    def n_network(self) -> int:
        return len(self.feeders)


# ---------------------------------------------------------------------------
# builders


def build_feeder(
    name: str,
    *,
    der: bool = False,
    zones: Sequence[Sequence[int]] | None = None,
    n_zones: int | None = None,
    v_min_pu: float = 0.95,
    v_max_pu: float = 1.05,
    rating_margin: float = 1.5,
) -> Feeder:
    """Build a named feeder.

    Args:
        name: one of ``FEEDERS``.
        der: add the feeder's DER sites (IEEE 33: seed 003's PV, wind and
            diesel; CIGRE MV: pandapower's ``pv_wind`` set).  DER are recorded
            as sites with a capacity and are *not* part of ``base_p_kw``.
        zones: operator zones as lists of pandapower bus indices covering every
            bus once; default: the feeder's own default partition.
        n_zones: instead of ``zones``, split the feeder automatically into this
            many connected zones of similar nominal load.
        v_min_pu, v_max_pu: bus voltage limits, p.u.
        rating_margin: for feeders published without line ratings (IEEE 33),
            each line gets the smallest standard ampacity at least this many
            times its base-case current (ours; documented in the README).
    """
    if name == "ieee33":
        net = _ieee33(der)
    elif name == "feeder14":
        if der:
            raise ValueError("der: feeder14 has no DER sites; use der=False")
        net = _feeder14()
    elif name == "cigre_mv":
        net = pn.create_cigre_network_mv(with_der="pv_wind" if der else False)
        net.sgen["type"] = net.sgen["type"].map({"PV": "pv", "WP": "wind"}).fillna("pv")
        # CIGRE MV sgen p_mw are the installed capacities
        net.sgen["max_p_mw"] = net.sgen["p_mw"]
    else:
        raise ValueError(f"feeder: unknown feeder {name!r}; expected one of {', '.join(FEEDERS)}")
    if zones is None and n_zones is None:
        zones = DEFAULT_ZONES.get(name)
    f = feeder_from_net(net, name, zones=zones, n_zones=n_zones or 3, v_min_pu=v_min_pu,
                        v_max_pu=v_max_pu, rating_margin=rating_margin)
    numbers, numbering = _SOURCE_NUMBERING[name](f)
    return dataclasses.replace(f, bus_numbers=numbers, numbering=numbering)


def _numbered_from_names(f: Feeder, prefix: str = "") -> npt.NDArray[np.int64]:
    return np.array([int(str(f.net.bus.name.loc[b]).removeprefix(prefix)) for b in f.bus_ids], dtype=np.int64)


# How each named feeder's source numbers its buses: configs (``stations.buses``) and reports use these
# numbers, never pandapower's 0-based indices.
_SOURCE_NUMBERING = {
    "ieee33": lambda f: (f.bus_ids + 1, "as in Baran & Wu 1989 and seed 003; bus 1 is the substation"),
    "feeder14": lambda f: (_numbered_from_names(f), "as seed 001's nodes; node 1 is the substation"),
    "cigre_mv": lambda f: (_numbered_from_names(f, "Bus "), "as CIGRE TB 575; bus 0 is the 110 kV side"),
}


def build_city(
    n_networks: int = 3,
    *,
    base: str = "ieee33",
    load_kinds: Sequence[str] | None = None,
    v_min_pu: float = 0.95,
    v_max_pu: float = 1.05,
) -> City:
    """Seed 002's city: ``n_networks`` independent copies of ``base``, each
    with its own load shape (default: cycling residential, commercial, industrial)."""
    if n_networks < 1:
        raise ValueError(f"n_networks: expected an integer >= 1, got {n_networks}")
    kinds = tuple(load_kinds) if load_kinds is not None else tuple(
        LOAD_KINDS[m % len(LOAD_KINDS)] for m in range(n_networks))
    if len(kinds) != n_networks:
        raise ValueError(f"load_kinds: expected {n_networks} entries, got {len(kinds)}")
    for k in kinds:
        if k not in LOAD_KINDS:
            raise ValueError(f"load_kinds: unknown kind {k!r}; expected one of {', '.join(LOAD_KINDS)}")
    feeders = []
    for m in range(n_networks):
        f = build_feeder(base, v_min_pu=v_min_pu, v_max_pu=v_max_pu)
        feeders.append(_renamed(f, f"{base}_net{m}"))
    return City(feeders=tuple(feeders), load_kinds=kinds)


def _renamed(f: Feeder, name: str) -> Feeder:
    return dataclasses.replace(f, name=name)


def _ieee33(der: bool) -> pp.pandapowerNet:
    net = pn.case33bw()
    if der:
        for sites, kind in ((SEED003_PV_KW, "pv"), (SEED003_WIND_KW, "wind"), (SEED003_DIESEL_KW, "diesel")):
            for bus1, p_kw in sites.items():
                pp.create_sgen(net, bus=bus1 - 1, p_mw=0.0, type=kind, max_p_mw=p_kw / 1000.0,
                               name=f"{kind}@{bus1}")
    return net


# Seed 001's "IEEE 14-node test feeder" is published without line data, so we
# build a 14-node radial 10 kV feeder (ours).  Conductors are the common
# Chinese 10 kV overhead types with their textbook per-km data
# (r, x in ohm/km at 20 C; ampacity in kA at 40 C ambient):
_CONDUCTORS = {
    "LGJ-120": (0.27, 0.347, 0.380),
    "LGJ-70": (0.46, 0.365, 0.275),
    "LGJ-50": (0.65, 0.379, 0.220),
}
# (from node, to node, length km, conductor) with nodes 1-based as in the paper;
# node 1 is the 10 kV substation bus.  Main trunk 1-2-3-4-5 to charging station
# node 5; lateral 3-6-7-8-9 to station node 9; lateral 2-10-11-12-13 to station
# node 13; a short spur 4-14.
_FEEDER14_LINES = (
    (1, 2, 2.0, "LGJ-120"), (2, 3, 1.5, "LGJ-120"), (3, 4, 1.5, "LGJ-120"), (4, 5, 1.2, "LGJ-70"),
    (3, 6, 1.0, "LGJ-70"), (6, 7, 1.0, "LGJ-70"), (7, 8, 1.0, "LGJ-70"), (8, 9, 0.8, "LGJ-70"),
    (2, 10, 1.2, "LGJ-70"), (10, 11, 1.0, "LGJ-70"), (11, 12, 0.8, "LGJ-50"), (12, 13, 0.8, "LGJ-50"),
    (4, 14, 1.0, "LGJ-50"),
)
# Nominal (evening peak) residential load per node, kW, power factor 0.95 (ours):
# about 2 MW in all, so the lowest voltage at peak without EVs is ~0.97 p.u.,
# the level seed 001 reports for its worst node.
_FEEDER14_LOAD_KW = {2: 180, 3: 150, 4: 210, 5: 180, 6: 120, 7: 150, 8: 120, 9: 180,
                     10: 150, 11: 120, 12: 120, 13: 150, 14: 90}
FEEDER14_STATION_NODES = (5, 9, 13)  # 1-based, seed 001


def _feeder14() -> pp.pandapowerNet:
    net = pp.create_empty_network(name="evgrid feeder14 (seed 001)", sn_mva=1.0)
    buses = [pp.create_bus(net, vn_kv=10.0, name=str(k)) for k in range(1, 15)]
    pp.create_ext_grid(net, buses[0], vm_pu=1.0, name="substation")
    tan_phi = math.tan(math.acos(0.95))
    for a, b, km, cond in _FEEDER14_LINES:
        r, x, imax = _CONDUCTORS[cond]
        pp.create_line_from_parameters(net, buses[a - 1], buses[b - 1], length_km=km, r_ohm_per_km=r,
                                       x_ohm_per_km=x, c_nf_per_km=0.0, max_i_ka=imax, name=f"{a}-{b} {cond}")
    for node, p_kw in _FEEDER14_LOAD_KW.items():
        pp.create_load(net, buses[node - 1], p_mw=p_kw / 1000.0, q_mvar=p_kw * tan_phi / 1000.0,
                       name=f"residential {node}")
    return net


# ---------------------------------------------------------------------------
# net -> Feeder


def feeder_from_net(
    net: pp.pandapowerNet,
    name: str,
    *,
    zones: Sequence[Sequence[int]] | None = None,
    n_zones: int = 3,
    v_min_pu: float = 0.95,
    v_max_pu: float = 1.05,
    rating_margin: float = 1.5,
) -> Feeder:
    """Wrap any pandapower net with one external grid as a :class:`Feeder`."""
    _check_net(net, v_min_pu, v_max_pu, rating_margin)
    pp.runpp(net, calculate_voltage_angles=True)
    bus_ids = net.bus.index.to_numpy(dtype=np.int64)
    n_bus = bus_ids.size
    pos = {int(b): i for i, b in enumerate(bus_ids)}
    vn_kv = net.bus.vn_kv.to_numpy(dtype=float)
    base_p_kw, base_q_kvar = _nominal_loads(net, pos)
    line_ids, i_max = _line_ratings(net, name, rating_margin)
    trafo_ids = net.trafo.index[net.trafo.in_service].to_numpy(dtype=np.int64)
    kinds, der_bus, der_p_max_kw = _der_sites(net, pos)
    slack_bus = pos[int(net.ext_grid.bus[net.ext_grid.in_service].iloc[0])]
    try:
        tree, mesh_error = _radial_tree(net, bus_ids, line_ids, trafo_ids, i_max), None
    except MeshedFeederError as exc:
        tree, mesh_error = None, str(exc)
        log.warning("feeder %s is meshed; the fast backend is unavailable: %s", name, exc)

    zone_of_bus = _zones(net, bus_ids, pos, zones, n_zones, base_p_kw, slack_bus)
    return Feeder(
        name=name, net=net, bus_ids=bus_ids, vn_kv=vn_kv,
        v_min_pu=np.full(n_bus, v_min_pu), v_max_pu=np.full(n_bus, v_max_pu),
        base_p_kw=base_p_kw, base_q_kvar=base_q_kvar, line_ids=line_ids, line_i_max_ka=i_max,
        trafo_ids=trafo_ids, slack_bus=slack_bus, zone_of_bus=zone_of_bus,
        der_bus=der_bus, der_kind=kinds, der_p_max_kw=der_p_max_kw, tree=tree, mesh_error=mesh_error,
    )


def _check_net(net: pp.pandapowerNet, v_min_pu: float, v_max_pu: float, rating_margin: float) -> None:
    """Refuse limits out of range and nets that :func:`feeder_from_net` cannot wrap."""
    if not 0.0 < v_min_pu < 1.0 < v_max_pu < 2.0:
        raise ValueError(f"v_min_pu, v_max_pu: expected 0 < v_min_pu < 1 < v_max_pu < 2, got {v_min_pu}, {v_max_pu}")
    if rating_margin < 1.0:
        raise ValueError(f"rating_margin: expected >= 1, got {rating_margin}")
    if int(net.ext_grid.in_service.sum()) != 1:
        raise ValueError(f"net: expected exactly one in-service ext_grid, found {int(net.ext_grid.in_service.sum())}")
    if len(net.gen) and net.gen.in_service.any():
        raise ValueError("net: voltage-controlled generators (net.gen) are not supported; model DER as sgen")


def _nominal_loads(net: pp.pandapowerNet, pos: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """In-service loads summed per bus: ``(p_kw, q_kvar)``, each (n_bus,) in ``pos`` order."""
    load = net.load[net.load.in_service]
    base_p_kw = np.zeros(len(pos))
    base_q_kvar = np.zeros(len(pos))
    lb = np.array([pos[int(b)] for b in load.bus], dtype=np.int64)
    np.add.at(base_p_kw, lb, (load.p_mw * load.scaling).to_numpy() * 1e3)
    np.add.at(base_q_kvar, lb, (load.q_mvar * load.scaling).to_numpy() * 1e3)
    return base_p_kw, base_q_kvar


def _line_ratings(net: pp.pandapowerNet, name: str, rating_margin: float) -> tuple[np.ndarray, np.ndarray]:
    """In-service line ids and their ampacities [kA], derating and parallels included.

    Unrated lines get the smallest standard ampacity at least ``rating_margin``
    times their base-case current; that rating is written back to ``net`` and
    the power flow re-run, so the stored results carry it.
    """
    lines = net.line[net.line.in_service]
    line_ids = lines.index.to_numpy(dtype=np.int64)
    i_max = (lines.max_i_ka * lines.df * lines.parallel).to_numpy(dtype=float)
    if np.any(i_max > 1e4):  # pandapower marks "unrated" with 99999 kA
        i_base = np.maximum(net.res_line.i_ka.loc[line_ids].to_numpy(), 1e-6)
        rated = np.array([min((a for a in _STANDARD_AMPACITY_KA if a >= rating_margin * i), default=math.ceil(
            rating_margin * i * 10) / 10) for i in i_base])
        i_max = np.where(i_max > 1e4, rated, i_max)
        net.line.loc[line_ids, "max_i_ka"] = i_max / (lines.df * lines.parallel).to_numpy()
        pp.runpp(net, calculate_voltage_angles=True)  # so the stored results carry the ratings
        log.info("feeder %s: rated %d unrated lines at %.1fx base-case current", name, len(line_ids), rating_margin)
    return line_ids, i_max


def _der_sites(net: pp.pandapowerNet, pos: dict[int, int]) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """In-service static generators as DER sites: kinds, bus positions, capacities [kW]."""
    sg = net.sgen[net.sgen.in_service] if len(net.sgen) else net.sgen
    if not len(sg):
        return (), np.zeros(0, np.int64), np.zeros(0)
    kinds = tuple(str(k) for k in sg["type"].fillna("pv"))
    p_max = sg["max_p_mw"] if "max_p_mw" in sg else sg["p_mw"]
    der_bus = np.array([pos[int(b)] for b in sg.bus], dtype=np.int64)
    return kinds, der_bus, p_max.to_numpy(dtype=float) * 1e3


def _radial_tree(net, bus_ids, line_ids, trafo_ids, line_i_max_ka) -> RadialTree:
    """The :class:`RadialTree` of a net whose power flow has just run (it reads pandapower's internal model)."""
    ppci = net._ppc["internal"]
    lookup = net._pd2ppc_lookups["bus"]
    br = _branch_admittances(ppci)
    order, parent_of, branch_in = _sweep_order(net, ppci, br, _node_labeller(lookup, bus_ids))
    idx = {node: i for i, node in enumerate(order)}
    parent = np.array([-1] + [idx[parent_of[n]] for n in order[1:]], dtype=np.int64)
    coef, r_pu, x_pu, forward, br_of_node = _node_coefficients(br, order, parent_of, branch_in)
    elem_node, ibase, rating = _rated_elements(net, ppci, order, parent, forward, br_of_node, line_ids, trafo_ids,
                                               line_i_max_ka)
    eg = net.ext_grid[net.ext_grid.in_service].iloc[0]
    va = float(eg.va_degree)
    return RadialTree(
        parent=parent, coef=coef,
        node_of_bus=np.array([idx[int(lookup[b])] for b in bus_ids], dtype=np.int64),
        v_slack=complex(float(eg.vm_pu) * np.exp(1j * np.deg2rad(va))), va_slack_deg=va,
        base_mva=float(ppci["baseMVA"]), elem_node=elem_node, elem_ibase_ka=ibase, elem_rating_ka=rating,
        r_pu=r_pu, x_pu=x_pu,
    )


@dataclass(frozen=True, slots=True)
class _BranchAdmittances:
    """pandapower's internal (ppci) branches as two-ports, in ppci branch order, p.u."""

    f: npt.NDArray[np.int64]  # (n_br,) from node
    t: npt.NDArray[np.int64]  # (n_br,) to node
    yff: npt.NDArray[np.complex128]  # (n_br,)
    yft: npt.NDArray[np.complex128]  # (n_br,)
    ytf: npt.NDArray[np.complex128]  # (n_br,)
    ytt: npt.NDArray[np.complex128]  # (n_br,)
    y_sh: npt.NDArray[np.complex128]  # (n_node,) Ybus diagonal less the branches' own ends: the node's shunts


def _branch_admittances(ppci: dict) -> _BranchAdmittances:
    Yf, Yt, Ybus = ppci["Yf"].tocsr(), ppci["Yt"].tocsr(), ppci["Ybus"].tocsr()
    f = ppci["branch"][:, 0].real.astype(np.int64)
    t = ppci["branch"][:, 1].real.astype(np.int64)
    k = np.arange(f.size)
    yff = np.asarray(Yf[k, f]).ravel()
    yft = np.asarray(Yf[k, t]).ravel()
    ytf = np.asarray(Yt[k, f]).ravel()
    ytt = np.asarray(Yt[k, t]).ravel()
    y_sh = Ybus.diagonal().copy()
    np.subtract.at(y_sh, f, yff)
    np.subtract.at(y_sh, t, ytt)
    return _BranchAdmittances(f=f, t=t, yff=yff, yft=yft, ytf=ytf, ytt=ytt, y_sh=y_sh)


def _node_labeller(lookup, bus_ids) -> Callable[[int], str]:
    """``label(node)``: a ppci node named for error messages, by the first feeder bus that maps to it."""
    ppbus_of_node = {}
    for b in bus_ids:
        ppbus_of_node.setdefault(int(lookup[b]), int(b))

    def label(node: int) -> str:
        return f"bus {ppbus_of_node[node]}" if node in ppbus_of_node else f"internal node {node}"

    return label


def _sweep_order(net, ppci, br: _BranchAdmittances,
                 label: Callable[[int], str]) -> tuple[list[int], dict[int, int], dict[int, int]]:
    """Breadth-first tree of the ppci nodes from the slack: parents precede children.

    Returns the nodes in that order, each node's parent node and the ppci
    branch it hangs from (both -1 at the slack).  Raises
    :class:`MeshedFeederError` on a loop or a node the slack does not reach.
    """
    n_node = ppci["bus"].shape[0]
    f, t = br.f, br.t
    ref = np.asarray(ppci["ref"]).ravel()
    if ref.size != 1:
        raise MeshedFeederError(f"expected one slack bus, found {ref.size}")
    root = int(ref[0])
    adj: list[list[tuple[int, int]]] = [[] for _ in range(n_node)]
    for kk in range(f.size):
        adj[f[kk]].append((t[kk], kk))
        adj[t[kk]].append((f[kk], kk))
    order = [root]
    parent_of = {root: -1}
    branch_in = {root: -1}
    head = 0
    while head < len(order):
        u = order[head]
        head += 1
        for v, kk in adj[u]:
            if kk == branch_in[u]:
                continue
            if v in parent_of:
                raise MeshedFeederError(_describe_loop(u, v, kk, parent_of, label, net, ppci))
            parent_of[v] = u
            branch_in[v] = kk
            order.append(v)
    if len(order) != n_node:
        missing = sorted(set(range(n_node)) - set(parent_of))
        raise MeshedFeederError(f"nodes not connected to the slack: {', '.join(label(m) for m in missing[:10])}")
    return order, parent_of, branch_in


def _node_coefficients(br: _BranchAdmittances, order: list[int], parent_of: dict[int, int],
                       branch_in: dict[int, int]) -> tuple[np.ndarray, ...]:
    """Per node in sweep order: :class:`RadialTree`'s ``coef`` rows, the incoming branch's
    series ``r_pu``, ``x_pu``, whether that branch runs parent -> node in ppci's
    from -> to (``forward``), and its ppci branch (``br_of_node``, -1 at the slack)."""
    n_node = len(order)
    coef = np.zeros((n_node, 10))
    r_pu = np.zeros(n_node)
    x_pu = np.zeros(n_node)
    forward = np.ones(n_node, dtype=bool)
    br_of_node = np.full(n_node, -1, dtype=np.int64)
    for i, node in enumerate(order):
        ysh = br.y_sh[node]
        coef[i, 8], coef[i, 9] = ysh.real, ysh.imag
        if i == 0:
            continue
        kk = branch_in[node]
        br_of_node[i] = kk
        if br.f[kk] == parent_of[node]:
            Yff, Yft, Ytf, Ytt = br.yff[kk], br.yft[kk], br.ytf[kk], br.ytt[kk]
        else:
            forward[i] = False
            Yff, Yft, Ytf, Ytt = br.ytt[kk], br.ytf[kk], br.yft[kk], br.yff[kk]
        s = Yff - Yft * Ytf / Ytt
        a = -Yft / Ytt
        c = -Ytf / Ytt
        z = 1.0 / Ytt
        coef[i, 0:8] = s.real, s.imag, a.real, a.imag, c.real, c.imag, z.real, z.imag
        zs = -1.0 / Yft  # series impedance (tap-scaled) for sensitivities
        r_pu[i], x_pu[i] = zs.real, zs.imag
    return coef, r_pu, x_pu, forward, br_of_node


def _rated_elements(net, ppci, order, parent, forward, br_of_node, line_ids, trafo_ids,
                    line_i_max_ka) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:class:`RadialTree`'s ``elem_node``, ``elem_ibase_ka`` and ``elem_rating_ka``: lines, then transformers."""
    # ppci branch rows: pandapower's lines, then trafos, minus out-of-service rows
    ppc_rows = np.cumsum(np.asarray(ppci["branch_is"], dtype=bool)) - 1
    node_of_br = {int(br_of_node[i]): i for i in range(1, len(order))}
    lookups = net._pd2ppc_lookups["branch"]
    base_mva = float(ppci["baseMVA"])
    base_kv = ppci["bus"][:, 9].real
    elem_node, ibase, rating = [], [], []

    def add(kind: str, ids, rating_from, rating_to):
        start = lookups[kind][0]
        elem_index = net[kind].index.get_indexer(ids)
        for j, e in enumerate(elem_index):
            i = node_of_br[int(ppc_rows[start + e])]
            fnode, tnode = order[parent[i]], order[i]
            ibase.append((base_mva / (math.sqrt(3) * base_kv[fnode]), base_mva / (math.sqrt(3) * base_kv[tnode])))
            rf, rt = rating_from[j], rating_to[j]
            rating.append((rf, rt) if forward[i] else (rt, rf))
            elem_node.append(i)

    if len(line_ids):
        add("line", line_ids, line_i_max_ka, line_i_max_ka)
    if len(trafo_ids):
        tr = net.trafo.loc[trafo_ids]
        add("trafo", trafo_ids, (tr.sn_mva / (math.sqrt(3) * tr.vn_hv_kv)).to_numpy() * tr.parallel.to_numpy(),
            (tr.sn_mva / (math.sqrt(3) * tr.vn_lv_kv)).to_numpy() * tr.parallel.to_numpy())
    return (np.array(elem_node, dtype=np.int64), np.array(ibase, dtype=float).reshape(-1, 2),
            np.array(rating, dtype=float).reshape(-1, 2))


def _describe_loop(u, v, kk, parent_of, label, net, ppci) -> str:
    def path(n):
        out = [n]
        while parent_of[out[-1]] != -1:
            out.append(parent_of[out[-1]])
        return out

    pu, pv = path(u), path(v)
    common = next(n for n in pu if n in set(pv))
    loop = pu[: pu.index(common) + 1] + list(reversed(pv[: pv.index(common)]))
    return (f"loop through {' -> '.join(label(n) for n in loop)} -> {label(loop[0])}"
            f" (found at the branch between {label(u)} and {label(v)}); "
            "open a tie switch or use the pandapower backend")


def _zones(net, bus_ids, pos, zones, n_zones, base_p_kw, slack_bus) -> npt.NDArray[np.int64]:
    n_bus = bus_ids.size
    if zones is not None:
        zone_of_bus = np.full(n_bus, -1, dtype=np.int64)
        for k, members in enumerate(zones):
            for b in members:
                if int(b) not in pos:
                    raise ValueError(f"zones: bus {b} in zone {k} is not a bus of the feeder")
                if zone_of_bus[pos[int(b)]] != -1:
                    raise ValueError(f"zones: bus {b} is in zone {zone_of_bus[pos[int(b)]]} and zone {k}")
                zone_of_bus[pos[int(b)]] = k
        missing = bus_ids[zone_of_bus < 0]
        if missing.size:
            raise ValueError(f"zones: buses {missing.tolist()} belong to no zone; every bus needs one")
        return zone_of_bus
    if not 1 <= n_zones <= n_bus:
        raise ValueError(f"n_zones: expected 1..{n_bus}, got {n_zones}")
    return partition_zones(net, bus_ids, base_p_kw, slack_bus, n_zones)


def partition_zones(net, bus_ids, base_p_kw, slack_bus, n_zones) -> npt.NDArray[np.int64]:
    """Split a radial network into ``n_zones`` connected zones of similar load.

    Repeatedly cuts off the subtree whose nominal load is closest to an equal
    share (total / n_zones); what stays attached to the slack is zone 0.
    """
    pos = {int(b): i for i, b in enumerate(bus_ids)}
    n = bus_ids.size
    adj: list[set[int]] = [set() for _ in range(n)]
    for fb, tb, ok in zip(net.line.from_bus, net.line.to_bus, net.line.in_service):
        if ok:
            adj[pos[int(fb)]].add(pos[int(tb)])
            adj[pos[int(tb)]].add(pos[int(fb)])
    for hb, lb, ok in zip(net.trafo.hv_bus, net.trafo.lv_bus, net.trafo.in_service):
        if ok:
            adj[pos[int(hb)]].add(pos[int(lb)])
            adj[pos[int(lb)]].add(pos[int(hb)])
    zone = np.zeros(n, dtype=np.int64)
    load = np.maximum(base_p_kw, 0.0) + 1e-3  # every bus weighs a little, so empty buses still split
    share = load.sum() / n_zones
    for k in range(1, n_zones):
        # subtree loads within the part still in zone 0, rooted at the slack
        order, par = [slack_bus], {slack_bus: -1}
        for u in order:
            for v in adj[u]:
                if v not in par and zone[v] == 0:
                    par[v] = u
                    order.append(v)
        sub = {u: load[u] for u in order}
        for u in reversed(order[1:]):
            sub[par[u]] += sub[u]
        cut = min(order[1:], key=lambda u: abs(sub[u] - share), default=None)
        if cut is None:
            raise ValueError(f"n_zones: cannot split the feeder into {n_zones} connected zones")
        stack = [cut]
        while stack:
            u = stack.pop()
            zone[u] = k
            stack.extend(v for v in adj[u] if par.get(v) == u)
    return zone
