"""In-station dispatch: share a station's power limit among its plugged EVs.

All functions work on every plugged EV of every station at once
(``station[n]`` says which station each row belongs to), never by Python
loops over EVs: equal sharing is a compiled numba kernel (a few passes over
the EVs with per-station accumulators); the rest forms groups by sorting.

Rules:

* ``equal`` — equal share (water-filling): every EV gets ``min(request, λ)``
  with λ chosen per station so the station limit is met exactly when it binds.
* ``llf`` — seed 002's on/off least-laxity-first: EVs are ranked by urgency
  ``c / e`` (``c`` remaining charge slots, ``e`` remaining parking slots,
  both rounded conservatively), ties by smaller ``e``; the first
  ``round(fraction * n_present)`` of them charge at their request (full power
  under rule control) while the station limit lasts; the rest idle.
* ``cap`` — every EV charges at most a fraction of its charger's limit (a
  power level the station sets for all its EVs); equal share under the
  station limit.

A learned station's action (``fraction_levels``) means: for ``equal``, its
limit as a share of ``p_max_kw``; for ``llf``, the share of present EVs
that charge; for ``cap``, the per-EV power level.  Under rule control the
fraction is 1.

Discharge (V2G) is never curtailed by the station limit: it lowers the
station's draw.  The limit applies to the sum of charging power.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np
import numpy.typing as npt

from evgrid.validate import check_choice, check_int, check_ints, check_real, check_reals

DISPATCH = ("equal", "llf", "cap")


@dataclass(frozen=True)
class StationConfig:
    """Charging stations of one environment."""

    n_station: int = 6
    """Number of stations, 1..10,000."""
    buses: tuple[int, ...] | None = None
    """Bus of each station in the feeder's own numbering (``ieee33`` 1-33 and ``feeder14`` 1-14, bus 1 the
    substation; ``cigre_mv`` 0-14: ``Feeder.numbering``); None spreads them over the zones' load buses."""
    ports: int = 100
    """Charging ports per station; an EV that finds all ports busy is turned away (its session is logged), 1..1e6."""
    p_max_kw: float = 500.0
    """Station connection limit on the sum of charging power, kW."""
    dispatch: str = "equal"
    """Sharing rule: ``equal``, ``llf`` (seed 002) or ``cap``; see the module docstring."""
    fraction_levels: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Discrete actions of a learned station: share of ``p_max_kw`` (``equal``), of present EVs that charge
    (``llf``) or of each charger's limit (``cap``)."""
    c_max: int = 8
    """Rows of the count matrix N[c, e] (remaining charge slots, larger ones in the last row), 1..96."""
    e_max: int = 16
    """Columns of N[c, e] (remaining parking slots), >= c_max."""

    def __post_init__(self) -> None:
        check_int("n_station", self.n_station, 1, 10_000)
        if self.buses is not None:
            check_ints("buses", self.buses, 0, n=self.n_station)
        check_int("ports", self.ports, 1, 1_000_000)
        check_real("p_max_kw", self.p_max_kw, 0.0, 1e6, lo_open=True)
        check_choice("dispatch", self.dispatch, DISPATCH)
        check_reals("fraction_levels", self.fraction_levels, 0.0, 1.0, min_len=1)
        check_int("c_max", self.c_max, 1, 96)
        check_int("e_max", self.e_max, self.c_max, 192)


def group_starts(sorted_group: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """For rows sorted by group (station, environment): the position of each row's group start."""
    n = sorted_group.shape[0]
    new = np.ones(n, dtype=bool)
    new[1:] = sorted_group[1:] != sorted_group[:-1]
    return np.maximum.accumulate(np.where(new, np.arange(n), 0))


def _segment_cumsum(x: npt.NDArray[np.float64], starts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Inclusive cumulative sum within groups (rows already sorted by group)."""
    c = np.cumsum(x)
    before = np.concatenate([[0.0], c])[starts]
    return c - before


# Water-filling passes before what is left gets sorted.  A pass is O(n) and serves most of what is
# left: random and tied fleets finish in 1-7, and even inputs built to serve one EV per pass stop in a
# few because λ's rise shrinks geometrically in floating point.  The sort bounds any input to O(n log n).
_MAX_PASSES = 16


@nb.njit(cache=True, nogil=True)
def _serve(r, s, rem, err, cnt, lam):
    """Serve a request that fits under ``lam[s]`` in full and raise ``lam[s]`` to the new lower bound.

    The budget left, ``cap - Σ served``, is Neumaier-compensated (``rem + err``): once most EVs of a
    large station are served it is a small difference of large numbers, and plain subtraction would
    cost λ digits."""
    t = rem[s] - r
    if abs(rem[s]) >= abs(r):
        err[s] += (rem[s] - t) - r
    else:
        err[s] += (-r - t) + rem[s]
    rem[s] = t
    cnt[s] -= 1
    if cnt[s] > 0:
        lam[s] = (rem[s] + err[s]) / cnt[s]


@nb.njit(cache=True, nogil=True)
def _equal_share_kernel(req, station, cap, out, max_passes):
    """Fill ``out`` (a copy of ``req`` when every station is within its cap); returns 1 + the first
    row whose station is out of range, else 0.  After ``max_passes`` passes what is left is sorted.

    ``lam[s] = (cap_s - Σ served) / n_unserved`` is a lower bound on λ_s (were every unserved EV given
    it, the limit would be met exactly, and each gets at most that), so an unserved request <= lam[s]
    is served in full, which raises the bound.  Once no unserved request is <= lam[s], the unserved
    EVs take lam[s] each and meet the limit exactly: lam[s] is λ_s."""
    n = req.shape[0]
    n_st = cap.shape[0]
    rem = np.zeros(n_st)
    cnt = np.zeros(n_st, dtype=np.int64)
    for i in range(n):
        s = station[i]
        if s < 0 or s >= n_st:
            return i + 1
        rem[s] += req[i]  # in row order, as np.bincount sums: the old within-cap decision exactly
        cnt[s] += 1
    binds = np.zeros(n_st, dtype=np.bool_)
    lam = np.full(n_st, np.inf)
    err = np.zeros(n_st)
    any_binds = False
    for s in range(n_st):
        if cnt[s] > 0 and not rem[s] <= cap[s]:
            binds[s] = True
            any_binds = True
            rem[s] = cap[s]
            lam[s] = cap[s] / cnt[s]
    if not any_binds:
        out[:] = req
        return 0
    # rows of binding stations take part in the passes; the others get their request
    active = np.empty(n, dtype=np.int64)
    m = 0
    for i in range(n):
        if binds[station[i]]:
            active[m] = i
            m += 1
        else:
            out[i] = req[i]
    converged = False
    for _ in range(max_passes):
        k = 0
        for j in range(m):
            i = active[j]
            s = station[i]
            r = req[i]
            if r <= lam[s]:
                out[i] = r
                _serve(r, s, rem, err, cnt, lam)
            else:
                active[k] = i
                k += 1
        if k == m:
            converged = True  # nobody served: every lam is exact
            break
        m = k
    if not converged:
        # still progressing: by ascending request, each station's first request above lam fixes it
        rest = active[:m][np.argsort(req[active[:m]])]
        done = np.zeros(n_st, dtype=np.bool_)
        k = 0
        for j in range(m):
            i = rest[j]
            s = station[i]
            if not done[s] and req[i] <= lam[s]:
                out[i] = req[i]
                _serve(req[i], s, rem, err, cnt, lam)
            else:
                done[s] = True
                active[k] = i
                k += 1
        m = k
    for j in range(m):
        i = active[j]
        out[i] = min(req[i], max(lam[station[i]], 0.0))
    return 0


def equal_share(req_kw: npt.NDArray[np.float64], station: npt.NDArray[np.int64],
                cap_kw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Water-filling: ``min(req, λ_s)`` per EV with ``Σ = min(Σ req, cap_s)`` per station ``s``.

    ``req_kw`` (n,) >= 0 charging requests; ``station`` (n,) in [0, n_station_total);
    ``cap_kw`` (n_station_total,) >= 0 (a station with cap 0 gives its EVs 0).

    Compiled (numba), sort-free: per station, requests at or below the running lower bound
    ``(cap - Σ served) / n_unserved`` are served in full until none is (see ``_equal_share_kernel``).
    A few O(n) passes replace the two argsorts over all EVs the numpy version needed (about 8x faster
    at 8,000 EVs).  λ_s is computed directly, so ties in the requests need no tie-breaking.
    """
    n = req_kw.shape[0]
    if n == 0:
        return req_kw.copy()
    req = np.ascontiguousarray(req_kw, dtype=np.float64)
    stn = np.ascontiguousarray(station, dtype=np.int64)
    cap = np.ascontiguousarray(cap_kw, dtype=np.float64)
    if stn.shape != (n,):  # the kernel indexes without bounds checks
        raise ValueError(f"station: expected shape ({n},) (one per EV), got {stn.shape}")
    # one allocation: the kernel copies req itself when every station is within its cap (an unused
    # large `out` plus req.copy() would make the copy land on fresh pages, 4x slower at 100,000 EVs)
    out = np.empty(n)
    bad = _equal_share_kernel(req, stn, cap, out, _MAX_PASSES)  # 1 + the first row out of range, else 0
    if bad:
        raise ValueError(f"station: expected indices in [0, {cap.shape[0]}), got {stn[bad - 1]} at row {bad - 1}")
    return out


def llf_dispatch(req_kw: npt.NDArray[np.float64], station: npt.NDArray[np.int64], cap_kw: npt.NDArray[np.float64],
                 fraction: npt.NDArray[np.float64], c_slots: npt.NDArray[np.int64],
                 e_slots: npt.NDArray[np.int64],
                 always_on: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.float64]:
    """On/off LLF: per station, the ``round(fraction * n)`` most urgent EVs, and those ``always_on`` marks,
    charge at their request while the cumulative power stays within ``cap_kw``; everyone else gets 0.

    ``fraction`` (n_station_total,) in [0, 1]; urgency ``c / e`` (an EV with ``e <= 0`` is most urgent).
    """
    n = req_kw.shape[0]
    out = np.zeros(n)
    if n == 0:
        return out
    urgency = np.where(e_slots > 0, c_slots / np.maximum(e_slots, 1), np.inf)
    # EVs that need nothing go last: charging them is never urgent
    urgency = np.where(c_slots > 0, urgency, -1.0)
    order = np.lexsort((e_slots, -urgency, station))
    s_sorted = station[order]
    starts = group_starts(s_sorted)
    rank = np.arange(n) - starts
    n_present = np.bincount(station, minlength=cap_kw.shape[0])
    n_on = np.rint(fraction * n_present).astype(np.int64)
    r_sorted = req_kw[order]
    chosen = rank < n_on[s_sorted]
    if always_on is not None:
        chosen |= always_on[order]
    cum = _segment_cumsum(np.where(chosen, r_sorted, 0.0), starts)  # the chosen EVs ranked up to each
    on = chosen & (cum <= cap_kw[s_sorted] * (1 + 1e-12))
    out[order] = np.where(on, r_sorted, 0.0)
    return out


def count_matrix(c_slots: npt.NDArray[np.int64], e_slots: npt.NDArray[np.int64], station: npt.NDArray[np.int64],
                 n_station: int, c_max: int, e_max: int) -> npt.NDArray[np.float64]:
    """Seed 002's N[c, e] per station: EVs by remaining charge slots (rows 0..c_max, larger in the
    last) and parking slots (columns 0..e_max, larger in the last).  Shape (n_station, c_max+1, e_max+1)."""
    c = np.minimum(np.maximum(c_slots, 0), c_max)
    e = np.minimum(np.maximum(e_slots, 0), e_max)
    flat = (station * (c_max + 1) + c) * (e_max + 1) + e
    counts = np.bincount(flat, minlength=n_station * (c_max + 1) * (e_max + 1))
    return counts.reshape(n_station, c_max + 1, e_max + 1).astype(np.float64)
