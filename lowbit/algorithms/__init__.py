"""One module per method; importing this package registers them all."""

from lowbit.algorithms import gptq, lrqat, qllm, rtn, smoothquant, spqr, zqfp  # noqa: F401
from lowbit.algorithms.base import METHODS, get_method  # noqa: F401
