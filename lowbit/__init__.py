"""lowbit: low-bit quantization of causal LMs."""
__version__ = "0.1.0"
