"""Typed configuration: frozen dataclasses built from YAML, validated.

Every concern has one frozen dataclass (``FleetConfig``, ``MarketConfig``,
...); each validates its own fields in ``__post_init__`` and raises
``ValueError("<field>: expected <range>, got <value>")``.  This module turns
nested mappings (a YAML file, ``key=value`` overrides) into those classes:
unknown keys fail with their dotted path, lists become tuples, and a field's
error is re-raised with its full dotted path (``fleet.n_ev: expected ...``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message starts with its dotted path."""


def check_real(name: str, value: object, lo: float = -math.inf, hi: float = math.inf, *,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a float within [lo, hi] (open ends where asked), else ValueError naming ``name``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name}: expected a finite number in {left}{lo}, {hi}{right}, got {value!r}")
    return float(value)


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int within [lo, hi], else ValueError naming ``name``."""
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    if ok:
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise ValueError(f"{name}: expected an integer in [{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'}], got {value!r}")
    return int(value)


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def _tupled(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tupled(v) for v in value)
    return value


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass in ``tp`` (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping; missing keys keep their defaults."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path.rstrip('.') or cls.__name__}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{path}{unknown[0]}: unknown key; {cls.__name__} takes {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _dataclass_of(hints[name])
        if sub is not None and (value is None or isinstance(value, Mapping)):
            kwargs[name] = None if value is None else from_dict(sub, value, f"{path}{name}.")
        else:
            kwargs[name] = _tupled(value)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}{exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain nested dicts/lists (YAML-ready) from a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["fleet.n_ev=500", "agents.ev_view=grouped"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. fleet.n_ev=500")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: ``extra`` wins; sections merge key by key."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config: file {os.fspath(path)!r} does not exist") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {os.fspath(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data
