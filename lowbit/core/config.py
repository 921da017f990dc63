"""The base of every method config: a frozen dataclass that names its method once, says what it
supports as methods, and round-trips to JSON/YAML with a version and strict keys.

Fields carry their command-line help as metadata (:func:`option`), so the CLI builds a
method's flags from its config class alone.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from lowbit.errors import LowbitError

CONFIG_VERSION = 1


def option(default: Any, help: str, *, choices: tuple[str, ...] = (), flag: str = "") -> Any:
    """A config field with its command-line metadata: ``help`` (the flag's help and the
    recipe key's documentation), ``choices`` (allowed strings, listed in the help) and ``flag``
    (an alias besides ``--field-name``, e.g. ``--wbits``). Tuple defaults are immutable, so a
    plain default suffices for every field type used here."""
    meta = {"help": help, "choices": tuple(choices), "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


def with_default(base: type, name: str, default: Any) -> Any:
    """A subclass's redeclaration of ``base``'s field ``name`` with another ``default`` and
    the same metadata (help, choices): a dataclass field redeclared with a plain default would
    lose its :func:`option` metadata."""
    return dataclasses.field(default=default, metadata=base.__dataclass_fields__[name].metadata)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config.

    A subclass sets ``method`` (its name in recipes and on the command line; the registry
    finds its implementation by the config's class, :func:`lowbit.core.method.method_for`) and
    overrides what it supports: :meth:`check_shapes`, :meth:`estimated_bits`,
    :meth:`blocks_per_group`.
    """

    method: ClassVar[str] = ""

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """LowbitError for a setting that the shapes ``(out_features, in_features)`` of the
        model's block linears rule out, before any calibration (a group size that does not
        divide a width, a rank above a layer's smaller side); nothing to check here."""

    def estimated_bits(self) -> float:
        """Stored bits per weight this config gives, roughly, for the pre-flight memory and
        disk estimate (:mod:`lowbit.engine.preflight`): 16 when it does not say."""
        return 16.0

    def blocks_per_group(self) -> int:
        """Consecutive decoder blocks a method's ``finish_group`` sees at once (1: none)."""
        return 1

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """The config of a recipe entry or a saved manifest's ``recipe`` item; unknown keys,
        another method's entry, a newer version and mistyped values are LowbitErrors."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise LowbitError(f"config is for method '{method}', not '{cls.method}'")
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise LowbitError(
                f"config version {version} is not supported (expected {CONFIG_VERSION}); "
                "upgrade lowbit to read it"
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise LowbitError(
                    f"unknown key '{key}' for method '{cls.method}'; known keys: "
                    f"{', '.join(sorted(known))}"
                )
        hints = typing.get_type_hints(cls)
        return cls(**{k: typed_value(cls.method, k, v, hints[k]) for k, v in data.items()})


def typed_value(method: str, key: str, value: Any, kind: Any) -> Any:
    """``value`` of setting ``key`` as the field's type ``kind``, or a LowbitError naming the
    key and the type (a recipe's ``bits: four`` or ``ignore: "*.x"`` would otherwise fail deep
    in validation, or silently: a string iterates as one pattern per character)."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-2 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    elif typing.get_origin(kind) is tuple:
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = True
    if ok:
        return value
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, "a list of glob patterns, e.g. ['*.mlp.down_proj']"
    )
    flag = "--" + key.replace("_", "-")
    raise LowbitError(f"{key} ({flag}) of method '{method}' must be {want}, got {value!r}")
