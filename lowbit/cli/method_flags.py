"""Method flags generated from the method config dataclasses, so every config field has a flag
(``--percdamp``) and every flag a recipe key (``percdamp:``)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from lowbit.algorithms import methods
from lowbit.errors import LowbitError

# Fields with hand-written flags in the common set (see main.py).
COMMON = {"bits", "group_size", "symmetric"}


def field_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of the ``Attributes:`` sections of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = (klass.__doc__ or "").splitlines()
        current = None
        in_attrs = False
        for line in lines:
            stripped = line.strip()
            if stripped == "Attributes:":
                in_attrs = True
                continue
            if not in_attrs:
                continue
            head, sep, text = stripped.partition(": ")
            if (
                sep
                and head.isidentifier()
                and line.startswith(" " * 8)
                and not line.startswith(" " * 12)
            ):
                current = head
                docs[current] = text
            elif stripped and current:
                docs[current] += " " + stripped
            elif not stripped and current:
                current, in_attrs = None, False
    return docs


def _fields() -> dict[str, tuple[Any, set[str]]]:
    """field name -> (type, methods that have it), over every registered method."""
    out: dict[str, tuple[Any, set[str]]] = {}
    for method in methods().values():
        hints = typing.get_type_hints(method.config_cls)
        for f in dataclasses.fields(method.config_cls):
            kind, owners = out.setdefault(f.name, (hints[f.name], set()))
            owners.add(method.name)
    return out


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method settings (each is also a recipe key)")
    docs: dict[str, str] = {}
    for method in methods().values():
        docs.update(field_docs(method.config_cls))
    for name, (kind, owners) in sorted(_fields().items()):
        if name in COMMON:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"[{', '.join(sorted(owners))}] {docs.get(name, '')}".replace("%", "%%")
        dest = f"cfg_{name}"
        if kind is bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif typing.get_origin(kind) is tuple:
            group.add_argument(
                flag, dest=dest, nargs="*", default=None, help=help_text, metavar="PATTERN"
            )
        else:
            group.add_argument(
                flag, dest=dest, type=kind, default=None, help=help_text, metavar=name.upper()
            )


def method_settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Config keys given on the command line for ``method``; error on a foreign flag."""
    fields = _fields()
    out = {}
    for key, value in vars(args).items():
        if not key.startswith("cfg_") or value is None:
            continue
        name = key[4:]
        if method not in fields.get(name, (None, set()))[1]:
            flag = "--" + name.replace("_", "-")
            raise LowbitError(f"{flag} does not apply to method '{method}'")
        out[name] = tuple(value) if isinstance(value, list) else value
    return out
