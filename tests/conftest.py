"""Shared fixtures: real bundled models cut to a few blocks, prepared once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `--device auto` (every default) is the CPU in the default suite, with or without a GPU: its
# stored numbers are CPU numbers; the `gpu` tests name their devices
os.environ.setdefault("LOWBIT_AUTO_DEVICE", "cpu")
# Without a GPU, Triton kernels run in its interpreter. Triton reads the switch when a module
# with @triton.jit functions is first imported, so it is set for the whole session before
# anything (torch.compile's inductor included) can import one; per-test monkeypatching was
# order-dependent.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (``pytest.mark.usefixtures("one_thread")``):
    exact comparisons that must not depend on the reduction order of a parallel matmul."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_2blocks(tmp_path_factory):
    from lowbit.models.fixtures import truncated_copy

    return truncated_copy("smollm2-135m", 2, tmp_path_factory.mktemp("smollm2-2b"))


@pytest.fixture(scope="session")
def gemma3_2blocks(tmp_path_factory):
    from lowbit.models.fixtures import truncated_copy

    return truncated_copy("gemma3-270m", 2, tmp_path_factory.mktemp("gemma3-2b"))


@pytest.fixture(scope="session")
def tiny_model(smollm2_2blocks, tmp_path_factory):
    """A random 2-block Llama (hidden 64) with SmolLM2's tokenizer: fast to load and save."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_2blocks).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_3blocks(tmp_path_factory):
    from lowbit.models.fixtures import truncated_copy

    return truncated_copy("smollm2-135m", 3, tmp_path_factory.mktemp("smollm2-3b"))


@pytest.fixture(scope="session")
def gemma3_tiny(tmp_path_factory):
    """A random 2-block Gemma-3 (lowbit.models.tiny; byte tokenizer, 512 words) of hidden 256
    and FFN 512, so that every linear width divides the default group of 128: Gemma's
    ``1 + w`` norms, scaled embedding, tied head and q/k norms at a fraction of the 2-block
    real model's cost (its 262k-word head dominates every load, forward and save)."""
    from lowbit.models.tiny import save_tiny

    return save_tiny("gemma3_text", tmp_path_factory.mktemp("gemma3-tiny"), hidden_size=256,
                     intermediate_size=512)
