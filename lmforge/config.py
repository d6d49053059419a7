"""Dataclass configs from YAML/JSON files and `--key=value` overrides, with type checking.

Nested dataclasses are addressed with dots (`model.n_layers=4`). Unknown keys and values
of the wrong type are errors that name the key and what was expected.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from lmforge.errors import LmforgeError

T = TypeVar("T")


def read_config_file(path: str | Path) -> dict:
    """A YAML (.yaml/.yml) or JSON file as a dict."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as error:  # yaml and json raise different types; both mean a bad file
        # one line: YAML's messages draw the spot over several
        raise LmforgeError(f"{path}: cannot parse config ({' '.join(str(error).split())})") from None
    if not isinstance(values, dict):
        raise LmforgeError(f"{path}: a config file must hold a mapping of keys to values")
    return values


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _unknown_key(key: str, known: list[str], where: str) -> LmforgeError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return LmforgeError(f"unknown config key {where}{key!r}{hint}; known keys: {', '.join(sorted(known))}")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` (from YAML/JSON or a command-line string) converted to `annotation`, or an error."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except LmforgeError as error:
                errors.append(str(error))
        raise LmforgeError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise LmforgeError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, item_type, key) for v in value]
    if origin is dict:  # e.g. sampling.logit_bias: dict[int, float], from a JSON object whose keys are strings
        key_type, value_type = typing.get_args(annotation)
        mapping = coerce(value, dict, key)
        return {coerce(name, key_type, key): coerce(item, value_type, key) for name, item in mapping.items()}
    if annotation is dict:  # e.g. model.rope_scaling: a JSON object, or its keys one by one (--a.b.c=1)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                value = None
        if not isinstance(value, dict):
            raise LmforgeError(f'{key}: expected a mapping (a JSON object such as {{"rope_type": "linear"}})')
        return {name: _text_as_json(item) for name, item in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise LmforgeError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise LmforgeError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise LmforgeError(f"{key}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise LmforgeError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise LmforgeError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise LmforgeError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _text_as_json(value: Any) -> Any:
    """A command-line string read as the JSON value it spells (numbers, true, lists), else kept as text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def apply_values(config: T, values: dict, where: str = "") -> T:
    """A copy of dataclass `config` with nested `values` applied, type-checked."""
    types_by_name = _field_types(type(config))
    changes = {}
    for key, value in values.items():
        if key not in types_by_name:
            raise _unknown_key(key, list(types_by_name), where)
        current = getattr(config, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise LmforgeError(f"{where}{key}: expected a mapping of its fields, got {value!r}")
            changes[key] = apply_values(current, value, f"{where}{key}.")
        else:
            changes[key] = coerce(value, types_by_name[key], f"{where}{key}")
    try:
        return replace(config, **changes)
    except ValueError as error:
        raise LmforgeError(str(error)) from None


def parse_overrides(arguments: list[str]) -> dict:
    """`["--a.b=1", "--c", "x"]` → `{"a": {"b": "1"}, "c": "x"}`; values stay strings until coerced."""
    values: dict = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if not argument.startswith("--"):
            raise LmforgeError(f"unexpected argument {argument!r}; overrides look like --key=value")
        key, equals, value = argument[2:].partition("=")
        if not equals:
            if index + 1 < len(arguments) and not arguments[index + 1].startswith("--"):
                value = arguments[index + 1]
                index += 1
            else:
                value = "true"  # a bare flag switches a boolean on
        key = key.replace("-", "_")
        target = values
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
        index += 1
    return values


def merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def describe(config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, default) rows for `--help`: the values of `config`, the instance a verb starts from
    (nested configs by their own values: a preset's, not the class defaults)."""
    rows = []
    # A config's own keys first, then those it inherits (the fine-tunes' parallel keys): what it is about leads.
    inherited = {f.name for base in type(config).__mro__[1:] if is_dataclass(base) for f in fields(base)}
    for f in sorted(fields(config), key=lambda f: f.name in inherited):
        value = getattr(config, f.name)
        if is_dataclass(value):
            rows.extend(describe(value, f"{prefix}{f.name}."))
        else:
            type_name = getattr(f.type, "__name__", str(f.type))
            rows.append((f"{prefix}{f.name}", str(type_name).replace("typing.", ""), repr(value)))
    return rows
