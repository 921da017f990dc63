"""lowbit: low-bit quantization of causal LMs."""

from lowbit import _hf_hook  # light: registers the transformers quantizer lazily
from lowbit._version import __version__

_hf_hook.install()

__all__ = ["__version__"]
