"""The grouped view's slots: each station's plugged EVs in a padded set of ``slots`` places.

An EV takes the lowest free slot of its station when it plugs in and keeps it until it leaves, so a
slot's features follow one EV through its stay.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from evgrid.envs import stations as st

IntArray = npt.NDArray[np.int64]


class Slots:
    """``owner`` (stations of all environments x slots): the session in each slot, -1 where empty."""

    def __init__(self, n_station_total: int, n_slots: int, n_sessions: int) -> None:
        self.owner = np.full((n_station_total, n_slots), -1, dtype=np.int64)
        self.slot_of = np.full(n_sessions, -1, dtype=np.int64)  # (S,) each session's slot, -1 without one

    def assign(self, plugged: IntArray, station: IntArray) -> None:
        """Give each plugged session without a slot the lowest free slot of its station (``station``: every
        session's global station)."""
        new = plugged[self.slot_of[plugged] < 0]
        if new.size == 0:
            return
        stn = station[new]
        order = np.argsort(stn, kind="stable")
        new, stn = new[order], stn[order]
        rank = np.arange(new.size) - st.group_starts(stn)
        free_s, free_k = np.nonzero(self.owner < 0)  # sorted by station, then slot
        slot = free_k[np.searchsorted(free_s, stn) + rank]
        self.owner[stn, slot] = new
        self.slot_of[new] = slot

    def free(self, left: IntArray, station: IntArray) -> None:
        """Empty the slots of sessions ``left``."""
        if left.size:
            self.owner[station[left], self.slot_of[left]] = -1
