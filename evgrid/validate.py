"""Input checks shared by every layer (``grid``, ``envs``, ``agents``, the config loader).

Dependency-free apart from numpy, so the physics layer can use it.  Every check raises
``ValueError("<name>: expected <what is allowed>, got <what came>")``, naming the field or argument
(the config loader prefixes the dotted path of the section), and returns the value in its checked
form.  Nothing is clipped silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["as_array", "as_batch", "check_bool", "check_choice", "check_int", "check_ints", "check_pair", "check_real",
           "check_reals", "describe"]


def describe(value: object, limit: int = 60) -> str:
    """A short ``repr`` for messages (a long list or array is cut)."""
    text = repr(value)
    if isinstance(value, np.ndarray):
        text = f"array of shape {value.shape}" if value.size > 8 else f"array {value.tolist()!r}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_real(name: str, value: object, lo: float = -math.inf, hi: float = math.inf, *,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a float within [lo, hi] (open ends where asked)."""
    ok = _is_real(value) and math.isfinite(float(value))  # type: ignore[arg-type]
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name}: expected a finite number in {left}{lo}, {hi}{right}, got {describe(value)}")
    return float(value)  # type: ignore[arg-type]


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int within [lo, hi] (a float such as 3.0 is not an integer)."""
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    if ok:
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)  # type: ignore[operator]
    if not ok:
        raise ValueError(f"{name}: expected an integer in [{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'}], got {describe(value)}")
    return int(value)  # type: ignore[call-overload]


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {describe(value)}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool (YAML's true / false), never a truthy number or string."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name}: expected true or false, got {describe(value)}")
    return bool(value)


def check_reals(name: str, values: object, lo: float = -math.inf, hi: float = math.inf, *, n: int | None = None,
                min_len: int = 0, lo_open: bool = False, increasing: bool = False) -> tuple[float, ...]:
    """A list of numbers in [lo, hi] (``n`` of them, or at least ``min_len``; strictly increasing if asked)."""
    count = f"{n} numbers" if n is not None else f"a list of {'at least ' + str(min_len) + ' ' if min_len else ''}" \
                                                  f"numbers"
    left = "(" if lo_open else "["
    expected = f"{name}: expected {count} in {left}{lo}, {hi}]{', strictly increasing' if increasing else ''}"
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ValueError(f"{expected}, got {describe(values)}")
    out = []
    for v in values:
        ok = _is_real(v) and math.isfinite(float(v)) and (float(v) > lo if lo_open else float(v) >= lo) \
            and float(v) <= hi
        if not ok:
            raise ValueError(f"{expected}, got {describe(values)}")
        out.append(float(v))
    if (n is not None and len(out) != n) or len(out) < min_len or \
            (increasing and any(b <= a for a, b in zip(out, out[1:]))):
        raise ValueError(f"{expected}, got {describe(values)}")
    return tuple(out)


def check_ints(name: str, values: object, lo: int | None = None, hi: int | None = None, *,
               n: int | None = None) -> tuple[int, ...]:
    """A list of integers in [lo, hi] (``n`` of them, if given)."""
    count = f"{n} integers" if n is not None else "a list of integers"
    expected = f"{name}: expected {count} in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ValueError(f"{expected}, got {describe(values)}")
    ok = all(isinstance(v, Integral) and not isinstance(v, bool) and (lo is None or v >= lo)
             and (hi is None or v <= hi) for v in values)
    if not ok or (n is not None and len(values) != n):
        raise ValueError(f"{expected}, got {describe(values)}")
    return tuple(int(v) for v in values)


def check_pair(name: str, pair: object, lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    """A (low, high) range with lo <= low <= high <= hi."""
    expected = f"{name}: expected a (low, high) pair with {lo} <= low <= high <= {hi}"
    try:
        a, b = check_reals(name, pair, lo, hi, n=2)
    except ValueError:
        raise ValueError(f"{expected}, got {describe(pair)}") from None
    if b < a:
        raise ValueError(f"{expected}, got {describe(pair)}")
    return a, b


def _shape_text(shape: Sequence[int | None], names: str | None) -> str:
    if names is not None:
        return names
    return "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def as_array(name: str, x: object, *, shape: Sequence[int | None] | None = None, shape_names: str | None = None,
             finite: bool = True, allow_inf: bool = False, lo: float | None = None, hi: float | None = None,
             lo_open: bool = False, what: str = "values") -> npt.NDArray[np.float64]:
    """``x`` as a float64 array, checked: its shape (``None`` entries take any length; ``shape_names`` says what
    the axes are in the message), finite values (``allow_inf``: NaN only is refused), ``lo`` <= values <= ``hi``."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an array of numbers, got {describe(x)}") from None
    if shape is not None and (a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape))):
        raise ValueError(f"{name}: expected shape {_shape_text(shape, shape_names)}, got {a.shape}")
    if finite:
        bad = np.isnan(a) if allow_inf else ~np.isfinite(a)
        if bad.any():
            raise ValueError(f"{name}: expected {'non-NaN' if allow_inf else 'finite'} {what}, got "
                             f"{int(bad.sum())} of {a.size} not, e.g. {a[bad].flat[0]!r}")
    if lo is not None:
        low = a <= lo if lo_open else a < lo
        if low.any():
            raise ValueError(f"{name}: expected {what} {'>' if lo_open else '>='} {lo}, got {a[low].flat[0]!r}")
    if hi is not None and (a > hi).any():
        raise ValueError(f"{name}: expected {what} <= {hi}, got {a[a > hi].flat[0]!r}")
    return a


def as_batch(name: str, x: npt.ArrayLike, n_bus: int, check_finite: bool = True) -> npt.NDArray[np.float64]:
    """A (batch >= 1, n_bus) float64 C-contiguous array of per-bus values, e.g. ``p_kw`` of a power-flow batch."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an array of numbers of shape (batch, {n_bus}), got {describe(x)}") \
            from None
    if a.ndim != 2 or a.shape[1] != n_bus:
        raise ValueError(f"{name}: expected shape (batch, {n_bus}) [scenarios x buses], got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one scenario, got an empty batch")
    if check_finite and not np.isfinite(a).all():
        b, j = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name}: expected finite values, got {a[b, j]} at scenario {b}, bus position {j}")
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a


def check_type(name: str, value: Any, types: type | tuple[type, ...], expected: str) -> Any:
    """``value`` if it is an instance of ``types``, else ``<name>: expected <expected>, got <value>``."""
    if not isinstance(value, types):
        raise ValueError(f"{name}: expected {expected}, got {describe(value)}")
    return value
