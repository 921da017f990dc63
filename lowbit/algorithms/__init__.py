"""One module per method; importing this package registers them all."""

from lowbit.algorithms import gptq, lrqat, qllm, rtn, smoothquant, spqr, zqfp  # noqa: F401
from lowbit.core.config import MethodConfig
from lowbit.core.method import Method, method_named, registered


def methods() -> dict[str, Method]:
    """Every method (the built-in ones are registered by importing this package), by name."""
    return registered()


def config_class(name: str) -> type[MethodConfig]:
    """The config class of the method a recipe or the command line names."""
    return method_named(name).config_cls


__all__ = ["config_class", "method_named", "methods"]
