"""Typed configuration sections and the strict loader that builds them from YAML mappings.

Each concern has one small frozen dataclass; :func:`from_mapping` turns a plain mapping (from YAML or CLI
``key=value`` overrides) into one, refusing unknown keys and wrong types with the dotted path of the key.
It deliberately knows nothing about training or models: higher layers add their own sections the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

from zhtune.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DataConfig:
    """Where the training data is and how to read it.

    ``format`` is ``auto`` (detected from the first record) or a name from ``zhtune.data.formats.FORMATS``.
    ``on_error`` is ``raise`` (first bad record stops with file:line and field) or ``skip`` (bad records are
    counted and the first few reasons reported).
    """

    paths: tuple[str, ...] = ()
    format: str = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    cgec_instruction: str = "请改正下面句子中的语法错误，只输出改正后的句子。"
    cgec_refs: Literal["first", "each"] = "first"


@dataclass(frozen=True)
class TemplateConfig:
    """Which chat template renders conversations; ``system`` overrides the template's default system prompt."""

    name: str = "default"
    system: str | None = None
    enable_thinking: bool = False


@dataclass(frozen=True)
class TokenizeConfig:
    """How rendered conversations become ``(input_ids, labels)``.

    ``overflow`` decides what happens to samples longer than ``cutoff_len``: ``truncate`` keeps the first
    ``cutoff_len`` tokens, ``drop`` removes the sample; both are counted in the report.
    """

    cutoff_len: int = 2048
    overflow: Literal["truncate", "drop"] = "truncate"
    train_on_prompt: bool = False
    mask_history: bool = False
    packing: bool = True


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: must not be null")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (arm, *_rest) = get_args(tp)
        return tuple(_check_type(v, arm, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got a boolean")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_mapping(cls: type[T], mapping: Any, where: str = "") -> T:
    """Build the dataclass ``cls`` from ``mapping``, checking every key and type.

    Args:
        cls: a dataclass type whose fields have simple annotations (str, int, float, bool, Literal, unions
            with None, tuple[X, ...], nested dataclasses).
        mapping: a dict (None means "all defaults").
        where: dotted prefix used in error messages (``train.lr``).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: on an unknown key (listing the known ones) or a value of the wrong type.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _check_type(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


__all__ = ["DataConfig", "TemplateConfig", "TokenizeConfig", "from_mapping"]
