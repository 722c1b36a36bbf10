"""Strict, documented config dataclasses: YAML in, `key=value` overrides, every bad field refused up front.

Each field carries `metadata={"help": ...}`; unknown keys, wrong types and impossible values raise
`ConfigError` naming the field, the value and the fix, before any model is loaded.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml


class ConfigError(ValueError):
    """A config field is unknown, mistyped or out of range; the message names the field and the fix."""


def option(default: Any, help: str, **kw) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and help text (lists/dicts get a default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List, tuple, Tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Dict):
        args = typing.get_args(tp)
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check `value` against annotation `tp`; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        container_error = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                a_origin = typing.get_origin(a)
                if (isinstance(value, dict) and a_origin in (dict, Dict)) or (isinstance(value, list) and a_origin in (list, List)):
                    container_error = e  # the value's shape picks the branch: report what is wrong inside it
        if container_error is not None:
            raise container_error
        raise ConfigError(f"{name}={value!r} has the wrong type; expected {_type_name(tp)}")
    if origin in (list, List, tuple, Tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list ({_type_name(tp)}), e.g. {name}=[a,b]")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} must be a mapping ({_type_name(tp)}), e.g. {name}={{a: 1.0, b: 0.5}}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(f"{name} key", k, key_tp): _coerce(f"{name}[{k!r}]", v, value_tp) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _looks_numeric(value):
            return float(value)  # YAML 1.1 reads "1e-4" as a string; users mean the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
        return value
    raise ConfigError(f"{name}: unsupported config type {tp!r}")  # a bug in a config class, not user input


@dataclass
class ConfigBase:
    """Shared loading, overriding, validation and serialisation for every config dataclass."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Range and cross-field checks; subclasses extend it and raise ConfigError."""

    # ----- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ConfigBase":
        """Build from a mapping, refusing unknown keys with the closest valid names."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping of field: value, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            import difflib

            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"unknown config key(s) for {cls.__name__}: {', '.join(hints)}; run `genft train --help-config` for the valid fields"
            )
        return cls(**data)

    @classmethod
    def field_help(cls) -> str:
        """One line per field: name, type, default and help (the text `--help-config` prints)."""
        hints = typing.get_type_hints(cls)
        lines = []
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {f.name} ({_type_name(hints[f.name])}, default {default!r}): {f.metadata.get('help', '')}")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ConfigBase":
        """A validated copy with `changes` applied."""
        return type(self).from_dict({**self.to_dict(), **changes})


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """Parse `key=value` strings; values are YAML scalars or lists (`lr=1e-4`, `rewards=[a,b]`)."""
    out: Dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. learning_rate=1e-5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from e
        out[key] = value
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a YAML mapping; missing files and malformed YAML get errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path to a YAML file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of field: value, not a {type(data).__name__}")
    return data
