"""The strict YAML engine: a YAML file plus ``dotted.key=value`` overrides -> any (nested) dataclass.

It knows no schema: :mod:`mochi_retrieval.config.schema` is the training program's, whose sections are
the library's own settings dataclasses. The library itself never reads YAML.

Usage::

    cfg = load_config("configs/fmnist.yaml", ["train.lr=0.06", "mochi.enabled=false"], cls=ExperimentConfig)
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))

Rules (nanoGPT-style strictness):

- unknown keys are errors naming the dotted key, with the nearest valid key;
- types are checked: ``int`` (not bool, not float), ``float`` (an int is
  accepted), ``bool`` (only real booleans), ``str``, ``Optional[X]``,
  ``Literal[...]``, ``list[X]``, ``tuple[X, ...]``, nested dataclasses and
  ``dict[str, Any]`` (free-form, e.g. encoder keyword arguments);
- value ranges are checked in each dataclass's ``__post_init__`` (once, where the value is defined),
  raising :class:`ConfigValueError` with the field's name; the engine prefixes the section's path.

YAML is read with a subclass of ``yaml.SafeLoader`` (safe constructors only)
that follows YAML 1.2 for two scalars: ``1e-4`` is a float (PyYAML reads it as
a string) and only ``true``/``false`` are booleans, so ``mixed_precision: no``
is the string ``"no"``, not ``False``.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import re
import types
from functools import lru_cache
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import ConfigError, ConfigValueError

T = TypeVar("T")
_NoneType = type(None)


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (true/false only) and floats such as ``1e-4``."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings :class:`_Loader` would read as non-strings."""


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] not in (_BOOL_TAG, _FLOAT_TAG)]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_RE, list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))
_Dumper.yaml_implicit_resolvers = {ch: list(rs) for ch, rs in yaml.SafeDumper.yaml_implicit_resolvers.items()}
_Dumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    """Parse YAML text with safe constructors only."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader subclasses SafeLoader


# --------------------------------------------------------------------------- typing helpers


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """``{name: (resolved type, Field)}`` for the init fields of dataclass ``cls``."""
    hints = get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Human-readable name of a supported type annotation."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return "any value"
    if _is_union(tp):
        return " or ".join("None" if a is _NoneType else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__} section)"
    return getattr(tp, "__name__", repr(tp))


def _suggest(key: str, path: str, valid: Sequence[str], root: Optional[type] = None) -> str:
    """Error text for unknown ``key`` under ``path``, with the nearest valid key."""
    full = _join(path, key)
    close = difflib.get_close_matches(key, list(valid), n=1)
    if close:
        return f"unknown key '{full}' (did you mean '{_join(path, close[0])}'?)"
    elsewhere = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1] == key] if root else []
    if elsewhere:
        return f"unknown key '{full}' (did you mean {' or '.join(repr(k) for k in elsewhere)}?)"
    return f"unknown key '{full}' (valid keys: {', '.join(valid)})"


def _all_keys(cls: type, path: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls``, nested sections included."""
    out = []
    for name, (tp, _) in _fields(cls).items():
        out.append(_join(path, name))
        if dataclasses.is_dataclass(tp):
            out += _all_keys(tp, _join(path, name))
    return out


# --------------------------------------------------------------------------- from_dict / to_dict


def _wrong(path: str, tp: Any, value: Any) -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return ConfigError(f"wrong type for '{path}': expected {_type_name(tp)}, got {type(value).__name__} {shown}")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted (int->float, list->tuple)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty section in YAML ("model:" with everything commented out)
            value = {}
        if not isinstance(value, Mapping):
            raise _wrong(path, tp, value)
        return from_dict(tp, value, path)
    if _is_union(tp):
        if value is None and _NoneType in args:
            return None
        arms = [a for a in args if a is not _NoneType]
        for arm in arms:
            try:
                return _convert(arm, value, path)
            except ConfigError:
                if len(arms) == 1 and isinstance(value, (Mapping, list, tuple)):
                    raise  # the inner error names the nested key at fault
        raise _wrong(path, tp, value)
    if origin is Literal:
        if any(value == c and type(value) is type(c) for c in args):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [c for c in args if isinstance(c, str)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"invalid value for '{path}': expected {_type_name(tp)}, got {value!r}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong(path, tp, value)
        if origin is list:
            return [_convert(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value)]
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"wrong length for '{path}': expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        key_tp, val_tp = args if args else (Any, Any)
        if not isinstance(value, Mapping):
            raise _wrong(path, tp, value)
        return {
            _convert(key_tp, k, f"{path} key {k!r}"): _convert(val_tp, v, _join(path, str(k)))
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r} at '{path}'")
    raise _wrong(path, tp, value)


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, checking keys, types and ranges.

    Args:
        cls: a dataclass whose fields use the supported types (module docstring).
        data: plain values, as read from YAML.
        path: dotted prefix of ``data`` inside the whole config, used in messages.

    Raises:
        ConfigError: unknown or missing key, wrong type, or out-of-range value;
            the message names the full dotted key.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise _wrong(path or "<config>", cls, data)
    schema = _fields(cls)
    for key in data:
        if key not in schema:
            raise ConfigError(_suggest(str(key), path, list(schema), None if path else cls))
    kwargs = {}
    for name, (tp, f) in schema.items():
        if name in data:
            kwargs[name] = _convert(tp, data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(path, name)}'")
    try:
        return cls(**kwargs)
    except ConfigValueError as e:
        if not path:
            raise
        raise ConfigValueError(_join(path, e.key), e.reason) from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists), in field order."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


# --------------------------------------------------------------------------- files and overrides


def _apply_override(data: dict[str, Any], item: str, cls: type) -> None:
    """Set ``a.b.c=value`` in ``data`` in place, checking each key against schema ``cls``."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(f"malformed override {item!r}: expected dotted.key=value")
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of override {item!r}: {e}") from None
    tp: Any = cls
    node = data
    for i, part in enumerate(parts):
        path = ".".join(parts[:i])
        while _is_union(tp):  # Optional[Section]: walk into the section
            tp = next(a for a in get_args(tp) if a is not _NoneType)
        if dataclasses.is_dataclass(tp):
            schema = _fields(tp)
            if part not in schema:
                raise ConfigError(f"{_suggest(part, path, list(schema), cls if i == 0 else None)} in override {item!r}")
            tp = schema[part][0]
        elif not (tp is dict or get_origin(tp) is dict):
            raise ConfigError(f"cannot set {key!r}: '{path}' is a value, not a section (override {item!r})")
        if i == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set {key!r}: '{_join(path, part)}' is not a mapping (override {item!r})")
            node = child


def load_config(path: str | os.PathLike, overrides: Sequence[str], cls: type[T]) -> T:
    """Read a YAML config, apply ``dotted.key=value`` overrides and build ``cls``.

    Args:
        path: YAML file; an empty file means all defaults.
        overrides: strings such as ``"train.lr=0.1"``, ``"model.encoder_kwargs.width=2"``;
            values are YAML (``0.1``, ``true``, ``[1, 2]``, ``null``).
        cls: the schema (a dataclass).

    Raises:
        ConfigError: missing file, YAML syntax error (with line), bad override, or
            any error from :func:`from_dict`.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: '{os.fspath(path)}'") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{os.fspath(path)}': {e}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"YAML syntax error in '{os.fspath(path)}'{where}: {problem}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"'{os.fspath(path)}': the top level must be a mapping, got {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item, cls)
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as complete YAML, atomically (temp file in the same folder, then rename)."""
    from ..files import atomic_write

    text = yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
