"""Action decoding: the agents' actions of every environment checked against their spaces and turned into
the simulator's :class:`SimActions`.

Every action must lie in its agent's space (gymnasium's ``contains``, except that any real dtype is taken for
a Box): an operator's multiplier is an array of shape (1,), a discrete action an integer scalar, a ``Dict``
action a mapping with exactly its keys. With stationary storage an operator's action also carries its zone's
storage set-point as a share of each unit's ``p_max_kw`` (> 0 charges): a Box action is then (multiplier,
share) of shape (2,), a level action a (price level, storage level) pair. Anything else raises a ValueError
naming the agent (and its environment when there are several) and what its space expects, before the simulator
moves. Whole batches are checked at once; only a batch that fails is looked at agent by agent, to name the
culprit.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import Any

import numpy as np
import numpy.typing as npt

from evgrid.envs import market as mk
from evgrid.envs.sim import Sim
from evgrid.envs.state import IDLE, SimActions
from evgrid.validate import describe

IntArray = npt.NDArray[np.int64]
_EV_KEYS = {"mode", "power"}


class ActionDecoder:
    """Checks and decodes the actions of ``sim``'s environments; ``ops``, ``stns``: the operator and station
    agent ids (empty where the level runs its rule); ``view``: the EV view; ``n_slots``: slots per station
    in the grouped view."""

    def __init__(self, sim: Sim, ops: list[str], stns: list[str], view: str, n_slots: int) -> None:
        self.sim, self.ops, self.stns, self.view, self.n_slots = sim, ops, stns, view, n_slots
        cfg = sim.cfg
        self._levels = np.asarray(cfg.market.price_levels, dtype=float)
        self._fractions = np.asarray(cfg.stations.fraction_levels, dtype=float)
        self._units = sim.layout.storage
        self._storage_levels = np.asarray(cfg.storage.levels if cfg.storage is not None else (), dtype=float)

    def label(self, agent: str, e: int) -> str:
        """An agent's name in messages: its id, and its environment when there are several."""
        return repr(agent) if self.sim.n_env == 1 else f"{agent!r} (env {e})"

    def decode(self, actions: Any, live: list[list[str]], slot_owner: IntArray | None) -> SimActions:
        """``actions[e]``: one action per live agent of environment e (``live[e]``)."""
        self._check_agents(actions, live)
        act = SimActions()
        if self.ops:
            self._operators(actions, act)
        if self.stns:
            lv = self._discrete(actions, self.stns, len(self._fractions)).ravel()  # global station order
            act.station_fraction = self._fractions[lv]
        if self.view == "individual":
            self._individual(actions, act)
        elif self.view == "grouped":
            self._grouped(actions, act, slot_owner)
        return act

    def _check_agents(self, actions: Any, live: list[list[str]]) -> None:
        n_env = self.sim.n_env
        if not isinstance(actions, list | tuple) or len(actions) != n_env:
            raise ValueError(f"actions: expected a list of {n_env} dicts (one per environment), got "
                             f"{describe(actions)}")
        for e, (acts, agents) in enumerate(zip(actions, live)):
            where = "actions" if n_env == 1 else f"actions[{e}]"
            if not isinstance(acts, Mapping):
                raise ValueError(f"{where}: expected a dict of agent id -> action, got {describe(acts)}")
            unknown = [a for a in acts if a not in agents]
            if unknown:
                raise ValueError(f"{where}: {describe(unknown[0])} is not a live agent "
                                 f"(live: {', '.join(agents[:5])}{', ...' if len(agents) > 5 else ''})")
            missing = [a for a in agents if a not in acts]
            if missing:
                raise ValueError(f"{where}: no action for live agent {self.label(missing[0], e)}")

    # ------------------------------------------------------------------ operators and stations

    def _discrete(self, actions: list[Mapping], names: list[str], n: int) -> IntArray:
        """Discrete actions of ``names`` in every environment, (E, len(names))."""
        shape = (self.sim.n_env, len(names))
        try:
            raw = [[actions[e][a] for a in names] for e in range(shape[0])]
            v = np.array(raw)
            ok = v.shape == shape and v.dtype.kind in "iu" and v.min() >= 0 and v.max() < n \
                and all(_is_int_scalar(x) for row in raw for x in row)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            v = np.array([[_int_action(actions[e][a], self.label(a, e), n) for a in names]
                          for e in range(shape[0])]).reshape(shape)
        return v

    def _operators(self, actions: list[Mapping], act: SimActions) -> None:
        """Price multipliers (E, Z) and, with storage, each unit's set-point (E, U) from its zone's share."""
        storage = self._units.n > 0
        if self.sim.cfg.agents.operator_action == "level":
            if storage:
                lv = self._level_pairs(actions)  # (E, Z, 2)
                price, share = self._levels[lv[..., 0]], self._storage_levels[lv[..., 1]]
            else:
                price = self._levels[self._discrete(actions, self.ops, len(self._levels))]
        else:
            price, share = self._operator_boxes(actions, 2 if storage else 1)
        act.price_multiplier = price
        if storage:
            act.storage_kw = share[:, self._units.zone] * self._units.p_max_kw

    def _operator_boxes(self, actions: list[Mapping], width: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Operators' Box actions: price multipliers (E, Z) within the market's range
        (``market.check_multiplier``) and, with ``width`` 2, storage shares (E, Z) in [-1, 1]."""
        cfg = self.sim.cfg.market
        raw = [[actions[e][a] for a in self.ops] for e in range(self.sim.n_env)]
        if all(_is_box(x, width) for row in raw for x in row):
            v = np.array(raw, dtype=float)  # (E, Z, width)
            try:
                share = _check_shares(v[..., 1]) if width == 2 else None
                return mk.check_multiplier(v[..., 0], cfg), share
            except ValueError:
                pass  # name the agent below
        lo, hi = cfg.price_multiplier_min, cfg.price_multiplier_max
        what = (f"a price multiplier: an array of shape (1,) holding a finite number in [{lo}, {hi}]" if width == 1
                else f"(price multiplier, storage share): an array of shape (2,) of finite numbers, the multiplier in "
                     f"[{lo}, {hi}], the share of p_max_kw in [-1, 1]")
        for e, row in enumerate(raw):
            for a, x in zip(self.ops, row):
                value = _box_values(x, self.label(a, e), what, width)
                try:
                    mk.check_multiplier(value[0], cfg)
                    _check_shares(value[1:])
                except ValueError as exc:
                    raise ValueError(f"actions[{self.label(a, e)}]: {exc}") from None
        raise AssertionError("unreachable: a batch that fails has a failing agent")

    def _level_pairs(self, actions: list[Mapping]) -> IntArray:
        """Operators' (price level, storage level) pairs, (E, Z, 2)."""
        nvec = np.array([len(self._levels), len(self._storage_levels)])
        raw = [[actions[e][a] for a in self.ops] for e in range(self.sim.n_env)]
        try:
            v = np.array(raw)
            ok = v.shape == (self.sim.n_env, len(self.ops), 2) and v.dtype.kind in "iu" and bool(
                ((v >= 0) & (v < nvec)).all())
        except (TypeError, ValueError):
            ok = False
        if not ok:
            for e, row in enumerate(raw):
                for a, x in zip(self.ops, row):
                    pair = np.asarray(x) if isinstance(x, np.ndarray | list | tuple) else np.zeros(0)
                    if pair.shape != (2,) or pair.dtype.kind not in "iu" or not ((pair >= 0) & (pair < nvec)).all():
                        raise ValueError(f"actions[{self.label(a, e)}]: expected (price level, storage level): two "
                                         f"integers in [0, {nvec[0] - 1}] and [0, {nvec[1] - 1}] (its "
                                         f"MultiDiscrete({nvec.tolist()}) space), got {describe(x)}")
        return v

    # ------------------------------------------------------------------ EVs

    def _individual(self, actions: list[Mapping], act: SimActions) -> None:
        sim = self.sim
        idx = sim.plugged()
        names = [f"ev_{k}" for k in sim.fleet.ev_index[idx]]
        env = sim.day.env[idx]
        try:
            acts = [actions[e][a] for e, a in zip(env, names)]
            ok = all(type(a) is dict and len(a) == 2 and _is_int_scalar(a["mode"]) for a in acts)
            mode = np.array([a["mode"] for a in acts], dtype=np.int64 if ok else None)
            power = np.array([a["power"] for a in acts]) if acts else np.zeros((0, 1))
            ok = ok and _valid_evs(mode, power, (len(acts),), (len(acts), 1))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:  # the first bad action raises, naming its agent
            checked = [_ev_action(actions[e][a], self.label(a, e)) for e, a in zip(env, names)]
            mode = np.array([m for m, _ in checked], dtype=np.int64)
            power = np.array([p for _, p in checked], dtype=float)
        act.ev_mode = np.full(sim.day.sessions.n, IDLE, dtype=np.int64)
        act.ev_power = np.zeros(sim.day.sessions.n)
        act.ev_mode[idx] = mode
        act.ev_power[idx] = np.asarray(power, dtype=float).reshape(-1)

    def _grouped(self, actions: list[Mapping], act: SimActions, owner: IntArray) -> None:
        sim, slots = self.sim, self.n_slots
        names = [(e, f"evs_{j}") for e in range(sim.n_env) for j in range(sim.layout.n_station)]
        try:
            acts = [actions[e][a] for e, a in names]
            ok = all(type(a) is dict and a.keys() == _EV_KEYS for a in acts)
            mode = np.array([a["mode"] for a in acts])
            power = np.array([a["power"] for a in acts])
            ok = ok and _valid_evs(mode, power, (len(names), slots), (len(names), slots))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:  # the first bad action raises, naming its agent
            checked = [_grouped_action(actions[e][a], self.label(a, e), slots) for e, a in names]
            mode, power = np.stack([m for m, _ in checked]), np.stack([p for _, p in checked])
        occ = owner >= 0
        act.ev_mode = np.full(sim.day.sessions.n, IDLE, dtype=np.int64)
        act.ev_power = np.zeros(sim.day.sessions.n)
        act.ev_mode[owner[occ]] = mode[occ]
        act.ev_power[owner[occ]] = power[occ]


def _valid_evs(mode: np.ndarray, power: np.ndarray, mode_shape: tuple, power_shape: tuple) -> bool:
    # NaN fails both comparisons of the power check
    return (mode.shape == mode_shape and mode.dtype.kind in "iu" and power.shape == power_shape
            and _is_real_dtype(power.dtype) and (mode.size == 0 or (mode.min() >= 0 and mode.max() <= 2))
            and bool(((power >= 0.0) & (power <= 1.0)).all()))


def _is_box(x: Any, n: int) -> bool:
    """An array of shape (n,) of a real dtype (values unchecked)."""
    return type(x) is np.ndarray and x.shape == (n,) and x.dtype.kind in "iuf"


def _check_shares(share: np.ndarray) -> np.ndarray:
    """Storage set-points as shares of the units' ``p_max_kw``, in [-1, 1]."""
    if not ((share >= -1.0) & (share <= 1.0)).all():  # NaN fails both
        raise ValueError(f"storage share: expected finite values in [-1, 1] (of p_max_kw, > 0 charges), got "
                         f"{describe(share)}")
    return share


def _is_int_scalar(x: Any) -> bool:
    """In a ``Discrete`` space's domain: a Python or numpy integer, or a 0-d integer array (not a bool)."""
    t = type(x)
    if t is bool or t is np.bool_:
        return False
    if t is int or isinstance(x, np.integer):
        return True
    if t is np.ndarray:
        return x.shape == () and x.dtype.kind in "iu"
    return isinstance(x, Integral)


def _is_real_dtype(dtype: np.dtype) -> bool:
    return dtype.kind in "iuf"


def _int_action(a: Any, agent: str, n: int) -> int:
    if not _is_int_scalar(a) or not 0 <= int(a) < n:
        raise ValueError(f"actions[{agent}]: expected an integer in [0, {n - 1}] (its Discrete({n}) space), got "
                         f"{describe(a)}")
    return int(a)


def _box_values(a: Any, agent: str, what: str, n: int) -> np.ndarray:
    """The ``n`` finite numbers of a ``Box((n,))`` action (an array of shape (n,), any real dtype); ``what``: the
    space's description for the message."""
    v = np.asarray(a) if isinstance(a, np.ndarray | list | tuple) else None
    if v is None or v.shape != (n,) or not _is_real_dtype(v.dtype) or not np.isfinite(v).all():
        raise ValueError(f"actions[{agent}]: expected {what}, got {describe(a)}")
    return v.astype(float)


def _box_value(a: Any, agent: str, what: str, lo: float, hi: float) -> float:
    """The one finite number of a ``Box((1,))`` action."""
    return float(_box_values(a, agent, f"{what}: an array of shape (1,) holding a finite number in [{lo}, {hi}]",
                             1)[0])


def _ev_action(a: Any, agent: str) -> tuple[int, float]:
    if not isinstance(a, Mapping) or a.keys() != _EV_KEYS:
        raise ValueError(f"actions[{agent}]: expected {{'mode': 0|1|2, 'power': array([fraction])}} with exactly "
                         f"these keys, got {describe(a)}")
    mode = _int_action(a["mode"], f"{agent}]['mode'", 3)
    p = _box_value(a["power"], f"{agent}]['power'", "a power fraction", 0.0, 1.0)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"actions[{agent}]['power']: expected a fraction in [0, 1], got {describe(a['power'])}")
    return mode, p


def _grouped_action(a: Any, agent: str, slots: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(a, Mapping) or a.keys() != _EV_KEYS:
        raise ValueError(f"actions[{agent}]: expected {{'mode': [{slots}] ints, 'power': [{slots}] fractions}} "
                         f"with exactly these keys, got {describe(a)}")
    mode, power = np.asarray(a["mode"]), np.asarray(a["power"])
    if mode.shape != (slots,) or mode.dtype.kind not in "iu" or mode.min() < 0 or mode.max() > 2:
        raise ValueError(f"actions[{agent}]['mode']: expected {slots} integers in [0, 2], got {describe(a['mode'])}")
    if power.shape != (slots,) or not _is_real_dtype(power.dtype) or not np.isfinite(power).all() \
            or power.min() < 0 or power.max() > 1:
        raise ValueError(f"actions[{agent}]['power']: expected {slots} finite fractions in [0, 1], got "
                         f"{describe(a['power'])}")
    return mode, power.astype(float)
