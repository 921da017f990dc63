"""Registers lowbit's transformers quantizer when transformers loads its quantizer registry.

Kept free of heavy imports: ``import lowbit`` installs a meta-path finder that watches for
``transformers.quantizers.auto`` and, once that module has executed, calls
:func:`lowbit.export.hf_quantizer.register`. If transformers' registry is already loaded, it
registers at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

WATCHED = "transformers.quantizers.auto"


def _register() -> None:
    from lowbit.export.hf_quantizer import register

    register()


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps the registry module's own loader; registers lowbit after the module runs."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register()


class _Watcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else when it loads (once)."""
    if WATCHED in sys.modules:
        _register()
    elif not any(isinstance(f, _Watcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())
