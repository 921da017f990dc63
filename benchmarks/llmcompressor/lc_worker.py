"""llm-compressor side of vs_llmcompressor.py; runs in llm-compressor's own venv (setup.sh).

quantize: load the HF folder in fp32, oneshot GPTQ or RTN W4 (symmetric int4, groups of G)
on the token ids of IDS_JSON (``[N, L]``, drawn by lowbit), save compressed-tensors to OUT and
write ``{"load_s", "quantize_s", "save_s"}`` to TIMES_JSON.
dequantize: load a compressed-tensors folder with transformers' CompressedTensorsConfig
(``run_compressed=False``: dense dequantized weights) and save it as a plain fp32 HF folder
(no quantization_config) that lowbit's evaluator loads like any model.

Usage: python lc_worker.py quantize MODEL IDS_JSON {gptq,rtn} GROUP OUT TIMES_JSON THREADS
       python lc_worker.py dequantize COMPRESSED BASE OUT
"""

from __future__ import annotations

import json
import sys
import time


def quantize(model_dir: str, ids_json: str, method: str, group: int, out: str, times: str,
             threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(ids_json) as f:
        ids = json.load(f)
    loaded = time.perf_counter()
    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group,
        actorder="static" if method == "gptq" else None,
    )
    scheme = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "gptq":
        recipe = GPTQModifier(config_groups=scheme, ignore=["lm_head"], dampening_frac=0.01,
                              block_size=128)
        data = Dataset.from_dict(
            {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
        )
        oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe,
                num_calibration_samples=len(ids), max_seq_length=len(ids[0]))
    else:
        recipe = QuantizationModifier(config_groups=scheme, ignore=["lm_head"])
        oneshot(model=model, tokenizer=tokenizer, recipe=recipe)
    quantized = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    saved = time.perf_counter()
    with open(times, "w") as f:
        json.dump({"load_s": loaded - start, "quantize_s": quantized - loaded,
                   "save_s": saved - quantized}, f)


def dequantize(compressed: str, base: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    deq = AutoModelForCausalLM.from_pretrained(
        compressed, dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
    )
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = {k: v for k, v in deq.state_dict().items() if k in dense.state_dict()}
    missing, _ = dense.load_state_dict(state, strict=False)
    if missing:
        raise SystemExit(f"dequantized model lacks {missing[:5]}")
    changed = sum(not torch.equal(v, dense.state_dict()[k]) for k, v in
                  AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
                  .state_dict().items())
    print(f"{changed} tensors differ from the base after loading the dequantized weights")
    dense.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


if __name__ == "__main__":
    if sys.argv[1] == "quantize":
        a = sys.argv[2:]
        quantize(a[0], a[1], a[2], int(a[3]), a[4], a[5], int(a[6]))
    elif sys.argv[1] == "dequantize":
        dequantize(*sys.argv[2:5])
    else:
        raise SystemExit(__doc__)
