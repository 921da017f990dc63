"""A method's command-line flags, built from its config class alone: every config field has a
flag (``--percdamp``) and every flag a recipe key (``percdamp:``).

A field's flag takes its type from the field's type hint (``bool``: ``--x/--no-x``; a tuple of
patterns: ``--x PATTERN ...``), and its help, its choices and an alias (``flag``, e.g.
``--wbits``) from the field's metadata (:func:`lowbit.core.config.option`). The common
fields keep the flags of the contract (docs/CLI.md) whatever their metadata says: ``bits``
``--bits/--wbits``, ``group_size`` ``-g/--group-size``, ``symmetric`` ``--sym/--asym``.

``lowbit quantize`` parses in two stages (:func:`find_method`, then the parser with that
method's flags); a flag of another method is the one-line error of :func:`check_flags`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from lowbit.algorithms import methods
from lowbit.core.method import Method, method_named
from lowbit.errors import LowbitError

# The common fields: their flags are the contract's (docs/CLI.md), their dest the field name.
COMMON = {"bits": ("--bits", "--wbits"), "group_size": ("-g", "--group-size")}
SYMMETRIC = ("--sym", "--asym")
COMMON_HELP = {
    "bits": "weight bits (2-8)",
    "group_size": "columns per group; -1 = per output channel",
    "symmetric": "symmetric grid (--sym) or asymmetric, with a stored zero per group (--asym)",
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One config field as a command-line flag."""

    name: str
    kind: Any  # the type hint: bool, int, float, str or tuple[str, ...]
    default: Any
    help: str
    choices: tuple[str, ...]
    flags: tuple[str, ...]  # option strings; a switch's --no-x forms are in ``negatives``

    @property
    def dest(self) -> str:
        return self.name if self.name in COMMON or self.name == "symmetric" else f"cfg_{self.name}"

    @property
    def type_name(self) -> str:
        if self.kind is bool:
            return "switch"
        if typing.get_origin(self.kind) is tuple:
            return "patterns"
        return getattr(self.kind, "__name__", str(self.kind))

    @property
    def negatives(self) -> tuple[str, ...]:
        if self.name == "symmetric":
            return ()
        if self.kind is not bool:
            return ()
        return tuple("--no-" + f[2:] for f in self.flags if f.startswith("--"))

    def describe(self) -> str:
        """The help text with the type, the default and the choices."""
        if self.name == "symmetric":  # --sym / --asym
            return f"{self.help} [default {'--sym' if self.default else '--asym'}]"
        if self.kind is bool:
            default = "on" if self.default else "off"
        elif typing.get_origin(self.kind) is tuple:
            default = " ".join(self.default) or "none"
        else:
            default = repr(self.default) if self.kind is str else str(self.default)
        facts = [self.type_name, f"default {default}"]
        if self.choices:
            facts.append(f"one of: {', '.join(self.choices)}")
        return f"{self.help} [{'; '.join(facts)}]"

    def to_dict(self) -> dict[str, Any]:
        default = list(self.default) if isinstance(self.default, tuple) else self.default
        return {
            "name": self.name,
            "flags": list(self.flags + self.negatives),
            "type": self.type_name,
            "default": default,
            "help": self.help,
            "choices": list(self.choices),
        }


def settings_of(method: Method) -> list[Setting]:
    """Every field of ``method``'s config as a :class:`Setting`, in field order."""
    cls = method.config_cls
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "symmetric":
            flags: tuple[str, ...] = SYMMETRIC
        else:
            flags = COMMON.get(f.name, ("--" + f.name.replace("_", "-"),))
            alias = f.metadata.get("flag") or ""
            if alias and alias not in flags:
                flags += (alias,)
        default = f.default if f.default is not dataclasses.MISSING else None
        choices = tuple(f.metadata.get("choices") or ())
        help_text = f.metadata.get("help", "")  # option(): every field has it (tests)
        out.append(Setting(f.name, hints[f.name], default, help_text, choices, flags))
    return out


def add_method_flags(parser: argparse.ArgumentParser, method: str | None) -> None:
    """``method``'s flags (``None``: only the common flags, with generic help, for the
    parser that has no method yet); method settings go to ``cfg_<field>``, the common fields
    to ``bits``, ``group_size``, ``symmetric``."""
    if method is None:
        _add_common(parser, None)
        return
    settings = settings_of(method_named(method))
    by_name = {s.name: s for s in settings}
    _add_common(parser, by_name)
    group = parser.add_argument_group(
        f"{method} settings (each --x-y is also the recipe key x_y)"
    )
    for s in settings:
        if not s.dest.startswith("cfg_"):
            continue
        help_text = _escape(s.describe())
        if s.kind is bool:
            group.add_argument(*s.flags, dest=s.dest, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        elif typing.get_origin(s.kind) is tuple:
            group.add_argument(*s.flags, dest=s.dest, nargs="*", default=None, help=help_text,
                               metavar="PATTERN")
        else:
            group.add_argument(*s.flags, dest=s.dest, type=s.kind, default=None, help=help_text,
                               metavar=s.name.upper())


def _add_common(parser: argparse.ArgumentParser, settings: dict[str, Setting] | None) -> None:
    """``--bits/--wbits``, ``-g/--group-size``, ``--sym/--asym`` for every method (the
    contract); help from the method's fields where it has them."""

    def help_of(name: str) -> str:
        if settings and name in settings:
            s = settings[name]
            return _escape(dataclasses.replace(s, help=s.help or COMMON_HELP[name]).describe())
        return COMMON_HELP[name]

    flags = {n: settings[n].flags if settings and n in settings else f for n, f in COMMON.items()}
    parser.add_argument(*flags["bits"], dest="bits", type=int, metavar="B", help=help_of("bits"))
    parser.add_argument(*flags["group_size"], dest="group_size", type=int, metavar="G",
                        help=help_of("group_size"))
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, default=None,
                     help=help_of("symmetric"))
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False,
                     help="asymmetric grid (see --sym)")


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def _own_flags(method: str) -> set[str]:
    out = {*COMMON["bits"], *COMMON["group_size"], *SYMMETRIC}
    for s in settings_of(method_named(method)):
        out.update(s.flags, s.negatives)
    return out


def check_flags(argv: list[str], method: str) -> None:
    """LowbitError for a flag of another method in ``argv`` (``--percdamp`` with ``rtn``).
    Checked on the words, before parsing: argparse would take a prefix of one of this
    method's own flags for that flag."""
    own = _own_flags(method)
    others: dict[str, set[str]] = {}
    for name in methods():
        if name != method:
            for flag in _own_flags(name) - own:
                others.setdefault(flag, set()).add(name)
    for word in argv:
        if word == "--":
            break
        flag = word.split("=", 1)[0]
        if flag in others:
            raise LowbitError(
                f"{flag} does not apply to method '{method}' (it is a setting of "
                f"{', '.join(sorted(others[flag]))})"
            )


class _NoMethod(Exception):
    pass


class _Probe(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise _NoMethod(message)


def find_method(argv: list[str]) -> str | None:
    """The ``--method`` of ``argv`` (the first stage of ``lowbit quantize``'s parse), or None
    when there is none (or no value: the full parser then says so); LowbitError for a name
    that is no method."""
    probe = _Probe(add_help=False)
    probe.add_argument("--method")
    try:
        found, _ = probe.parse_known_args(argv)
    except _NoMethod:
        return None
    if found.method is not None:
        method_named(found.method)
    return found.method


def methods_listing() -> str:
    """One line per method: its name and summary (``lowbit quantize --help``)."""
    found = sorted(methods().values(), key=lambda m: m.name)
    width = max(len(m.name) for m in found)
    return "\n".join(f"  {m.name:<{width}}  {m.summary}" for m in found)


def method_settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The method settings (not the common ones) given on the command line for ``method``;
    a LowbitError for a setting ``method`` does not have."""
    known = {s.name for s in settings_of(method_named(method))}
    out = {}
    for key, value in vars(args).items():
        if not key.startswith("cfg_") or value is None:
            continue
        name = key[4:]
        if name not in known:
            flag = "--" + name.replace("_", "-")
            raise LowbitError(f"{flag} does not apply to method '{method}'")
        out[name] = tuple(value) if isinstance(value, list) else value
    return out
