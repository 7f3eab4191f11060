"""Station selection for charging requests (seed 002), vectorised over requests.

A charging request has a position ``pos_km`` in a square city area, a state of
charge and a battery capacity.  Seed 002 (section 2.1) routes it in three steps:

1. distances from the request to every station, a matrix ``D[n, m]``;
2. the request's remaining range ``d_i = SOC_i * D_max`` (``D_max`` the range
   on a full battery); the *reachable* (candidate) stations are those with
   ``D[i, j] <= d_i``;
3. **LBMS** (load balancing matching strategy): the recommended station is the
   reachable one whose distribution network has the lowest current total load.
   Requests of one step are assigned one after another, in request order, each
   seeing the load the earlier ones added (``add_kw``: ours, the charging power
   each EV will draw), so a batch does not herd onto one station.  The
   simulator adds the EVs of earlier steps still on their way
   (``lbms_load="committed"``, ours) unless told to compare the current load
   alone (``"current"``), under which consecutive steps herd (README, seed 002).

The EV then drives at constant speed ``v``: travel time ``D[i, j] / v``, and
charging starts on arrival.  Seed 002 also varies the *user participation
rate* from 0 % to 100 %: a participating EV follows the LBMS recommendation,
the others choose for themselves, which the paper models as the uncoordinated
default, the nearest station; we take the nearest *reachable* one.

Choices of ours where the paper is silent:

* distance is straight-line (Euclidean) by default; the paper names no metric.
  ``metric="manhattan"`` gives grid-street distances instead.
* ``D_max = cap_kwh / consumption_kwh_per_km`` and an optional reserve:
  ``range = max(soc - reserve_soc, 0) * cap_kwh / consumption_kwh_per_km``.
* ties in load go to the nearer station, then to the lower index.
* an EV that reaches no station is sent to the nearest one and flagged
  ``reachable=False``; its travel energy may exceed its battery (the simulator
  clamps SOC at 0 and should count such EVs).
* the energy spent driving, ``distance * consumption``, is reported so the
  simulator can subtract it from the battery on arrival.

Sign convention of ``load_kw``: the current total load (kW) of the
distribution network each station sits on, as supplied by the simulator; load
positive, net generation negative.

Everything works on ``[n, m]`` arrays (requests x stations).  Large batches are
processed in row chunks of at most :data:`CHUNK_ELEMENTS` matrix elements, so
100,000 requests x 50 stations never build a full 5e6-element matrix; the
results do not depend on the chunk size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numba as nb
import numpy as np
import numpy.typing as npt

from evgrid.validate import as_array, check_choice, check_int, check_real

logger = logging.getLogger(__name__)

POLICIES = ("nearest", "lbms")
LBMS_LOADS = ("current", "committed")
METRICS = ("euclidean", "manhattan")

CHUNK_ELEMENTS = 4_000_000
"""Largest ``[rows, m]`` block built at once (float64: 32 MB per temporary array)."""


@dataclass(frozen=True)
class RoutingConfig:
    """How charging requests choose a station (seed 002)."""

    policy: str = "nearest"
    """``nearest`` (every EV to its nearest reachable station) or ``lbms`` (seed 002's least-loaded reachable)."""
    lbms_load: str = "committed"
    """What LBMS compares besides the requests of the step assigned before: ``committed`` (ours) each network's
    load now plus the charger power of the EVs still driving to its station, or ``current`` (the paper's
    wording) the load now only, so an EV assigned in an earlier step counts once it charges."""
    participation: float = 1.0
    """Share of EVs that follow the LBMS recommendation, 0..1 (seed 002 varies 0-100 %); the rest go to the nearest reachable station."""
    speed_kmh: float = 30.0
    """Constant travel speed, km/h, in (0, 300] (ours; seed 002 gives no value)."""
    consumption_kwh_per_km: float = 0.18
    """Driving consumption, kWh/km, in (0, 5]; converts battery energy into range (ours)."""
    area_km: float = 10.0
    """Side of the square city area holding requests and stations, km, in (0, 1000] (ours)."""
    reserve_soc: float = 0.0
    """SOC kept in reserve when computing range, in [0, 1) (ours; 0 = the paper's ``SOC * D_max``)."""
    metric: str = "euclidean"
    """Distance metric: ``euclidean`` (straight line) or ``manhattan`` (grid streets) (ours; the paper names none)."""

    def __post_init__(self) -> None:
        check_choice("policy", self.policy, POLICIES)
        check_choice("lbms_load", self.lbms_load, LBMS_LOADS)
        check_real("participation", self.participation, 0.0, 1.0)
        check_real("speed_kmh", self.speed_kmh, 0.0, 300.0, lo_open=True)
        check_real("consumption_kwh_per_km", self.consumption_kwh_per_km, 0.0, 5.0, lo_open=True)
        check_real("area_km", self.area_km, 0.0, 1000.0, lo_open=True)
        check_real("reserve_soc", self.reserve_soc, 0.0, 1.0, hi_open=True)
        check_choice("metric", self.metric, METRICS)


@dataclass(frozen=True)
class RouteResult:
    """Where each request goes and what the trip costs; one row per request."""

    station: npt.NDArray[np.int64]  # (n,) chosen station index in [0, m)
    distance_km: npt.NDArray[np.float64]  # (n,) trip length to the chosen station
    travel_h: npt.NDArray[np.float64]  # (n,) distance_km / speed_kmh
    e_travel_kwh: npt.NDArray[np.float64]  # (n,) distance_km * consumption_kwh_per_km, spent on the way
    followed: npt.NDArray[np.bool_]  # (n,) drawn to follow the LBMS recommendation (always False for "nearest")
    reachable: npt.NDArray[np.bool_]  # (n,) False: no station within range, sent to the nearest one


# ------------------------------------------------------------------ validation

def _check_xy(name: str, x: object, rows: str) -> npt.NDArray[np.float64]:
    return as_array(name, x, shape=(None, 2), shape_names=f"({rows}, 2)", what="coordinates")


def _check_vec(name: str, x: object, n: int, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, allow_inf: bool = False) -> npt.NDArray[np.float64]:
    return as_array(name, x, shape=(n,), shape_names=f"({n},), one value per request", lo=lo, hi=hi,
                    lo_open=lo_open, allow_inf=allow_inf)


def _check_stations(station_xy_km: object) -> npt.NDArray[np.float64]:
    xy = _check_xy("station_xy_km", station_xy_km, "m")
    if xy.shape[0] == 0:
        raise ValueError("station_xy_km: expected at least one station, got shape (0, 2)")
    return xy


def _check_load(load_kw: object, n: int, m: int) -> npt.NDArray[np.float64]:
    a = as_array("load_kw", load_kw, what="loads")
    if a.shape not in ((m,), (n, m)):
        raise ValueError(f"load_kw: expected shape ({m},) or ({n}, {m}), got {a.shape}")
    return a


# ------------------------------------------------------------------ geometry

def station_layout(n_station: int, area_km: float,
                   rng: np.random.Generator | None = None) -> npt.NDArray[np.float64]:
    """Station coordinates in the square ``[0, area_km]^2``, km, shape ``(n_station, 2)``.

    With ``rng`` None the layout is deterministic: a regular grid of
    ``ceil(sqrt(n))`` columns, each station at the centre of its cell, the
    last (partial) row spread evenly over the full width so the layout stays
    balanced (one station sits at the centre, two side by side, ...).
    With ``rng`` the stations are uniform at random in the square.
    """
    n = check_int("n_station", n_station, 1, 10_000_000)
    side = check_real("area_km", area_km, 0.0, math.inf, lo_open=True)
    if rng is not None:
        return rng.uniform(0.0, side, (n, 2))
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    idx = np.arange(n)
    row, col = idx // cols, idx % cols
    in_row = np.where(row == rows - 1, n - cols * (rows - 1), cols)  # (n,) stations sharing the row
    x = (col + 0.5) / in_row * side
    y = (row + 0.5) / rows * side
    return np.stack([x, y], axis=1)


def _dist(pos: npt.NDArray[np.float64], xy: npt.NDArray[np.float64], metric: str) -> npt.NDArray[np.float64]:
    dx = pos[:, None, 0] - xy[None, :, 0]  # (n, m)
    dy = pos[:, None, 1] - xy[None, :, 1]  # (n, m)
    if metric == "manhattan":
        return np.abs(dx) + np.abs(dy)
    return np.sqrt(dx * dx + dy * dy)


def distance_km(pos_km: npt.ArrayLike, station_xy_km: npt.ArrayLike,
                metric: str = "euclidean") -> npt.NDArray[np.float64]:
    """Distance from every request to every station, km, shape ``(n, m)``.

    Straight-line (Euclidean) by default (ours: seed 002 names no metric);
    ``metric="manhattan"`` sums the coordinate differences (grid streets).
    Builds the full matrix: callers with huge ``n * m`` use :func:`route`,
    which works in chunks.
    """
    check_choice("metric", metric, METRICS)
    pos = _check_xy("pos_km", pos_km, "n")
    xy = _check_stations(station_xy_km)
    return _dist(pos, xy, metric)


def trip(pos_km: npt.ArrayLike, to_xy_km: npt.ArrayLike, cfg: RoutingConfig) -> tuple[npt.NDArray[np.float64], ...]:
    """Travel time (h) and battery energy (kWh) of each request's trip to its own station ``to_xy_km`` (n, 2)."""
    pos = _check_xy("pos_km", pos_km, "n")
    to = _check_xy("to_xy_km", to_xy_km, "n")
    if to.shape != pos.shape:
        raise ValueError(f"to_xy_km: expected one station position per request, shape {pos.shape}, got {to.shape}")
    d = np.abs(pos - to).sum(axis=1) if cfg.metric == "manhattan" else np.hypot(*(pos - to).T)
    return d / cfg.speed_kmh, d * cfg.consumption_kwh_per_km


def range_km(soc: npt.ArrayLike, cap_kwh: npt.ArrayLike, cfg: RoutingConfig) -> npt.NDArray[np.float64]:
    """Remaining driving range, km, shape ``(n,)``: ``max(soc - reserve_soc, 0) * cap_kwh / consumption``.

    Seed 002's ``d_i = SOC_i * D_max`` with ``D_max = cap_kwh / consumption``
    when ``reserve_soc`` is 0.
    """
    s = as_array("soc", soc, shape=(None,), shape_names="(n,), one value per request", lo=0.0, hi=1.0)
    n = s.shape[0]
    cap = _check_vec("cap_kwh", cap_kwh, n, 0.0, lo_open=True)
    return np.maximum(s - cfg.reserve_soc, 0.0) * cap / cfg.consumption_kwh_per_km


# ------------------------------------------------------------------ selection

def _row_chunks(n: int, m: int, chunk_elements: int | None) -> Iterator[slice]:
    limit = CHUNK_ELEMENTS if chunk_elements is None else check_int("chunk_elements", chunk_elements, 1)
    rows = max(1, limit // m)
    for lo in range(0, n, rows):
        yield slice(lo, min(lo + rows, n))


@nb.njit(cache=True, nogil=True)
def _lbms_in_order(d, reach, load, follow, near, add_kw, added, out):  # pragma: no cover (compiled)
    """Requests one after another: a follower takes the reachable station of least ``load + added`` (ties: the
    nearer, then the lower index; none reachable: ``near``), the others ``near``; each adds its ``add_kw`` to
    ``added`` at its station, which the later requests see."""
    c, m = d.shape
    for i in range(c):
        pick = near[i]
        if follow[i]:
            best, best_load, best_d = -1, 0.0, 0.0
            for j in range(m):
                if reach[i, j]:
                    x = load[i, j] + added[j]
                    if best < 0 or x < best_load or (x == best_load and d[i, j] < best_d):
                        best, best_load, best_d = j, x, d[i, j]
            if best >= 0:
                pick = best
        out[i] = pick
        added[pick] += add_kw[i]


def _select(pos: npt.NDArray[np.float64], reach_km: npt.NDArray[np.float64] | None,
            xy: npt.NDArray[np.float64], load: npt.NDArray[np.float64] | None,
            follow: npt.NDArray[np.bool_] | None, metric: str, chunk_elements: int | None,
            add_kw: npt.NDArray[np.float64] | None = None,
            ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Chosen station, its distance and whether any station was reachable, chunk by chunk.

    Rows with ``follow`` True take the LBMS choice (needs ``load``), the others
    the nearest reachable station; ``reach_km`` None means unlimited range.
    With ``add_kw`` the rows are assigned in order, each adding its power to its
    station's load for the rows after it (:func:`_lbms_in_order`).
    """
    n, m = pos.shape[0], xy.shape[0]
    station = np.empty(n, dtype=np.int64)
    dist_out = np.empty(n)
    any_reach = np.ones(n, dtype=bool)
    added = np.zeros(m)  # (m,) power the rows assigned so far add, carried across chunks
    for sl in _row_chunks(n, m, chunk_elements):
        d = _dist(pos[sl], xy, metric)  # (c, m)
        c = d.shape[0]
        rows = np.arange(c)
        nearest_any = np.argmin(d, axis=1)  # (c,)
        if reach_km is None:
            reach = None
            near = nearest_any
        else:
            reach = d <= reach_km[sl, None]  # (c, m)
            ok = reach.any(axis=1)  # (c,)
            any_reach[sl] = ok
            near = np.where(ok, np.argmin(np.where(reach, d, np.inf), axis=1), nearest_any)
        pick = near
        fol = None if follow is None else follow[sl]
        if fol is not None and add_kw is not None:
            assert load is not None
            ld = np.ascontiguousarray(np.broadcast_to(load[sl] if load.ndim == 2 else load[None, :], d.shape))
            ok_reach = np.ones(d.shape, dtype=bool) if reach is None else reach
            pick = np.empty(c, dtype=np.int64)
            _lbms_in_order(d, ok_reach, ld, fol, near, add_kw[sl], added, pick)
        elif fol is not None and fol.any():
            assert load is not None
            ld = load[sl] if load.ndim == 2 else load[None, :]  # (c, m) or (1, m)
            # unreachable stations can never be the least loaded
            ld = np.broadcast_to(ld, d.shape) if reach is None else np.where(reach, ld, np.inf)
            least = ld.min(axis=1, keepdims=True)  # (c, 1); inf when nothing is reachable
            cand = ld == least if reach is None else reach & (ld == least)  # (c, m)
            # ties in load: the nearer station, then the lower index (argmin's first hit)
            rec = np.argmin(np.where(cand, d, np.inf), axis=1)
            if reach is not None:
                rec = np.where(any_reach[sl], rec, nearest_any)
            pick = np.where(fol, rec, near)
        station[sl] = pick
        dist_out[sl] = d[rows, pick]
    return station, dist_out, any_reach


def nearest(pos_km: npt.ArrayLike, station_xy_km: npt.ArrayLike, range_km: npt.ArrayLike | None = None, *,
            metric: str = "euclidean", chunk_elements: int | None = None) -> npt.NDArray[np.int64]:
    """Index of each request's nearest station, shape ``(n,)``.

    With ``range_km`` only stations within range count; a request that
    reaches none goes to the nearest station overall (:func:`route` flags it
    ``reachable=False``).  Ties: the lower station index.
    """
    check_choice("metric", metric, METRICS)
    pos = _check_xy("pos_km", pos_km, "n")
    xy = _check_stations(station_xy_km)
    rk = None if range_km is None else _check_vec("range_km", range_km, pos.shape[0], 0.0, allow_inf=True)
    return _select(pos, rk, xy, None, None, metric, chunk_elements)[0]


def lbms(pos_km: npt.ArrayLike, range_km: npt.ArrayLike, station_xy_km: npt.ArrayLike, load_kw: npt.ArrayLike, *,
         metric: str = "euclidean", chunk_elements: int | None = None,
         add_kw: npt.ArrayLike | None = None) -> npt.NDArray[np.int64]:
    """Seed 002's LBMS recommendation, shape ``(n,)``.

    Among the stations within ``range_km`` the one whose network load
    ``load_kw`` (``(m,)``, or ``(n, m)`` per request) is lowest; ties go to the
    nearer station.  A request that reaches none goes to the nearest station.
    ``add_kw`` ``(n,)``: requests are assigned in order, each adding its power
    to its station's load for the later ones (None: all see ``load_kw`` alone).
    """
    check_choice("metric", metric, METRICS)
    pos = _check_xy("pos_km", pos_km, "n")
    n = pos.shape[0]
    xy = _check_stations(station_xy_km)
    rk = _check_vec("range_km", range_km, n, 0.0, allow_inf=True)
    load = _check_load(load_kw, n, xy.shape[0])
    add = None if add_kw is None else _check_vec("add_kw", add_kw, n, 0.0)
    return _select(pos, rk, xy, load, np.ones(n, dtype=bool), metric, chunk_elements, add)[0]


def route(pos_km: npt.ArrayLike, soc: npt.ArrayLike, cap_kwh: npt.ArrayLike, station_xy_km: npt.ArrayLike,
          load_kw: npt.ArrayLike, cfg: RoutingConfig, rng: np.random.Generator | None = None, *,
          chunk_elements: int | None = None, add_kw: npt.ArrayLike | None = None) -> RouteResult:
    """Route a batch of charging requests (seed 002, section 2.1).

    ``pos_km`` ``(n, 2)`` request positions; ``soc`` ``(n,)`` in [0, 1] at the
    request; ``cap_kwh`` ``(n,)`` battery capacities; ``station_xy_km``
    ``(m, 2)``; ``load_kw`` the current network load behind each station,
    ``(m,)`` shared by all requests or ``(n, m)`` per request (e.g. requests
    from environments with different loads).

    Policy ``lbms``: each EV follows the recommendation with probability
    ``cfg.participation`` (one uniform draw per EV from ``rng``; no draw, and
    no ``rng`` needed, when participation is 0 or 1); the others go to their
    nearest reachable station.  Policy ``nearest``: every EV goes to its
    nearest reachable station and ``rng`` is not used.  ``add_kw`` ``(n,)``:
    the power each EV will draw; LBMS then assigns the requests in order, each
    seeing what the earlier ones (followers or not) added to their stations.
    """
    if not isinstance(cfg, RoutingConfig):
        raise ValueError(f"cfg: expected a RoutingConfig, got {type(cfg).__name__}")
    pos = _check_xy("pos_km", pos_km, "n")
    n = pos.shape[0]
    s = _check_vec("soc", soc, n, 0.0, 1.0)
    cap = _check_vec("cap_kwh", cap_kwh, n, 0.0, lo_open=True)
    xy = _check_stations(station_xy_km)
    load = _check_load(load_kw, n, xy.shape[0])
    add = None if add_kw is None or cfg.policy == "nearest" else _check_vec("add_kw", add_kw, n, 0.0)

    if cfg.policy == "nearest" or cfg.participation == 0.0:
        followed = np.zeros(n, dtype=bool)
    elif cfg.participation == 1.0:
        followed = np.ones(n, dtype=bool)
    else:
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng: expected a numpy Generator for participation {cfg.participation}, got {rng!r}")
        followed = rng.random(n) < cfg.participation

    reach_km = range_km(s, cap, cfg)
    station, dist, reachable = _select(pos, reach_km, xy, load, followed, cfg.metric, chunk_elements, add)
    if n and not reachable.all():
        logger.debug("route: %d of %d requests reach no station; sent to the nearest", int((~reachable).sum()), n)
    return RouteResult(station=station, distance_km=dist, travel_h=dist / cfg.speed_kmh,
                       e_travel_kwh=dist * cfg.consumption_kwh_per_km, followed=followed, reachable=reachable)
