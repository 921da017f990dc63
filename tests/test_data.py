"""Corpora, tokenization cache and calibration sampling (lowbit.data)."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lowbit.data import (
    BUNDLED_CORPORA,
    calibration_batch,
    calibration_set,
    clear_token_cache,
    list_corpora,
    load_text,
    text_sha256,
    tokenize_text,
    tokenizer_adds_bos,
)
from lowbit.errors import LowbitError

BOS = 256


def byte_tokenizer(adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 0..255) plus ``<s>`` = 256: token counts are byte counts.

    With ``adds_bos`` it prepends ``<s>`` when encoding with special tokens, like Gemma's.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<s>"] = BOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


EXPECTED_OPENINGS = {
    "austen-pp": "It is a truth universally acknowledged",
    "austen-emma": "Emma Woodhouse, handsome, clever, and rich",
    "austen-mansfield": "About thirty years ago Miss Maria Ward",
    "austen-northanger": "No one who had ever seen Catherine Morland",
    "austen-persuasion": "Sir Walter Elliot, of Kellynch Hall",
    "austen-sense": "The family of Dashwood had long been settled in Sussex",
    "brown": "The Fulton County Grand Jury said Friday",
}


# --- corpora -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUNDLED_CORPORA))
def test_bundled_corpus_is_real_prose(name: str) -> None:
    text = load_text(name)
    assert len(text) > 300_000
    assert EXPECTED_OPENINGS[name] in text[:20_000]
    assert not text.startswith("\n") and "\r" not in text
    words = re.findall(r"[A-Za-z]+", text[:200_000])
    assert len(words) > 25_000  # prose: mostly words
    assert sum(len(w) for w in words) / len(text[:200_000]) > 0.7
    assert load_text(name) is text  # cached


def test_all_expected_names_are_bundled() -> None:
    assert set(BUNDLED_CORPORA) == set(EXPECTED_OPENINGS)


def test_list_corpora_reports_sizes() -> None:
    rows = {r.name: r for r in list_corpora()}
    for name in BUNDLED_CORPORA:
        assert rows[name].available and rows[name].size_chars == len(load_text(name))
        assert rows[name].description
    assert {"wikitext2", "c4"} <= set(rows)


def test_path_input_txt_and_gz(tmp_path) -> None:
    body = "It was a dark and stormy night.\r\nThe rain fell in torrents.\n"
    plain = tmp_path / "story.txt"
    plain.write_bytes(("\n\n" + body).encode())
    packed = tmp_path / "story.txt.gz"
    packed.write_bytes(gzip.compress(body.encode()))
    expected = body.replace("\r\n", "\n")
    assert load_text(str(plain)) == expected
    assert load_text(str(packed)) == expected


def test_missing_and_unknown_corpus_errors(tmp_path) -> None:
    with pytest.raises(LowbitError, match="does not exist"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(LowbitError, match="austen-pp.*brown"):
        load_text("austen-ppp")
    with pytest.raises(LowbitError, match="not a file"):
        load_text(str(tmp_path))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LowbitError, match="UTF-8"):
        load_text(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(LowbitError, match="empty"):
        load_text(str(empty))


def test_absent_paper_corpus_says_how_to_provide_it(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("LOWBIT_WIKITEXT2", raising=False)
    monkeypatch.delenv("LOWBIT_C4", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(LowbitError, match="LOWBIT_WIKITEXT2"):
        load_text("wikitext2")
    with pytest.raises(LowbitError, match="LOWBIT_C4"):
        load_text("c4")


def test_paper_corpora_from_env(monkeypatch, tmp_path) -> None:
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text(" = Robert Boulter = \n\n Robert Boulter is an English actor .\n")
    monkeypatch.setenv("LOWBIT_WIKITEXT2", str(tmp_path))  # a folder holding wiki.test.raw
    assert "Robert Boulter is an English actor" in load_text("wikitext2")
    shard = tmp_path / "c4-validation.00000-of-00008.json.gz"
    docs = [{"text": f"document {i}", "url": "x"} for i in range(1200)]
    shard.write_bytes(gzip.compress("\n".join(json.dumps(d) for d in docs).encode()))
    monkeypatch.setenv("LOWBIT_C4", str(shard))
    text = load_text("c4")
    assert text.startswith("document 0 document 1 ") and text.endswith("document 1099")
    monkeypatch.setenv("LOWBIT_C4", str(tmp_path / "missing.json.gz"))
    with pytest.raises(LowbitError, match="LOWBIT_C4"):
        load_text("c4")


def test_text_sha256() -> None:
    assert text_sha256("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# --- tokenization ----------------------------------------------------------------------------


def test_tokenize_text_no_special_tokens_and_cache(tok) -> None:
    text = "Héllo, world"
    ids = tokenize_text(tok, text)
    assert ids.dtype == torch.int64 and ids.ndim == 1
    assert ids.numel() == len(text.encode("utf-8"))  # byte tokenizer: no BOS/EOS added
    assert tokenize_text(tok, text) is ids  # cached
    clear_token_cache()
    again = tokenize_text(tok, text)
    assert again is not ids and torch.equal(again, ids)


def test_tokenizer_adds_bos(tok) -> None:
    assert not tokenizer_adds_bos(tok)  # like SmolLM2: no BOS on encode
    gemma_like = byte_tokenizer(adds_bos=True)
    assert tokenizer_adds_bos(gemma_like)
    assert tokenize_text(gemma_like, "ab").tolist() == [
        gemma_like.convert_tokens_to_ids("a"),
        gemma_like.convert_tokens_to_ids("b"),
    ]


# --- calibration -----------------------------------------------------------------------------


def _is_window_of(row: torch.Tensor, ids: torch.Tensor) -> bool:
    k = row.numel()
    starts = (ids[: ids.numel() - k + 1] == row[0]).nonzero().flatten()
    return any(torch.equal(ids[s : s + k], row) for s in starts.tolist())


def test_calibration_deterministic_and_seeded(tok) -> None:
    text = load_text("austen-emma")[:50_000]
    state = torch.random.get_rng_state()
    a = calibration_batch(tok, text, nsamples=8, seqlen=64, seed=0)
    b = calibration_batch(tok, text, nsamples=8, seqlen=64, seed=0)
    c = calibration_batch(tok, text, nsamples=8, seqlen=64, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert a.shape == (8, 64) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    ids = tokenize_text(tok, text)
    assert all(_is_window_of(row, ids) for row in a)
    assert len({tuple(r.tolist()) for r in a}) > 1  # random offsets, not one window repeated


def test_calibration_bos_placement(tok) -> None:
    text = load_text("austen-emma")[:20_000]
    plain = calibration_batch(tok, text, nsamples=4, seqlen=32, seed=3)
    with_bos = calibration_batch(tok, text, nsamples=4, seqlen=32, seed=3, add_bos=True)
    assert with_bos.shape == (4, 32)
    assert (with_bos[:, 0] == BOS).all()
    assert (with_bos[:, 1:] != BOS).all() and (plain != BOS).all()
    ids = tokenize_text(tok, text)
    assert all(_is_window_of(row[1:], ids) for row in with_bos)


def test_calibration_whole_text_edge_and_errors(tok) -> None:
    text = "0123456789"
    rows = calibration_batch(tok, text, nsamples=3, seqlen=10, seed=0)
    assert torch.equal(rows, tokenize_text(tok, text).expand(3, 10))  # only one start possible
    with pytest.raises(LowbitError, match="needs 11 text tokens but the text has 10"):
        calibration_batch(tok, text, nsamples=1, seqlen=11, seed=0)
    with pytest.raises(LowbitError, match="nsamples"):
        calibration_batch(tok, text, nsamples=0, seqlen=4, seed=0)


def test_calibration_set_records_provenance(tok) -> None:
    cs = calibration_set(tok, "austen-persuasion", nsamples=2, seqlen=16, seed=5)
    assert cs.input_ids.shape == (2, 16)
    assert cs.text_sha256 == text_sha256(load_text("austen-persuasion"))
    assert cs.describe()["corpus"] == "austen-persuasion" and cs.describe()["seed"] == 5
