"""Matmul kernels for stored weights. triton/ is imported lazily, never at ``import lowbit``."""
