"""The library's front door: load, quantize, save, reload, evaluate.

from lowbit import api
from lowbit.algorithms.gptq import GPTQConfig
loaded = api.load_model("smollm2-135m")
result = api.quantize(loaded, GPTQConfig(bits=4, group_size=64), api.CalibSpec())
api.save_quantized(loaded, result, "out/smollm2-w4")
scores = api.evaluate(api.load_model("out/smollm2-w4"), ppl=["austen-pp"], kld=True)

Streamed (the full-precision model never in memory at once; docs/RELIABILITY.md):
loaded = api.load_model("smollm2-135m", stream=True)
result = api.quantize(loaded, GPTQConfig(bits=4, group_size=64), api.CalibSpec(),
                      workdir="out/smollm2-w4.ckpt")
api.save_quantized(loaded, result, "out/smollm2-w4")

A façade: each name lives in the module whose one job it is (docs/DESIGN.md, "Layers"):
loading (:mod:`lowbit.loading`), the inputs of a run (:mod:`lowbit.pipeline.configs`),
quantizing (:mod:`lowbit.pipeline.quantizing`), the pre-flight estimate
(:mod:`lowbit.pipeline.preflight`), saving with the manifest (:mod:`lowbit.pipeline.saving`),
evaluating (:mod:`lowbit.pipeline.evaluating`), memory (:mod:`lowbit.memory`). Every function
here raises LowbitError for bad input (a lower layer's ValueError is converted where the option
is known, :func:`lowbit.errors.user_input`).
"""

from lowbit.loading import LoadedModel, load_model, model_path
from lowbit.memory import process_peak_rss_mb as peak_rss_mb
from lowbit.pipeline.configs import CalibSpec, as_config, as_device, build_config
from lowbit.pipeline.evaluating import evaluate
from lowbit.pipeline.preflight import preflight
from lowbit.pipeline.quantizing import QuantizeResult, average_bits, quantize
from lowbit.pipeline.saving import save_quantized

__all__ = [
    "CalibSpec",
    "LoadedModel",
    "QuantizeResult",
    "as_config",
    "as_device",
    "average_bits",
    "build_config",
    "evaluate",
    "load_model",
    "model_path",
    "peak_rss_mb",
    "preflight",
    "quantize",
    "save_quantized",
]
