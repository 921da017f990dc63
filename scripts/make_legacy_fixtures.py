"""Write tests/data/legacy_v1/: lowbit DIRs saved by the code BEFORE the typed-core refactor.

Issue #18 ("typed core") requires that a folder written before the change loads after it, with
the same results; tests/test_legacy_folders.py loads these folders with the current code and
compares its logits to the ones recorded here, exactly.

How the committed fixtures were made (run this with the OLD package, not the working tree's):

    git worktree add /tmp/legacy 1f8a6a6
    cd /tmp  # not the repo root: ``python -c`` would import ./lowbit ahead of PYTHONPATH
    PYTHONPATH=/tmp/legacy /work/main/.venv/bin/python -c "import lowbit; print(lowbit.__file__)"
        # -> /tmp/legacy/lowbit/__init__.py (the script prints where lowbit came from, too)
    PYTHONPATH=/tmp/legacy /work/main/.venv/bin/python /work/main/scripts/make_legacy_fixtures.py \
        /work/main/tests/data/legacy_v1
    cd /work/main && git worktree remove --force /tmp/legacy

The model is a random-weight Llama (hidden 64, intermediate 128, 2 blocks, 4 heads, 2 KV heads,
vocabulary 512, tied embeddings; ``torch.manual_seed(0)``; channels 3 and 17 of every norm gain
scaled by 30 so that inputs have outlier channels and QLLM's reassembly / SmoothQuant's
smoothing have something to do) with a byte-level tokenizer (256 byte tokens and
``<s>``/``</s>``, no merges: no training, 6 KB) built with ``tokenizers``, so each folder is
self-contained (its tokenizer files are sealed in lowbit.json like the weights). Each case
(``CASES``) is quantized with the old ``api.quantize(loaded, method, settings, CalibSpec)`` on
tiny calibration (4 windows of 32 tokens of austen-emma), saved with ``api.save_quantized``
into ``<out>/<case>/``, reloaded with ``api.load_model`` and run on ``logit_ids()`` on one
thread in fp32; the logits are saved next to it as
``expected_logits.safetensors`` (outside the sealed file list: lowbit.json is written before
them, so they are an extra file the loader does not check). ``<out>/cases.json`` records each
case's method, settings, calibration, the lowbit commit, and the old code's perplexity on
``<out>/eval.txt`` (the first 1500 characters of the bundled austen-pp; windows of 64 tokens,
256 tokens in all).

Deterministic: two runs give byte-identical weights, tokenizer and logits files (lowbit.json
differs only in its timings). The whole tree is about 2 MB; the run takes ~40 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LEGACY_COMMIT = "1f8a6a6"
SEED = 0
VOCAB = 512
LOGITS_FILE = "expected_logits.safetensors"
OUTLIER_CHANNELS, OUTLIER_GAIN = (3, 17), 30.0
EVAL_TEXT = "eval.txt"  # the first 1500 characters of the bundled austen-pp
EVAL = {"seqlen": 64, "max_tokens": 256}


def logit_ids() -> torch.Tensor:
    """The token ids the logits are recorded on (the test uses the same)."""
    return torch.arange(40).reshape(2, 20) % VOCAB


# case name -> (method, settings, calibration overrides)
CASES: dict[str, tuple[str, dict, dict]] = {
    "rtn": ("rtn", {"bits": 4, "group_size": 32}, {}),
    # act-order with dynamic groups: the column permutation (g_idx) is stored
    "gptq": ("gptq", {"bits": 3, "group_size": 32, "act_order": True, "static_groups": False}, {}),
    "spqr": ("spqr", {"group_size": 16}, {}),
    "zqfp": (
        "zqfp",
        {
            "weight_format": "fp4_e2m1",
            "act_format": "fp8_e4m3",
            "group_size": 32,
            "scale_constraint": "m2",
            "lorc_rank": 4,
        },
        {},
    ),
    "qllm": (
        "qllm",
        {
            "bits": 4,
            "abits": 8,
            "reassembly": True,
            "correction": True,
            "epochs": 1,
            "group_blocks": 2,
            "search_steps": 4,
        },
        {},
    ),
    "lrqat": (
        "lrqat",
        {
            "bits": 4,
            "group_size": 32,
            "rank": 4,
            "steps": 2,
            "batch_size": 2,
            "train_seqlen": 32,
            "checkpoint_every": 0,
        },
        {},
    ),
    "smoothquant": ("smoothquant", {"bits": 8, "abits": 8}, {}),
}
CALIB = {"nsamples": 4, "seqlen": 32, "batch_size": 4}


def byte_tokenizer():
    """The byte-level tokenizer of ``lowbit/models/tiny.py`` (ids 0-255 the bytes, 256 ``<s>``
    added first, 257 ``</s>``), loaded from this checkout's file: the lowbit this script
    imports is the old one, which has no ``tiny`` module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "lowbit" / "models" / "tiny.py"
    spec = importlib.util.spec_from_file_location("_lowbit_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.byte_tokenizer()


def base_model(folder: Path) -> Path:
    """The random-weight tiny Llama and its tokenizer, saved as a plain HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # outlier input channels, as in real LLMs: reassembly/smoothing act
        for block in model.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[list(OUTLIER_CHANNELS)] *= OUTLIER_GAIN
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def record(out: Path, eval_text: Path) -> dict:
    """Reload ``out`` with the old code, save its logits on ``logit_ids()`` next to it, return
    a short summary with its perplexity on ``eval_text`` (``EVAL`` windows)."""
    from safetensors.torch import save_file

    from lowbit import api

    loaded = api.load_model(str(out))
    with torch.no_grad():
        logits = loaded.model(input_ids=logit_ids()).logits.float().contiguous()
    save_file({"logits": logits, "ids": logit_ids()}, str(out / LOGITS_FILE))
    scores = api.evaluate(loaded, [str(eval_text)], progress=False, **EVAL)
    return {
        "logits_sum": float(logits.double().sum()),
        "avg_bits": loaded.manifest["avg_bits"],
        "ppl": scores["ppl"][str(eval_text)],
        "eval_tokens": scores["eval_tokens"][str(eval_text)],
    }


def _git(folder: Path, *args: str) -> str:
    run = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=False)
    return run.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    import lowbit
    from lowbit import api
    from lowbit.data.corpora import load_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="e.g. tests/data/legacy_v1 (replaced)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--any-commit", action="store_true", help=f"run with a lowbit other than {LEGACY_COMMIT}"
    )
    args = parser.parse_args(argv)
    print(f"lowbit from {lowbit.__file__}", file=sys.stderr)
    torch.set_num_threads(1)  # the recorded logits must not depend on the thread count
    package = Path(lowbit.__file__).parent
    commit = _git(package, "rev-parse", "HEAD")
    edited = _git(package, "status", "--porcelain", "--", ".")
    if (not commit.startswith(LEGACY_COMMIT) or edited) and not args.any_commit:
        parser.error(
            f"lowbit comes from {package} at commit {commit or '?'}"
            f"{' with uncommitted edits' if edited else ''}, not a clean {LEGACY_COMMIT}; run "
            "with PYTHONPATH=<worktree of the old commit> (see the docstring)"
        )
    out_root = args.out.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    eval_text = out_root / EVAL_TEXT
    eval_text.write_text(load_text("austen-pp")[:1500])
    summary: dict = {
        "lowbit_commit": commit,
        "lowbit_version": lowbit.__version__,
        "logit_ids": "torch.arange(40).reshape(2, 20) % 512, one thread, fp32",
        "eval": {"ppl": EVAL_TEXT, **EVAL},
        "cases": {},
    }
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        # a relative spec, so each manifest's source_model reads "tiny-llama", not a tmp path
        os.chdir(tmp)
        source = base_model(Path("tiny-llama"))
        for case in args.cases:
            method, settings, calib = CASES[case]
            spec = api.CalibSpec(**{**CALIB, **calib})
            loaded = api.load_model(str(source))
            torch.manual_seed(SEED)
            result = api.quantize(loaded, method, settings, spec, progress=False)
            dest = out_root / case
            if dest.exists():
                shutil.rmtree(dest)
            api.save_quantized(loaded, result, dest)
            facts = record(dest, eval_text)
            summary["cases"][case] = {
                "method": method,
                "settings": settings,
                "calibration": {**CALIB, **calib},
                "seconds": round(result.seconds, 2),
                **facts,
            }
            print(f"{case}: {facts} in {result.seconds:.1f} s", file=sys.stderr)
        os.chdir(here)
    (out_root / "cases.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
