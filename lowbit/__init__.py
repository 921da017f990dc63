"""lowbit: low-bit quantization of causal LMs."""
__version__ = "0.1.0"

from lowbit import _hf_hook  # noqa: E402  (light: registers the transformers quantizer lazily)

_hf_hook.install()
