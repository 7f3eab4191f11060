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
import os
import types
import typing
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from evgrid.validate import describe

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message starts with its dotted path."""


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
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path.rstrip('.') or cls.__name__}: expected a section (a mapping of "
                          f"{', '.join(names)}), got {describe(data)}")
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{path}{unknown[0]}: unknown key; {cls.__name__} takes {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _dataclass_of(hints[name])
        if sub is not None and not isinstance(value, sub):
            # a section: None only where the field may be absent (``routing: null``)
            optional = type(None) in typing.get_args(hints[name])
            kwargs[name] = None if value is None and optional else from_dict(sub, value, f"{path}{name}.")
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
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not a YAML scalar or list") from None
        _set(out, key, value)
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``dotted`` "a.b.c"; a mapping meeting a mapping merges."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is set both as a value and as a section")
    last = parts[-1]
    if isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
        node[last] = merge(node[last], value)
    elif isinstance(node.get(last), Mapping) != isinstance(value, Mapping) and last in node:
        raise ConfigError(f"{dotted}: set both as a value and as a section")
    else:
        node[last] = value


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: ``extra`` wins; sections merge key by key."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# keyword shortcuts of ``evgrid.make`` / the env constructors: keyword -> dotted field
SHORTCUTS = {"ev_view": "agents.ev_view"}


def keyword_overrides(kw: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments (``fleet={"n_ev": 50}``, ``fleet__v2g_share=0.1``, the shortcut ``ev_view=...``) as
    one nested override mapping, merged field by field in any order; one field given two different values is
    a ConfigError naming it."""
    out: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for key, value in kw.items():
        dotted = SHORTCUTS.get(key, key.replace("__", "."))
        for path, leaf in _leaves(dotted, value):
            if path in fields and fields[path] != leaf:
                raise ConfigError(f"{path}: given twice, as {fields[path]!r} and {leaf!r}")
            fields[path] = leaf
        _set(out, dotted, value)
    return out


def _leaves(path: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(f"{path}.{k}", v)]
    return [(path, value)]


def experiment_names() -> list[str]:
    """The experiment configs shipped with evgrid (``quickstart``, ``seed000``, ...)."""
    return sorted(p.name[:-5] for p in resources.files("evgrid.experiments").iterdir() if p.name.endswith(".yaml"))


def experiment_path(source: str | os.PathLike[str]) -> Path:
    """A config file: ``source`` itself when it exists, else the shipped experiment it names (``quickstart``,
    ``quickstart.yaml`` or ``experiments/quickstart.yaml``), so every command works from any directory and
    from an installed wheel."""
    path = Path(source)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith((".yaml", ".yml")) else path.name
    if path.suffix in ("", ".yaml", ".yml") and name in experiment_names() and \
            (len(path.parts) == 1 or path.parent.name == "experiments"):
        with resources.as_file(resources.files("evgrid.experiments") / f"{name}.yaml") as shipped:
            return Path(shipped)
    raise ConfigError(f"config: file {os.fspath(source)!r} does not exist (shipped experiments: "
                      f"{', '.join(experiment_names())})")


def read_yaml(source: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of sections in a config file (or a shipped experiment, :func:`experiment_path`).  A top-level
    ``base:`` names another config (a path, relative to this file's folder where it is one there, or a shipped
    name) whose sections this file's merge into, key by key."""
    path = experiment_path(source)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config: {os.fspath(source)!r} is not valid YAML{at}: {problem}") from None
    except OSError as e:
        raise ConfigError(f"config: cannot read {os.fspath(source)!r}: {e.strerror or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {os.fspath(source)!r} must hold a mapping of sections, got "
                          f"{type(data).__name__}")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"base: expected the path or shipped name of a config, got {base!r} in "
                          f"{os.fspath(source)!r}")
    seen = (*_seen, path.resolve())
    sibling = path.parent / base
    base_path = experiment_path(sibling if sibling.is_file() else base)
    if base_path.resolve() in seen:
        raise ConfigError(f"base: {base!r} in {os.fspath(source)!r} leads back to a config that names it "
                          f"(a cycle)")
    return merge(read_yaml(base_path, seen), data)
