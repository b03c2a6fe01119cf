"""Reading a :class:`~tcod_fast.trainer.config.schema.TrainConfig`: files, ``--set`` overrides,
plain data, and OmegaConf's errors told as one line.

``load_config("run.yaml")`` (or ``.toml``/``.json``) merges the file into
``OmegaConf.structured(TrainConfig)``; ``--set trainer.lr=1e-5`` overrides are merged on top
as OmegaConf dotlist items (values parse as YAML: ``true``, ``null``, ``[1, 2]``, ``{a: 1}``).
OmegaConf checks every value against its field's type (choices are ``Literal`` types) and
refuses keys the dataclasses lack; its errors are told here as one
:class:`~tcod_fast.errors.ConfigError` line naming the key, what was expected and what was
given. Then :func:`~tcod_fast.trainer.config.rules.validate` checks the rules.
"""

from __future__ import annotations

import difflib
import functools
import json
import sys
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from tcod_fast.errors import ConfigError
from tcod_fast.trainer.config.rules import RunRecords, validate
from tcod_fast.trainer.config.schema import TrainConfig

__all__ = ["apply_overrides", "check_config", "config_from_dict", "config_to_dict", "load_config", "save_config"]


def check_config(config: TrainConfig) -> RunRecords:
    """Check a config built in Python: its types (as reading a file would), then its rules
    (:func:`~tcod_fast.trainer.config.rules.validate`); returns the records its names
    resolve to."""
    _structured(config)
    return validate(config)


def config_from_dict(data: dict) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested plain data; unknown keys are errors."""
    config = _to_object(_merge(OmegaConf.structured(TrainConfig), data or {}))
    validate(config)
    return config


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), values: dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML/TOML/JSON config (or start from defaults), merge the ``--set`` overrides
    on top, then ``values`` (``{"section.key": value}``, Python values as they are, e.g. a
    command's own options), and validate."""
    merged = _merge(OmegaConf.structured(TrainConfig), _read_file(Path(path)) if path is not None else {})
    merged = _merge_overrides(merged, overrides)
    for dotted, value in (values or {}).items():
        merged = _merge(merged, _nested(dotted, value))
    config = _to_object(merged)
    validate(config)
    return config


def apply_overrides(config: TrainConfig, overrides) -> TrainConfig:
    """A copy of ``config`` with ``["section.key=value", ...]`` merged in (OmegaConf dotlist:
    a dotted key reaches into nested sections, ``model.student_tiny.hidden_size=32``, and
    into dict fields, ``env.kwargs.max_steps=20``; a mapping value merges into a section)."""
    return _to_object(_merge_overrides(_structured(config), overrides))


def config_to_dict(config) -> dict:
    """Nested plain data of a dataclass (tuples become lists) that :func:`config_from_dict`
    reads back."""
    if is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: config_to_dict(v) for k, v in config.items()}
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (or JSON for a ``.json`` path)."""
    path = Path(path)
    data = config_to_dict(config)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n")
        return
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _structured(config: TrainConfig) -> DictConfig:
    """``config`` as an OmegaConf structured config: checks a config built in Python."""
    try:
        _check_strict_leaves(config_to_dict(config))
        return OmegaConf.structured(config)
    except OmegaConfBaseException as exc:
        raise _translate(exc, config_to_dict(config)) from None


def _merge_overrides(merged: DictConfig, overrides) -> DictConfig:
    """``merged`` with the ``--set`` items merged in, in order; an error names its item."""
    for item in overrides or ():
        key, equals, _ = item.partition("=")
        if not equals or not key.strip(".").strip():
            raise ConfigError(f"--set takes section.key=value, got {item!r}")
        try:
            data = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"--set takes section.key=value with a YAML value, got {item!r}: {exc.msg.splitlines()[0]}") from None
        merged = _merge(merged, data, f" in --set {item!r}")
    return merged


def _merge(base: DictConfig, data: dict, context: str = "") -> DictConfig:
    """``base`` with plain ``data`` merged in; a wrong key or value is one ConfigError line."""
    try:
        _check_strict_leaves(data, context)
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as exc:
        raise _translate(exc, data, context, base) from None


def _to_object(merged: DictConfig) -> TrainConfig:
    """The dataclasses of ``merged``; a section's own ``__post_init__`` check (say
    ``curriculum.atod``'s) is told with the section's key path."""
    try:
        return OmegaConf.to_object(merged)
    except (TypeError, ValueError) as exc:
        where, section_class = _failing_section(merged, "")
        message = str(exc)
        first_word = message.split(" ", 1)[0]
        if not where:
            raise ConfigError(message) from None
        if first_word in {f.name for f in fields(section_class)}:
            raise ConfigError(f"{where}.{message}") from None
        raise ConfigError(f"{where}: {message}") from None


def _failing_section(node: DictConfig, where: str):
    """``(key path, dataclass)`` of the deepest section of ``node`` that cannot be built."""
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
            found = _failing_section(child, f"{where}.{key}" if where else str(key))
            if found[0] is not None:
                return found
    try:
        OmegaConf.to_object(node)
    except (TypeError, ValueError):
        return where, OmegaConf.get_type(node)
    return None, None


@functools.lru_cache(maxsize=None)
def _annotation_at(dotted: str) -> Any:
    """The type annotation of the field at ``dotted`` in :class:`TrainConfig` (``Any``
    inside a dict field, ``None`` for an unknown key)."""
    annotation: Any = TrainConfig
    for key in dotted.split("."):
        annotation = _without_none(annotation)
        if not is_dataclass(annotation):
            return Any if annotation in (dict, Any) or typing.get_origin(annotation) is dict else None
        hints = typing.get_type_hints(annotation)
        if key not in hints:
            return None
        annotation = hints[key]
    return annotation


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X``; any other annotation as is."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(options) == 1
    return options[0] if is_optional else annotation


def _describe(annotation: Any) -> str:
    """``float | None`` -> "a number or null"; ``Literal["a", "b"]`` -> "one of a, b"."""
    if annotation is not _without_none(annotation):
        return _describe(_without_none(annotation)) + " or null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        item = _describe(args[0]).replace("one of", "values among") if args else "values"
        item = item.split(" ", 1)[1] + "s" if item.startswith(("a ", "an ")) else item  # "an integer" -> "integers"
        return f"a list of {item}" if args[-1:] == (Ellipsis,) else f"a list of {len(args)} {item}"
    if is_dataclass(annotation):
        return f"a mapping with keys among {', '.join(f.name for f in fields(annotation))}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(annotation, names.get(origin, str(annotation)))


def _leaves(data: Any, where: str = ""):
    """``(dotted key, value)`` of every leaf of nested mappings."""
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, f"{where}.{key}" if where else str(key))
    elif where:
        yield where, data


def _check_strict_leaves(data: dict, context: str = "") -> None:
    """What OmegaConf converts but a config must not hold: a number or word for a
    true/false field (OmegaConf reads ``3`` and ``"on"`` as true), and a list of the wrong
    length for a fixed-length field (OmegaConf's message would not name the key)."""
    for dotted, value in _leaves(data):
        annotation = _without_none(_annotation_at(dotted) or Any)
        if value is None:
            continue
        if annotation is bool and not isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected true/false, got {value!r}{context}")
        args = typing.get_args(annotation)
        fixed = typing.get_origin(annotation) is tuple and args and args[-1] is not Ellipsis
        if fixed and isinstance(value, (list, tuple)) and len(value) != len(args):
            raise ConfigError(f"{dotted}: expected {_describe(annotation)}, got {value!r}{context}")


def _translate(exc: OmegaConfBaseException, data: dict, context: str = "", base: DictConfig | None = None) -> ConfigError:
    """OmegaConf's error as one line: the key path, what was expected, what was given."""
    dotted = exc.full_key
    if not dotted and base is not None:  # a few OmegaConf errors lack the key: find the leaf
        for leaf, value in _leaves(data):
            try:
                OmegaConf.merge(base, _nested(leaf, value))
            except OmegaConfBaseException:
                dotted = leaf
                break
    if not dotted:
        return ConfigError(f"config{context}: {str(exc.msg or exc).splitlines()[0]}")
    if isinstance(exc, ConfigKeyError) or _annotation_at(dotted) is None:
        parent, _, key = dotted.rpartition(".")
        section = _without_none(_annotation_at(parent) if parent else TrainConfig)
        if not is_dataclass(section):
            return ConfigError(f"{parent}: expected {_describe(section)}, not a section with key {key!r}{context}")
        return ConfigError(_unknown_key_message(parent, key, [f.name for f in fields(section)], context))
    value = _lookup(data, dotted, exc.value)
    annotation = _annotation_at(dotted)
    if typing.get_origin(_without_none(annotation)) is Literal:
        choices = ", ".join(map(str, typing.get_args(_without_none(annotation))))
        return ConfigError(f"{dotted} must be one of {choices}, got {value!r}{context}")
    return ConfigError(f"{dotted}: expected {_describe(annotation)}, got {value!r}{context}")


def _nested(dotted: str, value: Any) -> dict:
    for key in reversed(dotted.split(".")):
        value = {key: value}
    return value


def _lookup(data: Any, dotted: str, default: Any) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def _unknown_key_message(where: str, key: str, options: list[str], context: str = "") -> str:
    """``trainer.lrr`` -> "unknown config key trainer.lrr (did you mean trainer.lr?): expected
    a key of trainer (steps, lr, ...), got 'lrr'"."""
    prefix = f"{where}." if where else ""
    close = difflib.get_close_matches(key, options, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    section = f"a key of {where}" if where else "a section"
    return f"unknown config key {prefix}{key}{context}{hint}: expected {section} ({', '.join(options)}), got {key!r}"


def _read_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"config file must end in .yaml, .yml, .toml or .json, got {path.name!r}")
    if not path.exists():
        raise ConfigError(f"config file must be an existing file, got {str(path)!r}, which does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file must be a readable text file, got {str(path)!r}: {exc}") from None
    data = _parse_config_text(text, suffix, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections (trainer:, model:, ...), got a {type(data).__name__}"
        )
    return data


def _parse_config_text(text: str, suffix: str, path: Path) -> Any:
    """Parse a config file's text; a syntax error becomes one :class:`ConfigError` line
    that names the file, the line and the column."""
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise ConfigError(f"config file {path} must be valid YAML, got a syntax error{where}: {problem}") from None
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError as exc:
                raise ImportError("reading TOML on Python 3.10 needs the tomli package: pip install tomli") from exc
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} must be valid TOML, got a syntax error: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {path} must be valid JSON, got a syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
