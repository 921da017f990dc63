"""The work behind :mod:`lowbit.api`, one job per module: the inputs of a run
(:mod:`~lowbit.pipeline.configs`), quantizing a loaded model
(:mod:`~lowbit.pipeline.quantizing`), the pre-flight memory and disk estimate
(:mod:`~lowbit.pipeline.preflight`), writing a quantized model with its manifest
(:mod:`~lowbit.pipeline.saving`) and evaluating a model (:mod:`~lowbit.pipeline.evaluating`).

Above eval/, infer/ and loading, below the api façade (docs/DESIGN.md, "Layers"). Inside the
package the imports run one way too: configs <- quantizing <- preflight, saving; evaluating
stands alone.
"""
