"""Typed, frozen dataclass configs from YAML with dotted command-line overrides.

A config class is a ``@dataclass(frozen=True, kw_only=True)`` whose fields are plain types
(``int``, ``float``, ``str``, ``bool``), ``Literal[...]``, ``X | None``, ``tuple[...]``,
``dict[str, Any]`` or nested config classes. :func:`from_dict` walks the type hints, so a
misspelt key is an error naming its dotted path, and a wrong type is an error naming the key
and the expected type. YAML files may pull in fragments with ``!include other.yaml`` (path
relative to the including file), which is how a sweep's best loss settings feed a pipeline.

A section whose fields depend on one of its values (the loss section: its settings are those
of the loss ``loss.name`` selects, ``mlcore.config.LossConfig``) reads and writes itself
through three methods the generic code calls when a class defines them:
``from_plain(data, key)`` (classmethod, parsing), ``to_plain()`` (:func:`to_dict`) and
``key_content(content)`` (:func:`result_content`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the dotted key."""


class ConfigWarning(FutureWarning):
    """A config is read, but something in it is deprecated or has no effect."""


def check(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` (the checks of ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)


def _include_loader(base: Path) -> type[yaml.SafeLoader]:
    class Loader(yaml.SafeLoader):
        pass

    def include(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        target = (base / loader.construct_scalar(node)).resolve()  # type: ignore[arg-type]
        if not target.is_file():
            raise ConfigError(f"!include: no such file {target}")
        return load_yaml(target)

    Loader.add_constructor("!include", include)
    return Loader


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, resolving ``!include`` relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_include_loader(path.parent))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` applied in order."""
    out = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: '{'.'.join(keys[: i + 1])}' is a value, not a section"
                )
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {'; '.join(errors)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}")
        return from_dict(tp, value, prefix=key)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _convert(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string; accept what float() accepts.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build config ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    if hasattr(cls, "from_plain"):
        return cls.from_plain(data, prefix)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        kwargs[name] = _convert(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        where = f"{prefix}: " if prefix else ""
        raise ConfigError(f"{where}{err}") from err


def to_dict(config: Any) -> Any:
    """Plain-data view (dicts, lists, scalars) of a config, for YAML/JSON/MLflow params."""
    if hasattr(config, "to_plain"):
        return config.to_plain()
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params and hashing)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def load(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def replace(config: T, overrides: Sequence[str]) -> T:
    """A new config with dotted overrides applied to an existing one."""
    return from_dict(type(config), apply_overrides(to_dict(config), overrides))


# ---------------------------------------------------------------------------------------------
# Which fields change results
#
# A field whose value cannot change what a run computes (where it runs, how fast, where caches
# live, how often it logs) says so where it is defined::
#
#     num_workers: int = field(default=0, metadata=NOT_RESULT)
#
# and a field naming a file whose *content* matters (pretrained weights) is marked ``FILE``.
# Stage keys and resume fingerprints are built from :func:`result_content`, so a new field counts
# by default and is left out only by an explicit mark next to its definition. A result field
# added after stage keys were published is marked ``KEYED_WHEN_SET``: it counts once set away
# from its default, so every existing key (and its finished stages) stays valid.

KEY_ROLE = "cpsd.key_role"
NOT_RESULT = {KEY_ROLE: "ignore"}
FILE = {KEY_ROLE: "file"}
KEYED_WHEN_SET = {KEY_ROLE: "when_set"}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def result_content(config: Any, file_digest: typing.Callable[[str], str] | None = None) -> Any:
    """Plain data of ``config`` without its ``NOT_RESULT`` fields; ``FILE`` paths become
    ``file_digest(path)`` (the path itself when no digest function is given)."""
    if hasattr(config, "key_content"):
        return config.key_content(lambda section: result_content(section, file_digest))
    if dataclasses.is_dataclass(config):
        out = {}
        for f in dataclasses.fields(config):
            role = f.metadata.get(KEY_ROLE)
            value = getattr(config, f.name)
            if role == "ignore" or (role == "when_set" and value == _default(f)):
                continue
            if role == "file" and value is not None and file_digest is not None:
                out[f.name] = file_digest(value)
            else:
                out[f.name] = result_content(value, file_digest)
        return out
    if isinstance(config, tuple | list):
        return [result_content(v, file_digest) for v in config]
    if isinstance(config, dict):
        return {k: result_content(v, file_digest) for k, v in config.items()}
    return config
