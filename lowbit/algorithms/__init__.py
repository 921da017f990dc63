"""One module per method; importing this package imports every module in it, which registers
every method (a new method is one new file here: see docs/DESIGN.md, "Adding a method")."""

import importlib
import pkgutil

from lowbit.core.config import MethodConfig
from lowbit.core.method import Method, method_named, registered

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def methods() -> dict[str, Method]:
    """Every method (the built-in ones are registered by importing this package), by name."""
    return registered()


def config_class(name: str) -> type[MethodConfig]:
    """The config class of the method a recipe or the command line names."""
    return method_named(name).config_cls


__all__ = ["config_class", "method_named", "methods"]
